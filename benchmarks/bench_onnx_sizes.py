"""ONNX at any size: one any-size file against one fixed-size file per size and PyTorch eager.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_onnx_sizes.py --json benchmarks/results_onnx_sizes.json

MambaVision-T (random weights: speed does not depend on them), batch 1, at 224 x 224, 256 x 320 and
160 x 200 (the last two pad their windows). Files: ``export_onnx(dynamic_size=True)`` once (traced at
224) and ``export_onnx(image_size=size)`` once per size. For each size: ONNX Runtime's output of each
file against PyTorch (max |difference| over PyTorch's largest |logit|), then the latency of PyTorch
eager (hymamba's default paths: compiled scan kernel, oneDNN linears), the fixed file and the any-size
file, interleaved within each round (median of the rounds), with ``--threads`` threads everywhere.
Also the files' sizes, graph nodes and export times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

SIZES = [(224, 224), (256, 320), (160, 200)]


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _timed(fns: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():  # interleaved: the machine's noise hits every path alike
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mambavision_t")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    import hymamba
    from hymamba.apps.export import export_onnx

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = hymamba.create_model(args.model).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_sizes_"))
    files: Dict[str, Path] = {}
    export_s: Dict[str, float] = {}
    t = time.perf_counter()
    files["any"] = export_onnx(model, tmp / "any.onnx", image_size=(224, 224), dynamic_size=True)
    export_s["any"] = time.perf_counter() - t
    print(f"any-size file: {export_s['any']:.0f} s to export", flush=True)
    for h, w in SIZES:
        t = time.perf_counter()
        files[f"{h}x{w}"] = export_onnx(model, tmp / f"fixed_{h}x{w}.onnx", image_size=(h, w))
        export_s[f"{h}x{w}"] = time.perf_counter() - t
        print(f"fixed file {h}x{w}: {export_s[f'{h}x{w}']:.0f} s to export", flush=True)
    any_session = _session(files["any"], args.threads)
    results: Dict[str, object] = {
        "model": args.model, "threads": args.threads, "rounds": args.rounds, "batch": 1,
        "torch": torch.__version__, "files": {k: {"bytes": v.stat().st_size, "nodes": _nodes(v), "export_s": export_s[k]}
                                              for k, v in files.items()},
        "sizes": {}, "load_average_before": list(os.getloadavg()),
    }
    for h, w in SIZES:
        key = f"{h}x{w}"
        fixed_session = _session(files[key], args.threads)
        x = torch.from_numpy(np.random.default_rng(h * w).standard_normal((1, 3, h, w)).astype(np.float32))
        feed = {"pixel_values": x.numpy()}
        with torch.no_grad():
            ref = model(x).numpy()
        scale = float(np.abs(ref).max())
        rel = {name: float(np.abs(s.run(None, feed)[0] - ref).max()) / scale
               for name, s in (("fixed", fixed_session), ("any", any_session))}

        def eager() -> object:
            with torch.no_grad():
                return model(x)

        ms = _timed({"pytorch": eager, "fixed": lambda: fixed_session.run(None, feed),
                     "any": lambda: any_session.run(None, feed)}, args.rounds)
        results["sizes"][key] = {"relative_diff": rel, "ms": ms}
        print(f"{key}: done", flush=True)
    results["load_average_after"] = list(os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("| size | PyTorch ms | fixed file ms (x PyTorch) | any-size file ms (x PyTorch) | any / fixed | rel. diff fixed | rel. diff any |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results["sizes"].items():
        ms, rel = r["ms"], r["relative_diff"]
        print(f"| {key} | {ms['pytorch']:.0f} | {ms['fixed']:.0f} ({ms['pytorch'] / ms['fixed']:.2f}x) | "
              f"{ms['any']:.0f} ({ms['pytorch'] / ms['any']:.2f}x) | {ms['any'] / ms['fixed']:.2f} | "
              f"{rel['fixed']:.1e} | {rel['any']:.1e} |")
    print()
    print(f"load average (1, 5, 15 min) before {results['load_average_before']}, after {results['load_average_after']}")
    print("| file | MB | graph nodes | export s |")
    print("|---|---|---|---|")
    for k, f in results["files"].items():
        print(f"| {'any size' if k == 'any' else 'fixed ' + k} | {f['bytes'] / 1e6:.1f} | {f['nodes']} | {f['export_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
