"""The CUDA paths: the fast scan and mamba_ssm against the reference, the model against the
official fixtures on the GPU. Skipped where no GPU is present (CI); run on a GPU machine."""
from __future__ import annotations

import pytest
import torch

import hymamba
from hymamba.ops import available_scan_impls, last_scan_impl, selective_scan

from conftest import load_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_IMPLS = [i for i in ("fast", "mamba_ssm") if torch.cuda.is_available() and i in available_scan_impls("cuda")]


def _inputs(dtype: torch.dtype, batch: int = 2, dim: int = 24, length: int = 49, n: int = 8):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g) * 0.5 - 2.0
    A = -torch.rand(dim, n, generator=g) * 3 - 0.05
    B, C = torch.randn(batch, n, length, generator=g), torch.randn(batch, n, length, generator=g)
    D, bias = torch.randn(dim, generator=g), torch.rand(dim, generator=g) * 0.1
    return [t.to("cuda", dtype).requires_grad_() for t in (u, delta, A, B, C, D, bias)]


@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_scan_matches_reference(impl: str, dtype: torch.dtype) -> None:
    if impl == "mamba_ssm" and dtype == torch.float64:
        pytest.skip("mamba_ssm's kernel takes float32/half inputs")
    got_in, ref_in = _inputs(dtype), _inputs(torch.float64)
    y = selective_scan(*got_in, delta_softplus=True, impl=impl)
    assert last_scan_impl() == impl and y.is_cuda
    y_ref = selective_scan(*ref_in, delta_softplus=True, impl="reference")
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    scale = lambda t: tol * float(t.detach().abs().max()) + tol  # noqa: E731
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=0, atol=scale(y_ref))
    for a, r in zip(got_in, ref_in):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=0, atol=scale(r.grad))


@pytest.fixture()
def no_tf32():
    """Full float32 in cuDNN convolutions (TF32 is on by default there) for the exactness check."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_model_on_cuda_matches_official(name: str, no_tf32) -> None:
    case = load_case(name)
    exp = case["tensors"]
    model = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(model, case["checkpoint_path"], strict=True)
    model = model.cuda().eval()
    with torch.no_grad():
        logits = model(exp["input"].float().cuda())
    assert last_scan_impl() in ("fast", "mamba_ssm")
    torch.testing.assert_close(logits.cpu(), exp["logits"].float(), rtol=0, atol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        half = model(exp["input"].float().cuda())
    assert half.dtype == torch.float16
    assert (half.float().argmax(-1).cpu() == exp["logits"].argmax(-1)).float().mean() >= 0.5


def test_training_step_on_cuda() -> None:
    model = hymamba.create_model("test_mambavision", num_classes=4).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(0, 4, (4,), device="cuda")
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0]
