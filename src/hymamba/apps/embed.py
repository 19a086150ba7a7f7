"""``hymamba embed``: image embeddings (and optionally the four stage maps) written to one file.

The embedding is what the classifier's head sees: the final features after the last norm, averaged
over space (``num_features`` values; timm's ``forward_head(..., pre_logits=True)``). The stage maps
are the four level outputs before each downsample (``forward_intermediates``: what the dense heads
take), either averaged over space (``stages="pooled"``: (N, C_i)) or whole (``stages="maps"``:
(N, C_i, H_i, W_i)). Images get the model's own evaluation preprocessing, so every map has one shape.

Files: ``OUT.safetensors`` (tensors ``embeddings`` and ``stage1``..``stage4``; its metadata holds the
file list) or ``OUT.npy`` (the embeddings only), and always ``OUT.json`` beside it: the model, the
weights, the preprocessing, each array's shape and the files in row order, with the skipped ones and why.
Both are written atomically; an unreadable image is skipped and counted, never a stop.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hymamba.data.images import image_files, read_images
from hymamba.data.transforms import eval_transform, resolve_data_config
from hymamba.errors import ConfigError, DataError
from hymamba.factory import load_trained_model
from hymamba.utils.amp import amp_dtype as resolve_amp_dtype
from hymamba.utils.amp import autocast, resolve_device
from hymamba.utils.io import atomic_write, write_json_atomic

__all__ = ["STAGE_MODES", "embed", "sidecar_path"]

#: what to write besides the embeddings
STAGE_MODES = ("none", "pooled", "maps")
_SUFFIXES = (".safetensors", ".npy")


def sidecar_path(out: str | os.PathLike) -> Path:
    """``OUT.json`` beside ``OUT.safetensors`` / ``OUT.npy``: the file list and how the arrays were made."""
    return Path(out).with_suffix(".json")


@torch.no_grad()
def embed(model_name: str, checkpoint: Optional[str | os.PathLike], inputs: Sequence[str | os.PathLike],
          out: str | os.PathLike, *, stages: str = "none", pretrained: bool = False, use_ema: bool = False,
          batch_size: int = 32, amp: bool = False, device: str = "auto", scan_impl: str = "auto",
          progress: Optional[Callable[[Iterator], Iterator]] = None) -> Dict[str, Any]:
    """Embed images (files, or folders searched recursively) into ``out``.

    Args:
        model_name: the architecture (``hymamba models``).
        checkpoint: the weights (a run's ``model.safetensors``, a training ``.pth``, official files,
            a Hugging Face folder); ``pretrained`` takes the official file instead.
        inputs: image files and folders.
        out: ``*.safetensors`` (embeddings and stage arrays) or ``*.npy`` (embeddings only).
        stages: ``"none"``, ``"pooled"`` (each stage map averaged over space) or ``"maps"`` (whole).
        batch_size: images per forward pass.
        amp: run under autocast (bfloat16 on CPU); arrays are written as float32 either way.
        progress: wraps the iterator over the files (a progress bar).
    Returns:
        What ``OUT.json`` holds: ``out``, ``model``, ``checkpoint``, ``arrays`` (name -> shape),
        ``files`` (the embedded images, in row order), ``skipped`` (``{"image", "error"}``),
        ``preprocessing``.
    """
    out = Path(out)
    if out.suffix not in _SUFFIXES:
        raise ConfigError(f"--out must end in .safetensors or .npy, got {out.name!r}")
    if stages not in STAGE_MODES:
        raise ConfigError(f"stages must be one of {', '.join(STAGE_MODES)}, got {stages!r}")
    if stages != "none" and out.suffix == ".npy":
        raise ConfigError(f"a .npy file holds one array, but stages={stages!r} adds four more; write a .safetensors "
                          f"file instead (--out {out.with_suffix('.safetensors')})")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    files = image_files(inputs)
    if not files:
        raise DataError("no images to embed: give image files or folders holding images")
    dev = resolve_device(device)
    model, meta = load_trained_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema,
                                     scan_impl=scan_impl)
    model.to(dev).eval()
    data_config = resolve_data_config(model.pretrained_cfg, meta)
    transform = eval_transform(data_config)
    dtype = resolve_amp_dtype(dev, amp)
    from PIL import Image

    parts: Dict[str, List[torch.Tensor]] = {"embeddings": []}
    if stages != "none":
        parts.update({f"stage{i + 1}": [] for i in range(len(model.levels))})
    results: List[Dict[str, Any]] = []
    pending: List[torch.Tensor] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.stack(pending).to(dev)
        with autocast(dev, dtype):
            final, maps = model.forward_intermediates(x)
        parts["embeddings"].append(model.forward_head(final, pre_logits=True).float().cpu())
        for i, m in enumerate(maps if stages != "none" else []):
            m = F.adaptive_avg_pool2d(m, 1).flatten(1) if stages == "pooled" else m
            parts[f"stage{i + 1}"].append(m.float().cpu())
        pending.clear()

    for _path, _name, image in read_images(files, results, progress):
        pending.append(transform(Image.fromarray(image)))
        if len(pending) == batch_size:
            flush()
    flush()
    skipped = [r for r in results if "error" in r]
    if len(skipped) == len(results):
        raise DataError(f"none of the {len(results)} image(s) could be read (first: {skipped[0]['image']}: "
                        f"{skipped[0]['error']}); nothing was written")
    arrays = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    info = {
        "out": str(out), "model": model_name,
        "checkpoint": "official" if checkpoint is None else str(checkpoint), "use_ema": use_ema,
        "embedding": "final features after the last norm, averaged over space (the head's input)",
        "stages": stages, "arrays": {k: list(v.shape) for k, v in arrays.items()},
        "files": [r["image"] for r in results if "error" not in r], "skipped": skipped,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }
    if out.suffix == ".npy":
        atomic_write(out, lambda tmp: tmp.write_bytes(_npy_bytes(arrays["embeddings"].numpy())))
    else:
        from safetensors.torch import save_file

        metadata = {"format": "pt", "hymamba": json.dumps({k: v for k, v in info.items() if k != "out"})}
        atomic_write(out, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))
    write_json_atomic(sidecar_path(out), info)
    return info


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
