"""Detection / instance-segmentation data sets in torchvision's Mask R-CNN format.

- :class:`CocoDetection`: a folder of images and a COCO ``instances`` json.
- :class:`DigitObjects`: the built-in set, one instance per digit pasted into the
  :class:`~hymamba.data.segmentation.DigitScenes` (offline, exact labels).
- :func:`write_coco`: either of them written as a COCO folder (``images/<id>.png`` +
  ``annotations.json``), which :class:`CocoDetection` reads back to the same targets.

A sample is ``(image, target, unreadable paths)``: ``image`` a float tensor (3, H, W) in 0..1 and
``target`` a dict with ``boxes`` float32 (N, 4) ``x0, y0, x1, y1`` in pixels (pixel edges: a box
holding columns 3..5 is ``x0 = 3, x1 = 6``), ``labels`` int64 (N,) in 1..K (0 is torchvision's
background), ``masks`` uint8 (N, H, W), ``area`` float32 (N,), ``iscrowd`` int64 (N,) and
``image_id`` (an int, the COCO image id). COCO category ids, sorted ascending, become the labels
1..K; ``classes[k - 1]`` names label ``k`` and ``num_classes`` is K + 1 (torchvision's count).
Training targets leave out crowd annotations and boxes under 1 px wide or high (with a logged
warning); ``coco_gt``, the ground truth for COCO evaluation, keeps every annotation, its
``category_id`` already the contiguous label.

A transform gets ``(uint8 RGB (H, W, 3) array, target dict of numpy arrays, numpy Generator)``,
the generator seeded from ``(seed, epoch, index)``, and returns the same kinds
(:class:`DetTrainTransform`: a horizontal flip and the official recipe's DETR-style crop). Resizing is
left to the model: torchvision's detectors resize internally (``min_size`` / ``max_size``; a tuple
``min_size`` trains at several scales). As for the other data sets, an unreadable image never stops a
job: ``(None, None, [path (reason)])``, or the next readable image with ``substitute_bad=True``;
:func:`collate_detection` leaves such samples out. :func:`open_detection_split` opens a split by name
and :func:`coco_subset` takes evenly spread images with their ground truth.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from hymamba.data.images import UNREADABLE, load_image, read_or_substitute
from hymamba.errors import DataError
from hymamba.utils.io import atomic_write, write_json_atomic

__all__ = ["CocoDetection", "DIGIT_OBJECTS_NAME", "DetTrainTransform", "DigitObjects", "coco_subset",
           "collate_detection", "open_detection_split", "write_coco"]

logger = logging.getLogger(__name__)

DetSample = Tuple[Optional[torch.Tensor], Optional[Dict[str, Any]], List[str]]
#: numpy targets: boxes, labels, masks, area, iscrowd (image_id is added when converting)
NpTarget = Dict[str, np.ndarray]


def _mask_utils() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("detection data needs pycocotools: pip install pycocotools") from e
    return mask_utils


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
    """A binary (H, W) mask as COCO's compressed RLE with JSON-safe ``counts`` (a str)."""
    rle = _mask_utils().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _empty_target(h: int, w: int) -> NpTarget:
    return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
            "masks": np.zeros((0, h, w), np.uint8), "area": np.zeros(0, np.float32),
            "iscrowd": np.zeros(0, np.int64)}


class DetTrainTransform:
    """Training augmentation, the official recipe's up to the resize (which torchvision's detectors do):
    a horizontal flip (``flip_prob``), then, with ``crop_prob``, a DETR-style random crop.

    The official configs (mmdet, as Swin's) pick, half of the time, a resize of the short side to
    400/500/600 followed by a crop of 384-600 pixels per side (mmdet ``RandomCrop``,
    ``absolute_range``, negative crops allowed), then the multi-scale resize. Here the crop is given
    relative to the image's short side, ``crop_range`` = (low, high): each side of the crop is drawn
    uniformly in ``[low * S, high * S]`` pixels (S the short side), capped at that side of the image;
    (0.75, 1.2) is the official range at the middle size (384 / 500 ... 600 / 500). Boxes are clipped
    to the crop; an instance whose clipped box is under 1 px wide or high, or whose mask is left
    empty, is dropped (a crop may hold no instance at all); ``area`` is recounted from the mask.
    """

    def __init__(self, flip_prob: float = 0.5, crop_prob: float = 0.0,
                 crop_range: Tuple[float, float] = (0.75, 1.2)) -> None:
        self.flip_prob, self.crop_prob = float(flip_prob), float(crop_prob)
        self.crop_range = (float(crop_range[0]), float(crop_range[1]))
        if not 0 < self.crop_range[0] <= self.crop_range[1]:
            raise ValueError(f"crop_range must be 0 < low <= high (fractions of the short side), got {crop_range}")

    def __call__(self, image: np.ndarray, target: NpTarget, rng: np.random.Generator) -> Tuple[np.ndarray, NpTarget]:
        if rng.random() < self.flip_prob:
            image, target = _hflip(image, target)
        if self.crop_prob > 0 and rng.random() < self.crop_prob:
            image, target = self.crop(image, target, rng)
        return image, target

    def crop(self, image: np.ndarray, target: NpTarget, rng: np.random.Generator) -> Tuple[np.ndarray, NpTarget]:
        """A random crop (see the class docstring) of the image, its boxes and masks."""
        h, w = image.shape[:2]
        short = min(h, w)

        def side(full: int) -> int:
            lo = min(full, max(1, round(self.crop_range[0] * short)))
            hi = min(full, max(1, round(self.crop_range[1] * short)))
            return int(rng.integers(lo, hi + 1))

        ch, cw = side(h), side(w)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4) - np.array([x0, y0, x0, y0], np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
        masks = np.asarray(target["masks"])[:, y0:y0 + ch, x0:x0 + cw]
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        has_masks = masks.shape[0] == boxes.shape[0] and masks.shape[0] > 0
        if has_masks:
            keep &= masks.reshape(len(masks), -1).any(1)
        out = {k: np.asarray(v)[keep] for k, v in target.items()}
        out["boxes"] = boxes[keep]
        out["masks"] = np.ascontiguousarray(masks[keep]) if has_masks else np.zeros((0, ch, cw), np.uint8)
        if has_masks:
            out["area"] = out["masks"].reshape(len(out["masks"]), -1).sum(1).astype(np.float32)
        return np.ascontiguousarray(image[y0:y0 + ch, x0:x0 + cw]), out

    def __repr__(self) -> str:
        return (f"DetTrainTransform(flip_prob={self.flip_prob}, crop_prob={self.crop_prob}, "
                f"crop_range={self.crop_range})")


def _hflip(image: np.ndarray, target: NpTarget) -> Tuple[np.ndarray, NpTarget]:
    w = image.shape[1]
    out = dict(target)
    boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
    out["boxes"] = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1).astype(np.float32)
    out["masks"] = np.ascontiguousarray(np.asarray(target["masks"])[:, :, ::-1])
    return np.ascontiguousarray(image[:, ::-1]), out


def _to_tensors(image: np.ndarray, target: NpTarget, image_id: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
    x = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    h, w = x.shape[-2:]
    masks = np.asarray(target["masks"], np.uint8)
    return x, {
        "boxes": torch.as_tensor(np.asarray(target["boxes"], np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(target["labels"], np.int64).reshape(-1)),
        "masks": torch.from_numpy(np.require(masks.reshape(-1, h, w), np.uint8, ["C", "W"])),
        "area": torch.as_tensor(np.asarray(target["area"], np.float32).reshape(-1)),
        "iscrowd": torch.as_tensor(np.asarray(target["iscrowd"], np.int64).reshape(-1)),
        "image_id": int(image_id),
    }


class _DetectionBase(Dataset):
    """The shared sample assembly, per-sample generator and unreadable-image policy."""

    image_ids: List[int]
    classes: List[str]
    root: Any

    def __init__(self, transform: Optional[Callable], substitute_bad: bool, seed: int) -> None:
        self.transform = transform
        self.substitute_bad = substitute_bad
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        """torchvision's class count: the K classes plus the background."""
        return len(self.classes) + 1

    def set_epoch(self, epoch: int) -> None:
        """Change the random augmentation of every sample (same epoch, same augmentation)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_raw(self, i: int) -> Tuple[np.ndarray, NpTarget]:
        """The uint8 RGB image and numpy training target of sample ``i``, before any transform."""
        raise NotImplementedError

    def _path(self, i: int) -> str:
        return f"{self.root}[{i}]"

    def __getitem__(self, i: int) -> DetSample:
        j, raw, bad = read_or_substitute(i, len(self), self.load_raw, self._path, self.substitute_bad, str(self.root))
        if j is None:
            return None, None, bad
        image, target = raw
        if self.transform is not None:
            image, target = self.transform(image, target, np.random.default_rng([self.seed, self.epoch, j]))
        x, y = _to_tensors(image, target, self.image_ids[j])
        return x, y, bad


# ----------------------------------------------------------------------------------------------
# COCO json


def _fail(ann_file: Path, what: str, todo: str) -> DataError:
    return DataError(f"COCO annotations {ann_file}: {what}; {todo}")


def _clean_segmentation(seg: Any, where: str, ann_file: Path) -> Any:
    """Polygons with at least 3 points, an RLE dict, or None (no usable segmentation)."""
    if seg is None or (isinstance(seg, (list, dict)) and len(seg) == 0):
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg or not isinstance(seg["counts"], (str, list)):
            raise _fail(ann_file, f"{where} has an RLE segmentation without 'counts' (str or list) and 'size'",
                        "write RLE as {'size': [h, w], 'counts': ...} (pycocotools.mask.encode)")
        return seg
    if isinstance(seg, list):
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
                raise _fail(ann_file, f"{where} has a polygon that is not a list of numbers",
                            "write polygons as [[x1, y1, x2, y2, ...], ...]")
            if len(poly) >= 6 and len(poly) % 2 == 0:
                polys.append([float(v) for v in poly])
        return polys or None
    raise _fail(ann_file, f"{where} has a segmentation of type {type(seg).__name__}",
                "use polygons (a list of lists) or an RLE dict")


def _decode(seg: Any, h: int, w: int, box: Sequence[float], where: str) -> np.ndarray:
    """A cleaned segmentation (or the box, when None) as a uint8 (h, w) mask."""
    mu = _mask_utils()
    if seg is None:
        m = np.zeros((h, w), np.uint8)
        x0, y0, x1, y1 = box
        m[math.floor(y0):math.ceil(y1), math.floor(x0):math.ceil(x1)] = 1
        return m
    if isinstance(seg, list):
        rle = mu.merge(mu.frPyObjects(seg, h, w))
    else:
        if [int(v) for v in seg["size"]] != [h, w]:
            raise DataError(f"{where}: RLE size {list(seg['size'])} is not the image's [height, width] [{h}, {w}]")
        if isinstance(seg["counts"], list):
            rle = mu.frPyObjects(seg, h, w)
        else:
            rle = {"size": [h, w], "counts": seg["counts"].encode("ascii")}
    return np.ascontiguousarray(mu.decode(rle), dtype=np.uint8)


class CocoDetection(_DetectionBase):
    """A folder of images with a COCO instances json (``images``, ``annotations``, ``categories``).

    Args:
        root: the folder ``file_name`` in the json is relative to.
        ann_file: the json.
        transform: ``(image, target, rng) -> (image, target)`` on numpy arrays (None: none).
        substitute_bad: on an unreadable image return the next readable one (training) instead of None.
        seed: seeds each sample's augmentation with ``(seed, epoch, index)``.

    Every image needs ``id``, ``file_name``, ``width`` and ``height``; every annotation ``image_id``,
    ``category_id`` and ``bbox`` (``[x, y, w, h]``); ``segmentation`` (polygons, RLE, or none: the
    box is filled), ``iscrowd`` (0) and ``area`` (computed) are optional. Samples are the json's
    images in ascending id order (images without annotations included: empty targets).

    Raises:
        DataError: the json is missing, not JSON, or not COCO instances (what is wrong and where).
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, transform: Optional[Callable] = None,
                 substitute_bad: bool = False, seed: int = 0) -> None:
        super().__init__(transform, substitute_bad, seed)
        self.root, self.ann_file = Path(root), Path(ann_file)
        data = self._read_json()
        cats = self._categories(data["categories"])
        self.cat_ids = sorted(cats)
        self.label_of = {c: k + 1 for k, c in enumerate(self.cat_ids)}
        self.classes = [cats[c] for c in self.cat_ids]
        self.images = self._images(data["images"])
        self.image_ids = sorted(self.images)
        self._index = {img_id: i for i, img_id in enumerate(self.image_ids)}
        self.coco_gt, self._train = self._annotations(data["annotations"])

    def _read_json(self) -> Dict[str, Any]:
        f = self.ann_file
        if not f.is_file():
            raise DataError(f"COCO annotations file not found: {f}; pass the instances json (e.g. "
                            "annotations/instances_val2017.json)")
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(f, f"not JSON ({e})", "check that the file is complete (an interrupted download?)") from e
        if not isinstance(data, dict):
            raise _fail(f, f"the top level is a {type(data).__name__}, not an object",
                        "a COCO instances file is an object with 'images', 'annotations' and 'categories'")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise _fail(f, f"'{key}' is missing or not a list",
                            "a COCO instances file is an object with 'images', 'annotations' and 'categories' lists "
                            "(captions/keypoints-only files do not work)")
        return data

    def _categories(self, raw: List[Any]) -> Dict[int, str]:
        cats: Dict[int, str] = {}
        for n, c in enumerate(raw):
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                raise _fail(self.ann_file, f"category {n} lacks an integer 'id' or a string 'name'",
                            "every category needs both")
            if c["id"] in cats:
                raise _fail(self.ann_file, f"category id {c['id']} appears twice", "category ids must be unique")
            cats[c["id"]] = c["name"]
        if not cats:
            raise _fail(self.ann_file, "'categories' is empty", "list the object classes there")
        return cats

    def _images(self, raw: List[Any]) -> Dict[int, Dict[str, Any]]:
        images: Dict[int, Dict[str, Any]] = {}
        for n, img in enumerate(raw):
            ok = isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
            ok = ok and all(isinstance(img.get(k), int) and img[k] > 0 for k in ("width", "height"))
            if not ok:
                raise _fail(self.ann_file, f"image {n} ({str(img)[:80]}) lacks an integer 'id', a 'file_name' or a "
                            "positive integer 'width'/'height'", "every image entry needs all four")
            if img["id"] in images:
                raise _fail(self.ann_file, f"image id {img['id']} appears twice", "image ids must be unique")
            images[img["id"]] = {"id": img["id"], "file_name": img["file_name"], "width": img["width"],
                                 "height": img["height"]}
        return images

    def _annotations(self, raw: List[Any]) -> Tuple[Dict[str, Any], List[List[Dict[str, Any]]]]:
        f = self.ann_file
        ids = [a.get("id") if isinstance(a, dict) else None for a in raw]
        keep_ids = all(isinstance(v, int) and v >= 1 for v in ids) and len(set(ids)) == len(ids)
        gt_anns: List[Dict[str, Any]] = []
        train: List[List[Dict[str, Any]]] = [[] for _ in self.image_ids]
        degenerate: List[Any] = []
        for n, a in enumerate(raw):
            where = f"annotation {n} (id {ids[n]})"
            if not isinstance(a, dict):
                raise _fail(f, f"{where} is not an object", "every annotation is an object")
            if a.get("image_id") not in self.images:
                raise _fail(f, f"{where} points to image_id {a.get('image_id')!r}, which is not in 'images'",
                            "remove that annotation or add its image")
            if a.get("category_id") not in self.label_of:
                raise _fail(f, f"{where} has category_id {a.get('category_id')!r}, which is not in 'categories'",
                            "remove that annotation or add its category")
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise _fail(f, f"{where} has bbox {bbox!r}", "a bbox is [x, y, width, height] in pixels")
            img = self.images[a["image_id"]]
            seg = _clean_segmentation(a.get("segmentation"), where, f)
            crowd = int(bool(a.get("iscrowd", 0)))
            area = a.get("area")
            if not isinstance(area, (int, float)):
                area = float(_mask_utils().area(self._rle(seg, img, bbox))) if seg is not None else bbox[2] * bbox[3]
            x, y, w, h = (float(v) for v in bbox)
            gt_seg = seg if seg is not None else [[x, y, x + w, y, x + w, y + h, x, y + h]]
            gt_anns.append({"id": ids[n] if keep_ids else n + 1, "image_id": a["image_id"],
                            "category_id": self.label_of[a["category_id"]], "bbox": [x, y, w, h],
                            "area": float(area), "iscrowd": crowd, "segmentation": gt_seg})
            if crowd:
                continue
            box = [min(max(x, 0.0), img["width"]), min(max(y, 0.0), img["height"]),
                   min(max(x + w, 0.0), img["width"]), min(max(y + h, 0.0), img["height"])]
            if not (box[2] - box[0] >= 1 and box[3] - box[1] >= 1):
                degenerate.append(ids[n])
                continue
            train[self._index[a["image_id"]]].append({"box": box, "label": self.label_of[a["category_id"]],
                                                      "area": float(area), "seg": seg, "where": where})
        if degenerate:
            logger.warning("%s: %d annotation(s) with a box under 1 px wide or high (inside the image) are left out "
                           "of the training targets (still in the evaluation ground truth); ids: %s%s", f,
                           len(degenerate), degenerate[:10], " ..." if len(degenerate) > 10 else "")
        gt = {"images": [dict(self.images[i]) for i in self.image_ids], "annotations": gt_anns,
              "categories": [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]}
        return gt, train

    @staticmethod
    def _rle(seg: Any, img: Dict[str, Any], bbox: Sequence[float]) -> Any:
        mu = _mask_utils()
        h, w = img["height"], img["width"]
        if isinstance(seg, list):
            return mu.merge(mu.frPyObjects(seg, h, w))
        if isinstance(seg["counts"], list):
            return mu.frPyObjects(seg, h, w)
        return {"size": seg["size"], "counts": seg["counts"].encode("ascii")}

    def _path(self, i: int) -> str:
        return str(self.root / self.images[self.image_ids[i]]["file_name"])

    def load_image(self, i: int) -> np.ndarray:
        """The uint8 RGB image of sample ``i``, checked against the json's width and height."""
        info = self.images[self.image_ids[i]]
        image = np.asarray(load_image(self._path(i)))
        if image.shape[:2] != (info["height"], info["width"]):
            raise DataError(f"image {self._path(i)} is {image.shape[1]}x{image.shape[0]} (WxH) but {self.ann_file} "
                            f"says {info['width']}x{info['height']}; fix the json's width/height (or the image)")
        return image

    def load_raw(self, i: int) -> Tuple[np.ndarray, NpTarget]:
        image = self.load_image(i)
        h, w = image.shape[:2]
        anns = self._train[i]
        if not anns:
            return image, _empty_target(h, w)
        masks = np.stack([_decode(a["seg"], h, w, a["box"], f"{self.ann_file} {a['where']}") for a in anns])
        return image, {"boxes": np.array([a["box"] for a in anns], np.float32).reshape(-1, 4),
                       "labels": np.array([a["label"] for a in anns], np.int64),
                       "masks": masks, "area": np.array([a["area"] for a in anns], np.float32),
                       "iscrowd": np.zeros(len(anns), np.int64)}


# ----------------------------------------------------------------------------------------------
# the built-in objects


class DigitObjects(_DetectionBase):
    """The built-in detection / instance-segmentation set: each digit of a
    :class:`~hymamba.data.segmentation.DigitScenes` scene is one instance.

    Label ``1 + d`` for digit ``d`` (classes ``"0"``..``"9"``, ``num_classes`` 11); the mask is the
    digit's ink pixels (the scene mask's ``1 + d`` inside its square; digits never overlap); the box
    is the tight box of the ink (pixel edges), not the pasted square; ``area`` the ink pixel count.
    Scene ``i`` has COCO image id ``i + 1``. A scene may, rarely, hold no digit (empty target).
    ``coco_gt`` (built on first use, from all ``n`` scenes) has RLE segmentations (str counts).

    Args:
        split, size, n: as :class:`~hymamba.data.segmentation.DigitScenes`.
        transform, seed: as :class:`CocoDetection`.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train", size: int = 128, n: Optional[int] = None,
                 transform: Optional[Callable] = None, seed: int = 0) -> None:
        from hymamba.data.segmentation import DigitScenes

        super().__init__(transform, False, seed)
        self.scenes = DigitScenes(split, size, n)
        self.split, self.size = split, self.scenes.size
        self.image_ids = [i + 1 for i in range(len(self.scenes))]
        self.root = f"digit-objects:{split}"
        self._gt: Optional[Dict[str, Any]] = None

    def load_image(self, i: int) -> np.ndarray:
        return self.scenes.scene(i)["image"]

    def load_raw(self, i: int) -> Tuple[np.ndarray, NpTarget]:
        s = self.scenes.scene(i)
        image, scene_mask = s["image"], s["mask"]
        h, w = scene_mask.shape
        out = _empty_target(h, w)
        boxes, labels, masks = [], [], []
        for _k, d, top, left, side in s["digits"]:
            ink = scene_mask[top:top + side, left:left + side] == 1 + d
            ys, xs = np.nonzero(ink)
            if len(ys) == 0:
                continue
            m = np.zeros((h, w), np.uint8)
            m[top:top + side, left:left + side] = ink
            masks.append(m)
            boxes.append([left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1])
            labels.append(1 + d)
        if masks:
            mm = np.stack(masks)
            out = {"boxes": np.array(boxes, np.float32), "labels": np.array(labels, np.int64), "masks": mm,
                   "area": mm.reshape(len(mm), -1).sum(1).astype(np.float32), "iscrowd": np.zeros(len(mm), np.int64)}
        return image, out

    @property
    def coco_gt(self) -> Dict[str, Any]:
        """COCO-format ground truth of every scene (contiguous category ids 1..10, RLE segmentations)."""
        if self._gt is None:
            anns: List[Dict[str, Any]] = []
            for i, img_id in enumerate(self.image_ids):
                _, t = self.load_raw(i)
                anns.extend(_gt_annotations(t, img_id, len(anns) + 1))
            self._gt = {"images": [{"id": img_id, "file_name": f"{img_id}.png", "width": self.size,
                                    "height": self.size} for img_id in self.image_ids],
                        "annotations": anns,
                        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]}
        return self._gt


def _gt_annotations(target: NpTarget, image_id: int, first_id: int) -> List[Dict[str, Any]]:
    """COCO annotations (RLE segmentations) of a numpy target, ids from ``first_id``."""
    anns = []
    for n in range(len(target["labels"])):
        x0, y0, x1, y1 = (float(v) for v in target["boxes"][n])
        anns.append({"id": first_id + n, "image_id": int(image_id), "category_id": int(target["labels"][n]),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(target["area"][n]),
                     "iscrowd": int(target["iscrowd"][n]), "segmentation": encode_mask(target["masks"][n])})
    return anns


# ----------------------------------------------------------------------------------------------
# writing and batching


def write_coco(dataset: _DetectionBase, folder: str | os.PathLike, limit: Optional[int] = None) -> Path:
    """Write ``dataset`` (a :class:`CocoDetection` or :class:`DigitObjects`) as a COCO folder.

    ``folder/images/<image id>.png`` (lossless, no transform) and ``folder/annotations.json``
    (``info``, ``images``, ``annotations`` from ``dataset.coco_gt``: category ids 1..K, crowd and
    all; ``categories``), each written atomically. ``limit``: only the first ``limit`` samples.
    An unreadable image is left out (with its annotations) and logged. Read it back with
    ``CocoDetection(folder / "images", folder / "annotations.json")``.

    Returns:
        the path of ``annotations.json``.
    """
    from PIL import Image

    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    gt = dataset.coco_gt
    count = len(dataset) if limit is None else min(int(limit), len(dataset))
    written = []
    for i in range(count):
        img_id = dataset.image_ids[i]
        try:
            image = dataset.load_image(i)
        except UNREADABLE as e:
            if isinstance(e, DataError):
                raise
            logger.warning("write_coco: %s is unreadable and left out (%s: %s)", dataset._path(i), type(e).__name__, e)
            continue
        name = f"{img_id}.png"
        atomic_write(out / "images" / name, lambda tmp, a=image: Image.fromarray(a).save(tmp, format="PNG"))
        written.append({"id": img_id, "file_name": name, "width": int(image.shape[1]), "height": int(image.shape[0])})
    kept = {img["id"] for img in written}
    doc = {"info": {"description": f"written by hymamba from {dataset.root}"},
           "images": written,
           "annotations": [a for a in gt["annotations"] if a["image_id"] in kept],
           "categories": [dict(c) for c in gt["categories"]]}
    return write_json_atomic(out / "annotations.json", doc)


def collate_detection(samples: Sequence[DetSample]) -> Tuple[List[torch.Tensor], List[Dict[str, Any]], List[str]]:
    """A batch as torchvision's detectors take it: ``(images, targets, unreadable paths)``, the lists
    of the readable samples only (images keep their own sizes; the model resizes and pads)."""
    bad = [p for _, _, paths in samples for p in paths]
    good = [(x, y) for x, y, _ in samples if x is not None and y is not None]
    return [x for x, _ in good], [y for _, y in good], bad


#: the built-in data set's name on the command line
DIGIT_OBJECTS_NAME = "digitobjects"
#: COCO's own layout: <root>/<split>/ images and <root>/annotations/instances_<split>.json
_COCO_SPLITS = ("train2017", "val2017")


def open_detection_split(data: str | os.PathLike, split: Optional[str], which: str, *, transform: Any = None,
                         substitute_bad: bool = False, seed: int = 0, scene_size: int = 128) -> Tuple[Any, str]:
    """A split of ``data`` and its kind (``"digitobjects"``, ``"coco"`` or ``"coco folder"``).

    ``data``: ``"digitobjects"``; a COCO root (``train2017/``, ``val2017/``,
    ``annotations/instances_<split>.json``); or a folder with one sub-folder per split, each holding
    ``images/`` and ``annotations.json`` (what :func:`hymamba.data.detection.write_coco` writes).
    """
    if str(data) == DIGIT_OBJECTS_NAME:
        return DigitObjects(split or which, scene_size, transform=transform, seed=seed), "digitobjects"
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}. Expected 'digitobjects', a COCO root (train2017/, val2017/, "
                        "annotations/) or a folder with train/ and val/ each holding images/ + annotations.json")
    if (root / "annotations").is_dir() and any((root / s).is_dir() for s in _COCO_SPLITS):
        name = split or _COCO_SPLITS[0 if which == "train" else 1]
        return CocoDetection(root / name, root / "annotations" / f"instances_{name}.json", transform=transform,
                             substitute_bad=substitute_bad, seed=seed), "coco"
    folder = root / (split or which)
    if split is None and not folder.is_dir() and (root / "annotations.json").is_file():
        folder = root  # a single split given directly
    return CocoDetection(folder / "images", folder / "annotations.json", transform=transform,
                         substitute_bad=substitute_bad, seed=seed), "coco folder"


def coco_subset(dataset: Any, limit: Optional[int]) -> Tuple[Any, Dict[str, Any]]:
    """``limit`` images spread over ``dataset`` (all of them for None) and its ``coco_gt`` restricted to
    those images: what the training run's validation and ``hymamba detect eval --max-samples`` score."""
    from hymamba.data.segmentation import spread_subset

    sub = spread_subset(dataset, limit)
    gt = dataset.coco_gt
    if sub is dataset:
        return sub, gt
    keep = {dataset.image_ids[i] for i in sub.indices}
    return sub, {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
                 "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
