"""``hymamba convert``: weights between the official, hymamba and Hugging Face layouts."""
from __future__ import annotations

import argparse
import json

HELP = "convert weights: official .pth.tar <-> .safetensors + model.json <-> Hugging Face folder"
PARSER_KWARGS = dict(description="Convert a classifier's weights. The destination's form picks the layout: "
                                 "FILE.pth.tar (official: {'state_dict', 'arch'}), FILE.safetensors (hymamba: "
                                 "+ FILE.json) or a folder (Hugging Face: config.json with the official field "
                                 "names, model.safetensors with the model. prefix, preprocessor_config.json). "
                                 "The weights are loaded strictly into the architecture before anything is written.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="an official .pth.tar, a .safetensors (with its .json), a training .pth, a run "
                               "folder's weights or a Hugging Face folder")
    p.add_argument("dst", help="FILE.pth.tar, FILE.safetensors or a folder (Hugging Face)")
    p.add_argument("--model", default=None, help="the architecture, when the source does not say (see 'hymamba models')")
    p.add_argument("--use-ema", action="store_true", help="convert the EMA weights of a checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from hymamba.apps.convert import convert

    res = convert(args.src, args.dst, model_name=args.model, use_ema=args.use_ema)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['src']} -> {res['dst']} ({res['format']}): {res['model']}, {res['num_classes']} classes, "
          f"{res['tensors']} tensors")
    for f in res["files"]:
        print(f"  wrote {f}")
    return 0
