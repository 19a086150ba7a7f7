"""Segmentation data: ADE20K / mask folders on real files, the transforms, collate, digit scenes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hymamba.data.seg_transforms import (
    IGNORE_INDEX,
    SegEvalTransform,
    SegNormalize,
    SegTrainTransform,
    collate_segmentation,
    crop_with_cat_max_ratio,
    keep_ratio_size,
    photometric_distortion,
)
from hymamba.data.digits import digit_ink
from hymamba.data.segmentation import (
    ADE20KDataset,
    DigitScenes,
    MaskFolderDataset,
    read_mask,
    reduce_zero_label,
)
from hymamba.errors import DataError

#: a colour per class for the colour-derived masks
COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], dtype=np.uint8)


def blocks(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random blocky mask (classes 0..3, 8-pixel cells) and the image painted by it."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 4, size=(h // 8 + 1, w // 8 + 1))
    mask = np.kron(cells, np.ones((8, 8), dtype=np.int64))[:h, :w]
    return COLOURS[mask], mask


def write_palette(path: Path, mask: np.ndarray) -> None:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    img.save(path)


def make_ade(root: Path, split: str = "training", n: int = 3, corrupt: bool = False) -> list[np.ndarray]:
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    masks = []
    for i in range(n):
        h, w = 40 + 8 * i, 56
        image, _ = blocks(h, w, i)
        raw = np.random.default_rng(100 + i).integers(0, 151, size=(h, w))
        raw[0, 0], raw[0, 1], raw[0, 2] = 0, 1, 150
        Image.fromarray(image).save(root / "images" / split / f"ADE_{i:03d}.jpg", quality=95)
        write_palette(root / "annotations" / split / f"ADE_{i:03d}.png", raw)
        masks.append(raw)
    if corrupt:
        (root / "images" / split / "ADE_bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
        write_palette(root / "annotations" / split / "ADE_bad.png", np.zeros((8, 8), dtype=np.int64))
    return masks


# ----------------------------------------------------------------------------------------------
# files


def test_ade20k_reads_with_reduce_zero_label(tmp_path: Path) -> None:
    raws = make_ade(tmp_path)
    ds = ADE20KDataset(tmp_path, "training", transform=SegEvalTransform(scale=None))
    assert len(ds) == 3 and ds.classes is None
    for i, raw in enumerate(raws):
        x, y, bad = ds[i]
        assert bad == [] and x.shape == (3, *raw.shape) and x.dtype == torch.float32 and y.dtype == torch.long
        expected = np.where(raw == 0, 255, raw - 1)
        assert np.array_equal(y.numpy(), expected)
        assert y[0, 0] == 255 and y[0, 1] == 0 and y[0, 2] == 149
    plain = ADE20KDataset(tmp_path, "training", reduce_zero_label=False)
    assert np.array_equal(plain[0][1].numpy(), raws[0])


def test_reduce_zero_label_keeps_ignore() -> None:
    assert reduce_zero_label(np.array([0, 1, 2, 150, 255])).tolist() == [255, 0, 1, 149, 255]


def test_masks_are_read_as_raw_indices(tmp_path: Path) -> None:
    values = np.array([[0, 3, 700], [65535, 12, 1]])
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "m16.png")
    assert np.array_equal(read_mask(tmp_path / "m16.png"), values)
    Image.fromarray(np.array([[0, 7], [200, 255]], dtype=np.uint8), mode="L").save(tmp_path / "l.png")
    assert read_mask(tmp_path / "l.png").tolist() == [[0, 7], [200, 255]]
    write_palette(tmp_path / "p.png", np.array([[5, 9], [0, 150]]))
    assert read_mask(tmp_path / "p.png").tolist() == [[5, 9], [0, 150]]
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png"):
        read_mask(tmp_path / "rgb.png")


def test_ade20k_missing_annotation_is_an_error(tmp_path: Path) -> None:
    make_ade(tmp_path)
    (tmp_path / "annotations" / "training" / "ADE_001.png").unlink()
    with pytest.raises(DataError, match="ADE_001"):
        ADE20KDataset(tmp_path, "training")
    with pytest.raises(DataError, match="splits"):
        ADE20KDataset(tmp_path, "test")
    with pytest.raises(DataError, match="not found"):
        ADE20KDataset(tmp_path, "validation")


def test_mismatched_size_is_an_error(tmp_path: Path) -> None:
    make_ade(tmp_path, n=1)
    write_palette(tmp_path / "annotations" / "training" / "ADE_000.png", np.zeros((10, 10)))
    with pytest.raises(DataError, match="ADE_000"):
        ADE20KDataset(tmp_path, "training")[0]


def test_unreadable_image_is_skipped_and_counted(tmp_path: Path) -> None:
    make_ade(tmp_path, n=2, corrupt=True)
    ds = ADE20KDataset(tmp_path, "training")
    bad_index = [Path(p).stem for p, _ in ds.samples].index("ADE_bad")
    x, y, bad = ds[bad_index]
    assert x is None and y is None and len(bad) == 1 and "ADE_bad.jpg" in bad[0]
    images, masks, paths = collate_segmentation([ds[i] for i in range(len(ds))])
    assert images.shape[0] == 2 and masks.shape[0] == 2 and len(paths) == 1
    sub = ADE20KDataset(tmp_path, "training", substitute_bad=True)
    x, y, bad = sub[bad_index]
    assert x is not None and len(bad) == 1


def test_mask_folder_and_classes_txt(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image, mask = blocks(24, 32, 7)
    mask[0, 0] = 255
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    write_palette(tmp_path / "masks" / "a.png", mask)
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\nyellow\n")
    ds = MaskFolderDataset(tmp_path)
    assert ds.classes == ["red", "green", "blue", "yellow"] and ds.ignore_index == 255
    x, y, _ = ds[0]
    assert np.array_equal(y.numpy(), mask)
    # the image is lossless here: undo the normalisation and the colours come back exactly
    restored = (x * SegNormalize().std + SegNormalize().mean).round().permute(1, 2, 0).numpy()
    assert np.array_equal(restored, image)
    assert MaskFolderDataset(tmp_path, reduce_zero_label=True)[0][1][0, 0] == 255


# ----------------------------------------------------------------------------------------------
# transforms


def _colour_labels(image: np.ndarray) -> np.ndarray:
    """The class whose colour is nearest each pixel."""
    d = ((image[:, :, None, :].astype(np.int64) - COLOURS[None, None].astype(np.int64)) ** 2).sum(-1)
    return d.argmin(-1)


def test_training_transform_keeps_image_and_mask_aligned() -> None:
    image, mask = blocks(96, 160, 1)
    t = SegTrainTransform(crop_size=(64, 64), scale=(256, 96), photometric=False)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        img, m = t.apply(image, mask, rng)
        assert img.shape == (64, 64, 3) and m.shape == (64, 64)
        valid = m != IGNORE_INDEX
        assert (img[~valid] == 0).all()  # padding: 0 in the image, ignore in the mask
        # away from label edges (where the bilinear image blends colours) image and mask agree exactly
        p = np.pad(m, 2, constant_values=-1)  # crop borders: the neighbour is unknown
        interior = valid & np.all([p[2 + dy:2 + dy + 64, 2 + dx:2 + dx + 64] == m
                                   for dy in (-2, 0, 2) for dx in (-2, 0, 2)], axis=0)
        assert interior.sum() > 300
        assert (_colour_labels(img) == m)[interior].all(), seed
        # the same mask mirrored against its image does not (the check has teeth)
        assert (_colour_labels(img) == m[:, ::-1])[interior & interior[:, ::-1]].mean() < 0.8
    # deterministic for a seed, different across seeds
    a = t(image, mask, np.random.default_rng(3))
    b = t(image, mask, np.random.default_rng(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = t(image, mask, np.random.default_rng(4))
    assert not torch.equal(a[1], c[1])
    assert a[0].shape == (3, 64, 64) and a[1].dtype == torch.long


def test_flip_mirrors_both() -> None:
    image, mask = blocks(32, 48, 2)
    t = SegTrainTransform(crop_size=None, ratio_range=None, flip_prob=1.0, photometric=False)
    img, m = t.apply(image, mask, np.random.default_rng(0))
    assert np.array_equal(img, image[:, ::-1]) and np.array_equal(m, mask[:, ::-1])


def test_mask_is_resized_with_nearest_only() -> None:
    image, mask = blocks(50, 70, 3)
    t = SegTrainTransform(crop_size=None, scale=(300, 100), photometric=False, flip_prob=0)
    for seed in range(5):
        _, m = t.apply(image, mask, np.random.default_rng(seed))
        assert set(np.unique(m)) <= set(np.unique(mask))


def test_cat_max_ratio_is_honoured() -> None:
    # class 0 fills the left 5/8 of a wide mask: about half the crops of half the width are dominated by it
    mask = np.zeros((64, 256), dtype=np.int64)
    mask[:, 160:] = 1
    mask[:4, :4] = IGNORE_INDEX
    image = np.zeros((64, 256, 3), dtype=np.uint8)
    hits = 0
    for seed in range(40):
        _, m = crop_with_cat_max_ratio(image, mask, np.random.default_rng(seed), (64, 128), 0.75)
        labels, counts = np.unique(m[m != IGNORE_INDEX], return_counts=True)
        assert len(labels) == 2 and counts.max() / counts.sum() < 0.75
        hits += 1
    # without the rule, many crops are dominated by class 0
    dominated = sum((crop_with_cat_max_ratio(image, mask, np.random.default_rng(s), (64, 128), 1.0)[1] == 0).mean()
                    >= 0.75 for s in range(40))
    assert hits == 40 and dominated > 10


def test_photometric_distortion_is_deterministic_and_in_range() -> None:
    image, _ = blocks(32, 32, 4)
    a = photometric_distortion(image, np.random.default_rng(9))
    b = photometric_distortion(image, np.random.default_rng(9))
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    changed = [not np.array_equal(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(10)]
    assert sum(changed) >= 7


def test_evaluation_resize_keeps_ratio() -> None:
    assert keep_ratio_size(480, 640, (2048, 512)) == (512, 683)
    assert keep_ratio_size(100, 1000, (2048, 512)) == (205, 2048)  # long side capped
    image, mask = blocks(60, 90, 5)
    x, y = SegEvalTransform(scale=(128, 32))(image, mask)
    assert x.shape == (3, 32, 48) and y.shape == (60, 90)  # the mask is scored at its own size (mmseg)
    assert np.array_equal(y.numpy(), mask)
    x, y = SegEvalTransform(scale=(128, 32), resize_mask=True)(image, mask)
    assert x.shape == (3, 32, 48) and y.shape == (32, 48)
    assert set(np.unique(y.numpy())) <= set(np.unique(mask))


def test_collate_pads_to_largest() -> None:
    a = (torch.ones(3, 4, 6), torch.zeros(4, 6, dtype=torch.long), [])
    b = (torch.ones(3, 5, 3) * 2, torch.ones(5, 3, dtype=torch.long), ["x.jpg (OSError)"])
    images, masks, bad = collate_segmentation([a, b, (None, None, ["y.jpg"])])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and bad == ["x.jpg (OSError)", "y.jpg"]
    assert (images[0, :, 4:] == 0).all() and (masks[0, 4:] == IGNORE_INDEX).all() and (masks[0, :4] == 0).all()
    assert (images[1, :, :, 3:] == 0).all() and (masks[1, :, 3:] == IGNORE_INDEX).all()
    assert (images[1, :, :, :3] == 2).all() and (masks[1, :, :3] == 1).all()


# ----------------------------------------------------------------------------------------------
# digit scenes


@pytest.fixture(scope="module")
def scenes() -> tuple[DigitScenes, DigitScenes]:
    return DigitScenes("train", size=96, n=40), DigitScenes("val", size=96, n=20)


def test_digit_scene_labels_are_exact(scenes) -> None:
    train, _ = scenes
    for i in range(10):
        s = train.scene(i)
        mask, placed = s["mask"], s["digits"]
        assert placed, "every scene has digits"
        expected = np.zeros_like(mask)
        for k, digit, top, left, side in placed:
            ink = digit_ink(train.scans[k], side)
            assert int(train.digits[k]) == digit
            expected[top:top + side, left:left + side][ink] = 1 + digit
            # the ink pixels hold the one ink colour
            region = s["image"][top:top + side, left:left + side][ink]
            assert (region == region[0]).all()
        assert np.array_equal(mask, expected)


def test_digit_scenes_splits_disjoint_and_reproducible(scenes) -> None:
    train, val = scenes
    assert not set(train.digit_ids.tolist()) & set(val.digit_ids.tolist())
    used_train = {int(train.digit_ids[k]) for i in range(len(train)) for k, *_ in train.scene(i)["digits"]}
    used_val = {int(val.digit_ids[k]) for i in range(len(val)) for k, *_ in val.scene(i)["digits"]}
    assert used_train and used_val and not used_train & used_val
    again = DigitScenes("train", size=96, n=40)
    x1, y1, _ = train[3]
    x2, y2, _ = again[3]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(train[3][1], val[3][1])


def test_digit_scenes_class_frequencies(scenes) -> None:
    train, _ = scenes
    counts = np.zeros(11)
    for i in range(len(train)):
        counts += np.bincount(train[i][1].numpy().ravel(), minlength=11)
    freq = counts / counts.sum()
    assert 0.75 < freq[0] < 0.97  # mostly background
    assert (counts[1:] > 0).all()  # every digit appears
    assert freq[1:].max() < 0.1


def test_digit_scenes_with_training_transform() -> None:
    ds = DigitScenes("val", size=64, n=4, transform=SegTrainTransform(crop_size=(48, 48), scale=(128, 64)))
    x, y, bad = ds[0]
    assert x.shape == (3, 48, 48) and y.shape == (48, 48) and bad == []
    assert int(y[y != IGNORE_INDEX].max()) <= 10
    images, _, _ = collate_segmentation([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 48, 48)
