"""The accepted values of the device and mixed-precision settings, without importing torch (the
configs and the command line's ``--help`` read them; :mod:`hymamba.utils.amp` applies them)."""
from __future__ import annotations

__all__ = ["AMP_DTYPES", "DEVICES"]

DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("auto", "bfloat16", "float16")
