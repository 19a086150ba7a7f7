"""``hymamba detect eval`` and ``hymamba detect predict``: COCO metrics of a trained detector on a data
set, and detections (JSON + drawn images) for image files and folders.

Weights come from :func:`hymamba.factory.load_trained_detector` (a run folder of ``hymamba detect
train``, its ``model.safetensors`` or a ``.pth`` it wrote), whose metadata says how the detector was
built (backbone, FPN, sizes) and names its classes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from hymamba.data.detection import coco_subset, collate_detection, open_detection_split
from hymamba.data.images import image_files, read_images
from hymamba.errors import ConfigError, DataError
from hymamba.factory import load_trained_detector
from hymamba.tasks.detection.evaluation import evaluate_detector
from hymamba.utils.amp import amp_dtype as resolve_amp_dtype
from hymamba.utils.amp import autocast, resolve_device
from hymamba.utils.io import atomic_write, write_json_atomic

__all__ = ["evaluate", "predict"]


def _load(checkpoint: str | os.PathLike, use_ema: bool, device: str, scan_impl: str):
    dev = resolve_device(device)
    model, meta = load_trained_detector(checkpoint, use_ema=use_ema, scan_impl=scan_impl)
    return model.to(dev).eval(), meta, dev


def evaluate(checkpoint: str | os.PathLike, data: str = "digitobjects", *, split: Optional[str] = None,
             size: Optional[int] = None, batch_size: int = 4, workers: Optional[int] = None,
             max_samples: Optional[int] = None, amp: bool = False, use_ema: bool = False, device: str = "auto",
             scan_impl: str = "auto", results_file: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
    """COCO box (and mask) AP, AP50, AP75, APs/m/l of a trained detector on a split of ``data``
    (``"digitobjects"``, a COCO root or a COCO-format folder; default: the validation split), at test
    short side ``size`` (default: the run's). ``results_file``: also write the detections there in
    COCO's results format (one entry per detection with ``bbox`` ``[x, y, w, h]``, ``score`` and, for
    Mask R-CNN, an RLE ``segmentation``; ``category_id`` and ``image_id`` as in the annotation file)."""
    model, meta, dev = _load(checkpoint, use_ema, device, scan_impl)
    dataset, kind = open_detection_split(data, split, "val", scene_size=int(meta.get("scene_size") or 128))
    category_ids = getattr(dataset, "cat_ids", None)  # COCO files: the original (non-contiguous) ids
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
    dataset, gt = coco_subset(dataset, max_samples)
    n_workers = (0 if kind == "digitobjects" else min(8, os.cpu_count() or 1)) if workers is None else workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=n_workers,
                                         collate_fn=collate_detection)
    test_size = int(size or (meta.get("detector_kwargs") or {}).get("min_size") or 800)
    skipped: set = set()
    res = evaluate_detector(model, loader, gt, test_size=test_size, device=dev, amp_dtype=resolve_amp_dtype(dev, amp),
                            skipped=skipped, keep_results=results_file is not None)
    if results_file is not None:
        results = res.pop("results")
        if category_ids is not None:
            results = [{**r, "category_id": int(category_ids[r["category_id"] - 1])} for r in results]
        write_json_atomic(Path(results_file), results)
        res["results_file"] = str(results_file)
    return {"model": meta.get("model"), "checkpoint": str(checkpoint), "data": str(data), "kind": kind,
            "test_size": test_size, "skipped_images": len(skipped), **res}


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
            score_thresh: float = 0.5, size: Optional[int] = None, draw: bool = True, batch_size: int = 4,
            amp: bool = False, use_ema: bool = False, device: str = "auto", scan_impl: str = "auto",
            progress: Optional[Callable[[Iterator], Iterator]] = None) -> List[Dict[str, Any]]:
    """Detections for image files and folders (searched recursively): ``OUT/detections.json`` (one entry
    per image: ``image``, ``detections`` = ``{"label", "class", "score", "box" [x0, y0, x1, y1]}`` at or
    above ``score_thresh``, or ``error`` for an unreadable file) and, with ``draw``, ``OUT/<name>.png``
    (boxes, class names and scores; masks blended in for Mask R-CNN). Returns the JSON's entries."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    if not 0 <= score_thresh <= 1:
        raise ConfigError(f"score_thresh must be in [0, 1], got {score_thresh}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    files = image_files(inputs)
    if not files:
        raise DataError("no images to run on: give image files or folders holding images")
    model, meta, dev = _load(checkpoint, use_ema, device, scan_impl)
    names = model.class_names or [str(k) for k in range(1, int(meta["num_classes"]))]
    model.transform.min_size = (int(size or model.transform.min_size[-1]),)
    dtype = resolve_amp_dtype(dev, amp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: List[Dict[str, Any]] = []
    pending: List[tuple] = []

    def flush() -> None:
        if not pending:
            return
        with autocast(dev, dtype):
            outputs = model([x.to(dev) for _, x, _ in pending])
        for (slot, x, name), o in zip(pending, outputs):
            keep = o["scores"].float() >= score_thresh
            boxes, labels, scores = o["boxes"][keep].float().cpu(), o["labels"][keep].cpu(), o["scores"][keep].float()
            results[slot]["detections"] = [
                {"label": int(lab), "class": names[int(lab) - 1] if 0 < int(lab) <= len(names) else str(int(lab)),
                 "score": round(float(sc), 4), "box": [round(float(v), 2) for v in box]}
                for box, lab, sc in zip(boxes, labels, scores)]
            if draw:
                image = (x * 255).round().to(torch.uint8)
                if "masks" in o and keep.any():
                    image = draw_segmentation_masks(image, o["masks"][keep][:, 0].cpu() > 0.5, alpha=0.45)
                captions = [f"{d['class']} {d['score']:.2f}" for d in results[slot]["detections"]]
                if captions:
                    image = draw_bounding_boxes(image, boxes, labels=captions, width=2, colors="red")
                path = out / f"{name}.png"
                atomic_write(path, lambda tmp, drawn=image: _save(drawn, tmp))
                results[slot]["drawn"] = str(path)
        pending.clear()

    for _, name, array in read_images(files, results, progress):
        x = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() / 255.0
        pending.append((len(results) - 1, x, name))
        if len(pending) >= batch_size:
            flush()
    flush()
    write_json_atomic(out / "detections.json", results)
    return results


def _save(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format="PNG")
