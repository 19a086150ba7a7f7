"""``hymamba segment train|eval|predict``: semantic segmentation (UPerNet on MambaVision).

``train`` has one flag per field of :class:`hymamba.tasks.segmentation.SegmentationConfig`
(values: defaults < ``--config FILE`` < flags); ``eval`` and ``predict`` read a run folder (or an
official checkpoint with ``--model``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from hymamba.cli.commands._common import non_negative_int, positive_int, progress_bar, report_unreadable, without_nan

HELP = "semantic segmentation: train, eval, predict, export (UPerNet on MambaVision; 'hymamba segment train' alone " \
       "trains on the built-in digit scenes)"
PARSER_KWARGS = dict(description="Semantic segmentation with the official UPerNet recipe. Data: 'digitscenes' "
                                 "(built-in), an ADE20K root (images/ + annotations/, mmseg layout) or a folder "
                                 "with train/ and val/ each holding images/ + masks/ (index PNGs).")
ACTIONS = ("train", "eval", "predict", "export")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    t = sub.add_parser("train", help="train a segmenter (built-in digit scenes by default)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a UPerNet segmenter with the engine. Values: defaults < --config FILE < "
                                   "flags. Runs unchanged under torchrun (DDP). Optional values take 'none'.",
                       epilog="examples:\n"
                              "  hymamba segment train                      # the built-in digit scenes, a few "
                              "minutes on 2 cores\n"
                              "  hymamba segment train /data/ADEChallengeData2016 --config configs/"
                              "upernet_mambavision_t_ade20k.yaml\n"
                              "  hymamba segment train --resume runs/upernet_mambavision_nano-20261202-120000")
    _train_arguments(t)
    e = sub.add_parser("eval", help="mIoU, aAcc and per-class IoU of trained weights",
                       description="Score a segmenter like mmseg (one confusion matrix over the split; predictions "
                                   "resized to the annotations' own size).")
    _eval_arguments(e)
    r = sub.add_parser("predict", help="class masks (palette PNGs) and overlays for images and folders",
                       description="Segment image files and folders (recursively); writes OUT/<name>.png (class "
                                   "indices, palette PNG at the image's size) and OUT/<name>_overlay.png.")
    _predict_arguments(r)
    x = sub.add_parser("export", help="the segmenter as an ONNX file, checked in ONNX Runtime",
                       description="Export to ONNX (input pixel_values (N, 3, H, W), normalised; output logits "
                                   "(N, C, H, W)); writes OUTPUT.json beside it with classes, palette and mean/std. "
                                   "The file runs at --size only, or with --dynamic-size at any H x W.")
    x.add_argument("checkpoint", metavar="WEIGHTS", help="a run folder or weights file, or an official .pth "
                                                          "(with --model)")
    x.add_argument("--model", default=None, help="the segmenter of a file without hymamba metadata")
    x.add_argument("--output", required=True, metavar="FILE.onnx", help="the .onnx file to write")
    x.add_argument("--size", type=positive_int, nargs="+", default=None, metavar="N",
                   help="input H [W] (default: the training crop; official 512); with --dynamic-size the size "
                        "the export traces and checks at")
    x.add_argument("--dynamic-size", action="store_true",
                   help="one file for every input H x W (needs onnxscript)")
    x.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17; 18 with --dynamic-size)")
    x.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from hymamba.cli.commands.train import add_training_arguments
    from hymamba.tasks.segmentation.config import SegmentationConfig

    add_training_arguments(p, SegmentationConfig, "'digitscenes' (default), an ADE20K root or a mask folder",
                           "YAML recipe, e.g. configs/upernet_mambavision_t_ade20k.yaml")


def _weights_and_inference(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="WEIGHTS",
                   help="a run folder, its model.safetensors or .pth, or an official mmengine .pth (with --model)")
    p.add_argument("--model", default=None, help="the segmenter of a file without hymamba metadata, e.g. "
                                                  "upernet_mambavision_t")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--size", type=non_negative_int, default=None,
                   help="resize to this short side, keeping the ratio (default: the run's; official: 512; 0: "
                        "the images' own size)")
    p.add_argument("--mode", choices=("whole", "slide"), default=None, help="inference (default: the run's; "
                                                                          "official: whole)")
    p.add_argument("--crop-size", type=positive_int, default=None, help="slide window side (default: the "
                                                                        "training crop)")
    p.add_argument("--stride", type=positive_int, default=None, help="slide stride (default: 2/3 of the window)")
    p.add_argument("--flip", action="store_true", help="also infer the mirrored image and average")
    p.add_argument("--scales", type=float, nargs="+", default=None, metavar="RATIO",
                   help="multi-scale: average over these resize ratios, e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16; float16 on GPUs without bfloat16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _weights_and_inference(p)
    p.add_argument("data", nargs="?", default="digitscenes",
                   help="'digitscenes' (default), an ADE20K root or a mask folder")
    p.add_argument("--split", default=None, help="split to score (default: validation / val)")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="mask 0 -> ignored, k -> k - 1 (default: the run's; on for ADE20K)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="score only this many images")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch for the built-in scenes (folders: one at a time)")
    p.add_argument("--workers", type=non_negative_int, default=None, help="data-loading processes")
    p.add_argument("--json", action="store_true", help="print JSON")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    _weights_and_inference(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders")
    p.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default: predictions)")
    p.add_argument("--no-overlay", dest="overlay", action="store_false", help="write only the masks")
    p.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlays (default: 0.5)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward (default: 8)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval, "predict": _predict, "export": _export}[args.action](args)


def _train(args: argparse.Namespace) -> int:
    from hymamba.cli.commands.train import run_training
    from hymamba.tasks.segmentation import SegmentationConfig, config_for_resume, train

    summary, status = run_training(args, SegmentationConfig, config_for_resume, train, "segment train")
    if summary is None:
        return status
    before = summary.get("initial_mIoU")
    before = f"; before training {before:.2f}" if before is not None else ""
    print(f"done: val mIoU {summary['final_mIoU']:.2f} (best {summary['best_mIoU']:.2f} at epoch "
          f"{summary['best_epoch']}{before}) after {summary['epochs']} epochs in {summary['wall_seconds']:.0f} s; "
          f"{summary['skipped_images']} unreadable image(s) skipped; weights: {summary['output']}/model.safetensors")
    return 0


def _inference_kwargs(args: argparse.Namespace) -> dict:
    return dict(model_name=args.model, size=args.size, mode=args.mode, crop_size=args.crop_size, stride=args.stride,
                flip=args.flip, scales=args.scales, amp=args.amp, use_ema=args.use_ema, device=args.device,
                scan_impl=args.scan_impl)


def _eval(args: argparse.Namespace) -> int:
    from hymamba.apps.segment import evaluate

    res = evaluate(args.checkpoint, args.data, split=args.split, reduce_zero_label=args.reduce_zero_label,
                   max_samples=args.max_samples, batch_size=args.batch_size, workers=args.workers,
                   progress=sys.stderr.isatty(), **_inference_kwargs(args))
    if args.json:
        print(json.dumps(without_nan(res), indent=2))
        return 0
    print(f"{res['model']} ({res['checkpoint']}) on {res['data']} [{res['split']}]: mIoU {res['mIoU']:.2f}  "
          f"aAcc {res['aAcc']:.2f}  mAcc {res['mAcc']:.2f}  ({res['images']} images, {res['skipped_images']} "
          f"unreadable skipped; {res['settings']})")
    width = max(8, max(len(r["class"]) for r in res["per_class"]))
    print(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'pixels':>10}")
    for r in res["per_class"]:
        print(f"{r['class']:<{width}}  {_fmt(r['IoU']):>6}  {_fmt(r['Acc']):>6}  {r['pixels']:>10}")
    return 0


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def _predict(args: argparse.Namespace) -> int:
    from hymamba.apps.segment import predict

    progress = progress_bar("segmenting")
    results = predict(args.checkpoint, args.inputs, args.out, overlay=args.overlay, alpha=args.alpha,
                      batch_size=args.batch_size, progress=progress, **_inference_kwargs(args))
    failed = report_unreadable(results)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if "mask" in r:
            top = ", ".join(f"{name} {100 * f:.1f}%" for name, f in list(r["classes"].items())[:4])
            print(f"{r['image']} -> {r['mask']}: {top}")
    print(f"{len(results) - failed} image(s) segmented into {args.out}, {failed} unreadable skipped")
    return 0


def _export(args: argparse.Namespace) -> int:
    from hymamba.apps.segment import export
    from hymamba.cli.commands._common import image_size
    from hymamba.errors import HymambaError

    size = tuple(image_size(args.size, [0, 0])) if args.size else None
    info = export(args.checkpoint, args.output, model_name=args.model, size=size, opset=args.opset,
                  check=args.check, dynamic_size=args.dynamic_size)
    h, w = ("H", "W") if args.dynamic_size else info["input"][2:]
    print(f"wrote {info['onnx']}: input pixel_values (N, 3, {h}, {w}), output logits (N, {info['output'][1]}, {h}, "
          f"{w}); N is dynamic{', H and W too' if args.dynamic_size else ''}; classes, palette and mean/std in "
          f"{Path(info['onnx']).with_suffix('.json')}")
    if args.check:
        sizes = ", ".join(f"{a}x{b}" for a, b in info["checked_sizes"])
        print(f"ONNX Runtime vs PyTorch on a random batch of 2 at {sizes}: max |difference| {info['max_abs_diff']:.2e}")
        if not info["max_abs_diff"] <= 1e-3:
            raise HymambaError(f"the exported model disagrees with PyTorch (max difference {info['max_abs_diff']:.2e})")
    return 0
