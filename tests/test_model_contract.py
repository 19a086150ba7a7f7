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
    # every parameter takes part in the loss (none expected without a gradient), so a missing
    # gradient is a defect, not two Nones that assert_close would call equal
    assert [n for n, p in a.named_parameters() if p.grad is None] == []
    assert [n for n, p in b.named_parameters() if p.grad is None] == []
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


def _assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """max |got - ref| <= tol * max |ref|: an error bound relative to the values' own scale (random-init
    logits are ~0.03, so any fixed atol of 0.1 would accept even an all-zero output)."""
    scale = float(ref.abs().max())
    err = float((got.double() - ref.double()).abs().max())
    assert scale > 0 and err <= tol * scale, f"max error {err:.3g} > {tol} * max |ref| ({scale:.3g})"


def _agree_where_separated(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Same top-1 on every row whose top-2 margin exceeds twice the error bound (at least one row)."""
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * float(ref.abs().max())
    assert clear.any(), "no well-separated row: the argmax check would be empty"
    assert torch.equal(got.float().argmax(1)[clear], ref.argmax(1)[clear])


# max |error| / max |logit|, measured on the tiny model (random init): bf16 weights 1.4%, float16
# weights 0.13%, bf16 autocast 1.1%; on the official fixtures (O(1) logits): 1.5%, 0.14%, 0.9%
LOW_TOL = {torch.bfloat16: 0.04, torch.float16: 0.005}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(model, dtype) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        y = model.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    _assert_close_to_scale(y.float(), ref, LOW_TOL[dtype])
    _agree_where_separated(y, ref, LOW_TOL[dtype])


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_match_official_logits(name, dtype) -> None:
    """The official fixture weights (well scaled: every part of the network shows, logits O(1)) cast
    to bf16/fp16 reproduce the recorded official float64 logits within that dtype's rounding."""
    from conftest import load_case

    case = load_case(name)
    exp = case["tensors"]
    model = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(model, case["checkpoint_path"], strict=True)
    model = model.to(dtype).eval()
    with torch.no_grad():
        y = model(exp["input"].to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    _assert_close_to_scale(y.float(), exp["logits"], LOW_TOL[dtype])
    assert torch.equal(y.float().argmax(1), exp["logits"].argmax(1))  # top-2 margins >= 8% of the scale


def test_autocast_bf16_cpu(model) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert torch.isfinite(y).all()
    _assert_close_to_scale(y.float(), ref, LOW_TOL[torch.bfloat16])
    assert (y.float().argmax(1) == ref.argmax(1)).float().mean() >= 0.5
    _agree_where_separated(y, ref, LOW_TOL[torch.bfloat16])


def test_autocast_training_step_has_finite_grads() -> None:
    model = hymamba.create_model("test_mambavision").train()
    full = hymamba.create_model("test_mambavision").train()
    full.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    full(x).logsumexp(1).mean().backward()
    # every parameter takes part in the loss: none is expected to be left without a gradient
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()] == []
    # and they are the float32 gradients within bf16 rounding (measured: 3% of the norm)
    g_low = torch.cat([p.grad.flatten() for p in model.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in full.parameters()])
    assert float((g_low - g_ref).norm()) <= 0.1 * float(g_ref.norm())


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
