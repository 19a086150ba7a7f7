"""``hymamba detect train``: object detection and instance segmentation (torchvision Mask / Faster R-CNN
on MambaVision).

``train`` has one flag per field of :class:`hymamba.tasks.detection.config.DetectionConfig` (values:
defaults < ``--config FILE`` < flags).
"""
from __future__ import annotations

import argparse

HELP = "object detection / instance segmentation: train (Mask R-CNN on MambaVision; 'hymamba detect train' " \
       "alone trains on the built-in digit objects)"
PARSER_KWARGS = dict(description="Object detection and instance segmentation with torchvision's Mask / Faster R-CNN "
                                 "on the MambaVision backbone + FPN, COCO protocol. Data: 'digitobjects' (built-in), "
                                 "a COCO root or a folder with train/ and val/ each holding images/ + annotations.json.")
ACTIONS = ("train",)


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


def run(args: argparse.Namespace) -> int:
    from hymamba.cli.commands.train import run_training, training_exit
    from hymamba.tasks.detection import DetectionConfig, config_for_resume, train

    summary = run_training(args, DetectionConfig, config_for_resume, train, "detect train")
    if summary is None:
        return training_exit(args)
    before = summary.get("initial_AP")
    before = f"; before training {before:.2f}" if before is not None else ""
    mask = summary.get("final_mask_AP")
    mask = f", mask AP {mask:.2f}" if mask is not None else ""
    print(f"done: val box AP {summary['final_AP']:.2f}{mask} (best box AP {summary['best_AP']:.2f} at epoch "
          f"{summary['best_epoch']}{before}) after {summary['epochs']} epochs in {summary['wall_seconds']:.0f} s; "
          f"{summary['skipped_images']} unreadable image(s) skipped; weights: {summary['output']}/model.safetensors")
    return 0
