"""The training loop, for any task: data order, accumulation, AMP, clipping, schedule, signals,
evaluation and resume. Everything else is a callback (:mod:`hymamba.engine.callbacks`) and
everything task-specific is the :class:`~hymamba.engine.task.Task`.

One code path runs a single process or many under ``torchrun`` (:mod:`hymamba.engine.strategies`):
disjoint data shards, metrics reduced over processes, BatchNorm statistics averaged after each
epoch. The optimiser (any timm optimiser, weight-decay groups from ``model.no_weight_decay()``,
optional layer-wise LR decay from ``model.group_matcher()``) and the per-step schedule (warmup,
cooldown) come from timm. A checkpoint holding every state is written atomically after every
epoch and on Ctrl-C / SIGTERM mid-epoch; a resumed run continues exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from hymamba.data.samplers import EpochSampler
from hymamba.engine.callbacks import EMA, Callback, default_callbacks
from hymamba.engine.config import EngineConfig
from hymamba.engine.state import load_sharded, set_rng_state
from hymamba.engine.strategies import distribute_norm_statistics, make_strategy, set_grad_checkpointing
from hymamba.engine.task import Task
from hymamba.errors import ConfigError, DataError, TrainingError
from hymamba.utils import distributed
from hymamba.utils.amp import amp_dtype, autocast
from hymamba.utils.distributed import Dist

__all__ = ["INTERRUPTED_EXIT", "Trainer", "train"]

logger = logging.getLogger(__name__)

#: exit status of a run stopped by Ctrl-C / SIGTERM (128 + SIGINT)
INTERRUPTED_EXIT = 130
#: settings that shape the learning-rate schedule (a resumed run that changes one gets a new schedule)
_SCHEDULE_KEYS = ("epochs", "warmup_epochs", "cooldown_epochs", "lr", "lr_base_size", "min_lr", "warmup_lr",
                  "sched", "poly_power", "milestones", "batch_size", "grad_accum")


def _empty_partial() -> Dict[str, float]:
    return {"loss_sum": 0.0, "samples": 0, "seconds": 0.0}


class Trainer:
    """One training run of ``task``; :meth:`run` returns its summary."""

    def __init__(self, task: Task, dist: Dist, resume: Optional[Dict[str, Any]] = None,
                 callbacks: Optional[Sequence[Callback]] = None, echo: Callable[[str], None] = print) -> None:
        self.task, self.dist, self.resume = task, dist, resume
        self.config: EngineConfig = task.config
        self.callbacks: List[Callback] = list(callbacks if callbacks is not None else default_callbacks(self.config))
        self.echo = echo if dist.is_main and not self.config.quiet else (lambda _msg: None)
        self.device = dist.device
        self.stop_requested = False
        self.session_start = time.perf_counter()
        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self.history: List[Dict[str, Any]] = []
        self.initial_metrics: Optional[Dict[str, Any]] = None  # before any training (config.eval_first)
        self.wall_before = 0.0
        self.partial: Dict[str, float] = _empty_partial()
        self.epoch_start = 0.0

    @property
    def ema(self) -> Optional[EMA]:
        return next((c for c in self.callbacks if isinstance(c, EMA)), None)

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, dist = self.config, self.dist
        self.output = self._output_dir()
        seed_everything(cfg.seed + dist.rank)
        self.task.setup(dist, self.resume)
        self._build_loader()
        model = self.task.build_model()
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            set_grad_checkpointing(model)
        self.model = model
        self.strategy = make_strategy(cfg.strategy, dist)
        self.strategy.start_equal(model)
        for cb in self.callbacks:  # (the EMA copies the model here, before it is sharded)
            cb.setup(self)
        self.wrapped = self.strategy.wrap(model)
        self._build_optimisation()
        # Python's own generator (timm's augmentations draw from it) once more: libraries imported
        # lazily during the set-up above may draw from it at import (rich does), and only the first
        # time in a process, which made a run's result depend on what the process had run before.
        random.seed(cfg.seed + dist.rank)
        self._restore()

    def _output_dir(self) -> Path:
        cfg, dist = self.config, self.dist
        problem, out = None, None
        if dist.is_main:
            if cfg.output:
                out = Path(cfg.output).expanduser()
            elif self.resume is not None:
                out = Path(self.resume["path"]).parent
            else:
                out = Path("runs") / f"{self.task.run_name()}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            if self.resume is None and (out / "last.pth").exists():
                problem = (f"{out} already holds a training run (last.pth): pass --resume {out} to continue it, "
                           "or choose another --output")
            elif out.exists() and not out.is_dir():
                problem = f"--output {out} is a file; expected a folder (new or holding a run to resume)"
        problem, out = dist.broadcast_object((problem, str(out)))
        if problem:
            raise ConfigError(problem)
        if cfg.output != out:
            self.config = self.task.config = dataclasses.replace(cfg, output=out)
        return Path(out)

    def _build_loader(self) -> None:
        cfg, dist = self.config, self.dist
        dataset = self.task.train_dataset()
        per_rank = math.ceil(len(dataset) / dist.world_size)
        need = cfg.batch_size * cfg.grad_accum
        if per_rank < need:
            raise DataError(f"the training split has {len(dataset)} samples, {per_rank} per process with "
                            f"{dist.world_size} process(es): fewer than batch_size x grad_accum = {need}, so not "
                            "one optimiser step fits in an epoch; lower --batch-size or add data")
        self.sampler = EpochSampler(len(dataset), dist.world_size, dist.rank, seed=cfg.seed)
        self.train_loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=self.task.num_workers(),
            collate_fn=self.task.collate, drop_last=True, pin_memory=self.device.type == "cuda")
        self.train_size = len(dataset)
        self.micro_per_epoch = (per_rank // cfg.batch_size) // cfg.grad_accum * cfg.grad_accum
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum

    def _build_optimisation(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.config
        self.global_batch = cfg.batch_size * self.dist.world_size * cfg.grad_accum
        self.lr, self.lr_rule = cfg.scaled_lr(self.global_batch)
        self.optimizer = create_optimizer_v2(
            self.model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            layer_decay=cfg.layer_decay, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs - cfg.cooldown_epochs,
            warmup_epochs=cfg.warmup_epochs, cooldown_epochs=cfg.cooldown_epochs, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, step_on_epochs=False, updates_per_epoch=self.steps_per_epoch,
            **self._schedule_shape(cfg))
        self.amp_dtype = amp_dtype(self.device, cfg.amp, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    @staticmethod
    def _schedule_shape(cfg: Any) -> Dict[str, Any]:
        """timm's arguments that shape the poly and multistep schedules (its defaults would silently give
        poly power 0.1, an almost flat schedule, and milestones at epochs 90/180/270)."""
        if cfg.sched == "poly":
            return {"decay_rate": cfg.poly_power}
        if cfg.sched == "multistep":
            span = cfg.epochs - cfg.cooldown_epochs
            return {"decay_milestones": [f * span for f in cfg.milestones], "decay_rate": 0.1}
        return {}

    def _restore(self) -> None:
        """Fresh run: epoch 0. Resumed run: every state from the checkpoint."""
        s = self.resume
        if s is None:
            return
        sharded = isinstance(s.get("sharded"), str)
        if self.strategy.sharded and not sharded:
            raise ConfigError(f"{s['path']} was saved by a run that was not sharded; resume it with --strategy "
                              f"{s['config'].get('strategy', 'ddp')}, or convert it to weights (hymamba convert) and "
                              "start a new run from them with --checkpoint")
        if sharded:  # the tensors are in the folder last.pth names, sharded for the run's processes
            template = {"model": self.model.state_dict(),
                        "optimizer": self.strategy.optimizer_state(self.model, self.optimizer)}
            if self.ema is not None and s["config"].get("model_ema"):
                template["model_ema"] = self.ema.state_dict()
            load_sharded(template, Path(s["path"]).parent / s["sharded"])
            s = dict(s, **template)
        self.model.load_state_dict(s["model"])
        for cb in self.callbacks:
            if cb.state_key is None:
                continue
            if s.get(cb.state_key) is None:
                if isinstance(cb, EMA):
                    raise ConfigError(f"{s['path']} has no EMA weights but the config asks for model_ema; resume "
                                      "with --no-model-ema")
                continue
            cb.load_state_dict(s[cb.state_key])
        self.task.load_state_dict(s)
        if sharded:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, s["optimizer"])
        else:
            self.optimizer.load_state_dict(s["optimizer"])
        now = self.config.to_dict()
        # (a key the saved run predates, e.g. poly_power, is not a change: its saved schedule is restored)
        changed = [k for k in _SCHEDULE_KEYS if k in s["config"] and s["config"][k] != now.get(k)]
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
        self.history = list(s["history"])
        self.initial_metrics = s.get("initial_metrics")
        self.wall_before = float(s["wall_seconds"])
        ranks = s["ranks"]
        if len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank]["rng"], self.device)
            partial = dict(ranks[self.dist.rank]["partial"])
            partial.setdefault("samples", partial.pop("images", 0))  # checkpoints before the engine said images
            self.partial = partial
        else:
            logger.warning("the checkpoint was written by %d process(es), this run has %d: random states are "
                           "re-seeded, so the run continues but not bit for bit", len(ranks), self.dist.world_size)
            seed_everything(self.config.seed + self.dist.rank + 7919 * self.epoch)
            if self.batches_done:
                self.batches_done, self.partial = 0, _empty_partial()
                logger.warning("the interrupted epoch restarts from its beginning")
        self.scheduler.step_update(num_updates=self.global_step)

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        self._announce()
        interrupted = False
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:  # warnings go through tqdm, so they do not tear the progress bar
            for cb in self.callbacks:
                cb.on_train_start(self)
            if self.config.eval_first and self.initial_metrics is None and self.epoch == 0 \
                    and self.batches_done == 0:
                with self.strategy.evaluating(self.model):
                    self.initial_metrics = self.task.evaluate(self.model, self.amp_dtype)
                self.echo(f"before training: {self.task.format_metrics(self.initial_metrics)}")
            with _stop_on_signals(self._request_stop), logging_redirect_tqdm():
                while self.epoch < self.config.epochs:
                    if not self._train_epoch():
                        interrupted = True
                        for cb in self.callbacks:
                            cb.on_interrupt(self)
                        break
                    row = self._end_epoch()
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, row)
            summary = self._summary(interrupted)
            for cb in self.callbacks:
                cb.on_train_end(self, summary)
        finally:
            for cb in self.callbacks:
                cb.close()
        return summary

    def _request_stop(self, signum: int) -> None:
        self.stop_requested = True
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _announce(self) -> None:
        cfg, d = self.config, self.dist
        for line in self.task.describe():
            self.echo(line)
        self.echo(f"global batch {self.global_batch} = {cfg.batch_size} per process x {d.world_size} process(es) "
                  f"x {cfg.grad_accum} accumulation step(s); {self.steps_per_epoch} steps per epoch")
        self.echo(self.lr_rule)
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"
        ema = self.ema
        self.echo(f"optimisation: {cfg.opt}, weight decay {cfg.weight_decay}, {cfg.sched} over {cfg.epochs} epochs "
                  f"(warmup {cfg.warmup_epochs:g} from {cfg.warmup_lr:g}, cooldown {cfg.cooldown_epochs} at "
                  f"{cfg.min_lr:g}), clip {cfg.clip_grad}, EMA {ema.decay if ema else 'off'}, amp {amp}")
        self.echo(f"device {self.device}{self.strategy.describe()}; output {self.output}" + (
            f"; resuming at epoch {self.epoch + 1}" + (f", batch {self.batches_done}" if self.batches_done else "")
            if self.resume is not None else ""))
        if d.is_main:  # the folder is made only now that every check has passed
            import yaml

            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def lr_now(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _train_epoch(self) -> bool:
        """Train the current epoch from ``batches_done``; False when stopped by a signal."""
        from timm.utils import dispatch_clip_grad

        cfg, d = self.config, self.dist
        self.sampler.set_epoch(self.epoch, skip=self.batches_done * cfg.batch_size)
        self.wrapped.train()
        self.task.start_epoch(self.epoch, self.ema.module if self.ema is not None else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.epoch_start = time.perf_counter()
        for cb in self.callbacks:
            cb.on_epoch_start(self)
        p = self.partial
        micro = self.batches_done
        for batch in self.train_loader:
            if micro % cfg.grad_accum == 0 and d.any(self.stop_requested):
                self.batches_done = micro
                p["seconds"] += time.perf_counter() - self.epoch_start
                return False
            if micro >= self.micro_per_epoch:
                break
            batch = to_device(batch, self.device)
            step_now = (micro + 1) % cfg.grad_accum == 0
            sync = nullcontext() if step_now else self.strategy.no_sync(self.wrapped)
            with sync:
                with autocast(self.device, self.amp_dtype):
                    loss = self.task.training_step(self.wrapped, batch)["loss"]
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
                for cb in self.callbacks:
                    cb.on_step_end(self)
            n = self.task.batch_size_of(batch)
            p["loss_sum"] += loss.item() * n
            p["samples"] += n
            micro += 1
            for cb in self.callbacks:
                cb.on_batch_end(self, loss.item())
        seconds = p["seconds"] + time.perf_counter() - self.epoch_start
        loss_total, sample_total = d.all_reduce_sum([p["loss_sum"], p["samples"]])
        self.train_stats = {"train_loss": loss_total / max(sample_total, 1), "samples": int(sample_total),
                            "seconds": seconds}
        self.batches_done = 0
        self.partial = _empty_partial()
        return True

    def _end_epoch(self) -> Dict[str, Any]:
        d = self.dist
        models: Dict[str, nn.Module] = {"": self.model}
        for cb in self.callbacks:
            extra = cb.eval_model()
            if extra is not None:
                models[getattr(cb, "prefix", "")] = extra
        if d.enabled:  # every rank ends the epoch with the same normalisation statistics
            for m in models.values():
                distribute_norm_statistics(m, d)
        metrics: Dict[str, Any] = {}
        for prefix, m in models.items():
            with self.strategy.evaluating(m):
                metrics.update({prefix + k: v for k, v in self.task.evaluate(m, self.amp_dtype).items()})
        self.task.end_epoch()
        self.epoch += 1
        st = self.train_stats
        row = {"epoch": self.epoch, "train_loss": st["train_loss"], "lr": self.lr_now(), **metrics,
               "images_per_second": st["samples"] / max(st["seconds"], 1e-9), "epoch_seconds": st["seconds"],
               "train_images": st["samples"]}
        self.history.append(row)
        return row

    # -- state and the end -------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything :func:`hymamba.engine.state.load_train_state` needs to continue this run (under a
        sharded strategy, ``SHARDED_KEYS`` hold this process's shards)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.strategy.optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "config": self.config.to_dict(),
            "history": self.history,
            "initial_metrics": self.initial_metrics,
            "wall_seconds": self.wall_before + time.perf_counter() - self.session_start,
            "world_size": self.dist.world_size,
            "export_metadata": self.task.export_metadata(),  # model.json's content, for these weights
        }
        for cb in self.callbacks:
            if cb.state_key is not None:
                state[cb.state_key] = cb.state_dict()
        state.update(self.task.state_dict())
        return state

    def final_model(self) -> nn.Module:
        """The weights a run delivers: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _summary(self, interrupted: bool) -> Dict[str, Any]:
        cfg, d, task = self.config, self.dist, self.task
        replicated = self.strategy.replicated  # (sharded tensors differ by design: their buffers are compared)
        digest = weights_digest(replicated(self.model)) + (
            weights_digest(replicated(self.ema.module)) if self.ema is not None else "")
        digests = d.gather_objects(digest)
        last = self.history[-1] if self.history else {}
        use_ema = self.ema is not None
        best_cb = next((c for c in self.callbacks if c.state_key == "best"), None)
        name = task.best_metric
        summary: Dict[str, Any] = dict(task.summary())
        summary.update({
            "epochs": len(self.history), "planned_epochs": cfg.epochs, "interrupted": interrupted,
            f"best_{name}": getattr(best_cb, "value", None), "best_epoch": getattr(best_cb, "epoch", None),
        })
        for m in task.metric_names:
            summary[f"final_{m}"] = last.get(f"ema_{m}" if use_ema else m)
            summary[f"initial_{m}"] = (self.initial_metrics or {}).get(m)
        summary.update({
            f"final_model_{name}": last.get(name), f"final_ema_{name}": last.get(f"ema_{name}"),
            "metric_from": "ema" if use_ema else "model",
            "wall_seconds": self.wall_before + time.perf_counter() - self.session_start,
            "train_images_per_epoch": last.get("train_images"), "val_images": last.get("val_images"),
            "images_per_second": last.get("images_per_second"),
            "global_batch": self.global_batch, "lr": self.lr, "world_size": d.world_size,
            "device": str(self.device), "ranks_in_sync": len(set(digests)) == 1,
            "output": str(self.output),
        })
        if not summary["ranks_in_sync"]:
            logger.warning("the processes ended with different weights (digests %s); please report this as a bug",
                           digests)
        return summary


# ----------------------------------------------------------------------------------------------
# helpers


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in ``batch`` (nested lists, tuples, dicts) moved to ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def weights_digest(tensors: Sequence[Any]) -> str:
    """SHA-256 of (name, tensor) pairs (to check that all ranks end with the same weights)."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _stop_on_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_signal`` on SIGINT/SIGTERM instead of dying; a second Ctrl-C stops at once."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
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


def train(task: Task, resume: Optional[Dict[str, Any]] = None, callbacks: Optional[Sequence[Callback]] = None,
          echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``task``; single process, or one of many under ``torchrun``.

    Args:
        task: the task, holding its configuration (checked here before any work starts).
        resume: a state from :func:`hymamba.engine.state.load_train_state` to continue exactly.
        callbacks: replaces :func:`~hymamba.engine.callbacks.default_callbacks`.
        echo: where progress lines go (rank 0 only; nothing with ``config.quiet``).
    Returns:
        The run's summary (also written to ``OUTPUT/summary.json``); ``interrupted`` is True when a
        signal stopped it, in which case ``OUTPUT/last.pth`` continues it.
    """
    task.config.check()
    dist = distributed.setup(task.config.device)
    try:
        trainer = Trainer(task, dist, resume, callbacks, echo)
        trainer.setup()
        return trainer.run()
    finally:
        dist.close()
