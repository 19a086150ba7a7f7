"""Semantic segmentation: the configuration (``config``), the engine task (``task``: a UPerNet on a
MambaVision backbone, decode + auxiliary cross-entropy, whole/slide mIoU), ``metrics`` (a confusion
matrix over a whole data set giving mmseg's mIoU, aAcc, mAcc and per-class IoU / accuracy, summed over
processes) and ``inference`` (mmseg's whole-image and sliding-window inference, with optional flip
and multi-scale averaging).

This package imports only the configuration (no torch), so that loading it stays cheap; import the
other submodules themselves.
"""
from hymamba.tasks.segmentation.config import SegmentationConfig, build_config, config_for_resume

__all__ = ["SegmentationConfig", "build_config", "config_for_resume", "train"]


def train(config: SegmentationConfig, resume=None, echo=print):
    """Train a segmenter with the engine (see :func:`hymamba.engine.train`); returns the summary."""
    from hymamba.engine.loop import train as run
    from hymamba.tasks.segmentation.task import SegmentationTask

    return run(SegmentationTask(config), resume=resume, echo=echo)
