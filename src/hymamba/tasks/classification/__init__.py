"""Image classification: the configuration (``config``), the engine task (``task``), the recipe's
losses (``losses``: smoothing, Mixup/CutMix, MESA) and metrics (``metrics``: top-k, per class)."""
from hymamba.tasks.classification.config import (ClassificationConfig, build_config, check_config, config_fields,
                                                 config_for_resume)
from hymamba.tasks.classification.metrics import EvalResult, evaluate
from hymamba.tasks.classification.task import ClassificationTask

__all__ = ["ClassificationConfig", "ClassificationTask", "EvalResult", "build_config", "check_config",
           "config_fields", "config_for_resume", "evaluate", "train"]


def train(config: ClassificationConfig, resume=None, echo=print):
    """Train a classifier with the engine (see :func:`hymamba.engine.train`); returns the summary."""
    from hymamba.engine.loop import train as run

    return run(ClassificationTask(config), resume=resume, echo=echo)
