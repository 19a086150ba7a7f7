"""The classification run's configuration: the engine's settings plus data, model and augmentation.

The defaults are the built-in laptop job (``mambavision_nano`` on the digits data set, the same
values as ``configs/digits_nano.yaml``); ``configs/mambavision_*_1k.yaml`` hold the official
ImageNet-1K recipes. Imports no torch: the command line builds its flags from these fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple


from hymamba.engine.config import EngineConfig, need, option, resume_config
from hymamba.errors import ConfigError

__all__ = ["ClassificationConfig", "build_config", "check_config", "config_fields", "config_for_resume"]


@dataclass
class ClassificationConfig(EngineConfig):
    """Everything a classification run needs. Field names are the YAML keys and the ``--flags``."""

    # data and model
    data: Optional[str] = option("digits", "ImageFolder root holding TRAIN_SPLIT/ and VAL_SPLIT/ (one subfolder "
                                           "per class), or a built-in set: 'digits' (scikit-learn's digits) or "
                                           "'cued-digits' (two digits and a cue: needs global context)")
    train_split: str = option("train", "training subfolder of DATA")
    val_split: str = option("val", "validation subfolder of DATA")
    model: str = option("mambavision_nano", "model name (see 'hymamba models')")
    pretrained: bool = option(False, "start from the official weights (a local file, see README)")
    checkpoint: Optional[str] = option(None, "start from these weights (fine-tuning); a new head is made when "
                                             "the class count differs")
    input_size: Optional[int] = option(None, "image side (default: the model's input size)")
    interpolation: Optional[str] = option(None, "evaluation resize interpolation (default: the model's)")
    train_interpolation: str = option("random", "training resize interpolation ('random' picks per image)")
    crop_pct: Optional[float] = option(None, "evaluation center-crop fraction (default: the model's)")
    drop_path: Optional[float] = option(0.1, "stochastic depth rate (null: the variant's default)")
    freeze_stages: int = option(0, "freeze the stem and levels < N (0: train everything)")
    mixer_variant: str = option("concat", "token mixer (paper ablation): concat (MambaVision), gated, "
                                          "regular_conv, causal_conv")
    attention_pattern: str = option("last_half", "where attention blocks go in levels 2-3 (paper ablation): "
                                                 "last_half (MambaVision), first_half, interleave, mamba_only, "
                                                 "attention_only")
    ssm_init: str = option("official", "initialisation from scratch: official (dt_proj like every Linear, as the "
                                        "official model) or mamba (Mamba's dt_proj init)")
    scan_impl: str = option("auto", "selective-scan implementation")
    max_train_samples: Optional[int] = option(None, "use only this many training images (spread over the set)")
    max_val_samples: Optional[int] = option(None, "use only this many validation images")

    # the digits job's schedule (the engine's default is 15 epochs): 20 epochs reach 99% from the official init
    epochs: int = option(20, "epochs in total, cooldown included")

    # augmentation and regularisation
    smoothing: float = option(0.1, "label smoothing")
    mixup: float = option(0.0, "mixup alpha (0: off)")
    cutmix: float = option(0.0, "cutmix alpha (0: off)")
    mixup_prob: float = option(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = option("batch", "mix per 'batch', 'pair' or 'elem'")
    aa: Optional[str] = option("rand-m5-mstd0.5-inc1", "RandAugment/AutoAugment policy in timm's syntax "
                                                       "(null: off)")
    reprob: float = option(0.1, "random-erasing probability")
    remode: str = option("pixel", "random-erasing mode")
    recount: int = option(1, "random-erasing count")
    color_jitter: float = option(0.0, "color jitter strength")
    hflip: float = option(0.0, "horizontal flip probability")
    vflip: float = option(0.0, "vertical flip probability")
    scale: Tuple[float, float] = option((0.6, 1.0), "random-resized-crop area range")
    ratio: Tuple[float, float] = option((0.75, 1.3333333333333333), "random-resized-crop aspect range")
    mesa: float = option(0.0, "MESA coefficient: KL(EMA || model) added to the loss (0: off)")
    mesa_start_ratio: float = option(0.25, "MESA starts once epoch / EPOCHS exceeds this")

    def check(self) -> None:
        """Reject impossible settings before any work starts (ConfigError saying what to do)."""
        from hymamba.factory import resolve_model_name
        from hymamba.models.options import check_option, options_from
        from hymamba.ops import check_scan_impl

        super().check()
        resolve_model_name(self.model)
        options_from(self.__dict__)
        check_option("ssm_init", self.ssm_init)
        check_scan_impl(self.scan_impl)
        need(0 <= self.smoothing < 1, f"smoothing must be in [0, 1), got {self.smoothing}")
        need(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip", "vflip", "mesa_start_ratio"):
            value = getattr(self, name)
            need(0 <= value <= 1, f"{name} is a probability/ratio in [0, 1], got {value}")
        need(self.mixup_mode in ("batch", "pair", "elem"),
             f"mixup_mode must be batch, pair or elem, got {self.mixup_mode!r}")
        need(0 < self.scale[0] <= self.scale[1] <= 1, f"scale must be 0 < min <= max <= 1, got {self.scale}")
        need(0 < self.ratio[0] <= self.ratio[1], f"ratio must be 0 < min <= max, got {self.ratio}")
        need(self.color_jitter >= 0, f"color_jitter must be >= 0, got {self.color_jitter}")
        need(self.mesa >= 0, f"mesa must be >= 0, got {self.mesa}")
        need(self.mesa == 0 or self.model_ema, "MESA distils from the EMA model: set model_ema true or mesa 0")
        need(self.drop_path is None or 0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}")
        need(0 <= self.freeze_stages <= 4, f"freeze_stages must be 0-4 (levels), got {self.freeze_stages}")
        need(self.input_size is None or self.input_size >= 32,
             f"input_size must be at least 32, got {self.input_size}")
        need(self.crop_pct is None or 0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}")
        for name in ("max_train_samples", "max_val_samples"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be at least 1, got {value}")
        need(self.data is not None, "no data set: this recipe needs DATA, an ImageFolder root with train/ and val/ "
                                    "subfolders (or 'digits' for the built-in set)")
        need(not (self.pretrained and self.checkpoint), "give either pretrained or checkpoint, not both")
        if self.checkpoint is not None:
            try:
                found = Path(self.checkpoint).expanduser().exists()
            except (RuntimeError, OSError) as e:  # e.g. ~nosuchuser/...
                raise ConfigError(f"checkpoint path {self.checkpoint!r} cannot be resolved: {e}") from None
            need(found, f"checkpoint not found: {self.checkpoint}")


#: shorthands (the classification config is what ``hymamba train`` reads)
build_config = ClassificationConfig.build
check_config = ClassificationConfig.check
config_fields = ClassificationConfig.fields


def config_for_resume(state: Mapping[str, Any], config_file: Optional[str] = None,
                      overrides: Optional[Mapping[str, Any]] = None) -> ClassificationConfig:
    """The config of a resumed classification run, with a YAML file and overrides on top."""
    return resume_config(ClassificationConfig, state, config_file, overrides)
