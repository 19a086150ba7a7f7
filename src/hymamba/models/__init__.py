"""The models: nn.Modules with the official state-dict names, and the variant table.

``layers`` (blocks) -> ``mambavision`` (levels and the model) ; ``variants`` (the typed table),
``options`` (the paper's ablation options), ``fuse`` (``optimize_for_inference``). Nothing here
reads files: weights go into models in :mod:`hymamba.factory`.
"""
from hymamba.models.mambavision import MambaVision
from hymamba.models.variants import VARIANTS, Variant

__all__ = ["MambaVision", "VARIANTS", "Variant"]
