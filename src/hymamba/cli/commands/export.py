"""``hymamba export``: ONNX export (dynamic batch; with ``--dynamic-size`` any H x W), checked against PyTorch
in ONNX Runtime."""
from __future__ import annotations

import argparse

from hymamba.cli.commands._common import image_size, positive_int

HELP = "export to ONNX and check it with ONNX Runtime"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name")
    p.add_argument("--checkpoint", default=None, help="weights to export (default: random initialisation)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="input H [W] (default: the model's input size); with --dynamic-size the size the export "
                        "traces and checks at")
    p.add_argument("--dynamic-size", action="store_true",
                   help="one file for every input H x W (needs onnxscript; as fast as a fixed-size file); "
                        "default: a file for --size only")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17; 18 with --dynamic-size)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")
    from hymamba.apps.quantize import QUANTIZATION_MODES

    p.add_argument("--int8", choices=QUANTIZATION_MODES, default=None,
                   help="also write OUTPUT.int8.onnx: convolutions and matrix products in int8 (ONNX Runtime "
                        "quantization; static calibrates activation ranges on --calibration images)")
    p.add_argument("--calibration", default="digits",
                   help="images for static int8 and for the int8 check: a folder, or 'digits' (default)")
    p.add_argument("--calibration-images", type=positive_int, default=64,
                   help="how many calibration images (default: 64)")


def run(args: argparse.Namespace) -> int:
    import torch

    from hymamba.apps.export import check_onnx, check_sizes, export_onnx
    from hymamba.errors import ConfigError, HymambaError
    from hymamba.factory import create_model

    model = create_model(args.model, checkpoint_path=args.checkpoint).eval()
    size = image_size(args.size, model.pretrained_cfg["input_size"][1:])
    path = export_onnx(model, args.output, image_size=tuple(size), opset=args.opset, dynamic_size=args.dynamic_size)
    hw = "H, W" if args.dynamic_size else f"{size[0]}, {size[1]}"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input pixel_values (N, 3, {hw}), "
          f"output logits (N, {model.num_classes}); N is dynamic" + (", H and W too" if args.dynamic_size else ""))
    if args.check:
        for check_size in check_sizes(size, args.dynamic_size):
            torch.manual_seed(0)
            diff = check_onnx(model, path, torch.randn(2, 3, *check_size))
            print(f"ONNX Runtime vs PyTorch on a random batch of 2 at {check_size[0]}x{check_size[1]}: "
                  f"max |difference| {diff:.2e}")
            if not diff <= 1e-3:
                raise HymambaError(f"the exported model disagrees with PyTorch (max difference {diff:.2e})")
    if args.int8:
        from hymamba.apps.quantize import calibration_batches, compare_with_model, int8_path, quantize_onnx
        from hymamba.data.transforms import eval_transform, resolve_data_config

        from hymamba.weights.metadata import read_config

        if size[0] != size[1]:
            raise ConfigError(f"--int8 calibrates on images preprocessed as for evaluation (square), but --size is "
                               f"{size[0]}x{size[1]}; export a square size for int8 (with --dynamic-size the int8 "
                               "file then runs at any size too)")
        meta = (read_config(args.checkpoint) or {}) if args.checkpoint else {}
        data_config = resolve_data_config(model.pretrained_cfg, meta, input_size=size[0])
        batches = calibration_batches(args.calibration, eval_transform(data_config), size[-1],
                                      count=args.calibration_images)
        info = quantize_onnx(path, int8_path(path), args.int8, calibration=batches)
        print(f"wrote {info['path']} ({info['bytes_int8'] / 1e6:.1f} MB, {args.int8} int8: "
              f"{'/'.join(info['ops'])} in int8, {info['quantized_nodes']} quantization nodes; the scan, attention "
              "scores, norms and activations stay float)")
        cmp = compare_with_model(model, info["path"], batches)
        print(f"int8 vs PyTorch on {cmp['images']} calibration images: max |logit difference| "
              f"{cmp['max_abs_diff']:.3g}, same top-1 class for {100 * cmp['top1_agreement']:.1f}%")
    return 0
