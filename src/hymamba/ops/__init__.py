"""Tensor operators: the selective scan (reference, fast pure-PyTorch, compiled kernels) and the
linear layers. Tensors in, tensors out; nothing here imports a model.

Files: ``scan_ref`` (the ground truth, input checks, compute dtype), ``scan_fast`` (the pure-PyTorch
custom op), ``scan_cpu`` (the C++ kernel, sources in ``csrc/``), ``kernels`` (the only importer and
builder of optional kernels), ``dispatch`` (``selective_scan(impl=...)``), ``linear`` (oneDNN linear
layers on CPU).
"""

from hymamba.ops.dispatch import SCAN_IMPLS, available_scan_impls, check_scan_impl, last_scan_impl, selective_scan
from hymamba.ops.scan_fast import selective_scan_fast
from hymamba.ops.scan_ref import selective_scan_ref

__all__ = [
    "SCAN_IMPLS",
    "available_scan_impls",
    "check_scan_impl",
    "last_scan_impl",
    "selective_scan",
    "selective_scan_fast",
    "selective_scan_ref",
]
