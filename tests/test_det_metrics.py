"""COCO evaluation of detector outputs (hymamba.tasks.detection.metrics), against values computed by
hand from COCO's rules: a detection matches a gt when IoU >= the threshold (0.50, 0.55, ..., 0.95),
highest score first; per category, precision is made non-increasing from the right and read at the
101 recall points 0, 0.01, ..., 1 (the first detection rank whose recall is >= the point; 0 past the
last recall reached); AP is the mean over those points, over categories with ground truth and over
the IoU thresholds."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from hymamba.errors import ConfigError, DataError  # noqa: E402
from hymamba.tasks.detection.metrics import CocoEvaluator, merge_results  # noqa: E402
from hymamba.utils.distributed import Dist  # noqa: E402

S = 64  # every image is 64 x 64


def _rect(x: int, y: int, w: int, h: int) -> np.ndarray:
    m = np.zeros((S, S), dtype=np.uint8)
    m[y:y + h, x:x + w] = 1
    return m


def _rle(m: np.ndarray, as_str: bool) -> Dict:
    r = mask_utils.encode(np.asfortranarray(m))
    if as_str:
        r["counts"] = r["counts"].decode("ascii")
    return r


def _ann(k: int, image: int, cat: int, box: Tuple[int, int, int, int], seg, crowd: int = 0) -> Dict:
    return {"id": k, "image_id": image, "category_id": cat, "bbox": list(box), "area": box[2] * box[3],
            "iscrowd": crowd, "segmentation": seg}


# image 1: A (cat 1, 24x24 small, RLE with str counts), B (cat 2, 20x20 small, RLE with bytes counts)
# image 2: C (cat 1, 40x40 medium, polygon)
# image 3: a crowd region (cat 1, the lower half, RLE) and D (cat 1, 16x16 small, str RLE)
# image 4: E (cat 1, 30x30 small, bytes RLE)
A, B, C, CROWD, D, E = (8, 8, 24, 24), (36, 36, 20, 20), (4, 4, 40, 40), (0, 32, 64, 32), (40, 4, 16, 16), \
    (20, 20, 30, 30)


def _gt() -> Dict:
    return {
        "images": [{"id": i, "width": S, "height": S} for i in (1, 2, 3, 4)],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
        "annotations": [
            _ann(1, 1, 1, A, _rle(_rect(*A), True)),
            _ann(2, 1, 2, B, _rle(_rect(*B), False)),
            _ann(3, 2, 1, C, [[4.0, 4.0, 44.0, 4.0, 44.0, 44.0, 4.0, 44.0]]),
            _ann(4, 3, 1, CROWD, _rle(_rect(*CROWD), False), crowd=1),
            _ann(5, 3, 1, D, _rle(_rect(*D), True)),
            _ann(6, 4, 1, E, _rle(_rect(*E), False)),
        ],
    }


def _gt_mask(ann: Dict) -> np.ndarray:
    seg = ann["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, S, S)) if isinstance(seg, list) else seg
    with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2 (__array__ copy keyword)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def _out(dets: List[Tuple[Tuple[int, int, int, int], int, float, np.ndarray]]) -> Dict[str, torch.Tensor]:
    """torchvision's eval output from (xywh box, label, score, HxW mask) tuples."""
    boxes = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), *_ in dets], dtype=torch.float32).reshape(-1, 4)
    masks = torch.from_numpy(np.stack([d[3] for d in dets]).astype(np.float32)) if dets else torch.zeros(0, S, S)
    return {"boxes": boxes, "labels": torch.tensor([d[1] for d in dets], dtype=torch.int64),
            "scores": torch.tensor([d[2] for d in dets], dtype=torch.float32),
            "masks": masks[:, None] * 0.9}  # probabilities: 0.9 inside, 0 outside


def _det(box, label: int, score: float) -> Tuple:
    return (box, label, score, _rect(*box))


def _perfect(gt: Dict, image: int) -> Dict[str, torch.Tensor]:
    anns = [a for a in gt["annotations"] if a["image_id"] == image and not a["iscrowd"]]
    return _out([(tuple(a["bbox"]), a["category_id"], 1.0, _gt_mask(a)) for a in anns])


def _check(stats: Dict, **expected: float) -> None:
    for name, value in expected.items():
        got = stats[name]
        assert (math.isnan(value) and math.isnan(got)) or math.isclose(got, value, abs_tol=1e-9), (name, got, value)


def test_perfect_predictions(capsys) -> None:
    gt = _gt()
    ev = CocoEvaluator(gt)
    ev.update([1, 2], [_perfect(gt, 1), _perfect(gt, 2)])
    ev.update(torch.tensor([3, 4]), [_perfect(gt, 3), _perfect(gt, 4)])
    r = ev.compute()
    assert r["images"] == 4 and r["detections"] == 5
    for iou_type in ("bbox", "segm"):
        # no gt is large (> 96^2 pixels): COCOeval's -1 -> NaN
        _check(r[iou_type], AP=100.0, AP50=100.0, AP75=100.0, APs=100.0, APm=100.0, APl=math.nan)
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured ...
    assert "Average Precision" in ev.summary_text() and "segm" in ev.summary_text()  # ... and kept
    assert isinstance(gt["annotations"][2]["segmentation"], list)  # the caller's gt is untouched


def test_iou_exactly_0_6() -> None:
    # C is x 4..44, y 4..44 (1600 px). The prediction is C shifted right by 10: x 14..54, y 4..44.
    # intersection 30 x 40 = 1200, union 1600 + 1600 - 1200 = 2000, IoU = 1200 / 2000 = 0.6 exactly.
    # It matches at the thresholds 0.50, 0.55, 0.60 (IoU >= t) and not at 0.65..0.95, so
    # AP50 = 100, AP75 = 0 and AP = 3 / 10 * 100 = 30. Image 2 only: category 2 has no gt there and
    # is left out of the mean; a box-only evaluation (the output carries no masks).
    ev = CocoEvaluator(_gt(), iou_types=("bbox",))
    out = _out([_det((14, 4, 40, 40), 1, 0.9)])
    del out["masks"]
    ev.update([2], [out])
    r = ev.compute()
    assert set(r) == {"bbox", "images", "detections"}
    _check(r["bbox"], AP50=100.0, AP75=0.0, AP=30.0, APm=100 * 3 / 10, APs=math.nan)


def test_false_positive_above_the_true_positive() -> None:
    # Image 2, gt C. Ranked by score: FP (0.9, far away), TP = C (0.8).
    # cumulative TP [0, 1], FP [1, 1] -> recall [0, 1], precision [0, 1/2];
    # non-increasing from the right: [1/2, 1/2]. Every recall point 0..1 reads 1/2 (point 0 reads
    # rank 1, whose recall 0 is >= 0) -> AP = 50 at every IoU threshold.
    # APm: the FP's box is 10 x 10 = 100 px (small) and unmatched, so COCO ignores it in the medium
    # range -> APm = 100.
    ev = CocoEvaluator(_gt())
    ev.update([2], [_out([_det((50, 50, 10, 10), 1, 0.9), _det(C, 1, 0.8)])])
    r = ev.compute()
    for iou_type in ("bbox", "segm"):
        _check(r[iou_type], AP=50.0, AP50=50.0, AP75=50.0, APm=100.0, APs=math.nan)

    # Two gts of category 1 (C on image 2, E on image 4), ranked: TP C (0.9), FP (0.8), TP E (0.7).
    # cumulative TP [1, 1, 2], FP [0, 1, 1] -> recall [1/2, 1/2, 1], precision [1, 1/2, 2/3];
    # non-increasing from the right: [1, 2/3, 2/3]. Recall points 0.00..0.50 (51 points) read rank 1
    # -> 1; 0.51..1.00 (50 points) read rank 3 -> 2/3. AP = (51 + 50 * 2/3) / 101 = 0.834983...
    ev = CocoEvaluator(_gt())
    ev.update([2, 4], [_out([_det(C, 1, 0.9), _det((50, 50, 10, 10), 1, 0.8)]), _out([_det(E, 1, 0.7)])])
    r = ev.compute()
    ap = (51 + 50 * 2 / 3) / 101 * 100
    for iou_type in ("bbox", "segm"):
        _check(r[iou_type], AP=ap, AP50=ap, AP75=ap)


def test_no_detections() -> None:
    ev = CocoEvaluator(_gt())
    ev.update([1, 2, 3, 4], [_out([]) for _ in range(4)])
    r = ev.compute()
    assert r["images"] == 4 and r["detections"] == 0
    for iou_type in ("bbox", "segm"):
        _check(r[iou_type], AP=0.0, AP50=0.0, AP75=0.0, APs=0.0, APm=0.0, APl=math.nan)
    # nothing updated at all: nothing evaluated, NaN (not 0)
    r = CocoEvaluator(_gt()).compute()
    assert r["images"] == 0 and all(math.isnan(v) for v in r["bbox"].values())


def test_subset_counts_only_updated_images() -> None:
    gt = _gt()
    ev = CocoEvaluator(gt)
    ev.update([1], [_perfect(gt, 1)])
    r = ev.compute()
    assert r["images"] == 1
    _check(r["bbox"], AP=100.0)  # C, D, E (images 2-4) are not misses: not evaluated
    _check(r["segm"], AP=100.0)
    # Image 2 updated with no detections: C becomes a miss. Category 1: gts A, C; only A found
    # (recall 1/2, precision 1): recall points 0..0.50 read 1 (51 points), the rest 0 ->
    # AP = 51/101; category 2 (B): 100. Mean: (51/101 * 100 + 100) / 2 = 75.2475...
    ev.update([2], [_out([])])
    r = ev.compute()
    _check(r["bbox"], AP=(51 / 101 * 100 + 100) / 2)


class _FakeDist(Dist):
    """Two ranks without a process group: gather_objects returns the ranks' results."""

    def __init__(self, parts) -> None:
        super().__init__(rank=0, world_size=2)
        self.parts = parts

    def gather_objects(self, obj):
        return list(self.parts)


def test_two_processes_match_one() -> None:
    gt = _gt()
    outputs = {1: _out([_det(A, 1, 0.6), _det((30, 30, 20, 20), 2, 0.7), _det(B, 2, 0.5)]),
               2: _out([_det((10, 4, 40, 40), 1, 0.8)]),  # IoU 34*40 / (3200 - 1360) = 0.739
               3: _out([_det(D, 1, 0.4)]),
               4: _out([_det((60, 0, 4, 4), 1, 0.95)])}  # FP; E missed
    single = CocoEvaluator(gt)
    for i in (1, 2, 3, 4):
        single.update([i], [outputs[i]])
    expected = single.compute()

    rank0, rank1 = CocoEvaluator(gt), CocoEvaluator(gt)
    rank0.update([1, 3], [outputs[1], outputs[3]])
    rank1.update([2, 4, 1], [outputs[2], outputs[4], outputs[1]])  # image 1 again: a padded shard
    parts = [rank0.results, rank1.results]
    merged = merge_results(parts)
    assert sorted(merged) == [1, 2, 3, 4] and sorted(rank0.results) == [1, 3]  # parts untouched
    for ev in (rank0, rank1):
        ev.gather(_FakeDist(parts))
        got = ev.compute()
        assert got["images"] == 4 and got["detections"] == 6
        for iou_type in ("bbox", "segm"):
            for name, value in expected[iou_type].items():
                assert (math.isnan(value) and math.isnan(got[iou_type][name])) or got[iou_type][name] == value
    assert 0 < expected["bbox"]["AP"] < 100
    rank0.gather(None)  # no dist: a no-op
    assert rank0.compute()["bbox"]["AP"] == expected["bbox"]["AP"]


def test_crowd_region_is_ignored() -> None:
    # Image 3: D (cat 1) found with score 0.5; a detection of cat 1 inside the crowd region (x 10..30,
    # y 40..60) with the higher score 0.95. Against a crowd gt COCO's IoU is intersection / detection
    # area = 1, so it matches the crowd region and is ignored: AP = 100 (were it a FP ranked first,
    # AP would be 50, as below).
    ev = CocoEvaluator(_gt())
    ev.update([3], [_out([_det((10, 40, 20, 20), 1, 0.95), _det(D, 1, 0.5)])])
    r = ev.compute()
    for iou_type in ("bbox", "segm"):
        _check(r[iou_type], AP=100.0, AP50=100.0, AP75=100.0)
    # the same detection outside the crowd region (x 10..30, y 4..24; no overlap with D) is a FP
    # ranked first: precision [0, 1/2] -> [1/2, 1/2] -> AP = 50
    ev = CocoEvaluator(_gt())
    ev.update([3], [_out([_det((10, 4, 20, 20), 1, 0.95), _det(D, 1, 0.5)])])
    r = ev.compute()
    for iou_type in ("bbox", "segm"):
        _check(r[iou_type], AP=50.0)


def test_bad_input() -> None:
    gt = _gt()
    ev = CocoEvaluator(gt)
    with pytest.raises(DataError, match="image id 99"):
        ev.update([99], [_out([])])
    out = _out([_det(A, 1, 0.9)])
    del out["masks"]
    with pytest.raises(ConfigError, match="iou_types=\\('bbox',\\)"):
        ev.update([1], [out])
    with pytest.raises(DataError, match="label 7"):
        ev.update([1], [_out([_det(A, 7, 0.9)])])
    small = _out([_det(A, 1, 0.9)])
    small["masks"] = small["masks"][..., :32, :32]
    with pytest.raises(DataError, match="original image"):
        ev.update([1], [small])
    with pytest.raises(DataError, match="2 image ids for 1 outputs"):
        ev.update([1, 2], [_out([])])
    with pytest.raises(ConfigError):
        CocoEvaluator(gt, iou_types=("keypoints",))
    assert ev.results == {}  # nothing half-added


def test_coco_results_hold_one_entry_per_detection() -> None:
    gt = _gt()
    ev = CocoEvaluator(gt)
    ev.update([2, 1], [_out([_det(C, 1, 0.9), _det((50, 50, 10, 10), 2, 0.3)]), _perfect(gt, 1)])
    results = ev.coco_results()
    assert [r["image_id"] for r in results] == [1, 1, 2, 2]  # images in id order, detections as the model gave them
    assert [r["category_id"] for r in results[2:]] == [1, 2]
    assert [r["score"] for r in results[2:]] == pytest.approx([0.9, 0.3])
    assert results[2]["bbox"] == [float(v) for v in C]
    for r in results:  # the box and the mask of one detection stay together
        decoded = mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
        x, y, w, h = mask_utils.toBbox(r["segmentation"]).tolist()
        assert [x, y, w, h] == r["bbox"] and decoded.sum() == w * h
    boxes_only = CocoEvaluator(gt, iou_types=("bbox",))
    boxes_only.update([2], [_out([_det(C, 1, 0.9)])])
    assert boxes_only.coco_results() == [{"image_id": 2, "category_id": 1, "bbox": [4.0, 4.0, 40.0, 40.0],
                                          "score": pytest.approx(0.9)}]
