"""What a task gives the engine. The engine knows nothing else about classification, segmentation
or detection: a task builds its data and model, turns a batch into a dict of losses, evaluates a
model into a dict of metrics, and names the metric that decides "best".
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from hymamba.engine.config import EngineConfig
from hymamba.utils.distributed import Dist

__all__ = ["Task"]


class Task:
    """Base class of the tasks the engine trains (see :class:`hymamba.engine.Trainer`).

    Subclasses set the class attributes and implement the methods marked *required*; the others
    have working defaults. Everything runs on every process of a distributed run; metrics must
    come back reduced over processes (identical on every rank).

    Attributes:
        config: the run's configuration (an :class:`EngineConfig` subclass).
        metric_names: the keys of :meth:`evaluate`'s dict that go to ``metrics.csv``, in order.
        best_metric: the metric that decides the best epoch; ``best_mode`` 'max' or 'min'.
        best_title: how plots title the best metric (e.g. 'accuracy (%)').
    """

    metric_names: Sequence[str] = ()
    best_metric: str = ""
    best_mode: str = "max"
    best_title: str = ""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.dist = Dist()

    # -- required ----------------------------------------------------------------------------------

    def setup(self, dist: Dist, resume: Optional[Mapping[str, Any]]) -> None:
        """Build the data (called once, before :meth:`build_model`); check a resumed run fits the data."""
        raise NotImplementedError

    def train_dataset(self) -> Any:
        """The training set (a map-style dataset); the engine samples, shards and batches it."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU, with its starting weights."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        """The losses of one batch (already on the device); ``"loss"`` is what is minimised."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
        """Metrics of ``model`` on the validation data, reduced over processes."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------------

    def collate(self, samples: List[Any]) -> Any:
        """Turn samples into a batch (default: torch's)."""
        return torch.utils.data.default_collate(samples)

    def num_workers(self) -> int:
        """Data-loading processes per training process."""
        return self.config.workers or 0

    def batch_size_of(self, batch: Any) -> int:
        """How many samples a batch holds (for throughput)."""
        return len(batch[0])

    def run_name(self) -> str:
        """The default output folder's prefix."""
        return "run"

    def start_epoch(self, epoch: int, ema_model: Optional[nn.Module]) -> None:
        """Called on every process before each training epoch (0-based ``epoch``)."""

    def end_epoch(self) -> None:
        """Called on every process after each epoch's evaluation (e.g. to gather counts)."""

    def describe(self) -> List[str]:
        """Lines printed when the run starts (data, recipe)."""
        return []

    def format_metrics(self, metrics: Mapping[str, Any], short: bool = False) -> str:
        """One line's worth of metrics (``short``: the EMA's, beside the model's)."""
        return "  ".join(f"{k} {metrics[k]:.4g}" for k in self.metric_names if metrics.get(k) is not None)

    def metric_label(self, name: str) -> str:
        """How people write a metric's name (e.g. 'top-1' for 'top1')."""
        return name

    def state_dict(self) -> Dict[str, Any]:
        """What the task needs to resume exactly (stored at the top level of the training checkpoint)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` from a training checkpoint."""

    def export_metadata(self) -> Dict[str, Any]:
        """The ``model.json`` written beside the final weights."""
        return {}

    def summary(self) -> Dict[str, Any]:
        """Fields the task adds to ``summary.json``."""
        return {}
