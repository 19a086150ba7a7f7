"""One evaluation loop for segmenters: the training run's per-epoch validation and ``hymamba segment
eval`` both call :func:`evaluate_segmenter`, so they score the same way.

Scoring is mmseg's: each image's logits (whole image or sliding window, optional flip / multi-scale,
see :class:`Inference`) are resized bilinearly to the annotation's own size, the arg-max is added to
one confusion matrix over the whole data set (summed over processes), and mIoU, aAcc, mAcc and the
per-class IoU / accuracy come from it. Batches of images of different sizes cannot be stacked without
padding, which would put padding into the resized logits; data sets whose images differ in size are
therefore evaluated one image per batch (mmseg does the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hymamba.data.datasets import warn_unreadable
from hymamba.errors import ConfigError
from hymamba.tasks.segmentation.inference import slide_inference, whole_inference
from hymamba.tasks.segmentation.metrics import ConfusionMatrix
from hymamba.utils.amp import autocast
from hymamba.utils.distributed import Dist

__all__ = ["INFERENCE_MODES", "Inference", "evaluate_segmenter"]

INFERENCE_MODES = ("whole", "slide")


@dataclass(frozen=True)
class Inference:
    """How logits are computed at test time.

    Attributes:
        mode: ``"whole"`` (one forward per image, the official ADE20K test) or ``"slide"``.
        crop_size, stride: the sliding windows (H, W) (mode ``"slide"`` only).
        flip: also infer the mirrored image and average.
        scales: resize ratios to infer at and average (None: the image as given).
    """

    mode: str = "whole"
    crop_size: Tuple[int, int] = (512, 512)
    stride: Tuple[int, int] = (341, 341)
    flip: bool = False
    scales: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise ConfigError(f"inference mode must be one of {', '.join(INFERENCE_MODES)}, got {self.mode!r}")
        if min(self.crop_size) < 1 or min(self.stride) < 1:
            raise ConfigError(f"crop size and stride must be positive, got {self.crop_size} and {self.stride}")
        if self.scales is not None and (not self.scales or min(self.scales) <= 0):
            raise ConfigError(f"scales must be positive ratios, got {self.scales}")

    def describe(self) -> str:
        text = self.mode if self.mode == "whole" else (f"slide {self.crop_size[0]}x{self.crop_size[1]} stride "
                                                       f"{self.stride[0]}x{self.stride[1]}")
        if self.scales:
            text += " at scales " + ", ".join(f"{r:g}" for r in self.scales)
        return text + (" + flip" if self.flip else "")

    @torch.no_grad()
    def logits(self, model: nn.Module, images: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Logits (N, C, H, W) at the size of ``images`` (normalised, (N, 3, H, W))."""
        scales = list(self.scales) if self.scales else None
        if self.mode == "slide":
            return slide_inference(model, images, self.crop_size, self.stride, num_classes, flip=self.flip,
                                   scales=scales)
        return whole_inference(model, images, flip=self.flip, scales=scales)


def evaluate_segmenter(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor, Sequence[str]]],
                       num_classes: int, *, inference: Inference = Inference(), ignore_index: int = 255,
                       device: Optional[torch.device] = None, amp_dtype: Optional[torch.dtype] = None,
                       dist: Optional[Dist] = None, skipped: Optional[set] = None,
                       channels_last: bool = False) -> Dict[str, Any]:
    """Score ``model`` over ``batches`` of ``(images, masks, unreadable paths)`` (see the module docstring).

    Returns:
        ``mIoU``, ``aAcc``, ``mAcc`` (percent), ``loss`` (mean cross-entropy per scored pixel),
        ``images`` (scored), ``IoU`` and ``Acc`` (per class, percent, NaN where mmseg has NaN) and
        ``pixels`` (scored pixels per class in the annotations), over all processes of ``dist``.
    """
    device = device or next(model.parameters()).device
    skipped = set() if skipped is None else skipped
    cm = ConfusionMatrix(num_classes, ignore_index)
    loss_sum, pixels, images = 0.0, 0, 0
    for x, y, bad in batches:
        warn_unreadable(bad, skipped)
        if x.numel() == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = inference.logits(model, x, num_classes)
        logits = logits.float()
        if logits.shape[-2:] != y.shape[-2:]:  # scored at the annotation's own size, as mmseg
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1), y)
        loss_sum += float(F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum"))
        pixels += int((y != ignore_index).sum())
        images += x.shape[0]
    if dist is not None:
        cm.reduce(dist)
        loss_sum, pixels, images = dist.all_reduce_sum([loss_sum, pixels, images])
    res = cm.compute()
    return {"mIoU": res["mIoU"], "aAcc": res["aAcc"], "mAcc": res["mAcc"], "loss": loss_sum / max(pixels, 1),
            "images": int(images), "IoU": res["IoU"], "Acc": res["Acc"],
            "pixels": [int(v) for v in cm.areas()["label"].tolist()]}
