"""What travels with weights: class names, preprocessing and architecture options.

Sources, for a checkpoint path:

- a ``<name>.json`` beside ``<name>.safetensors`` (``model.json``, written by training runs);
- a Hugging Face folder's ``config.json`` (also for its ``model.safetensors``/``pytorch_model.bin``
  passed directly);
- the entries a training checkpoint (``last.pth``/``best.pth``) stores next to its weights;
- an mmengine checkpoint's ``meta.dataset_meta`` (the official dense weights): ``classes`` and
  ``palette``.

:func:`read_checkpoint` reads a file once and returns its tensors and its metadata together.
"""
from __future__ import annotations

import json
import numbers
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
    """The JSON metadata beside a checkpoint (see the module docstring), or None.

    Raises:
        CheckpointError: the file is not JSON, not a JSON object, or holds preprocessing entries of
            the wrong type.
    """
    p = Path(path).expanduser()
    if p.is_dir():  # a Hugging Face folder, or a run folder (model.safetensors + model.json)
        candidates = [p / "config.json", p / "model.json"]
    else:
        candidates = [p.with_suffix(".json")]
        if p.name in _HF_WEIGHT_FILES:
            candidates.append(p.parent / "config.json")
    for c in candidates:
        if c.is_file():
            try:
                with open(c, encoding="utf-8") as f:
                    value = json.load(f)
            except OSError as e:
                raise CheckpointError(f"could not read the metadata {c} beside the weights: {e.strerror or e}") from None
            except (UnicodeDecodeError, ValueError, RecursionError) as e:  # not JSON; too deep; a 5000-digit int
                detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                raise CheckpointError(f"{c} beside the weights is not valid JSON ({type(e).__name__}: {detail}); "
                                      "fix or delete it") from None
            if not isinstance(value, dict):
                raise CheckpointError(f"{c} should hold a JSON object of metadata, found a {type(value).__name__}; "
                                      "fix or delete it")
            _check_meta(value, str(c))
            return value
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: the metadata entries read downstream (preprocessing, class names) and what each must be
_META_TYPES = {
    "mean": ("a list of 3 numbers", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v))),
    "std": ("a list of 3 numbers", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v))),
    "input_size": ("a list of 3 positive whole numbers [channels, height, width]",
                   lambda v: isinstance(v, list) and len(v) == 3
                   and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)),
    "crop_pct": ("a positive number", lambda v: _is_number(v) and v > 0),
    "crop_mode": ("text", lambda v: isinstance(v, str)),
    "interpolation": ("text", lambda v: isinstance(v, str)),
    "class_names": ("a list of class names", lambda v: isinstance(v, list)),
    "id2label": ("an object mapping class indices to names", lambda v: isinstance(v, dict)),
}


def _check_meta(meta: Mapping[str, Any], source: str) -> None:
    """A CheckpointError when an entry that preprocessing or class names rely on has the wrong type."""
    for key, (expected, ok) in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and not ok(value):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise CheckpointError(f"{source}: metadata entry {key!r} should be {expected}, found {shown}; "
                                  "fix or delete the entry")


def _training_state_meta(obj: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(obj, Mapping) or obj.get("format") != TRAIN_STATE_FORMAT:
        return {}
    meta: Dict[str, Any] = {}
    # what the task stored to rebuild it (export_metadata: model.json's content, in checkpoints since FSDP)
    for key in ("export_metadata", "data_config", "architecture", "segmentation", "detection"):
        part = obj.get(key)
        if part is None:
            continue
        if not isinstance(part, Mapping) or not all(isinstance(k, str) for k in part):
            raise CheckpointError(f"{path} is a damaged training checkpoint: its {key!r} entry should map names to "
                                  f"values, found a {type(part).__name__}")
        meta.update(part)
    meta.setdefault("class_names", obj.get("class_names"))
    meta = {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}  # input_size may be a tuple
    _check_meta(meta, str(path))
    return meta


def _dataset_meta(obj: Any, path: Path) -> Dict[str, Any]:
    """``classes`` (list of names) and ``palette`` (list of [r, g, b]) from an mmengine checkpoint's
    ``meta.dataset_meta``, when it has them."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    dataset = meta.get("dataset_meta") if isinstance(meta, Mapping) else None
    if not isinstance(dataset, Mapping):
        return {}
    out: Dict[str, Any] = {}
    classes, palette = dataset.get("classes"), dataset.get("palette")
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise CheckpointError(f"{path}: meta.dataset_meta.classes should be a list of class names, found "
                                  f"{_shown(classes)}")
        out["classes"] = [str(c) for c in classes]
    if palette is not None:
        if not isinstance(palette, (list, tuple)) or not all(
                isinstance(c, (list, tuple)) and len(c) == 3
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
                for c in palette):
            raise CheckpointError(f"{path}: meta.dataset_meta.palette should be a list of [r, g, b] colours (0-255), "
                                  f"found {_shown(palette)}")
        out["palette"] = [[int(v) for v in c] for c in palette]
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_checkpoint(path: PathLike, use_ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint once: its model state dict and its metadata.

    Args:
        path: an official ``.pth.tar``, a Hugging Face folder, a ``.safetensors`` file, a training
            checkpoint (``last.pth``) or an output folder's ``model.safetensors``.
        use_ema: take the EMA weights.
    Raises:
        CheckpointError: the weights or the metadata beside them cannot be read or used (the message
            names the file and says why).
    """
    p = weights_file(path)
    obj = read_file(p)
    meta = read_config(path) or _training_state_meta(obj, p)
    for key, value in _dataset_meta(obj, p).items():  # metadata beside the file wins
        meta.setdefault(key, value)
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
