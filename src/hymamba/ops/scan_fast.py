"""The fast selective scan: L-major, cache-blocked pure PyTorch with a hand-written backward.

Registered as the custom ops ``hymamba::selective_scan_fwd`` / ``_bwd``, so it is one opaque node
for ``torch.compile`` and ``torch.export``. Works on any device; same semantics as
:func:`hymamba.ops.scan_ref.selective_scan_ref`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hymamba.ops.scan_ref import autocast_off, check_inputs, compute_dtype, differentiable_backward

__all__ = ["selective_scan_fast"]


# State elements of one (T, batch, N, dim) time block in the fast path. ~2 MiB of
# float32 keeps a block's exp / scan / reduction passes in cache instead of streaming
# whole (L, batch, N, dim) tensors through memory (measured ~2.4x faster at batch 64
# on an AMD EPYC; 1-4 MiB blocks were within ~20% of each other there).
_BLOCK_ELEMS = 1 << 19


class _Prepared(NamedTuple):
    """Scan inputs in the compute dtype and L-major layout (each time step is contiguous).

    States are laid out (L, batch, N, dim): with the long dim axis innermost, the
    broadcasting products below vectorise (measured ~4x faster than N innermost).
    """

    dt_raw: Tensor  # (L, batch, dim) delta + delta_bias, before softplus
    dt: Tensor  # (L, batch, dim) delta actually used
    u: Tensor  # (L, batch, dim) (a permuted view of u)
    dtu: Tensor  # (L, batch, dim) delta * u
    At: Tensor  # (N, dim) A transposed
    B: Tensor  # (L, batch, N)
    C: Tensor  # (L, batch, N)


def _prepare(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> _Prepared:
    dtype = compute_dtype(u, delta, A, B, C, D, delta_bias)
    length, batch, dim = delta.shape[2], delta.shape[0], delta.shape[1]
    dt_raw = delta.new_empty((length, batch, dim), dtype=dtype)
    if delta_bias is not None:  # writing into an L-major buffer transposes in the same pass
        torch.add(delta.permute(2, 0, 1), delta_bias.to(dtype), out=dt_raw)
    else:
        dt_raw.copy_(delta.permute(2, 0, 1))
    dt = _softplus(dt_raw) if delta_softplus else dt_raw
    u_l = u.permute(2, 0, 1).to(dtype)
    return _Prepared(
        dt_raw=dt_raw,
        dt=dt,
        u=u_l,
        dtu=dt * u_l,
        At=A.t().to(dtype).contiguous(),
        B=B.permute(2, 0, 1).to(dtype).contiguous(),
        C=C.permute(2, 0, 1).to(dtype).contiguous(),
    )


def _softplus(x: Tensor) -> Tensor:
    """``F.softplus(x)`` (beta 1, threshold 20) from vectorised exp/log.

    ATen's CPU softplus and log1p are scalar loops; this is ~2x faster on CPU and
    agrees with F.softplus to a few ulp.
    """
    e = x.abs().neg_().exp_()  # exp(-|x|) in (0, 1]
    w = e + 1
    # log1p(e) = log(w) + (e - (w - 1)) / w: the correction restores what rounding 1 + e lost
    log1p_e = torch.log(w).add_((e - (w - 1)).div_(w))
    return torch.where(x > 20, x, log1p_e.add_(x.clamp(min=0)))


def _block_len(length: int, state_elems: int) -> int:
    """Time steps per block: about _BLOCK_ELEMS state elements, at least 1."""
    return max(1, min(length, _BLOCK_ELEMS // max(1, state_elems)))


def _block_states(p: _Prepared, s: int, e: int, h_prev: Tensor | None, states: Tensor, dA: Tensor) -> None:
    """Fill the (T, batch, N, dim) buffers of time block [s, e) given h_{s-1} (None: zero).

    states[t] = h_{s+t}; dA[t] = exp(delta_{s+t} A). The decays are exact exponentials
    of each step (no cumulative sums), so any real A is handled: growth for A > 0 is
    whatever the recurrence itself produces.
    """
    torch.mul(p.dt[s:e, :, None, :], p.At, out=dA).exp_()
    torch.mul(p.B[s:e, :, :, None], p.dtu[s:e, :, None, :], out=states)  # delta_t u_t B_t
    if h_prev is not None:
        states[0].addcmul_(dA[0], h_prev)
    for t in range(1, e - s):
        states[t].addcmul_(dA[t], states[t - 1])


def _workspace(p: _Prepared, count: int, steps: int) -> list[Tensor]:
    """``count`` (steps, batch, N, dim) block buffers, reused by every block: fresh
    ~1 MiB tensors per block cost page faults (~10% of the backward)."""
    _, batch, dim = p.dt.shape
    return list(p.dt.new_empty(count, steps, batch, p.At.shape[0], dim).unbind(0))


def _fast_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    """y: (batch, dim, L), contiguous, in ``u.dtype``; no autograd graph is built."""
    with torch.no_grad(), autocast_off(u.device):
        p = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
        length, batch, dim = p.dt.shape
        n = p.At.shape[0]
        step = _block_len(length, batch * dim * n)
        states_buf, dA_buf = _workspace(p, 2, step)
        y = p.dt.new_empty(length, batch, dim)
        h = None
        for s in range(0, length, step):
            e = min(length, s + step)
            states = states_buf[: e - s]
            _block_states(p, s, e, h, states, dA_buf[: e - s])
            # y_t = C_t . h_t as one batched matmul over (t, batch)
            torch.bmm(p.C[s:e].reshape(-1, 1, n), states.view(-1, n, dim), out=y[s:e].view(-1, 1, dim))
            h = states[-1].clone()  # the buffer is overwritten by the next block
        if D is not None:
            y.addcmul_(p.u, D.to(y.dtype))
        return y.permute(1, 2, 0).to(u.dtype).contiguous()


def _fast_backward(
    grad_y: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias), each shaped/typed like its input.

    dD / ddelta_bias are empty (0,) tensors when D / delta_bias is None. Only the
    inputs are saved by the forward; the states are recomputed here, which trades one
    extra forward pass of compute for never holding the (L, batch, N, dim) history:
    a first pass keeps only the state at each time-block boundary, then blocks are
    revisited in reverse, recomputing their states while they are hot in cache.
    (Keeping all states from the forward instead measured no faster on CPU.)
    """
    with torch.no_grad(), autocast_off(u.device):
        p = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
        length, batch, dim = p.dt.shape
        n = p.At.shape[0]
        gy = grad_y.permute(2, 0, 1).to(p.dt.dtype).contiguous()  # (L, batch, dim)
        step = _block_len(length, batch * dim * n)
        blocks = [(s, min(length, s + step)) for s in range(0, length, step)]
        states_buf, dA_buf, adj_buf, tmp_buf = _workspace(p, 4, step)

        starts: list[Tensor | None] = [None]  # h_{s-1} for each block
        for s, e in blocks[:-1]:
            _block_states(p, s, e, starts[-1], states_buf[: e - s], dA_buf[: e - s])
            starts.append(states_buf[e - s - 1].clone())

        grad_C = p.B.new_empty(length, batch, n)
        grad_B = p.B.new_empty(length, batch, n)
        s_bn = p.dt.new_empty(length, batch, dim)  # sum_n G_t[n] B_t[n]
        grad_dt = p.dt.new_empty(length, batch, dim)
        grad_At = p.At.new_zeros(p.At.shape)
        carry = None  # exp(delta_e A) * G_e: adjoint entering block [s, e) from its successor
        for (s, e), h_prev in zip(reversed(blocks), reversed(starts)):
            rows = (e - s) * batch
            states, dA, adj, tmp = (buf[: e - s] for buf in (states_buf, dA_buf, adj_buf, tmp_buf))
            _block_states(p, s, e, h_prev, states, dA)
            # Adjoint states G_t = dLoss/dh_t = C_t gy_t + exp(delta_{t+1} A) G_{t+1}.
            torch.mul(p.C[s:e, :, :, None], gy[s:e, :, None, :], out=adj)
            if carry is not None:
                adj[-1].add_(carry)
            for t in range(e - s - 2, -1, -1):
                adj[t].addcmul_(dA[t + 1], adj[t + 1])
            carry = dA[0] * adj[0]
            # Contractions over dim use multiply + sum: a batched matrix-vector bmm is ~5x slower.
            # y_t = C_t . h_t  ->  dC_t[n] = sum_d h_t[n, d] gy_t[d]
            torch.sum(torch.mul(states, gy[s:e, :, None, :], out=tmp), dim=-1, out=grad_C[s:e])
            # h_t += delta_t u_t B_t  ->  dB_t[n] = sum_d G_t[n, d] delta_t u_t;  d(delta_t u_t) = B_t . G_t
            torch.sum(torch.mul(adj, p.dtu[s:e, :, None, :], out=tmp), dim=-1, out=grad_B[s:e])
            torch.bmm(p.B[s:e].view(rows, 1, n), adj.view(rows, n, dim), out=s_bn[s:e].view(rows, 1, dim))
            # h_t += exp(delta_t A) h_{t-1}  ->  q_t = G_t exp(delta_t A) h_{t-1}, then
            # d delta_t = sum_n q_t A and dA = sum_{t,b} q_t delta_t (q built in place in adj).
            q = adj.mul_(dA)
            q[1:].mul_(states[:-1])
            if h_prev is None:
                q[0].zero_()
            else:
                q[0].mul_(h_prev)
            torch.sum(torch.mul(q, p.At, out=tmp), dim=2, out=grad_dt[s:e])
            grad_At += torch.mul(q, p.dt[s:e, :, None, :], out=tmp).sum((0, 1))

        grad_dt.addcmul_(s_bn, p.u)
        grad_u = s_bn.mul_(p.dt)
        if D is not None:
            grad_u.addcmul_(gy, D.to(gy.dtype))
            grad_D = (gy * p.u).sum((0, 1)).to(D.dtype)
        else:
            grad_D = u.new_empty(0)
        if delta_softplus:
            grad_dt = torch.ops.aten.softplus_backward(grad_dt, p.dt_raw, 1.0, 20.0)
        if delta_bias is not None:
            grad_bias = grad_dt.sum((0, 1)).to(delta_bias.dtype)
        else:
            grad_bias = u.new_empty(0)

        def to_input_layout(g: Tensor, like: Tensor) -> Tensor:
            return g.permute(1, 2, 0).to(like.dtype).contiguous()

        return (
            to_input_layout(grad_u, u),
            to_input_layout(grad_dt, delta),
            grad_At.t().to(A.dtype).contiguous(),
            to_input_layout(grad_B, B),
            to_input_layout(grad_C, C),
            grad_D,
            grad_bias,
        )


# The fast path as custom ops: eager autograd, torch.compile and torch.export all see
# one node with a known output shape (register_fake) and a known backward.
@torch.library.custom_op("hymamba::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    return _fast_forward(u, delta, A, B, C, D, delta_bias, delta_softplus)


@_selective_scan_fwd_op.register_fake
def _(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.custom_op("hymamba::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(
    grad_y: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fast_backward(grad_y, u, delta, A, B, C, D, delta_bias, delta_softplus)


@_selective_scan_bwd_op.register_fake
def _(
    grad_y: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    def like(t: Tensor | None) -> Tensor:
        return u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(u), like(delta), like(A), like(B), like(C), like(D), like(delta_bias)


def _fwd_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.delta_softplus = delta_softplus


def _fwd_backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
        return differentiable_backward(ctx.saved_tensors, grad_y, ctx.delta_softplus, ctx.needs_input_grad)
    u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
    grads = torch.ops.hymamba.selective_scan_bwd(
        grad_y, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus
    )
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:7])) + (None,)


_selective_scan_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def selective_scan_fast(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Fast pure-PyTorch scan with a hand-written backward (custom op ``hymamba::selective_scan_fwd``).

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias: (dim,).
    Returns y: (batch, dim, L) in ``u.dtype``. Any device; any real A.
    """
    check_inputs(u, delta, A, B, C, D, delta_bias)
    return torch.ops.hymamba.selective_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)
