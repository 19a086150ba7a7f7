"""Data: image folders with bad files, the digits split, the cued digits, samplers, transforms (real files on disk)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolder import CLASSES, make_image_folder

from hymamba.data.datasets import CuedDigits, DigitsDataset, ImageFolderDataset, collate_batch, warn_unreadable
from hymamba.data.digits import digit_split
from hymamba.errors import DataError
from hymamba.data.samplers import EpochSampler, ShardSampler
from hymamba.data.transforms import eval_transform, train_transform

DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   crop_pct=0.875, crop_mode="center")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "train"
    make_image_folder(root, {"apple": 3, "banana": 2, "cherry": 2})
    (root / "banana" / "nested").mkdir()
    make_image_folder(root / "banana" / "nested", {"x": 1}, corrupt=False, classes=("x",))
    return root


def test_image_folder_finds_classes_and_images(folder: Path) -> None:
    ds = ImageFolderDataset(folder, eval_transform(DATA_CONFIG))
    assert ds.class_names == list(CLASSES)
    paths = [Path(p) for p, _ in ds.samples]
    assert all(p.suffix in (".png", ".jpg") for p in paths)  # notes.txt is not an image
    assert sum(1 for _, t in ds.samples if t == 1) == 3  # banana: 2 + 1 in a nested folder
    assert len(ds) == 3 + 2 + 2 + 1 + 2  # + the two corrupt files in apple/


def test_bad_images_are_dropped_for_evaluation_and_replaced_for_training(folder: Path) -> None:
    ev = ImageFolderDataset(folder, eval_transform(DATA_CONFIG))
    bad = [i for i, (p, _) in enumerate(ev.samples) if "zz_" in p]
    assert len(bad) == 2
    x, target, paths = ev[bad[0]]
    assert x is None and target == 0 and len(paths) == 1 and "zz_" in paths[0]
    images, targets, skipped = collate_batch([ev[i] for i in range(len(ev))])
    assert images.shape == (len(ev) - 2, 3, 32, 32) and len(targets) == len(ev) - 2 and len(skipped) == 2

    tr = ImageFolderDataset(folder, eval_transform(DATA_CONFIG), substitute_bad=True)
    x, target, paths = tr[bad[0]]  # the next readable image stands in
    assert x.shape == (3, 32, 32) and len(paths) >= 1
    images, _, skipped = collate_batch([tr[i] for i in range(len(tr))])
    assert images.shape[0] == len(tr) and len(set(skipped)) == 2


def test_unreadable_images_are_warned_once(caplog) -> None:
    seen: set = set()
    with caplog.at_level(logging.WARNING):
        warn_unreadable(["a.jpg (OSError)", "a.jpg (OSError)", "b.png (OSError)"], seen)
        warn_unreadable(["a.jpg (OSError)"], seen)
    assert len(seen) == 2 and caplog.text.count("skipped an unreadable image") == 2


def test_folder_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset folder not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "flat")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path / "empty")
    make_image_folder(tmp_path / "val", {"apple": 1, "durian": 1}, corrupt=False, classes=("apple", "durian"))
    with pytest.raises(ValueError, match="classes the training split does not have: \\['durian'\\]"):
        ImageFolderDataset(tmp_path / "val", class_names=list(CLASSES))


def test_digits_split_is_fixed_stratified_and_upscaled() -> None:
    tr, va = DigitsDataset("train", 64), DigitsDataset("val", 64)
    assert (len(tr), len(va)) == (1437, 360)
    assert tr.class_names == [str(i) for i in range(10)]
    counts = np.bincount(va.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class
    img, target, bad = tr[0]
    assert img.mode == "RGB" and img.size == (64, 64) and bad == []
    arr = np.asarray(img)
    assert arr.max() > 200 and arr.min() < 10 and (arr[..., 0] == arr[..., 2]).all()
    again = DigitsDataset("val", 64)
    assert again.targets == va.targets and np.array_equal(np.asarray(again.images[5]), np.asarray(va.images[5]))
    with pytest.raises(ValueError, match="splits 'train' and 'val'"):
        DigitsDataset("test", 64)


def test_cued_digits_label_is_the_digit_the_cue_names() -> None:
    va = CuedDigits("val", 64)
    assert len(va) == 2000 and va.class_names == [str(i) for i in range(10)]
    red, blue = np.array([230, 30, 30]), np.array([30, 30, 230])
    labels, lefts, rights = [], [], []
    for i in range(len(va)):
        sc = va.scene(i)
        assert sc["label"] == (sc["left"] if sc["cue"] == "red" else sc["right"])
        labels.append(sc["label"]), lefts.append(sc["left"]), rights.append(sc["right"])
        if i < 100:  # the cue is painted: a 6x6 square of its colour on the centre line, nothing of the other
            centre = sc["image"][:, 29:35]
            want, other = (red, blue) if sc["cue"] == "red" else (blue, red)
            assert (centre == want).all(-1).sum() == 36 and not (sc["image"] == other).all(-1).any()
    labels, lefts, rights = np.array(labels), np.array(lefts), np.array(rights)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 150 and counts.max() < 250  # ten balanced classes
    # one side alone says little: the left digit is the label when the cue is red, or by coincidence
    assert 0.5 < (labels == lefts).mean() < 0.6 and 0.5 < (labels == rights).mean() < 0.6
    assert abs(np.corrcoef(lefts, rights)[0, 1]) < 0.1  # the two digits are independent draws
    img, target, bad = va[3]
    assert img.mode == "RGB" and img.size == (64, 64) and target == va.scene(3)["label"] and bad == []


def test_cued_digits_validation_is_fixed_and_training_is_fresh_each_epoch() -> None:
    va, tr = CuedDigits("val", 48), CuedDigits("train", 48, n=10)
    assert np.array_equal(va.scene(5)["image"], CuedDigits("val", 48).scene(5)["image"])
    va.set_epoch(3)
    assert np.array_equal(va.scene(5)["image"], CuedDigits("val", 48).scene(5)["image"])
    first = [tr.scene(i)["image"] for i in range(10)]
    assert np.array_equal(first[4], CuedDigits("train", 48, n=10).scene(4)["image"])  # the same on every machine
    tr.set_epoch(1)
    assert not any(np.array_equal(first[i], tr.scene(i)["image"]) for i in range(10))
    tr.set_epoch(0)
    assert np.array_equal(first[7], tr.scene(7)["image"])
    # the two splits share no scan (the digits split) and draw from disjoint photo columns (data.digits)
    assert not set(digit_split("train")[2]) & set(digit_split("val")[2])
    with pytest.raises(DataError, match="splits 'train' and 'val'"):
        CuedDigits("test")
    with pytest.raises(DataError, match="at least 32"):
        CuedDigits("val", 16)
    with pytest.raises(IndexError):
        tr.scene(10)


def test_epoch_sampler_shards_are_disjoint_and_reproducible() -> None:
    size = 23
    shards = [EpochSampler(size, 2, r, seed=31) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 12  # padded by wrapping to equal length
    assert set(a) | set(b) == set(range(size))
    assert len(set(a) & set(b)) <= 1  # only the one padding sample repeats
    even = [EpochSampler(24, 2, r, seed=31) for r in range(2)]
    assert not set(even[0].shard()) & set(even[1].shard())  # no padding: fully disjoint
    again = EpochSampler(size, 2, 0, seed=31)
    again.set_epoch(3)
    assert list(again) == a
    again.set_epoch(4)
    assert list(again) != a
    again.set_epoch(3, skip=5)
    assert list(again) == a[5:] and len(again) == 7


def test_shard_sampler_partitions_exactly() -> None:
    parts = [list(ShardSampler(11, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_transforms_follow_timm_and_reject_bad_policies() -> None:
    from PIL import Image

    img = Image.new("RGB", (50, 40), (255, 0, 0))
    x = eval_transform(DATA_CONFIG)(img)
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], torch.ones(32, 32))
    kwargs = dict(scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=0.5, vflip=0.0, color_jitter=0.4,
                  interpolation="random", reprob=0.25, remode="pixel", recount=1)
    x = train_transform(DATA_CONFIG, auto_augment="rand-m9-mstd0.5-inc1", **kwargs)(img)
    assert x.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="invalid augmentation settings"):
        train_transform(DATA_CONFIG, auto_augment="rand-banana", **kwargs)
