"""One evaluation loop for detectors: the training run's per-epoch validation and ``hymamba detect eval``
both call :func:`evaluate_detector`, so they score the same way (COCO protocol, one test scale)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from hymamba.data.datasets import warn_unreadable
from hymamba.tasks.detection.metrics import CocoEvaluator
from hymamba.utils.amp import autocast
from hymamba.utils.distributed import Dist

__all__ = ["evaluate_detector", "iou_types_of"]


def iou_types_of(model: nn.Module) -> Sequence[str]:
    """("bbox", "segm") for a detector with a mask head, ("bbox",) otherwise."""
    heads = getattr(_unwrap(model), "roi_heads", None)
    return ("bbox", "segm") if getattr(heads, "mask_predictor", None) is not None else ("bbox",)


@torch.no_grad()
def evaluate_detector(model: nn.Module, batches: Iterable[Any], coco_gt: Mapping[str, Any], *, test_size: int,
                      device: Optional[torch.device] = None, amp_dtype: Optional[torch.dtype] = None,
                      dist: Optional[Dist] = None, skipped: Optional[set] = None,
                      keep_results: bool = False) -> Dict[str, Any]:
    """COCO metrics of ``model`` over ``batches`` of ``(images, targets, unreadable paths)``.

    The model runs in eval mode at one test scale (short side ``test_size``; torchvision's transform
    resizes inside the model and maps the outputs back to each image's own size). Returns
    :meth:`CocoEvaluator.compute`'s dict plus ``"summary"`` (pycocotools' tables) and, with
    ``keep_results``, ``"results"``: the detections in COCO's results format
    (:meth:`CocoEvaluator.coco_results`, categories as in ``coco_gt``)."""
    device = device or next(model.parameters()).device
    skipped = set() if skipped is None else skipped
    evaluator = CocoEvaluator(coco_gt, iou_types=iou_types_of(model))
    transform = _unwrap(model).transform
    train_sizes, was_training = transform.min_size, model.training
    transform.min_size = (int(test_size),)
    model.eval()
    try:
        for images, targets, bad in batches:
            warn_unreadable(bad, skipped)
            if not images:
                continue
            images = [im.to(device, non_blocking=True) for im in images]
            with autocast(device, amp_dtype):
                outputs = model(images)
            outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
            evaluator.update([int(t["image_id"]) for t in targets], outputs)
    finally:
        transform.min_size = train_sizes
        model.train(was_training)
    evaluator.gather(dist)
    res = evaluator.compute()
    res["summary"] = evaluator.summary_text()
    if keep_results:
        res["results"] = evaluator.coco_results()
    return res


def _unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DDP wrapper."""
    return getattr(model, "module", model)
