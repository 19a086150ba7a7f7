"""Segmentation metrics as mmseg's ``IoUMetric`` computes them, from one confusion matrix over the
whole data set.

mmseg sums, over all images, the per-class areas of intersection, prediction, label and union (pixels
whose label is ``ignore_index`` are left out) and only then divides: so a data set's mIoU is *not*
the mean of per-image mIoUs. With ``intersect``, ``label`` (target pixels of the class), ``pred``
(predicted pixels of the class) and ``union = pred + label - intersect`` summed over the data set:

- IoU per class = intersect / union; Acc per class = intersect / label;
- aAcc = sum(intersect) / sum(label) (pixel accuracy over labelled pixels);
- mIoU = nanmean(IoU), mAcc = nanmean(Acc).

A class that never occurs in the targets has label area 0, so its Acc is NaN (0/0); its IoU is NaN
too when it is never predicted either (union 0) but 0 when it is predicted (union > 0, intersect 0),
and that 0 counts in mIoU, exactly as in mmseg. NaN values are left out of the means (``nanmean``).
Every value is in percent, as in mmseg's printed table; mmseg also rounds its numbers to 2 decimals,
which is left to the caller here (:meth:`ConfusionMatrix.compute` returns unrounded values).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from hymamba.errors import ConfigError, DataError
from hymamba.utils.distributed import Dist

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """A data set's (num_classes x num_classes) confusion matrix: rows = target, columns = prediction.

    Use: ``update(pred, target)`` per batch (on any device), ``reduce(dist)`` once after the last
    batch when running on several processes, then ``compute()``.

    Args:
        num_classes: the classes (predictions and targets must lie in ``0 .. num_classes - 1``).
        ignore_index: target value of pixels that are not scored (mmseg: 255).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer tensors of the same shape (any shape, e.g.
        (N, H, W) class indices; take ``logits.argmax(1)`` first). Pixels whose target is
        ``ignore_index`` are skipped.

        Raises:
            DataError: shapes differ, a tensor is not integer, a prediction lies outside
                ``0 .. num_classes - 1``, or a (not ignored) target does.
        """
        if pred.shape != target.shape:
            raise DataError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        for what, t in (("prediction", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise DataError(f"{what} must be an integer tensor of class indices, got {t.dtype} "
                                "(for logits, pass logits.argmax(1))")
        c = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long().to(pred.device)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if pred.numel() == 0:
            return
        lo, hi = int(pred.min()), int(pred.max())
        if lo < 0 or hi >= c:
            raise DataError(f"predictions must lie in 0..{c - 1}, found values in {lo}..{hi}")
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= c:
            raise DataError(f"targets must lie in 0..{c - 1} or be ignore_index {self.ignore_index}, "
                            f"found values in {lo}..{hi}")
        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def reduce(self, dist: Optional[Dist] = None) -> "ConfusionMatrix":
        """Sum the matrix over all processes in place (through ``Dist.all_reduce_tensor_``; a no-op
        without a process group or ``dist``). Call it once, after every rank's last ``update``."""
        if dist is None:
            return self
        device = self.matrix.device
        t = self.matrix.to(dist.comm_device())
        dist.all_reduce_tensor_(t)
        self.matrix = t.to(device)
        return self

    def areas(self) -> Dict[str, torch.Tensor]:
        """mmseg's summed areas per class (float64, on the CPU): intersect, pred, label, union."""
        m = self.matrix.double().cpu()
        intersect = torch.diagonal(m).clone()
        label = m.sum(dim=1)
        pred = m.sum(dim=0)
        return dict(intersect=intersect, pred=pred, label=label, union=pred + label - intersect)

    def compute(self) -> Dict[str, Any]:
        """The metrics, in percent (unrounded; mmseg prints them rounded to 2 decimals).

        Returns:
            ``{"mIoU", "aAcc", "mAcc"}`` floats (NaN when nothing was scored) and ``"IoU"``, ``"Acc"``:
            lists of ``num_classes`` floats, NaN where mmseg has NaN (see the module docstring).
        """
        a = self.areas()
        with torch.no_grad():
            iou = a["intersect"] / a["union"]  # 0/0 -> NaN: never in the target nor predicted
            acc = a["intersect"] / a["label"]  # 0/0 -> NaN: never in the target
        total = float(a["label"].sum())
        aacc = float(a["intersect"].sum()) / total * 100.0 if total > 0 else math.nan
        return {"mIoU": _nanmean(iou) * 100.0, "aAcc": aacc, "mAcc": _nanmean(acc) * 100.0,
                "IoU": _percent(iou), "Acc": _percent(acc)}


def _nanmean(t: torch.Tensor) -> float:
    valid = t[~torch.isnan(t)]
    return float(valid.mean()) if valid.numel() else math.nan


def _percent(t: torch.Tensor) -> List[float]:
    return [float(v) * 100.0 for v in t]
