"""``hymamba predict``: the top-k classes of image files."""
from __future__ import annotations

import argparse
import json

from hymamba.cli.commands._common import positive_int, report_unreadable

HELP = "top-k classes of image files"
PARSER_KWARGS = dict(description="Classify images with the model's preprocessing; class names come from the "
                                 "model.json (or Hugging Face config.json) beside the weights.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name, e.g. mambavision_nano")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", default=None, help="weights (model.safetensors, .pth, official files)")
    p.add_argument("--pretrained", action="store_true", help="use the official weights (a local file)")
    p.add_argument("--use-ema", action="store_true", help="use the EMA weights of a checkpoint")
    p.add_argument("--topk", type=positive_int, default=5, help="classes per image (default: 5)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from hymamba.apps.predict import predict

    results = predict(args.model, args.checkpoint, args.images, topk=args.topk, pretrained=args.pretrained,
                      use_ema=args.use_ema, device=args.device, scan_impl=args.scan_impl)
    report_unreadable(results)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if "top" in r:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"]))
    return 0
