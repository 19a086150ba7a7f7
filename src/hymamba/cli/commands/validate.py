"""``hymamba validate``: top-1/top-5/loss of weights on an ImageFolder split or the digits."""
from __future__ import annotations

import argparse
import json

from hymamba.cli.commands._common import non_negative_int, positive_int

HELP = "top-1/top-5/loss of weights on an ImageFolder split or the digits"
PARSER_KWARGS = dict(description="Evaluate with the model's own preprocessing (resize by crop_pct, crop mode, "
                                 "interpolation, mean/std from its config or the model.json beside the weights).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name, e.g. mambavision_t")
    p.add_argument("data", nargs="?", default="digits",
                   help="ImageFolder root holding SPLIT/<class>/..., a split folder, or a built-in set: "
                        "'digits' (default), 'cued-digits'")
    p.add_argument("--checkpoint", default=None, help="weights: model.safetensors, a training .pth, an official "
                                                      ".pth.tar or a Hugging Face folder")
    p.add_argument("--pretrained", action="store_true", help="use the official weights (a local file)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a checkpoint")
    p.add_argument("--split", default="val", help="subfolder of DATA to evaluate (default: val)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=non_negative_int, default=None, help="data-loading processes (default: min(8, cores))")
    p.add_argument("--img-size", type=positive_int, default=None, help="input side (default: the model's)")
    p.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction (default: the model's)")
    p.add_argument("--crop-mode", default=None, help="center, squash or border (default: the model's)")
    p.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate only this many images")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16; float16 on GPUs without bfloat16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    p.add_argument("--per-class", action="store_true", help="also report the accuracy of each class")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from hymamba.apps.validate import validate

    res = validate(args.model, args.checkpoint, data=args.data, split=args.split, pretrained=args.pretrained,
                   use_ema=args.use_ema, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                   device=args.device, input_size=args.img_size, crop_pct=args.crop_pct, crop_mode=args.crop_mode,
                   interpolation=args.interpolation, max_samples=args.max_samples, scan_impl=args.scan_impl)
    if not args.per_class:
        res.pop("per_class")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']} ({res['checkpoint']}) on {res['data']}/{res['split']}: top-1 {res['top1']:.3f}%  "
          f"top-5 {res['top5']:.3f}%  loss {res['loss']:.4f}  ({res['images']} images, "
          f"{res['skipped_images']} unreadable skipped)")
    pp = res["preprocessing"]
    print(f"preprocessing: input {pp['input_size'][-1]}px, crop_pct {pp['crop_pct']}, {pp['crop_mode']}, "
          f"{pp['interpolation']}, mean {tuple(round(m, 4) for m in pp['mean'])}, std "
          f"{tuple(round(s, 4) for s in pp['std'])}")
    if args.per_class:
        width = max(len(r["class"]) for r in res["per_class"])
        print(f"{'class':<{width}}  {'images':>6}  top-1")
        for r in res["per_class"]:
            acc = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
            print(f"{r['class']:<{width}}  {r['images']:>6}  {acc}")
    return 0
