"""Hugging Face ``transformers`` classes around ``hymamba.MambaVision``.

The wrappers keep the network in ``self.model``, so their state-dict keys are the official
snapshots' (``model.patch_embed...``): ``from_pretrained`` reads an official
``nvidia/MambaVision-*`` folder as it is, without its remote code. Outputs follow the official
classes: ``MambaVisionModel`` gives ``(pooled, features)`` (the four stage outputs before each
downsample), ``MambaVisionForImageClassification`` gives ``logits`` (and ``loss`` with ``labels``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from hymamba.hf.configuration import MambaVisionConfig
from hymamba.models.layers import MambaVisionMixer
from hymamba.models.mambavision import MambaVision

__all__ = ["MambaVisionForImageClassification", "MambaVisionModel", "MambaVisionModelOutput",
           "MambaVisionPreTrainedModel"]


@dataclass
class MambaVisionModelOutput(ModelOutput):
    """``pooler_output``: (B, C) pooled features after the final norm; ``hidden_states``: the four
    stage outputs (B, C_i, H_i, W_i) before each downsample."""

    pooler_output: Optional[torch.FloatTensor] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


class MambaVisionPreTrainedModel(PreTrainedModel):
    config_class = MambaVisionConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        """The official initialisation (truncated normal linears, dt_proj too; unit norms; A_log, D)."""
        MambaVision._init_weights(module)
        if isinstance(module, MambaVisionMixer):
            module.reset_ssm_parameters("official")

    def _build(self, config: MambaVisionConfig, num_classes: int) -> None:
        self.model = MambaVision(**config.model_kwargs(), num_classes=num_classes)
        self.post_init()


class MambaVisionModel(MambaVisionPreTrainedModel):
    """The backbone. Returns the tuple ``(pooled, features)`` like the official
    ``MambaVisionModel`` (so ``pooled, features = model(x)`` works), or a
    :class:`MambaVisionModelOutput` with ``return_dict=True``."""

    def __init__(self, config: MambaVisionConfig) -> None:
        super().__init__(config)
        self._build(config, num_classes=0)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = False,
                **kwargs: Any) -> Union[MambaVisionModelOutput, Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
        final, stages = self.model.forward_intermediates(pixel_values)
        pooled = self.model.forward_head(final, pre_logits=True)
        if return_dict:
            return MambaVisionModelOutput(pooler_output=pooled, hidden_states=tuple(stages))
        return pooled, list(stages)


class MambaVisionForImageClassification(MambaVisionPreTrainedModel):
    """Backbone + classifier: ``logits`` (and ``loss`` when ``labels`` are given)."""

    def __init__(self, config: MambaVisionConfig) -> None:
        super().__init__(config)
        self._build(config, num_classes=config.num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, **kwargs: Any) -> Union[ImageClassifierOutput, Tuple]:
        logits = self.model(pixel_values)
        loss = None if labels is None else self._loss(logits, labels.to(logits.device))
        out = ImageClassifierOutput(loss=loss, logits=logits)
        use_dict = self.config.return_dict if return_dict is None else return_dict
        return out if use_dict else out.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' convention: regression for one label, cross-entropy for class indices,
        binary cross-entropy for multi-hot labels (or whatever ``config.problem_type`` says)."""
        problem = self.config.problem_type
        if problem is None:
            if self.config.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# the official class name
MambaVisionModelForImageClassification = MambaVisionForImageClassification
