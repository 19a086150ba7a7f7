"""ONNX export of a MambaVision model, checked with ONNX Runtime.

Under export, ``scan_impl="auto"`` runs the selective scan as its sequential reference made of
standard ops (the compiled kernels are not ONNX operators), so the graph unrolls the scan over
the window's tokens: the file is larger than the weights alone, but it runs in any ONNX runtime.
The input's height and width are fixed at export (window padding is computed from them); the batch
dimension is dynamic.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from hymamba.errors import ConfigError
from hymamba.utils.io import atomic_write

__all__ = ["export_onnx", "check_onnx"]


#: the opsets the export supports: attention needs 14; the TorchScript exporter stops at 20
MIN_OPSET, MAX_OPSET = 14, 20


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: Optional[Tuple[int, int]] = None,
    opset: int = 17,
) -> Path:
    """Export ``model`` (eval mode) to an ONNX file, written atomically.

    Args:
        model: a hymamba model (or any image model).
        path: the ``.onnx`` file to write.
        image_size: (H, W) of the input; default: the model's ``pretrained_cfg`` input size.
        opset: ONNX opset version.
    Returns:
        The written path. Input ``pixel_values`` (N, 3, H, W) -> output ``logits``; N is dynamic.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset must be between {MIN_OPSET} (scaled dot-product attention) and {MAX_OPSET} "
                          f"(the TorchScript exporter's newest), got {opset}; the default 17 suits ONNX Runtime")
    if image_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise ConfigError("image_size is required for a model without pretrained_cfg['input_size']")
        image_size = tuple(cfg["input_size"][1:])
    h, w = image_size
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    param = next(model.parameters())
    x = torch.randn(1, in_chans, h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # tracing warns about every Python int taken from a shape; they are intended constants.
            # We use the TorchScript exporter on purpose (it needs no onnxscript and traces the
            # standard-op scan), so its deprecation notice is noise for our users.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=False, opset_version=opset,
                input_names=["pixel_values"], output_names=["logits"],
                dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            )

    try:
        return atomic_write(path, write)
    finally:
        model.train(was_training)


def check_onnx(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Run the ONNX file in ONNX Runtime on ``x`` and return the max |difference| to ``model(x)``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("checking an ONNX export needs onnxruntime: pip install 'hymamba[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": x.detach().cpu().float().numpy()})[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x).float().cpu()
    finally:
        model.train(was_training)
    return float((torch.from_numpy(got) - ref).abs().max())
