"""COCO box and mask AP of torchvision detector outputs, with pycocotools' ``COCOeval``.

:class:`CocoEvaluator` turns each image's output (torchvision's eval format: ``boxes`` (N, 4) xyxy,
``labels`` (N,), ``scores`` (N,) and, for Mask R-CNN, ``masks`` (N, 1, H, W) probabilities) into COCO
results - boxes as xywh, masks thresholded (``> 0.5``, as torchvision's COCO reference does) and
RLE-encoded with ``pycocotools.mask`` - keeps them on the CPU per image id, gathers them from every
process and runs ``COCOeval`` once per IoU type over exactly the images that were updated.

The numbers are COCOeval's ``stats[0..5]`` in percent: AP (IoU 0.50:0.95), AP50, AP75, APs, APm, APl
(area ranges: small < 32², medium 32²..96², large > 96² pixels; at most 100 detections per image and
category). COCOeval reports -1 where a value is undefined - no ground truth in that area range among
the evaluated images (e.g. APl on a data set without large objects) - and that is returned as NaN here,
never as -1 or 0. Crowd annotations (``iscrowd=1``) are COCO's ignore regions: a detection matched to one
is neither a true nor a false positive, and an undetected one is no miss.

Detections the model did not make are misses, so an image updated with no detections at all still
counts; with no detections anywhere every AP is 0 wherever ground truth exists (NaN where it does not).
pycocotools' own ``loadRes`` fails on an empty result list, which is why the result set is built here.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from hymamba.errors import ConfigError, DataError
from hymamba.utils.distributed import Dist

__all__ = ["IOU_TYPES", "STAT_NAMES", "CocoEvaluator", "merge_results"]

#: the IoU types evaluated: boxes and instance masks
IOU_TYPES: Tuple[str, ...] = ("bbox", "segm")
#: the names of COCOeval's ``stats[0..5]``, in that order
STAT_NAMES: Tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: a mask probability above this is foreground (torchvision's COCO reference: ``masks > 0.5``)
MASK_THRESHOLD = 0.5

#: per image id: per IoU type, the image's COCO results (dicts with image_id, category_id, score, bbox or
#: segmentation)
Results = Dict[int, Dict[str, List[Dict[str, Any]]]]


def _load_pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("COCO evaluation needs pycocotools: pip install pycocotools") from e
    return COCO, COCOeval, mask_utils


class CocoEvaluator:
    """COCO box / mask AP over a data set, from torchvision's detector outputs.

    Use: ``update(image_ids, outputs)`` per batch, ``gather(dist)`` once after the last batch (on every
    rank), then ``compute()``; ``summary_text()`` gives pycocotools' printed table of the last compute.

    Args:
        coco_gt: the ground truth as a COCO-format dict: ``images`` (``id``, ``width``, ``height``),
            ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` xywh, ``area``, ``iscrowd``
            and, for ``segm``, ``segmentation``: polygons or RLE with ``counts`` as str, bytes or an
            uncompressed list), ``categories`` (``id``). It is not modified (pycocotools writes into
            annotations, so each one is copied).
        iou_types: ``"bbox"`` and/or ``"segm"``.
        label_map: maps the model's labels to category ids (default: the labels are the category ids,
            as in torchvision's COCO models: 1..90).

    Raises:
        ConfigError: an unknown or empty ``iou_types``.
        DataError: ``coco_gt`` lacks a section, an image lacks its size, or an annotation lacks a key.
    """

    def __init__(self, coco_gt: Mapping[str, Any], iou_types: Sequence[str] = IOU_TYPES,
                 label_map: Optional[Mapping[int, int]] = None) -> None:
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        iou_types = tuple(iou_types)
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if not iou_types or bad or len(set(iou_types)) != len(iou_types):
            raise ConfigError(f"iou_types must be distinct values among {IOU_TYPES}, got {iou_types}")
        self.iou_types = iou_types
        self.label_map = None if label_map is None else {int(k): int(v) for k, v in label_map.items()}
        COCO, _, _ = _load_pycocotools()
        missing = [k for k in ("images", "annotations", "categories") if k not in coco_gt]
        if missing:
            raise DataError(f"the COCO ground truth lacks {missing} (it needs images, annotations, categories)")
        self.image_sizes: Dict[int, Tuple[int, int]] = {}
        for img in coco_gt["images"]:
            if "id" not in img or "height" not in img or "width" not in img:
                raise DataError(f"a ground-truth image lacks id, height or width: {dict(img)}")
            self.image_sizes[int(img["id"])] = (int(img["height"]), int(img["width"]))
        self.category_ids = {int(c["id"]) for c in coco_gt["categories"]}
        needed = ["id", "image_id", "category_id", "bbox", "area", "iscrowd"]
        if "segm" in iou_types:
            needed.append("segmentation")
        annotations = []
        for ann in coco_gt["annotations"]:
            lacks = [k for k in needed if k not in ann]
            if lacks:
                raise DataError(f"ground-truth annotation {ann.get('id', '?')} lacks {lacks}")
            annotations.append(dict(ann))
        dataset = {"images": [dict(i) for i in coco_gt["images"]], "annotations": annotations,
                   "categories": [dict(c) for c in coco_gt["categories"]]}
        self._gt = _coco(COCO, dataset)
        self.results: Results = {}
        self._summary = ""

    def reset(self) -> None:
        self.results = {}
        self._summary = ""

    @torch.no_grad()
    def update(self, image_ids: Iterable[Any], outputs: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add a batch: ``image_ids[i]`` is the ground-truth image id of ``outputs[i]`` (ints or 0-d
        tensors), outputs as torchvision's detectors return them in eval mode (any device), in the
        coordinates of the original image. An image id seen before keeps its first results (a
        ``DistributedSampler`` pads its shards by repeating images).

        Raises:
            DataError: the ids and outputs differ in number, an id is not in the ground truth, a label
                is no category, a tensor has the wrong shape, or a mask's size is not its image's.
            ConfigError: ``segm`` is evaluated but an output has no ``masks`` (a box-only detector: use
                ``iou_types=("bbox",)``).
        """
        image_ids = [int(i) for i in image_ids]
        outputs = list(outputs)
        if len(image_ids) != len(outputs):
            raise DataError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
        for image_id, out in zip(image_ids, outputs):
            if image_id not in self.image_sizes:
                raise DataError(f"image id {image_id} is not in the COCO ground truth")
            if image_id in self.results:
                continue
            self.results[image_id] = self._convert(image_id, out)

    def _convert(self, image_id: int, out: Mapping[str, torch.Tensor]) -> Dict[str, List[Dict[str, Any]]]:
        for key in ("boxes", "labels", "scores"):
            if key not in out:
                raise DataError(f"a detector output lacks {key!r} (it has {sorted(out)})")
        if "segm" in self.iou_types and "masks" not in out:
            raise ConfigError("mask AP ('segm') needs instance masks, but a detector output has no 'masks' "
                              "(a box-only detector such as Faster R-CNN): evaluate with iou_types=('bbox',)")
        boxes = out["boxes"].detach().float().cpu()
        labels = out["labels"].detach().cpu().reshape(-1)
        scores = out["scores"].detach().float().cpu().reshape(-1)
        n = labels.numel()
        if boxes.shape != (n, 4) or scores.numel() != n:
            raise DataError(f"image {image_id}: boxes {tuple(boxes.shape)}, labels ({n},) and scores "
                            f"({scores.numel()},) do not describe the same N detections (boxes must be (N, 4))")
        categories = [self._category(int(v), image_id) for v in labels.tolist()]
        found: Dict[str, List[Dict[str, Any]]] = {}
        score_list = scores.tolist()
        if "bbox" in self.iou_types:
            x1, y1, x2, y2 = boxes.unbind(1)
            xywh = torch.stack([x1, y1, x2 - x1, y2 - y1], dim=1).tolist()
            found["bbox"] = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                             for c, b, s in zip(categories, xywh, score_list)]
        if "segm" in self.iou_types:
            found["segm"] = [{"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
                             for c, r, s in zip(categories, self._encode(image_id, out["masks"], n), score_list)]
        return found

    def _category(self, label: int, image_id: int) -> int:
        category = label if self.label_map is None else self.label_map.get(label)
        if category is None or category not in self.category_ids:
            mapped = "" if self.label_map is None else f" (label_map gives {category})"
            raise DataError(f"image {image_id}: label {label}{mapped} is not a ground-truth category id "
                            f"({sorted(self.category_ids)[:10]}...); pass label_map to map labels to ids")
        return category

    def _encode(self, image_id: int, masks: torch.Tensor, n: int) -> List[Dict[str, Any]]:
        _, _, mask_utils = _load_pycocotools()
        masks = masks.detach()
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        height, width = self.image_sizes[image_id]
        if masks.dim() != 3 or masks.shape[0] != n:
            raise DataError(f"image {image_id}: masks must be (N, 1, H, W) or (N, H, W) with N = {n}, "
                            f"got {tuple(masks.shape)}")
        if tuple(masks.shape[1:]) != (height, width):
            raise DataError(f"image {image_id}: masks are {tuple(masks.shape[1:])} but the image is "
                            f"{(height, width)} (H, W) in the ground truth: outputs must be in original image "
                            "coordinates")
        if n == 0:
            return []
        binary = (masks > MASK_THRESHOLD) if masks.dtype != torch.bool else masks
        array = np.asfortranarray(binary.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(array)
        for rle in rles:  # str counts: picklable, JSON-ready, accepted by pycocotools
            rle["counts"] = rle["counts"].decode("ascii")
        return rles

    def gather(self, dist: Optional[Dist] = None) -> "CocoEvaluator":
        """Collect every process's results on every process (``Dist.gather_objects``; a no-op without
        ``dist`` or a process group). Call it once on every rank after its last ``update``; then every
        rank computes the same numbers. An image evaluated on several ranks counts once."""
        if dist is not None:
            self.results = merge_results(dist.gather_objects(self.results))
        return self

    @property
    def num_detections(self) -> int:
        """Detections held (each image's output length, counted once per image)."""
        return sum(max((len(v) for v in r.values()), default=0) for r in self.results.values())

    def coco_results(self) -> List[Dict[str, Any]]:
        """The detections in COCO's results format, one entry per detection (images in id order):
        ``image_id``, ``category_id`` (as in the ground truth given), ``bbox`` (``[x, y, w, h]``),
        ``score`` and, with masks, ``segmentation`` (RLE, str counts), as detectron2 writes them."""
        out: List[Dict[str, Any]] = []
        for image_id in sorted(self.results):
            found = self.results[image_id]
            boxes, segms = found.get("bbox"), found.get("segm")
            for k in range(len(boxes if boxes is not None else segms or [])):
                entry = dict(boxes[k]) if boxes is not None else {}
                if segms is not None:
                    entry.update(segms[k])
                out.append(entry)
        return out

    def compute(self) -> Dict[str, Any]:
        """Run COCOeval over the updated images, per IoU type.

        Returns:
            ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` in percent (floats, unrounded;
            NaN where COCOeval says -1: no ground truth in that area range), ``"images"``: the number of
            images evaluated and ``"detections"``: the number of detections. With no image updated at
            all every value is NaN (nothing was evaluated); with images but no detections APs are 0 where
            there is ground truth.
        """
        COCO, COCOeval, _ = _load_pycocotools()
        image_ids = sorted(self.results)
        out: Dict[str, Any] = {"images": len(image_ids), "detections": self.num_detections}
        texts = []
        for iou_type in self.iou_types:
            if not image_ids:
                out[iou_type] = {name: math.nan for name in STAT_NAMES}
                continue
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                results = [r for i in image_ids for r in self.results[i].get(iou_type, [])]
                evaluator = COCOeval(self._gt, self._result_set(COCO, results, iou_type), iou_type)
                evaluator.params.imgIds = image_ids
                evaluator.evaluate()
                evaluator.accumulate()
                print(f"IoU type: {iou_type}, {len(image_ids)} images, {len(results)} detections")
                evaluator.summarize()
            texts.append(buffer.getvalue())
            out[iou_type] = {name: (float(v) * 100.0 if v > -1 else math.nan)
                             for name, v in zip(STAT_NAMES, evaluator.stats[:6])}
        self._summary = "".join(texts)
        return out

    def summary_text(self) -> str:
        """What pycocotools printed during the last :meth:`compute` (its AP / AR table per IoU type)."""
        return self._summary

    def _result_set(self, COCO, results: List[Dict[str, Any]], iou_type: str):
        """The detections as a COCO object, as ``COCO.loadRes`` builds it (area, bbox from the mask,
        ids from 1, iscrowd 0), but also for an empty list."""
        _, _, mask_utils = _load_pycocotools()
        annotations = []
        for k, r in enumerate(results, start=1):
            ann = dict(r, id=k, iscrowd=0)
            if iou_type == "bbox":
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
            else:
                ann["area"] = float(mask_utils.area(ann["segmentation"]))
                ann["bbox"] = mask_utils.toBbox(ann["segmentation"]).tolist()
            annotations.append(ann)
        dataset = {"images": self._gt.dataset["images"], "categories": self._gt.dataset["categories"],
                   "annotations": annotations}
        return _coco(COCO, dataset)


def merge_results(parts: Sequence[Results]) -> Results:
    """One results dict from several processes' (in rank order): an image id present in several parts
    keeps its first results. Returns a new dict (the parts are not modified)."""
    merged: Results = {}
    for part in parts:
        for image_id, found in part.items():
            merged.setdefault(int(image_id), found)
    return merged


def _coco(COCO, dataset: Dict[str, Any]):
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
