"""Benchmark the compiled CPU selective-scan kernel against the sequential
PyTorch reference loop (hymamba's ``selective_scan_ref``, with autograd).

Times forward and forward+backward at the MambaVision-T shapes, interleaving
kernel and reference within each repeat, and reports median times and
speed-ups (plus the min/min speed-up, which other processes on a shared
machine distort less) and the float32-vs-float64 relative error of the kernel.

Usage::

    PYTHONPATH=src python benchmarks/bench_cpu_kernel.py [--repeats 3] [--threads 2] [--shapes 64x320x49x8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from hymamba.ops import scan_cpu as cpu_kernel, selective_scan_ref

SHAPES = ((64, 160, 196, 8), (64, 320, 49, 8), (1, 160, 196, 8), (1, 320, 49, 8))  # batch, dim, L, N
KERNEL_CALLS = 10  # the kernel is fast: several calls per timed repeat steady its median


def make_inputs(batch: int, dim: int, L: int, N: int, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """Mamba-like inputs: u, delta (pre-softplus), A = -exp(A_log), B, C, D, delta_bias."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, L, generator=g)
    delta = torch.randn(batch, dim, L, generator=g) * 0.5 - 1.0
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1) * torch.rand(dim, 1, generator=g).add(0.5)
    B = torch.randn(batch, N, L, generator=g)
    C = torch.randn(batch, N, L, generator=g)
    D = torch.randn(dim, generator=g)
    bias = torch.randn(dim, generator=g) * 0.1
    return [x.to(dtype) for x in (u, delta, A, B, C, D, bias)]


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fwd(scan: Callable[..., Tensor], inputs: list[Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            scan(*inputs, delta_softplus=True)

    return run


def _fwd_bwd(scan: Callable[..., Tensor], inputs: list[Tensor], grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        leaves = [x.detach().requires_grad_() for x in inputs]
        scan(*leaves, delta_softplus=True).backward(grad)

    return run


def max_rel_error(batch: int, dim: int, L: int, N: int) -> tuple[float, float]:
    """Kernel float32 vs kernel float64: (forward, worst gradient) max|diff| / max|ref|."""
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [x.requires_grad_() for x in make_inputs(batch, dim, L, N, dtype)]
        y = cpu_kernel.selective_scan_cpu(*leaves, delta_softplus=True)
        # Same values in both precisions (randn draws differ between dtypes).
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        y.backward(grad)
        results.append([y.detach().double()] + [x.grad.double() for x in leaves])
    errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results)]
    return errs[0], max(errs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument(
        "--shapes", nargs="+", default=None, help="subset of BxDxLxN shapes, e.g. 64x320x49x8 (default: all four)"
    )
    args = parser.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if not cpu_kernel.is_available():
        raise SystemExit(f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
    reference_scan, ref_name = selective_scan_ref, "hymamba.ops.selective_scan_ref"
    print(f"kernel load/build: {time.perf_counter() - start:.1f} s; threads: {torch.get_num_threads()}")
    print(f"reference: {ref_name} (autograd); {args.repeats} interleaved repeats, medians")
    if hasattr(os, "getloadavg"):  # other processes skew 2-thread timings badly
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    rows = []
    for batch, dim, L, N in shapes:
        inputs = make_inputs(batch, dim, L, N, torch.float32)
        grad = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(2))
        cases = {
            "fwd": (_fwd(reference_scan, inputs), _fwd(cpu_kernel.selective_scan_cpu, inputs)),
            "fwd+bwd": (
                _fwd_bwd(reference_scan, inputs, grad),
                _fwd_bwd(cpu_kernel.selective_scan_cpu, inputs, grad),
            ),
        }
        for ref_fn, ker_fn in cases.values():  # warm-up
            ref_fn()
            ker_fn()
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
        for _ in range(args.repeats):
            for key, (ref_fn, ker_fn) in cases.items():
                times[key][0].append(_time(ref_fn))
                times[key][1].append(_time(lambda: [ker_fn() for _ in range(KERNEL_CALLS)]) / KERNEL_CALLS)
        err_fwd, err_grad = max_rel_error(batch, dim, L, N)
        for key, (ref_t, ker_t) in times.items():
            r, k = statistics.median(ref_t), statistics.median(ker_t)
            best = min(ref_t) / min(ker_t)  # robust to other processes on a shared machine
            rows.append((f"{batch}x{dim}x{L}x{N}", key, r * 1e3, k * 1e3, r / k, best, err_fwd, err_grad))

    print(
        f"{'shape BxDxLxN':>16} {'pass':>8} {'reference ms':>13} {'kernel ms':>10} {'speed-up':>9} "
        f"{'(min/min)':>10} {'fp32 err y':>11} {'fp32 err grads':>15}"
    )
    for shape, key, r, k, ratio, best, ey, eg in rows:
        print(f"{shape:>16} {key:>8} {r:13.2f} {k:10.3f} {ratio:8.1f}x {best:9.1f}x {ey:11.1e} {eg:15.1e}")
    if hasattr(os, "getloadavg"):
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
