"""The segmentation run's configuration: the engine's settings plus data, segmenter and augmentation.

The defaults are the built-in laptop job: a small UPerNet (``mambavision_nano``'s backbone, 128/64
head channels) trained from scratch on the built-in :class:`~hymamba.data.segmentation.DigitScenes`
(64 px scenes, 11 classes) for 20 epochs, about 7 minutes on 2 CPU cores. The recipe keeps the
official ADE20K shape (``/work/shared/dense.md``: AdamW, betas (0.9, 0.999), weight decay 0.01,
linear warmup from 1e-6 then poly (power 1) decay to 0, auxiliary FCN loss x 0.4, the random resize
0.5-2.0 / cat-max-ratio crop / photometric pipeline, no EMA, no clipping, whole-image test) with
what a from-scratch run on a small set needs instead of a 160k-iteration fine-tune: a larger peak lr
(4e-3; the official 5e-5 fine-tunes an ImageNet-pretrained backbone and barely moves random
weights), no stochastic depth, no flips (a mirrored digit is another shape). Measured: 1e-3 with
64/32 head channels learned only the background in 8 epochs; 4e-3 with 64/32 reached 16 mIoU in
16 epochs; 4e-3 with 128/64 reached 45 in 20 (``docs/segmentation.md``).
Imports no torch: the command line builds its flags from these fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from hymamba.engine.config import need, option, resume_config
from hymamba.tasks.dense.config import DenseConfig

__all__ = ["DIGIT_SCENES", "EVAL_MODES", "SegmentationConfig", "build_config", "config_for_resume"]

#: the ``data`` value of the built-in data set
DIGIT_SCENES = "digitscenes"
EVAL_MODES = ("whole", "slide")


@dataclass
class SegmentationConfig(DenseConfig):
    """Everything a segmentation run needs. Field names are the YAML keys and the ``--flags``."""

    # data
    data: Optional[str] = option(DIGIT_SCENES, "'digitscenes' (built-in), an ADE20K root (images/ and annotations/ "
                                               "with training/ and validation/) or a folder with TRAIN_SPLIT/ and "
                                               "VAL_SPLIT/ each holding images/ + masks/ (index PNGs)")
    train_split: Optional[str] = option(None, "training split (default: 'training' for ADE20K, 'train' for mask "
                                              "folders)")
    val_split: Optional[str] = option(None, "validation split (default: 'validation' for ADE20K, 'val' for mask "
                                            "folders)")
    num_classes: Optional[int] = option(None, "classes (default: DigitScenes 11, ADE20K 150, a mask folder: the "
                                              "lines of its classes.txt)")
    reduce_zero_label: Optional[bool] = option(None, "label 0 -> ignored, k -> k - 1 (default: true for ADE20K, "
                                                     "false otherwise)")
    ignore_index: int = option(255, "mask value that is not scored nor trained on")
    scene_size: int = option(64, "side of the built-in DigitScenes images")

    # model
    head_channels: int = option(128, "UPerHead channels (official: 512)")
    aux_channels: int = option(64, "auxiliary FCNHead channels on level 3 (official: 256; 0: no auxiliary head)")
    aux_weight: float = option(0.4, "weight of the auxiliary loss (official: 0.4)")
    dropout: float = option(0.1, "dropout before the heads' classifiers (official: 0.1)")
    sync_bn: bool = option(True, "synchronise the heads' BatchNorm over processes on CUDA (official: SyncBN; "
                                 "CPU/gloo runs keep per-process statistics, averaged at each epoch's end)")

    # augmentation (mmseg's ADE20K pipeline, sized to CROP_SIZE) and evaluation
    crop_size: int = option(64, "training crop side (official: 512)")
    scale_ratio: Tuple[float, float] = option((0.5, 2.0), "random resize range of the (4 x CROP_SIZE, CROP_SIZE) "
                                                          "scale (official: 0.5-2.0 of (2048, 512))")
    cat_max_ratio: float = option(0.75, "retry crops where one class covers more than this (1: off)")
    flip_prob: float = option(0.0, "horizontal flip probability (official: 0.5; off by default: a mirrored digit "
                                   "is another shape)")
    photometric: bool = option(True, "photometric distortion (brightness, contrast, saturation, hue)")
    eval_mode: str = option("whole", "evaluation inference: whole (official) or slide")
    eval_size: Optional[int] = option(None, "evaluation short side (keep-ratio resize to (4 x S, S); default: "
                                            "CROP_SIZE; 0: the images' own size)")
    eval_stride: Optional[int] = option(None, "slide inference stride (default: 2/3 of CROP_SIZE)")

    # the recipe (official ADE20K shape; see the module docstring for the lr)
    epochs: int = option(20, "epochs in total, cooldown included")
    warmup_epochs: float = option(1, "linear warmup epochs, from WARMUP_LR")
    cooldown_epochs: int = option(0, "epochs at MIN_LR at the end")
    batch_size: int = option(8, "samples per process and step (official: 16 in total)")
    lr: float = option(4e-3, "peak learning rate (official: 5e-5 / 6e-5 for fine-tuning a pretrained backbone)")
    min_lr: float = option(0.0, "learning rate at the end of the schedule (poly decays to 0)")
    sched: str = option("poly", "learning-rate schedule (official: poly, power 1)")
    opt: str = option("adamw", "optimiser, any timm name (official: adamw)")
    weight_decay: float = option(0.01, "weight decay (not on biases, norms; official: 0.01)")
    clip_grad: Optional[float] = option(None, "gradient clipping threshold (null: off, as official)")
    model_ema: bool = option(False, "keep an exponential moving average of the weights (official: off)")
    eval_first: bool = option(True, "evaluate once before training (the mIoU 'before')")

    def resolved_eval_size(self) -> int:
        return self.crop_size if self.eval_size is None else self.eval_size

    def check(self) -> None:
        """Reject impossible settings before any work starts (ConfigError saying what to do)."""
        super().check()
        need(self.data is not None, "no data set: give DATA ('digitscenes', an ADE20K root or a mask folder)")
        need(self.num_classes is None or self.num_classes >= 1, f"num_classes must be at least 1, got "
                                                                f"{self.num_classes}")
        need(0 <= self.ignore_index <= 255 or self.ignore_index == -100,
             f"ignore_index must be in 0..255 (masks are 8/16-bit), got {self.ignore_index}")
        need(self.num_classes is None or self.ignore_index >= self.num_classes or self.ignore_index < 0,
             f"ignore_index {self.ignore_index} is a class index (num_classes {self.num_classes}); use 255")
        need(self.scene_size >= 32, f"scene_size must be at least 32, got {self.scene_size}")
        need(self.crop_size >= 32, f"crop_size must be at least 32 (the backbone downsamples 32x), got "
                                   f"{self.crop_size}")
        need(self.head_channels >= 1, f"head_channels must be at least 1, got {self.head_channels}")
        need(self.aux_channels >= 0, f"aux_channels must be >= 0 (0: no auxiliary head), got {self.aux_channels}")
        need(self.aux_weight >= 0, f"aux_weight must be >= 0, got {self.aux_weight}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(0 < self.scale_ratio[0] <= self.scale_ratio[1],
             f"scale_ratio must be 0 < min <= max, got {self.scale_ratio}")
        need(0 < self.cat_max_ratio <= 1, f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        need(0 <= self.flip_prob <= 1, f"flip_prob is a probability in [0, 1], got {self.flip_prob}")
        need(self.eval_mode in EVAL_MODES, f"eval_mode must be whole or slide, got {self.eval_mode!r}")
        need(self.eval_size is None or self.eval_size == 0 or self.eval_size >= 32,
             f"eval_size must be 0 (own size) or at least 32, got {self.eval_size}")
        need(self.eval_stride is None or self.eval_stride >= 1, f"eval_stride must be positive, got "
                                                                f"{self.eval_stride}")


#: shorthand (the segmentation config is what ``hymamba segment train`` reads)
build_config = SegmentationConfig.build


def config_for_resume(state: Mapping[str, Any], config_file: Optional[str] = None,
                      overrides: Optional[Mapping[str, Any]] = None) -> SegmentationConfig:
    """The config of a resumed segmentation run, with a YAML file and overrides on top."""
    return resume_config(SegmentationConfig, state, config_file, overrides)
