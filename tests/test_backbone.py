"""The dense backbone (the official ``MM_mamba_vision``): exact outputs against the recorded official
dense case, official dense and ImageNet checkpoints through ``create_backbone``, and what ours adds
(drop path, frozen stages, norm_eval, gradient checkpointing, feature info)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import DropPath

import hymamba
from hymamba.errors import CheckpointError, ConfigError
from hymamba.factory import load_backbone_weights
from hymamba.models.backbone import LayerNorm2d, MambaVisionBackbone
from hymamba.ops import available_scan_impls
from hymamba.weights.metadata import read_checkpoint

INPUTS = ["64x96", "72x56"]


@pytest.fixture(scope="module")
def dense(fixtures: Path) -> dict:
    with open(fixtures / "upernet_tiny_a.json") as f:
        case = json.load(f)
    args = {k: v for k, v in case["backbone"].items() if k != "note"}
    return dict(args=args, path=fixtures / "upernet_tiny_a.pth",
                tensors=load_file(str(fixtures / "upernet_tiny_a.expected.safetensors")))


def _fixture_backbone(dense: dict, **kwargs) -> MambaVisionBackbone:
    model = MambaVisionBackbone(**dense["args"], **kwargs)
    sd = read_checkpoint(dense["path"]).state_dict
    model.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=True)
    return model


def _max_diffs(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    diff = (out - ref).abs()
    return float(diff.max()), float((diff / ref.abs().clamp_min(1e-3)).max())


# ----------------------------------------------------------------------------------------------
# exactness against the official dense case


# (dtype, rtol, atol): float64 agrees to rounding; float32 within the official fixtures' own tolerance
TOL = {torch.float64: (1e-6, 1e-10), torch.float32: (0.0, 1e-4)}


def _check_maps(model: MambaVisionBackbone, exp: dict, hw: str, dtype: torch.dtype, device: str = "cpu") -> None:
    with torch.no_grad():
        outs = model.to(device=device, dtype=dtype).eval()(exp[f"input_{hw}"].to(device=device, dtype=dtype))
    assert len(outs) == 4
    for i, out in enumerate(outs):
        ref = exp[f"backbone{i}_{hw}"]
        assert out.is_contiguous() and out.shape == ref.shape
        torch.testing.assert_close(out.cpu(), ref.to(dtype), rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl", available_scan_impls("cpu"))
@pytest.mark.parametrize("hw", INPUTS)
def test_fixture_backbone_maps(dense: dict, hw: str, impl: str, dtype: torch.dtype) -> None:
    model = _fixture_backbone(dense, scan_impl=impl)
    assert model.window_size == (8, 8, 8, 4) and model.outnorm0.eps == 1e-5
    _check_maps(model, dense["tensors"], hw, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl, dtype", [("reference", torch.float64), ("auto", torch.float32)])
def test_fixture_backbone_maps_cuda(dense: dict, impl: str, dtype: torch.dtype) -> None:
    for hw in INPUTS:
        _check_maps(_fixture_backbone(dense, scan_impl=impl), dense["tensors"], hw, dtype, device="cuda")


def test_create_backbone_reads_the_dense_checkpoint(dense: dict, caplog) -> None:
    """The official mmengine file through the public factory: backbone.* taken, heads reported."""
    args = dense["args"]
    with caplog.at_level(logging.INFO, logger="hymamba"):
        model = hymamba.create_backbone("test_mambavision", num_heads=args["num_heads"],
                                        window_size=args["window_size"], checkpoint_path=dense["path"])
    report = model.load_report
    assert report.missing == [] and report.unexpected
    assert {k.split(".")[0] for k in report.unexpected} == {"decode_head", "auxiliary_head"}
    assert "left out 82 keys" in caplog.text and "dense checkpoint" in caplog.text
    model = model.double().eval()
    exp = dense["tensors"]
    worst = (0.0, 0.0)
    for hw in INPUTS:
        with torch.no_grad():
            outs = model(exp[f"input_{hw}"])
        for i, out in enumerate(outs):
            torch.testing.assert_close(out, exp[f"backbone{i}_{hw}"], rtol=1e-6, atol=1e-10)
            worst = tuple(max(a, b) for a, b in zip(worst, _max_diffs(out, exp[f"backbone{i}_{hw}"])))
    # the fixture's guidance for float64 runs is rtol 1e-6 (its README): on an AVX-512 machine MKL's code paths
    # move the official float32 exp(A_log) by an ulp and the token levels by 2e-9 (1.5e-7 relative); the
    # exact check, under MKL_CBWR=COMPATIBLE: test_official_fixtures.py::test_float64_is_exact_under_mkl_...
    assert worst[1] < 1e-6, worst


def test_state_dict_names_are_the_official_dense_ones(dense: dict) -> None:
    sd = read_checkpoint(dense["path"]).state_dict
    official = {k[len("backbone."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.")}
    ours = {k: tuple(v.shape) for k, v in MambaVisionBackbone(**dense["args"]).state_dict().items()}
    assert ours == official
    assert not any(k.startswith(("norm.", "head.")) for k in ours)
    assert {k.split(".")[0] for k in ours if k.startswith("outnorm")} == {f"outnorm{i}" for i in range(4)}


def test_layer_norm_2d_normalises_channels_per_pixel() -> None:
    norm = LayerNorm2d(6)
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5  # nn.LayerNorm's, not timm's 1e-6
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
        norm.bias.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    w, b = norm.weight.double().view(1, -1, 1, 1), norm.bias.double().view(1, -1, 1, 1)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(norm.double()(x), ref)


# ----------------------------------------------------------------------------------------------
# ImageNet checkpoints


def test_imagenet_checkpoint_drops_head_and_norm(fixtures: Path) -> None:
    path = fixtures / "tiny_a.pth.tar"
    model = hymamba.create_backbone("test_mambavision", checkpoint_path=path).eval()
    report = model.load_report
    assert sorted(report.unexpected) == ["head.bias", "head.weight", "norm.bias", "norm.num_batches_tracked",
                                         "norm.running_mean", "norm.running_var", "norm.weight"]
    assert sorted(report.missing) == sorted(f"outnorm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    for i in range(4):  # fresh outnorms: weight 1, bias 0
        norm = getattr(model, f"outnorm{i}")
        assert torch.equal(norm.weight, torch.ones(norm.weight.shape))
        assert torch.equal(norm.bias, torch.zeros(norm.bias.shape))
    classifier = hymamba.create_model("test_mambavision", checkpoint_path=path).eval()
    x = torch.randn(2, 3, 72, 88)
    seen = []
    hooks = [getattr(model, f"outnorm{i}").register_forward_hook(lambda m, a, o: seen.append(a[0])) for i in range(4)]
    with torch.no_grad():
        outs = model(x)
        stages = classifier.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    assert len(seen) == len(stages) == 4
    for pre, stage, out in zip(seen, stages, outs):
        torch.testing.assert_close(pre, stage, rtol=0, atol=0)
        torch.testing.assert_close(out, F.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2], eps=1e-5)
                                   .permute(0, 3, 1, 2))


def test_wrong_variant_raises_and_loads_nothing(dense: dict, fixtures: Path) -> None:
    with pytest.raises(CheckpointError, match="(?s)does not fit.*match the variant 'test_mambavision'") as err:
        hymamba.create_backbone("mambavision_nano", checkpoint_path=dense["path"])
    assert "mis-shaped" in str(err.value)
    model = MambaVisionBackbone(**hymamba.models.VARIANTS["mambavision_nano"].args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_backbone_weights(model, read_checkpoint(fixtures / "tiny_a.pth.tar"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dense_checkpoint_with_fewer_outputs(dense: dict) -> None:
    """Outnorms of maps not returned are left out (and reported); the rest is strict."""
    model = hymamba.create_backbone("test_mambavision", out_indices=(1, 3), num_heads=dense["args"]["num_heads"],
                                    window_size=dense["args"]["window_size"], checkpoint_path=dense["path"])
    assert {"backbone.outnorm0.weight", "backbone.outnorm2.bias"} <= set(model.load_report.unexpected)
    exp = dense["tensors"]
    with torch.no_grad():
        outs = model.double().eval()(exp["input_64x96"])
    torch.testing.assert_close(outs[0], exp["backbone1_64x96"], rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(outs[1], exp["backbone3_64x96"], rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# what ours adds


def _tiny(**kwargs) -> MambaVisionBackbone:
    return hymamba.create_backbone("test_mambavision", **kwargs)


def test_out_channels_and_feature_info() -> None:
    model = _tiny()
    assert model.out_channels == (16, 32, 64, 128) and model.strides == (4, 8, 16, 32)
    assert [f["module"] for f in model.feature_info] == [f"levels.{i}" for i in range(4)]
    part = _tiny(out_indices=(3, 1))
    assert part.out_indices == (1, 3) and part.out_channels == (32, 128) and part.strides == (8, 32)
    assert [f["num_chs"] for f in part.feature_info] == [32, 128]
    assert not any(k.startswith(("outnorm0", "outnorm2")) for k in part.state_dict())
    outs = part.eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 8, 12), (1, 128, 2, 3)]


def test_window_size_override() -> None:
    model = _tiny(window_size=(8, 8, 64, 32))
    assert model.window_size == (8, 8, 64, 32)
    assert [level.window_size for level in model.levels] == [8, 8, 64, 32]
    with pytest.raises(ConfigError, match="window_size"):
        _tiny(window_size=(8, 8, 64))


def test_drop_path_reaches_the_blocks() -> None:
    depths = (1, 1, 3, 2)
    for rate, expected in ((0.3, 0.3), (None, 0.2)):  # None: the 0.2 every official dense run used
        model = _tiny(drop_path_rate=rate)
        rates = [blk.drop_path.drop_prob if isinstance(blk.drop_path, DropPath) else 0.0
                 for level in model.levels for blk in level.blocks]
        torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, expected, sum(depths)))
        assert sum(isinstance(m, DropPath) for m in model.modules()) == sum(depths) - 1  # the first is 0
    assert not any(isinstance(m, DropPath) for m in _tiny(drop_path_rate=0.0).modules())


def _frozen_names(model: MambaVisionBackbone) -> set:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("stages", [-1, 0, 1, 2, 3, 4])
def test_frozen_stages(stages: int) -> None:
    model = _tiny(frozen_stages=stages, drop_path_rate=0.0).train()
    prefixes = (() if stages < 0 else ("patch_embed.",)) + tuple(f"levels.{i}." for i in range(max(stages, 0))) \
        + tuple(f"outnorm{i}." for i in range(max(stages, 0)))
    assert _frozen_names(model) == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    frozen = model.frozen_modules()
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(m.training for n, m in model.named_modules() if n and not n.startswith(tuple(p[:-1] for p in prefixes)))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    loss = sum(o.sum() for o in model(torch.randn(2, 3, 64, 64)))
    assert loss.requires_grad == (stages < 4)  # 4: everything frozen
    if loss.requires_grad:
        loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == n.startswith(prefixes), n
    for k, v in model.state_dict().items():
        if "running_" in k:  # frozen BatchNorms keep their statistics, the others learn
            assert torch.equal(v, stats[k]) == k.startswith(prefixes), k


def test_norm_eval_keeps_every_batchnorm_statistic() -> None:
    model = _tiny(norm_eval=True, frozen_stages=0).train()
    assert model.training and model.levels[2].training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.levels[0].blocks[0].conv1.weight.grad is not None  # frozen statistics, trained weights
    model.eval().train()
    assert not any(m.training for m in bns)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = _tiny(drop_path_rate=0.0).double().train()
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    weights = [torch.randn_like(o) for o in model(x)]

    def grads(checkpointing: bool) -> dict:
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        sum((o * w).sum() for o, w in zip(model(x), weights)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert all(level.grad_checkpointing for level in model.levels)
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-10, atol=1e-12, msg=n)


def test_bad_arguments() -> None:
    for kwargs, match in (({"out_indices": (0, 4)}, "out_indices"), ({"out_indices": ()}, "out_indices"),
                          ({"out_indices": (1, 1)}, "out_indices"), ({"frozen_stages": 5}, "frozen_stages"),
                          ({"frozen_stages": -2}, "frozen_stages"), ({"norm_layer": "ln"}, "norm_layer")):
        with pytest.raises(ConfigError, match=match):
            _tiny(**kwargs)
    with pytest.raises(TypeError, match="unexpected"):
        _tiny(num_classes=10)
    with pytest.raises(ConfigError, match="unknown model"):
        hymamba.create_backbone("mambavision_x")
    with pytest.raises(ConfigError, match="create_backbone"):  # the official class's pretrained="file"
        MambaVisionBackbone(**hymamba.models.VARIANTS["test_mambavision"].args, pretrained="weights.pth")
    with pytest.raises(CheckpointError, match="no official weights"):
        hymamba.create_backbone("test_mambavision", pretrained=True)


def test_official_names_and_dense_windows_build() -> None:
    model = hymamba.create_backbone("mamba_vision_T", window_size=(8, 8, 64, 32))
    assert model.out_channels == (80, 160, 320, 640) and model.drop_path_rate == 0.2
    assert sum(p.numel() for p in model.parameters()) > 25_000_000
