"""The bookkeeping every dense task shares: the backbone built from the config, the unreadable images
gathered over processes and kept in the checkpoint, and the check that a resumed run has its classes."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from torch import nn

from hymamba.engine.task import Task
from hymamba.errors import DataError
from hymamba.factory import create_backbone, resolve_model_name
from hymamba.tasks.dense.config import DenseConfig

__all__ = ["DenseTask"]


class DenseTask(Task):
    """A task on the dense backbone; subclasses set ``class_names`` in ``setup`` and build their heads."""

    config: DenseConfig
    class_names: List[str]

    def __init__(self, config: DenseConfig) -> None:
        super().__init__(config)
        self.skipped: set = set()
        self.backbone_name = resolve_model_name(config.backbone)

    def check_resume(self, resume: Optional[Mapping[str, Any]]) -> None:
        """A resumed run must see the classes it was trained on."""
        if resume is not None and resume.get("class_names") != self.class_names:
            raise DataError(f"the run being resumed was trained on classes {list(resume.get('class_names') or [])[:10]}, "
                            f"but the data has {self.class_names[:10]}; resume with the same data")

    def build_backbone(self, **extra: Any) -> nn.Module:
        """The configured backbone with its starting weights (``init_note`` says which)."""
        cfg = self.config
        self.init_note = ("official ImageNet backbone" if cfg.pretrained else
                          f"backbone from {cfg.backbone_checkpoint}" if cfg.backbone_checkpoint else
                          "random initialisation")
        return create_backbone(self.backbone_name, checkpoint_path=cfg.backbone_checkpoint,
                               pretrained=cfg.pretrained, **cfg.backbone_kwargs(), **extra)

    def end_epoch(self) -> None:
        if self.dist.enabled:
            self.skipped = {p for part in self.dist.gather_objects(sorted(self.skipped)) for p in part}

    def state_dict(self) -> Dict[str, Any]:
        return {"class_names": self.class_names, "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = set(state.get("skipped", ()))
