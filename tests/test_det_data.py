"""Detection data: the built-in digit objects, COCO json reading and writing, flip, collate."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hymamba.data.detection import (
    CocoDetection,
    DetTrainTransform,
    DigitObjects,
    collate_detection,
    write_coco,
)
from hymamba.errors import DataError

SIZE = 64


@pytest.fixture(scope="module")
def train() -> DigitObjects:
    return DigitObjects("train", SIZE, n=6)


@pytest.fixture(scope="module")
def val() -> DigitObjects:
    return DigitObjects("val", SIZE, n=6)


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def coco_api(gt: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ----------------------------------------------------------------------------------------------
# the built-in objects


def test_digit_objects_match_their_scene(train: DigitObjects) -> None:
    assert train.classes == [str(d) for d in range(10)] and train.num_classes == 11
    assert train.image_ids == [1, 2, 3, 4, 5, 6]
    for i in range(len(train)):
        s = train.scenes.scene(i)
        x, y, bad = train[i]
        assert bad == [] and x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert torch.equal(x, torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255)
        assert y["image_id"] == i + 1
        assert y["masks"].dtype == torch.uint8 and y["boxes"].dtype == torch.float32 and y["labels"].dtype == torch.int64
        assert len(y["labels"]) == len(s["digits"]) >= 1
        for n, (_k, d, top, left, side) in enumerate(s["digits"]):
            ink = np.zeros((SIZE, SIZE), bool)
            ink[top:top + side, left:left + side] = s["mask"][top:top + side, left:left + side] == 1 + d
            assert y["labels"][n] == 1 + d
            assert np.array_equal(y["masks"][n].numpy().astype(bool), ink)
            assert y["masks"][n].sum() == ink.sum() == y["area"][n]
            assert y["boxes"][n].tolist() == tight_box(ink)
            x0, y0, x1, y1 = y["boxes"][n].tolist()
            assert left <= x0 and top <= y0 and x1 <= left + side and y1 <= top + side  # inside the square
        assert y["iscrowd"].sum() == 0
        # every ink pixel of the scene belongs to exactly one instance
        assert np.array_equal(y["masks"].sum(0).numpy() > 0, s["mask"] > 0)


def test_digit_objects_are_deterministic(train: DigitObjects) -> None:
    again = DigitObjects("train", SIZE, n=6, transform=DetTrainTransform(0.5), seed=3)
    other = DigitObjects("train", SIZE, n=6, transform=DetTrainTransform(0.5), seed=3)
    for i in (0, 4):
        a, b = train[i], train[i]
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in ("boxes", "labels", "masks"))
        p, q = again[i], other[i]
        assert torch.equal(p[0], q[0]) and torch.equal(p[1]["boxes"], q[1]["boxes"])


def test_train_and_val_use_disjoint_scans(train: DigitObjects, val: DigitObjects) -> None:
    def scans(ds: DigitObjects) -> set[int]:
        return {int(ds.scenes.digit_ids[k]) for i in range(len(ds)) for k, *_ in ds.scenes.scene(i)["digits"]}

    assert scans(train) and scans(val) and not scans(train) & scans(val)


def test_scene_without_digits_gives_an_empty_target(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = DigitObjects("val", SIZE, n=2)
    blank = {"image": np.zeros((SIZE, SIZE, 3), np.uint8), "mask": np.zeros((SIZE, SIZE), np.int64), "digits": []}
    monkeypatch.setattr(ds.scenes, "scene", lambda i: blank)
    _, y, _ = ds[0]
    assert y["boxes"].shape == (0, 4) and y["labels"].shape == (0,) and y["masks"].shape == (0, SIZE, SIZE)
    _, y = DetTrainTransform(1.0)(blank["image"], ds.load_raw(0)[1], np.random.default_rng(0))
    assert y["boxes"].shape == (0, 4)
    assert ds.coco_gt["annotations"] == [] and len(ds.coco_gt["images"]) == 2


def test_coco_gt_loads_in_pycocotools_and_scores_itself_perfectly(train: DigitObjects) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    gt = train.coco_gt
    assert json.loads(json.dumps(gt)) == gt  # JSON-safe
    assert [c["id"] for c in gt["categories"]] == list(range(1, 11))
    coco = coco_api(gt)
    assert sorted(coco.getImgIds()) == train.image_ids
    for i, img_id in enumerate(train.image_ids):
        y = train[i][1]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert [a["category_id"] for a in anns] == y["labels"].tolist()
        for a, box, mask in zip(anns, y["boxes"].tolist(), y["masks"].numpy()):
            assert a["iscrowd"] == 0 and a["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            assert a["id"] >= 1 and a["area"] == mask.sum()
            assert np.array_equal(coco.annToMask(a), mask)
            assert np.array_equal(mask_utils.decode(coco.annToRLE(a)), mask)
    results = [{k: v for k, v in a.items() if k != "id"} | {"score": 1.0} for a in copy.deepcopy(gt["annotations"])]
    with contextlib.redirect_stdout(io.StringIO()):
        dets = coco.loadRes(results)
        for kind in ("bbox", "segm"):
            ev = COCOeval(coco, dets, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == pytest.approx(1.0), kind


def test_write_coco_reads_back_identically(train: DigitObjects, tmp_path: Path) -> None:
    ann = write_coco(train, tmp_path, limit=4)
    assert ann == tmp_path / "annotations.json"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1.png", "2.png", "3.png", "4.png"]
    back = CocoDetection(tmp_path / "images", ann)
    assert len(back) == 4 and back.classes == train.classes and back.num_classes == 11
    assert back.image_ids == [1, 2, 3, 4]
    for i in range(4):
        (x, y, _), (bx, by, bad) = train[i], back[i]
        assert bad == [] and torch.equal(x, bx) and y["image_id"] == by["image_id"]
        for k in ("boxes", "labels", "masks", "area", "iscrowd"):
            assert by[k].dtype == y[k].dtype and torch.equal(by[k], y[k]), k
    # and written again from the COCO copy: the same json
    again = write_coco(back, tmp_path / "again")
    assert json.loads(again.read_text())["annotations"] == json.loads(ann.read_text())["annotations"]


# ----------------------------------------------------------------------------------------------
# hand-made COCO files


def make_coco(root: Path, corrupt: bool = False) -> dict:
    """Two images (32x40 and 24x24) and the json of the checks below; ``corrupt``: image 2 is not an image."""
    (root / "imgs").mkdir(parents=True)
    Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(root / "imgs" / "a.png")
    if corrupt:
        (root / "imgs" / "b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    else:
        Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(root / "imgs" / "b.jpg")
    Image.fromarray(np.full((16, 16, 3), 10, np.uint8)).save(root / "imgs" / "c.png")
    crowd = np.zeros((32, 40), np.uint8)
    crowd[20:30, 0:8] = 1
    flat = crowd.flatten(order="F")  # uncompressed RLE (column-major run lengths starting with zeros)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    doc = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 32},
                   {"id": 3, "file_name": "b.jpg", "width": 24, "height": 24},
                   {"id": 9, "file_name": "c.png", "width": 16, "height": 16}],
        "categories": [{"id": 12, "name": "square"}, {"id": 5, "name": "box"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 12, "bbox": [2, 2, 4, 4], "iscrowd": 0,
             "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]], "area": 16},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [10, 4, 20, 8], "iscrowd": 0},  # no mask: the box
            {"id": 3, "image_id": 7, "category_id": 12, "bbox": [0, 20, 8, 10], "iscrowd": 1,
             "segmentation": {"size": [32, 40], "counts": counts}, "area": 80},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [30, 30, 0.5, 1], "iscrowd": 0, "area": 0.5},
            {"id": 5, "image_id": 3, "category_id": 5, "bbox": [1, 1, 10, 10], "iscrowd": 0,
             "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]},
        ],
    }
    (root / "ann.json").write_text(json.dumps(doc))
    return doc


def test_coco_json_polygons_crowd_and_category_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hymamba.data.detection"):
        ds = CocoDetection(tmp_path / "imgs", tmp_path / "ann.json")
    assert "under 1 px" in caplog.text and "[4]" in caplog.text
    assert ds.classes == ["box", "square"] and ds.num_classes == 3  # ids 5, 12 -> labels 1, 2
    assert ds.image_ids == [3, 7, 9] and len(ds) == 3
    x, y, bad = ds[1]
    assert bad == [] and x.shape == (3, 32, 40) and y["image_id"] == 7
    assert y["labels"].tolist() == [2, 1] and y["iscrowd"].tolist() == [0, 0]  # crowd and degenerate left out
    assert y["boxes"].tolist() == [[2, 2, 6, 6], [10, 4, 30, 12]] and y["area"].tolist() == [16, 160]
    square = np.zeros((32, 40), np.uint8)
    square[2:6, 2:6] = 1
    filled = np.zeros((32, 40), np.uint8)
    filled[4:12, 10:30] = 1
    assert np.array_equal(y["masks"][0].numpy(), square) and np.array_equal(y["masks"][1].numpy(), filled)
    assert ds[0][1]["area"].tolist() == [100.0]  # computed from the polygon
    empty = ds[2][1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 16, 16)

    gt = ds.coco_gt
    assert [i["id"] for i in gt["images"]] == [3, 7, 9]
    assert gt["categories"] == [{"id": 1, "name": "box"}, {"id": 2, "name": "square"}]
    coco = coco_api(gt)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[7]))
    assert [(a["id"], a["category_id"], a["iscrowd"]) for a in anns] == [(1, 2, 0), (2, 1, 0), (3, 2, 1), (4, 1, 0)]
    crowd = np.zeros((32, 40), np.uint8)
    crowd[20:30, 0:8] = 1
    assert np.array_equal(coco.annToMask(anns[2]), crowd) and anns[2]["area"] == 80
    assert np.array_equal(coco.annToMask(anns[1]), filled)  # no segmentation: its box as a polygon


def test_unknown_annotation_ids_are_renumbered(tmp_path: Path) -> None:
    doc = make_coco(tmp_path)
    for a in doc["annotations"]:
        a["id"] = 0  # pycocotools' matching treats id 0 as "unmatched"
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    gt = CocoDetection(tmp_path / "imgs", tmp_path / "ann.json").coco_gt
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: "{not json", "not JSON"),
    (lambda d: [1, 2], "top level"),
    (lambda d: {k: v for k, v in d.items() if k != "images"}, "'images' is missing"),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, "'categories' is missing"),
    (lambda d: d | {"annotations": d["annotations"] + [{"id": 9, "image_id": 99, "category_id": 5,
                                                        "bbox": [0, 0, 2, 2]}]}, "image_id 99"),
    (lambda d: d | {"annotations": d["annotations"] + [{"id": 9, "image_id": 7, "category_id": 1,
                                                        "bbox": [0, 0, 2, 2]}]}, "category_id 1"),
    (lambda d: d | {"annotations": [d["annotations"][0] | {"bbox": [1, 2]}]}, "bbox"),
    (lambda d: d | {"images": [{"id": 7, "file_name": "a.png"}]}, "width"),
    (lambda d: d | {"categories": []}, "'categories' is empty"),
])
def test_broken_json_raises_data_error(tmp_path: Path, break_it, message: str) -> None:
    doc = make_coco(tmp_path)
    broken = break_it(doc)
    (tmp_path / "ann.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(DataError, match=message) as info:
        CocoDetection(tmp_path / "imgs", tmp_path / "ann.json")
    assert str(tmp_path / "ann.json") in str(info.value)


def test_missing_json_and_wrong_image_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    doc = make_coco(tmp_path)
    doc["images"][0]["width"] = 41
    doc["annotations"] = []
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="40x32"):
        CocoDetection(tmp_path / "imgs", tmp_path / "ann.json")[1]


def test_unreadable_image_is_skipped_or_substituted(tmp_path: Path) -> None:
    make_coco(tmp_path, corrupt=True)
    ds = CocoDetection(tmp_path / "imgs", tmp_path / "ann.json")
    x, y, bad = ds[0]  # image id 3 is b.jpg
    assert x is None and y is None and len(bad) == 1 and "b.jpg" in bad[0]
    sub = CocoDetection(tmp_path / "imgs", tmp_path / "ann.json", substitute_bad=True)
    x, y, bad = sub[0]
    assert x.shape == (3, 32, 40) and y["image_id"] == 7 and "b.jpg" in bad[0]
    images, targets, paths = collate_detection([ds[0], ds[1], ds[2]])
    assert len(images) == len(targets) == 2 and [t["image_id"] for t in targets] == [7, 9] and len(paths) == 1
    assert [tuple(i.shape) for i in images] == [(3, 32, 40), (3, 16, 16)]
    assert collate_detection([ds[0]]) == ([], [], paths)
    written = write_coco(ds, tmp_path / "out")  # the unreadable image is left out with its annotation
    doc = json.loads(written.read_text())
    assert [i["id"] for i in doc["images"]] == [7, 9] and {a["image_id"] for a in doc["annotations"]} == {7}


# ----------------------------------------------------------------------------------------------
# transform


def test_flip_moves_boxes_with_masks(train: DigitObjects) -> None:
    image, target = train.load_raw(0)
    flipped, t = DetTrainTransform(1.0)(image, target, np.random.default_rng(0))
    assert np.array_equal(flipped, image[:, ::-1]) and np.array_equal(t["masks"], target["masks"][:, :, ::-1])
    assert np.array_equal(t["labels"], target["labels"]) and t["boxes"].dtype == np.float32
    for box, mask in zip(t["boxes"], t["masks"]):
        assert box.tolist() == tight_box(mask)
    same, u = DetTrainTransform(0.0)(image, target, np.random.default_rng(0))
    assert same is image and u is target

    ds = DigitObjects("train", SIZE, n=6, transform=DetTrainTransform(0.5), seed=1)
    flips = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        x, y, _ = ds[0]
        is_flipped = torch.equal(x, torch.from_numpy(np.ascontiguousarray(flipped)).permute(2, 0, 1).float() / 255)
        flips.add(is_flipped)
        for box, mask in zip(y["boxes"].tolist(), y["masks"].numpy()):
            assert box == tight_box(mask)
    assert flips == {True, False}


def test_crop_keeps_boxes_masks_and_areas_consistent(train: DigitObjects) -> None:
    image, target = train.load_raw(1)
    h, w = image.shape[:2]
    crop = DetTrainTransform(0.0, crop_prob=1.0, crop_range=(0.5, 0.8))
    sizes, dropped = set(), 0
    for seed in range(40):
        out, t = crop(image, target, np.random.default_rng(seed))
        ch, cw = out.shape[:2]
        assert round(0.5 * SIZE) <= ch <= round(0.8 * SIZE) and round(0.5 * SIZE) <= cw <= round(0.8 * SIZE)
        sizes.add((ch, cw))
        # the crop is a window of the image: find it through one instance's mask or by search
        y0, x0 = next((y, x) for y in range(h - ch + 1) for x in range(w - cw + 1)
                      if np.array_equal(image[y:y + ch, x:x + cw], out))
        assert t["masks"].shape == (len(t["labels"]), ch, cw) and t["boxes"].dtype == np.float32
        for box, mask, area in zip(t["boxes"], t["masks"], t["area"]):
            # the ink of a cropped digit lies inside its clipped box and its area is the pixels left
            ys, xs = np.nonzero(mask)
            assert box[0] <= xs.min() and xs.max() + 1 <= box[2] and box[1] <= ys.min() and ys.max() + 1 <= box[3]
            assert 0 <= box[0] < box[2] <= cw and 0 <= box[1] < box[3] <= ch and area == mask.sum() > 0
        # every instance with ink inside the window is kept, with its label
        inside = [k for k, m in enumerate(target["masks"]) if m[y0:y0 + ch, x0:x0 + cw].any()]
        assert t["labels"].tolist() == target["labels"][inside].tolist()
        dropped += len(target["labels"]) - len(inside)
    assert len(sizes) > 10 and dropped > 0  # the draws vary and some crops cut digits away
    # sides are capped at the image's and the generator alone decides the crop
    full, _ = DetTrainTransform(0.0, crop_prob=1.0, crop_range=(1.5, 2.0))(image, target, np.random.default_rng(0))
    assert full.shape == image.shape
    a, _ = crop(image, target, np.random.default_rng(5))
    b, _ = crop(image, target, np.random.default_rng(5))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="crop_range"):
        DetTrainTransform(crop_range=(0.9, 0.5))


def test_crop_through_the_data_set_and_the_config() -> None:
    ds = DigitObjects("train", SIZE, n=4, transform=DetTrainTransform(0.0, crop_prob=1.0), seed=2)
    x, y, _ = ds[0]
    assert x.shape[-2:] == y["masks"].shape[-2:] and x.shape[-1] <= SIZE
    from hymamba.tasks.detection import build_config

    cfg = build_config(overrides={"crop_prob": 0.5, "crop_range": (0.6, 1.0)})
    cfg.check()
    from hymamba.errors import ConfigError

    with pytest.raises(ConfigError, match="crop_prob"):
        build_config(overrides={"crop_prob": 2.0}).check()
