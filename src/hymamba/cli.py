"""The ``hymamba`` command. It only parses arguments and calls the library.

Each subcommand registers its parser and a function; :func:`main` dispatches. User errors print
one line (``hymamba: error: ...``) and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["main"]

_COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {}


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def _models(args: argparse.Namespace) -> int:
    import torch

    from hymamba.factory import create_model, list_models
    from hymamba.flops import count_macs
    from hymamba.models.mambavision import VARIANTS

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}; run 'hymamba models' to list them all")
    rows = []
    for name in names:
        _, cfg, official, top1 = VARIANTS[name]
        with torch.device("meta"):  # shapes only: counting needs no memory and no compute
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, tuple(cfg["input_size"]))[0] if args.flops else None
        rows.append(dict(name=name, official_name=official or "-", params=params, gmacs=macs and macs / 1e9,
                         input_size=list(cfg["input_size"]), crop_pct=cfg["crop_pct"], top1=top1))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'model':<24}{'official name':<26}{'params (M)':>11}{'GMACs':>9}{'input':>8}{'top-1':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        gmacs = f"{r['gmacs']:.2f}" if r["gmacs"] is not None else "-"
        print(f"{r['name']:<24}{r['official_name']:<26}{r['params'] / 1e6:>11.1f}{gmacs:>9}"
              f"{r['input_size'][-1]:>8}{r['top1'] if r['top1'] else '-':>7}")
    if args.flops:
        print("\nGMACs: multiply-adds of one image at the input size, counted like fvcore (convs, linears, "
              "norms, pooling; the selective scan and attention's softmax(QK^T)V are not counted). "
              "top-1: ImageNet-1K accuracy reported in the paper.")
    return 0


def _forward(args: argparse.Namespace) -> int:
    import torch

    from hymamba.factory import create_model
    from hymamba.ops import last_scan_impl

    model = create_model(args.model, checkpoint_path=args.checkpoint, scan_impl=args.scan_impl).eval()
    size = args.size or list(model.pretrained_cfg["input_size"][1:])
    if len(size) == 1:
        size = size * 2
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, *size)
    with torch.inference_mode():
        start = time.perf_counter()
        feats, stages = model.forward_intermediates(x)
        logits = model.forward_head(feats)
        seconds = time.perf_counter() - start
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"weights {'from ' + str(args.checkpoint) if args.checkpoint else 'randomly initialised'}")
    print(f"input {tuple(x.shape)} -> logits {tuple(logits.shape)} in {seconds:.3f} s "
          f"({args.batch_size / seconds:.1f} img/s), selective scan: {last_scan_impl()}")
    for i, s in enumerate(stages):
        print(f"  stage{i + 1}: {tuple(s.shape)}")
    if not torch.isfinite(logits).all():
        raise UserError("the forward pass produced non-finite logits")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    import datetime
    import platform
    from pathlib import Path

    import torch

    from hymamba.benchmark import format_table, mambavision_cases, peer_cases, run_benchmark, write_results
    from hymamba.factory import resolve_model_name

    model = resolve_model_name(args.model)
    for name, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats), ("--image-size", args.image_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    cases = mambavision_cases(model, args.paths)
    cases += peer_cases(args.peers)
    results = run_benchmark(cases, batch_size=args.batch_size, image_size=args.image_size, repeats=args.repeats,
                            warmup=args.warmup, train=args.train, progress=not args.quiet)
    baseline = next((c.name for c in cases if "reference" in c.name), None)
    print(format_table(results, baseline=baseline))
    if args.out:
        meta = dict(model=model, batch_size=args.batch_size, image_size=args.image_size, repeats=args.repeats,
                    torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or
                    platform.machine(), date=datetime.date.today().isoformat())
        for path in write_results(results, Path(args.out), meta):
            print(f"wrote {path}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hymamba", description="MambaVision on any device.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the models: parameters, FLOPs, input size, paper top-1")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mambavision_l*'")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting multiply-adds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _COMMANDS["models"] = _models

    p = sub.add_parser("forward", help="run one forward pass on a random batch and report shapes and speed")
    p.add_argument("model", nargs="?", default="mambavision_t", help="model name (default: mambavision_t)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or Hugging Face folder to load")
    p.add_argument("--batch-size", type=int, default=2, help="images in the batch (default: 2)")
    p.add_argument("--size", type=int, nargs="+", default=None, help="H [W] (default: the model's input size)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    _COMMANDS["forward"] = _forward

    from hymamba.benchmark import PATHS, PEERS

    p = sub.add_parser("benchmark", help="measure MambaVision paths and timm peers side by side")
    p.add_argument("model", nargs="?", default="mambavision_t", help="model name (default: mambavision_t)")
    p.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS,
                   help=f"MambaVision paths to measure (default: all: {' '.join(PATHS)})")
    p.add_argument("--peers", nargs="*", default=list(PEERS), help="timm models to compare (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="batch for throughput and training (default: 16)")
    p.add_argument("--image-size", type=int, default=224, help="input side (default: 224)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per metric (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step measurement")
    p.add_argument("--out", default=None, help="folder for results.json, results.csv and a PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _COMMANDS["benchmark"] = _benchmark
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hymamba`` command; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    from hymamba.checkpoint import CheckpointError

    try:
        return _COMMANDS[args.command](args)
    except (UserError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"hymamba: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
