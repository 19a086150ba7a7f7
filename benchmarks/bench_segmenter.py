"""UPerNet segmenters side by side on the CPU: MambaVision-T (official ADE20K windows) against the
same UPerHead / FCNHead on timm backbones (ConvNeXt-T, optionally Swin-T).

Everything is measured in one process with the repeats interleaved (case A, case B, ..., then
again), so that machine drift hits every case alike; medians are reported with min-max spread and
ratios are against the ConvNeXt UPerNet of the same run. Metrics per case: parameters, batch-1 eval
latency (float32 and bf16 autocast), a training step at batch 2 (train-mode forward, cross-entropy
on the decode logits resized to the input plus 0.4 x the auxiliary loss, backward, AdamW step) in
float32 and bf16 autocast, and the peak resident memory the float32 / bf16 training step adds
(read as in ``hymamba.apps.benchmark``: free memory trimmed, high-water mark reset, then one step).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_segmenter.py [--size 512] [--repeats 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hymamba.apps.benchmark import _reset_peak, _rss_kib, _timed
from hymamba.models.upernet import build_segmenter

NUM_CLASSES = 150  # ADE20K


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model as a dense backbone: ``out_channels`` and four NCHW maps."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
        self.out_channels = list(self.body.feature_info.channels())
        # Swin's timm features are NHWC; ConvNeXt's are NCHW.
        self.nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC" or "swin" in name

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


def build_cases(size: int, swin: bool) -> dict[str, Callable[[], nn.Module]]:
    import hymamba
    from hymamba.models.segmenters import SEGMENTERS

    spec = SEGMENTERS["upernet_mambavision_t"]
    heads = dict(channels=spec.channels, aux_channels=spec.aux_channels, pool_scales=spec.pool_scales,
                 aux_index=spec.aux_index, dropout_ratio=spec.dropout_ratio)
    cases = {
        "upernet_mambavision_t": lambda: hymamba.create_segmenter("upernet_mambavision_t", num_classes=NUM_CLASSES),
        "upernet_convnext_tiny": lambda: build_segmenter(TimmBackbone("convnext_tiny"), NUM_CLASSES, **heads),
    }
    if swin:
        cases["upernet_swin_tiny"] = lambda: build_segmenter(
            TimmBackbone("swin_tiny_patch4_window7_224", img_size=size), NUM_CLASSES, **heads)
    return cases


def bf16(on: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def infer_fn(model: nn.Module, x: torch.Tensor, use_bf16: bool) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.inference_mode(), bf16(use_bf16):
            model(x)
    return run


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, use_bf16: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y, ignore_index=255)

    def run() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with bf16(use_bf16):
            out = model(x)
        loss = loss_of(out["decode"])
        if "aux" in out:
            loss = loss + 0.4 * loss_of(out["aux"])
        loss.backward()
        opt.step()
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-repeats", type=int, default=None, help="timed training steps (default: --repeats)")
    p.add_argument("--train-warmup", type=int, default=1,
                   help="untimed training steps first; with 0 the memory peak includes AdamW's state")
    p.add_argument("--swin", action="store_true", help="also Swin-T (timm, img_size=--size)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    s = args.size
    x1 = torch.randn(1, 3, s, s)
    xb = torch.randn(args.train_batch, 3, s, s)
    yb = torch.randint(0, NUM_CLASSES, (args.train_batch, s, s))

    models: dict[str, nn.Module] = {}
    params: dict[str, float] = {}
    for name, build in build_cases(s, args.swin).items():
        t0 = time.perf_counter()
        models[name] = build()
        params[name] = sum(q.numel() for q in models[name].parameters()) / 1e6
        print(f"built {name}: {params[name]:.1f} M params in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    metrics = ["lat_fp32", "lat_bf16"] + ([] if args.no_train else ["train_fp32", "train_bf16"])
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in metrics} for n in models}
    peaks: dict[str, dict[str, float]] = {n: {} for n in models}
    runners = {n: {"lat_fp32": infer_fn(m, x1, False), "lat_bf16": infer_fn(m, x1, True)} for n, m in models.items()}

    for n in models:  # warm-up, not timed
        for m in ("lat_fp32", "lat_bf16"):
            runners[n][m]()
    for _ in range(args.repeats):
        for n in models:
            for m in ("lat_fp32", "lat_bf16"):
                times[n][m].append(1000 * _timed(runners[n][m]))
    if not args.no_train:
        for n, model in models.items():
            runners[n]["train_fp32"] = train_fn(model, xb, yb, False)
            runners[n]["train_bf16"] = train_fn(model, xb, yb, True)
        for n in models:
            for m in ("train_fp32", "train_bf16"):
                for _ in range(args.train_warmup):
                    runners[n][m]()  # warm-up (optimizer state allocated)
                ok = _reset_peak()
                before = _rss_kib("VmRSS")
                seconds = _timed(runners[n][m])  # the first timed step also gives the peak
                times[n][m].append(seconds)
                if ok and before is not None:
                    peaks[n][m] = (_rss_kib("VmHWM") - before) / 1024
                print(f"{n} {m}: {seconds:.2f} s", file=sys.stderr)
        for _ in range((args.train_repeats or args.repeats) - 1):
            for n in models:
                for m in ("train_fp32", "train_bf16"):
                    times[n][m].append(_timed(runners[n][m]))

    base = "upernet_convnext_tiny"
    med = {n: {m: statistics.median(v) for m, v in t.items() if v} for n, t in times.items()}
    cols = [("lat_fp32", "b1 fp32 ms"), ("lat_bf16", "b1 bf16 ms")]
    if not args.no_train:
        cols += [("train_fp32", f"train b{args.train_batch} fp32 s"), ("train_bf16", f"train b{args.train_batch} bf16 s")]
    header = "| segmenter | params M | " + " | ".join(f"{c} (x)" for _, c in cols)
    if not args.no_train:
        header += " | train mem fp32 MiB | train mem bf16 MiB"
    lines = [header + " |", "|" + "---|" * (header.count("|") )]
    for n in models:
        row = [n, f"{params[n]:.1f}"]
        for m, _ in cols:
            v, ref = med[n][m], med[base][m]
            lo, hi = min(times[n][m]), max(times[n][m])
            row.append(f"{v:.{0 if m.startswith('lat') else 2}f} [{lo:.{0 if m.startswith('lat') else 2}f}-"
                       f"{hi:.{0 if m.startswith('lat') else 2}f}] ({v / ref:.2f})")
        if not args.no_train:
            row += [f"{peaks[n].get('train_fp32', float('nan')):.0f}", f"{peaks[n].get('train_bf16', float('nan')):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    meta = dict(date=datetime.date.today().isoformat(), size=s, repeats=args.repeats, train_batch=args.train_batch,
                train_repeats=args.train_repeats or args.repeats, train_warmup=args.train_warmup,
                torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), baseline=base)
    print(f"{meta}\n(x) = time / {base}'s time in the same run (lower is faster); [min-max] over repeats\n")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, params_m=params, times=times, peaks_mib=peaks, table=table), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
