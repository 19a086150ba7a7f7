"""Side-by-side speed measurements: MambaVision paths and timm peers, in one run.

Machines are noisy, so every number here is relative: all cases are measured in the same
process, repeats are interleaved (case A, case B, ..., then again) so that drift hits every case
alike, and each metric reports the median with its spread (min-max over repeats).

MambaVision paths: ``reference`` is the plain PyTorch model (the sequential reference scan and
``F.linear``), ``default`` is what ``create_model`` gives (compiled scan, oneDNN linear layers),
``bf16`` adds bf16 autocast, ``optimized`` is ``optimize_for_inference`` (BatchNorm folded,
pre-packed linear weights, channels_last), ``compile`` is ``torch.compile`` of the default model.

Metrics per case: inference throughput at batch ``batch_size`` (img/s), latency at batch 1 (ms),
a training step at batch ``batch_size`` (forward + backward + optimizer step, s) and the peak
resident memory that the step adds (MiB; Linux, read from /proc with the high-water mark reset
before each measurement).
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from hymamba.errors import ConfigError
from hymamba.utils.io import atomic_write

__all__ = ["BenchCase", "BenchResult", "benchmark", "format_table", "mambavision_cases", "peer_cases", "run_benchmark",
           "write_results"]

PEERS = ("convnext_tiny", "swin_tiny_patch4_window7_224", "resnet50", "vit_small_patch16_224", "mambaout_tiny")
PATHS = ("reference", "default", "bf16", "optimized", "optimized_bf16", "compile")


@dataclass
class BenchCase:
    """One thing to measure: a model built lazily, and how to run it."""

    name: str
    build: Callable[[], nn.Module]
    autocast_bf16: bool = False
    inference_only: bool = False  # e.g. the BN-folded model cannot train
    channels_last: bool = False  # feed NHWC-strided images (for models converted to channels_last)
    model: Optional[nn.Module] = None
    params: int = 0

    def get(self) -> nn.Module:
        if self.model is None:
            self.model = self.build()
            self.params = sum(p.numel() for p in self.model.parameters())
        return self.model

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def context(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()


@dataclass
class BenchResult:
    name: str
    params_m: float
    throughput: float = float("nan")  # img/s at batch_size, median
    throughput_spread: List[float] = field(default_factory=list)
    latency_ms: float = float("nan")  # batch 1, median
    latency_spread: List[float] = field(default_factory=list)
    train_step_s: float = float("nan")  # batch_size, median
    train_spread: List[float] = field(default_factory=list)
    train_peak_mib: float = float("nan")


def mambavision_cases(model_name: str, paths: Sequence[str] = PATHS, image_size: int = 224) -> List[BenchCase]:
    """Cases for one hymamba model along the requested paths."""
    from hymamba.factory import create_model
    from hymamba.models.fuse import optimize_for_inference

    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ConfigError(f"unknown benchmark paths {sorted(unknown)}; choose from {', '.join(PATHS)}")

    def build(impl: str = "auto", linear: str = "auto") -> Callable[[], nn.Module]:
        return lambda: create_model(model_name, scan_impl=impl, linear_impl=linear)

    makers = {
        # the plain PyTorch model: reference scan, every linear layer through F.linear
        "reference": lambda: BenchCase(f"{model_name} reference", build("reference", "torch")),
        "default": lambda: BenchCase(f"{model_name}", build()),
        "bf16": lambda: BenchCase(f"{model_name} bf16", build(), autocast_bf16=True),
        "optimized": lambda: BenchCase(f"{model_name} optimized",
                                       lambda: optimize_for_inference(build()(), channels_last=True),
                                       inference_only=True, channels_last=True),
        "optimized_bf16": lambda: BenchCase(f"{model_name} optimized bf16",
                                            lambda: optimize_for_inference(build()(), channels_last=True),
                                            autocast_bf16=True, inference_only=True, channels_last=True),
        "compile": lambda: BenchCase(f"{model_name} compile", lambda: torch.compile(build()())),
    }
    return [makers[p]() for p in paths]


def peer_cases(names: Sequence[str] = PEERS) -> List[BenchCase]:
    """Cases for timm models (random weights: speed does not depend on them)."""
    import timm

    return [BenchCase(n, (lambda n=n: timm.create_model(n, pretrained=False))) for n in names]


# ----------------------------------------------------------------------------------------------
# measuring


def _rss_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Hand memory that the allocator holds but no tensor uses back to the OS (glibc), so that the
    next step's allocations show up in the resident high-water mark instead of reusing it."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    gc.collect()
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _infer(case: BenchCase, x: torch.Tensor) -> Callable[[], None]:
    model = case.get().eval()
    x = case.prepare(x)

    def run() -> None:
        with torch.inference_mode(), case.context():
            model(x)

    return run


def _train(case: BenchCase, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = case.get().train()
    x = case.prepare(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with case.context():
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()

    return run


def run_benchmark(
    cases: Sequence[BenchCase],
    batch_size: int = 16,
    image_size: int = 224,
    repeats: int = 5,
    warmup: int = 1,
    train: bool = True,
    progress: bool = True,
) -> List[BenchResult]:
    """Measure every case, interleaved, and return one result per case.

    Args:
        cases: what to measure.
        batch_size: batch for throughput and the training step.
        image_size: square input side.
        repeats: timed repetitions per metric (median and spread are reported).
        warmup: untimed runs per case before timing (also triggers torch.compile).
        train: also measure the training step and its peak memory.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    xb = torch.randn(batch_size, 3, image_size, image_size)
    x1 = xb[:1].clone()
    yb = torch.randint(0, 1000, (batch_size,))
    trainable = [c for c in cases if train and not c.inference_only]
    total = len(cases) * (warmup + repeats) * 2 + len(trainable) * (warmup + repeats + 1)
    bar = tqdm(total=total, desc="benchmark", disable=not progress, leave=False)
    times: Dict[str, Dict[str, List[float]]] = {c.name: {"tp": [], "lat": [], "train": []} for c in cases}
    peaks: Dict[str, float] = {}

    def tick(label: str, fn: Callable[[], None]) -> float:
        bar.set_postfix_str(label[:40])
        seconds = _timed(fn)
        bar.update()
        return seconds

    runners = {c.name: (_infer(c, xb), _infer(c, x1)) for c in cases}
    for c in cases:  # warm-up (allocations, compilation), not timed
        for _ in range(warmup):
            for fn in runners[c.name]:
                tick(c.name, fn)
    for _ in range(repeats):
        for c in cases:
            times[c.name]["tp"].append(batch_size / tick(c.name, runners[c.name][0]))
            times[c.name]["lat"].append(1000 * tick(c.name, runners[c.name][1]))
    if trainable:
        train_runners = {c.name: _train(c, xb, yb) for c in trainable}
        for c in trainable:
            for _ in range(warmup):
                tick(c.name + " train", train_runners[c.name])
            peak_ok = _reset_peak()  # frees cached memory first, so read the baseline after it
            before = _rss_kib("VmRSS")
            peak_ok = peak_ok and before is not None
            tick(c.name + " memory", train_runners[c.name])
            if peak_ok:
                peaks[c.name] = (_rss_kib("VmHWM") - before) / 1024
        for _ in range(repeats):
            for c in trainable:
                times[c.name]["train"].append(tick(c.name + " train", train_runners[c.name]))
    bar.close()

    results = []
    for c in cases:
        t = times[c.name]
        r = BenchResult(c.name, c.params / 1e6)
        r.throughput, r.throughput_spread = statistics.median(t["tp"]), [min(t["tp"]), max(t["tp"])]
        r.latency_ms, r.latency_spread = statistics.median(t["lat"]), [min(t["lat"]), max(t["lat"])]
        if t["train"]:
            r.train_step_s, r.train_spread = statistics.median(t["train"]), [min(t["train"]), max(t["train"])]
            r.train_peak_mib = peaks.get(c.name, float("nan"))
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------
# reporting


def format_table(results: Sequence[BenchResult], baseline: Optional[str] = None) -> str:
    """A text table; ratios are against ``baseline`` (a case name) when given."""
    base = next((r for r in results if r.name == baseline), None)
    head = (f"{'case':<40}{'params M':>9}{'img/s':>9}{'x':>7}{'lat ms':>9}{'x':>7}"
            f"{'train s':>9}{'x':>7}{'mem MiB':>9}")
    lines = [head, "-" * len(head)]

    def ratio(value: float, ref: Optional[float], higher_better: bool) -> str:
        if ref is None or value != value or ref != ref:
            return "-"
        return f"{(value / ref) if higher_better else (ref / value):.2f}"

    for r in results:
        lines.append(
            f"{r.name:<40}{r.params_m:>9.1f}{r.throughput:>9.1f}"
            f"{ratio(r.throughput, base and base.throughput, True):>7}"
            f"{r.latency_ms:>9.1f}{ratio(r.latency_ms, base and base.latency_ms, False):>7}"
            f"{r.train_step_s:>9.2f}{ratio(r.train_step_s, base and base.train_step_s, False):>7}"
            f"{r.train_peak_mib:>9.0f}"
        )
    if base:
        lines.append(f"x: speed-up against '{base.name}' in the same run (higher is faster)")
    return "\n".join(lines)


def write_results(results: Sequence[BenchResult], out_dir: Path, meta: Dict[str, object]) -> List[Path]:
    """Write results.json, results.csv and throughput_vs_params.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    json_path, csv_path, png_path = out_dir / "results.json", out_dir / "results.csv", out_dir / "throughput_vs_params.png"

    def write_json(p: Path) -> None:
        p.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})

    def write_png(p: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for r in results:
            ax.scatter(r.params_m, r.throughput, s=40)
            ax.annotate(r.name, (r.params_m, r.throughput), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(f"inference throughput (img/s, batch {meta.get('batch_size')})")
        ax.set_title(f"{meta.get('machine', '')} — {meta.get('date', '')}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(p, format="png", dpi=120)
        plt.close(fig)

    atomic_write(json_path, write_json)
    atomic_write(csv_path, write_csv)
    atomic_write(png_path, write_png)
    return [json_path, csv_path, png_path]


def benchmark(model_name: str, paths: Sequence[str] = PATHS, peers: Sequence[str] = PEERS, batch_size: int = 16,
              image_size: int = 224, repeats: int = 5, warmup: int = 1, train: bool = True,
              progress: bool = True) -> Tuple[List[BenchResult], Optional[str], Dict[str, object]]:
    """``hymamba benchmark``: (results, the baseline case's name, metadata of the run)."""
    import datetime
    import platform

    from hymamba.factory import resolve_model_name

    model = resolve_model_name(model_name)
    for name, value in (("batch_size", batch_size), ("repeats", repeats), ("image_size", image_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    cases = mambavision_cases(model, paths) + peer_cases(peers)
    results = run_benchmark(cases, batch_size=batch_size, image_size=image_size, repeats=repeats, warmup=warmup,
                            train=train, progress=progress)
    baseline = next((c.name for c in cases if "reference" in c.name), None)
    meta: Dict[str, object] = dict(model=model, batch_size=batch_size, image_size=image_size, repeats=repeats,
                                   torch=torch.__version__, threads=torch.get_num_threads(),
                                   machine=platform.processor() or platform.machine(),
                                   date=datetime.date.today().isoformat())
    return results, baseline, meta
