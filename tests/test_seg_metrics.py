"""Segmentation metrics (mmseg's IoUMetric from one confusion matrix) and test-time inference
(mmseg's whole / slide inference, flip and multi-scale)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import hymamba
from hymamba.errors import DataError
from hymamba.models.upernet import build_segmenter
from hymamba.tasks.segmentation.inference import slide_inference, whole_inference
from hymamba.tasks.segmentation.metrics import ConfusionMatrix
from hymamba.utils.distributed import Dist

# ----------------------------------------------------------------------------------------------
# metrics


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_hand_computed() -> None:
    """4 classes; class 3 never appears anywhere, 255 pixels are skipped."""
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 3, 0]])  # the 3 sits on an ignored pixel: not counted
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # scored pixels (target, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0) -> 7 pixels
    # class 0: label 3, pred 3 (two of 0 + the (2,0)), intersect 2 -> union 4, IoU 2/4, Acc 2/3
    # class 1: label 2, pred 3, intersect 2 -> union 3, IoU 2/3, Acc 2/2
    # class 2: label 2, pred 1, intersect 1 -> union 2, IoU 1/2, Acc 1/2
    # class 3: label 0, pred 0 -> IoU NaN, Acc NaN
    r = cm.compute()
    iou = [50.0, 200 / 3, 50.0, math.nan]
    acc = [200 / 3, 100.0, 50.0, math.nan]
    assert all(_same(a, b) for a, b in zip(r["IoU"], iou))
    assert all(_same(a, b) for a, b in zip(r["Acc"], acc))
    assert _same(r["mIoU"], (50 + 200 / 3 + 50) / 3)
    assert _same(r["mAcc"], (200 / 3 + 100 + 50) / 3)
    assert _same(r["aAcc"], 5 / 7 * 100)  # intersect 2 + 2 + 1 of 7 labelled pixels


def test_ignore_index() -> None:
    target = torch.full((2, 3, 3), 255)
    pred = torch.randint(0, 3, (2, 3, 3))
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert int(cm.matrix.sum()) == 0
    r = cm.compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["aAcc"]) and math.isnan(r["mAcc"])
    # another ignore value; 255 is then an out-of-range target
    cm = ConfusionMatrix(3, ignore_index=7)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 7, 2]))
    assert cm.compute()["aAcc"] == 100.0 and int(cm.matrix.sum()) == 2
    with pytest.raises(DataError, match="targets"):
        cm.update(torch.tensor([0]), torch.tensor([255]))


def test_absent_class_predicted_counts_zero() -> None:
    # class 2 never in the target but predicted once: IoU 0 (union 1), Acc NaN; mIoU includes the 0
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 2])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    r = cm.compute()
    # class 0: I 2, U 2 -> 100; class 1: I 1, label 2, pred 1 -> U 2 -> 50; class 2: I 0, U 1 -> 0
    assert r["IoU"] == [100.0, 50.0, 0.0]
    assert r["Acc"][:2] == [100.0, 50.0] and math.isnan(r["Acc"][2])
    assert _same(r["mIoU"], 50.0)  # (100 + 50 + 0) / 3
    assert _same(r["mAcc"], 75.0)  # nanmean(100, 50)
    assert _same(r["aAcc"], 75.0)


def test_bad_input() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(DataError, match="0..2"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="0..2"):
        cm.update(torch.tensor([-1, 0]), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(DataError, match="integer"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert int(cm.matrix.sum()) == 0


def _numpy_mmseg(preds, targets, c: int, ignore: int = 255):
    """An independent implementation in numpy, per image then summed, as mmseg's IoUMetric."""
    tot_i, tot_u, tot_p, tot_l = (np.zeros(c) for _ in range(4))
    for p, t in zip(preds, targets):
        mask = t != ignore
        p, t = p[mask], t[mask]
        inter = p[p == t]
        ai = np.histogram(inter, bins=c, range=(0, c - 1))[0]
        ap = np.histogram(p, bins=c, range=(0, c - 1))[0]
        al = np.histogram(t, bins=c, range=(0, c - 1))[0]
        tot_i += ai
        tot_p += ap
        tot_l += al
        tot_u += ap + al - ai
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = tot_i / tot_u, tot_i / tot_l
    return dict(aAcc=tot_i.sum() / tot_l.sum() * 100, mIoU=np.nanmean(iou) * 100, mAcc=np.nanmean(acc) * 100,
                IoU=iou * 100, Acc=acc * 100)


def test_random_against_numpy_and_batches() -> None:
    g = torch.Generator().manual_seed(0)
    c = 7
    preds = [torch.randint(0, c - 1, (5, 11), generator=g) for _ in range(6)]  # class 6 never predicted
    targets = []
    for p in preds:
        t = torch.where(torch.rand(p.shape, generator=g) < 0.6, p, torch.randint(0, c - 2, p.shape, generator=g))
        t[t == 5] = 0  # class 5 only predicted, class 6 nowhere
        t[torch.rand(p.shape, generator=g) < 0.1] = 255
        targets.append(t)
    ref = _numpy_mmseg([p.numpy() for p in preds], [t.numpy() for t in targets], c)
    cm = ConfusionMatrix(c)
    for p, t in zip(preds, targets):  # batch by batch
        cm.update(p, t)
    big = ConfusionMatrix(c)
    big.update(torch.stack(preds), torch.stack(targets))  # one big batch
    assert torch.equal(cm.matrix, big.matrix)
    r = cm.compute()
    rb = big.compute()
    assert all(_same(r[k], rb[k]) for k in ("mIoU", "aAcc", "mAcc"))
    assert all(_same(a, b) for k in ("IoU", "Acc") for a, b in zip(r[k], rb[k]))
    for k in ("mIoU", "aAcc", "mAcc"):
        assert _same(r[k], float(ref[k])), k
    for k in ("IoU", "Acc"):
        assert all(_same(a, float(b)) for a, b in zip(r[k], ref[k])), k
    assert math.isnan(r["IoU"][6]) and r["IoU"][5] == 0.0 and math.isnan(r["Acc"][5])


def test_reduce_without_process_group() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    before = cm.matrix.clone()
    assert cm.reduce(Dist()) is cm and torch.equal(cm.matrix, before)
    assert torch.equal(cm.reduce(None).matrix, before)


# ----------------------------------------------------------------------------------------------
# inference


class PixelwiseNet(nn.Module):
    """Each output pixel depends only on that input pixel (1x1 convs)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GELU(), nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OffsetNet(nn.Module):
    """Returns, in every pixel of a window, a constant: channel 0 = 1, channel 1 = calls so far.
    With channel 2 carrying the window's height, the count map logic becomes visible."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.sizes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        self.sizes.append((h, w))
        out = torch.zeros(n, 2, h, w, dtype=x.dtype)
        out[:, 0] = 1.0
        out[:, 1] = float(self.calls)
        self.calls += 1
        return out


def test_slide_equals_whole_for_pixelwise_model() -> None:
    model = PixelwiseNet().double()
    x = torch.randn(2, 3, 37, 50, dtype=torch.float64)
    whole = whole_inference(model, x)
    for crop, stride in [(16, 8), ((20, 13), (7, 11)), (64, 64), (5, 5), ((37, 50), (1, 1))]:
        slide = slide_inference(model, x, crop, stride, 5)
        assert slide.shape == (2, 5, 37, 50)
        torch.testing.assert_close(slide, whole, rtol=1e-12, atol=1e-12)


def test_slide_count_map_averages_windows() -> None:
    """Height 10, crop 6, stride 4 -> h_grids = (10 - 6 + 3) // 4 + 1 = 2: rows 0..5 and 4..9 (the
    second moved back to end at the border); width 7, crop 7 -> one column. Window k returns k."""
    model = OffsetNet()
    x = torch.zeros(1, 3, 10, 7)
    out = slide_inference(model, x, (6, 7), (4, 3), 2)
    assert model.sizes == [(6, 7), (6, 7)]
    torch.testing.assert_close(out[0, 0], torch.ones(10, 7))  # every pixel: sum / count = 1
    expect = torch.tensor([0, 0, 0, 0, 0.5, 0.5, 1, 1, 1, 1])  # rows 4, 5 are covered by both windows
    torch.testing.assert_close(out[0, 1], expect[:, None].expand(10, 7))
    # width 10, crop 4, stride 3: (10 - 4 + 2) // 3 + 1 = 3 windows at x 0, 3 and 6 (6..9: last one
    # ends at the border)
    model = OffsetNet()
    out = slide_inference(model, torch.zeros(1, 3, 4, 10), 4, 3, 2)
    assert model.calls == 3 and model.sizes == [(4, 4)] * 3
    expect = torch.tensor([0, 0, 0, 0.5, 1, 1, 1.5, 2, 2, 2])
    torch.testing.assert_close(out[0, 1], expect[None].expand(4, 10))


def test_slide_odd_shapes() -> None:
    model = OffsetNet()
    out = slide_inference(model, torch.zeros(2, 3, 9, 13), 32, 16, 2)  # crop larger than the image
    assert out.shape == (2, 2, 9, 13) and model.sizes == [(9, 13)]
    model = OffsetNet()
    out = slide_inference(model, torch.zeros(1, 3, 23, 17), (8, 8), (5, 5), 2)  # not a multiple of stride
    assert out.shape == (1, 2, 23, 17)
    # h_grids = (23 - 8 + 4) // 5 + 1 = 4, w_grids = (17 - 8 + 4) // 5 + 1 = 3; all windows full size
    assert model.calls == 12 and set(model.sizes) == {(8, 8)}
    torch.testing.assert_close(out[0, 0], torch.ones(23, 17))
    model = PixelwiseNet(3)
    x = torch.randn(1, 3, 7, 30)
    out = slide_inference(model, x, (16, 8), (16, 6), 3)  # crop taller than the image, wide image
    torch.testing.assert_close(out, whole_inference(model, x))


class Symmetric(nn.Module):
    """A left-right symmetric 3x3 convolution (mirror-equivariant), so flipping changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_((w + w.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_flip_with_symmetric_model() -> None:
    model = Symmetric().double()
    x = torch.randn(2, 3, 12, 15, dtype=torch.float64)
    torch.testing.assert_close(whole_inference(model, x, flip=True), whole_inference(model, x))
    # sliding windows of the flipped image sit elsewhere (here at x 0, 5, 7 -> 0..8, 2..10, 7..15 once
    # flipped back), so a 3x3 model's window borders differ; a pixel-wise model is mirror-equivariant
    pix = PixelwiseNet(4).double()
    torch.testing.assert_close(slide_inference(pix, x, 8, 5, 4, flip=True), slide_inference(pix, x, 8, 5, 4))
    # a non-symmetric model: flip = mean of the plain and the flipped-back prediction
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    both = nn.Sequential(conv, nn.Conv2d(4, 4, 1).double())
    with torch.no_grad():
        expect = (both(x) + both(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(whole_inference(both, x, flip=True), expect)


def test_scales() -> None:
    model = PixelwiseNet(3).double()
    x = torch.randn(1, 3, 16, 20, dtype=torch.float64)
    torch.testing.assert_close(whole_inference(model, x, scales=[1.0]), whole_inference(model, x))
    out = whole_inference(model, x, scales=[0.5, 1.0, 1.75])
    assert out.shape == (1, 3, 16, 20)
    import torch.nn.functional as F

    def rs(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        expect = (rs(model(rs(x, (8, 10))), (16, 20)) + model(x) + rs(model(rs(x, (28, 35))), (16, 20))) / 3
    torch.testing.assert_close(out, expect)
    probs = whole_inference(model, x, scales=[0.5, 1.0], flip=True, merge="softmax")
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 16, 20, dtype=torch.float64))


@pytest.fixture(scope="module")
def segmenter() -> nn.Module:
    torch.manual_seed(0)
    backbone = hymamba.create_backbone("test_mambavision", window_size=(4, 4, 2, 1))
    return build_segmenter(backbone, num_classes=4, channels=16, aux_channels=8).double()


def test_real_segmenter_one_window_is_whole(segmenter: nn.Module) -> None:
    segmenter.train()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    whole = whole_inference(segmenter, x)
    assert segmenter.training  # mode restored
    assert whole.shape == (1, 4, 64, 96)
    torch.testing.assert_close(slide_inference(segmenter, x, (64, 96), (32, 48), 4), whole, rtol=0, atol=0)
    torch.testing.assert_close(slide_inference(segmenter, x, 128, 64, 4), whole, rtol=0, atol=0)
    # overlapping windows of the real model: shapes and finiteness
    out = slide_inference(segmenter, x, 64, 48, 4, flip=True)
    assert out.shape == (1, 4, 64, 96) and bool(torch.isfinite(out).all())
