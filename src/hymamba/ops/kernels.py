"""Lazy, guarded access to optional compiled selective-scan kernels.

This is the only module that imports optional kernels (``mamba_ssm`` and
``hymamba.ops.scan_cpu``). Every import happens on first use, failures are
turned into a human-readable reason instead of an exception, and the answer is
cached so that a failing import or build is attempted only once per process.
The caches are plain module globals rather than ``functools.cache``: once filled,
torch.compile can read them without tracing the loading code.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger("hymamba")

ScanFn = Callable[..., object]


_mamba_ssm: tuple[ScanFn | None, str | None] | None = None
_cpu_kernel: tuple[ModuleType | None, str | None] | None = None


def mamba_ssm_scan_fn() -> tuple[ScanFn | None, str | None]:
    """Return ``(mamba_ssm selective_scan_fn, None)`` or ``(None, reason)``."""
    global _mamba_ssm
    if _mamba_ssm is None:
        _mamba_ssm = _load_mamba_ssm()
    return _mamba_ssm


def _load_mamba_ssm() -> tuple[ScanFn | None, str | None]:
    try:
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        fn = module.selective_scan_fn
    except Exception as exc:  # an import can fail with OSError/RuntimeError for CUDA libs
        reason = f"mamba_ssm could not be imported ({type(exc).__name__}: {exc})"
        logger.debug("selective_scan: %s", reason)
        return None, reason
    return fn, None


def _cpu_kernel_module() -> tuple[ModuleType | None, str | None]:
    """``(hymamba.ops.scan_cpu, None)`` once it is built and loaded, else ``(None, reason)``."""
    global _cpu_kernel
    if _cpu_kernel is None:
        _cpu_kernel = _load_cpu_kernel()
    return _cpu_kernel


def _load_cpu_kernel() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module("hymamba.ops.scan_cpu")
    except Exception as exc:
        reason = f"hymamba.ops.scan_cpu could not be imported ({type(exc).__name__}: {exc})"
        logger.debug("selective_scan: %s", reason)
        return None, reason
    try:
        available = bool(module.is_available())
        reason = None if available else (module.unavailable_reason() or "unknown reason")
    except Exception as exc:  # the module promises not to raise, but stay defensive
        available, reason = False, f"scan_cpu.is_available() raised {type(exc).__name__}: {exc}"
    if not available:
        logger.debug("selective_scan: C++ CPU kernel unavailable: %s", reason)
        return None, f"the compiled C++ CPU kernel is unavailable ({reason})"
    return module, None


def cpu_kernel_available() -> bool:
    """Whether the compiled C++ CPU selective-scan kernel can be used."""
    return _cpu_kernel_module()[0] is not None


def cpu_kernel_scan_fn() -> tuple[ScanFn | None, str | None]:
    """Return ``(cpu_kernel.selective_scan_cpu, None)`` or ``(None, reason)``."""
    module, reason = _cpu_kernel_module()
    if module is None:
        return None, reason
    return module.selective_scan_cpu, None
