"""Classification metrics over a data set: top-1, top-5, mean cross-entropy and per-class accuracy,
summed over processes (used by training, ``hymamba validate`` and the studies)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hymamba.errors import DataError
from hymamba.utils.amp import autocast
from hymamba.utils.distributed import Dist

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Metrics of one pass over a data set (accuracies in percent)."""

    top1: float
    top5: float
    loss: float
    count: int
    per_class: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, dist: Optional[Dist] = None, class_names: Optional[Sequence[str]] = None,
             target_map: Optional[torch.Tensor] = None) -> EvalResult:
    """Top-1/top-5 accuracy and mean cross-entropy of ``model`` over ``loader``, summed over ranks.

    Args:
        model: the classifier (put in eval mode here).
        loader: yields (images, targets, unreadable paths) as
            :func:`hymamba.data.datasets.collate_batch` makes them.
        device: where to run.
        amp_dtype: autocast dtype, or None for full precision.
        channels_last: feed channels_last tensors.
        dist: the process group; each rank sees its shard and the sums are reduced.
        class_names: the data set's classes; when given, per-class accuracy is computed.
        target_map: data-set class index -> model output index (when the orders differ).
    Returns:
        An :class:`EvalResult`: metrics identical on every rank; ``skipped`` lists this rank's
        unreadable images.
    """
    dist = dist or Dist(device=device)
    model.eval()
    num_classes = len(class_names) if class_names is not None else 0
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1 hits, top-5 hits, images
    per_class = torch.zeros(2, max(num_classes, 1), dtype=torch.float64)  # hits, images
    skipped: List[str] = []
    for images, targets, bad in loader:
        skipped.extend(bad)
        if images.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)
        model_targets = target_map.to(device)[targets] if target_map is not None else targets
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit1 = top[:, 0] == model_targets
        hitk = (top == model_targets[:, None]).any(dim=1)
        sums += torch.tensor([F.cross_entropy(logits, model_targets, reduction="sum").item(),
                              hit1.sum().item(), hitk.sum().item(), len(targets)], dtype=torch.float64)
        if num_classes:
            t = targets.cpu()
            per_class[0] += torch.bincount(t, weights=hit1.cpu().double(), minlength=num_classes)
            per_class[1] += torch.bincount(t, minlength=num_classes).double()
    sums = torch.tensor(dist.all_reduce_sum(sums.tolist()), dtype=torch.float64)
    if num_classes:
        per_class = dist.all_reduce_tensor_(per_class.to(dist.comm_device())).cpu()
    n = int(sums[3].item())
    if n == 0:
        raise DataError("no image could be evaluated: every image in the split was unreadable")
    result = EvalResult(top1=100.0 * sums[1].item() / n, top5=100.0 * sums[2].item() / n,
                        loss=sums[0].item() / n, count=n, skipped=skipped)
    if num_classes:
        result.per_class = [
            {"class": name, "images": int(per_class[1, i].item()),
             "top1": 100.0 * per_class[0, i].item() / per_class[1, i].item() if per_class[1, i] > 0 else None}
            for i, name in enumerate(class_names or [])
        ]
    return result
