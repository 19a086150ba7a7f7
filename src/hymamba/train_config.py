"""The training configuration: one flat dataclass, YAML files, command-line overrides, checks.

The defaults are the built-in laptop job (``mambavision_nano`` on the digits data set, the same
values as ``configs/digits_nano.yaml``); ``configs/mambavision_*_1k.yaml`` hold the official
ImageNet-1K recipes. Precedence: defaults < YAML file < explicit overrides (the command line).
Every value is checked before any work starts, and a bad one is a ``ValueError`` that says what
was expected, what was found and what to do.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["TrainConfig", "build_config", "check_config", "config_to_dict", "load_yaml", "scaled_lr"]

_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt")
_AMP_DTYPES = ("auto", "bfloat16", "float16")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (shown by ``hymamba train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the YAML keys and the ``--flags``."""

    # data and model
    data: Optional[str] = _f("digits", "ImageFolder root holding TRAIN_SPLIT/ and VAL_SPLIT/ (one subfolder per "
                                       "class), or 'digits' for the built-in scikit-learn digits")
    train_split: str = _f("train", "training subfolder of DATA")
    val_split: str = _f("val", "validation subfolder of DATA")
    model: str = _f("mambavision_nano", "model name (see 'hymamba models')")
    pretrained: bool = _f(False, "start from the official weights (a local file, see README)")
    checkpoint: Optional[str] = _f(None, "start from these weights (fine-tuning); a new head is made when the "
                                         "class count differs")
    input_size: Optional[int] = _f(None, "image side (default: the model's input size)")
    interpolation: Optional[str] = _f(None, "evaluation resize interpolation (default: the model's)")
    train_interpolation: str = _f("random", "training resize interpolation ('random' picks per image)")
    crop_pct: Optional[float] = _f(None, "evaluation center-crop fraction (default: the model's)")
    drop_path: Optional[float] = _f(0.1, "stochastic depth rate (null: the variant's default)")
    freeze_stages: int = _f(0, "freeze the stem and levels < N (0: train everything)")
    mixer_variant: str = _f("concat", "token mixer (paper ablation): concat (MambaVision), gated, regular_conv, "
                                      "causal_conv")
    attention_pattern: str = _f("last_half", "where attention blocks go in levels 2-3 (paper ablation): last_half "
                                             "(MambaVision), first_half, interleave, mamba_only, attention_only")
    grad_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    scan_impl: str = _f("auto", "selective-scan implementation")
    max_train_samples: Optional[int] = _f(None, "use only this many training images (spread over the set)")
    max_val_samples: Optional[int] = _f(None, "use only this many validation images")

    # schedule and optimiser
    epochs: int = _f(15, "epochs in total, cooldown included")
    warmup_epochs: float = _f(1, "linear warmup epochs, from WARMUP_LR")
    cooldown_epochs: int = _f(1, "epochs at MIN_LR at the end")
    batch_size: int = _f(64, "images per process and step")
    val_batch_size: Optional[int] = _f(None, "evaluation batch per process (default: 2 x BATCH_SIZE)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimiser step")
    lr: float = _f(0.004, "peak learning rate (for the global batch; see LR_BASE_SIZE)")
    lr_base_size: Optional[int] = _f(None, "scale LR linearly: lr x global_batch / LR_BASE_SIZE (null: use LR "
                                           "as given, as the official configs do)")
    min_lr: float = _f(1e-5, "learning rate at the end of the schedule")
    warmup_lr: float = _f(1e-6, "learning rate at the start of warmup")
    sched: str = _f("cosine", f"learning-rate schedule ({', '.join(_SCHEDULES)})")
    opt: str = _f("lamb", "optimiser, any timm name (lamb, adamw, sgd, ...)")
    opt_betas: Tuple[float, float] = _f((0.9, 0.999), "optimiser betas")
    opt_eps: float = _f(1e-8, "optimiser epsilon")
    momentum: float = _f(0.9, "momentum (SGD-like optimisers)")
    weight_decay: float = _f(0.05, "weight decay (not on biases, norms, A_log, D)")
    layer_decay: Optional[float] = _f(None, "layer-wise LR decay factor (fine-tuning), e.g. 0.8")
    clip_grad: Optional[float] = _f(5.0, "gradient clipping threshold (null: off)")
    clip_mode: str = _f("norm", "gradient clipping mode (norm, value, agc)")

    # augmentation and regularisation
    smoothing: float = _f(0.1, "label smoothing")
    mixup: float = _f(0.0, "mixup alpha (0: off)")
    cutmix: float = _f(0.0, "cutmix alpha (0: off)")
    mixup_prob: float = _f(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = _f("batch", "mix per 'batch', 'pair' or 'elem'")
    aa: Optional[str] = _f("rand-m5-mstd0.5-inc1", "RandAugment/AutoAugment policy in timm's syntax (null: off)")
    reprob: float = _f(0.1, "random-erasing probability")
    remode: str = _f("pixel", "random-erasing mode")
    recount: int = _f(1, "random-erasing count")
    color_jitter: float = _f(0.0, "color jitter strength")
    hflip: float = _f(0.0, "horizontal flip probability")
    vflip: float = _f(0.0, "vertical flip probability")
    scale: Tuple[float, float] = _f((0.6, 1.0), "random-resized-crop area range")
    ratio: Tuple[float, float] = _f((0.75, 1.3333333333333333), "random-resized-crop aspect range")
    model_ema: bool = _f(True, "keep an exponential moving average of the weights (evaluated; used by MESA)")
    model_ema_decay: float = _f(0.99, "EMA decay per optimiser step")
    model_ema_warmup: bool = _f(True, "ramp the EMA decay up over the first steps (for short runs)")
    mesa: float = _f(0.0, "MESA coefficient: KL(EMA || model) added to the loss (0: off)")
    mesa_start_ratio: float = _f(0.25, "MESA starts once epoch / EPOCHS exceeds this")

    # system
    amp: bool = _f(True, "mixed precision (bfloat16 on CPU; bfloat16 or float16 on CUDA)")
    amp_dtype: str = _f("auto", f"mixed-precision dtype ({', '.join(_AMP_DTYPES)})")
    channels_last: bool = _f(False, "channels_last memory layout")
    device: str = _f("auto", "auto, cpu or cuda")
    seed: int = _f(31, "random seed (each process adds its rank)")
    workers: Optional[int] = _f(None, "data-loading processes per training process (default: 0 for digits, "
                                      "min(8, cores) for folders)")
    output: Optional[str] = _f(None, "output folder (default: runs/<model>-<time>)")
    tensorboard: bool = _f(False, "also write TensorBoard logs (needs the tensorboard package)")
    quiet: bool = _f(False, "no progress bars and no per-epoch lines")


def config_fields() -> Dict[str, dataclasses.Field]:
    """The config's fields by name (used to build the command line)."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_type(f: dataclasses.Field) -> Tuple[type, Optional[int]]:
    """(scalar type, tuple length or None) of a config field."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        hint = args[0]
        args = list(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return args[0], len(args)
    return hint, None


def field_optional(f: dataclasses.Field) -> bool:
    """Whether a config field accepts None."""
    return type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[f.name])


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The config as plain Python values (tuples become lists), for YAML, JSON and checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def load_yaml(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a YAML config file; unknown keys are an error."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"config file not found: {p}; the recipes live in the repository's configs/ folder")
    with open(p, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{p} must hold a mapping of option: value, found a {type(values).__name__}")
    _check_keys(values, str(p))
    return values


def _check_keys(values: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, config_fields(), 1)) else k
                 for k in unknown]
        raise ValueError(f"{source}: unknown option(s) {', '.join(hints)}; see 'hymamba train --help'")


def _coerce(name: str, value: Any) -> Any:
    f = config_fields()[name]
    kind, length = field_type(f)
    if value is None:
        return None
    if length is not None:
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise ValueError(f"option {name} needs {length} numbers, got {value!r}")
        return tuple(kind(v) for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"option {name} must be true or false, got {value!r}")
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"option {name} must be a number, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise ValueError(f"option {name} must be a whole number, got {value!r}")
    return kind(value)


def build_config(config_file: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
                 base: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Defaults < ``base`` (e.g. a resumed run's config) < YAML ``config_file`` < ``overrides``."""
    values: Dict[str, Any] = {}
    for source, layer in (("resumed checkpoint", base), (str(config_file), load_yaml(config_file) if config_file
                                                           else None), ("overrides", overrides)):
        if layer:
            _check_keys(layer, source)
            values.update(layer)
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def scaled_lr(cfg: TrainConfig, global_batch: int) -> Tuple[float, str]:
    """(learning rate to use, one line that states the rule)."""
    if cfg.lr_base_size:
        lr = cfg.lr * global_batch / cfg.lr_base_size
        return lr, (f"lr {lr:.4g} = {cfg.lr:g} x global batch {global_batch} / lr_base_size {cfg.lr_base_size} "
                    "(linear scaling)")
    return cfg.lr, (f"lr {cfg.lr:g} used as given for the global batch (no scaling, as in the official "
                    "configs; set --lr-base-size N to scale linearly with the global batch)")


def check_config(cfg: TrainConfig) -> None:
    """Reject impossible settings before any work starts (``ValueError`` saying what to do)."""
    from hymamba.factory import resolve_model_name

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    resolve_model_name(cfg.model)
    from hymamba.models.mambavision import ATTENTION_PATTERNS, MIXER_VARIANTS

    need(cfg.mixer_variant in MIXER_VARIANTS,
         f"mixer_variant must be one of {', '.join(MIXER_VARIANTS)}, got {cfg.mixer_variant!r}")
    need(cfg.attention_pattern in ATTENTION_PATTERNS,
         f"attention_pattern must be one of {', '.join(ATTENTION_PATTERNS)}, got {cfg.attention_pattern!r}")
    need(cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"batch_size must be at least 1, got {cfg.batch_size}")
    need(cfg.val_batch_size is None or cfg.val_batch_size >= 1,
         f"val_batch_size must be at least 1, got {cfg.val_batch_size}")
    need(cfg.grad_accum >= 1, f"grad_accum must be at least 1, got {cfg.grad_accum}")
    need(cfg.lr > 0, f"lr must be positive, got {cfg.lr}")
    need(cfg.lr_base_size is None or cfg.lr_base_size >= 1, f"lr_base_size must be positive, got {cfg.lr_base_size}")
    need(cfg.min_lr >= 0 and cfg.warmup_lr >= 0, "min_lr and warmup_lr must be >= 0")
    need(cfg.warmup_epochs >= 0 and cfg.cooldown_epochs >= 0, "warmup_epochs and cooldown_epochs must be >= 0")
    need(cfg.cooldown_epochs < cfg.epochs,
         f"cooldown_epochs ({cfg.cooldown_epochs}) must be fewer than epochs ({cfg.epochs}): epochs include the "
         "cooldown")
    need(cfg.warmup_epochs <= cfg.epochs - cfg.cooldown_epochs,
         f"warmup_epochs ({cfg.warmup_epochs}) must fit in the schedule before the cooldown: at most epochs - "
         f"cooldown_epochs = {cfg.epochs - cfg.cooldown_epochs}; lower --warmup-epochs")
    need(cfg.sched in _SCHEDULES, f"unknown schedule {cfg.sched!r}; expected one of {', '.join(_SCHEDULES)}")
    from timm.optim import list_optimizers

    known = list_optimizers()
    if cfg.opt.lower() not in known:
        import difflib

        close = difflib.get_close_matches(cfg.opt.lower(), known, 3)
        raise ValueError(f"unknown optimizer {cfg.opt!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " Common choices: lamb (official), adamw, sgd")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.layer_decay is None or 0 < cfg.layer_decay <= 1, f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, f"clip_grad must be positive or null, got {cfg.clip_grad}")
    need(cfg.clip_mode in ("norm", "value", "agc"), f"clip_mode must be norm, value or agc, got {cfg.clip_mode!r}")
    need(0 <= cfg.smoothing < 1, f"smoothing must be in [0, 1), got {cfg.smoothing}")
    need(cfg.mixup >= 0 and cfg.cutmix >= 0, "mixup and cutmix alphas must be >= 0")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip", "vflip", "mesa_start_ratio"):
        value = getattr(cfg, name)
        need(0 <= value <= 1, f"{name} is a probability/ratio in [0, 1], got {value}")
    need(cfg.mixup_mode in ("batch", "pair", "elem"), f"mixup_mode must be batch, pair or elem, got {cfg.mixup_mode!r}")
    need(0 < cfg.scale[0] <= cfg.scale[1] <= 1, f"scale must be 0 < min <= max <= 1, got {cfg.scale}")
    need(0 < cfg.ratio[0] <= cfg.ratio[1], f"ratio must be 0 < min <= max, got {cfg.ratio}")
    need(cfg.color_jitter >= 0, f"color_jitter must be >= 0, got {cfg.color_jitter}")
    need(0 < cfg.model_ema_decay < 1, f"model_ema_decay must be in (0, 1), got {cfg.model_ema_decay}")
    need(cfg.mesa >= 0, f"mesa must be >= 0, got {cfg.mesa}")
    need(cfg.mesa == 0 or cfg.model_ema, "MESA distils from the EMA model: set model_ema true or mesa 0")
    need(cfg.drop_path is None or 0 <= cfg.drop_path < 1, f"drop_path must be in [0, 1), got {cfg.drop_path}")
    need(0 <= cfg.freeze_stages <= 4, f"freeze_stages must be 0-4 (levels), got {cfg.freeze_stages}")
    need(cfg.input_size is None or cfg.input_size >= 32, f"input_size must be at least 32, got {cfg.input_size}")
    need(cfg.crop_pct is None or 0 < cfg.crop_pct <= 1, f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
    need(cfg.amp_dtype in _AMP_DTYPES, f"amp_dtype must be one of {', '.join(_AMP_DTYPES)}, got {cfg.amp_dtype!r}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}")
    need(cfg.workers is None or cfg.workers >= 0, f"workers must be >= 0, got {cfg.workers}")
    for name in ("max_train_samples", "max_val_samples"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"{name} must be at least 1, got {value}")
    need(cfg.data is not None, "no data set: this recipe needs DATA, an ImageFolder root with train/ and val/ "
                               "subfolders (or 'digits' for the built-in set)")
    need(not (cfg.pretrained and cfg.checkpoint), "give either pretrained or checkpoint, not both")
    if cfg.checkpoint is not None:
        need(Path(cfg.checkpoint).expanduser().exists(), f"checkpoint not found: {cfg.checkpoint}")
    if cfg.tensorboard:
        import importlib.util

        need(importlib.util.find_spec("tensorboard") is not None,
             "tensorboard was requested but the package is not installed: pip install tensorboard, "
             "or drop --tensorboard")
