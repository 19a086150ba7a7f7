"""``hymamba detect train|eval|predict``: object detection and instance segmentation (torchvision Mask / Faster R-CNN
on MambaVision).

``train`` has one flag per field of :class:`hymamba.tasks.detection.config.DetectionConfig` (values:
defaults < ``--config FILE`` < flags); ``eval`` and ``predict`` read a run folder.
"""
from __future__ import annotations

import argparse
import json
import math

from hymamba.cli.commands._common import non_negative_int, positive_int, progress_bar, report_unreadable, without_nan

HELP = "object detection / instance segmentation: train, eval, predict (Mask R-CNN on MambaVision; 'hymamba detect train' " \
       "alone trains on the built-in digit objects)"
PARSER_KWARGS = dict(description="Object detection and instance segmentation with torchvision's Mask / Faster R-CNN "
                                 "on the MambaVision backbone + FPN, COCO protocol. Data: 'digitobjects' (built-in), "
                                 "a COCO root or a folder with train/ and val/ each holding images/ + annotations.json.")
ACTIONS = ("train", "eval", "predict")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hymamba.cli.commands.train import add_training_arguments
    from hymamba.tasks.detection.config import DetectionConfig

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    t = sub.add_parser("train", help="train a detector (built-in digit objects by default)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a detector with the engine. Values: defaults < --config FILE < flags. Runs "
                                   "unchanged under torchrun (DDP). Optional values take 'none'.",
                       epilog="examples:\n"
                              "  hymamba detect train                        # the built-in digit objects\n"
                              "  hymamba detect train /data/coco --backbone mambavision_t --pretrained --fpn-channels "
                              "256 --window-size 8 8 112 56 --min-size 800 --max-size 1333\n"
                              "  hymamba detect train --resume runs/maskrcnn_mambavision_nano-20261202-120000")
    add_training_arguments(t, DetectionConfig, "'digitobjects' (default), a COCO root or a COCO-format folder",
                           "YAML recipe")
    e = sub.add_parser("eval", help="COCO box / mask AP of trained weights",
                       description="Score a detector with the COCO protocol (pycocotools): AP, AP50, AP75, APs/m/l.")
    _weights(e)
    e.add_argument("data", nargs="?", default="digitobjects", help="'digitobjects' (default), a COCO root or a "
                                                                   "COCO-format folder")
    e.add_argument("--split", default=None, help="split to score (default: val2017 / val)")
    e.add_argument("--max-samples", type=positive_int, default=None, help="score only this many images")
    e.add_argument("--batch-size", type=positive_int, default=4, help="images per batch (default: 4)")
    e.add_argument("--workers", type=non_negative_int, default=None, help="data-loading processes")
    e.add_argument("--results", default=None, metavar="FILE", help="also write the detections to FILE in COCO's "
                   "results format (bbox [x, y, w, h], score, RLE segmentation; the annotation file's ids)")
    e.add_argument("--json", action="store_true", help="print JSON")
    r = sub.add_parser("predict", help="detections (JSON) and drawn images for image files and folders",
                       description="Detect objects in image files and folders (recursively): OUT/detections.json "
                                   "and OUT/<name>.png with boxes, classes, scores (and masks).")
    _weights(r)
    r.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders")
    r.add_argument("--out", default="detections", metavar="DIR", help="output folder (default: detections)")
    r.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this "
                                                                   "(default: 0.5)")
    r.add_argument("--no-draw", dest="draw", action="store_false", help="write only detections.json")
    r.add_argument("--batch-size", type=positive_int, default=4, help="images per forward (default: 4)")
    r.add_argument("--json", action="store_true", help="print JSON")


def _weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="WEIGHTS", help="a run folder of 'hymamba detect train', its "
                                                          "model.safetensors or a .pth it wrote")
    p.add_argument("--size", type=positive_int, default=None, help="test short side (default: the run's)")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16; float16 on GPUs without bfloat16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval, "predict": _predict}[args.action](args)


def _train(args: argparse.Namespace) -> int:
    from hymamba.cli.commands.train import run_training
    from hymamba.tasks.detection import DetectionConfig, config_for_resume, train

    summary, status = run_training(args, DetectionConfig, config_for_resume, train, "detect train")
    if summary is None:
        return status
    before = summary.get("initial_AP")
    before = f"; before training {before:.2f}" if before is not None else ""
    mask = summary.get("final_mask_AP")
    mask = f", mask AP {mask:.2f}" if mask is not None else ""
    print(f"done: val box AP {summary['final_AP']:.2f}{mask} (best box AP {summary['best_AP']:.2f} at epoch "
          f"{summary['best_epoch']}{before}) after {summary['epochs']} epochs in {summary['wall_seconds']:.0f} s; "
          f"{summary['skipped_images']} unreadable image(s) skipped; weights: {summary['output']}/model.safetensors")
    return 0


def _common(args: argparse.Namespace) -> dict:
    return dict(size=args.size, amp=args.amp, use_ema=args.use_ema, device=args.device, scan_impl=args.scan_impl)


def _eval(args: argparse.Namespace) -> int:
    from hymamba.apps.detect import evaluate

    res = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, workers=args.workers,
                   max_samples=args.max_samples, results_file=args.results, **_common(args))
    if args.json:
        res = {k: v for k, v in res.items() if k != "summary"}
        print(json.dumps(without_nan(res), indent=2))
        return 0
    print(f"{res['model']} ({res['checkpoint']}) on {res['data']}: {res['images']} images at short side "
          f"{res['test_size']}, {res['detections']} detections, {res['skipped_images']} unreadable skipped")
    for kind in ("bbox", "segm"):
        if kind in res:
            print(f"{'box ' if kind == 'bbox' else 'mask'}  " + "  ".join(
                f"{k} {'-' if math.isnan(v) else f'{v:.2f}'}" for k, v in res[kind].items()))
    if args.results:
        print(f"detections in COCO's results format: {args.results}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from hymamba.apps.detect import predict

    progress = progress_bar("detecting")
    results = predict(args.checkpoint, args.inputs, args.out, score_thresh=args.score_thresh, draw=args.draw,
                      batch_size=args.batch_size, progress=progress, **_common(args))
    failed = report_unreadable(results)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if "detections" in r:
            found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in r["detections"][:6]) or "nothing"
            print(f"{r['image']}: {found}")
    print(f"{len(results) - failed} image(s) into {args.out}/detections.json, {failed} unreadable skipped")
    return 0
