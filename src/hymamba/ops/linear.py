"""Linear layers through oneDNN on CPU.

On CPU, ``F.linear`` in float32 runs MKL's sgemm. For the GEMM shapes of MambaVision's token
levels (a few dozen to a few thousand tokens, 320-2560 features) oneDNN's matmul was as fast or
faster on the machine we measured: up to 1.35x with the weight as it is, up to 1.45x with the
weight pre-packed into oneDNN's blocked layout (``benchmarks/bench_linear.py``). This module routes a linear layer
through ``torch.ops.mkldnn._linear_pointwise`` (the oneDNN linear that PyTorch's own compiler
uses) where that pays, with its own backward, and falls back to ``F.linear`` everywhere else.

It also has two memory-saving compositions for training, :func:`layer_norm_linear` and
:func:`gelu_linear`, which recompute a LayerNorm or a GELU in backward instead of keeping its
output alive between forward and backward.

Implementations (``impl``):

* ``"auto"`` (default): oneDNN for CPU float32 tensors when both weight dimensions are at least
  :data:`MIN_FEATURES` (smaller GEMMs are faster in MKL), outside autocast and outside any
  tracing/compiling/exporting, any torch-function or dispatch mode and torch.func transforms
  (torch.compile, torch.export, jit, ONNX, FLOP counters, torch.func.grad/vmap see plain
  ``F.linear``);
  ``F.linear`` otherwise. ``HYMAMBA_LINEAR_IMPL`` overrides ``"auto"`` process-wide.
* ``"torch"``: stock layers: always ``F.linear``, and :func:`layer_norm_linear` /
  :func:`gelu_linear` are the plain compositions.
* ``"onednn"``: oneDNN for every CPU float32 call whatever its size (used by the tests); a clear
  error for anything else.

Gradients: the input gradient also runs through oneDNN; the weight gradient stays an MKL ``mm``
(faster there for the reduction over tokens).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from hymamba.errors import ConfigError, KernelUnavailable

__all__ = ["LINEAR_IMPLS", "MIN_FEATURES", "FastLinear", "gelu_linear", "layer_norm_linear", "linear",
           "linear_impl_for", "onednn_linear_available"]

LINEAR_IMPLS = ("auto", "torch", "onednn")
MIN_FEATURES = 128
_ENV_VAR = "HYMAMBA_LINEAR_IMPL"

_available: Optional[tuple[bool, Optional[str]]] = None
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _check_onednn() -> tuple[bool, Optional[str]]:
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False, "this PyTorch build has no torch.ops.mkldnn._linear_pointwise"
    try:  # a smoke test: the op exists and agrees with F.linear, packed and unpacked
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((3, 16), (8, 16), (8,)))
        want = F.linear(x, w, b)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        for weight in (w, packed):
            got = op(x, weight, b, "none", [], "")
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                return False, "oneDNN's linear disagreed with F.linear in a self-test"
    except Exception as exc:  # an old or unusual build: fall back, never fail
        return False, f"oneDNN's linear failed a self-test ({type(exc).__name__}: {exc})"
    return True, None


def onednn_linear_available() -> tuple[bool, Optional[str]]:
    """``(True, None)`` when the oneDNN linear works in this process, else ``(False, reason)``."""
    global _available
    if _available is None:
        _available = _check_onednn()
    return _available


def _onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    """y = x W^T + b with oneDNN forward and input gradient, MKL weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:  # through linear(): differentiable again under create_graph=True
            grad_x = linear(grad2, weight.t(), None, "onednn").view(x.shape)
        grad_w, grad_b = _weight_grads(grad2, x, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b


def _functorch_active() -> bool:
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _skip_onednn() -> bool:
    """True while tracing, compiling, exporting, under a torch-function/dispatch mode (FLOP
    counters, fake tensors) or a torch.func transform (grad, vmap): those must see plain
    ``F.linear``."""
    return (
        torch._C._is_torch_function_mode_enabled()
        or _get_current_dispatch_mode() is not None
        or _functorch_active()
        or torch.compiler.is_compiling()
        or _is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


def _effective_impl(impl: str) -> str:
    """``impl``, with ``"auto"`` overridden by ``HYMAMBA_LINEAR_IMPL`` when that is set."""
    if impl == "auto":
        env = os.environ.get(_ENV_VAR)
        if env:
            if env not in LINEAR_IMPLS:
                raise ConfigError(f"{_ENV_VAR}={env!r} is not a valid linear impl; expected one of {LINEAR_IMPLS}")
            return env
    return impl


def _use_onednn(x: Tensor, weight: Tensor, impl: str) -> bool:
    # is_compiling() first: torch.compile folds it to True and traces plain F.linear, without
    # graph breaks on the checks below
    if torch.compiler.is_compiling() or impl == "torch" or not isinstance(x, Tensor):
        return False
    impl = _effective_impl(impl)
    if impl == "torch":
        return False
    if impl == "auto":
        return (
            x.is_cpu
            and x.dtype is torch.float32
            and weight.dtype is torch.float32
            and weight.shape[0] >= MIN_FEATURES
            and weight.shape[1] >= MIN_FEATURES
            and not torch.is_autocast_enabled("cpu")
            and not _skip_onednn()
            and onednn_linear_available()[0]
        )
    if impl != "onednn":
        raise ConfigError(f"linear impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    ok, reason = onednn_linear_available()
    if not ok:
        raise KernelUnavailable(f"linear impl 'onednn' was requested but {reason}; use impl='auto' or 'torch'")
    if not (x.is_cpu and weight.is_cpu and x.dtype is torch.float32 and weight.dtype is torch.float32):
        raise KernelUnavailable(
            f"linear impl 'onednn' runs CPU float32 tensors only, got {x.device.type} {x.dtype} input and "
            f"{weight.device.type} {weight.dtype} weight; use impl='auto', which picks F.linear for these"
        )
    if torch.is_autocast_enabled("cpu") or _skip_onednn():
        return False  # autocast and tracers need the op they know; same maths
    return True


def _needs_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def linear_impl_for(x: Tensor, weight: Tensor, impl: str = "auto") -> str:
    """Which implementation :func:`linear` uses for these tensors: ``"onednn"`` or ``"torch"``."""
    return "onednn" if _use_onednn(x, weight, impl) else "torch"


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where ``impl`` allows and it pays.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        impl: ``"auto"``, ``"torch"`` or ``"onednn"`` (see the module docstring).
    """
    if not _use_onednn(x, weight, impl):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _OneDNNLinearFn.apply(x, weight, bias)
    return _onednn(x, weight, bias)


# --------------------------------------------------------------------------------------------
# memory-saving compositions: recompute a cheap elementwise op in backward instead of keeping
# its output alive until backward


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...)
        return False


def _recompute_applies(impl: str, x: Tensor, *params: Optional[Tensor]) -> bool:
    """Use the recomputing functions: not impl 'torch' (stock layers), gradients wanted, plain
    eager mode (autocast, tracers, compilers and exporters get the plain composition, which they
    know how to handle)."""
    return (
        _effective_impl(impl) != "torch"
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not _autocast_enabled(x.device.type)
        and not _skip_onednn()
        and any(t is not None and t.requires_grad for t in (x,) + params)
    )


def _weight_grads(grad2: Tensor, inp: Tensor, need_w: bool, need_b: bool) -> tuple:
    grad_w = grad2.t().mm(inp.reshape(-1, inp.shape[-1])) if need_w else None
    return grad_w, (grad2.sum(0) if need_b else None)


class _LayerNormLinearFn(torch.autograd.Function):
    """linear(layer_norm(x)) keeping x for backward but not the normalised x (recomputed)."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w, b, impl):  # type: ignore[override]
        xn, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w)
        ctx.eps, ctx.impl, ctx.has_b = eps, impl, b is not None
        return linear(xn, w, b, impl)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, mean, rstd, ln_w, ln_b, w = ctx.saved_tensors
        need_x, need_lnw, need_lnb, _, need_w, need_b = ctx.needs_input_grad[:6]
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_b = None
        if need_w or need_b:
            xn = torch.native_layer_norm(x, (x.shape[-1],), ln_w, ln_b, ctx.eps)[0]
            grad_w, grad_b = _weight_grads(grad2, xn, need_w, need_b and ctx.has_b)
        grad_x = grad_lnw = grad_lnb = None
        if need_x or need_lnw or need_lnb:
            grad_xn = linear(grad, w.t(), None, ctx.impl)
            grad_x, grad_lnw, grad_lnb = torch.ops.aten.native_layer_norm_backward(
                grad_xn, x, [x.shape[-1]], mean, rstd, ln_w, ln_b, [need_x, need_lnw, need_lnb])
        return grad_x, grad_lnw, grad_lnb, None, grad_w, grad_b, None


class _GeluLinearFn(torch.autograd.Function):
    """linear(gelu(h)) (exact GELU) keeping h for backward but not gelu(h) (recomputed)."""

    @staticmethod
    def forward(ctx, h, w, b, impl):  # type: ignore[override]
        ctx.save_for_backward(h, w)
        ctx.impl, ctx.has_b = impl, b is not None
        return linear(F.gelu(h), w, b, impl)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        h, w = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_w, grad_b = _weight_grads(grad2, F.gelu(h), need_w, need_b and ctx.has_b) \
            if (need_w or need_b) else (None, None)
        grad_h = torch.ops.aten.gelu_backward(linear(grad, w.t(), None, ctx.impl), h) if need_h else None
        return grad_h, grad_w, grad_b, None


def layer_norm_linear(x: Tensor, norm: nn.LayerNorm, fc: nn.Linear, impl: str = "auto") -> Tensor:
    """``fc(norm(x))``. With gradients (plain eager mode, ``impl`` not ``"torch"``) one autograd
    function that keeps ``x`` but not ``norm(x)`` for backward, recomputing the normalisation
    there: one token-width activation less per call, same values and gradients."""
    if _recompute_applies(impl, x, norm.weight, norm.bias, fc.weight, fc.bias):
        return _LayerNormLinearFn.apply(x, norm.weight, norm.bias, norm.eps, fc.weight, fc.bias, impl)
    return fc(norm(x))


def gelu_linear(h: Tensor, fc: nn.Linear, impl: str = "auto") -> Tensor:
    """``fc(gelu(h))`` (exact GELU). With gradients (plain eager mode, ``impl`` not ``"torch"``)
    one autograd function that keeps ``h`` but not ``gelu(h)`` for backward, recomputing the GELU there: in an MLP with 4x
    expansion that is four token-width activations less, same values and gradients."""
    if _recompute_applies(impl, h, fc.weight, fc.bias):
        return _GeluLinearFn.apply(h, fc.weight, fc.bias, impl)
    return fc(F.gelu(h))


class FastLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`.

    Attributes:
        impl: ``"auto"``, ``"torch"`` or ``"onednn"``.
        prepacked: when True, calls without gradients use a copy of the weight packed in
            oneDNN's blocked layout (faster, one extra copy of the weight in memory). The packed
            copy is made on first use and remade when the weight changes; copies and pickles of
            the module drop it. :func:`hymamba.optimize_for_inference` turns this on.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, impl: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if impl not in LINEAR_IMPLS:
            raise ConfigError(f"linear impl must be one of {LINEAR_IMPLS}, got {impl!r}")
        self.impl = impl
        self.prepacked = False
        self._packed: Optional[tuple[int, int, Tensor]] = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = dict(state)
        state["_packed"] = None  # an opaque oneDNN tensor: cannot be copied or pickled
        return state

    def _packed_weight(self, batch: int) -> Tensor:
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._packed is None or self._packed[:2] != key:
            with torch.no_grad():
                self._packed = key + (torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch),)
        return self._packed[2]

    def forward(self, x: Tensor) -> Tensor:
        if not _use_onednn(x, self.weight, self.impl):
            return F.linear(x, self.weight, self.bias)
        if _needs_grad(x, self.weight, self.bias):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        if self.prepacked:
            return _onednn(x, self._packed_weight(x.numel() // max(x.shape[-1], 1)), self.bias)
        return _onednn(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = f", impl={self.impl!r}" if self.impl != "auto" else ""
        return super().extra_repr() + extra + (", prepacked=True" if self.prepacked else "")
