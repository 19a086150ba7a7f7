"""optimize_for_inference: BatchNorm folding keeps the outputs."""
from __future__ import annotations

import pytest
import torch

import hymamba
from hymamba.models.fuse import optimize_for_inference

from conftest import load_case


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_model_matches_official_fixture(name: str, channels_last: bool) -> None:
    case = load_case(name)
    model = hymamba.MambaVision(**dict(case["config"], layer_scale_conv=0.5))
    report = hymamba.load_checkpoint(model, case["checkpoint_path"], strict=False)
    assert not report.mismatched and all("gamma" in k for k in report.missing)
    model.eval()
    fast = optimize_for_inference(model, channels_last=channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.levels.modules())
    x = case["tensors"]["input"].float()
    with torch.no_grad():
        ref, got = model(x), fast(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    # the original is untouched and still the official model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.levels.modules())


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
    assert torch.isfinite(low).all()
    assert torch.equal(low[:2].argmax(1), ref[:2].argmax(1))
    assert (low.argmax(1) == ref.argmax(1)).float().mean() >= 0.97
    assert (low - ref).abs().max() <= 0.05 * ref.abs().max()
