"""``hymamba models``: every variant with its parameters, multiply-adds, input size and paper top-1."""
from __future__ import annotations

import argparse
import json

HELP = "list the models: parameters, FLOPs, input size, paper top-1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mambavision_l*'")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting multiply-adds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from hymamba.apps.flops import model_table
    from hymamba.errors import ConfigError

    rows = model_table(args.pattern, flops=args.flops)
    if not rows:
        raise ConfigError(f"no model matches {args.pattern!r}; run 'hymamba models' to list them all")
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
