"""Benchmark the linear-layer GEMMs of MambaVision-T: MKL (F.linear) against oneDNN.

For every (tokens x in_features x out_features) shape of the MambaVision-T token levels, at
batch 1 and batch 16, measures interleaved in one run:

* ``F.linear`` (MKL sgemm, what PyTorch uses for float32 on CPU),
* ``onednn``: ``hymamba.ops.linear.linear(..., impl="onednn")`` with the weight as it is,
* ``packed``: oneDNN with the weight pre-packed (what ``optimize_for_inference`` sets up),
* the input gradient (``grad @ W``) through MKL ``mm`` and through oneDNN,

and prints the median time, GMAC/s and the ratio over ``F.linear``, plus the largest difference
from ``F.linear``.

Example::

    PYTHONPATH=src python benchmarks/bench_linear.py --repeats 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hymamba.ops.linear import FastLinear, linear, onednn_linear_available

# (tokens per image, in, out) for MambaVision-T: level 3 (14x14 = 196 tokens, width 320) and
# level 4 (7x7 = 49 tokens, width 640): mixer in/out_proj, attention qkv/proj, MLP fc1/fc2.
LAYERS = [(196, 320, 320), (196, 320, 960), (196, 320, 1280), (196, 1280, 320),
          (49, 640, 640), (49, 640, 1920), (49, 640, 2560), (49, 2560, 640)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    ok, reason = onednn_linear_available()
    if not ok:
        raise SystemExit(f"oneDNN linear unavailable: {reason}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in args.batches:
            for tokens, k, n in LAYERS:
                m = batch * tokens
                x = torch.randn(m, k, generator=gen)
                grad = torch.randn(m, n, generator=gen)
                layer = FastLinear(k, n, impl="onednn")
                packed = FastLinear(k, n, impl="onednn")
                packed.load_state_dict(layer.state_dict())
                packed.prepacked = True
                w, b = layer.weight, layer.bias
                cases = {
                    "F.linear": lambda: F.linear(x, w, b),
                    "onednn": lambda: linear(x, w, b, impl="onednn"),
                    "packed": lambda: packed(x),
                    "dX mm": lambda: grad.mm(w),
                    "dX onednn": lambda: linear(grad, w.t(), None, impl="onednn"),
                }
                want = F.linear(x, w, b)
                err = {name: float((cases[name]() - want).abs().max()) for name in ("onednn", "packed")}
                for fn in cases.values():
                    fn()  # warm-up (and the packing)
                times: dict[str, list[float]] = {name: [] for name in cases}
                for _ in range(args.repeats):
                    for name, fn in cases.items():
                        times[name].append(timed(fn))
                med = {name: statistics.median(t) for name, t in times.items()}
                macs = m * k * n
                row = {"shape": f"{m}x{k}x{n}", "batch": batch, "err_onednn": err["onednn"],
                       "err_packed": err["packed"]}
                for name, t in med.items():
                    row[f"{name} ms"] = t * 1e3
                    row[f"{name} GMAC/s"] = macs / t / 1e9
                row["x onednn"] = med["F.linear"] / med["onednn"]
                row["x packed"] = med["F.linear"] / med["packed"]
                row["x dX"] = med["dX mm"] / med["dX onednn"]
                rows.append(row)
                print(f"{row['shape']:>16}  F.linear {row['F.linear GMAC/s']:5.0f} GMAC/s | "
                      f"onednn {row['onednn GMAC/s']:5.0f} ({row['x onednn']:.2f}x) | "
                      f"packed {row['packed GMAC/s']:5.0f} ({row['x packed']:.2f}x) | "
                      f"dX mm {row['dX mm GMAC/s']:5.0f} onednn {row['dX onednn GMAC/s']:5.0f} "
                      f"({row['x dX']:.2f}x) | max diff {max(err.values()):.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
