"""hymamba: MambaVision on any device, exact to the official implementation.

Public API::

    create_model(name, pretrained=False, checkpoint_path=None, **kwargs)
    create_backbone(name, out_indices=(0, 1, 2, 3), checkpoint_path=None, ...)  # dense backbone
    create_segmenter(name, num_classes=150, checkpoint_path=None, ...)  # UPerNet segmenter
    create_detector(name, num_classes=None, checkpoint_path=None, backbone_checkpoint=None, ...)  # Mask/Faster R-CNN
    load_trained_segmenter(path, name=None)  # a trained segmenter (a run folder or an official file)
    load_trained_detector(path)              # a detector trained with 'hymamba detect train'
    list_models(pattern="*")
    load_checkpoint(model, path, strict=True, use_ema=False)
    MambaVision(...)                       # the official constructor
    selective_scan(u, delta, A, B, C, ...) # the scan, with a choice of implementations
    last_scan_impl()                       # which scan implementation ran last
    optimize_for_inference(model)          # a copy with BatchNorms folded into the convs

Importing hymamba registers every variant with timm (``timm.create_model("mambavision_t")``). The
names above are resolved on first use; in the ``hymamba`` command's own process nothing heavy is
imported up front, so that ``hymamba --help`` answers without loading torch.

Package layers, top first (each imports only from layers below it; ``lint-imports`` checks this)::

    cli > studies > apps | hf > tasks > engine > data | factory > weights > models > ops > utils > errors
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    "CheckpointError": "hymamba.errors",
    "ConfigError": "hymamba.errors",
    "HymambaError": "hymamba.errors",
    "MambaVision": "hymamba.models.mambavision",
    "create_backbone": "hymamba.factory",
    "create_detector": "hymamba.factory",
    "create_model": "hymamba.factory",
    "create_segmenter": "hymamba.factory",
    "list_models": "hymamba.factory",
    "load_checkpoint": "hymamba.factory",
    "load_trained_segmenter": "hymamba.factory",
    "load_trained_detector": "hymamba.factory",
    "resolve_model_name": "hymamba.factory",
    "optimize_for_inference": "hymamba.models.fuse",
    "last_scan_impl": "hymamba.ops.dispatch",
    "selective_scan": "hymamba.ops.dispatch",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hymamba' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_API))


def _in_cli_process() -> bool:
    """True when this process is the ``hymamba`` command itself (its script is named hymamba)."""
    argv0 = getattr(sys, "argv", None) or [""]
    return os.path.splitext(os.path.basename(argv0[0]))[0] == "hymamba"


if not _in_cli_process():
    importlib.import_module("hymamba.factory")  # registers the variants with timm
