"""Reading weight files safely: official ``.pth.tar``, official Hugging Face folders, safetensors.

Model-agnostic: nothing here imports a model (loading into a model is :mod:`hymamba.weights.load`,
the metadata beside weights :mod:`hymamba.weights.metadata`). Nothing here touches the network.
Pickled files are read with ``torch.load(weights_only=True)`` and an explicit allow-list (only ``argparse.Namespace``, which the official training script stores
as ``args``); anything else in a pickle is refused, never executed.
"""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from hymamba.errors import CheckpointError
from hymamba.utils.io import atomic_write

__all__ = ["SAFE_GLOBALS", "checkpoint_dir", "read_file", "read_state_dict", "save_safetensors", "state_dict_from",
           "strip_prefixes", "weights_file"]

PathLike = Union[str, os.PathLike]

#: classes a pickled checkpoint may contain besides tensors and plain containers
SAFE_GLOBALS: List[Any] = [argparse.Namespace]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


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


def read_file(path: Path) -> Any:
    """The object stored in one weights file (safetensors: a dict of tensors; else a safe unpickle)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"could not read {path} as safetensors: {e}") from None
    return _torch_load(path)


def weights_file(path: PathLike) -> Path:
    """The file to read for ``path``: itself, or the weights file of a Hugging Face folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"checkpoint not found: {folder}")
    if not folder.is_dir():
        return folder
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder} is a folder but holds none of {', '.join(_WEIGHT_FILES)}; expected a Hugging Face "
        "snapshot (config.json + weights) or pass the weights file itself"
    )


def state_dict_from(obj: Any, use_ema: bool, path: Path) -> Dict[str, torch.Tensor]:
    """The model's tensors inside a file's object (checkpoint dicts, EMA, bare state dicts), prefixes removed."""
    return strip_prefixes(_pick_state_dict(obj, use_ema, path))


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


def strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) shared by every key."""
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
    p = weights_file(path)
    return state_dict_from(read_file(p), use_ema, p)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write tensors to ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
