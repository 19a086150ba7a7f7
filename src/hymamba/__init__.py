"""hymamba: MambaVision on any device, exact to the official implementation.

Public API::

    create_model(name, pretrained=False, checkpoint_path=None, **kwargs)
    list_models(pattern="*")
    load_checkpoint(model, path, strict=True, use_ema=False)
    MambaVision(...)                       # the official constructor
    selective_scan(u, delta, A, B, C, ...) # the scan, with a choice of implementations
    last_scan_impl()                       # which scan implementation ran last
    optimize_for_inference(model)          # a copy with BatchNorms folded into the convs
"""
from hymamba.checkpoint import CheckpointError, load_checkpoint
from hymamba.factory import create_model, list_models, resolve_model_name
from hymamba.inference import optimize_for_inference
from hymamba.models import MambaVision
from hymamba.ops import last_scan_impl, selective_scan

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MambaVision",
    "create_model",
    "last_scan_impl",
    "list_models",
    "load_checkpoint",
    "optimize_for_inference",
    "resolve_model_name",
    "selective_scan",
]
