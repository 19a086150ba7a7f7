"""Reading checkpoints safely: official ``.pth.tar``, official Hugging Face folders, our safetensors.

Nothing here touches the network. Pickled files are read with ``torch.load(weights_only=True)``
and an explicit allow-list (only ``argparse.Namespace``, which the official training script stores
as ``args``); anything else in a pickle is refused, never executed.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from hymamba.atomic import atomic_write

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_pretrained",
    "read_state_dict",
    "detect_variant",
    "checkpoint_dir",
    "save_safetensors",
]

PathLike = Union[str, os.PathLike]

#: classes a pickled checkpoint may contain besides tensors and plain containers
SAFE_GLOBALS: List[Any] = [argparse.Namespace]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


@dataclass
class LoadReport:
    """What happened when a state dict was loaded into a model."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    source: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def checkpoint_dir() -> Path:
    """Folder where ``pretrained=True`` looks for official weights (``$HYMAMBA_CHECKPOINT_DIR``,
    default ``~/.cache/hymamba/checkpoints``)."""
    env = os.environ.get("HYMAMBA_CHECKPOINT_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hymamba" / "checkpoints"


# ----------------------------------------------------------------------------------------------
# reading files


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects outside the allow-list "
            f"({', '.join(c.__module__ + '.' + c.__qualname__ for c in SAFE_GLOBALS)}). "
            f"hymamba never unpickles arbitrary objects. Details: {str(e).splitlines()[0]}. "
            "Convert the file with a trusted tool or save only its state dict."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"could not read {path} as a PyTorch checkpoint: {e}") from None


def _read_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"could not read {path} as safetensors: {e}") from None
    return _torch_load(path)


def _hf_weights(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder} is a folder but holds none of {', '.join(_WEIGHT_FILES)}; expected a Hugging Face "
        "snapshot (config.json + weights) or pass the weights file itself"
    )


def _pick_state_dict(obj: Any, use_ema: bool, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors or a checkpoint dict")
    if use_ema:
        for key in ("state_dict_ema", "model_ema", "ema"):
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key])
        raise CheckpointError(
            f"use_ema=True but {path} has no EMA weights (looked for 'state_dict_ema', 'model_ema', 'ema'; "
            f"found keys {sorted(k for k in obj if not isinstance(obj[k], torch.Tensor))[:10]})"
        )
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} has no tensors: top-level keys are {sorted(obj)[:10]}")
    return tensors


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def read_state_dict(path: PathLike, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a model state dict from any supported checkpoint.

    Args:
        path: an official ``.pth.tar`` (``state_dict``/``model``/bare; ``module.`` prefixes), a
            Hugging Face folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``,
            keys prefixed ``model.``), or a ``.safetensors`` file.
        use_ema: take the EMA weights (``state_dict_ema``) instead of the model weights.
    Returns:
        Plain parameter-name -> tensor dict with wrapper prefixes removed.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        p = _hf_weights(p)
    return _strip_prefixes(_pick_state_dict(_read_file(p), use_ema, p))


def read_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The model config stored beside a checkpoint (HF ``config.json`` or ``<file>.json``), if any."""
    p = Path(path).expanduser()
    candidates = [p / "config.json"] if p.is_dir() else [p.with_suffix(".json"), p.parent / "config.json"]
    for c in candidates:
        if c.is_file():
            with open(c, encoding="utf-8") as f:
                return json.load(f)
    return None


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write tensors to ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ----------------------------------------------------------------------------------------------
# variants


@lru_cache(maxsize=None)
def _variant_shapes(name: str) -> Dict[str, Tuple[int, ...]]:
    from hymamba.models.mambavision import MambaVision, VARIANTS

    with torch.device("meta"):
        model = MambaVision(**VARIANTS[name][0])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the variant whose keys and shapes match ``state_dict`` (the head may differ)."""
    from hymamba.models.mambavision import VARIANTS

    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith("head.")}
    for name in VARIANTS:
        ref = {k: s for k, s in _variant_shapes(name).items() if not k.startswith("head.")}
        if ref == shapes:
            return name
    return None


# ----------------------------------------------------------------------------------------------
# loading into a model


def _compare(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> LoadReport:
    own = model.state_dict()
    report = LoadReport()
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                         if k in sd and sd[k].shape != own[k].shape]
    return report


def _describe(report: LoadReport, sd: Mapping[str, torch.Tensor], limit: int = 12) -> str:
    lines = []
    for title, items in (("missing", report.missing), ("unexpected", report.unexpected)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title} keys: {', '.join(items[:limit])}{more}")
    if report.mismatched:
        shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in report.mismatched[:limit])
        lines.append(f"  {len(report.mismatched)} mis-shaped keys: {shown}")
    variant = detect_variant(sd)
    if variant:
        lines.append(f"  the checkpoint's shapes match the variant '{variant}': "
                     f"use hymamba.create_model('{variant}', checkpoint_path=...)")
    else:
        lines.append("  the checkpoint matches no known MambaVision variant")
    return "\n".join(lines)


def load_checkpoint(
    model: nn.Module,
    path: PathLike,
    strict: bool = True,
    use_ema: bool = False,
) -> LoadReport:
    """Load a checkpoint file or folder into ``model``.

    Args:
        model: the model to fill.
        path: any format :func:`read_state_dict` reads.
        strict: raise :class:`CheckpointError` unless every key matches in name and shape. With
            ``strict=False``, mis-shaped tensors (e.g. a classifier for another class count) are
            skipped and reported.
        use_ema: load the EMA weights.
    Returns:
        A :class:`LoadReport` of missing, unexpected and mis-shaped keys.
    """
    sd = read_state_dict(path, use_ema=use_ema)
    report = _compare(model, sd)
    report.source = str(path)
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}:\n{_describe(report, sd)}")
    skip = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k not in skip}, strict=False)
    return report


def checkpoint_num_classes(path: PathLike) -> Optional[int]:
    """Classifier size stored in a checkpoint (``head.weight`` rows), or None without a head."""
    sd = read_state_dict(path)
    head = sd.get("head.weight")
    return int(head.shape[0]) if head is not None else None


def load_pretrained(model: nn.Module, variant: str, checkpoint_path: Optional[PathLike] = None) -> LoadReport:
    """Load official weights for ``variant`` from a local file; never downloads.

    Looks at ``checkpoint_path`` or, if None, in :func:`checkpoint_dir` for the official file name
    or the Hugging Face snapshot folder.
    """
    from hymamba.models.mambavision import VARIANTS

    cfg = VARIANTS[variant][1]
    if checkpoint_path is None:
        if "url" not in cfg:
            raise FileNotFoundError(f"'{variant}' has no official weights; pass checkpoint_path=... to load your own")
        folder = checkpoint_dir()
        candidates = [folder / cfg["hf_hub_filename"], folder / cfg["hf_hub_id"].split("/")[-1]]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"no local weights for '{variant}'. hymamba never downloads: fetch {cfg['url']} by hand "
                f"and put it in {folder} (or set HYMAMBA_CHECKPOINT_DIR), or pass checkpoint_path=..."
            )
        checkpoint_path = found
    report = load_checkpoint(model, checkpoint_path, strict=False)
    # A new classifier size (fine-tuning) keeps the fresh head; anything else must match exactly.
    if report.missing or report.unexpected or any(not k.startswith("head.") for k, _, _ in report.mismatched):
        sd = read_state_dict(checkpoint_path)
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit '{variant}':\n{_describe(report, sd)}")
    return report
