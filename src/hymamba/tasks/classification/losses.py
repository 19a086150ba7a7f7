"""The classification losses of the official recipe: cross-entropy with label smoothing, soft targets
under Mixup/CutMix, and MESA's distillation term."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_loss", "mesa_kl"]


def mesa_kl(logits: torch.Tensor, ema_logits: torch.Tensor) -> torch.Tensor:
    """MESA's distillation term, as in the official train.py: 50 * KL(EMA || model) at temperature 3."""
    t = 3.0
    return 50.0 * F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.softmax(ema_logits.float() / t, dim=1),
                           reduction="batchmean")


def build_loss(config: Any, num_classes: int) -> Tuple[nn.Module, Optional[Any]]:
    """(loss function, Mixup/CutMix or None) for a :class:`ClassificationConfig`.

    With Mixup/CutMix on, targets become soft (smoothing folded in) and the loss is soft-target
    cross-entropy; otherwise label-smoothing cross-entropy (plain cross-entropy at smoothing 0).
    """
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                      switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                      label_smoothing=config.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(config.smoothing), None
    return nn.CrossEntropyLoss(), None
