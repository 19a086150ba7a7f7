"""The detectors (torchvision Mask / Faster R-CNN on the dense backbone): the FPN sees exactly the
backbone's maps, backbone weights from official dense (mmengine), ImageNet and our own files load
strictly with a report, training and inference follow torchvision's contract, whole-detector weights
round-trip, and the typed records hold the official settings. Small: the tiny test variant on
64x96 images."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

import hymamba
from hymamba.errors import CheckpointError, ConfigError
from hymamba.factory import load_backbone_weights
from hymamba.models.detection import FPN_LEVELS, IMAGENET_MEAN, IMAGENET_STD, MambaVisionFPN
from hymamba.models.detectors import DETECTORS, DetectorVariant
from hymamba.models.layers import Attention
from hymamba.models.variants import VARIANTS
from hymamba.weights.io import save_safetensors
from hymamba.weights.metadata import read_checkpoint

TINY_WINDOWS = (8, 8, 4, 2)
#: small images, few proposals and RoIs, a 64-channel FPN (the heads follow its width): each detector
#: forward takes a second or less on 2 cores
SMALL = dict(fpn_channels=64, min_size=64, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
             box_detections_per_img=10)
NUM_CLASSES = 5


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Dict[str, str]:
    """Mask R-CNN and Faster R-CNN on the tiny test variant, registered for the length of a test."""
    names = {}
    for kind in ("maskrcnn", "fasterrcnn"):
        name = f"{kind}_test"
        monkeypatch.setitem(DETECTORS, name, DetectorVariant(name, kind, "test_mambavision", TINY_WINDOWS, 0.0))
        names[kind] = name
    return names


def _images() -> List[torch.Tensor]:
    return [torch.rand(3, 64, 96), torch.rand(3, 72, 56)]


def _targets(images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """Two boxes per image, with their filled-rectangle masks."""
    out = []
    for img in images:
        h, w = img.shape[1:]
        boxes = torch.tensor([[4.0, 6.0, w / 2, h / 2], [w / 3, h / 4, w - 2.0, h - 3.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            m[y0:y1, x0:x1] = 1
        out.append(dict(boxes=boxes, labels=torch.tensor([1, NUM_CLASSES - 1]), masks=masks))
    return out


def _state_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# the FPN and its inputs


def test_fpn_inputs_are_the_backbones_maps(tiny: Dict[str, str]) -> None:
    """Through the whole detector (its normalisation and padding), the FPN gets exactly the maps
    create_backbone's backbone computes from the same weights and the same normalised batch."""
    det = hymamba.create_detector(tiny["maskrcnn"], num_classes=NUM_CLASSES, **dict(SMALL, fpn_channels=256)).eval()
    seen: Dict[str, object] = {}
    det.backbone.body.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    det.backbone.fpn.register_forward_pre_hook(lambda m, args: seen.setdefault("maps", args[0]))
    det.backbone.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 96)]
    with torch.no_grad():
        det(images)
    x = seen["x"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert x.shape == (2, 3, 64, 96)  # already the test size and a multiple of 32: no resize, no padding
    torch.testing.assert_close(x[0], (images[0] - mean) / std)

    ref = hymamba.create_backbone("test_mambavision", window_size=TINY_WINDOWS, drop_path_rate=0.0)
    ref.load_state_dict(det.backbone.body.state_dict())
    with torch.no_grad():
        want = ref.eval()(x)
    maps = seen["maps"]
    assert list(maps) == ["0", "1", "2", "3"]
    for i, m in enumerate(want):
        assert torch.equal(maps[str(i)], m)  # exact
    out = seen["out"]
    assert list(out) == list(FPN_LEVELS)
    for key, stride in zip(FPN_LEVELS, (4, 8, 16, 32, 64)):
        assert out[key].shape == (2, 256, -(-64 // stride), -(-96 // stride)), key
    assert det.backbone.out_channels == 256 and det.backbone.in_channels == ref.out_channels


def test_fpn_needs_out_channels() -> None:
    with pytest.raises(ConfigError, match="out_channels"):
        MambaVisionFPN(torch.nn.Identity())


# ----------------------------------------------------------------------------------------------
# backbone weights


def _official_file(path: Path, backbone_sd: Dict[str, torch.Tensor]) -> Path:
    """An official-format (mmengine) detector checkpoint around ``backbone_sd``."""
    sd = {f"backbone.{k}": v.clone() for k, v in backbone_sd.items()}
    sd["roi_head.bbox_head.0.fc_cls.weight"] = torch.randn(81, 1024)
    sd["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 16, 1, 1)
    torch.save({"meta": {"dataset_meta": {"classes": ["person", "bicycle"]}, "epoch": 36}, "state_dict": sd}, path)
    return path


def test_official_dense_checkpoint_loads_the_backbone(tiny: Dict[str, str], tmp_path: Path) -> None:
    source = hymamba.create_backbone("test_mambavision", window_size=TINY_WINDOWS)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # distinct from any fresh init
    path = _official_file(tmp_path / "cascade.pth", source.state_dict())
    det = hymamba.create_detector(tiny["maskrcnn"], num_classes=NUM_CLASSES, backbone_checkpoint=path, **SMALL)
    assert _state_equal(det.backbone.body.state_dict(), source.state_dict())
    report = det.load_report
    assert sorted(report.unexpected) == ["neck.lateral_convs.0.conv.weight", "roi_head.bbox_head.0.fc_cls.weight"]
    assert report.missing == [] and report.mismatched == []


def test_misfit_backbone_checkpoint_loads_nothing(tiny: Dict[str, str], tmp_path: Path) -> None:
    sd = hymamba.create_backbone("test_mambavision").state_dict()
    key = next(k for k in sd if k.endswith("qkv.weight"))
    bad = dict(sd, **{key: torch.zeros(sd[key].shape[0] + 3, sd[key].shape[1])})
    path = _official_file(tmp_path / "bad.pth", bad)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        hymamba.create_detector(tiny["maskrcnn"], num_classes=NUM_CLASSES, backbone_checkpoint=path, **SMALL)
    missing = _official_file(tmp_path / "missing.pth", {k: v for k, v in sd.items() if k != key})
    det = hymamba.create_detector(tiny["fasterrcnn"], num_classes=NUM_CLASSES, **SMALL)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    for file in (path, missing):
        with pytest.raises(CheckpointError):
            load_backbone_weights(det.backbone.body, read_checkpoint(file))
    assert _state_equal(det.state_dict(), before)  # nothing loaded


def test_recorded_official_file_and_imagenet_weights(tiny: Dict[str, str], fixtures: Path, tiny_case_backbone: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorded mmengine Runner checkpoint (a segmenter: message_hub and all) gives its backbone;
    an official ImageNet checkpoint gives the stem and levels, the outnorms stay fresh."""
    monkeypatch.setitem(DETECTORS, "maskrcnn_tiny_case", DetectorVariant(
        "maskrcnn_tiny_case", "maskrcnn", "_tiny_case", tuple(tiny_case_backbone["backbone"]["window_size"]), 0.0))
    det = hymamba.create_detector("maskrcnn_tiny_case", num_classes=NUM_CLASSES,
                                  backbone_checkpoint=fixtures / "upernet_tiny_a.pth", **SMALL)
    file_sd = read_checkpoint(fixtures / "upernet_tiny_a.pth").state_dict
    want = {k[len("backbone."):]: v for k, v in file_sd.items() if k.startswith("backbone.")}
    assert _state_equal(det.backbone.body.state_dict(), want)
    assert det.load_report.unexpected and all(k.startswith(("decode_head.", "auxiliary_head."))
                                              for k in det.load_report.unexpected)

    det = hymamba.create_detector(tiny["fasterrcnn"], num_classes=NUM_CLASSES,
                                  backbone_checkpoint=fixtures / "tiny_a.pth.tar", **SMALL)
    imagenet = read_checkpoint(fixtures / "tiny_a.pth.tar").state_dict
    body = det.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in imagenet.items() if not k.startswith(("head.", "norm.")))
    assert all(k.startswith("outnorm") for k in det.load_report.missing)
    assert set(det.load_report.unexpected) == {k for k in imagenet if k.startswith(("head.", "norm."))}


# ----------------------------------------------------------------------------------------------
# training and inference


def test_maskrcnn_trains(tiny: Dict[str, str]) -> None:
    det = hymamba.create_detector(tiny["maskrcnn"], num_classes=NUM_CLASSES, **SMALL).train()
    images = _images()
    losses = det(images, _targets(images))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    watched = {n: p.detach().clone() for n, p in det.named_parameters()
               if n in ("backbone.body.patch_embed.conv_down.0.weight", "backbone.fpn.layer_blocks.0.0.weight",
                        "roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight")}
    assert len(watched) == 4
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3, weight_decay=0.05)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    params = dict(det.named_parameters())
    for n, before in watched.items():
        assert not torch.equal(params[n].detach(), before), n


def test_inference_returns_one_dict_per_image(tiny: Dict[str, str]) -> None:
    images = _images()
    for kind, keys in (("maskrcnn", {"boxes", "labels", "scores", "masks"}),
                       ("fasterrcnn", {"boxes", "labels", "scores"})):
        det = hymamba.create_detector(tiny[kind], num_classes=NUM_CLASSES, box_score_thresh=0.0, **SMALL).eval()
        with torch.no_grad():
            out = det(images)
        assert len(out) == 2
        for img, res in zip(images, out):
            h, w = img.shape[1:]
            assert set(res) == keys
            n = len(res["boxes"])
            assert 0 < n <= SMALL["box_detections_per_img"]  # scores ~1/classes > 0 with fresh heads
            assert res["boxes"].shape == (n, 4) and res["scores"].shape == res["labels"].shape == (n,)
            assert res["boxes"][:, 0::2].max() <= w and res["boxes"][:, 1::2].max() <= h  # the input's size
            assert int(res["labels"].min()) >= 1 and int(res["labels"].max()) < NUM_CLASSES
            if "masks" in res:
                assert res["masks"].shape == (n, 1, h, w)


# ----------------------------------------------------------------------------------------------
# whole-detector weights, names, records


def test_checkpoint_round_trip(tiny: Dict[str, str], tmp_path: Path) -> None:
    det = hymamba.create_detector(tiny["maskrcnn"], num_classes=NUM_CLASSES, **SMALL).eval()
    path = save_safetensors(det.state_dict(), tmp_path / "det.safetensors")
    again = hymamba.create_detector(tiny["maskrcnn"], checkpoint_path=path, **SMALL).eval()  # classes from the file
    assert _state_equal(again.state_dict(), det.state_dict())
    assert again.load_report.ok
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = det.backbone(x), again.backbone(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError):  # another class count does not fit, strictly
        hymamba.create_detector(tiny["maskrcnn"], num_classes=3, checkpoint_path=path, **SMALL)
    with pytest.raises(CheckpointError):  # the mask head is not a Faster R-CNN's
        hymamba.create_detector(tiny["fasterrcnn"], checkpoint_path=path, **SMALL)
    # our detector's backbone (backbone.body.*) into another kind of detector
    faster = hymamba.create_detector(tiny["fasterrcnn"], num_classes=NUM_CLASSES, backbone_checkpoint=path, **SMALL)
    assert _state_equal(faster.backbone.body.state_dict(), det.backbone.body.state_dict())
    assert "rpn.head.conv.0.0.weight" in faster.load_report.unexpected


def test_names_and_overrides(tiny: Dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="maskrcnn_mambavision_t.*fasterrcnn_mambavision_b"):
        hymamba.create_detector("cascade_mambavision_t")
    with pytest.raises(ConfigError, match="not both"):
        hymamba.create_detector(tiny["maskrcnn"], checkpoint_path=tmp_path / "a", backbone_checkpoint=tmp_path / "b")
    det = hymamba.create_detector(tiny["fasterrcnn"], frozen_stages=1, norm_eval=True, min_size=96, max_size=160,
                                  fpn_channels=64)
    body = det.backbone.body
    assert body.frozen_stages == 1 and body.norm_eval and det.backbone.out_channels == 64
    assert not any(p.requires_grad for p in body.patch_embed.parameters())
    assert det.transform.min_size == (96,) and det.transform.max_size == 160
    assert det.roi_heads.box_predictor.cls_score.out_features == 91 and det.load_report is None
    assert body.window_size == TINY_WINDOWS
    assert [s for s in det.rpn.anchor_generator.sizes] == [(32,), (64,), (128,), (256,), (512,)]
    assert det.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]


def test_records() -> None:
    assert {n for n in DETECTORS if "mambavision" in n} == {
        f"{k}_mambavision_{s}" for k in ("maskrcnn", "fasterrcnn") for s in "tsb"}
    for size, letter, dpr, lr, box, mask in (("tiny", "t", 0.2, 1e-4, 51.1, 44.3),
                                             ("small", "s", 0.3, 1e-4, 52.3, 45.2),
                                             ("base", "b", 0.5, 2e-4, 52.8, 45.7)):
        for kind in ("maskrcnn", "fasterrcnn"):
            d = DETECTORS[f"{kind}_mambavision_{letter}"]
            assert d.kind == kind and d.backbone in VARIANTS and d.backbone == f"mambavision_{letter}"
            assert d.window_size == (8, 8, 112, 56) and d.drop_path_rate == dpr
            assert (d.lr, d.weight_decay, d.optimizer) == (lr, 0.05, "adamw")
            assert (d.official_box_ap, d.official_mask_ap) == (box, mask)
            assert d.official_name == f"cascade_mask_rcnn_mamba_vision_{size}_3x_coco"
            assert d.url.endswith(f"{d.official_name}/resolve/main/{d.official_name}.pth")
            assert (d.min_size, d.max_size, d.num_classes, d.fpn_channels) == (800, 1333, 91, 256)


def test_backbone_attention_uses_sdpa(tiny: Dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attention block of the detector's backbone runs torch's scaled_dot_product_attention
    (flash / memory-efficient kernels on GPUs; this matters for the 112x112-window stage at 800x1333)."""
    det = hymamba.create_detector(tiny["fasterrcnn"], num_classes=NUM_CLASSES, **SMALL).eval()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        det.backbone(torch.rand(1, 3, 64, 96))
    blocks = sum(isinstance(m, Attention) for m in det.backbone.body.modules())
    assert blocks > 0 and len(calls) == blocks
    source = (Path(hymamba.__file__).parent / "models" / "layers.py").read_text()
    assert "F.scaled_dot_product_attention(" in source


@pytest.mark.parametrize("kind", ["maskrcnn", "fasterrcnn"])
def test_head_channels_sets_the_heads_width(tiny: Dict[str, str], kind: str) -> None:
    """head_channels narrows the box head's fc layers and the mask head's convs; the detector still trains."""
    det = hymamba.create_detector(tiny[kind], num_classes=NUM_CLASSES, head_channels=24, **SMALL)
    heads = det.roi_heads
    assert heads.box_head.fc6.out_features == 24 and heads.box_predictor.cls_score.out_features == NUM_CLASSES
    if kind == "maskrcnn":
        convs = [m for m in heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [m.out_channels for m in convs] == [24] * 4
        assert heads.mask_predictor.mask_fcn_logits.out_channels == NUM_CLASSES
    with pytest.raises(ConfigError):
        hymamba.create_detector(tiny[kind], num_classes=NUM_CLASSES, head_channels=0, **SMALL)


def test_attention_runs_the_flash_kernel_on_cpu(tiny: Dict[str, str]) -> None:
    """On CPU, PyTorch serves the backbone's SDPA calls with its flash kernel, forward and backward,
    in float32 and bfloat16: the full score matrix (5 GiB per layer in float32 for the official
    12,544-token window at 800x1333) is never built."""
    from torch.profiler import ProfilerActivity, profile

    det = hymamba.create_detector(tiny["fasterrcnn"], num_classes=NUM_CLASSES, **SMALL)
    x = torch.rand(1, 3, 64, 96)
    blocks = sum(isinstance(m, Attention) for m in det.backbone.body.modules())
    for dtype in (None, torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU]) as prof, \
                torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            sum(m.float().sum() for m in det.backbone(x).values()).backward()
        names = [e.key for e in prof.key_averages()]
        counts = {e.key: e.count for e in prof.key_averages()}
        assert counts.get("aten::_scaled_dot_product_flash_attention_for_cpu") == blocks, (dtype, names)
        assert counts.get("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == blocks, (dtype, names)
        assert "aten::_scaled_dot_product_attention_math" not in counts, dtype
