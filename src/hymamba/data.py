"""Datasets, samplers and transforms for training and evaluation.

Two sources of images:

- :class:`ImageFolderDataset`: ``ROOT/<split>/<class>/**/<image>``, one subfolder per class (the
  ImageNet layout). An unreadable or corrupt image never stops a job: it is skipped with a
  warning and counted (see :func:`collate_batch`).
- :class:`DigitsDataset`: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes),
  split once into train/val (stratified, fixed seed), upscaled to the model's input size and made
  3-channel; the built-in job that trains in minutes on a laptop CPU.

Transforms come from timm (:func:`timm.data.create_transform`), so evaluation preprocessing is
exactly what timm's and the official validation scripts do for the same data config.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

__all__ = [
    "DIGITS",
    "IMG_EXTENSIONS",
    "DigitsDataset",
    "EpochSampler",
    "ImageFolderDataset",
    "ShardSampler",
    "collate_batch",
    "eval_transform",
    "train_transform",
]

logger = logging.getLogger(__name__)

#: the name that selects the built-in digits data set instead of a folder
DIGITS = "digits"
#: file suffixes read as images (case-insensitive)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

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
            raise ValueError(f"dataset folder not found: {self.root}. Expected a folder with one subfolder "
                             "per class holding its images; check the path (and --train-split/--val-split)")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise ValueError(f"{self.root} has no class subfolders. Expected {self.root}/<class>/<image>, "
                             "one subfolder per class")
        if class_names is None:
            class_names = found
        else:
            unknown = sorted(set(found) - set(class_names))
            if unknown:
                raise ValueError(f"{self.root} has classes the training split does not have: {unknown[:10]}. "
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
            raise ValueError(f"{self.root} holds no images ({', '.join(IMG_EXTENSIONS)}) in its "
                             f"{len(found)} class folders; add images or point to the right folder")
        self.transform = transform
        self.substitute_bad = substitute_bad

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> torch.Tensor:
        path = self.samples[i][0]
        with Image.open(path) as img:
            img = img.convert("RGB")
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, i: int) -> Sample:
        bad: List[str] = []
        for attempt in range(len(self.samples)):
            j = (i + attempt) % len(self.samples)
            try:
                return self._load(j), self.samples[j][1], bad
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                bad.append(f"{self.samples[j][0]} ({type(e).__name__}: {e})")
                if not self.substitute_bad:
                    return None, self.samples[i][1], bad
        raise RuntimeError(f"no image under {self.root} could be read; first failures: {bad[:3]}")


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as RGB images of ``image_size`` (train or val split).

    The 8x8 scans (values 0-16) are scaled to 0-255, upscaled bicubically to ``image_size`` and
    repeated to 3 channels; the split is stratified with a fixed seed, the same on every machine.
    """

    def __init__(self, split: str, image_size: int, transform: Optional[Callable] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"the digits data set has splits 'train' and 'val', got {split!r}")
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


# ----------------------------------------------------------------------------------------------
# samplers


class EpochSampler(Sampler[int]):
    """Training order: a permutation seeded by (seed, epoch), sharded over ranks.

    Like :class:`torch.utils.data.DistributedSampler` (the shards are disjoint and equally long,
    padded by wrapping around), but usable without a process group and able to skip the samples
    already consumed in an interrupted epoch, so a resumed run sees the same order.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.size, self.num_replicas, self.rank, self.seed, self.shuffle = size, num_replicas, rank, seed, shuffle
        self.per_rank = math.ceil(size / num_replicas)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the order of ``epoch`` and leave out this rank's first ``skip`` samples."""
        self.epoch, self.skip = epoch, skip

    def shard(self) -> List[int]:
        """This rank's indices for the current epoch (before skipping)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / max(1, self.size)))[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip


class ShardSampler(Sampler[int]):
    """Evaluation order: every sample exactly once over all ranks (rank r takes r, r+W, ...)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------------------------
# transforms


def train_transform(data_config: Dict[str, Any], *, scale: Sequence[float], ratio: Sequence[float],
                    hflip: float, vflip: float, color_jitter: float, auto_augment: Optional[str],
                    interpolation: str, reprob: float, remode: str, recount: int) -> Callable:
    """timm's training pipeline: random-resized crop, flips, color jitter, RandAugment, random erasing."""
    from timm.data import create_transform

    try:
        _check_rand_augment(auto_augment)
        return create_transform(
            data_config["input_size"], is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
            vflip=vflip, color_jitter=color_jitter, auto_augment=auto_augment or None,
            interpolation=interpolation, mean=data_config["mean"], std=data_config["std"],
            re_prob=reprob, re_mode=remode, re_count=recount,
        )
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"invalid augmentation settings (aa={auto_augment!r}, remode={remode!r}, "
                         f"interpolation={interpolation!r}): {e or type(e).__name__}. Use timm's syntax, "
                         "e.g. aa 'rand-m9-mstd0.5-inc1', remode 'pixel', interpolation 'random'") from None


def _check_rand_augment(policy: Optional[str]) -> None:
    """timm silently ignores RandAugment sections it cannot parse; reject them instead."""
    if not policy or not policy.startswith("rand"):
        return
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"a RandAugment policy starts with 'rand-', got {policy!r}")
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d.*)", part)
        if not part.startswith("t") and m is None:
            raise ValueError(f"unknown RandAugment section {part!r} (known: m<magnitude>, n<ops>, mstd<std>, "
                             "mmax<max>, inc<0|1>, p<prob>, t<ops>)")


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """timm's evaluation pipeline: resize by crop_pct, center crop or squash, normalise."""
    from timm.data import create_transform

    return create_transform(
        data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
    )
