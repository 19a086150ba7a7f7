"""The detection run's configuration: the engine's settings plus data, detector and augmentation.

The defaults are the built-in laptop job: a torchvision Mask R-CNN on ``mambavision_nano``'s dense
backbone (64-channel FPN, 128-wide heads, lighter RPN/RoI sampling than COCO's) trained from scratch
for 3 epochs on the built-in :class:`~hymamba.data.detection.DigitObjects` (1,000 scenes of 128 px,
10 classes; docs/detection.md has the measured AP). The recipe keeps the official COCO shape
(AdamW, weight decay 0.05, no decay on norms, linear warm-up, the 3x step schedule scaled to the
epochs asked for: x0.1 at 27/36 and 33/36 of them, multi-scale training sizes, AMP), with a larger
peak lr for training every weight from a random start. ``configs/maskrcnn_mambavision_*_coco.yaml``
hold the official COCO recipe.
Imports no torch: the command line builds its flags from these fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from hymamba.engine.config import need, option, resume_config
from hymamba.tasks.dense.config import DenseConfig

__all__ = ["DIGIT_OBJECTS", "DETECTOR_KINDS", "DetectionConfig", "build_config", "config_for_resume"]

#: the ``data`` value of the built-in data set
DIGIT_OBJECTS = "digitobjects"
DETECTOR_KINDS = ("maskrcnn", "fasterrcnn")


@dataclass
class DetectionConfig(DenseConfig):
    """Everything a detection run needs. Field names are the YAML keys and the ``--flags``."""

    # data
    data: Optional[str] = option(DIGIT_OBJECTS, "'digitobjects' (built-in), a COCO root (train2017/, val2017/, "
                                                "annotations/instances_*.json) or a folder with TRAIN_SPLIT/ and "
                                                "VAL_SPLIT/ each holding images/ + annotations.json")
    train_split: Optional[str] = option(None, "training split (default: train2017 for COCO, train otherwise)")
    val_split: Optional[str] = option(None, "validation split (default: val2017 for COCO, val otherwise)")
    scene_size: int = option(128, "side of the built-in DigitObjects images")

    # model
    detector: str = option("maskrcnn", "maskrcnn (boxes + masks) or fasterrcnn (boxes)")
    window_size: Optional[Tuple[int, int, int, int]] = option(None, "attention windows per level (default: the "
                                                                     "variant's; official COCO: 8 8 112 56)")
    frozen_stages: int = option(-1, "freeze the stem (0) and the levels below N (-1: nothing)")
    norm_eval: bool = option(False, "keep the backbone's BatchNorm statistics frozen")
    fpn_channels: int = option(64, "FPN channels (official: 256)")
    head_channels: int = option(128, "box head fc and mask head conv width (0: torchvision's 1024 / 256; the "
                                     "official Cascade heads: 1024 / 256)")
    rpn_batch_size: int = option(128, "anchors sampled per image for the RPN loss (official: 256)")
    rois_per_image: int = option(128, "RoIs sampled per image for the box/mask heads (official: 512)")

    # sizes and augmentation (torchvision's detectors resize inside the model)
    min_size: int = option(128, "test-time short side (official: 800)")
    max_size: int = option(213, "long side at most (official: 1333)")
    train_sizes: Tuple[int, int] = option((96, 160), "multi-scale training: short sides from MIN to MAX (official: "
                                                     "480-800)")
    train_size_step: int = option(8, "multi-scale training: short sides MIN, MIN + STEP, ... (MAX always; "
                                     "official: 32, the 11 sizes 480, 512, ..., 800)")
    flip_prob: float = option(0.0, "horizontal flip probability (official: 0.5; off by default: a mirrored digit "
                                   "is another shape)")
    crop_prob: float = option(0.0, "probability of the DETR-style random crop (official: 0.5)")
    crop_range: Tuple[float, float] = option((0.75, 1.2), "crop sides as fractions of the short side (official: "
                                                          "384-600 px after a 400-600 px resize = about 0.75-1.2)")

    # the recipe (official COCO 3x shape; see the module docstring)
    epochs: int = option(3, "epochs in total, cooldown included")
    warmup_epochs: float = option(0.25, "linear warmup epochs, from WARMUP_LR")
    cooldown_epochs: int = option(0, "epochs at MIN_LR at the end")
    batch_size: int = option(4, "images per process and step (official: 2 x 8 processes)")
    lr: float = option(1e-3, "peak learning rate (official: 1e-4 T/S, 2e-4 B for a pretrained backbone)")
    min_lr: float = option(0.0, "learning rate floor")
    sched: str = option("multistep", "learning-rate schedule (official: step, x0.1 at MILESTONES)")
    opt: str = option("adamw", "optimiser, any timm name (official: adamw)")
    weight_decay: float = option(0.05, "weight decay (not on biases, norms; official: 0.05)")
    clip_grad: Optional[float] = option(None, "gradient clipping threshold (null: off, as official)")
    model_ema: bool = option(False, "keep an exponential moving average of the weights (official: off)")
    eval_first: bool = option(True, "evaluate once before training (the AP 'before')")

    def train_min_sizes(self) -> Tuple[int, ...]:
        """The short sides multi-scale training picks from, one per image: TRAIN_SIZES[0] to [1] in
        steps of TRAIN_SIZE_STEP (the largest always included)."""
        lo, hi = self.train_sizes
        return tuple(sorted({*range(lo, hi + 1, self.train_size_step), hi}))

    def check(self) -> None:
        """Reject impossible settings before any work starts (ConfigError saying what to do)."""
        super().check()
        need(self.data is not None, "no data set: give DATA ('digitobjects', a COCO root or a COCO-format folder)")
        need(self.detector in DETECTOR_KINDS, f"detector must be maskrcnn or fasterrcnn, got {self.detector!r}")
        need(self.scene_size >= 64, f"scene_size must be at least 64, got {self.scene_size}")
        need(self.fpn_channels >= 8, f"fpn_channels must be at least 8, got {self.fpn_channels}")
        need(self.head_channels >= 0, f"head_channels must be >= 0 (0: torchvision's widths), got {self.head_channels}")
        need(self.rpn_batch_size >= 1 and self.rois_per_image >= 1,
             f"rpn_batch_size and rois_per_image must be positive, got {self.rpn_batch_size}, {self.rois_per_image}")
        need(32 <= self.min_size <= self.max_size, f"need 32 <= min_size <= max_size, got {self.min_size}, "
                                                   f"{self.max_size}")
        need(32 <= self.train_sizes[0] <= self.train_sizes[1], f"train_sizes must be 32 <= min <= max, got "
                                                               f"{self.train_sizes}")
        need(self.train_size_step >= 1, f"train_size_step must be at least 1 pixel, got {self.train_size_step}")
        need(self.frozen_stages >= -1, f"frozen_stages must be -1 (nothing) or a level index, got {self.frozen_stages}")
        need(0 <= self.flip_prob <= 1, f"flip_prob is a probability in [0, 1], got {self.flip_prob}")
        need(0 <= self.crop_prob <= 1, f"crop_prob is a probability in [0, 1], got {self.crop_prob}")
        need(0 < self.crop_range[0] <= self.crop_range[1], f"crop_range must be 0 < low <= high (fractions of the "
                                                           f"short side), got {self.crop_range}")


#: shorthand (the detection config is what ``hymamba detect train`` reads)
build_config = DetectionConfig.build


def config_for_resume(state: Mapping[str, Any], config_file: Optional[str] = None,
                      overrides: Optional[Mapping[str, Any]] = None) -> DetectionConfig:
    """The config of a resumed detection run, with a YAML file and overrides on top."""
    return resume_config(DetectionConfig, state, config_file, overrides)
