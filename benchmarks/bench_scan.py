"""Benchmark selective-scan implementations against the reference loop.

Measures forward and forward+backward wall time per implementation, interleaving the
implementations inside every repeat so that machine drift affects all of them alike,
and reports the median time, the speed-up over the reference measured in the same run,
and the max relative error of each implementation's float32 output and gradients
against a float64 reference.

Example::

    PYTHONPATH=src python benchmarks/bench_scan.py --impls fast --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from hymamba.ops import available_scan_impls, selective_scan

DEFAULT_SHAPES = ("64x160x196x8", "64x320x49x8", "1x160x196x8", "1x320x49x8")
Shape = tuple[int, int, int, int]


def parse_shape(text: str) -> Shape:
    """'BxDxLxN' -> (batch, dim, L, N)."""
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must be BxDxLxN, got {text!r}")
    return parts  # type: ignore[return-value]


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """MambaVision-like inputs: softplus'd delta around 0.01-0.1, A = -exp(A_log) in [-N, -1]."""
    b, d, length, n = shape
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, length, generator=g)
    delta = torch.randn(b, d, length, generator=g) * 0.5 - 3.0
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B = torch.randn(b, n, length, generator=g)
    C = torch.randn(b, n, length, generator=g)
    D = torch.ones(d)
    delta_bias = torch.rand(d, generator=g) * 0.1
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (u, delta, A, B, C, D, delta_bias)]


def run_scan(impl: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    u, delta, A, B, C, D, delta_bias = inputs
    return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True, impl=impl)


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall time of fn() in seconds (synchronising CUDA around it)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def float64_reference(shape: Shape, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(grad_out, [y, *grads]) of the reference scan in float64: the accuracy yardstick."""
    x64 = make_inputs(shape, torch.float64, device)
    y64 = run_scan("reference", x64)
    gy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    return gy, [y64.detach(), *torch.autograd.grad(y64, x64, gy)]


def max_rel_error(impl: str, shape: Shape, device: str, truth: tuple[torch.Tensor, list[torch.Tensor]]) -> float:
    """Max over output and all gradients of max|x32 - x64| / max|x64|."""
    gy, results64 = truth
    x32 = make_inputs(shape, torch.float32, device)
    y32 = run_scan(impl, x32)
    results32 = [y32, *torch.autograd.grad(y32, x32, gy.float())]
    return max(
        ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(results32, results64)
    )


def bench_shape(shape: Shape, impls: list[str], repeats: int, ref_repeats: int, device: str) -> list[dict]:
    """One result row per implementation (the reference first) for one shape."""
    inputs = make_inputs(shape, torch.float32, device)
    grad_out = torch.randn(shape[:3], device=device)

    def fwd(impl: str) -> Callable[[], object]:
        def go() -> None:
            with torch.no_grad():
                run_scan(impl, inputs)

        return go

    def fwd_bwd(impl: str) -> Callable[[], object]:
        return lambda: torch.autograd.grad(run_scan(impl, inputs), inputs, grad_out)

    all_impls = ["reference", *impls]
    times: dict[tuple[str, str], list[float]] = {(i, m): [] for i in all_impls for m in ("fwd", "fwd+bwd")}
    for impl in all_impls:  # warm-up (also triggers lazy kernel builds)
        fwd(impl)()
        fwd_bwd(impl)()
    for rep in range(repeats):
        for impl in all_impls:
            if impl == "reference" and rep >= ref_repeats:
                continue
            times[(impl, "fwd")].append(timed(fwd(impl), device))
            times[(impl, "fwd+bwd")].append(timed(fwd_bwd(impl), device))

    truth = float64_reference(shape, device)
    rows = []
    for impl in all_impls:
        row: dict = {"shape": "x".join(map(str, shape)), "impl": impl}
        for mode in ("fwd", "fwd+bwd"):
            med = statistics.median(times[(impl, mode)])
            ref = statistics.median(times[("reference", mode)])
            row[f"{mode}_ms"] = med * 1e3
            row[f"{mode}_speedup"] = ref / med
        row["max_rel_err_fp32"] = max_rel_error(impl, shape, device, truth)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="shapes as BxDxLxN (default: the MambaVision-T scan shapes)")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="implementations to compare with the reference (default: all available but reference)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed repeats of the slow reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    impls = args.impls or [i for i in available_scan_impls(args.device) if i != "reference"]
    # Timings are only comparable on an otherwise idle machine: print the load to judge that.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, device {args.device}, load average {load:.2f}")
    header = f"{'shape':>14} {'impl':>10} {'fwd ms':>9} {'x ref':>7} {'fwd+bwd ms':>11} {'x ref':>7} {'fp32 rel err':>12}"
    print(header)
    rows = []
    for shape in args.shapes:
        for row in bench_shape(shape, impls, args.repeats, min(args.ref_repeats, args.repeats), args.device):
            rows.append(row)
            print(f"{row['shape']:>14} {row['impl']:>10} {row['fwd_ms']:9.2f} {row['fwd_speedup']:7.1f} "
                  f"{row['fwd+bwd_ms']:11.2f} {row['fwd+bwd_speedup']:7.1f} {row['max_rel_err_fp32']:12.2e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
                       "load_average": load, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
