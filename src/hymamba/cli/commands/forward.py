"""``hymamba forward``: one forward pass on a random batch; shapes, speed, which kernels ran."""
from __future__ import annotations

import argparse

from hymamba.cli.commands._common import image_size, positive_int

HELP = "run one forward pass on a random batch and report shapes and speed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="mambavision_t", help="model name (default: mambavision_t)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or Hugging Face folder to load")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images in the batch (default: 2)")
    p.add_argument("--size", type=int, nargs="+", default=None, help="H [W] (default: the model's input size)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    p.add_argument("--linear-impl", default="auto", choices=("auto", "torch", "onednn"),
                   help="linear-layer implementation (default: auto)")


def run(args: argparse.Namespace) -> int:
    from hymamba.apps.forward import forward
    from hymamba.errors import HymambaError

    res = forward(args.model, checkpoint=args.checkpoint, batch_size=args.batch_size,
                  size=lambda default: image_size(args.size, default), scan_impl=args.scan_impl,
                  linear_impl=args.linear_impl)
    print(f"model {args.model}: {res['params'] / 1e6:.1f}M parameters, "
          f"weights {'from ' + str(args.checkpoint) if args.checkpoint else 'randomly initialised'}")
    print(f"input {res['input']} -> logits {res['logits']} in {res['seconds']:.3f} s "
          f"({args.batch_size / res['seconds']:.1f} img/s), selective scan: {res['scan_impl']}")
    print(f"linear layers: {res['onednn_linear']} of {res['linear']} through oneDNN (linear_impl={args.linear_impl})")
    for i, s in enumerate(res["stages"]):
        print(f"  stage{i + 1}: {s}")
    if not res["finite"]:
        raise HymambaError("the forward pass produced non-finite logits")
    return 0
