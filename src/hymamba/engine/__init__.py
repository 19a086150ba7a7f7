"""The task-agnostic training engine: configuration (``config``), the loop (``loop``), callbacks
(``callbacks``: best, EMA, checkpoints, reports, progress, export, summary), training state
(``state``), distribution strategies (``strategies``) and the :class:`Task` interface (``task``)."""
from hymamba.engine.callbacks import Callback, default_callbacks
from hymamba.engine.config import Config, EngineConfig
from hymamba.engine.loop import INTERRUPTED_EXIT, Trainer, train
from hymamba.engine.state import load_train_state
from hymamba.engine.task import Task

__all__ = ["INTERRUPTED_EXIT", "Callback", "Config", "EngineConfig", "Task", "Trainer", "default_callbacks",
           "load_train_state", "train"]
