"""Proof of exactness: hymamba reproduces the official implementation's recorded outputs and
gradients, loading the official checkpoints through the public loader, for every scan path."""
from __future__ import annotations

import pytest
import torch

import hymamba
from hymamba.ops import available_scan_impls

from conftest import load_case

CASES = ["tiny_a", "tiny_b"]
IMPLS = available_scan_impls("cpu")
# (dtype, rtol, atol): float64 must agree to rounding; float32 within the fixture's own tolerance
TOL = {torch.float64: (1e-6, 1e-10), torch.float32: (0.0, 1e-4)}


def _model(case, impl: str, dtype: torch.dtype) -> hymamba.MambaVision:
    model = hymamba.MambaVision(**case["config"], scan_impl=impl)
    hymamba.load_checkpoint(model, case["checkpoint_path"], strict=True)
    return model.to(dtype).eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_match_official(name: str, impl: str, dtype: torch.dtype) -> None:
    case = load_case(name)
    exp = case["tensors"]
    model = _model(case, impl, dtype)
    rtol, atol = TOL[dtype]
    x = exp["input"].to(dtype)
    with torch.no_grad():
        feats, stages = model.forward_intermediates(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        direct = model(x)
    assert hymamba.last_scan_impl() == impl
    torch.testing.assert_close(logits, exp["logits"].to(dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(direct, logits, rtol=0, atol=0)
    torch.testing.assert_close(pooled, exp["pooled"].to(dtype), rtol=rtol, atol=atol)
    for i, s in enumerate(stages):
        torch.testing.assert_close(s, exp[f"stage{i + 1}"].to(dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_gradients_match_official(name: str, impl: str) -> None:
    case = load_case(name)
    exp = case["tensors"]
    model = _model(case, impl, torch.float64)
    (model(exp["input"]) * exp["loss_weight"]).sum().backward()
    grads = {k[len("grad."):]: v for k, v in exp.items() if k.startswith("grad.")}
    names = [n for n, _ in model.named_parameters()]
    assert sorted(grads) == sorted(names)
    for n, p in model.named_parameters():
        ref = grads[n].double()
        # the recorded gradients are float32: compare relative to each tensor's scale
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()) + 1e-12, msg=n)


def test_float32_gradients_close() -> None:
    case = load_case("tiny_b")
    exp = case["tensors"]
    model = _model(case, "auto", torch.float32)
    (model(exp["input"].float()) * exp["loss_weight"].float()).sum().backward()
    for n, p in model.named_parameters():
        ref = exp[f"grad.{n}"]
        torch.testing.assert_close(p.grad, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()) + 1e-7, msg=n)


def test_padding_path_is_exercised() -> None:
    """tiny_b's 72x88 input needs window padding in levels 2 and 3 (the quirk the fixture checks)."""
    case = load_case("tiny_b")
    h, w = case["input_shape"][2:]
    for level in (2, 3):
        ws = case["config"]["window_size"][level]
        side_h, side_w = h, w
        for _ in range(level + 2):  # every stride-2 conv (k3, p1) maps n -> ceil(n / 2)
            side_h, side_w = (side_h + 1) // 2, (side_w + 1) // 2
        assert side_h % ws or side_w % ws
