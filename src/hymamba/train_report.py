"""What a training run writes for people: metrics.csv, learning curves, summary.json, TensorBoard.

Every file is rewritten whole from the run's history and replaced atomically, so a resumed run
continues the same files and an interrupted one never leaves a half-written file.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hymamba.atomic import atomic_write_bytes

__all__ = ["Reporter", "write_json_atomic"]

_CSV_COLUMNS = ("epoch", "train_loss", "lr", "top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss",
                "images_per_second", "epoch_seconds")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2) + "\n").encode())


class Reporter:
    """Writes the per-epoch outputs of a run into its output folder (call on rank 0 only)."""

    def __init__(self, output: Path, tensorboard: bool) -> None:
        self.output = output
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output / "tensorboard"))

    def epoch_done(self, history: Sequence[Dict[str, Any]]) -> None:
        """Rewrite metrics.csv and learning_curves.png; log the newest epoch to TensorBoard."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _fmt(row.get(k)) for k in _CSV_COLUMNS})
        atomic_write_bytes(self.output / "metrics.csv", buf.getvalue().encode())
        self._plot(history)
        if self._tb is not None and history:
            row = history[-1]
            for key in _CSV_COLUMNS[1:]:
                if row.get(key) is not None:
                    self._tb.add_scalar(key, row[key], row["epoch"])
            self._tb.flush()

    def _plot(self, history: Sequence[Dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        epochs = [r["epoch"] for r in history]
        fig = Figure(figsize=(12, 3.6))
        ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
        ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
        ax_loss.plot(epochs, [r["loss"] for r in history], label="val")
        if any(r.get("ema_loss") is not None for r in history):
            ax_loss.plot(epochs, [r.get("ema_loss") for r in history], label="val (EMA)")
        ax_loss.set(title="loss", xlabel="epoch")
        ax_acc.plot(epochs, [r["top1"] for r in history], label="val top-1")
        if any(r.get("ema_top1") is not None for r in history):
            ax_acc.plot(epochs, [r.get("ema_top1") for r in history], label="val top-1 (EMA)")
        ax_acc.set(title="accuracy (%)", xlabel="epoch")
        ax_lr.plot(epochs, [r["lr"] for r in history])
        ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
        for ax in (ax_loss, ax_acc):
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(self.output / "learning_curves.png", buf.getvalue())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(value: Optional[float]) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def epoch_line(row: Dict[str, Any], epochs: int) -> str:
    """One human-readable line per epoch."""
    line = (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}  lr {row['lr']:.3g}  "
            f"val top-1 {row['top1']:.2f} top-5 {row['top5']:.2f} loss {row['loss']:.4f}")
    if row.get("ema_top1") is not None:
        line += f"  | EMA top-1 {row['ema_top1']:.2f} loss {row['ema_loss']:.4f}"
    return line + f"  ({row['images_per_second']:.0f} img/s, {row['epoch_seconds']:.0f} s)"

