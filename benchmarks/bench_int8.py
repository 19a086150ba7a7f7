"""int8 ONNX Runtime against float32: top-1 on the digits, the official fixture's logits, and speed.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_int8.py --checkpoint runs/digits/model.safetensors
    PYTHONPATH=src .venv/bin/python benchmarks/bench_int8.py            # trains the digits job first (~2 min)

Accuracy: a trained ``mambavision_nano`` digits classifier exported to ONNX, quantized dynamically
and statically (64 calibration images from the digits' training split), then top-1 over the 360
validation images in PyTorch and in ONNX Runtime for each file. Fixture: the official ``tiny_a``
checkpoint's recorded logits against each int8 file's. Speed: ONNX Runtime float32 vs dynamic vs
static, interleaved within each repeat (medians), at batch 1 and batch 16, for the digits model
(64 px) and for MambaVision-T (224 px, random weights: speed does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _sessions(paths: Dict[str, Path], threads: int) -> Dict[str, "object"]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}


def _speed(sessions: Dict[str, object], size: int, batch: int, repeats: int) -> Dict[str, float]:
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    times: Dict[str, List[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {"pixel_values": x})
    for _ in range(repeats):
        for k, s in sessions.items():  # interleaved: the machine's noise hits every file alike
            t = time.perf_counter()
            s.run(None, {"pixel_values": x})
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def _files(model: torch.nn.Module, folder: Path, name: str, size: int, calibration: List[np.ndarray]) -> Dict[str, Path]:
    from hymamba.apps.export import export_onnx
    from hymamba.apps.quantize import quantize_onnx

    fp32 = export_onnx(model, folder / f"{name}.onnx", image_size=(size, size))
    out = {"float32": fp32}
    for mode in ("dynamic", "static"):
        out[f"int8 {mode}"] = Path(quantize_onnx(fp32, folder / f"{name}.{mode}.onnx", mode, calibration)["path"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a trained mambavision_nano digits model (default: train one)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    import hymamba
    from hymamba.apps.quantize import calibration_batches
    from hymamba.data.datasets import DigitsDataset
    from hymamba.data.transforms import eval_transform, resolve_data_config
    from hymamba.weights.metadata import read_config

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_int8_"))
    ckpt = args.checkpoint
    if ckpt is None:
        from hymamba.tasks.classification import ClassificationConfig, train

        print("training the digits job (hymamba train) ...", flush=True)
        train(ClassificationConfig.build(REPO / "configs" / "digits_nano.yaml", {"output": str(tmp / "run"),
                                                                                  "quiet": True}))
        ckpt = tmp / "run" / "model.safetensors"
    model = hymamba.create_model("mambavision_nano", checkpoint_path=ckpt).eval()
    tf = eval_transform(resolve_data_config(model.pretrained_cfg, read_config(ckpt) or {}))
    calibration = calibration_batches("digits", tf, 64, count=64)
    files = _files(model, tmp, "nano", 64, calibration)
    sessions = _sessions(files, args.threads)
    val = DigitsDataset("val", 64, tf)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = np.array(val.targets)
    with torch.no_grad():
        ref = model(x).numpy()
    results: Dict[str, Dict[str, float]] = {"PyTorch float32": {"top1": 100 * float((ref.argmax(1) == y).mean())}}
    for k, s in sessions.items():
        logits = np.concatenate([s.run(None, {"pixel_values": x[i:i + 64].numpy()})[0] for i in range(0, len(x), 64)])
        results[k] = {"top1": 100 * float((logits.argmax(1) == y).mean()),
                      "same_top1_as_pytorch": 100 * float((logits.argmax(1) == ref.argmax(1)).mean()),
                      "max_abs_logit_diff": float(np.abs(logits - ref).max()),
                      "bytes": files[k].stat().st_size}
    for batch in (1, 16):
        for k, ms in _speed(sessions, 64, batch, args.repeats).items():
            results[k][f"nano_ms_b{batch}"] = ms
    # the official fixture
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import load_case

    case = load_case("tiny_a")
    fixture = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(fixture, case["checkpoint_path"])
    fixture_files = _files(fixture.eval(), tmp, "tiny_a", 64, calibration)
    fx, want = case["tensors"]["input"].float().numpy(), case["tensors"]["logits"].numpy()
    for k, s in _sessions(fixture_files, args.threads).items():
        got = s.run(None, {"pixel_values": fx})[0]
        results[k]["fixture_max_abs_diff"] = float(np.abs(got - want).max())
        results[k]["fixture_rel_diff"] = float(np.abs(got - want).max() / np.abs(want).max())
    # MambaVision-T speed
    t_model = hymamba.create_model("mambavision_t").eval()
    t_cal = [np.random.default_rng(1).standard_normal((4, 3, 224, 224)).astype(np.float32)]
    t_sessions = _sessions(_files(t_model, tmp, "mv_t", 224, t_cal), args.threads)
    for batch in (1, 16):
        for k, ms in _speed(t_sessions, 224, batch, max(3, args.repeats // 4)).items():
            results[k][f"t_ms_b{batch}"] = ms
    base = results["float32"]
    print("| file | digits top-1 % | same top-1 as PyTorch % | max logit diff | fixture max diff (rel) | size MB "
          "| nano b1 ms | nano b16 ms | T b1 ms (x) | T b16 ms (x) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in ("float32", "int8 dynamic", "int8 static"):
        r = results[k]
        print(f"| {k} | {r['top1']:.2f} | {r['same_top1_as_pytorch']:.1f} | {r['max_abs_logit_diff']:.3g} | "
              f"{r['fixture_max_abs_diff']:.3g} ({100 * r['fixture_rel_diff']:.1f}%) | {r['bytes'] / 1e6:.1f} | "
              f"{r['nano_ms_b1']:.2f} | {r['nano_ms_b16']:.1f} | {r['t_ms_b1']:.0f} ({base['t_ms_b1'] / r['t_ms_b1']:.2f}x) | "
              f"{r['t_ms_b16']:.0f} ({base['t_ms_b16'] / r['t_ms_b16']:.2f}x) |")
    print(f"PyTorch float32 digits top-1: {results['PyTorch float32']['top1']:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
