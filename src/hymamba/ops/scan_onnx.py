"""The selective scan as one loop for the any-size ONNX export: an ONNX ``Scan`` node.

The fixed-size export (TorchScript tracing) unrolls :func:`~hymamba.ops.scan_ref.scan_ref`'s loop
over the window's tokens: MambaVision-T's 196-token windows become thousands of nodes, which
``torch.export`` and the dynamo exporter trace and optimise slowly (tens of minutes on 2 cores).
:func:`scan_loop` computes the same recurrence with the per-token factors precomputed for all tokens
at once (the same products as the reference, so the same float results) and the recurrence itself
as ``torch.ops.higher_order.scan``, which the dynamo exporter writes as one ONNX ``Scan`` whose body
is a single step. Shapes and semantics: :mod:`hymamba.ops.scan_ref`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hymamba.ops.scan_ref import autocast_off, compute_dtype, scan_ref, step_inputs

__all__ = ["scan_loop"]

try:  # a higher-order op of torch.export (torch >= 2.6); its module is private
    from torch._higher_order_ops.scan import scan as _scan
except ImportError:  # pragma: no cover - older torch: the unrolled reference
    _scan = None


def _step(h: Tensor, xs: tuple) -> tuple:
    decay, inp, c = xs  # (batch, dim, N) each (c broadcast over dim)
    h = decay * h + inp
    return h, (h * c).sum(-1)


def scan_loop(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
              delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """:func:`~hymamba.ops.scan_ref.scan_ref` with its loop as one scan op (the reference where torch
    has none)."""
    if _scan is None:
        return scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    dtype = compute_dtype(u, delta, A, B, C, D, delta_bias)
    with autocast_off(u.device):
        dt, u_, A_, B_, C_ = step_inputs(u, delta, A, B, C, delta_bias, delta_softplus, dtype)
        # token-major (L, batch, dim, N): exp(delta_t * A) and delta_t * u_t * B_t, as the reference's steps
        decay = torch.exp(dt.permute(2, 0, 1)[..., None] * A_)
        inp = (dt * u_).permute(2, 0, 1)[..., None] * B_.permute(2, 0, 1)[:, :, None, :]
        c = C_.permute(2, 0, 1)[:, :, None, :]
        h0 = u_.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        _, ys = _scan(_step, h0, (decay, inp, c), dim=0)  # ys: (L, batch, dim)
        y = ys.permute(1, 2, 0)
        if D is not None:
            y = y + D.to(dtype)[:, None] * u_
    return y.to(u.dtype)
