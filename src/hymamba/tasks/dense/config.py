"""The options every dense task's configuration has: which backbone, with which weights, windows,
stochastic depth and scan, and how much of the data to use. Imports no torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from hymamba.engine.config import EngineConfig, need, option
from hymamba.errors import ConfigError

__all__ = ["DenseConfig"]


@dataclass
class DenseConfig(EngineConfig):
    """A dense task's backbone and data-subset options (subclasses add data, heads and the recipe)."""

    max_train_samples: Optional[int] = option(None, "use only this many training images (spread over the set)")
    max_val_samples: Optional[int] = option(None, "use only this many validation images")
    backbone: str = option("mambavision_nano", "backbone variant (see 'hymamba models'); official: "
                                               "mambavision_{T,S,B}")
    pretrained: bool = option(False, "start the backbone from the variant's official ImageNet weights (a local "
                                     "file, see README)")
    backbone_checkpoint: Optional[str] = option(None, "start the backbone from these weights (ImageNet, an official "
                                                      "dense checkpoint, or one of our dense runs)")
    window_size: Optional[Tuple[int, int, int, int]] = option(None, "attention windows per level (default: the "
                                                                     "variant's)")
    drop_path: float = option(0.0, "backbone stochastic depth (official dense runs: 0.2)")
    scan_impl: str = option("auto", "selective-scan implementation")

    def backbone_kwargs(self) -> Dict[str, Any]:
        """``create_backbone`` arguments (weights aside) these options ask for."""
        kwargs: Dict[str, Any] = dict(drop_path_rate=self.drop_path, scan_impl=self.scan_impl)
        if self.window_size is not None:
            kwargs["window_size"] = tuple(self.window_size)
        return kwargs

    def check(self) -> None:
        """Reject impossible settings before any work starts (ConfigError saying what to do)."""
        from hymamba.factory import resolve_model_name
        from hymamba.ops import check_scan_impl

        super().check()
        resolve_model_name(self.backbone)
        check_scan_impl(self.scan_impl)
        need(0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}")
        need(self.window_size is None or all(w >= 1 for w in self.window_size),
             f"window_size entries must be at least 1, got {self.window_size}")
        for name in ("max_train_samples", "max_val_samples"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be at least 1, got {value}")
        need(not (self.pretrained and self.backbone_checkpoint),
             "give either pretrained or backbone_checkpoint, not both")
        if self.backbone_checkpoint is not None:
            try:
                found = Path(self.backbone_checkpoint).expanduser().exists()
            except (RuntimeError, OSError) as e:  # e.g. ~nosuchuser/...
                raise ConfigError(f"backbone_checkpoint path {self.backbone_checkpoint!r} cannot be resolved: "
                                  f"{e}") from None
            need(found, f"backbone_checkpoint not found: {self.backbone_checkpoint}")
