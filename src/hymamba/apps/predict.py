"""``hymamba predict``: the top-k classes of image files, with the model's own preprocessing and the
class names stored beside the weights."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from hymamba.data.images import UNREADABLE, load_image
from hymamba.data.transforms import eval_transform, resolve_data_config
from hymamba.errors import ConfigError
from hymamba.factory import load_trained_model
from hymamba.utils.amp import resolve_device
from hymamba.weights.metadata import class_names_from

__all__ = ["predict"]


@torch.no_grad()
def predict(model_name: str, checkpoint: Optional[str | os.PathLike], images: Sequence[str | os.PathLike], *,
            topk: int = 5, pretrained: bool = False, use_ema: bool = False, batch_size: int = 16,
            device: str = "auto", scan_impl: str = "auto") -> List[Dict[str, Any]]:
    """Top-k classes of each image.

    Returns:
        One dict per image, in order: ``{"image", "top": [{"index", "class", "prob"}, ...]}``, or
        ``{"image", "error"}`` for an image that could not be read.
    """
    if topk < 1:
        raise ConfigError(f"topk must be at least 1, got {topk}")
    if not images:
        raise ConfigError("no images given: pass one or more image files")
    dev = resolve_device(device)
    model, meta = load_trained_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema,
                                     scan_impl=scan_impl)
    model.to(dev).eval()
    names = class_names_from(meta, model.num_classes)
    transform = eval_transform(resolve_data_config(model.pretrained_cfg, meta))
    results: List[Dict[str, Any]] = []
    pending: List[tuple] = []

    def flush() -> None:
        if not pending:
            return
        probs = model(torch.stack([x for _, x in pending]).to(dev)).float().softmax(dim=1)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        for (slot, _), vals, idxs in zip(pending, values.tolist(), indices.tolist()):
            results[slot]["top"] = [{"index": i, "class": names[i] if names else str(i), "prob": v}
                                    for v, i in zip(vals, idxs)]
        pending.clear()

    for path in images:
        results.append({"image": str(path)})
        try:
            x = transform(load_image(path))
        except UNREADABLE as e:
            results[-1]["error"] = f"{type(e).__name__}: {e}"
            continue
        pending.append((len(results) - 1, x))
        if len(pending) == batch_size:
            flush()
    flush()
    return results
