"""One rule for where to run and in which mixed-precision dtype (training, validation, prediction).

- device ``"auto"``: CUDA when available, else the CPU; ``"cpu"``/``"cuda"`` as asked (a clear error
  when CUDA is asked for and absent).
- AMP dtype ``"auto"``: bfloat16 on the CPU and on CUDA GPUs that support it, float16 on older GPUs;
  ``"bfloat16"``/``"float16"`` as asked; None when AMP is off.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from hymamba.errors import ConfigError
from hymamba.utils.choices import AMP_DTYPES, DEVICES

__all__ = ["AMP_DTYPES", "DEVICES", "amp_dtype", "autocast", "resolve_device"]


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for ``device`` ('auto', 'cpu' or 'cuda'); ``local_rank`` picks the GPU."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_dtype(device: torch.device, enabled: bool = True, dtype: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype for ``device`` (None when ``enabled`` is False)."""
    if dtype not in AMP_DTYPES:
        raise ConfigError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {dtype!r}")
    if not enabled:
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``device`` (a no-op when ``dtype`` is None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
