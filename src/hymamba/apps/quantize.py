"""int8 ONNX models with ONNX Runtime's quantization: dynamic, or static with calibration images.

What becomes int8 (``QUANTIZED_OPS``): the convolutions and the matrix products (every linear
layer: the mixers' projections, attention's qkv and output, the MLPs, the head) — weights int8 per
output channel, activations quantized on the fly (dynamic) or with ranges measured on calibration
images (static, QDQ format). What stays float, on purpose: the selective scan (unrolled into a chain
of Exp / Mul / Add over the window's tokens: int8 there would compound its rounding through every
recurrent step), the attention scores and softmax, the norms, the activations and the residual
additions (cheap elementwise work whose ranges vary most between images).

Dynamic needs nothing but the file; static needs images the model will see, preprocessed exactly
as for evaluation (``calibration``: a folder of images or ``"digits"``), which it reads with the
model's own preprocessing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from hymamba.errors import ConfigError, DataError
from hymamba.utils.io import atomic_write

__all__ = ["QUANTIZATION_MODES", "QUANTIZED_OPS", "calibration_batches", "int8_path", "quantize_onnx"]

#: the modes: dynamic (no data) and static (calibration images)
QUANTIZATION_MODES = ("dynamic", "static")
#: the ONNX operators made int8 (see the module docstring for what stays float and why)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def int8_path(path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    p = Path(path)
    return p.with_name(p.stem + ".int8" + p.suffix)


def calibration_batches(source: str, transform: Callable, image_size: int, count: int = 64,
                        batch_size: int = 8) -> List[np.ndarray]:
    """``count`` images as float32 batches (N, 3, H, W), preprocessed by ``transform``.

    ``source`` is ``"digits"`` (the built-in digits' training split, spread over the classes), or a
    folder of images (searched recursively; unreadable files are skipped).
    """
    from hymamba.data.datasets import BUILTIN, builtin_dataset, subset
    from hymamba.data.images import UNREADABLE, image_files, load_image

    if count < 1:
        raise ConfigError(f"the calibration needs at least 1 image, got {count}")
    tensors: List[Any] = []
    if source in BUILTIN:
        ds = subset(builtin_dataset(source, "train", image_size, transform), count)
        tensors = [ds[i][0] for i in range(len(ds))]
    else:
        files = image_files([source])
        for path, _ in files:
            if len(tensors) == count:
                break
            try:
                tensors.append(transform(load_image(path)))
            except UNREADABLE:
                continue
    if not tensors:
        raise DataError(f"no calibration image could be read from {source}; give a folder of images or 'digits'")
    arrays = np.stack([t.numpy() for t in tensors]).astype(np.float32)
    return [arrays[i:i + batch_size] for i in range(0, len(arrays), batch_size)]


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "dynamic",
                  calibration: Optional[Sequence[np.ndarray]] = None) -> Dict[str, Any]:
    """Write an int8 copy of the ONNX file ``src`` to ``dst`` (atomically).

    Args:
        src: a float32 ONNX model with input ``pixel_values`` (what :func:`~hymamba.apps.export.export_onnx` writes).
        dst: the int8 file.
        mode: ``"dynamic"`` or ``"static"`` (needs ``calibration``: float32 batches, preprocessed).
    Returns:
        ``{"path", "mode", "ops", "quantized_nodes", "bytes_float", "bytes_int8"}``.
    """
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"int8 mode must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    if mode == "static" and not calibration:
        raise ConfigError("static int8 quantization needs calibration images (--calibration FOLDER or digits)")
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)
    except ImportError:
        raise ConfigError("int8 quantization needs onnxruntime: pip install 'hymamba[onnx]'") from None
    src, dst = Path(src), Path(dst)

    def write(tmp: Path) -> None:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=list(QUANTIZED_OPS))
            return

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(calibration or [])

            def get_next(self) -> Optional[Dict[str, np.ndarray]]:
                batch = next(self.batches, None)
                return None if batch is None else {"pixel_values": batch}

        quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS))

    import logging

    quiet = logging.getLogger()  # onnxruntime's quantizer advises pre-processing through the root logger
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))
    try:
        atomic_write(dst, write)
    finally:
        quiet.setLevel(level)
    import onnx

    nodes = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    marker = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear") if mode == "dynamic" else ("QuantizeLinear",)
    return {"path": str(dst), "mode": mode, "ops": list(QUANTIZED_OPS),
            "quantized_nodes": sum(n in marker for n in nodes),
            "bytes_float": src.stat().st_size, "bytes_int8": dst.stat().st_size}


def compare_with_model(model: Any, path: str | os.PathLike, batches: Sequence[np.ndarray]) -> Dict[str, float]:
    """How the ONNX file at ``path`` (e.g. int8) differs from ``model`` in PyTorch on ``batches``:
    ``max_abs_diff`` of the logits, ``top1_agreement`` (fraction of images whose top class is the
    same) and ``images``."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff, same, total = 0.0, 0, 0
    model.eval()
    for batch in batches:
        got = session.run(None, {"pixel_values": batch})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).float().numpy()
        diff = max(diff, float(np.abs(got - ref).max()))
        same += int((got.argmax(1) == ref.argmax(1)).sum())
        total += len(batch)
    return {"max_abs_diff": diff, "top1_agreement": same / max(total, 1), "images": total}
