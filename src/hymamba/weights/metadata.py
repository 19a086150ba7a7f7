"""What travels with weights: class names, preprocessing and architecture options.

Sources, for a checkpoint path:

- a ``<name>.json`` beside ``<name>.safetensors`` (``model.json``, written by training runs);
- a Hugging Face folder's ``config.json`` (also for its ``model.safetensors``/``pytorch_model.bin``
  passed directly);
- the entries a training checkpoint (``last.pth``/``best.pth``) stores next to its weights.

:func:`read_checkpoint` reads a file once and returns its tensors and its metadata together.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from hymamba.errors import CheckpointError
from hymamba.utils.io import write_json_atomic
from hymamba.weights.io import read_file, state_dict_from, weights_file

__all__ = ["TRAIN_STATE_FORMAT", "Checkpoint", "class_names_from", "read_checkpoint", "read_config",
           "write_model_json"]

PathLike = Union[str, os.PathLike]

#: the ``format`` entry of training checkpoints written by the engine
TRAIN_STATE_FORMAT = "hymamba-train-state-v1"
#: the weights files of a Hugging Face folder: their folder's config.json describes them
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """A checkpoint read once: its model tensors and the metadata that came with them."""

    path: Path
    state_dict: Dict[str, torch.Tensor]
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> Optional[int]:
        """Classifier size (``head.weight`` rows), or None without a classifier."""
        head = self.state_dict.get("head.weight")
        return int(head.shape[0]) if head is not None else None


def read_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The JSON metadata beside a checkpoint (see the module docstring), or None."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = [p / "config.json"]
    else:
        candidates = [p.with_suffix(".json")]
        if p.name in _HF_WEIGHT_FILES:
            candidates.append(p.parent / "config.json")
    for c in candidates:
        if c.is_file():
            try:
                with open(c, encoding="utf-8") as f:
                    value = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"could not read the metadata {c} beside the weights: {e}") from None
            if not isinstance(value, dict):
                raise CheckpointError(f"{c} should hold a JSON object of metadata, found a {type(value).__name__}")
            return value
    return None


def _training_state_meta(obj: Any) -> Dict[str, Any]:
    if not isinstance(obj, Mapping) or obj.get("format") != TRAIN_STATE_FORMAT:
        return {}
    return dict(obj.get("data_config") or {}, **(obj.get("architecture") or {}), class_names=obj.get("class_names"))


def read_checkpoint(path: PathLike, use_ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint once: its model state dict and its metadata.

    Args:
        path: an official ``.pth.tar``, a Hugging Face folder, a ``.safetensors`` file, a training
            checkpoint (``last.pth``) or an output folder's ``model.safetensors``.
        use_ema: take the EMA weights.
    """
    p = weights_file(path)
    obj = read_file(p)
    meta = read_config(path) or _training_state_meta(obj)
    return Checkpoint(path=p, state_dict=state_dict_from(obj, use_ema, p), meta=meta)


def class_names_from(meta: Mapping[str, Any], num_outputs: int) -> Optional[List[str]]:
    """Class names from ``model.json`` (``class_names``) or a Hugging Face config (``id2label``), when
    they number ``num_outputs``."""
    names = meta.get("class_names")
    if names is None and isinstance(meta.get("id2label"), dict):
        id2label = meta["id2label"]
        names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if not isinstance(names, (list, tuple)) or len(names) != num_outputs or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def write_model_json(weights_path: PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``meta`` as the ``.json`` beside ``weights_path`` (atomically)."""
    return write_json_atomic(Path(weights_path).with_suffix(".json"), dict(meta))
