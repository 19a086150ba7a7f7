"""Object detection and instance segmentation as an engine task: torchvision's Mask / Faster R-CNN on
a MambaVision backbone + FPN (:mod:`hymamba.models.detection`), trained with torchvision's loss dict
and scored with the COCO protocol (box and mask AP, AP50, AP75, APs/m/l) on a COCO-format folder,
COCO itself or the built-in digit objects."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from hymamba.data.datasets import warn_unreadable
from hymamba.data.detection import DetTrainTransform, coco_subset, collate_detection, open_detection_split
from hymamba.data.samplers import ShardSampler
from hymamba.data.segmentation import spread_subset
from hymamba.errors import DataError
from hymamba.models.detection import build_detector
from hymamba.tasks.dense.task import DenseTask
from hymamba.tasks.detection.config import DetectionConfig
from hymamba.tasks.detection.evaluation import evaluate_detector
from hymamba.utils.distributed import Dist

__all__ = ["DetectionTask"]


class DetectionTask(DenseTask):
    """Train a torchvision R-CNN; "best" is the validation box AP (COCO's AP@[.5:.95], in percent)."""

    metric_names = ("AP", "AP50", "AP75", "mask_AP", "mask_AP50")
    best_metric = "AP"
    best_mode = "max"
    best_title = "box AP (%)"
    config: DetectionConfig

    # -- data --------------------------------------------------------------------------------------

    def setup(self, dist: Dist, resume: Optional[Mapping[str, Any]]) -> None:
        cfg = self.config
        self.dist = dist
        train_ds, self.data_kind = open_detection_split(
            cfg.data, cfg.train_split, "train",
            transform=DetTrainTransform(cfg.flip_prob, cfg.crop_prob, cfg.crop_range),
            substitute_bad=True, seed=cfg.seed, scene_size=cfg.scene_size)
        val_ds, _ = open_detection_split(cfg.data, cfg.val_split, "val", scene_size=cfg.scene_size)
        self.class_names: List[str] = list(train_ds.classes)
        if list(val_ds.classes) != self.class_names:
            raise DataError(f"the training and validation splits have different categories ({self.class_names[:5]} "
                            f"vs {list(val_ds.classes)[:5]}); they must share one category list")
        self.check_resume(resume)
        self.base_train = train_ds
        self.train_ds = spread_subset(train_ds, cfg.max_train_samples)
        self.val_ds, self.val_gt = coco_subset(val_ds, cfg.max_val_samples)
        self.workers = (0 if self.data_kind == "digitobjects" else min(8, os.cpu_count() or 1)) \
            if cfg.workers is None else cfg.workers
        self.val_loader = torch.utils.data.DataLoader(
            self.val_ds, batch_size=cfg.val_batch_size or cfg.batch_size,
            sampler=ShardSampler(len(self.val_ds), dist.world_size, dist.rank), num_workers=self.workers,
            collate_fn=collate_detection, pin_memory=dist.device.type == "cuda")

    def train_dataset(self) -> Any:
        return self.train_ds

    def collate(self, samples: List[Any]) -> Any:
        return collate_detection(samples)

    def num_workers(self) -> int:
        return self.workers

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0])

    def run_name(self) -> str:
        return f"{self.config.detector}_{self.config.backbone}"

    # -- model -------------------------------------------------------------------------------------

    def detector_settings(self) -> Dict[str, Any]:
        """What rebuilds the model: ``create_backbone(backbone, window_size=...)`` then
        ``build_detector(backbone, kind, num_classes, **kwargs)``."""
        cfg = self.config
        return {"kind": cfg.detector, "backbone": self.backbone_name, "num_classes": len(self.class_names) + 1,
                "window_size": list(cfg.window_size) if cfg.window_size is not None else None,
                "detector_kwargs": {"fpn_channels": cfg.fpn_channels, "head_channels": cfg.head_channels or None,
                                    "min_size": cfg.min_size,
                                    "max_size": cfg.max_size, "rpn_batch_size_per_image": cfg.rpn_batch_size,
                                    "box_batch_size_per_image": cfg.rois_per_image}}

    def build_model(self) -> nn.Module:
        cfg = self.config
        backbone = self.build_backbone(frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval)
        settings = self.detector_settings()
        model = build_detector(backbone, cfg.detector, settings["num_classes"], **settings["detector_kwargs"])
        # multi-scale training: torchvision picks one of these short sides per batch in train mode
        self.test_size = cfg.min_size
        model.transform.min_size = cfg.train_min_sizes()
        self.params = sum(p.numel() for p in model.parameters())
        return model

    # -- training and evaluation ---------------------------------------------------------------------

    def start_epoch(self, epoch: int, ema_model: Optional[nn.Module]) -> None:
        self.base_train.set_epoch(epoch)

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        images, targets, bad = batch
        warn_unreadable(bad, self.skipped)
        losses = model(list(images), [{k: v for k, v in t.items() if k != "image_id"} for t in targets])
        out = {k: v for k, v in losses.items()}
        out["loss"] = sum(losses.values())
        return out

    def evaluate(self, model: nn.Module, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
        res = evaluate_detector(model, self.val_loader, self.val_gt, test_size=self.config.min_size,
                                device=self.dist.device, amp_dtype=amp_dtype, dist=self.dist, skipped=self.skipped)
        box = res["bbox"]
        out = {"AP": box["AP"], "AP50": box["AP50"], "AP75": box["AP75"], "APs": box["APs"], "APm": box["APm"],
               "APl": box["APl"], "val_images": res["images"]}
        if "segm" in res:
            out.update({"mask_AP": res["segm"]["AP"], "mask_AP50": res["segm"]["AP50"],
                        "mask_AP75": res["segm"]["AP75"]})
        self.last_summary = res["summary"]
        return out

    # -- reporting and state -------------------------------------------------------------------------

    def format_metrics(self, metrics: Mapping[str, Any], short: bool = False) -> str:
        text = f"box AP {metrics['AP']:.2f} AP50 {metrics['AP50']:.2f}"
        if metrics.get("mask_AP") is not None:
            text += f" mask AP {metrics['mask_AP']:.2f}"
        return text if short else "val " + text

    def describe(self) -> List[str]:
        cfg = self.config
        data = "DigitObjects (built-in)" if self.data_kind == "digitobjects" else f"{self.data_kind} {cfg.data}"
        return [
            f"model {cfg.detector} on {cfg.backbone} + FPN {cfg.fpn_channels}: {self.params / 1e6:.2f}M parameters, "
            f"{self.init_note}",
            f"data {data}: {len(self.train_ds)} train / {len(self.val_ds)} val images, {len(self.class_names)} "
            f"classes; train short sides {', '.join(map(str, cfg.train_min_sizes()))}, test {cfg.min_size} "
            f"(long side <= {cfg.max_size}), flip {cfg.flip_prob:g}, crop {cfg.crop_prob:g}",
            f"recipe: torchvision's losses (RPN + box{' + mask' if cfg.detector == 'maskrcnn' else ''}), "
            f"{cfg.sched} at {cfg.milestones[0]:g}/{cfg.milestones[1]:g} of the epochs, drop path {cfg.drop_path:g}",
        ]

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "detection": self.export_metadata()}

    def export_metadata(self) -> Dict[str, Any]:
        return {"task": "detection", "model": f"{self.config.detector}_{self.backbone_name}",
                **self.detector_settings(), "class_names": self.class_names, "data": self.data_kind,
                "scene_size": self.config.scene_size if self.data_kind == "digitobjects" else None}

    def summary(self) -> Dict[str, Any]:
        cfg = self.config
        return {"model": f"{cfg.detector}_{self.backbone_name}", "data": cfg.data,
                "num_classes": len(self.class_names), "skipped_images": len(self.skipped)}

