"""Object detection and instance segmentation: the configuration (``config``), the engine task
(``task``: torchvision's Mask / Faster R-CNN on the MambaVision backbone + FPN, torchvision's losses,
COCO evaluation) and ``metrics`` (COCO evaluation of torchvision's detector outputs with pycocotools'
``COCOeval``: box and mask AP, gathered over processes).

This package imports only the configuration (no torch), so that loading it stays cheap; import the
other submodules themselves.
"""
from hymamba.tasks.detection.config import DetectionConfig, build_config, config_for_resume

__all__ = ["DetectionConfig", "build_config", "config_for_resume", "train"]


def train(config: DetectionConfig, resume=None, echo=print):
    """Train a detector with the engine (see :func:`hymamba.engine.train`); returns the summary."""
    from hymamba.engine.loop import train as run
    from hymamba.tasks.detection.task import DetectionTask

    return run(DetectionTask(config), resume=resume, echo=echo)
