"""The material every built-in data set is made of, offline: scikit-learn's real handwritten digit
scans and its two sample photographs.

- :func:`digit_split`: the 1,797 8x8 scans (``load_digits``), split once into train/val (stratified,
  20% validation, a fixed seed: the same on every machine), scaled to 0..255. Every built-in set uses
  this split, so no scan is ever in a training and a validation set.
- :func:`digit_ink`: a scan upscaled bicubically, thresholded into its ink mask.
- :func:`photo_background`: a random square crop of one of the photographs (``load_sample_images``:
  china.jpg and flower.jpg, 427 x 640), resized; train and val crop disjoint column ranges.
- :func:`paste_ink`: ink pasted in one solid colour that contrasts with the photo under it.

Used by :class:`~hymamba.data.datasets.DigitsDataset`, :class:`~hymamba.data.datasets.DigitPairs`,
:class:`~hymamba.data.segmentation.DigitScenes` and (through it)
:class:`~hymamba.data.detection.DigitObjects`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import numpy as np
from PIL import Image

from hymamba.errors import DataError

__all__ = ["INK_THRESHOLD", "PHOTO_COLUMNS", "digit_ink", "digit_split", "paste_ink", "photo_background",
           "sample_photos"]

#: the digits split: stratified, 20% validation, fixed seed (independent of any training seed)
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0
#: photo columns each split's backgrounds come from (both photos are 427 x 640): disjoint regions
PHOTO_COLUMNS = {"train": (0, 384), "val": (384, 640)}
#: ink threshold on the 0..255 upscaled scan
INK_THRESHOLD = 128


def digit_split(split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scans 0..255 uint8 (N, 8, 8), digits (N,), indices into ``load_digits`` (N,)) of ``split``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise DataError(f"the built-in digits have splits 'train' and 'val', got {split!r}")
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(idx, test_size=_VAL_FRACTION, stratify=digits.target,
                                          random_state=_SPLIT_SEED)
    keep = np.sort(train_idx if split == "train" else val_idx)
    scans = np.clip(digits.images[keep] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return scans, digits.target[keep].astype(np.int64), keep


def digit_ink(scan: np.ndarray, side: int) -> np.ndarray:
    """The boolean ink mask of an 8x8 scan (0..255) upscaled bicubically to ``side`` x ``side``."""
    up = np.asarray(Image.fromarray(scan, mode="L").resize((side, side), Image.BICUBIC))
    return up >= INK_THRESHOLD


@lru_cache(maxsize=1)
def _photos() -> Tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(p) for p in load_sample_images().images)


def sample_photos() -> List[np.ndarray]:
    """scikit-learn's two sample photographs (uint8 RGB, 427 x 640), read once per process."""
    return list(_photos())


def photo_background(photos: List[np.ndarray], split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` uint8 RGB background: a random square crop of one photo (from ``split``'s
    columns), at least ``size`` wide, resized bilinearly. Draws 4 numbers from ``rng``."""
    photo = photos[int(rng.integers(len(photos)))]
    c0, c1 = PHOTO_COLUMNS[split]
    largest = min(photo.shape[0], c1 - c0)
    side = int(rng.integers(min(size, largest), largest + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = c0 + int(rng.integers(0, c1 - c0 - side + 1))
    crop = photo[top:top + side, left:left + side]
    return np.array(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


def paste_ink(image: np.ndarray, ink: np.ndarray, top: int, left: int, rng: np.random.Generator) -> None:
    """Paint ``ink`` (a boolean square) into ``image`` at (top, left), in place, in one solid colour:
    dark (0..69 per channel) on a bright region, bright (185..255) on a dark one."""
    side = ink.shape[0]
    region = image[top:top + side, left:left + side]
    bright = region.astype(np.float64).mean() > 127
    colour = rng.integers(0, 70, size=3) if bright else rng.integers(185, 256, size=3)
    region[ink] = colour.astype(np.uint8)
