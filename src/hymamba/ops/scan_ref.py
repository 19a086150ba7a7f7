"""The selective scan's reference recurrence, its input checks and its compute dtype (one copy of each).


Shapes: ``u``, ``delta``: (batch, dim, L); ``A``: (dim, N); ``B``, ``C``: (batch, N, L);
``D``, ``delta_bias``: (dim,). Semantics follow ``mamba_ssm``'s ``selective_scan_ref``::

    delta <- softplus(delta + delta_bias)          (bias / softplus optional)
    h_0 = 0
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h_t: (batch, dim, N)
    y_t = sum_n C_t[n] * h_t[..., n] + D * u_t

Everything is computed in float64 if any input is float64, otherwise in float32
(also under autocast); the result is cast back to ``u.dtype``.

Every implementation (``scan_fast``, ``scan_cpu``, ``dispatch``) checks its inputs with
:func:`check_inputs` and computes in :func:`compute_dtype`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["autocast_off", "check_inputs", "compute_dtype", "differentiable_backward", "scan_ref",
           "selective_scan_ref", "step_inputs"]


# --------------------------------------------------------------------------- helpers
def check_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    *,
    caller: str = "selective_scan",
    device_type: str | None = None,
) -> None:
    """Raise ValueError (expected vs found) unless the shapes/dtypes form a valid scan.

    ``caller`` starts each message; ``device_type`` (e.g. ``"cpu"`` for the C++ kernel) also
    requires every tensor to live on that kind of device.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}
    for key, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise ValueError(f"{caller}: {key} must be a Tensor; found {type(t).__name__}")
        if t is not None and device_type is not None and t.device.type != device_type:
            raise ValueError(f"{caller}: {device_type.upper()} tensors only, but {key} is on {t.device}")
    if u.dim() != 3:
        raise ValueError(f"{caller}: u must be (batch, dim, L); found shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(
            f"{caller}: A must be (dim, N) with dim={dim}; found shape {tuple(A.shape)}"
        )
    n = A.shape[1]
    expected: dict[str, tuple[Tensor | None, tuple[int, ...], str]] = {
        "delta": (delta, (batch, dim, length), "(batch, dim, L)"),
        "B": (B, (batch, n, length), "(batch, N, L)"),
        "C": (C, (batch, n, length), "(batch, N, L)"),
        "D": (D, (dim,), "(dim,)"),
        "delta_bias": (delta_bias, (dim,), "(dim,)"),
    }
    for name, (t, shape, notation) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{caller}: {name} must be {notation} = {shape}; found shape {tuple(t.shape)}"
            )
    for name, t in {"u": u, "A": A, **{k: v[0] for k, v in expected.items()}}.items():
        if t is not None and (not t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{caller}: {name} must be a real floating-point tensor; found {t.dtype}")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Disable autocast so the scan's matmuls stay in the compute dtype."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()



# ------------------------------------------------------------------------- reference
def step_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None,
                delta_softplus: bool, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """What the recurrence's steps read, in ``dtype``: (delta with its bias and softplus, u, A, B, C)."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt, u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)


def scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    dtype = compute_dtype(u, delta, A, B, C, D, delta_bias)
    with autocast_off(u.device):
        dt, u_, A_, B_, C_ = step_inputs(u, delta, A, B, C, delta_bias, delta_softplus, dtype)
        h = u_.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, dim, N)
        ys = []
        for t in range(u.shape[2]):
            # h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
            decay = torch.exp(dt[:, :, t, None] * A_)
            h = decay * h + (dt[:, :, t] * u_[:, :, t])[:, :, None] * B_[:, None, :, t]
            # y_t = sum_n C_t[n] * h_t[..., n]
            ys.append((h * C_[:, None, :, t]).sum(-1))
        y = torch.stack(ys, dim=-1) if ys else u_.new_zeros(u.shape)
        if D is not None:
            y = y + D.to(dtype)[:, None] * u_
    return y.to(u.dtype)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Reference scan: the sequential recurrence over L, differentiated by autograd.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias: (dim,).
    Returns y: (batch, dim, L) in ``u.dtype``. Slow (autograd through L tiny steps).
    """
    check_inputs(u, delta, A, B, C, D, delta_bias)
    return scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)


def differentiable_backward(
    saved: tuple[Tensor | None, ...],
    grad_y: Tensor,
    delta_softplus: bool,
    needs_input_grad: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Gradients of the scan built from the reference recurrence, so that they can be
    differentiated again: what the fast and compiled backwards use when autograd records the
    backward pass (``create_graph=True``: gradient penalties, double backward). Their own
    kernels are not differentiable; this is as slow as the reference, and exact.

    Args:
        saved: the scan's inputs (u, delta, A, B, C, D, delta_bias) as saved for backward.
        grad_y: gradient of the output.
        delta_softplus: the forward's flag.
        needs_input_grad: per input (at least 7 entries), whether its gradient is wanted.
    Returns:
        Seven gradients (None where not wanted) followed by None for ``delta_softplus``.
    """
    wanted = [i for i, t in enumerate(saved) if t is not None and needs_input_grad[i]]
    with torch.enable_grad():
        y = scan_ref(*saved, delta_softplus)
        found = torch.autograd.grad(y, [saved[i] for i in wanted], grad_y, create_graph=True,
                                    allow_unused=True)
    grads: list[Tensor | None] = [None] * len(saved)
    for i, g in zip(wanted, found):
        grads[i] = torch.zeros_like(saved[i]) if g is None else g
    return tuple(grads) + (None,)
