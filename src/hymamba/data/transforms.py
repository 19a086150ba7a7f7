"""Preprocessing, resolved in one place for training, validation, prediction and Hugging Face.

:func:`resolve_data_config` merges, in this order: the model's pretrained config < the metadata
stored beside the weights (``model.json`` / Hugging Face ``config.json``) < explicit overrides.
Transforms come from timm (:func:`timm.data.create_transform`), so evaluation preprocessing is
exactly what timm's and the official validation scripts do for the same data config.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from hymamba.errors import ConfigError

__all__ = ["CROP_MODES", "eval_transform", "resolve_data_config", "train_transform"]

CROP_MODES = ("center", "squash", "border")
_KEYS = ("mean", "std", "crop_pct", "crop_mode", "interpolation")


def resolve_data_config(pretrained_cfg: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None, *,
                        input_size: Optional[int] = None, crop_pct: Optional[float] = None,
                        crop_mode: Optional[str] = None, interpolation: Optional[str] = None) -> Dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode).

    Args:
        pretrained_cfg: the model's pretrained config (``model.pretrained_cfg`` or a variant's).
        meta: metadata stored beside the weights (``model.json``, Hugging Face ``config.json``).
        input_size, crop_pct, crop_mode, interpolation: explicit overrides (None: keep).
    """
    from timm.data import resolve_data_config as timm_resolve

    if input_size is not None and input_size < 32:
        raise ConfigError(f"input_size must be at least 32 (the model downsamples 32x), got {input_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct is the fraction of the resized image kept by the center crop, in (0, 1]; "
                          f"got {crop_pct}")
    meta = meta or {}
    args: Dict[str, Any] = {}
    for key in _KEYS:
        if meta.get(key) is not None:
            args[key] = tuple(meta[key]) if isinstance(meta[key], list) else meta[key]
    if meta.get("input_size") is not None:
        args["input_size"] = tuple(meta["input_size"])
    if input_size is not None:
        args["input_size"] = (3, input_size, input_size)
    for key, value in (("crop_pct", crop_pct), ("crop_mode", crop_mode), ("interpolation", interpolation)):
        if value is not None:
            args[key] = value
    if args.get("crop_mode", pretrained_cfg.get("crop_mode", "center")) not in CROP_MODES:
        raise ConfigError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {args['crop_mode']!r}")
    return timm_resolve(args, pretrained_cfg=dict(pretrained_cfg))


def train_transform(data_config: Dict[str, Any], *, scale: Sequence[float], ratio: Sequence[float],
                    hflip: float, vflip: float, color_jitter: float, auto_augment: Optional[str],
                    interpolation: str, reprob: float, remode: str, recount: int) -> Callable:
    """timm's training pipeline: random-resized crop, flips, color jitter, RandAugment, random erasing."""
    from timm.data import create_transform

    try:
        _check_rand_augment(auto_augment)
        return create_transform(
            data_config["input_size"], is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
            vflip=vflip, color_jitter=color_jitter, auto_augment=auto_augment or None,
            interpolation=interpolation, mean=data_config["mean"], std=data_config["std"],
            re_prob=reprob, re_mode=remode, re_count=recount,
        )
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ConfigError(f"invalid augmentation settings (aa={auto_augment!r}, remode={remode!r}, "
                         f"interpolation={interpolation!r}): {e or type(e).__name__}. Use timm's syntax, "
                         "e.g. aa 'rand-m9-mstd0.5-inc1', remode 'pixel', interpolation 'random'") from None


def _check_rand_augment(policy: Optional[str]) -> None:
    """timm silently ignores RandAugment sections it cannot parse; reject them instead."""
    if not policy or not policy.startswith("rand"):
        return
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"a RandAugment policy starts with 'rand-', got {policy!r}")
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d.*)", part)
        if not part.startswith("t") and m is None:
            raise ConfigError(f"unknown RandAugment section {part!r} (known: m<magnitude>, n<ops>, mstd<std>, "
                             "mmax<max>, inc<0|1>, p<prob>, t<ops>)")


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """timm's evaluation pipeline: resize by crop_pct, center crop or squash, normalise."""
    from timm.data import create_transform

    return create_transform(
        data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
    )
