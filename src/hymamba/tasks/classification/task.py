"""Image classification as an engine task: the official MambaVision recipe on an image folder or the
built-in digits (Mixup/CutMix, label smoothing, RandAugment, random erasing, MESA, top-1/top-5)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from hymamba.data.datasets import (
    BUILTIN,
    CUED_DIGITS,
    ImageFolderDataset,
    builtin_dataset,
    collate_batch,
    subset,
    warn_unreadable,
)
from hymamba.data.samplers import ShardSampler
from hymamba.data.transforms import eval_transform, resolve_data_config, train_transform
from hymamba.engine.task import Task
from hymamba.errors import CheckpointError, ConfigError, DataError
from hymamba.factory import HEAD_PREFIXES, create_model, official_weights_path, resolve_model_name
from hymamba.models.options import options_from
from hymamba.models.variants import VARIANTS
from hymamba.tasks.classification.config import ClassificationConfig
from hymamba.tasks.classification.losses import build_loss, mesa_kl
from hymamba.tasks.classification.metrics import evaluate
from hymamba.utils.distributed import Dist
from hymamba.weights.load import load_state_dict
from hymamba.weights.metadata import Checkpoint, read_checkpoint

__all__ = ["ClassificationTask"]


class ClassificationTask(Task):
    """Train a MambaVision classifier; "best" is the top-1 accuracy (the EMA's, with an EMA)."""

    metric_names = ("top1", "top5", "loss")
    best_metric = "top1"
    best_mode = "max"
    best_title = "accuracy (%)"
    config: ClassificationConfig

    def __init__(self, config: ClassificationConfig) -> None:
        super().__init__(config)
        self.skipped: set = set()
        self.ema_model: Optional[nn.Module] = None
        self.mesa_on = False
        self.frozen: List[nn.Module] = []

    # -- data --------------------------------------------------------------------------------------

    def setup(self, dist: Dist, resume: Optional[Mapping[str, Any]]) -> None:
        cfg = self.config
        self.dist = dist
        self.name = resolve_model_name(cfg.model)
        # the starting weights are read once: their metadata steers preprocessing, their tensors the model
        self.start: Optional[Checkpoint] = None
        if cfg.checkpoint is not None:
            self.start = read_checkpoint(cfg.checkpoint)
        elif cfg.pretrained:
            self.start = read_checkpoint(official_weights_path(self.name))
        meta = self.start.meta if self.start is not None else {}
        self.data_config = resolve_data_config(VARIANTS[self.name].pretrained_cfg, meta, input_size=cfg.input_size,
                                               crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
        size = self.data_config["input_size"][-1]
        train_tf = train_transform(self.data_config, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                                   vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
                                   interpolation=cfg.train_interpolation, reprob=cfg.reprob, remode=cfg.remode,
                                   recount=cfg.recount)
        val_tf = eval_transform(self.data_config)
        if cfg.data in BUILTIN:
            if cfg.data == CUED_DIGITS and cfg.hflip > 0:
                raise ConfigError(f"hflip {cfg.hflip} mirrors cued-digits scenes, and a mirrored scene's cue points "
                                  "to the other digit (its label would be wrong); set --hflip 0")
            train_ds: Any = builtin_dataset(cfg.data, "train", size, train_tf)
            val_ds: Any = builtin_dataset(cfg.data, "val", size, val_tf)
            self.workers = 0 if cfg.workers is None else cfg.workers
        else:
            root = Path(cfg.data).expanduser()
            if not root.is_dir():
                raise DataError(f"data folder not found: {root}. Expected an ImageFolder root with "
                                f"{cfg.train_split}/ and {cfg.val_split}/ holding one subfolder per class "
                                f"(or one of the built-in data sets: {', '.join(BUILTIN)})")
            train_ds = ImageFolderDataset(root / cfg.train_split, train_tf, substitute_bad=True)
            val_ds = ImageFolderDataset(root / cfg.val_split, val_tf, class_names=train_ds.class_names)
            self.workers = min(8, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
        self.base_train = train_ds  # a generated set draws fresh training scenes each epoch (set_epoch)
        self.train_ds = subset(train_ds, cfg.max_train_samples)
        self.val_ds = subset(val_ds, cfg.max_val_samples)
        self.class_names: List[str] = list(train_ds.class_names)
        n_classes = len(self.class_names)
        self.loss_fn, self.mixup = build_loss(cfg, n_classes)
        if self.mixup is not None and n_classes < 2:
            raise DataError(f"mixup/cutmix blend images of different classes, but {train_ds.root} has only "
                            f"{n_classes} class ({self.class_names[0]}); add classes or set mixup 0 and cutmix 0")
        if self.mixup is not None and cfg.batch_size % 2:
            raise ConfigError(f"mixup/cutmix pair each batch with its reverse and need an even batch_size, got "
                              f"{cfg.batch_size}")
        if resume is not None and resume["class_names"] != self.class_names:
            raise DataError(f"the run being resumed was trained on classes {resume['class_names'][:10]}, "
                            f"but the data has {self.class_names[:10]}; resume with the same data")
        self.val_loader = torch.utils.data.DataLoader(
            self.val_ds, batch_size=cfg.val_batch_size or 2 * cfg.batch_size,
            sampler=ShardSampler(len(self.val_ds), dist.world_size, dist.rank), num_workers=self.workers,
            collate_fn=collate_batch, pin_memory=dist.device.type == "cuda")

    def train_dataset(self) -> Any:
        return self.train_ds

    def collate(self, samples: List[Any]) -> Any:
        return collate_batch(samples)

    def num_workers(self) -> int:
        return self.workers

    def run_name(self) -> str:
        return self.config.model

    # -- model -------------------------------------------------------------------------------------

    def architecture(self) -> Dict[str, str]:
        """Constructor options beyond the variant name (the ablations), saved beside the weights."""
        return options_from(self.config.__dict__)

    def build_model(self) -> nn.Module:
        cfg = self.config
        kwargs: Dict[str, Any] = dict(num_classes=len(self.class_names), scan_impl=cfg.scan_impl,
                                      ssm_init=cfg.ssm_init, **self.architecture())
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(self.name, **kwargs)
        self.init_note = "random initialisation"
        if self.start is not None:  # fine-tuning: everything must fit but the classifier
            report = load_state_dict(model, self.start.state_dict, strict=False)
            wrong = report.problems(ignore_mismatch=HEAD_PREFIXES)
            if wrong:
                raise CheckpointError(f"{self.start.path} does not fit {cfg.model}: {len(wrong)} keys are missing, "
                                      f"unexpected or mis-shaped (first: {wrong[:5]}); check the model name")
            new_head = any(k.startswith(HEAD_PREFIXES) for k, _, _ in report.mismatched)
            self.init_note = ("official weights" if cfg.pretrained else f"weights from {cfg.checkpoint}") + (
                f" with a new {len(self.class_names)}-class head" if new_head else "")
            self.start = None  # the tensors are in the model now; let them go
        self.frozen = [model.patch_embed] + list(model.levels[: cfg.freeze_stages]) if cfg.freeze_stages else []
        for m in self.frozen:
            m.requires_grad_(False)
        self.params = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.drop_path = max((m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")), default=0.0)
        return model

    # -- training and evaluation ---------------------------------------------------------------------

    def start_epoch(self, epoch: int, ema_model: Optional[nn.Module]) -> None:
        for m in self.frozen:  # frozen stages keep their BatchNorm statistics too
            m.eval()
        cfg = self.config
        if hasattr(self.base_train, "set_epoch"):
            self.base_train.set_epoch(epoch)
        self.ema_model = ema_model
        self.mesa_on = cfg.mesa > 0 and ema_model is not None and epoch / cfg.epochs > cfg.mesa_start_ratio

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        x, y, bad = batch
        warn_unreadable(bad, self.skipped)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        losses = {"loss": self.loss_fn(logits, y)}
        if self.mesa_on:
            with torch.no_grad():
                ema_logits = self.ema_model(x)
            losses["mesa"] = self.config.mesa * mesa_kl(logits, ema_logits)
            losses["loss"] = losses["loss"] + losses["mesa"]
        return losses

    def evaluate(self, model: nn.Module, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
        res = evaluate(model, self.val_loader, self.dist.device, amp_dtype=amp_dtype,
                       channels_last=self.config.channels_last, dist=self.dist)
        warn_unreadable(res.skipped, self.skipped)
        return {"top1": res.top1, "top5": res.top5, "loss": res.loss, "val_images": res.count}

    def end_epoch(self) -> None:
        if self.dist.enabled:
            self.skipped = {p for part in self.dist.gather_objects(sorted(self.skipped)) for p in part}

    # -- reporting and state -------------------------------------------------------------------------

    def metric_label(self, name: str) -> str:
        return {"top1": "top-1", "top5": "top-5"}.get(name, name)

    def format_metrics(self, metrics: Mapping[str, Any], short: bool = False) -> str:
        if short:
            return f"top-1 {metrics['top1']:.2f} loss {metrics['loss']:.4f}"
        return f"val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} loss {metrics['loss']:.4f}"

    def describe(self) -> List[str]:
        cfg = self.config
        data = f"{cfg.data} (built-in)" if cfg.data in BUILTIN else str(cfg.data)
        mesa = f"{cfg.mesa} from {cfg.mesa_start_ratio:g} of training" if cfg.mesa else "off"
        return [
            f"model {cfg.model}: {self.params / 1e6:.2f}M parameters ({self.trainable / 1e6:.2f}M trainable), "
            f"{self.init_note}",
            f"data {data}: {len(self.train_ds)} train / {len(self.val_ds)} val images, {len(self.class_names)} "
            f"classes, input {self.data_config['input_size'][-1]}px",
            f"recipe: smoothing {cfg.smoothing}, mixup {cfg.mixup} cutmix {cfg.cutmix}, aa {cfg.aa}, reprob "
            f"{cfg.reprob}, drop path {self.drop_path:g}, MESA {mesa}",
        ]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "class_names": self.class_names,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            "architecture": self.architecture(),
            "skipped": sorted(self.skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = set(state.get("skipped", ()))

    def export_metadata(self) -> Dict[str, Any]:
        dc = self.data_config
        return {
            "model": self.config.model, "num_classes": len(self.class_names), "class_names": self.class_names,
            "input_size": list(dc["input_size"]), "mean": list(dc["mean"]), "std": list(dc["std"]),
            "crop_pct": dc["crop_pct"], "crop_mode": dc["crop_mode"], "interpolation": dc["interpolation"],
            **self.architecture(),
        }

    def summary(self) -> Dict[str, Any]:
        cfg = self.config
        return {"model": cfg.model, "data": cfg.data, "num_classes": len(self.class_names),
                "skipped_images": len(self.skipped)}
