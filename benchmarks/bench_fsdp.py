"""Per-process memory of DDP against FSDP (``--strategy ddp|fsdp``): two processes under torchrun (gloo).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_fsdp.py --models mambavision_b mambavision_l

Each run builds the model (random weights, 1000 classes) in both processes, distributes it with the
engine's own strategy (:func:`hymamba.engine.strategies.make_strategy`), and takes training steps
(AdamW, the loop's optimiser for fine-tuning; LAMB keeps the same two moments) at 224 px. Measured
per process:

- **state**: the bytes of the parameters, gradients and optimiser moments this process holds
  (counted from the tensors: a shard's local part under FSDP, everything under DDP);
- **peak RSS in training**: the process's resident-memory high-water mark over the training steps
  (Linux ``VmHWM``, reset after set-up through ``/proc/self/clear_refs``), everything included:
  PyTorch itself, activations, DDP's gradient buckets, FSDP's gathered blocks;
- **step**: median seconds per training step (the strategies run one after the other, in rounds,
  so the machine's noise reaches both; on CPU, gloo's collectives cost more than NCCL's).

Results go to ``--out`` (JSON) and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One process of one run (under torchrun)."""
    import torch
    from timm.optim import create_optimizer_v2

    from hymamba import create_model
    from hymamba.apps.benchmark import _reset_peak, _rss_kib
    from hymamba.engine.strategies import make_strategy
    from hymamba.utils.distributed import setup

    torch.set_num_threads(1)
    dist = setup("cpu")
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    strategy = make_strategy(args.strategy, dist)
    strategy.start_equal(model)
    wrapped = strategy.wrap(model)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))

    def step() -> float:
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(wrapped(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # (keep the gradients allocated: the state at its largest)
        return time.perf_counter() - t

    step()  # the optimiser's moments and the gradients now exist
    reset = _reset_peak()
    times = [step() for _ in range(args.steps)]

    def local_bytes(t: Any) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    moments = sum(local_bytes(v) for s in opt.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    row = {"rank": dist.rank, "strategy": args.strategy, "model": args.model, "batch": args.batch,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "state_gb": (params + grads + moments) / 1e9, "params_gb": params / 1e9, "grads_gb": grads / 1e9,
           "moments_gb": moments / 1e9, "peak_rss_gb": _rss_kib("VmHWM") * 1024 / 1e9 if reset else None, "step_s": sorted(times)[len(times) // 2]}
    with open(args.result, "a") as f:
        f.write(json.dumps(row) + "\n")
    dist.close()


def launch(model: str, strategy: str, batch: int, steps: int, checkpointing: bool, result: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--model", model, "--strategy", strategy, "--batch", str(batch), "--steps", str(steps),
           "--result", str(result)] + (["--grad-checkpointing"] if checkpointing else [])
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{model} {strategy} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mambavision_b"])
    p.add_argument("--batch", type=int, default=2, help="images per process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=1, help="ddp, fsdp, ddp, fsdp, ... (rows are per round)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    # the worker's own arguments (torchrun starts this file again with --worker)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for r in range(args.rounds):
                for strategy in ("ddp", "fsdp"):
                    result = Path(tmp) / f"{model}-{strategy}-{r}.jsonl"
                    launch(model, strategy, args.batch, args.steps, args.grad_checkpointing, result)
                    ranks = [json.loads(line) for line in result.read_text().splitlines()]
                    rows.append({**{k: v for k, v in ranks[0].items() if k != "rank"}, "round": r,
                                 "per_rank": ranks})
    print(f"two processes, batch {args.batch} per process at 224 px, AdamW, "
          f"activation checkpointing {'on' if args.grad_checkpointing else 'off'}; per-process figures (rank 0)")
    print("| model | params | strategy | state (params + grads + moments) | peak RSS in training | step s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        peak = f"{row['peak_rss_gb']:.2f} GB" if row["peak_rss_gb"] is not None else "n/a"
        print(f"| {row['model']} | {row['params_m']:.1f}M | {row['strategy']} | {row['state_gb']:.2f} GB | {peak} | "
              f"{row['step_s']:.2f} |")
    for model in args.models:
        by = {s: [r for r in rows if r["model"] == model and r["strategy"] == s] for s in ("ddp", "fsdp")}
        ratio = sum(r["state_gb"] for r in by["fsdp"]) / sum(r["state_gb"] for r in by["ddp"])
        line = f"{model}: FSDP holds {ratio:.2f}x DDP's state per process"
        if all(r["peak_rss_gb"] is not None for r in by["ddp"] + by["fsdp"]):
            peak = sum(r["peak_rss_gb"] for r in by["fsdp"]) / sum(r["peak_rss_gb"] for r in by["ddp"])
            line += f", {peak:.2f}x its peak RSS in training"
        print(line)
    if args.out:
        import torch

        args.out.write_text(json.dumps({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                        "batch": args.batch, "steps": args.steps,
                                        "grad_checkpointing": args.grad_checkpointing, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
