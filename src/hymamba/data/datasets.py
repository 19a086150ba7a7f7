"""Classification datasets: image folders and the built-in digit sets.

Three sources of images:

- :class:`ImageFolderDataset`: ``ROOT/<split>/<class>/**/<image>``, one subfolder per class (the
  ImageNet layout). An unreadable or corrupt image never stops a job: it is skipped with a
  warning and counted (see :func:`collate_batch`).
- :class:`DigitsDataset`: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes),
  split once into train/val (stratified, fixed seed), upscaled to the model's input size and made
  3-channel; the built-in job that trains in minutes on a laptop CPU.
- :class:`CuedDigits`: two digits far apart on a photo and a coloured cue between them saying which
  one is the label; a task that needs global context (the ablation studies' task).

:func:`builtin_dataset` opens a built-in set by its name (:data:`BUILTIN`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hymamba.data.digits import digit_ink, digit_split, paste_ink, photo_background, sample_photos
from hymamba.data.images import IMG_EXTENSIONS, UNREADABLE, load_image
from hymamba.errors import DataError

__all__ = ["BUILTIN", "CUED_DIGITS", "DIGITS", "CuedDigits", "DigitsDataset", "ImageFolderDataset", "builtin_dataset",
           "collate_batch", "subset", "warn_unreadable"]

logger = logging.getLogger(__name__)

#: the name that selects the built-in digits data set instead of a folder
DIGITS = "digits"
#: the name that selects the built-in cued-digits data set
CUED_DIGITS = "cued-digits"
#: every built-in classification data set's name
BUILTIN = (DIGITS, CUED_DIGITS)

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
        scans, digits, _ = digit_split(split)
        self.images = [Image.fromarray(s, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
                       for s in scans]
        self.targets = digits.tolist()
        self.class_names = [str(c) for c in range(10)]
        self.root = f"{DIGITS}:{split}"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Sample:
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), self.targets[i], []


class CuedDigits(Dataset):
    """Two digits far apart and a coloured cue between them: the label is the digit the cue points to.

    What a scene is: a ``size`` x ``size`` crop of one of scikit-learn's two sample photographs (as
    :class:`~hymamba.data.segmentation.DigitScenes`) with two real handwritten scans pasted in solid,
    contrasting colours: one near the left edge (its left side within ``size / 8`` of it), one near
    the right edge, each 30-40% of ``size`` high at a random height, of independent, uniformly drawn
    classes. A small square cue (``size / 10``) at a random height on the vertical centre line is red
    or blue with equal chance: **red means the label is the left digit, blue the right one** (10
    classes, "0".."9"). The cue is painted last (it may cover a corner of a digit's square).

    Why: the answer needs two things that are far apart, the cue's colour and the digit on the side it
    names; neither alone says more than chance about it (the other digit is an independent draw). A
    model that only recognises digits locally and averages its features gets at most about 55%
    (the two digits' classes, without knowing which); telling them apart needs information to travel
    across the image, which is what the token mixers and attention do. (The plain digits task is
    solved by local features alone, so every variant reaches 98-99% on it.)

    Splits: ``"train"`` uses the digits data set's training scans and photo columns 0-383, ``"val"``
    the validation scans and columns 384-639 (nothing shared). Validation scenes are fixed (scene
    ``i`` is the same on every machine); training scenes are fresh every epoch (scene ``i`` of
    epoch ``e`` is drawn from the seed ``(e, i)``; :meth:`set_epoch`), so a model cannot memorise
    them. Do not mirror the scenes (``hflip``): a mirrored scene's cue points to the other digit.

    Args:
        split: ``"train"`` or ``"val"``.
        size: the scene side in pixels (at least 32).
        n: scenes per epoch (default 6,000 train, 2,000 val).
        transform: PIL image -> tensor.
    """

    classes = [str(d) for d in range(10)]
    _SEEDS = {"train": 2026_1202_1, "val": 2026_1202_2}
    _DEFAULT_N = {"train": 6000, "val": 2000}

    def __init__(self, split: str, size: int = 64, n: Optional[int] = None,
                 transform: Optional[Callable] = None) -> None:
        if split not in self._SEEDS:
            raise DataError(f"the cued-digits data set has splits 'train' and 'val', got {split!r}")
        if size < 32:
            raise DataError(f"the cued-digits scenes need a side of at least 32 pixels, got {size}")
        self.split, self.size = split, int(size)
        self.n = self._DEFAULT_N[split] if n is None else int(n)
        self.scans, self.digits, _ = digit_split(split)
        self.by_class = [np.flatnonzero(self.digits == d) for d in range(10)]
        self.photos = sample_photos()
        self.transform = transform
        self.epoch = 0
        self.class_names = list(self.classes)
        self.root = f"{CUED_DIGITS}:{split}"

    def set_epoch(self, epoch: int) -> None:
        """Training scenes of ``epoch`` (validation scenes never change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Dict[str, Any]:
        """Scene ``i`` (of the current epoch, for training): ``image`` (uint8 RGB), ``label``,
        ``left`` and ``right`` (the two digits), ``cue`` (``"red"``: left, ``"blue"``: right)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        epoch = self.epoch if self.split == "train" else 0
        rng = np.random.default_rng([self._SEEDS[self.split], epoch, i])
        s = self.size
        image = photo_background(self.photos, self.split, s, rng)
        a, b = (int(d) for d in rng.integers(10, size=2))
        side = int(rng.integers(round(0.3 * s), round(0.4 * s) + 1))
        for digit, left in ((a, int(rng.integers(0, s // 8 + 1))), (b, s - side - int(rng.integers(0, s // 8 + 1)))):
            k = int(rng.choice(self.by_class[digit]))
            paste_ink(image, digit_ink(self.scans[k], side), int(rng.integers(0, s - side + 1)), left, rng)
        red = bool(rng.integers(2))
        c = max(2, round(s / 10))
        top = int(rng.integers(0, s - c + 1))
        image[top:top + c, (s - c) // 2:(s - c) // 2 + c] = (230, 30, 30) if red else (30, 30, 230)
        return {"image": image, "label": a if red else b, "left": a, "right": b, "cue": "red" if red else "blue"}

    def __getitem__(self, i: int) -> Sample:
        sc = self.scene(i)
        img = Image.fromarray(sc["image"])
        return (self.transform(img) if self.transform is not None else img), sc["label"], []


def builtin_dataset(name: str, split: str, size: int, transform: Optional[Callable] = None) -> Optional[Dataset]:
    """The built-in data set ``name`` (one of :data:`BUILTIN`) at ``size`` pixels; None for other names."""
    if name == DIGITS:
        return DigitsDataset(split, size, transform)
    if name == CUED_DIGITS:
        return CuedDigits(split, size, transform=transform)
    return None


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
