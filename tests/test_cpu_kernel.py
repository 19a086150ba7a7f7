"""Tests for the compiled CPU selective-scan kernel (hymamba.ops.scan_cpu).

Everything is checked against a float64 sequential reference defined here.
Tests that need the kernel are skipped (with the reason) when it cannot be
built, except ``test_kernel_builds_in_ci``, which fails under ``CI`` or
``HYMAMBA_REQUIRE_CPU_KERNEL`` so that a broken build cannot go unnoticed.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hymamba.ops import scan_cpu as cpu_kernel
from hymamba.ops.scan_cpu import selective_scan_cpu

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


@pytest.fixture(scope="module")
def kernel() -> None:
    if not cpu_kernel.is_available():
        pytest.skip(f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")


def test_kernel_builds_in_ci() -> None:
    if not (os.environ.get("CI") or os.environ.get("HYMAMBA_REQUIRE_CPU_KERNEL")):
        pytest.skip("set CI or HYMAMBA_REQUIRE_CPU_KERNEL to require the compiled kernel")
    assert cpu_kernel.is_available(), cpu_kernel.unavailable_reason()
    assert cpu_kernel.unavailable_reason() is None


def test_sources_are_package_data() -> None:
    assert (cpu_kernel._CSRC_DIR / "selective_scan_cpu.cpp").is_file()


# ---------------------------------------------------------------------------
# Reference and helpers


def reference_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Sequential float64 scan with mamba_ssm selective_scan_ref semantics."""
    u, delta, A, B, C = (x.double() for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    return y if D is None else y + D.double()[:, None] * u


def make_inputs(
    batch: int,
    dim: int,
    L: int,
    N: int,
    *,
    with_D: bool = True,
    with_bias: bool = True,
    seed: int = 0,
    wide: bool = False,
    softplus: bool = True,
) -> list[Optional[Tensor]]:
    """float64 inputs (u, delta, A, B, C, D, delta_bias); wide=True spreads
    delta over [1e-4, 25] (softplus linear above 20) and A over [-50, 0.01].
    Without softplus, delta and delta_bias are made positive (a time step)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = randn(batch, dim, L)
    if wide:
        delta = torch.exp(rand(batch, dim, L) * (torch.log(torch.tensor(25.0)) - torch.log(torch.tensor(1e-4)))) * 1e-4
        A = -torch.exp(rand(dim, N) * 8 - 4.1)  # [-50, -0.017]
        A[::3, ::2] = rand(len(range(0, dim, 3)), len(range(0, N, 2))) * 0.01  # small positive entries
    else:
        delta = randn(batch, dim, L) * 1.5
        A = -rand(dim, N) * 3 - 0.05
    B = randn(batch, N, L)
    C = randn(batch, N, L)
    D = randn(dim) if with_D else None
    bias = randn(dim) * 0.5 if with_bias else None
    if not softplus:
        delta = delta.abs()
        bias = None if bias is None else bias.abs()
    return [u, delta, A, B, C, D, bias]


def rel_err(x: Tensor, ref: Tensor) -> float:
    """max |x - ref| / max |ref| (absolute error when ref is all zeros)."""
    diff = (x.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def grads_of(
    fn: Callable[..., Tensor], inputs: list[Optional[Tensor]], softplus: bool, dtype: torch.dtype, grad_out: Tensor
) -> tuple[Tensor, list[Optional[Tensor]]]:
    """Output and input gradients of fn on inputs cast to dtype."""
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
    y = fn(*leaves, delta_softplus=softplus)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [None if x is None else x.grad for x in leaves]


def check_against_reference(
    inputs: list[Optional[Tensor]], softplus: bool, dtype: torch.dtype, tol_y: float, tol_grad: float
) -> None:
    grad_out = torch.randn_like(inputs[0])
    y_ref, g_ref = grads_of(reference_scan, inputs, softplus, torch.float64, grad_out)
    y, g = grads_of(selective_scan_cpu, inputs, softplus, dtype, grad_out)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol_y, f"y: {rel_err(y, y_ref):.2e}"
    for name, x, gk, gr in zip(INPUT_NAMES, inputs, g, g_ref):
        if x is None:  # only an input left out (D or delta_bias) has no gradient
            assert gk is None and gr is None, name
            continue
        assert gr is not None and gk is not None and gk.dtype == dtype and gk.shape == gr.shape, name
        assert rel_err(gk, gr) < tol_grad, f"d{name}: {rel_err(gk, gr):.2e}"


# ---------------------------------------------------------------------------
# Forward and gradients vs the float64 reference

# batch, dim, L, N, with_D, with_bias, softplus. dim 5/13/20/33/37 are not
# multiples of the SIMD width; N = 1/3/5/13/16 exercise the state chunking.
CASES = [
    (2, 5, 1, 3, True, True, True),
    (1, 13, 2, 8, False, False, False),
    (2, 13, 7, 16, True, False, True),
    (3, 37, 37, 4, False, True, True),
    (2, 16, 49, 8, True, True, False),
    (1, 20, 196, 5, True, True, True),
    (2, 33, 196, 13, False, False, True),
    (2, 8, 17, 1, True, True, True),
    (9, 21, 7, 3, True, True, True),  # batch >= 8: a task covers a whole batch row
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}N{}{}{}{}".format(*c[:4], *("DBS"[i] if v else "-" for i, v in enumerate(c[4:]))))
def test_matches_reference(kernel: None, case: tuple, dtype: torch.dtype) -> None:
    batch, dim, L, N, with_D, with_bias, softplus = case
    inputs = make_inputs(batch, dim, L, N, with_D=with_D, with_bias=with_bias, seed=L * 7 + N, softplus=softplus)
    tol_y, tol_grad = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 2e-5)
    check_against_reference(inputs, softplus, dtype, tol_y, tol_grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "raw"])
def test_wide_value_range(kernel: None, dtype: torch.dtype, softplus: bool) -> None:
    inputs = make_inputs(2, 21, 37, 6, wide=True, seed=3, softplus=softplus)
    tol_y, tol_grad = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    check_against_reference(inputs, softplus, dtype, tol_y, tol_grad)


def test_float32_elementwise_accuracy(kernel: None) -> None:
    """Per element (not only relative to the max) on well-scaled outputs."""
    inputs = make_inputs(2, 40, 196, 8, seed=11)
    y_ref = reference_scan(*inputs, delta_softplus=True)
    y = selective_scan_cpu(*[x.float() for x in inputs], delta_softplus=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6 * y_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_inputs(kernel: None, dtype: torch.dtype) -> None:
    inputs = [None if x is None else x.to(dtype) for x in make_inputs(2, 13, 37, 8, seed=5)]
    # Reference on the rounded inputs: only the output rounding differs.
    grad_out = torch.randn(2, 13, 37)
    y_ref, g_ref = grads_of(reference_scan, inputs, True, torch.float64, grad_out)
    y, g = grads_of(selective_scan_cpu, inputs, True, dtype, grad_out)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < tol
    for name, gk, gr in zip(INPUT_NAMES, g, g_ref):
        assert gk.dtype == dtype, name
        assert rel_err(gk, gr) < 2 * tol, name


def test_mixed_dtypes(kernel: None) -> None:
    """bf16 activations with float32 parameters (the usual AMP setting)."""
    u, delta, A, B, C, D, bias = make_inputs(2, 13, 20, 4, seed=6)
    acts = [x.bfloat16().requires_grad_() for x in (u, delta, B, C)]
    params = [x.float().requires_grad_() for x in (A, D, bias)]
    y = selective_scan_cpu(acts[0], acts[1], params[0], acts[2], acts[3], params[1], params[2], delta_softplus=True)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in acts)
    assert all(x.grad.dtype == torch.float32 for x in params)
    y_ref = reference_scan(acts[0], acts[1], params[0], acts[2], acts[3], params[1], params[2], True)
    assert rel_err(y, y_ref) < 1e-2


def test_non_contiguous_inputs(kernel: None) -> None:
    batch, dim, L, N = 2, 13, 37, 8
    base = make_inputs(batch, dim, L, N, seed=8)
    u, delta, A, B, C, D, bias = (x.float() for x in base)
    # (batch, L, dim) / (batch, L, N) storage viewed as (batch, dim, L) /
    # (batch, N, L), as produced by Linear layers + transpose.
    u_nc = u.transpose(1, 2).contiguous().transpose(1, 2)
    delta_nc = delta.transpose(1, 2).contiguous().transpose(1, 2)
    B_nc = B.transpose(1, 2).contiguous().transpose(1, 2)
    C_nc = torch.repeat_interleave(C, 2, dim=1)[:, ::2]  # strided state axis
    A_nc = A.t().contiguous().t()
    D_nc = torch.stack([D, D], dim=1)[:, 0]
    assert not any(x.is_contiguous() for x in (u_nc, delta_nc, B_nc, C_nc, A_nc, D_nc))
    nc = [u_nc, delta_nc, A_nc, B_nc, C_nc, D_nc, bias]
    leaves_nc = [x.detach().requires_grad_() for x in nc]
    leaves = [x.detach().requires_grad_() for x in (u, delta, A, B, C, D, bias)]
    g = torch.randn(batch, L, dim).transpose(1, 2)  # non-contiguous upstream gradient
    y_nc = selective_scan_cpu(*leaves_nc, delta_softplus=True)
    y = selective_scan_cpu(*leaves, delta_softplus=True)
    torch.testing.assert_close(y_nc, y, rtol=0, atol=0)
    y_nc.backward(g)
    y.backward(g.contiguous())
    for name, a, b in zip(INPUT_NAMES, leaves_nc, leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=name)
    # Time axis with a stride: B of shape (batch, N, L) taken every other step.
    B_wide = torch.randn(batch, N, 2 * L)
    y1 = selective_scan_cpu(u, delta, A, B_wide[:, :, ::2], C, D, bias, True)
    y2 = selective_scan_cpu(u, delta, A, B_wide[:, :, ::2].contiguous(), C, D, bias, True)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_expanded_upstream_gradient(kernel: None) -> None:
    """y.sum().backward() feeds a stride-0 gradient into the backward kernel."""
    inputs = make_inputs(1, 13, 21, 4, seed=9)
    leaves = [x.float().requires_grad_() for x in inputs]
    selective_scan_cpu(*leaves, delta_softplus=True).sum().backward()
    ref = [x.detach().requires_grad_() for x in inputs]
    reference_scan(*ref, delta_softplus=True).sum().backward()
    for name, a, b in zip(INPUT_NAMES, leaves, ref):
        assert rel_err(a.grad, b.grad) < 2e-5, name


def test_gradcheck_float64(kernel: None) -> None:
    inputs = [x.requires_grad_() for x in make_inputs(1, 3, 5, 2, seed=10)]
    assert torch.autograd.gradcheck(lambda *xs: selective_scan_cpu(*xs, delta_softplus=True), inputs)


def test_torch_func_grad(kernel: None) -> None:
    u, delta, A, B, C, D, bias = make_inputs(2, 5, 7, 3, seed=1)
    grad_A = torch.func.grad(lambda a: selective_scan_cpu(u, delta, a, B, C, D, bias, True).sum())(A)
    ref_A = torch.func.grad(lambda a: reference_scan(u, delta, a, B, C, D, bias, True).sum())(A)
    assert rel_err(grad_A, ref_A) < 1e-10


def test_thread_count_does_not_change_results(kernel: None) -> None:
    """Per-task partial sums are reduced in a fixed order: bitwise identical."""
    inputs = [x.float().requires_grad_() for x in make_inputs(4, 40, 49, 8, seed=12)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for x in inputs:
                x.grad = None
            y = selective_scan_cpu(*inputs, delta_softplus=True)
            y.backward(torch.ones_like(y))
            results.append([y.detach()] + [x.grad.clone() for x in inputs])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_task_granularity_gives_same_results(kernel: None) -> None:
    """Batch >= 8 gives one task per batch row (dB / dC summed over the row's
    blocks per lane, then over lanes), smaller batches one task per channel
    block: only the float32 summation order differs."""
    inputs = [x.float() for x in make_inputs(8, 40, 23, 5, seed=17)]
    full = [x.clone().requires_grad_() for x in inputs]
    selective_scan_cpu(*full, delta_softplus=True).backward(torch.ones(8, 40, 23))
    for rows in (slice(0, 4), slice(4, 8)):
        half = [x[rows] if x.dim() == 3 else x for x in inputs]
        half = [x.clone().requires_grad_() for x in half]
        selective_scan_cpu(*half, delta_softplus=True).backward(torch.ones(4, 40, 23))
        for i in (0, 1):  # u, delta: per channel, identical
            assert torch.equal(half[i].grad, full[i].grad[rows]), INPUT_NAMES[i]
        for i in (3, 4):  # B, C: sums over channels
            torch.testing.assert_close(half[i].grad, full[i].grad[rows], rtol=1e-5, atol=1e-5)


def test_nan_propagates(kernel: None) -> None:
    u, delta, A, B, C, D, bias = (x.float() for x in make_inputs(1, 17, 9, 4, seed=13))
    u[0, 3, 4] = float("nan")
    y = selective_scan_cpu(u, delta, A, B, C, D, bias, True)
    assert torch.isnan(y[0, 3, 4:]).all()
    assert torch.isfinite(y[0, 3, :4]).all()
    assert torch.isfinite(y[0, torch.arange(17) != 3]).all()


def test_empty_batch(kernel: None) -> None:
    inputs = [x.float().requires_grad_() for x in make_inputs(1, 6, 5, 3, seed=14)]
    empty = [x[:0] if x.dim() == 3 else x for x in inputs]  # batch of 0
    y = selective_scan_cpu(*empty, delta_softplus=True)
    assert y.shape == (0, 6, 5)
    y.sum().backward()
    assert torch.equal(inputs[2].grad, torch.zeros(6, 3))  # dA
    assert torch.equal(inputs[5].grad, torch.zeros(6))  # dD


# ---------------------------------------------------------------------------
# torch.compile / torch.export / custom-op registration


class TinyScan(nn.Module):
    def __init__(self, dim: int = 6, N: int = 4) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = nn.Parameter(torch.ones(dim))
        self.dt_bias = nn.Parameter(torch.full((dim,), -1.0))

    def forward(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor) -> Tensor:
        A = -torch.exp(self.A_log)
        return selective_scan_cpu(u, delta, A, B, C, self.D, self.dt_bias, delta_softplus=True) * 2


def tiny_args(seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 6, 9, generator=g),
        torch.randn(2, 6, 9, generator=g),
        torch.randn(2, 4, 9, generator=g),
        torch.randn(2, 4, 9, generator=g),
    )


def test_no_grad_path_matches_autograd_path(kernel: None) -> None:
    """Without gradients the call skips the autograd.Function; same values, no graph."""
    args = [t.float() for t in make_inputs(2, 24, 13, 8)]
    want = selective_scan_cpu(*[a.clone().requires_grad_() for a in args], delta_softplus=True)
    with torch.no_grad():
        got = selective_scan_cpu(*args, delta_softplus=True)
    assert got.grad_fn is None and want.grad_fn is not None
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(selective_scan_cpu(*args, delta_softplus=True), got, rtol=0, atol=0)


def test_torch_compile(kernel: None) -> None:
    torch._dynamo.reset()
    model = TinyScan()
    compiled = torch.compile(model, fullgraph=True)
    args = tiny_args()
    leaves_c = [x.clone().requires_grad_() for x in args]
    leaves_e = [x.clone().requires_grad_() for x in args]
    y_c = compiled(*leaves_c)
    y_c.sum().backward()
    grads_c = [x.grad for x in leaves_c] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_e = model(*leaves_e)
    y_e.sum().backward()
    grads_e = [x.grad for x in leaves_e] + [p.grad for p in model.parameters()]
    # every input and parameter reaches the output: a None would compare equal to a None
    assert all(g is not None for g in grads_c + grads_e)
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_export(kernel: None) -> None:
    model = TinyScan()
    args = tiny_args(1)
    ep = torch.export.export(model, args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "hymamba.scan_cpu_fwd.default" in targets, targets
    torch.testing.assert_close(ep.module()(*args), model(*args))


def test_opcheck(kernel: None) -> None:
    inputs = [x.float() for x in make_inputs(1, 5, 4, 3, seed=15)]
    fwd_args = (*[x.requires_grad_() for x in inputs], True)
    torch.library.opcheck(torch.ops.hymamba.scan_cpu_fwd.default, fwd_args)
    no_bias = (*[x.detach() for x in inputs[:6]], None, False)
    torch.library.opcheck(torch.ops.hymamba.scan_cpu_fwd.default, no_bias)
    bwd_args = (torch.randn(1, 5, 4), *[x.detach() for x in inputs], True)
    torch.library.opcheck(torch.ops.hymamba.scan_cpu_bwd.default, bwd_args)


def test_custom_op_path_matches_eager(kernel: None) -> None:
    """The custom op (used when tracing) computes what the eager path does."""
    inputs = [x.float() for x in make_inputs(2, 13, 11, 5, seed=16)]
    leaves_a = [x.clone().requires_grad_() for x in inputs]
    leaves_b = [x.clone().requires_grad_() for x in inputs]
    y_a = torch.ops.hymamba.scan_cpu_fwd(*leaves_a, True)
    y_b = selective_scan_cpu(*leaves_b, delta_softplus=True)
    torch.testing.assert_close(y_a, y_b, rtol=0, atol=0)
    y_a.sum().backward()
    y_b.sum().backward()
    for a, b in zip(leaves_a, leaves_b):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Errors and availability reporting


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x: x.update(u=x["u"][0]), "u must be"),
        (lambda x: x.update(delta=x["delta"][:, :, :-1]), "delta must"),
        (lambda x: x.update(A=x["A"][:-1]), "A must be"),
        (lambda x: x.update(B=x["B"][:, None]), "B must be"),
        (lambda x: x.update(C=x["C"][:, :-1]), "C must be"),
        (lambda x: x.update(D=x["D"][:-1]), "D must be"),
        (lambda x: x.update(delta_bias=x["delta_bias"][None]), "delta_bias must be"),
        (lambda x: x.update(u=x["u"].to("meta")), "CPU tensors only"),
        (lambda x: x.update(B=x["B"].long()), "floating-point"),
    ],
)
def test_value_errors(mutate, message: str) -> None:
    """Checked before the kernel is needed, so these run even without it."""
    kwargs = dict(zip(INPUT_NAMES, (x.float() for x in make_inputs(2, 5, 7, 3))))
    mutate(kwargs)
    with pytest.raises(ValueError, match=message):
        selective_scan_cpu(**kwargs)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYMAMBA_DISABLE_CPU_KERNEL", "1")
    assert cpu_kernel.is_available() is False
    assert "HYMAMBA_DISABLE_CPU_KERNEL" in cpu_kernel.unavailable_reason()
    inputs = [x.float() for x in make_inputs(1, 5, 4, 3)]
    with pytest.raises(RuntimeError, match="HYMAMBA_DISABLE_CPU_KERNEL.*impl='fast'"):
        selective_scan_cpu(*inputs)


def test_build_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build() -> None:
        raise RuntimeError("no C++ compiler found (simulated)")

    monkeypatch.delenv("HYMAMBA_DISABLE_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu_kernel, "_STATE", cpu_kernel._KernelState())
    monkeypatch.setattr(cpu_kernel, "_build", failing_build)
    assert cpu_kernel.is_available() is False
    assert "no C++ compiler found (simulated)" in cpu_kernel.unavailable_reason()
    inputs = [x.float() for x in make_inputs(1, 5, 4, 3)]
    with pytest.raises(RuntimeError, match="simulated.*impl='fast'"):
        selective_scan_cpu(*inputs)


def test_build_runs_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def slow_build() -> object:
        calls.append(1)
        time.sleep(0.05)
        return object()

    monkeypatch.delenv("HYMAMBA_DISABLE_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu_kernel, "_STATE", cpu_kernel._KernelState())
    monkeypatch.setattr(cpu_kernel, "_build", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cpu_kernel.is_available())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8
    assert len(calls) == 1


def test_build_directory_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("HYMAMBA_CACHE", raising=False)
    assert cpu_kernel._build_directory("ext") is None  # torch's default
    monkeypatch.setenv("HYMAMBA_CACHE", str(tmp_path))
    assert cpu_kernel._build_directory("ext") == str(tmp_path / "torch_extensions" / "ext")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_ext"))
    assert cpu_kernel._build_directory("ext") is None  # torch reads TORCH_EXTENSIONS_DIR itself


def test_cache_name_depends_on_flags_and_source() -> None:
    a = cpu_kernel._extension_name(("-O3", "-march=native"), ())
    b = cpu_kernel._extension_name(("-O3",), ())
    assert a != b and a.startswith("hymamba_scan_cpu_")
    assert a == cpu_kernel._extension_name(("-O3", "-march=native"), ())


def test_ninja_from_the_venv_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The ninja wheel lives beside the interpreter, which is off PATH when a venv's python runs directly."""
    import os
    import shutil
    import sys

    from hymamba.ops.scan_cpu import _ensure_ninja_on_path

    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    _ensure_ninja_on_path()
    if os.path.isfile(os.path.join(os.path.dirname(sys.executable), "ninja")):
        assert shutil.which("ninja") is not None
    else:
        assert os.environ["PATH"] == str(tmp_path)


def test_first_use_under_torch_export_keeps_the_kernel(kernel) -> None:
    """A process whose first scan is traced by torch.export builds the kernel on real tensors: the
    export uses it and it stays available afterwards (its self-test once failed under the export's
    fake tensors and marked the kernel unavailable for the whole process)."""
    import subprocess
    import sys

    script = (
        "import torch, hymamba\n"
        "from hymamba.ops import kernels\n"
        "m = hymamba.create_model('test_mambavision').eval()\n"
        "x = torch.randn(2, 3, 64, 64)\n"
        "ep = torch.export.export(m, (x,), strict=False)\n"
        "ops = {str(n.target) for n in ep.graph.nodes if 'scan' in str(n.target)}\n"
        "with torch.no_grad():\n"
        "    diff = float((ep.module()(x) - m(x)).abs().max())\n"
        "print('RESULT', kernels.cpu_kernel_available(), sorted(ops), diff)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))
    assert line.startswith("RESULT True ['hymamba.scan_cpu_fwd.default']"), line
    assert float(line.split()[-1]) < 1e-5 and "unavailable" not in res.stderr
