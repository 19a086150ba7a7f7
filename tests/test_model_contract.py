"""timm's model contract, dtypes, devices, resolutions, compile and export — on the tiny model."""
from __future__ import annotations

import pytest
import timm
import torch

import hymamba
from hymamba.models.layers import MambaVisionMixer


@pytest.fixture()
def model() -> hymamba.MambaVision:
    return hymamba.create_model("test_mambavision", num_classes=10).eval()


def test_forward_features_and_head(model) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 2)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features) and model.head_hidden_size == model.num_features
        torch.testing.assert_close(model.forward_head(feats), model(x))


def test_reset_classifier(model) -> None:
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features, 2, 2)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_pretrained_cfg(model) -> None:
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "patch_embed.conv_down.0" and cfg["classifier"] == "head"
    assert model.default_cfg == cfg and cfg["pool_size"] == (2, 2)
    assert dict(model.named_modules())[cfg["first_conv"]].in_channels == 3


def test_features_only() -> None:
    feat = timm.create_model("test_mambavision", features_only=True, out_indices=(1, 3)).eval()
    assert feat.feature_info.channels() == [32, 128] and feat.feature_info.reduction() == [8, 32]
    full = hymamba.create_model("test_mambavision", features_only=True)
    assert full.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 64, 64)
    outs = feat(x)
    assert [o.shape[1:] for o in outs] == [(32, 8, 8), (128, 2, 2)]


def test_forward_intermediates(model) -> None:
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [16, 32, 64, 128]
        # the conv levels run NHWC-strided on CPU; what the user gets is plain NCHW-contiguous
        assert all(t.is_contiguous() for t in inter) and final.is_contiguous()
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        torch.testing.assert_close(only[1], inter[2])
        nhwc = model.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[3].permute(0, 2, 3, 1))


def test_conv_layout_keeps_values() -> None:
    from hymamba.models.layers import conv_layout

    x = torch.randn(2, 5, 6, 7)
    y = conv_layout(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert conv_layout(x.double()) is not None and conv_layout(x.double()).is_contiguous()


def test_grad_checkpointing_same_outputs_and_grads() -> None:
    torch.manual_seed(0)
    a = hymamba.create_model("test_mambavision", drop_path_rate=0.0).train()
    b = hymamba.create_model("test_mambavision", drop_path_rate=0.0).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_no_weight_decay_names_exist(model) -> None:
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd and all(n in names for n in nwd)
    assert {n.rsplit(".", 1)[1] for n in nwd} == {"A_log", "D"}
    n_mixers = sum(isinstance(m, MambaVisionMixer) for m in model.modules())
    assert len(nwd) == 2 * n_mixers


def test_group_matcher_covers_every_parameter(model) -> None:
    from timm.models import group_parameters

    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        covered = [n for g in groups.values() for n in g]
        assert sorted(covered) == sorted(n for n, _ in model.named_parameters())


def test_timm_optimizer_skips_ssm_decay(model) -> None:
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for n, p in model.named_parameters():
        if n.endswith(("A_log", ".D")):
            assert id(p) in no_decay, n


@pytest.mark.parametrize("size", [(64, 64), (72, 88), (33, 47), (128, 96)])
def test_any_resolution(model, size) -> None:
    with torch.no_grad():
        y = model(torch.randn(1, 3, *size))
    assert y.shape == (1, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(model, dtype) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        y = model.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)


def test_autocast_bf16_cpu(model) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)
    assert (y.float().argmax(1) == ref.argmax(1)).float().mean() >= 0.5


def test_autocast_training_step_has_finite_grads() -> None:
    model = hymamba.create_model("test_mambavision").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 64, 64)).float().logsumexp(1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torch_export(model) -> None:
    x = torch.randn(1, 3, 64, 64)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile(model) -> None:
    model.set_linear_impl("onednn")  # compiled graphs must get F.linear (inductor packs its own)
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True)  # no graph breaks, in our code or the scan
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_set_scan_impl(model) -> None:
    model.set_scan_impl("reference")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert hymamba.last_scan_impl() == "reference"
    with pytest.raises(ValueError, match="reference"):  # rejected when set, not at the next forward
        model.set_scan_impl("nonsense")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length", [1, 2, 3, 49])
def test_depthwise_conv_same_equals_conv1d(k: int, length: int) -> None:
    from hymamba.models.layers import depthwise_conv_same

    x = torch.randn(2, length, 6, dtype=torch.float64)
    w = torch.randn(6, k, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], padding="same", groups=6).transpose(1, 2)
    torch.testing.assert_close(depthwise_conv_same(x, w), ref, rtol=1e-12, atol=1e-12)
