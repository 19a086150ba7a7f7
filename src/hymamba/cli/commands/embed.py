"""``hymamba embed``: image embeddings (and optionally the stage maps) to a .safetensors or .npy file."""
from __future__ import annotations

import argparse
import json

from hymamba.cli.commands._common import positive_int, progress_bar

HELP = "image embeddings (and stage maps) to .safetensors / .npy"
PARSER_KWARGS = dict(description="Embed images with the model's evaluation preprocessing: the pooled final "
                                 "features (the head's input), optionally the four stage maps; writes OUT and "
                                 "OUT.json (the files in row order, the skipped ones, shapes, preprocessing).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hymamba.apps.embed import STAGE_MODES

    p.add_argument("model", help="model name, e.g. mambavision_t")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output file: FILE.safetensors (embeddings and stage arrays) or "
                                                "FILE.npy (embeddings only); FILE.json is written beside it")
    p.add_argument("--checkpoint", default=None, help="weights: a run's model.safetensors, a training .pth, an "
                                                      "official .pth.tar or a Hugging Face folder")
    p.add_argument("--pretrained", action="store_true", help="use the official weights (a local file)")
    p.add_argument("--use-ema", action="store_true", help="use the EMA weights of a checkpoint")
    p.add_argument("--stages", choices=STAGE_MODES, default="none",
                   help="also write the four stage maps: averaged over space (pooled) or whole (maps); "
                        "default: none")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default: 32)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16; float16 on GPUs without bfloat16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    p.add_argument("--json", action="store_true", help="print what OUT.json holds")


def run(args: argparse.Namespace) -> int:
    import sys

    from hymamba.apps.embed import embed, sidecar_path

    info = embed(args.model, args.checkpoint, args.images, args.out, stages=args.stages, pretrained=args.pretrained,
                 use_ema=args.use_ema, batch_size=args.batch_size, amp=args.amp, device=args.device,
                 scan_impl=args.scan_impl, progress=progress_bar("embedding"))
    for r in info["skipped"]:
        print(f"hymamba: warning: skipped {r['image']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info["arrays"].items())
    print(f"{info['out']}: {len(info['files'])} images embedded ({len(info['skipped'])} unreadable skipped); {shapes}")
    print(f"file list and settings: {sidecar_path(info['out'])}")
    return 0
