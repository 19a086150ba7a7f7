"""optimize_for_inference: BatchNorm folding keeps the outputs."""
from __future__ import annotations

import pytest
import torch

import hymamba
from hymamba.models.fuse import optimize_for_inference
from hymamba.models.layers import ConvBlock

from conftest import load_case


def _official_with_layer_scale(case) -> hymamba.MambaVision:
    """The official fixture model built with a conv layer scale whose gamma is random (not 1), and
    each ConvBlock's last BatchNorm affine divided by that gamma: gamma * BN'(x) == BN(x), so this
    is still exactly the official model, but folding it must fold a non-trivial gamma."""
    model = hymamba.MambaVision(**dict(case["config"], layer_scale_conv=0.5))
    report = hymamba.load_checkpoint(model, case["checkpoint_path"], strict=False)
    assert not report.mismatched and report.missing and all("gamma" in k for k in report.missing)
    g = torch.Generator().manual_seed(0)
    blocks = [m for m in model.modules() if isinstance(m, ConvBlock)]
    assert blocks
    with torch.no_grad():
        for blk in blocks:
            gamma = torch.rand(blk.gamma.shape, generator=g, dtype=torch.float64) * 1.5 + 0.25  # [0.25, 1.75)
            blk.gamma.copy_(gamma)
            blk.norm2.weight.copy_(blk.norm2.weight.double() / gamma)
            blk.norm2.bias.copy_(blk.norm2.bias.double() / gamma)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_model_matches_official_fixture(name: str, channels_last: bool) -> None:
    """The folded model (stem and ConvBlock BatchNorms and layer-scale gammas in the convs)
    reproduces the recorded official logits: float32 within atol 1e-4, float64 within rtol 1e-6."""
    case = load_case(name)
    exp = case["tensors"]
    model = _official_with_layer_scale(case)
    fast = optimize_for_inference(model, channels_last=channels_last)
    # every BatchNorm that follows a convolution is gone (the final one, before pooling, stays)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for part in (fast.patch_embed, fast.levels)
                   for m in part.modules())
    assert all(m.gamma is None for m in fast.modules() if isinstance(m, ConvBlock))
    with torch.no_grad():
        got = fast(exp["input"].float())
    torch.testing.assert_close(got, exp["logits"].float(), rtol=0, atol=1e-4)
    # the original is untouched (BatchNorms and gammas still there) and still the official model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.levels.modules())
    assert all(m.gamma is not None for m in model.modules() if isinstance(m, ConvBlock))
    with torch.no_grad():
        torch.testing.assert_close(model(exp["input"].float()), exp["logits"].float(), rtol=0, atol=1e-4)
    fast64 = optimize_for_inference(model.double(), channels_last=channels_last)
    with torch.no_grad():
        got64 = fast64(exp["input"])
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, exp["logits"], rtol=1e-6, atol=1e-10)


def test_official_model_unchanged_by_folding() -> None:
    case = load_case("tiny_a")
    model = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(model, case["checkpoint_path"])
    fast = optimize_for_inference(model.double())
    with torch.no_grad():
        got = fast(case["tensors"]["input"])
    torch.testing.assert_close(got, case["tensors"]["logits"], rtol=1e-6, atol=1e-10)


def test_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="MambaVision"):
        optimize_for_inference(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_bf16_autocast_agrees_with_float32(name: str) -> None:
    """bf16 autocast on CPU (scan in float32): same top-1 as float32 on the fixture images and on
    nearly all of 254 random ones (measured: 99.6% and 100%)."""
    case = load_case(name)
    model = hymamba.MambaVision(**case["config"]).eval()
    hymamba.load_checkpoint(model, case["checkpoint_path"])
    fixture = case["tensors"]["input"].float()
    x = torch.cat([fixture, torch.randn(254, *fixture.shape[1:])])
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    # the float32 reference is itself the official model on the fixture images
    torch.testing.assert_close(ref[:2], case["tensors"]["logits"].float(), rtol=0, atol=1e-4)
    assert torch.isfinite(low).all()
    assert torch.equal(low[:2].argmax(1), ref[:2].argmax(1))
    assert (low.argmax(1) == ref.argmax(1)).float().mean() >= 0.97
    assert (low - ref).abs().max() <= 0.05 * ref.abs().max()
