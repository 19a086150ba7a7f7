"""Classification datasets: image folders and the built-in digits.

Two sources of images:

- :class:`ImageFolderDataset`: ``ROOT/<split>/<class>/**/<image>``, one subfolder per class (the
  ImageNet layout). An unreadable or corrupt image never stops a job: it is skipped with a
  warning and counted (see :func:`collate_batch`).
- :class:`DigitsDataset`: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes),
  split once into train/val (stratified, fixed seed), upscaled to the model's input size and made
  3-channel; the built-in job that trains in minutes on a laptop CPU.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hymamba.data.images import IMG_EXTENSIONS, UNREADABLE, load_image
from hymamba.errors import DataError

__all__ = ["DIGITS", "DigitsDataset", "ImageFolderDataset", "collate_batch", "subset", "warn_unreadable"]

logger = logging.getLogger(__name__)

#: the name that selects the built-in digits data set instead of a folder
DIGITS = "digits"

#: the digits split: stratified, 20% validation, fixed seed (independent of the training seed)
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0

# A sample is (image tensor or None, target, paths of images that could not be read).
Sample = Tuple[Optional[torch.Tensor], int, List[str]]


# ----------------------------------------------------------------------------------------------
# datasets


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/...``; class indices follow the sorted folder names.

    Args:
        root: the split folder (e.g. ``data/train``).
        transform: PIL image -> tensor.
        class_names: class order to use (e.g. the training split's); folders not in it are an error.
        substitute_bad: on an unreadable image, return the next readable one instead (training:
            keeps batches full, so distributed ranks stay in step); otherwise return None for it
            (evaluation: the image is left out, never counted twice).
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None, substitute_bad: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset folder not found: {self.root}. Expected a folder with one subfolder "
                             "per class holding its images; check the path (and --train-split/--val-split)")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise DataError(f"{self.root} has no class subfolders. Expected {self.root}/<class>/<image>, "
                             "one subfolder per class")
        if class_names is None:
            class_names = found
        else:
            unknown = sorted(set(found) - set(class_names))
            if unknown:
                raise DataError(f"{self.root} has classes the training split does not have: {unknown[:10]}. "
                                 f"Known classes: {list(class_names)[:10]}{' ...' if len(class_names) > 10 else ''}; "
                                 "make both splits use the same class folders")
        self.class_names = list(class_names)
        index = {name: i for i, name in enumerate(self.class_names)}
        self.samples: List[Tuple[str, int]] = []
        for name in found:
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), index[name]))
        if not self.samples:
            raise DataError(f"{self.root} holds no images ({', '.join(IMG_EXTENSIONS)}) in its "
                             f"{len(found)} class folders; add images or point to the right folder")
        self.transform = transform
        self.substitute_bad = substitute_bad

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> torch.Tensor:
        img = load_image(self.samples[i][0])
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, i: int) -> Sample:
        bad: List[str] = []
        for attempt in range(len(self.samples)):
            j = (i + attempt) % len(self.samples)
            try:
                return self._load(j), self.samples[j][1], bad
            except UNREADABLE as e:
                bad.append(f"{self.samples[j][0]} ({type(e).__name__}: {e})")
                if not self.substitute_bad:
                    return None, self.samples[i][1], bad
        raise DataError(f"no image under {self.root} could be read; first failures: {bad[:3]}")


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as RGB images of ``image_size`` (train or val split).

    The 8x8 scans (values 0-16) are scaled to 0-255, upscaled bicubically to ``image_size`` and
    repeated to 3 channels; the split is stratified with a fixed seed, the same on every machine.
    """

    def __init__(self, split: str, image_size: int, transform: Optional[Callable] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise DataError(f"the digits data set has splits 'train' and 'val', got {split!r}")
        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(idx, test_size=_DIGITS_VAL_FRACTION, stratify=digits.target,
                                              random_state=_DIGITS_SPLIT_SEED)
        keep = np.sort(train_idx if split == "train" else val_idx)
        scans = np.clip(digits.images[keep] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        self.images = [Image.fromarray(s, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
                       for s in scans]
        self.targets = digits.target[keep].astype(np.int64).tolist()
        self.class_names = [str(c) for c in range(10)]
        self.root = f"{DIGITS}:{split}"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Sample:
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), self.targets[i], []


def collate_batch(samples: Sequence[Sample]) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Stack a batch, leaving out unreadable images; returns (images, targets, unreadable paths)."""
    bad = [p for _, _, paths in samples for p in paths]
    good = [(x, y) for x, y, _ in samples if x is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.long), bad


def warn_unreadable(paths: Sequence[str], seen: set) -> None:
    """Log a warning once per unreadable image and remember it in ``seen``."""
    for p in paths:
        if p not in seen:
            seen.add(p)
            logger.warning("skipped an unreadable image: %s", p)


def subset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """``limit`` samples spread evenly over ``dataset`` (all of it when None or larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = np.linspace(0, len(dataset) - 1, limit).round().astype(int).tolist()
    sub = torch.utils.data.Subset(dataset, keep)
    sub.class_names = dataset.class_names  # type: ignore[attr-defined]
    sub.root = dataset.root  # type: ignore[attr-defined]
    return sub
