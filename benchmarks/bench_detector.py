"""Mask R-CNN detectors side by side on the CPU at detection size: MambaVision-T (official COCO windows
8, 8, 112, 56) against the same torchvision Mask R-CNN (FPN 256, torchvision's heads, the same anchors,
RoI pooling and transform, built by ``hymamba.models.detection.build_detector``) on timm backbones:
ResNet-50 and ConvNeXt-T.

Everything runs in one process with the repeats interleaved (case A, case B, ..., then again), so
machine drift hits every case alike; medians are reported with the min-max spread and ratios against
the ResNet-50 detector of the same run. Metrics per case: parameters, batch-1 eval latency on one
``--height`` x ``--width`` image (float32 and bf16 autocast; torchvision's transform resizes it to
800 / 1333 and pads to a multiple of 32, exactly as in COCO evaluation), a training step at batch 2
(torchvision's loss dict on synthetic boxes and masks, backward, AdamW step) in float32 and bf16
autocast, and the peak resident memory each adds (free memory trimmed, high-water mark reset, then
one call; read from /proc as ``hymamba.apps.benchmark`` does).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_detector.py [--height 800 --width 1333] [--repeats 2]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hymamba.apps.benchmark import _reset_peak, _rss_kib, _timed
from hymamba.models.detection import build_detector

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_segmenter import TimmBackbone  # noqa: E402  (the same timm wrapper as the segmenter benchmark)

NUM_CLASSES = 81  # COCO's 80 + background (torchvision's count)
BASELINE = "maskrcnn_resnet50"


def build_cases(convnext: bool, windows: Sequence[int] | None = None,
                **sizes: int) -> dict[str, Callable[[], nn.Module]]:
    import hymamba

    cases = {
        "maskrcnn_mambavision_t": lambda: hymamba.create_detector("maskrcnn_mambavision_t", num_classes=NUM_CLASSES,
                                                                  **sizes),
        BASELINE: lambda: build_detector(TimmBackbone("resnet50", out_indices=(1, 2, 3, 4)), "maskrcnn",
                                         NUM_CLASSES, **sizes),
    }
    if windows:
        cases["maskrcnn_mambavision_t w" + "-".join(map(str, windows))] = lambda: hymamba.create_detector(
            "maskrcnn_mambavision_t", num_classes=NUM_CLASSES, window_size=tuple(windows), **sizes)
    if convnext:
        cases["maskrcnn_convnext_tiny"] = lambda: build_detector(TimmBackbone("convnext_tiny"), "maskrcnn",
                                                                 NUM_CLASSES, **sizes)
    return cases


def bf16(on: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def synthetic_targets(n: int, h: int, w: int, objects: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``objects`` random boxes per image (10-40% of the image side) with filled rectangle masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        bw = (0.1 + 0.3 * torch.rand(objects, generator=g)) * w
        bh = (0.1 + 0.3 * torch.rand(objects, generator=g)) * h
        x0 = torch.rand(objects, generator=g) * (w - bw)
        y0 = torch.rand(objects, generator=g) * (h - bh)
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1).round()
        masks = torch.zeros(objects, h, w, dtype=torch.uint8)
        for k, (a, b, c, d) in enumerate(boxes.long().tolist()):
            masks[k, b:d, a:c] = 1
        out.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES, (objects,), generator=g),
                    "masks": masks})
    return out


def infer_fn(model: nn.Module, x: torch.Tensor, use_bf16: bool) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.inference_mode(), bf16(use_bf16):
            model([x])
    return run


def train_fn(model: nn.Module, xs: list[torch.Tensor], targets: list[dict], use_bf16: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with bf16(use_bf16):
            losses = model(xs, targets)
        sum(v.float() for v in losses.values()).backward()
        opt.step()
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--min-size", type=int, default=800, help="the detectors' resize: short side (official: 800)")
    p.add_argument("--max-size", type=int, default=1333, help="long side at most (official: 1333)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-repeats", type=int, default=None, help="timed training steps (default: --repeats)")
    p.add_argument("--train-warmup", type=int, default=1,
                   help="untimed training steps first; with 0 the memory peak includes AdamW's state")
    p.add_argument("--objects", type=int, default=8, help="synthetic objects per training image")
    p.add_argument("--no-convnext", action="store_true", help="leave out the ConvNeXt-T detector")
    p.add_argument("--windows", type=int, nargs=4, default=None, metavar="W",
                   help="also MambaVision-T with these windows per level (the official: 8 8 112 56)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    h, w = args.height, args.width
    x1 = torch.rand(3, h, w)
    xb = [torch.rand(3, h, w) for _ in range(args.train_batch)]
    tb = synthetic_targets(args.train_batch, h, w, args.objects, seed=0)

    models: dict[str, nn.Module] = {}
    params: dict[str, float] = {}
    cases = build_cases(not args.no_convnext, args.windows, min_size=args.min_size, max_size=args.max_size)
    for name, build in cases.items():
        t0 = time.perf_counter()
        models[name] = build()
        params[name] = sum(q.numel() for q in models[name].parameters()) / 1e6
        print(f"built {name}: {params[name]:.1f} M params in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    lat = ["lat_fp32", "lat_bf16"]
    train = [] if args.no_train else ["train_fp32", "train_bf16"]
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in lat + train} for n in models}
    peaks: dict[str, dict[str, float]] = {n: {} for n in models}
    runners = {n: {"lat_fp32": infer_fn(m, x1, False), "lat_bf16": infer_fn(m, x1, True)} for n, m in models.items()}
    for n, model in models.items():
        runners[n]["train_fp32"] = train_fn(model, xb, tb, False)
        runners[n]["train_bf16"] = train_fn(model, xb, tb, True)

    def measure(n: str, m: str, first: bool) -> None:
        if first:  # the first timed call of a metric also gives its memory peak
            ok, before = _reset_peak(), _rss_kib("VmRSS")
        seconds = _timed(runners[n][m])
        times[n][m].append(seconds * (1000 if m in lat else 1))
        if first and ok and before is not None:
            peaks[n][m] = (_rss_kib("VmHWM") - before) / 1024
        print(f"{n} {m}: {seconds:.2f} s", file=sys.stderr)

    for n in models:  # warm-up, not timed
        for m in lat:
            runners[n][m]()
    for r in range(args.repeats):
        for n in models:
            for m in lat:
                measure(n, m, r == 0)
    if train:
        for n in models:
            for m in train:
                for _ in range(args.train_warmup):
                    runners[n][m]()  # optimizer state allocated
                measure(n, m, True)
        for _ in range((args.train_repeats or args.repeats) - 1):
            for n in models:
                for m in train:
                    measure(n, m, False)

    med = {n: {m: statistics.median(v) for m, v in t.items() if v} for n, t in times.items()}
    cols = [("lat_fp32", "b1 fp32 ms"), ("lat_bf16", "b1 bf16 ms")]
    cols += [(m, f"train b{args.train_batch} {m[6:]} s") for m in train]
    header = ["detector", "params M"] + [f"{c} (x)" for _, c in cols] + ["infer mem fp32 / bf16 MiB"]
    if train:
        header.append("train mem fp32 / bf16 MiB")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in models:
        row = [n, f"{params[n]:.1f}"]
        for m, _ in cols:
            v, ref, digits = med[n][m], med[BASELINE][m], 0 if m in lat else 1
            row.append(f"{v:.{digits}f} [{min(times[n][m]):.{digits}f}-{max(times[n][m]):.{digits}f}] ({v / ref:.2f})")
        for kinds in [lat] + ([train] if train else []):
            row.append(" / ".join(f"{peaks[n].get(k, float('nan')):.0f}" for k in kinds))
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    meta = dict(date=datetime.date.today().isoformat(), height=h, width=w, repeats=args.repeats,
                train_batch=args.train_batch, train_repeats=args.train_repeats or args.repeats,
                train_warmup=args.train_warmup, min_size=args.min_size, max_size=args.max_size, objects=args.objects,
                torch=torch.__version__,
                threads=torch.get_num_threads(), load=os.getloadavg()[0],
                machine=platform.processor() or platform.machine(), baseline=BASELINE)
    print(f"{meta}\n(x) = time / {BASELINE}'s time in the same run (lower is faster); [min-max] over repeats\n")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, params_m=params, times=times, peaks_mib=peaks, table=table), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
