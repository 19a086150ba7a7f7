"""Run configurations: flat dataclasses whose field names are the YAML keys and the ``--flags``.

:class:`Config` holds the machinery every task's configuration shares (fields with help texts,
YAML files, typed coercion, precedence); :class:`EngineConfig` the settings of the task-agnostic
training loop (schedule, optimiser, EMA, precision, system). A task's configuration subclasses
:class:`EngineConfig` and adds its own fields and checks (e.g.
:class:`hymamba.tasks.classification.ClassificationConfig`).

Precedence: defaults < ``base`` (a resumed run's config) < YAML file < explicit overrides (the
command line). Every value is checked before any work starts; a bad one is a
:class:`~hymamba.errors.ConfigError` that says what was expected, what was found and what to do.
This module imports neither torch nor a task, so the command line can build its flags cheaply.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Type, TypeVar

from hymamba.errors import ConfigError
from hymamba.utils.choices import AMP_DTYPES, DEVICES

__all__ = ["AMP_DTYPES", "SCHEDULES", "Config", "EngineConfig", "need", "option", "resume_config"]

SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt")
STRATEGIES = ("ddp", "fsdp")

C = TypeVar("C", bound="Config")


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def need(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


_BAD = object()  # _scalar's answer for a value that does not fit


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(kind: type, value: Any) -> Any:
    """``value`` as ``kind`` (bool, int, float or str), or ``_BAD``. Numbers written as text ('1e-3',
    which YAML 1.1 reads as a string) count as numbers; booleans are never numbers nor text."""
    if kind is bool:
        return value if isinstance(value, bool) else _BAD
    if kind in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if kind is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                return _BAD
        if not _is_number(value):
            return _BAD
        if kind is int:
            if isinstance(value, float):
                return int(value) if value.is_integer() else _BAD
            return value
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            return _BAD
    if kind is str:
        if isinstance(value, str):
            return value
        if _is_number(value) or isinstance(value, (datetime.date, datetime.time)):  # e.g. output: 2024
            return str(value)
        return _BAD
    return value if isinstance(value, kind) else _BAD


def _expected(kind: type, length: Optional[int]) -> str:
    if length is not None:
        return f"a list of {length} numbers"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(kind, kind.__name__)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "text", list: "a list", dict: "a mapping",
             type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxlevel = 60, 60, 6, 6, 4, 2


def _show(value: Any) -> str:
    """A short repr (bounded in depth and length: a YAML file can nest and alias without limit), with
    YAML's spelling of true, false and null."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = _REPR.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


@dataclass
class Config:
    """Base of every run configuration: typed fields, YAML files, flags and checks."""

    @classmethod
    def fields(cls) -> Dict[str, dataclasses.Field]:
        """The fields by name (used to build the command line)."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def field_type(cls, f: dataclasses.Field) -> Tuple[type, Optional[int]]:
        """(scalar type, tuple length or None) of a field."""
        hint = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union:
            hint = args[0]
            args = list(typing.get_args(hint))
        if typing.get_origin(hint) is tuple:
            return args[0], len(args)
        return hint, None

    @classmethod
    def field_optional(cls, f: dataclasses.Field) -> bool:
        """Whether a field accepts None."""
        return type(None) in typing.get_args(typing.get_type_hints(cls)[f.name])

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values (tuples become lists), for YAML, JSON and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def load_yaml(cls, path: str | os.PathLike) -> Dict[str, Any]:
        """Read a YAML config file; unknown keys and unreadable files are a ConfigError."""
        import yaml

        try:
            p = Path(path).expanduser()
            found = p.is_file()  # not a folder, pipe or device (reading those could hang)
        except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, an unknown ~user
            raise ConfigError(f"cannot use {str(path)[:200]!r} as a config file: {e}") from None
        if not found:
            raise ConfigError(f"config file not found: {p}; the recipes live in the repository's configs/ folder")
        try:
            with open(p, encoding="utf-8") as f:
                values = yaml.safe_load(f)  # plain data only: no tags that build Python objects
        except OSError as e:
            raise ConfigError(f"could not read the config file {p}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - YAML syntax, bad UTF-8, a nesting too deep, a 5000-digit number
            if isinstance(e, RecursionError):
                detail = "values nest too deeply"
            elif isinstance(e, ValueError) and "digits" in str(e) and not isinstance(e, UnicodeDecodeError):
                detail = "a number has too many digits"
            else:
                detail = " ".join(str(e).split())[:200] or type(e).__name__
            raise ConfigError(f"could not read the config file {p}: {detail}; it must be YAML holding "
                              "option: value lines") from None
        if values is None:  # an empty file (or only comments)
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{p} must hold option: value lines (a YAML mapping), found {_kind(values)} "
                              f"{_show(values)}")
        cls._check_keys(values, str(p))
        return values

    @classmethod
    def _check_keys(cls, values: Mapping[Any, Any], source: str) -> None:
        for k in values:
            if not isinstance(k, str):
                raise ConfigError(f"{source}: option names must be text, found {_kind(k)} {_show(k)}; write "
                                  "option: value lines (see '--help' for the options)")
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, cls.fields(), 1)) else k
                     for k in unknown]
            raise ConfigError(f"{source}: unknown option(s) {', '.join(hints)}; see '--help' for the options")

    @classmethod
    def _coerce(cls, name: str, value: Any, source: Optional[str] = None) -> Any:
        """``value`` as the type of field ``name``, or a ConfigError naming the option, the value found
        and what is expected (prefixed by ``source``, the file it came from, when given)."""
        f = cls.fields()[name]
        kind, length = cls.field_type(f)
        where = f"{source}: " if source else ""
        if value is None:
            if cls.field_optional(f):
                return None
            default = getattr(cls(), name)
            raise ConfigError(f"{where}option {name} cannot be null: expected {_expected(kind, length)}; remove "
                              f"it to keep the default ({_show(default)})")
        if length is not None:
            if not isinstance(value, (list, tuple)) or len(value) != length:
                raise ConfigError(f"{where}option {name} needs {length} numbers, got {_show(value)}")
            items = []
            for v in value:
                item = _scalar(kind, v)
                if item is _BAD:
                    raise ConfigError(f"{where}option {name} needs {length} numbers, got {_show(value)}: "
                                      f"{_show(v)} is not {_expected(kind, None)}")
                items.append(item)
            return tuple(items)
        result = _scalar(kind, value)
        if result is not _BAD:
            return result
        if kind is bool:
            raise ConfigError(f"{where}option {name} must be true or false, got {_show(value)}")
        if kind is int and _is_number(value):
            raise ConfigError(f"{where}option {name} must be a whole number, got {_show(value)}")
        if kind in (int, float):
            raise ConfigError(f"{where}option {name} must be a number, got {_show(value)}")
        hint = " (YAML reads yes/no/on/off as true/false: quote the text)" if isinstance(value, bool) else ""
        raise ConfigError(f"{where}option {name} must be {_expected(kind, None)}, got {_show(value)}{hint}")

    @classmethod
    def build(cls: Type[C], config_file: Optional[str | os.PathLike] = None,
              overrides: Optional[Mapping[str, Any]] = None, base: Optional[Mapping[str, Any]] = None) -> C:
        """Defaults < ``base`` (e.g. a resumed run's config) < YAML ``config_file`` < ``overrides``."""
        values: Dict[str, Any] = {}
        for source, layer in (("resumed checkpoint", base),
                              (str(config_file), cls.load_yaml(config_file) if config_file else None),
                              ("overrides", overrides)):
            if layer:
                cls._check_keys(layer, source)
                values.update({k: cls._coerce(k, v, None if source == "overrides" else source)
                               for k, v in layer.items()})
        return cls(**values)

    def check(self) -> None:
        """Reject impossible settings before any work starts (ConfigError saying what to do)."""


@dataclass
class EngineConfig(Config):
    """What the training loop itself needs, whatever the task."""

    # schedule and optimiser
    epochs: int = option(15, "epochs in total, cooldown included")
    warmup_epochs: float = option(1, "linear warmup epochs, from WARMUP_LR")
    cooldown_epochs: int = option(1, "epochs at MIN_LR at the end")
    batch_size: int = option(64, "samples per process and step")
    val_batch_size: Optional[int] = option(None, "evaluation batch per process (default: 2 x BATCH_SIZE)")
    grad_accum: int = option(1, "micro-batches accumulated per optimiser step")
    lr: float = option(0.004, "peak learning rate (for the global batch; see LR_BASE_SIZE)")
    lr_base_size: Optional[int] = option(None, "scale LR linearly: lr x global_batch / LR_BASE_SIZE (null: use LR "
                                               "as given, as the official configs do)")
    min_lr: float = option(1e-5, "learning rate at the end of the schedule")
    warmup_lr: float = option(1e-6, "learning rate at the start of warmup")
    sched: str = option("cosine", f"learning-rate schedule ({', '.join(SCHEDULES)})")
    milestones: Tuple[float, float] = option((0.75, 0.9167), "multistep: decay the lr x 0.1 at these fractions of "
                                                              "the epochs (the 3x detection schedule: 27 and 33 of 36)")
    poly_power: float = option(1.0, "power of the poly schedule (1: linear decay to MIN_LR, as mmseg's PolyLR in "
                                    "the official dense configs)")
    opt: str = option("lamb", "optimiser, any timm name (lamb, adamw, sgd, ...)")
    opt_betas: Tuple[float, float] = option((0.9, 0.999), "optimiser betas")
    opt_eps: float = option(1e-8, "optimiser epsilon")
    momentum: float = option(0.9, "momentum (SGD-like optimisers)")
    weight_decay: float = option(0.05, "weight decay (not on biases, norms, A_log, D)")
    layer_decay: Optional[float] = option(None, "layer-wise LR decay factor (fine-tuning), e.g. 0.8")
    clip_grad: Optional[float] = option(5.0, "gradient clipping threshold (null: off)")
    clip_mode: str = option("norm", "gradient clipping mode (norm, value, agc)")
    model_ema: bool = option(True, "keep an exponential moving average of the weights (evaluated; used by MESA)")
    model_ema_decay: float = option(0.99, "EMA decay per optimiser step")
    model_ema_warmup: bool = option(True, "ramp the EMA decay up over the first steps (for short runs)")

    # system
    amp: bool = option(True, "mixed precision (bfloat16 on CPU; bfloat16 or float16 on CUDA)")
    amp_dtype: str = option("auto", f"mixed-precision dtype ({', '.join(AMP_DTYPES)})")
    channels_last: bool = option(False, "channels_last memory layout")
    device: str = option("auto", "auto, cpu or cuda")
    strategy: str = option("ddp", "how several processes share the model under torchrun: ddp (each holds all of it) "
                                  "or fsdp (parameters, gradients and optimiser state sharded per block)")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    seed: int = option(31, "random seed (each process adds its rank)")
    workers: Optional[int] = option(None, "data-loading processes per training process (default: 0 for "
                                          "built-in data, min(8, cores) for folders)")
    output: Optional[str] = option(None, "output folder (default: runs/<model>-<time>)")
    eval_first: bool = option(False, "evaluate once before training (the summary's initial_* metrics)")
    tensorboard: bool = option(False, "also write TensorBoard logs (needs the tensorboard package)")
    quiet: bool = option(False, "no progress bars and no per-epoch lines")

    def scaled_lr(self, global_batch: int) -> Tuple[float, str]:
        """(learning rate to use, one line that states the rule)."""
        if self.lr_base_size:
            lr = self.lr * global_batch / self.lr_base_size
            return lr, (f"lr {lr:.4g} = {self.lr:g} x global batch {global_batch} / lr_base_size "
                        f"{self.lr_base_size} (linear scaling)")
        return self.lr, (f"lr {self.lr:g} used as given for the global batch (no scaling, as in the official "
                         "configs; set --lr-base-size N to scale linearly with the global batch)")

    def check(self) -> None:
        need(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(self.val_batch_size is None or self.val_batch_size >= 1,
             f"val_batch_size must be at least 1, got {self.val_batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be at least 1, got {self.grad_accum}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.poly_power > 0, f"poly_power must be positive, got {self.poly_power}")
        need(0 < self.milestones[0] <= self.milestones[1] <= 1,
             f"milestones are fractions of the schedule, 0 < first <= second <= 1, got {self.milestones}")
        need(self.lr_base_size is None or self.lr_base_size >= 1,
             f"lr_base_size must be positive, got {self.lr_base_size}")
        need(self.min_lr >= 0 and self.warmup_lr >= 0, "min_lr and warmup_lr must be >= 0")
        need(self.warmup_epochs >= 0 and self.cooldown_epochs >= 0, "warmup_epochs and cooldown_epochs must be >= 0")
        need(self.cooldown_epochs < self.epochs,
             f"cooldown_epochs ({self.cooldown_epochs}) must be fewer than epochs ({self.epochs}): epochs include "
             "the cooldown")
        need(self.warmup_epochs <= self.epochs - self.cooldown_epochs,
             f"warmup_epochs ({self.warmup_epochs}) must fit in the schedule before the cooldown: at most epochs - "
             f"cooldown_epochs = {self.epochs - self.cooldown_epochs}; lower --warmup-epochs")
        need(self.sched in SCHEDULES, f"unknown schedule {self.sched!r}; expected one of {', '.join(SCHEDULES)}")
        from timm.optim import list_optimizers

        known = list_optimizers()
        if self.opt.lower() not in known:
            close = difflib.get_close_matches(self.opt.lower(), known, 3)
            raise ConfigError(f"unknown optimizer {self.opt!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                    else "") + " Common choices: lamb (official), "
                              "adamw, sgd")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"layer_decay must be in (0, 1], got {self.layer_decay}")
        need(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be positive or null, got {self.clip_grad}")
        need(self.clip_mode in ("norm", "value", "agc"),
             f"clip_mode must be norm, value or agc, got {self.clip_mode!r}")
        need(0 < self.model_ema_decay < 1, f"model_ema_decay must be in (0, 1), got {self.model_ema_decay}")
        need(self.amp_dtype in AMP_DTYPES,
             f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        need(self.device in DEVICES, f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        need(self.workers is None or self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        if self.tensorboard:
            import importlib.util

            need(importlib.util.find_spec("tensorboard") is not None,
                 "tensorboard was requested but the package is not installed: pip install tensorboard, "
                 "or drop --tensorboard")


def resume_config(cls: Type[C], state: Mapping[str, Any], config_file: Optional[str | os.PathLike] = None,
                  overrides: Optional[Mapping[str, Any]] = None) -> C:
    """A resumed run's config (stored in its checkpoint ``state``), a YAML file and overrides on top.

    The output folder defaults to the folder holding the checkpoint (wherever it was moved to).
    """
    base = dict(state["config"], output=str(Path(state["path"]).parent))
    return cls.build(config_file, overrides, base=base)
