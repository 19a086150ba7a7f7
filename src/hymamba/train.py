"""Training: the official MambaVision recipe on any data set, from a laptop CPU to a torchrun cluster.

The recipe is built from timm's components: LAMB (or any timm optimiser) with weight-decay groups
from ``model.no_weight_decay()`` and optional layer-wise LR decay from ``model.group_matcher()``, a
per-step cosine schedule with warmup and cooldown, Mixup/CutMix with label smoothing, RandAugment,
random erasing and color jitter, drop path, a model EMA, gradient clipping and AMP — plus MESA
(the official trick: KL divergence between the model's and the EMA's outputs added to the loss
once ``epoch / epochs`` passes a start ratio).

One code path runs a single process or many under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA):
disjoint data shards, metrics summed over processes, BatchNorm statistics averaged after each
epoch. A checkpoint holding every state (model, EMA, optimiser, scheduler, grad scaler, epoch,
each process's RNG states) is written atomically after every epoch, and on Ctrl-C / SIGTERM
mid-epoch; ``--resume`` continues from it exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

from hymamba import distributed
from hymamba.data import (DIGITS, DigitsDataset, EpochSampler, ImageFolderDataset, ShardSampler, collate_batch,
                          eval_transform, subset, train_transform, warn_unreadable)
from hymamba.distributed import Dist
from hymamba.evaluate import autocast, evaluate, model_metadata
from hymamba.train_config import TrainConfig, build_config, check_config, config_to_dict, scaled_lr
from hymamba.train_report import Reporter, epoch_line, write_json_atomic
from hymamba.train_state import atomic_copy, get_rng_state, save_train_state, set_rng_state

__all__ = ["TrainingError", "config_for_resume", "train"]

logger = logging.getLogger(__name__)

#: exit status of a run stopped by Ctrl-C / SIGTERM (128 + SIGINT)
INTERRUPTED_EXIT = 130
#: settings that shape the learning-rate schedule (a resumed run that changes one gets a new schedule)
_SCHEDULE_KEYS = ("epochs", "warmup_epochs", "cooldown_epochs", "lr", "lr_base_size", "min_lr", "warmup_lr",
                  "sched", "batch_size", "grad_accum")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last checkpoint is kept."""


def _mesa_kl(logits: torch.Tensor, ema_logits: torch.Tensor) -> torch.Tensor:
    """MESA's distillation term, as in the official train.py: 50 * KL(EMA || model) at temperature 3."""
    t = 3.0
    return 50.0 * nn.functional.kl_div(nn.functional.log_softmax(logits.float() / t, dim=1),
                                       nn.functional.softmax(ema_logits.float() / t, dim=1), reduction="batchmean")


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (to check that all ranks end with the same weights)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def _stop_on_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_signal`` on SIGINT/SIGTERM instead of dying; a second Ctrl-C stops at once."""
    if sys.platform == "win32" or not _in_main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    count = [0]

    def handler(signum: int, frame: Any) -> None:
        count[0] += 1
        if count[0] > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        on_signal(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Trainer:
    """One training run; ``run()`` returns its summary."""

    def __init__(self, cfg: TrainConfig, dist: Dist, resume: Optional[Dict[str, Any]],
                 echo: Callable[[str], None]) -> None:
        self.cfg, self.dist, self.resume = cfg, dist, resume
        self.main = dist.is_main
        self.echo = echo if self.main and not cfg.quiet else (lambda _msg: None)
        self.device = dist.device
        self.stop_requested = False
        self.session_start = time.perf_counter()

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.output = self._output_dir()
        _seed_everything(cfg.seed + dist.rank)
        self._build_data()
        self._build_model()
        self._build_optimisation()
        self._restore()

    def _output_dir(self) -> Path:
        cfg, dist = self.cfg, self.dist
        problem, out = None, None
        if self.main:
            if cfg.output:
                out = Path(cfg.output).expanduser()
            elif self.resume is not None:
                out = Path(self.resume["path"]).parent
            else:
                out = Path("runs") / f"{cfg.model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            if self.resume is None and (out / "last.pth").exists():
                problem = (f"{out} already holds a training run (last.pth): pass --resume {out} to continue it, "
                           "or choose another --output")
            elif out.exists() and not out.is_dir():
                problem = f"--output {out} is a file; expected a folder (new or holding a run to resume)"
        problem, out = dist.broadcast_object((problem, str(out)))
        if problem:
            raise ValueError(problem)
        self.cfg = self.cfg if self.cfg.output == out else dataclasses.replace(self.cfg, output=out)
        return Path(out)

    def _build_data(self) -> None:
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        from hymamba.factory import resolve_model_name

        cfg, dist = self.cfg, self.dist
        meta = model_metadata(cfg.checkpoint)
        args: Dict[str, Any] = {k: tuple(meta[k]) if isinstance(meta[k], list) else meta[k]
                                for k in ("mean", "std", "crop_pct", "crop_mode", "interpolation") if meta.get(k)}
        if cfg.input_size:
            args["input_size"] = (3, cfg.input_size, cfg.input_size)
        for key in ("interpolation", "crop_pct"):
            if getattr(cfg, key) is not None:
                args[key] = getattr(cfg, key)
        pretrained_cfg = get_pretrained_cfg(resolve_model_name(cfg.model)).to_dict()
        self.data_config = resolve_data_config(args, pretrained_cfg=pretrained_cfg)
        size = self.data_config["input_size"][-1]
        train_tf = train_transform(self.data_config, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                                   vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
                                   interpolation=cfg.train_interpolation, reprob=cfg.reprob, remode=cfg.remode,
                                   recount=cfg.recount)
        val_tf = eval_transform(self.data_config)
        if cfg.data == DIGITS:
            train_ds: Any = DigitsDataset("train", size, train_tf)
            val_ds: Any = DigitsDataset("val", size, val_tf)
            self.workers = 0 if cfg.workers is None else cfg.workers
        else:
            root = Path(cfg.data).expanduser()
            if not root.is_dir():
                raise ValueError(f"data folder not found: {root}. Expected an ImageFolder root with "
                                 f"{cfg.train_split}/ and {cfg.val_split}/ holding one subfolder per class "
                                 "(or 'digits' for the built-in data set)")
            train_ds = ImageFolderDataset(root / cfg.train_split, train_tf, substitute_bad=True)
            val_ds = ImageFolderDataset(root / cfg.val_split, val_tf, class_names=train_ds.class_names)
            self.workers = min(8, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
        self.train_ds = subset(train_ds, cfg.max_train_samples)
        self.val_ds = subset(val_ds, cfg.max_val_samples)
        self.class_names: List[str] = list(train_ds.class_names)
        n_classes = len(self.class_names)
        self.mixup_on = cfg.mixup > 0 or cfg.cutmix > 0
        if self.mixup_on and n_classes < 2:
            raise ValueError(f"mixup/cutmix blend images of different classes, but {train_ds.root} has only "
                             f"{n_classes} class ({self.class_names[0]}); add classes or set mixup 0 and cutmix 0")
        if self.mixup_on and cfg.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair each batch with its reverse and need an even batch_size, got "
                             f"{cfg.batch_size}")
        per_rank = math.ceil(len(self.train_ds) / dist.world_size)
        need = cfg.batch_size * cfg.grad_accum
        if per_rank < need:
            raise ValueError(f"the training split has {len(self.train_ds)} images, {per_rank} per process with "
                             f"{dist.world_size} process(es): fewer than batch_size x grad_accum = {need}, so not "
                             "one optimiser step fits in an epoch; lower --batch-size or add images")
        if self.resume is not None and self.resume["class_names"] != self.class_names:
            raise ValueError(f"the run being resumed was trained on classes {self.resume['class_names'][:10]}, "
                             f"but the data has {self.class_names[:10]}; resume with the same data")
        self.sampler = EpochSampler(len(self.train_ds), dist.world_size, dist.rank, seed=cfg.seed)
        pin = self.device.type == "cuda"
        self.train_loader = torch.utils.data.DataLoader(
            self.train_ds, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=self.workers,
            collate_fn=collate_batch, drop_last=True, pin_memory=pin)
        self.val_loader = torch.utils.data.DataLoader(
            self.val_ds, batch_size=cfg.val_batch_size or 2 * cfg.batch_size,
            sampler=ShardSampler(len(self.val_ds), dist.world_size, dist.rank), num_workers=self.workers,
            collate_fn=collate_batch, pin_memory=pin)
        self.micro_per_epoch = (per_rank // cfg.batch_size) // cfg.grad_accum * cfg.grad_accum
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum

    def _build_model(self) -> None:
        from timm.utils import ModelEmaV3

        from hymamba.checkpoint import CheckpointError, load_checkpoint
        from hymamba.factory import create_model

        cfg = self.cfg
        kwargs: Dict[str, Any] = dict(num_classes=len(self.class_names), scan_impl=cfg.scan_impl,
                                      **self._architecture())
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
        self.init_note = "official weights" if cfg.pretrained else "random initialisation"
        if cfg.checkpoint is not None:
            report = load_checkpoint(model, cfg.checkpoint, strict=False)
            wrong = report.missing + report.unexpected + [k for k, _, _ in report.mismatched if not k.startswith("head.")]
            if wrong:
                raise CheckpointError(f"{cfg.checkpoint} does not fit {cfg.model}: {len(wrong)} keys are missing, "
                                      f"unexpected or mis-shaped (first: {wrong[:5]}); check the model name")
            new_head = any(k.startswith("head.") for k, _, _ in report.mismatched)
            self.init_note = f"weights from {cfg.checkpoint}" + (
                f" with a new {len(self.class_names)}-class head" if new_head else "")
        if cfg.freeze_stages:
            self.frozen: List[nn.Module] = [model.patch_embed] + list(model.levels[: cfg.freeze_stages])
            for m in self.frozen:
                m.requires_grad_(False)
        else:
            self.frozen = []
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) \
            if cfg.model_ema else None
        self.ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.dist.enabled else model

    def _build_optimisation(self) -> None:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.cfg
        self.global_batch = cfg.batch_size * self.dist.world_size * cfg.grad_accum
        self.lr, self.lr_rule = scaled_lr(cfg, self.global_batch)
        self.optimizer = create_optimizer_v2(
            self.model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            layer_decay=cfg.layer_decay, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs - cfg.cooldown_epochs,
            warmup_epochs=cfg.warmup_epochs, cooldown_epochs=cfg.cooldown_epochs, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if self.mixup_on:
            from timm.data import Mixup

            self.mixup: Optional[Any] = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                num_classes=len(self.class_names))
            self.loss_fn: nn.Module = SoftTargetCrossEntropy()
        else:
            self.mixup = None
            self.loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()

    def _restore(self) -> None:
        """Fresh run: epoch 0. Resumed run: every state from the checkpoint."""
        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {"top1": None, "epoch": None}
        self.wall_before = 0.0
        self.skipped: set = set()
        self.partial = {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
        s = self.resume
        if s is None:
            return
        self.model.load_state_dict(s["model"])
        if self.ema is not None:
            if s.get("model_ema") is None:
                raise ValueError(f"{s['path']} has no EMA weights but the config asks for model_ema; resume "
                                 "with --no-model-ema")
            self.ema.module.load_state_dict(s["model_ema"])
        self.optimizer.load_state_dict(s["optimizer"])
        now = config_to_dict(self.cfg)
        changed = [k for k in _SCHEDULE_KEYS if s["config"].get(k) != now.get(k)]
        if s["world_size"] != self.dist.world_size:
            changed.append("world size")
        if changed:  # the saved schedule would contradict the new settings: follow the new ones
            logger.warning("resuming with changed %s: the learning-rate schedule follows the new settings",
                           ", ".join(changed))
        else:
            self.scheduler.load_state_dict(s["scheduler"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.batches_done, self.global_step = s["epoch"], s["batches_done"], s["global_step"]
        self.history, self.best = list(s["history"]), dict(s["best"])
        self.wall_before, self.skipped = float(s["wall_seconds"]), set(s["skipped"])
        ranks = s["ranks"]
        if len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank]["rng"], self.device)
            self.partial = dict(ranks[self.dist.rank]["partial"])
        else:
            logger.warning("the checkpoint was written by %d process(es), this run has %d: random states are "
                           "re-seeded, so the run continues but not bit for bit", len(ranks), self.dist.world_size)
            _seed_everything(self.cfg.seed + self.dist.rank + 7919 * self.epoch)
            if self.batches_done:
                self.batches_done, self.partial = 0, {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
                logger.warning("the interrupted epoch restarts from its beginning")
        self.scheduler.step_update(num_updates=self.global_step)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self._announce()
        reporter = Reporter(self.output, cfg.tensorboard) if self.main else None
        interrupted = False
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:  # warnings go through tqdm, so they do not tear the progress bar
            with _stop_on_signals(self._request_stop), logging_redirect_tqdm():
                while self.epoch < cfg.epochs:
                    if not self._train_epoch():
                        interrupted = True
                        break
                    row = self._end_epoch()
                    if reporter is not None:
                        reporter.epoch_done(self.history)
                    self.echo(epoch_line(row, cfg.epochs))
        finally:
            if reporter is not None:
                reporter.close()
        summary = self._finish(interrupted)
        return summary

    def _request_stop(self, signum: int) -> None:
        self.stop_requested = True
        if self.main:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _announce(self) -> None:
        cfg, d = self.cfg, self.dist
        params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        data = "digits (built-in)" if cfg.data == DIGITS else str(cfg.data)
        self.echo(f"model {cfg.model}: {params / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
                  f"{self.init_note}")
        self.echo(f"data {data}: {len(self.train_ds)} train / {len(self.val_ds)} val images, "
                  f"{len(self.class_names)} classes, input {self.data_config['input_size'][-1]}px")
        self.echo(f"global batch {self.global_batch} = {cfg.batch_size} per process x {d.world_size} process(es) "
                  f"x {cfg.grad_accum} accumulation step(s); {self.steps_per_epoch} steps per epoch")
        self.echo(self.lr_rule)
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"
        self.echo(f"recipe: {cfg.opt}, weight decay {cfg.weight_decay}, {cfg.sched} over {cfg.epochs} epochs "
                  f"(warmup {cfg.warmup_epochs:g} from {cfg.warmup_lr:g}, cooldown {cfg.cooldown_epochs} at "
                  f"{cfg.min_lr:g}), clip {cfg.clip_grad}, smoothing {cfg.smoothing}, mixup {cfg.mixup} cutmix "
                  f"{cfg.cutmix}, aa {cfg.aa}, reprob {cfg.reprob}, drop path {self._drop_path()}, "
                  f"EMA {cfg.model_ema_decay if cfg.model_ema else 'off'}, MESA "
                  f"{f'{cfg.mesa} from {cfg.mesa_start_ratio:g} of training' if cfg.mesa else 'off'}, amp {amp}")
        self.echo(f"device {self.device}{' (DDP)' if d.enabled else ''}; output {self.output}" + (
            f"; resuming at epoch {self.epoch + 1}" + (f", batch {self.batches_done}" if self.batches_done else "")
            if self.resume is not None else ""))
        if self.main:  # the folder is made only now that every check has passed
            import yaml

            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    def _drop_path(self) -> str:
        rates = [m.drop_prob for m in self.model.modules() if hasattr(m, "drop_prob")]
        return f"{max(rates):g}" if rates else "0"

    def _train_epoch(self) -> bool:
        """Train the current epoch from ``batches_done``; False when stopped by a signal."""
        from timm.utils import dispatch_clip_grad

        cfg, d = self.cfg, self.dist
        self.sampler.set_epoch(self.epoch, skip=self.batches_done * cfg.batch_size)
        self.ddp.train()
        for m in self.frozen:  # frozen stages keep their BatchNorm statistics too
            m.eval()
        mesa_on = cfg.mesa > 0 and self.epoch / cfg.epochs > cfg.mesa_start_ratio
        params = [p for p in self.model.parameters() if p.requires_grad]
        start = time.perf_counter()
        bar = _progress(self.micro_per_epoch, self.batches_done, f"epoch {self.epoch + 1}/{cfg.epochs}",
                        enabled=self.main and not cfg.quiet)
        loss_sum, images = self.partial["loss_sum"], self.partial["images"]
        micro = self.batches_done
        for x, y, bad in self.train_loader:
            if micro % cfg.grad_accum == 0 and d.any(self.stop_requested):
                self.batches_done = micro
                self.partial = {"loss_sum": loss_sum, "images": images,
                                "seconds": self.partial["seconds"] + time.perf_counter() - start}
                bar.close()
                return False
            if micro >= self.micro_per_epoch:
                break
            warn_unreadable(bad, self.skipped)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            step_now = (micro + 1) % cfg.grad_accum == 0
            sync = nullcontext() if step_now or not d.enabled else self.ddp.no_sync()
            with sync:
                with autocast(self.device, self.amp_dtype):
                    logits = self.ddp(x)
                    loss = self.loss_fn(logits, y)
                    if mesa_on:
                        with torch.no_grad():
                            ema_logits = self.ema.module(x)
                        loss = loss + cfg.mesa * _mesa_kl(logits, ema_logits)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at epoch {self.epoch + 1}, batch {micro}; lower the lr, "
                        "use amp_dtype bfloat16 or --no-amp; the last good checkpoint is kept in "
                        f"{self.output}/last.pth")
                self.scaler.scale(loss / cfg.grad_accum).backward()
            if step_now:
                self.global_step += 1
                self.scheduler.step_update(num_updates=self.global_step)
                if cfg.clip_grad is not None:
                    self.scaler.unscale_(self.optimizer)
                    dispatch_clip_grad(params, value=cfg.clip_grad, mode=cfg.clip_mode)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model, step=self.global_step)
            loss_sum += loss.item() * len(x)
            images += len(x)
            micro += 1
            elapsed = self.partial["seconds"] + time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / images:.4f}", lr=f"{self._lr():.3g}",
                            img_s=f"{images * d.world_size / max(elapsed, 1e-9):.0f}", refresh=False)
        bar.close()
        seconds = self.partial["seconds"] + time.perf_counter() - start
        loss_total, image_total = d.all_reduce_sum([loss_sum, images])
        self.train_stats = {"train_loss": loss_total / max(image_total, 1), "images": int(image_total),
                            "seconds": seconds}
        self.batches_done = 0
        self.partial = {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
        return True

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _end_epoch(self) -> Dict[str, Any]:
        from timm.utils import distribute_bn

        cfg, d = self.cfg, self.dist
        if d.enabled:  # every rank ends the epoch with the same BatchNorm statistics
            distribute_bn(self.model, d.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, d.world_size, reduce=True)
        res = evaluate(self.model, self.val_loader, self.device, amp_dtype=self.amp_dtype,
                       channels_last=cfg.channels_last, dist=d)
        ema_res = evaluate(self.ema.module, self.val_loader, self.device, amp_dtype=self.amp_dtype,
                           channels_last=cfg.channels_last, dist=d) if self.ema is not None else None
        warn_unreadable(res.skipped, self.skipped)
        if d.enabled:
            self.skipped = {p for part in d.gather_objects(sorted(self.skipped)) for p in part}
        self.epoch += 1
        st = self.train_stats
        row = {"epoch": self.epoch, "train_loss": st["train_loss"], "lr": self._lr(), "top1": res.top1,
               "top5": res.top5, "loss": res.loss,
               "ema_top1": ema_res.top1 if ema_res else None, "ema_top5": ema_res.top5 if ema_res else None,
               "ema_loss": ema_res.loss if ema_res else None,
               "images_per_second": st["images"] / max(st["seconds"], 1e-9), "epoch_seconds": st["seconds"],
               "train_images": st["images"], "val_images": res.count}
        self.history.append(row)
        # As in the official script, the EMA's accuracy is the run's metric when there is an EMA.
        top1 = row["ema_top1"] if ema_res else row["top1"]
        is_best = self.best["top1"] is None or top1 > self.best["top1"]
        if is_best:
            self.best = {"top1": top1, "epoch": self.epoch}
        self._save(best=is_best)
        return row

    # -- checkpoints and the end -------------------------------------------------------------------

    def _architecture(self) -> Dict[str, str]:
        from hymamba.models.mambavision import ABLATION_OPTIONS

        """Constructor options beyond the variant name (ablations), saved beside the weights."""
        return {key: getattr(self.cfg, key) for key in ABLATION_OPTIONS}

    def _state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "config": config_to_dict(self.cfg),
            "class_names": self.class_names,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            "architecture": self._architecture(),
            "history": self.history,
            "best": self.best,
            "wall_seconds": self.wall_before + time.perf_counter() - self.session_start,
            "skipped": sorted(self.skipped),
            "world_size": self.dist.world_size,
        }

    def _save(self, best: bool = False) -> None:
        """Write last.pth (and best.pth) on rank 0, with every rank's RNG state."""
        ranks = self.dist.gather_objects({"rng": get_rng_state(self.device), "partial": self.partial})
        if not self.main:
            return
        state = self._state()
        state["ranks"] = ranks
        last = save_train_state(state, self.output / "last.pth")
        if best:
            atomic_copy(last, self.output / "best.pth")

    def _finish(self, interrupted: bool) -> Dict[str, Any]:
        cfg, d = self.cfg, self.dist
        if interrupted:
            self._save()
        final = self.ema.module if self.ema is not None else self.model
        digest = _weights_digest(self.model) + (_weights_digest(self.ema.module) if self.ema is not None else "")
        digests = d.gather_objects(digest)
        wall = self.wall_before + time.perf_counter() - self.session_start
        last = self.history[-1] if self.history else {}
        use_ema = self.ema is not None
        summary = {
            "model": cfg.model, "data": cfg.data, "num_classes": len(self.class_names),
            "epochs": len(self.history), "planned_epochs": cfg.epochs, "interrupted": interrupted,
            "best_top1": self.best["top1"], "best_epoch": self.best["epoch"],
            "final_top1": last.get("ema_top1" if use_ema else "top1"),
            "final_top5": last.get("ema_top5" if use_ema else "top5"),
            "final_loss": last.get("ema_loss" if use_ema else "loss"),
            "final_model_top1": last.get("top1"), "final_ema_top1": last.get("ema_top1"),
            "metric_from": "ema" if use_ema else "model",
            "wall_seconds": wall, "skipped_images": len(self.skipped),
            "train_images_per_epoch": last.get("train_images"), "val_images": last.get("val_images"),
            "images_per_second": last.get("images_per_second"),
            "global_batch": self.global_batch, "lr": self.lr, "world_size": d.world_size,
            "device": str(self.device), "ranks_in_sync": len(set(digests)) == 1,
            "output": str(self.output),
        }
        if not summary["ranks_in_sync"]:
            logger.warning("the processes ended with different weights (digests %s); please report this as a bug",
                           digests)
        if self.main:
            if not interrupted:
                self._export(final, summary)
            write_json_atomic(self.output / "summary.json", summary)
        return summary

    def _export(self, model: nn.Module, summary: Dict[str, Any]) -> None:
        """model.safetensors + model.json: what create_model / validate / predict load."""
        from hymamba.checkpoint import save_safetensors

        meta = {
            "model": self.cfg.model, "num_classes": len(self.class_names), "class_names": self.class_names,
            "input_size": list(self.data_config["input_size"]), "mean": list(self.data_config["mean"]),
            "std": list(self.data_config["std"]), "crop_pct": self.data_config["crop_pct"],
            "crop_mode": self.data_config["crop_mode"], "interpolation": self.data_config["interpolation"],
            "weights": "ema" if self.ema is not None else "model", "epochs": summary["epochs"],
            "val_top1": summary["final_top1"], **self._architecture(),
        }
        save_safetensors(model.state_dict(), self.output / "model.safetensors",
                         metadata={"model": self.cfg.model, "format": "pt"})
        write_json_atomic(self.output / "model.json", meta)


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if not cfg.amp:
        return None
    if cfg.amp_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.amp_dtype == "float16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def config_for_resume(state: Dict[str, Any], config_file: Optional[str | os.PathLike] = None,
                      overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The resumed run's config, with a YAML file and explicit overrides on top.

    The output folder defaults to the folder holding the checkpoint (wherever it was moved to).
    """
    base = dict(state["config"], output=str(Path(state["path"]).parent))
    return build_config(config_file, overrides, base=base)


def train(cfg: TrainConfig, resume: Optional[Dict[str, Any]] = None,
          echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train a model; single process, or one of many under ``torchrun``.

    Args:
        cfg: the run's configuration (checked here before any work starts).
        resume: a state from :func:`hymamba.train_state.load_train_state` to continue exactly.
        echo: where progress lines go (rank 0 only; nothing with ``cfg.quiet``).
    Returns:
        The run's summary (also written to ``OUTPUT/summary.json``); ``interrupted`` is True when a
        signal stopped it, in which case ``OUTPUT/last.pth`` continues it.
    """
    check_config(cfg)
    dist = distributed.setup(cfg.device)
    try:
        trainer = _Trainer(cfg, dist, resume, echo)
        trainer.setup()
        return trainer.run()
    finally:
        dist.close()
