"""Creating models by name: hymamba's variants and the official names as aliases."""
from __future__ import annotations

import fnmatch
import os
from typing import Any, List, Optional

from timm.models import model_entrypoint

from hymamba.models.mambavision import ABLATION_OPTIONS, VARIANTS, MambaVision

__all__ = ["create_model", "list_models", "resolve_model_name"]

#: official model names (as in NVlabs/MambaVision) -> hymamba names
ALIASES = {official: name for name, (_, _, official, _) in VARIANTS.items() if official}


def list_models(pattern: str = "*") -> List[str]:
    """hymamba model names matching a shell-style ``pattern``."""
    return [n for n in VARIANTS if fnmatch.fnmatch(n, pattern)]


def resolve_model_name(name: str) -> str:
    """Map an official or differently-cased name to a hymamba name; raise with suggestions."""
    if name in VARIANTS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    lowered = {k.lower(): v for k, v in ALIASES.items()}
    key = name.lower().replace("-", "_")
    if key in VARIANTS:
        return key
    if key in lowered:
        return lowered[key]
    raise ValueError(
        f"unknown model {name!r}. Known models: {', '.join(VARIANTS)} "
        f"(official names such as {', '.join(list(ALIASES)[:2])} also work)"
    )


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: Optional[str | os.PathLike] = None,
    **kwargs: Any,
) -> MambaVision:
    """Create a model by name.

    Args:
        name: a name from :func:`list_models` or an official name (``mamba_vision_T``, ...).
        pretrained: load the official weights from a local file (see
            :func:`hymamba.checkpoint.checkpoint_dir`); nothing is downloaded.
        checkpoint_path: a checkpoint to load (official ``.pth.tar``, Hugging Face folder or
            safetensors). Unless ``num_classes`` is given, the classifier takes the checkpoint's size;
            ``mixer_variant``/``attention_pattern`` recorded in a ``model.json`` beside it apply too.
        **kwargs: constructor overrides (``num_classes``, ``drop_path_rate``, ``scan_impl``,
            ``features_only``, ``out_indices``, ...).
    Returns:
        The model (in train mode, as timm returns it).
    """
    name = resolve_model_name(name)
    if checkpoint_path is not None:
        from hymamba.checkpoint import checkpoint_num_classes, read_config

        if "num_classes" not in kwargs:
            n = checkpoint_num_classes(checkpoint_path)
            if n is not None:
                kwargs["num_classes"] = n
        # ablation options recorded beside trained weights (hymamba train's model.json)
        meta = read_config(checkpoint_path) or {}
        for key in ABLATION_OPTIONS:
            if key not in kwargs and isinstance(meta.get(key), str):
                kwargs[key] = meta[key]
    return model_entrypoint(name)(pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
