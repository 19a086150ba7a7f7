"""Segmentation data sets: ADE20K, a plain image/mask folder pair and the built-in digit scenes.

- :class:`ADE20KDataset`: ``ROOT/images/<split>/*.jpg`` with ``ROOT/annotations/<split>/*.png``
  (paired by file stem), ``reduce_zero_label`` as mmseg (0 = "other" -> 255, k -> k - 1).
- :class:`MaskFolderDataset`: ``ROOT/images/*`` with index PNGs in ``ROOT/masks/*`` (same stems).
- :class:`DigitScenes`: a small, real, offline data set (see its docstring).

A sample is ``(image float tensor (3, H, W), mask long tensor (H, W), unreadable paths)``; the
transform (``seg_transforms``) gets ``(uint8 RGB array, integer mask, numpy Generator)``, the
generator seeded from ``(seed, epoch, index)`` so every run is reproducible. As the classification
data sets, an unreadable image never stops a job: it is skipped and counted (``None`` for it, or
the next readable one with ``substitute_bad=True``; :func:`~hymamba.data.seg_transforms.collate_segmentation`
leaves the ``None`` out). Masks are read WITHOUT conversion: a palette (``P``), ``L``, ``I;16`` or
``I`` PNG gives its raw indices. Class names: ADE20K's 150 are not shipped; a ``classes.txt`` (one
name per line) in the root is read when present, else ``classes`` is None.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hymamba.data.digits import digit_ink, digit_split, paste_ink, photo_background, sample_photos
from hymamba.data.images import IMG_EXTENSIONS, load_image, read_or_substitute
from hymamba.data.seg_transforms import IGNORE_INDEX, SegNormalize
from hymamba.errors import DataError

__all__ = ["ADE20KDataset", "DIGIT_SCENES_NAME", "DigitScenes", "MaskFolderDataset", "data_kind", "open_split", "read_mask",
           "reduce_zero_label", "spread_subset"]

SegSample = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], List[str]]
#: the mask modes read as raw indices
_MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")
_MASK_FORMATS = ("PNG", "TIFF", "BMP", "GIF", "PPM")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """An index mask as an int64 (H, W) array of its raw values (palette indices for ``P``).

    An RGB(A) mask is a :class:`DataError` (a colour-coded mask must be converted to indices first);
    an unreadable file raises one of :data:`~hymamba.data.images.UNREADABLE`."""
    with open(path, "rb") as f, Image.open(f, formats=_MASK_FORMATS) as img:
        if img.mode not in _MASK_MODES:
            raise DataError(f"mask {path} has mode {img.mode}; expected a single-channel index image "
                            "(palette/L/I;16 PNG) holding class indices")
        img.load()
        return np.array(img).astype(np.int64)


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    out = mask.astype(np.int64) - 1
    out[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return out


def _read_classes(root: Path, classes: Optional[Sequence[str]]) -> Optional[List[str]]:
    if classes is not None:
        return list(classes)
    f = root / "classes.txt"
    if f.is_file():
        return [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


class _PairDataset(Dataset):
    """Image/mask pairs with the shared reading, unreadable-image policy and per-sample generator."""

    samples: List[Tuple[str, str]]
    root: Path

    def __init__(self, transform: Optional[Callable], reduce_zero: bool, substitute_bad: bool, seed: int) -> None:
        self.transform = transform if transform is not None else SegNormalize()
        self.reduce_zero_label = reduce_zero
        self.substitute_bad = substitute_bad
        self.seed = seed
        self.epoch = 0
        self.ignore_index = IGNORE_INDEX

    def set_epoch(self, epoch: int) -> None:
        """Change the random augmentation of every sample (same epoch, same augmentation)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load_pair(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw uint8 RGB image and the (reduced) int64 mask of sample ``i``."""
        image_path, mask_path = self.samples[i]
        image = np.asarray(load_image(image_path))
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                            f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must be the same size")
        return image, (reduce_zero_label(mask) if self.reduce_zero_label else mask)

    def __getitem__(self, i: int) -> SegSample:
        j, pair, bad = read_or_substitute(i, len(self.samples), self.load_pair, lambda k: self.samples[k][0],
                                          self.substitute_bad, str(self.root))
        if j is None:
            return None, None, bad
        x, y = self.transform(*pair, np.random.default_rng([self.seed, self.epoch, j]))
        return x, y, bad


def _pair(images: Path, masks: Path, what: str) -> List[Tuple[str, str]]:
    if not images.is_dir():
        raise DataError(f"{what}: image folder not found: {images}")
    if not masks.is_dir():
        raise DataError(f"{what}: mask folder not found: {masks}")
    found = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not found:
        raise DataError(f"{what}: {images} holds no images ({', '.join(IMG_EXTENSIONS)})")
    by_stem: Dict[str, Path] = {}
    for p in masks.iterdir():
        if p.is_file() and p.suffix.lower() in (".png", ".tif", ".tiff", ".bmp"):
            by_stem.setdefault(p.stem, p)
    samples = []
    for img in found:
        m = by_stem.get(img.stem)
        if m is None:
            raise DataError(f"{what}: image {img} has no mask {masks / (img.stem + '.png')}; every image needs "
                            "an index PNG of the same name")
        samples.append((str(img), str(m)))
    return samples


class ADE20KDataset(_PairDataset):
    """ADE20K (mmseg layout): ``root/images/<split>/*.jpg`` + ``root/annotations/<split>/*.png``.

    Args:
        root: the ADEChallengeData2016 folder.
        split: ``"training"`` or ``"validation"``.
        reduce_zero_label: ADE20K's 0 ("other") -> 255 and 1..150 -> 0..149 (mmseg's setting).
        transform: ``(image, mask, rng) -> (tensor, tensor)``; default: normalise only.
        classes: class names (default: ``root/classes.txt`` if present, else None).
        substitute_bad: on an unreadable image return the next readable one (training) instead of None.
        seed: seeds each sample's augmentation with ``(seed, epoch, index)``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", reduce_zero_label: bool = True,
                 transform: Optional[Callable] = None, classes: Optional[Sequence[str]] = None,
                 substitute_bad: bool = False, seed: int = 0) -> None:
        if split not in ("training", "validation"):
            raise DataError(f"ADE20K has splits 'training' and 'validation', got {split!r}")
        super().__init__(transform, reduce_zero_label, substitute_bad, seed)
        self.root = Path(root)
        self.split = split
        self.samples = _pair(self.root / "images" / split, self.root / "annotations" / split, f"ADE20K {split}")
        self.classes = _read_classes(self.root, classes)


class MaskFolderDataset(_PairDataset):
    """``root/images/*`` with index-PNG masks ``root/masks/<same stem>.png``; 255 is ignored.

    Arguments as :class:`ADE20KDataset` (``reduce_zero_label`` off by default)."""

    def __init__(self, root: str | os.PathLike, reduce_zero_label: bool = False, transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None, substitute_bad: bool = False, seed: int = 0) -> None:
        super().__init__(transform, reduce_zero_label, substitute_bad, seed)
        self.root = Path(root)
        self.samples = _pair(self.root / "images", self.root / "masks", "mask folder")
        self.classes = _read_classes(self.root, classes)


# ----------------------------------------------------------------------------------------------
# the built-in digit scenes

_SCENE_SEEDS = {"train": 20261202, "val": 31415926}
_SCENE_DEFAULT_N = {"train": 1000, "val": 200}


class DigitScenes(Dataset):
    """Built-in segmentation scenes made from real images that installed packages ship (offline).

    What it is: each scene is a ``size`` x ``size`` random crop (resized bilinearly) of one of
    scikit-learn's two sample photographs (``load_sample_images()``: china.jpg and flower.jpg), with
    2 to 5 of scikit-learn's real handwritten digit scans (``load_digits``, 8x8) upscaled bicubically
    to 20-45% of ``size`` and pasted at random, non-overlapping places in one solid ink colour that
    contrasts with the photo there. Ink is the upscaled scan at or above 128 (of 255), so the labels
    are exact: class 0 = background (the photo), class ``1 + d`` = digit ``d`` (11 classes); a
    pasted digit's labelled pixels are exactly its ink pixels.

    Splits: ``"train"`` and ``"val"`` use the digits data set's own stratified train/val split (so
    no scan is in both), background crops from disjoint column ranges of the photos (train: columns
    0-383, val: 384-639) and different fixed seeds; scene ``i`` of a split is the same on every
    machine. Scenes are generated on access (cheap); ``transform`` and ``seed`` as in
    :class:`ADE20KDataset` (augmentation seeded with ``(seed, epoch, index)``).
    """

    num_classes = 11
    classes = ["background"] + [f"digit {d}" for d in range(10)]
    #: digits pasted per scene (inclusive range) and their side as a fraction of the scene's
    digits_per_scene = (2, 5)
    digit_scale = (0.2, 0.45)

    def __init__(self, split: str = "train", size: int = 128, n: Optional[int] = None,
                 transform: Optional[Callable] = None, seed: int = 0) -> None:
        if split not in _SCENE_SEEDS:
            raise DataError(f"DigitScenes has splits 'train' and 'val', got {split!r}")
        if size < 32:
            raise DataError(f"DigitScenes needs size >= 32, got {size}")
        self.split, self.size = split, int(size)
        self.n = _SCENE_DEFAULT_N[split] if n is None else int(n)
        self.scans, self.digits, self.digit_ids = digit_split(split)
        self.photos = sample_photos()
        self.transform = transform if transform is not None else SegNormalize()
        self.seed, self.epoch = seed, 0
        self.ignore_index = IGNORE_INDEX
        self.root = f"digit-scenes:{split}"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Dict[str, object]:
        """Scene ``i`` before any transform: ``image`` (uint8 RGB), ``mask`` (int64), ``digits``: one
        ``(scan index in this split, digit, top, left, side)`` per pasted digit."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([_SCENE_SEEDS[self.split], i])
        image = photo_background(self.photos, self.split, self.size, rng)
        mask = np.zeros((self.size, self.size), dtype=np.int64)
        taken = np.zeros_like(mask, dtype=bool)
        placed = []
        for _ in range(int(rng.integers(self.digits_per_scene[0], self.digits_per_scene[1] + 1))):
            k = int(rng.integers(len(self.digits)))
            side = int(rng.integers(round(self.digit_scale[0] * self.size), round(self.digit_scale[1] * self.size) + 1))
            for _ in range(30):
                top, left = (int(v) for v in rng.integers(0, self.size - side + 1, size=2))
                if not taken[max(top - 1, 0):top + side + 1, max(left - 1, 0):left + side + 1].any():
                    break
            else:
                continue
            ink = digit_ink(self.scans[k], side)
            paste_ink(image, ink, top, left, rng)
            mask[top:top + side, left:left + side][ink] = 1 + int(self.digits[k])
            taken[top:top + side, left:left + side] = True
            placed.append((k, int(self.digits[k]), top, left, side))
        return {"image": image, "mask": mask, "digits": placed}

    def __getitem__(self, i: int) -> SegSample:
        s = self.scene(i)
        x, y = self.transform(s["image"], s["mask"], np.random.default_rng([self.seed, self.epoch, i]))
        return x, y, []


# ----------------------------------------------------------------------------------------------
# one way to open a split, for training, evaluation and the command line

#: the built-in data set's name on the command line
DIGIT_SCENES_NAME = "digitscenes"
#: default split names per layout: (train, val)
_SPLITS = {"ade20k": ("training", "validation"), "mask folder": ("train", "val"), "digitscenes": ("train", "val")}


def data_kind(data: str | os.PathLike) -> str:
    """``"digitscenes"``, ``"ade20k"`` (``images/`` + ``annotations/``) or ``"mask folder"``.

    Raises:
        DataError: ``data`` is neither the built-in name nor a folder."""
    if str(data) == DIGIT_SCENES_NAME:
        return "digitscenes"
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}. Expected 'digitscenes', an ADE20K root (images/ and "
                        "annotations/) or a folder with train/ and val/ holding images/ + masks/")
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return "ade20k"
    return "mask folder"


def open_split(data: str | os.PathLike, split: Optional[str], which: str = "val", *,
               reduce_zero: Optional[bool] = None, transform: Optional[Callable] = None,
               substitute_bad: bool = False, seed: int = 0, scene_size: int = 64) -> Tuple[Dataset, str, bool]:
    """A split of ``data`` (see :func:`data_kind`) and how it was read.

    Args:
        split: the split's name; None: the layout's default for ``which`` (``"train"``/``"val"``):
            ADE20K ``training``/``validation``, a mask folder ``train``/``val`` (or the folder itself
            when it holds ``images/`` + ``masks/`` directly), the scenes ``train``/``val``.
        reduce_zero: mmseg's ``reduce_zero_label`` (None: on for ADE20K, off otherwise).
    Returns:
        ``(dataset, kind, reduce_zero)``.
    """
    kind = data_kind(data)
    name = split or _SPLITS[kind][0 if which == "train" else 1]
    if kind == "digitscenes":
        return DigitScenes(name, scene_size, transform=transform, seed=seed), kind, False
    root = Path(data).expanduser()
    if kind == "ade20k":
        reduce = True if reduce_zero is None else bool(reduce_zero)
        return ADE20KDataset(root, name, reduce, transform, substitute_bad=substitute_bad, seed=seed), kind, reduce
    reduce = bool(reduce_zero)
    folder = root / name
    if split is None and not folder.is_dir() and (root / "images").is_dir() and (root / "masks").is_dir():
        folder = root  # a single split given directly
    ds = MaskFolderDataset(folder, reduce, transform, substitute_bad=substitute_bad, seed=seed)
    if ds.classes is None and folder != root:
        ds.classes = _read_classes(root, None)  # classes.txt at the data root serves every split
    return ds, kind, reduce


def spread_subset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """``limit`` samples spread evenly over ``dataset`` (all of it when None or larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = np.linspace(0, len(dataset) - 1, limit).round().astype(int).tolist()
    return torch.utils.data.Subset(dataset, keep)
