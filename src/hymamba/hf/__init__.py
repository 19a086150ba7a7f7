"""Hugging Face ``transformers`` integration (needs ``pip install hymamba[hf]``).

Importing this package registers the classes with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageClassification`` under ``model_type="mambavision"``, so official snapshots
load through the Auto classes without ``trust_remote_code``::

    from hymamba.hf import MambaVisionForImageClassification
    model = MambaVisionForImageClassification.from_pretrained("path/to/MambaVision-T-1K")
"""
from __future__ import annotations

import importlib.util

if importlib.util.find_spec("transformers") is None:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hymamba.hf needs the transformers package, which is not installed; "
        "install it with: pip install 'hymamba[hf]' (or pip install transformers)"
    )

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from hymamba.hf.configuration import MambaVisionConfig
from hymamba.hf.modeling import (
    MambaVisionForImageClassification,
    MambaVisionModel,
    MambaVisionModelForImageClassification,
    MambaVisionModelOutput,
    MambaVisionPreTrainedModel,
)

__all__ = ["MambaVisionConfig", "MambaVisionForImageClassification", "MambaVisionModel",
           "MambaVisionModelForImageClassification", "MambaVisionModelOutput", "MambaVisionPreTrainedModel"]


def _register() -> None:
    for register in (
        lambda: AutoConfig.register(MambaVisionConfig.model_type, MambaVisionConfig),
        lambda: AutoModel.register(MambaVisionConfig, MambaVisionModel),
        lambda: AutoModelForImageClassification.register(MambaVisionConfig, MambaVisionForImageClassification),
    ):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
