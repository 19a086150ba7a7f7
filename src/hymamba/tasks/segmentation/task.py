"""Semantic segmentation as an engine task: a UPerNet on a MambaVision backbone (the official ADE20K
recipe's shape: decode + 0.4 x auxiliary cross-entropy, mmseg's pipeline, whole-image mIoU) on
ADE20K, an image/mask folder or the built-in digit scenes."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hymamba.data.datasets import warn_unreadable
from hymamba.data.samplers import ShardSampler
from hymamba.data.seg_transforms import ADE_MEAN, ADE_STD, SegEvalTransform, SegTrainTransform, collate_segmentation
from hymamba.data.segmentation import open_split, spread_subset
from hymamba.errors import DataError
from hymamba.models.upernet import build_segmenter
from hymamba.tasks.dense.task import DenseTask
from hymamba.tasks.segmentation.config import SegmentationConfig
from hymamba.tasks.segmentation.evaluation import Inference, evaluate_segmenter
from hymamba.utils.distributed import Dist

__all__ = ["DIGIT_SCENE_CLASSES", "SegmentationTask", "default_palette"]

#: the built-in scenes' classes: 0 = the photo, 1 + d = digit d
DIGIT_SCENE_CLASSES = ["background"] + [str(d) for d in range(10)]
#: the UPerNet layout every segmenter here uses (the official one)
POOL_SCALES = (1, 2, 3, 6)
AUX_INDEX = 2


def default_palette(n: int) -> List[List[int]]:
    """PASCAL VOC's colour map (class 0 black, then well-separated colours), for ``n`` classes."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


class SegmentationTask(DenseTask):
    """Train a UPerNet segmenter; "best" is the validation mIoU (mmseg's, in percent)."""

    metric_names = ("mIoU", "aAcc", "loss")
    best_metric = "mIoU"
    best_mode = "max"
    best_title = "mIoU (%)"
    config: SegmentationConfig

    # -- data --------------------------------------------------------------------------------------

    def setup(self, dist: Dist, resume: Optional[Mapping[str, Any]]) -> None:
        cfg = self.config
        self.dist = dist
        self.mean, self.std = ADE_MEAN, ADE_STD
        crop = (cfg.crop_size, cfg.crop_size)
        train_tf = SegTrainTransform(crop_size=crop, scale=(4 * cfg.crop_size, cfg.crop_size),
                                     ratio_range=tuple(cfg.scale_ratio), cat_max_ratio=cfg.cat_max_ratio,
                                     flip_prob=cfg.flip_prob, photometric=cfg.photometric, mean=self.mean,
                                     std=self.std, ignore_index=cfg.ignore_index)
        size = cfg.resolved_eval_size()
        val_tf = SegEvalTransform(scale=(4 * size, size) if size else None, mean=self.mean, std=self.std)
        train_ds, self.data_kind, self.reduce_zero = open_split(
            cfg.data, cfg.train_split, "train", reduce_zero=cfg.reduce_zero_label, transform=train_tf,
            substitute_bad=True, seed=cfg.seed, scene_size=cfg.scene_size)
        val_ds, _, _ = open_split(cfg.data, cfg.val_split, "val", reduce_zero=self.reduce_zero, transform=val_tf,
                                  scene_size=cfg.scene_size)
        classes: Optional[List[str]]
        if self.data_kind == "digitscenes":
            classes = list(DIGIT_SCENE_CLASSES)
            self.workers = 0 if cfg.workers is None else cfg.workers
        else:
            classes = train_ds.classes or (list(val_ds.classes) if val_ds.classes else None)
            n = cfg.num_classes or (len(classes) if classes else 150 if self.data_kind == "ade20k" else None)
            if n is None:
                raise DataError(f"{cfg.data}: the number of classes is unknown; set num_classes or add a classes.txt "
                                "(one name per line) to the data folder")
            if classes is None or len(classes) != n:
                classes = [f"class {k}" for k in range(n)]
            self.workers = min(8, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
        if cfg.num_classes is not None and cfg.num_classes != len(classes):
            if self.data_kind == "digitscenes":
                raise DataError(f"DigitScenes has {len(classes)} classes, but num_classes is {cfg.num_classes}; "
                                "drop num_classes")
            classes = [f"class {k}" for k in range(cfg.num_classes)]
        self.class_names: List[str] = classes
        self.palette = default_palette(len(classes))
        self.base_train = train_ds
        self.train_ds = spread_subset(train_ds, cfg.max_train_samples)
        self.val_ds = spread_subset(val_ds, cfg.max_val_samples)
        self.check_resume(resume)
        # images of one size (the scenes) batch; folders are scored one image at a time (evaluation.py)
        val_batch = (cfg.val_batch_size or 2 * cfg.batch_size) if self.data_kind == "digitscenes" else 1
        self.val_loader = torch.utils.data.DataLoader(
            self.val_ds, batch_size=val_batch, sampler=ShardSampler(len(self.val_ds), dist.world_size, dist.rank),
            num_workers=self.workers, collate_fn=self.collate, pin_memory=dist.device.type == "cuda")

    def train_dataset(self) -> Any:
        return self.train_ds

    def collate(self, samples: List[Any]) -> Any:
        return collate_segmentation(samples, self.config.ignore_index)

    def num_workers(self) -> int:
        return self.workers

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0])

    def run_name(self) -> str:
        return f"upernet_{self.config.backbone}"

    # -- model -------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        cfg = self.config
        backbone = self.build_backbone()
        model = build_segmenter(backbone, len(self.class_names), channels=cfg.head_channels,
                                aux_channels=cfg.aux_channels or None, pool_scales=POOL_SCALES, aux_index=AUX_INDEX,
                                dropout_ratio=cfg.dropout)
        model.class_names, model.palette = list(self.class_names), [list(c) for c in self.palette]
        if cfg.sync_bn and self.dist.world_size > 1 and self.dist.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps names: checkpoints are unchanged
        self.params = sum(p.numel() for p in model.parameters())
        return model

    # -- training and evaluation ---------------------------------------------------------------------

    def start_epoch(self, epoch: int, ema_model: Optional[nn.Module]) -> None:
        self.base_train.set_epoch(epoch)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of ``logits`` resized bilinearly (align_corners False, as mmseg) to the masks."""
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), target, ignore_index=self.config.ignore_index, reduction=reduction)

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        x, y, bad = batch
        warn_unreadable(bad, self.skipped)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        losses = {"decode_loss": self._ce(out["decode"], y)}
        loss = losses["decode_loss"]
        if "aux" in out and self.config.aux_weight > 0:
            losses["aux_loss"] = self._ce(out["aux"], y)
            loss = loss + self.config.aux_weight * losses["aux_loss"]
        # a batch whose every pixel is ignored gives NaN (0/0): it teaches nothing, so it counts 0
        losses["loss"] = torch.nan_to_num(loss, nan=0.0) if bool((y != self.config.ignore_index).sum() == 0) else loss
        return losses

    def inference(self) -> Inference:
        """The configured test-time inference (whole image or sliding window)."""
        cfg = self.config
        stride = cfg.eval_stride or max(1, (2 * cfg.crop_size) // 3)
        return Inference(cfg.eval_mode, (cfg.crop_size, cfg.crop_size), (stride, stride))

    def evaluate(self, model: nn.Module, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
        res = evaluate_segmenter(model, self.val_loader, len(self.class_names), inference=self.inference(),
                                 ignore_index=self.config.ignore_index, device=self.dist.device, amp_dtype=amp_dtype,
                                 dist=self.dist, skipped=self.skipped, channels_last=self.config.channels_last)
        self.last_iou = res["IoU"]
        return {"mIoU": res["mIoU"], "aAcc": res["aAcc"], "mAcc": res["mAcc"], "loss": res["loss"],
                "val_images": res["images"]}

    # -- reporting and state -------------------------------------------------------------------------

    def format_metrics(self, metrics: Mapping[str, Any], short: bool = False) -> str:
        if short:
            return f"mIoU {metrics['mIoU']:.2f} loss {metrics['loss']:.4f}"
        return f"val mIoU {metrics['mIoU']:.2f} aAcc {metrics['aAcc']:.2f} loss {metrics['loss']:.4f}"

    def describe(self) -> List[str]:
        cfg = self.config
        data = "DigitScenes (built-in)" if self.data_kind == "digitscenes" else f"{self.data_kind} {cfg.data}"
        return [
            f"model UPerNet on {cfg.backbone}: {self.params / 1e6:.2f}M parameters, head {cfg.head_channels} / aux "
            f"{cfg.aux_channels or 'off'} channels, {self.init_note}",
            f"data {data}: {len(self.train_ds)} train / {len(self.val_ds)} val images, {len(self.class_names)} "
            f"classes, crop {cfg.crop_size}px, eval {cfg.eval_mode} at short side {cfg.resolved_eval_size() or 'own'}",
            f"recipe: decode CE + {cfg.aux_weight:g} x aux CE (ignore {cfg.ignore_index}), resize "
            f"{cfg.scale_ratio[0]:g}-{cfg.scale_ratio[1]:g}, cat max ratio {cfg.cat_max_ratio:g}, flip "
            f"{cfg.flip_prob:g}, photometric {'on' if cfg.photometric else 'off'}, drop path {cfg.drop_path:g}",
        ]

    def segmenter_settings(self) -> Dict[str, Any]:
        """What rebuilds the model: ``create_backbone(backbone, window_size=..., drop_path_rate=...)`` then
        ``build_segmenter(backbone, num_classes, channels, aux_channels, pool_scales, aux_index, dropout_ratio)``."""
        cfg = self.config
        return {"backbone": self.backbone_name, "num_classes": len(self.class_names),
                "channels": cfg.head_channels, "aux_channels": cfg.aux_channels or None,
                "pool_scales": list(POOL_SCALES), "aux_index": AUX_INDEX, "dropout_ratio": cfg.dropout,
                "align_corners": False, "drop_path_rate": cfg.drop_path,
                "window_size": list(cfg.window_size) if cfg.window_size is not None else None}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "palette": self.palette, "segmentation": self.export_metadata()}

    def export_metadata(self) -> Dict[str, Any]:
        cfg = self.config
        size = cfg.resolved_eval_size()
        return {
            "task": "segmentation", "model": f"upernet_{self.backbone_name}", **self.segmenter_settings(),
            "class_names": self.class_names, "palette": self.palette,
            "mean": list(self.mean), "std": list(self.std), "crop_size": [cfg.crop_size, cfg.crop_size],
            "eval_mode": cfg.eval_mode, "eval_scale": [4 * size, size] if size else None,
            "eval_stride": cfg.eval_stride or max(1, (2 * cfg.crop_size) // 3),
            "reduce_zero_label": self.reduce_zero, "ignore_index": cfg.ignore_index,
            "data": self.data_kind, "scene_size": cfg.scene_size if self.data_kind == "digitscenes" else None,
        }

    def summary(self) -> Dict[str, Any]:
        cfg = self.config
        return {"model": f"upernet_{self.backbone_name}", "data": cfg.data, "num_classes": len(self.class_names),
                "skipped_images": len(self.skipped)}
