"""Selective-scan operators: reference, fast pure-PyTorch and compiled kernels."""

from hymamba.ops.selective_scan import (
    SCAN_IMPLS,
    available_scan_impls,
    last_scan_impl,
    selective_scan,
    selective_scan_fast,
    selective_scan_ref,
)

__all__ = [
    "SCAN_IMPLS",
    "available_scan_impls",
    "last_scan_impl",
    "selective_scan",
    "selective_scan_fast",
    "selective_scan_ref",
]
