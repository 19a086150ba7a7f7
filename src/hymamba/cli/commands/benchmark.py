"""``hymamba benchmark``: MambaVision paths and timm peers measured side by side in one run."""
from __future__ import annotations

import argparse

from hymamba.cli.commands._common import non_negative_int, positive_int

HELP = "measure MambaVision paths and timm peers side by side"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hymamba.apps.benchmark import PATHS, PEERS

    p.add_argument("model", nargs="?", default="mambavision_t", help="model name (default: mambavision_t)")
    p.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS,
                   help=f"MambaVision paths to measure (default: all: {' '.join(PATHS)})")
    p.add_argument("--peers", nargs="*", default=list(PEERS), help="timm models to compare (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="batch for throughput and training (default: 16)")
    p.add_argument("--image-size", type=positive_int, default=224, help="input side (default: 224)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per metric (default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step measurement")
    p.add_argument("--out", default=None, help="folder for results.json, results.csv and a PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hymamba.apps.benchmark import benchmark, format_table, write_results

    results, baseline, meta = benchmark(args.model, paths=args.paths, peers=args.peers, batch_size=args.batch_size,
                                        image_size=args.image_size, repeats=args.repeats, warmup=args.warmup,
                                        train=args.train, progress=not args.quiet)
    print(format_table(results, baseline=baseline))
    if args.out:
        for path in write_results(results, Path(args.out), meta):
            print(f"wrote {path}")
    return 0
