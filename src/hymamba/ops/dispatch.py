"""Selective scan (the S6 recurrence of Mamba): one entry point, several implementations.

Shapes, semantics and compute dtype: :mod:`hymamba.ops.scan_ref` (the ground truth every
implementation is tested against).

Implementations (``impl=``):

* ``"reference"``: the plain recurrence loop, differentiated by autograd (ground truth).
* ``"fast"``: L-major, cache-blocked pure PyTorch with a hand-written backward,
  registered as the custom ops ``hymamba::selective_scan_fwd`` / ``_bwd`` so it is
  one opaque node for ``torch.compile`` and ``torch.export``. Works on any device.
* ``"cpu"``: the compiled C++ CPU kernel of ``hymamba.ops.scan_cpu``.
* ``"mamba_ssm"``: ``mamba_ssm``'s CUDA kernel.
* ``"auto"``: see :func:`selective_scan`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

from hymamba.errors import ConfigError, KernelUnavailable
from hymamba.ops import kernels
from hymamba.ops.scan_fast import selective_scan_fast  # noqa: F401  (registers the custom ops)
from hymamba.ops.scan_onnx import scan_loop
from hymamba.ops.scan_ref import check_inputs, scan_ref

__all__ = ["SCAN_IMPLS", "available_scan_impls", "check_scan_impl", "last_scan_impl", "selective_scan"]

logger = logging.getLogger("hymamba")

SCAN_IMPLS: tuple[str, ...] = ("auto", "reference", "fast", "cpu", "mamba_ssm")
_ENV_VAR = "HYMAMBA_SCAN_IMPL"

# torch.compiler.is_exporting appeared in torch 2.6; before that export is not told apart.
_is_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", lambda: False)

_last_impl: str | None = None
_logged: set[tuple[str, str]] = set()


def check_scan_impl(impl: str) -> str:
    """``impl`` if it names a scan implementation, else a ValueError listing them."""
    if impl not in SCAN_IMPLS:
        raise ConfigError(f"selective_scan: unknown impl {impl!r}; expected one of {SCAN_IMPLS}")
    return impl


# ------------------------------------------------------------------------ dispatcher
def _auto_impl(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(implementation, why) that impl="auto" picks for tensors on ``device`` of ``dtype``."""
    return _auto_impl_for(device.type, torch.compiler.is_compiling(), _is_exporting(), dtype == torch.float64)


# Evaluated eagerly even inside torch.compile: it reads the environment and may build
# or import a kernel, none of which belongs in a traced graph.
@torch.compiler.assume_constant_result
def _auto_impl_for(device_type: str, compiling: bool, exporting: bool, float64: bool = False) -> tuple[str, str]:
    env = os.environ.get(_ENV_VAR, "").strip()
    if env and env != "auto":
        if env not in SCAN_IMPLS:
            raise ConfigError(f"{_ENV_VAR}={env!r} is not a valid impl; expected one of {SCAN_IMPLS}")
        return env, f"{_ENV_VAR}={env}"
    if device_type == "cuda":
        if exporting:
            return "fast", "torch.export cannot trace mamba_ssm's kernel; the fast custom op can"
        if float64:
            return "fast", "float64 CUDA tensors, which mamba_ssm's kernel does not take"
        if kernels.mamba_ssm_scan_fn()[0] is not None:
            why = "CUDA tensors and mamba_ssm is importable"
            return "mamba_ssm", why + (" (torch.compile graph-breaks around it)" if compiling else "")
        return "fast", "CUDA tensors but mamba_ssm is not importable"
    # Both CPU paths are registered custom ops, so they also suit torch.compile/export.
    if device_type == "cpu" and kernels.cpu_kernel_available():
        return "cpu", "CPU tensors and the C++ CPU kernel is available"
    return "fast", f"{device_type} tensors, no compiled kernel available"


def _compiled_kernel(impl: str, device: torch.device, why: str,
                     dtype: torch.dtype = torch.float32) -> Callable[..., Tensor]:
    """The compiled kernel for impl "cpu" / "mamba_ssm", or a RuntimeError saying why not.

    ``why`` says where the request came from (the argument or the environment variable).
    """
    kernel_device = "cpu" if impl == "cpu" else "cuda"
    if device.type != kernel_device:
        fn, reason = None, f"it runs on {kernel_device} tensors only, got {device.type} tensors"
        remedy = f"pass {kernel_device} tensors"
    elif impl == "cpu":
        fn, reason = kernels.cpu_kernel_scan_fn()
        remedy = "make its build work (it needs a C++ toolchain, see hymamba.ops.scan_cpu)"
    else:
        fn, reason = kernels.mamba_ssm_scan_fn()
        remedy = "install it with `pip install mamba-ssm`"
    if fn is not None and impl == "mamba_ssm" and dtype == torch.float64:
        fn, reason = None, "its kernel takes float32, float16 and bfloat16 tensors, not float64"
        remedy = "pass float32 (or half-precision) tensors"
    if fn is None:
        raise KernelUnavailable(
            f"selective_scan: impl={impl!r} ({why}) is unavailable: {reason}. "
            f"To use it, {remedy}; otherwise use impl='fast' (pure PyTorch, any device) "
            "or impl='auto'."
        )
    return fn


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    impl: str = "auto",
) -> Tensor:
    """Selective scan, dispatched to one implementation.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias: (dim,).
    Returns y: (batch, dim, L) in ``u.dtype``.

    ``impl`` is one of :data:`SCAN_IMPLS`. Under ONNX export / ``torch.jit`` tracing every
    impl runs as the reference loop (standard ops only): unrolled under the TorchScript exporter,
    one ONNX ``Scan`` (:func:`~hymamba.ops.scan_onnx.scan_loop`) under the dynamo exporter. Otherwise ``"auto"`` picks, in
    order: the ``HYMAMBA_SCAN_IMPL`` env var if set; for CUDA tensors ``"mamba_ssm"`` when
    importable (``"fast"`` for float64 tensors, which its kernel does not take, and under
    ``torch.export``, which cannot trace it); for CPU tensors ``"cpu"`` when the C++ kernel is
    available; else ``"fast"``. ``"fast"`` and ``"cpu"`` are custom ops, so they are single
    graph nodes for torch.compile / torch.export. An explicitly requested but unavailable
    implementation raises :class:`~hymamba.errors.KernelUnavailable` (a RuntimeError); an
    unknown name raises :class:`~hymamba.errors.ConfigError` (a ValueError).
    """
    check_scan_impl(impl)
    if not torch.jit.is_tracing():  # under jit tracing the checks would only emit TracerWarnings
        check_inputs(u, delta, A, B, C, D, delta_bias)
    device = u.device
    why = "requested explicitly"
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # custom ops and kernels do not export
        why = "ONNX export / jit tracing needs standard ops" + (f" (instead of {impl!r})" if impl != "auto" else "")
        impl = "reference"
    elif impl == "auto":
        impl, why = _auto_impl(device, u.dtype)

    if impl == "reference" and _is_exporting() and torch.onnx.is_in_onnx_export():
        # the dynamo (any-size) ONNX export: the loop as one ONNX Scan instead of L unrolled steps
        y = scan_loop(u, delta, A, B, C, D, delta_bias, delta_softplus)
    elif impl == "reference":
        y = scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    elif impl == "fast":
        y = torch.ops.hymamba.selective_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)
    elif impl == "cpu":
        y = _compiled_kernel(impl, device, why)(u, delta, A, B, C, D, delta_bias, delta_softplus)
    else:
        y = _compiled_kernel(impl, device, why, u.dtype)(
            u, delta, A, B, C, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus
        )

    if not torch.compiler.is_compiling():
        _record(impl, device, why)
    return y


def _record(impl: str, device: torch.device, why: str) -> None:
    global _last_impl
    _last_impl = impl
    if (impl, device.type) not in _logged:
        _logged.add((impl, device.type))
        logger.info("selective_scan: using impl=%r for %s tensors (%s)", impl, device.type, why)


def last_scan_impl() -> str | None:
    """Implementation used by the most recent eager :func:`selective_scan` call (None before any).

    Calls traced by torch.compile / torch.export are not recorded.
    """
    return _last_impl


def available_scan_impls(device: str | torch.device = "cpu") -> list[str]:
    """Concrete implementations usable for tensors on ``device`` on this machine."""
    device = torch.device(device)
    impls = ["reference", "fast"]
    if device.type == "cpu" and kernels.cpu_kernel_available():
        impls.append("cpu")
    if device.type == "cuda" and torch.cuda.is_available() and kernels.mamba_ssm_scan_fn()[0] is not None:
        impls.append("mamba_ssm")
    return impls
