"""Selective scan: every implementation available here against the float64 reference.

Implementations are taken from ``available_scan_impls("cpu")``, so the compiled C++
kernel ("cpu") is covered automatically wherever it builds.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import sys
import types

import pytest
import torch
from torch import Tensor, nn

from hymamba.ops import SCAN_IMPLS, available_scan_impls, last_scan_impl, selective_scan

scan_module = importlib.import_module("hymamba.ops.dispatch")
kernels = importlib.import_module("hymamba.ops.kernels")

# Allowed error per tensor (output and each gradient), relative to the largest magnitude
# of the float64 reference: max|x - x_ref| <= TOLERANCE[dtype] * max|x_ref|. Half inputs
# are compared with the reference run on the same (rounded) values, so their budget is
# mostly the rounding of the results to 8 (bf16) or 11 (fp16) mantissa bits.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}

IMPLS = available_scan_impls("cpu")
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
Inputs = dict[str, "Tensor | None"]


def make_inputs(
    batch: int,
    dim: int,
    length: int,
    n: int,
    *,
    delta: tuple[float, float] = (-4.0, 1.0),
    A: tuple[float, float] = (-3.0, -0.05),
    log_delta: bool = False,
    log_A: bool = False,
    with_D: bool = True,
    with_bias: bool = True,
    seed: int = 0,
) -> Inputs:
    """float64 leaf tensors; delta and -A drawn uniform (or log-uniform) in the given ranges."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape: tuple[int, ...], lo: float, hi: float, log: bool) -> Tensor:
        r = torch.rand(shape, generator=g, dtype=torch.float64)
        if log:  # log-uniform magnitude, with the sign of the range
            sign = 1.0 if lo > 0 else -1.0
            lo, hi = sorted((math.log(abs(lo)), math.log(abs(hi))))
            return sign * torch.exp(lo + (hi - lo) * r)
        return lo + (hi - lo) * r

    x: Inputs = {
        "u": torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
        "delta": draw((batch, dim, length), *delta, log_delta),
        "A": draw((dim, n), *A, log_A),
        "B": torch.randn(batch, n, length, generator=g, dtype=torch.float64),
        "C": torch.randn(batch, n, length, generator=g, dtype=torch.float64),
        "D": torch.randn(dim, generator=g, dtype=torch.float64) if with_D else None,
        "delta_bias": draw((dim,), -0.5, 0.5, False) if with_bias else None,
    }
    return {k: None if v is None else v.requires_grad_() for k, v in x.items()}


def cast(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    return {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}


def run(impl: str, inputs: Inputs, softplus: bool, grad_out: Tensor) -> dict[str, Tensor]:
    """{"y": output, name: gradient of <y, grad_out>} for every input that requires grad."""
    y = selective_scan(**inputs, delta_softplus=softplus, impl=impl)
    wrt = {k: v for k, v in inputs.items() if v is not None and v.requires_grad}
    grads = torch.autograd.grad(y, list(wrt.values()), grad_out.to(y.dtype))
    return {"y": y, **dict(zip(wrt, grads))}


def check(actual: dict[str, Tensor], inputs: Inputs, expected: dict[str, Tensor], tol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, a in actual.items():
        like = inputs["u"] if name == "y" else inputs[name]
        assert a.dtype == like.dtype and a.shape == like.shape, f"{name}: {a.dtype}{tuple(a.shape)}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        e = expected[name]
        err = (a.double() - e).abs().max().item()
        scale = e.abs().max().item()
        # (+1e-300: where the truth is exactly zero, e.g. dA for L=1, so must the result be)
        assert err <= tol * scale + 1e-300, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def check_against_reference(impl: str, inputs: Inputs, dtype: torch.dtype, softplus: bool) -> None:
    grad_out = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    truth_inputs = cast(cast(inputs, dtype), torch.float64)  # same rounding as the tested inputs
    expected = run("reference", truth_inputs, softplus, grad_out)
    tested = cast(inputs, dtype)
    check(run(impl, tested, softplus, grad_out), tested, expected, TOLERANCE[dtype])


# ------------------------------------------------------------------------- accuracy
CASES = [
    # batch, dim, L, N, D, delta_bias, softplus
    (2, 3, 1, 4, True, True, True),
    (2, 3, 2, 4, False, False, False),
    (1, 5, 7, 8, True, False, True),
    (2, 4, 37, 8, False, True, True),
    (2, 6, 49, 8, True, True, False),
    (1, 4, 196, 8, True, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}N{}-D{:d}-bias{:d}-softplus{:d}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl: str, dtype: torch.dtype, case: tuple) -> None:
    batch, dim, length, n, with_D, with_bias, softplus = case
    # without softplus delta is used as is: keep it positive so the state stays bounded
    delta = (-4.0, 1.0) if softplus else (1e-3, 1.0)
    inputs = make_inputs(batch, dim, length, n, delta=delta, with_D=with_D, with_bias=with_bias)
    check_against_reference(impl, inputs, dtype, softplus)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_wide_delta_range(impl: str, dtype: torch.dtype) -> None:
    # softplus input from -30 (delta ~ 1e-13) past the threshold 20 (softplus is identity)
    inputs = make_inputs(2, 8, 49, 8, delta=(-30.0, 40.0), A=(-5.0, -0.01))
    check_against_reference(impl, inputs, dtype, softplus=True)
    # raw delta from 1e-6 to 10
    inputs = make_inputs(2, 8, 49, 8, delta=(1e-6, 10.0), log_delta=True, A=(-5.0, -0.01), with_bias=False)
    check_against_reference(impl, inputs, dtype, softplus=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_wide_A_range(impl: str, dtype: torch.dtype) -> None:
    # very negative (state forgotten in one step) to tiny (state kept for the whole sequence)
    inputs = make_inputs(2, 8, 37, 8, A=(-1e3, -1e-4), log_A=True)
    check_against_reference(impl, inputs, dtype, softplus=True)
    # A of both signs: the state grows where A > 0, which must stay exact for short L
    inputs = make_inputs(2, 8, 7, 8, A=(-1.0, 0.5), delta=(1e-3, 1.0), with_bias=False)
    check_against_reference(impl, inputs, dtype, softplus=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_inputs(impl: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(2, 8, 49, 8)
    check_against_reference(impl, inputs, dtype, softplus=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs_and_partial_grads(impl: str) -> None:
    # Like the model: delta, B and C are transposed views; A and D are constants here.
    x = make_inputs(2, 6, 19, 8)
    grad_out = torch.randn(2, 6, 19, dtype=torch.float64)
    inputs = {k: v.detach() for k, v in x.items()}
    for name in ("delta", "B", "C"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    for name in ("u", "delta", "B", "C", "delta_bias"):
        inputs[name].requires_grad_()
    expected = run("reference", cast(inputs, torch.float64), True, grad_out)
    expected = {k: v for k, v in expected.items() if k in ("y", "u", "delta", "B", "C", "delta_bias")}
    check(run(impl, inputs, True, grad_out), inputs, expected, TOLERANCE[torch.float64])


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_cpu_bf16(impl: str) -> None:
    x = cast(make_inputs(2, 8, 49, 8), torch.float32)
    grad_out = torch.randn(2, 8, 49)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # float32 inputs: the scan ignores autocast and keeps full float32 accuracy
        got = run(impl, x, True, grad_out)
        # bf16 u, as produced by an autocast Linear: bf16 output, finite
        u_bf16 = nn.Linear(8, 8)(x["u"].detach().transpose(1, 2)).transpose(1, 2)
        assert u_bf16.dtype == torch.bfloat16
        y_bf16 = selective_scan(u_bf16, *(x[k] for k in NAMES[1:]), delta_softplus=True, impl=impl)
    check(got, x, run("reference", cast(x, torch.float64), True, grad_out.double()), TOLERANCE[torch.float32])
    assert y_bf16.dtype == torch.bfloat16 and torch.isfinite(y_bf16).all()
    x64 = cast(x, torch.float64)
    truth = selective_scan(u_bf16.double(), *(x64[k] for k in NAMES[1:]), delta_softplus=True, impl="reference")
    assert (y_bf16.double() - truth).abs().max() <= TOLERANCE[torch.bfloat16] * truth.abs().max()


# ----------------------------------------------------------------------- dispatching
def small_inputs() -> Inputs:
    return cast(make_inputs(2, 3, 5, 4), torch.float32)


def test_unknown_impl_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown impl 'triton'") as info:
        selective_scan(**small_inputs(), impl="triton")
    for name in SCAN_IMPLS:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("u", (2, 3), r"u must be \(batch, dim, L\); found shape \(2, 3\)"),
        ("delta", (2, 3, 6), r"delta must be \(batch, dim, L\) = \(2, 3, 5\); found shape \(2, 3, 6\)"),
        ("A", (4, 4), r"A must be \(dim, N\) with dim=3; found shape \(4, 4\)"),
        ("B", (2, 5, 5), r"B must be \(batch, N, L\) = \(2, 4, 5\); found shape \(2, 5, 5\)"),
        ("C", (1, 4, 5), r"C must be \(batch, N, L\) = \(2, 4, 5\); found shape \(1, 4, 5\)"),
        ("D", (4,), r"D must be \(dim,\) = \(3,\); found shape \(4,\)"),
        ("delta_bias", (3, 1), r"delta_bias must be \(dim,\) = \(3,\); found shape \(3, 1\)"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", "reference", "fast"])
def test_bad_shapes_raise_value_error(impl: str, name: str, shape: tuple[int, ...], message: str) -> None:
    inputs = small_inputs()
    inputs[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs, impl=impl)


def test_mamba_ssm_on_cpu_tensors_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError, match=r"impl='mamba_ssm' \(requested explicitly\) is unavailable.*impl='fast'"):
        selective_scan(**small_inputs(), impl="mamba_ssm")


def test_missing_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_cpu_kernel", (None, "simulated: no C++ compiler"))
    assert "cpu" not in available_scan_impls("cpu")
    with pytest.raises(RuntimeError, match=r"impl='cpu' \(requested explicitly\) is unavailable: simulated: no C\+\+"):
        selective_scan(**small_inputs(), impl="cpu")
    monkeypatch.setenv("HYMAMBA_SCAN_IMPL", "cpu")
    with pytest.raises(RuntimeError, match=r"impl='cpu' \(HYMAMBA_SCAN_IMPL=cpu\) is unavailable.*impl='fast'"):
        selective_scan(**small_inputs())
    monkeypatch.delenv("HYMAMBA_SCAN_IMPL")
    selective_scan(**small_inputs())
    assert last_scan_impl() == "fast"


def test_kernel_loading_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hymamba.ops.scan_cpu", None)  # makes the import fail
    module, reason = kernels._load_cpu_kernel()
    assert module is None and "could not be imported" in reason

    broken = types.ModuleType("hymamba.ops.scan_cpu")
    broken.is_available = lambda: False
    broken.unavailable_reason = lambda: "compiler exploded"
    monkeypatch.setitem(sys.modules, "hymamba.ops.scan_cpu", broken)
    module, reason = kernels._load_cpu_kernel()
    assert module is None and "compiler exploded" in reason

    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    fn, reason = kernels._load_mamba_ssm()
    assert fn is None and "mamba_ssm could not be imported" in reason


@pytest.mark.parametrize("impl", IMPLS)
def test_last_scan_impl_reports_explicit_choice(impl: str) -> None:
    selective_scan(**small_inputs(), impl=impl)
    assert last_scan_impl() == impl


def test_implementation_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(scan_module, "_logged", set())
    with caplog.at_level(logging.INFO, logger="hymamba"):
        for _ in range(3):
            selective_scan(**small_inputs(), impl="fast")
    messages = [r.getMessage() for r in caplog.records if "selective_scan: using" in r.getMessage()]
    assert messages == ["selective_scan: using impl='fast' for cpu tensors (requested explicitly)"]


def test_auto_picks_best_available_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYMAMBA_SCAN_IMPL", raising=False)
    selective_scan(**small_inputs())
    assert last_scan_impl() == ("cpu" if "cpu" in IMPLS else "fast")

    monkeypatch.setenv("HYMAMBA_SCAN_IMPL", "reference")
    selective_scan(**small_inputs())
    assert last_scan_impl() == "reference"

    monkeypatch.setenv("HYMAMBA_SCAN_IMPL", "bogus")
    with pytest.raises(ValueError, match="HYMAMBA_SCAN_IMPL='bogus'"):
        selective_scan(**small_inputs())


def test_available_scan_impls() -> None:
    assert IMPLS[:2] == ["reference", "fast"]
    assert "cpu" not in available_scan_impls("cuda")
    assert "mamba_ssm" not in available_scan_impls("cpu")


# ------------------------------------------------------------- tracing / compile / export
class TinyMamba(nn.Module):
    """A minimal module that scans its input the way MambaVision's mixer does."""

    def __init__(self, dim: int = 4, n: int = 3, impl: str = "auto") -> None:
        super().__init__()
        self.proj = nn.Conv1d(dim, 2 * n, 1)
        self.A_log = nn.Parameter(torch.randn(dim, n))
        self.D = nn.Parameter(torch.ones(dim))
        self.delta_bias = nn.Parameter(torch.zeros(dim))
        self.n, self.impl = n, impl

    def forward(self, x: Tensor) -> Tensor:  # (batch, dim, L) -> (batch, dim, L)
        B, C = self.proj(x).split(self.n, dim=1)
        A = -torch.exp(self.A_log)
        return selective_scan(x, x, A, B, C, self.D, self.delta_bias, delta_softplus=True, impl=self.impl)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_jit_trace_and_onnx_export_use_standard_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = TinyMamba().eval(), torch.randn(2, 4, 9)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    assert all(node.kind().startswith(("aten::", "prim::")) for node in traced.inlined_graph.nodes())
    torch.testing.assert_close(traced(x), model(x))

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    model(x)
    assert last_scan_impl() == "reference"


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_onnx_export_runs_in_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    model, x = TinyMamba().eval(), torch.randn(2, 4, 9)
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False)  # the TorchScript exporter needs no onnxscript
    session = ort.InferenceSession(f.getvalue())
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "fast"])
def test_torch_compile(impl: str) -> None:
    model, x = TinyMamba(impl=impl).eval(), torch.randn(2, 4, 9)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


@pytest.mark.parametrize("impl", ["auto", "fast"])
def test_torch_export(impl: str) -> None:
    model, x = TinyMamba(impl=impl).eval(), torch.randn(2, 4, 9)
    exported = torch.export.export(model, (x,))
    assert "torch.ops.hymamba." in exported.graph_module.code
    torch.testing.assert_close(exported.module()(x), model(x))


def test_custom_op_registration() -> None:
    x = make_inputs(2, 3, 5, 4)
    args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, True]
    torch.library.opcheck(torch.ops.hymamba.selective_scan_fwd.default, args)


# ----------------------------------------------------------------- double backward
def _second_order(impl: str, inputs: Inputs, softplus: bool) -> dict[str, Tensor]:
    """Gradients of a gradient penalty ||d<y, g>/du||^2 + <d<y, g>/dB, B>, every input."""
    x = cast(inputs, torch.float64)
    y = selective_scan(**x, delta_softplus=softplus, impl=impl)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    du, dB = torch.autograd.grad(y, [x["u"], x["B"]], g, create_graph=True)
    penalty = du.square().sum() + (dB * x["B"]).sum()
    wrt = {k: v for k, v in x.items() if v is not None}
    return dict(zip(wrt, torch.autograd.grad(penalty, list(wrt.values()))))


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
@pytest.mark.parametrize("softplus", [True, False])
def test_double_backward_matches_reference(impl: str, softplus: bool) -> None:
    """create_graph=True through the fast and compiled paths: second-order gradients are right
    (their kernels' backwards are not differentiable; they fall back to the reference's)."""
    inputs = make_inputs(2, 5, 11, 4, delta=(0.01, 1.0) if not softplus else (-4.0, 1.0))
    want = _second_order("reference", inputs, softplus)
    got = _second_order(impl, inputs, softplus)
    assert got.keys() == want.keys()
    for name, e in want.items():
        torch.testing.assert_close(got[name], e, rtol=1e-9, atol=1e-10 * float(e.abs().max()), msg=name)
