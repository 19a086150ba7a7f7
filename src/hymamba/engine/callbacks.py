"""Everything around the training loop that is not the loop: callbacks.

The :class:`~hymamba.engine.loop.Trainer` calls each callback's hooks in order; a callback with a
``state_key`` stores its state in the training checkpoint under that key. The default set, in order:

- :class:`BestMetric`: tracks the best epoch by the task's metric (the EMA's, when there is one);
- :class:`EMA`: an exponential moving average of the weights, updated after each optimiser step,
  evaluated each epoch, exported at the end;
- :class:`Checkpoint`: ``last.pth`` every epoch (and on a stop signal), ``best.pth`` on a new best;
- :class:`Report`: ``metrics.csv``, ``learning_curves.png`` and optional TensorBoard logs;
- :class:`Progress`: a progress bar per epoch and one line per epoch;
- :class:`Export`: the final ``model.safetensors`` + ``model.json``;
- :class:`Summary`: ``summary.json``.

Every file is written atomically (rewritten whole from the run's history and renamed into place),
so a resumed run continues the same files and a killed one never leaves a half-written file.
"""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

from hymamba.engine.state import SHARDED_KEYS, get_rng_state, save_sharded, save_train_state
from hymamba.utils.io import atomic_copy, atomic_write_bytes, write_json_atomic
from hymamba.weights.io import read_file, save_safetensors
from hymamba.weights.metadata import write_model_json

if TYPE_CHECKING:  # the trainer drives the callbacks; they only read it
    from hymamba.engine.loop import Trainer

__all__ = ["BestMetric", "Callback", "Checkpoint", "EMA", "Export", "Progress", "Report", "Summary",
           "default_callbacks"]


class Callback:
    """Hooks of the training loop (all optional). ``state_key``: where its state goes in checkpoints."""

    state_key: Optional[str] = None

    def setup(self, trainer: "Trainer") -> None:
        """After the model is built, before the optimiser and any resume."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """After any resume, before the first epoch."""

    def on_epoch_start(self, trainer: "Trainer") -> None:
        """Before each epoch's first batch."""

    def on_batch_end(self, trainer: "Trainer", loss: float) -> None:
        """After each micro-batch (``loss``: its loss)."""

    def on_step_end(self, trainer: "Trainer") -> None:
        """After each optimiser step."""

    def on_epoch_end(self, trainer: "Trainer", row: Dict[str, Any]) -> None:
        """After each epoch's evaluation; ``row`` is the epoch's line of ``metrics.csv``."""

    def on_interrupt(self, trainer: "Trainer") -> None:
        """When a signal stopped the run mid-epoch (every process)."""

    def on_train_end(self, trainer: "Trainer", summary: Dict[str, Any]) -> None:
        """At the end, interrupted or not (``summary["interrupted"]``)."""

    def close(self) -> None:
        """Release resources (always called)."""

    def eval_model(self) -> Optional[nn.Module]:
        """A model the engine also evaluates each epoch (its metrics get this callback's ``prefix``)."""
        return None

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


class BestMetric(Callback):
    """The best epoch by the task's metric; the EMA's metric when the run keeps an EMA (as the
    official training script does)."""

    state_key = "best"

    def __init__(self) -> None:
        self.value: Optional[float] = None
        self.epoch: Optional[int] = None
        self.is_best = False
        self.key = ""

    def setup(self, trainer: "Trainer") -> None:
        task = trainer.task
        self.name = task.best_metric
        self.key = ("ema_" if trainer.ema is not None else "") + task.best_metric
        self.better = (lambda a, b: a > b) if task.best_mode == "max" else (lambda a, b: a < b)

    def on_epoch_end(self, trainer: "Trainer", row: Dict[str, Any]) -> None:
        value = row.get(self.key)
        self.is_best = value is not None and (self.value is None or self.better(value, self.value))
        if self.is_best:
            self.value, self.epoch = value, row["epoch"]

    def state_dict(self) -> Dict[str, Any]:
        return {self.name: self.value, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value, self.epoch = state.get(self.name), state.get("epoch")


class EMA(Callback):
    """An exponential moving average of the weights (timm's ModelEmaV3), evaluated with prefix ``ema_``."""

    state_key = "model_ema"
    prefix = "ema_"

    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup
        self.ema: Any = None

    def setup(self, trainer: "Trainer") -> None:
        from timm.utils import ModelEmaV3

        # (one tensor at a time when sharded: a fused update cannot mix sharded parameters and whole buffers)
        self.ema = ModelEmaV3(trainer.model, decay=self.decay, use_warmup=self.warmup,
                              foreach=not trainer.strategy.sharded)
        trainer.strategy.follow(self.ema.module)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def on_step_end(self, trainer: "Trainer") -> None:
        self.ema.update(trainer.model, step=trainer.global_step)

    def eval_model(self) -> nn.Module:
        return self.ema.module

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.ema.module.load_state_dict(state)


class Checkpoint(Callback):
    """``last.pth`` after every epoch and on a stop signal; a copy as ``best.pth`` on a new best.

    Holds every state needed to continue exactly: model, optimiser, scheduler, grad scaler, the
    callbacks' states, the task's state and each process's random-number-generator state. Under a
    sharded strategy the model, optimiser and EMA tensors go to ``sharded/epoch<E>-batch<B>/`` (written
    by every process, complete before ``last.pth`` names it); folders no checkpoint names are removed.
    """

    def __init__(self, best: Optional[BestMetric]) -> None:
        self.best = best

    def save(self, trainer: "Trainer", best: bool = False) -> None:
        dist = trainer.dist
        ranks = dist.gather_objects({"rng": get_rng_state(trainer.device), "partial": trainer.partial})
        sharded = trainer.strategy.sharded
        if not dist.is_main and not sharded:
            return
        state = trainer.state_dict()
        if sharded:  # (a position is saved once: an epoch's end and a stop within the next differ in both)
            name = f"{SHARDED_FOLDER}/epoch{trainer.epoch}-batch{trainer.batches_done}"
            save_sharded({k: state.pop(k) for k in SHARDED_KEYS if state.get(k) is not None},
                         trainer.output / name, dist)
            state["sharded"] = name
            if not dist.is_main:
                return
        state["ranks"] = ranks
        last = save_train_state(state, trainer.output / "last.pth")
        if best:
            atomic_copy(last, trainer.output / "best.pth")
        if sharded:
            _remove_unnamed(trainer.output)

    def on_epoch_end(self, trainer: "Trainer", row: Dict[str, Any]) -> None:
        self.save(trainer, best=self.best is not None and self.best.is_best)

    def on_interrupt(self, trainer: "Trainer") -> None:
        self.save(trainer)


#: the folder of a sharded run's checkpoints, inside its output folder
SHARDED_FOLDER = "sharded"


def _remove_unnamed(output: Path) -> None:
    """Delete the sharded checkpoint folders that neither ``last.pth`` nor ``best.pth`` names."""
    import shutil

    named = set()
    for name in ("last.pth", "best.pth"):
        if (output / name).is_file():
            named.add(read_file(output / name).get("sharded"))
    for folder in sorted((output / SHARDED_FOLDER).iterdir()):
        if f"{SHARDED_FOLDER}/{folder.name}" not in named:
            shutil.rmtree(folder, ignore_errors=True)


class Report(Callback):
    """``metrics.csv`` and ``learning_curves.png`` rewritten each epoch; TensorBoard if asked (rank 0)."""

    def __init__(self, tensorboard: bool) -> None:
        self.tensorboard = tensorboard
        self._tb: Any = None

    def setup(self, trainer: "Trainer") -> None:
        task = trainer.task
        metrics = list(task.metric_names)
        ema = [f"ema_{m}" for m in metrics]  # always present (blank without an EMA): one file layout
        self.columns = ["epoch", "train_loss", "lr", *metrics, *ema, "images_per_second", "epoch_seconds"]
        self.task = task

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.dist.is_main and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(trainer.output / "tensorboard"))

    def on_epoch_end(self, trainer: "Trainer", row: Dict[str, Any]) -> None:
        if not trainer.dist.is_main:
            return
        history = trainer.history
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in history:
            writer.writerow({k: _fmt(r.get(k)) for k in self.columns})
        atomic_write_bytes(trainer.output / "metrics.csv", buf.getvalue().encode())
        self._plot(trainer, history)
        if self._tb is not None:
            for key in self.columns[1:]:
                if row.get(key) is not None:
                    self._tb.add_scalar(key, row[key], row["epoch"])
            self._tb.flush()

    def _plot(self, trainer: "Trainer", history: Sequence[Dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        best = self.task.best_metric
        epochs = [r["epoch"] for r in history]
        fig = Figure(figsize=(12, 3.6))
        ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
        ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
        if "loss" in self.task.metric_names:
            ax_loss.plot(epochs, [r.get("loss") for r in history], label="val")
            if any(r.get("ema_loss") is not None for r in history):
                ax_loss.plot(epochs, [r.get("ema_loss") for r in history], label="val (EMA)")
        ax_loss.set(title="loss", xlabel="epoch")
        label = f"val {self.task.metric_label(best)}"
        ax_metric.plot(epochs, [r.get(best) for r in history], label=label)
        if any(r.get(f"ema_{best}") is not None for r in history):
            ax_metric.plot(epochs, [r.get(f"ema_{best}") for r in history], label=f"{label} (EMA)")
        ax_metric.set(title=self.task.best_title or best, xlabel="epoch")
        ax_lr.plot(epochs, [r["lr"] for r in history])
        ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
        for ax in (ax_loss, ax_metric):
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(trainer.output / "learning_curves.png", buf.getvalue())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress(Callback):
    """A progress bar over each epoch's batches (on a terminal) and one line per finished epoch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def on_epoch_start(self, trainer: "Trainer") -> None:
        from tqdm import tqdm

        on = self.enabled and trainer.dist.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=trainer.micro_per_epoch, initial=trainer.batches_done,
                        desc=f"epoch {trainer.epoch + 1}/{trainer.config.epochs}", unit="batch", leave=False,
                        dynamic_ncols=True, disable=not on)
        self.start = time.perf_counter()

    def on_batch_end(self, trainer: "Trainer", loss: float) -> None:
        p = trainer.partial
        elapsed = p["seconds"] + time.perf_counter() - trainer.epoch_start
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{p['loss_sum'] / max(p['samples'], 1):.4f}", lr=f"{trainer.lr_now():.3g}",
                             img_s=f"{p['samples'] * trainer.dist.world_size / max(elapsed, 1e-9):.0f}",
                             refresh=False)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, trainer: "Trainer", row: Dict[str, Any]) -> None:
        self._close_bar()
        task = trainer.task
        line = (f"epoch {row['epoch']}/{trainer.config.epochs}  train loss {row['train_loss']:.4f}  "
                f"lr {row['lr']:.3g}  {task.format_metrics(row)}")
        if trainer.ema is not None:
            ema = {k[len("ema_"):]: v for k, v in row.items() if k.startswith("ema_")}
            line += f"  | EMA {task.format_metrics(ema, short=True)}"
        trainer.echo(line + f"  ({row['images_per_second']:.0f} img/s, {row['epoch_seconds']:.0f} s)")

    def on_interrupt(self, trainer: "Trainer") -> None:
        self._close_bar()

    def close(self) -> None:
        self._close_bar()


class Export(Callback):
    """The final weights (the EMA's when there is one) as ``model.safetensors`` + ``model.json``."""

    def on_train_end(self, trainer: "Trainer", summary: Dict[str, Any]) -> None:
        if summary["interrupted"]:
            return
        weights = trainer.strategy.full_state_dict(trainer.final_model())  # (gathered whole: every rank takes part)
        if not trainer.dist.is_main:
            return
        meta = dict(trainer.task.export_metadata(), weights="ema" if trainer.ema is not None else "model",
                    epochs=summary["epochs"])
        best = trainer.task.best_metric
        meta[f"val_{best}"] = summary.get(f"final_{best}")
        path = trainer.output / "model.safetensors"
        save_safetensors(weights, path, metadata={"model": str(meta.get("model", "")), "format": "pt"})
        write_model_json(path, meta)


class Summary(Callback):
    """``summary.json``: the run's outcome (also what :func:`hymamba.engine.train` returns)."""

    def on_train_end(self, trainer: "Trainer", summary: Dict[str, Any]) -> None:
        if trainer.dist.is_main:
            write_json_atomic(trainer.output / "summary.json", summary)


def default_callbacks(config: Any) -> List[Callback]:
    """The standard set for an :class:`~hymamba.engine.config.EngineConfig`, in calling order."""
    best = BestMetric()
    callbacks: List[Callback] = [best]
    if config.model_ema:
        callbacks.append(EMA(config.model_ema_decay, config.model_ema_warmup))
    callbacks += [Checkpoint(best), Report(config.tensorboard), Progress(not config.quiet), Export(), Summary()]
    return callbacks


def _fmt(value: Optional[float]) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
