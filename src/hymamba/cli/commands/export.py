"""``hymamba export``: ONNX export (dynamic batch), checked against PyTorch in ONNX Runtime."""
from __future__ import annotations

import argparse

from hymamba.cli.commands._common import image_size

HELP = "export to ONNX and check it with ONNX Runtime"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name")
    p.add_argument("--checkpoint", default=None, help="weights to export (default: random initialisation)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, nargs="+", default=None, help="input H [W] (default: the model's input size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")


def run(args: argparse.Namespace) -> int:
    import torch

    from hymamba.apps.export import check_onnx, export_onnx
    from hymamba.errors import HymambaError
    from hymamba.factory import create_model

    model = create_model(args.model, checkpoint_path=args.checkpoint).eval()
    size = image_size(args.size, model.pretrained_cfg["input_size"][1:])
    path = export_onnx(model, args.output, image_size=tuple(size), opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input pixel_values (N, 3, {size[0]}, {size[1]}), "
          f"output logits (N, {model.num_classes}); N is dynamic")
    if args.check:
        torch.manual_seed(0)
        diff = check_onnx(model, path, torch.randn(2, 3, *size))
        print(f"ONNX Runtime vs PyTorch on a random batch of 2: max |difference| {diff:.2e}")
        if not diff <= 1e-3:
            raise HymambaError(f"the exported model disagrees with PyTorch (max difference {diff:.2e})")
    return 0
