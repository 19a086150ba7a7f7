"""Compiled C++ CPU kernel for the selective scan, built on first use.

The C++ source (``hymamba/ops/csrc/selective_scan_cpu.cpp``) ships as package
data and is compiled lazily with ``torch.utils.cpp_extension.load`` the first
time :func:`is_available` (or :func:`selective_scan_cpu`) is called, so that
installing hymamba never needs a compiler. The shared library is cached in
torch's extension directory (``$TORCH_EXTENSIONS_DIR`` when set, else
``$HYMAMBA_CACHE/torch_extensions`` when set, else torch's default) under a
name that hashes the source (and its path), the build flags, the torch/Python
versions and the CPU's feature flags, so a binary built with ``-march=native`` is never
reused on a different CPU.

If the build or its self-test fails, the kernel reports itself unavailable
(with the reason) and callers fall back to the pure-PyTorch scan.

Shapes (mamba_ssm's ``selective_scan_ref`` convention)::

    u, delta: (batch, dim, L)   A: (dim, N)   B, C: (batch, N, L)
    D, delta_bias: (dim,) or None             y: (batch, dim, L)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from hymamba.errors import KernelUnavailable
from hymamba.ops.scan_ref import check_inputs, compute_dtype, differentiable_backward

__all__ = ["is_available", "unavailable_reason", "selective_scan_cpu"]

logger = logging.getLogger("hymamba")

_CSRC_DIR = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("selective_scan_cpu.cpp",)
_DISABLE_ENV = "HYMAMBA_DISABLE_CPU_KERNEL"
# A FileBaton lock older than this is assumed to be left over from a killed
# build (older torch would otherwise wait on it forever).
_STALE_LOCK_S = 600.0

# Flag sets tried in order; the portable one rescues compilers/platforms that
# reject -march=native or OpenMP (the kernel then runs single-threaded).
# No -ffast-math: the exp/log1p polynomials are hand-written and must not be
# reassociated; -ffp-contract=fast only fuses a * b + c into FMAs (the ISO
# -std=c++20 mode torch compiles with would otherwise leave them unfused).
# The source uses GCC/Clang vector extensions, so MSVC builds fail (and the
# kernel reports itself unavailable).
_FLAG_SETS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"), ("-fopenmp",)),
    (("-O3", "-ffp-contract=fast", "-fno-math-errno"), ()),
)


class _KernelState:
    """Outcome of the one-time build: the op namespace or the failure reason."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tried = False
        self.ops: Any = None
        self.reason: Optional[str] = None
        self.build_seconds: Optional[float] = None


_STATE = _KernelState()


def _disabled_by_env() -> bool:
    return os.environ.get(_DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _cpu_signature() -> str:
    """CPU model + feature flags, so -march=native binaries are CPU-specific."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "model name", "CPU part"):
                    parts.append(line.strip())
                if key in ("flags", "Features"):
                    break  # the first core describes them all
    except OSError:
        pass
    return "\n".join(parts)


def _extension_name(cflags: tuple[str, ...], ldflags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        h.update((_CSRC_DIR / src).read_bytes())
    for item in (
        " ".join(cflags),
        " ".join(ldflags),
        torch.__version__,
        sys.version,
        os.environ.get("CXX", ""),
        str(_CSRC_DIR),  # torch's ninja build rebuilds when the source path changes: one cache per install
        _cpu_signature(),
    ):
        h.update(b"\0" + item.encode())
    return f"hymamba_scan_cpu_{h.hexdigest()[:16]}"


def _build_directory(name: str) -> Optional[str]:
    """None lets torch choose (it honours TORCH_EXTENSIONS_DIR)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    root = os.environ.get("HYMAMBA_CACHE")
    if not root:
        return None
    path = os.path.join(os.path.expanduser(root), "torch_extensions", name)
    os.makedirs(path, exist_ok=True)
    return path


def _remove_stale_lock(cpp_extension: Any, build_dir: str) -> None:
    """Older torch (FileBaton) waits forever on the lock file of a killed
    build; newer torch holds an OS-level lock (FileLock) and needs no help,
    and there deleting the file could let two builds run at once."""
    if getattr(cpp_extension, "FileLock", None) is not None:
        return
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > _STALE_LOCK_S:
        logger.warning("hymamba: removing stale extension build lock %s (%.0f s old)", lock, age)
        try:
            os.remove(lock)
        except OSError:
            pass


def _short_error(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > limit:  # compiler logs can be huge: keep the head and tail
        text = text[: limit // 4] + "\n...\n" + text[-(3 * limit) // 4 :]
    return text


def _self_test(ops: Any) -> None:
    """Tiny forward check against a float64 loop; catches miscompilation."""
    g = torch.Generator().manual_seed(0)
    batch, dim, L, N = 2, 19, 7, 3
    u = torch.randn(batch, dim, L, generator=g, dtype=torch.float64)
    delta = torch.randn(batch, dim, L, generator=g, dtype=torch.float64)
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64) * 2
    B = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    C = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    D = torch.randn(dim, generator=g, dtype=torch.float64)
    bias = torch.randn(dim, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(delta + bias[:, None])
    h = torch.zeros(batch, dim, N, dtype=torch.float64)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    ref = torch.stack(ys, -1) + D[:, None] * u
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        args = [x.to(dtype) for x in (u, delta, A, B, C, D, bias)]
        y = ops.fwd(*args, True).double()
        err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        if not err <= tol:  # also catches NaN
            raise RuntimeError(f"self-test failed for {dtype}: relative error {err:.3g} > {tol:g}")


def _import_cpp_extension() -> Any:
    """torch.utils.cpp_extension, imported lazily (slow) and without its
    "No CUDA runtime is found" warning, which is noise for a CPU build."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        torch_logger.setLevel(level)
    return cpp_extension


def _ensure_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) installs it
    beside the interpreter, which is not on PATH when a venv's python is run directly."""
    import shutil

    bin_dir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.isfile(os.path.join(bin_dir, "ninja")):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _build() -> Any:
    """Compiles (or loads the cached) extension; returns its op namespace."""
    cpp_extension = _import_cpp_extension()
    _ensure_ninja_on_path()

    sources = [str(_CSRC_DIR / s) for s in _SOURCES]
    for src in sources:
        if not os.path.isfile(src):
            raise FileNotFoundError(f"kernel source missing from the installed package: {src}")
    errors = []
    for cflags, ldflags in _FLAG_SETS:
        name = _extension_name(cflags, ldflags)
        try:
            build_dir = _build_directory(name)
            if build_dir is None:  # torch's default location, for the stale-lock check only
                default_dir = getattr(cpp_extension, "_get_build_directory", None)
                build_dir = default_dir(name, verbose=False) if default_dir is not None else None
            if build_dir is not None:
                _remove_stale_lock(cpp_extension, build_dir)
            cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=[*cflags, f"-DHYMAMBA_OPS_NS={name}"],
                extra_ldflags=list(ldflags),
                build_directory=build_dir,
                is_python_module=False,
                verbose=False,
            )
            ops = getattr(torch.ops, name)
            _self_test(ops)
            return ops
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
            errors.append(f"[{' '.join(cflags)}] {_short_error(exc)}")
            logger.debug("hymamba: CPU kernel build with %s failed: %s", cflags, exc)
    raise RuntimeError("\n".join(errors))


def _load() -> Any:
    """The op namespace of the built extension, or None (reason in _STATE)."""
    if _STATE.tried:
        return _STATE.ops
    with _STATE.lock:
        if not _STATE.tried:
            logger.info("hymamba: building/loading the C++ CPU selective-scan kernel (first build takes ~10-20 s)")
            start = time.perf_counter()
            try:
                # The first call may come while torch.export / torch.compile trace the model: the
                # build's self-test must run on real tensors, outside their fake and proxy modes
                # (it failed there and marked the kernel unavailable for the whole process).
                from torch.utils._python_dispatch import _disable_current_modes

                with _disable_current_modes():
                    _STATE.ops = _build()
            except Exception as exc:  # a broken build means "unavailable", never an error
                _STATE.reason = f"building the hymamba C++ CPU kernel failed: {exc}"
                logger.warning("hymamba: C++ CPU selective-scan kernel unavailable; %s", _STATE.reason)
            _STATE.build_seconds = time.perf_counter() - start
            if _STATE.ops is not None:
                logger.info("hymamba: C++ CPU selective-scan kernel ready in %.1f s", _STATE.build_seconds)
            # Set last: a KeyboardInterrupt during the build leaves it untried.
            _STATE.tried = True
    return _STATE.ops


def is_available() -> bool:
    """True when the compiled kernel can be used (builds it on the first call).

    Thread-safe, never raises; the outcome of the build is cached for the
    process. ``HYMAMBA_DISABLE_CPU_KERNEL=1`` makes it return False.
    """
    if _disabled_by_env():
        return False
    try:
        return _load() is not None
    except Exception:  # noqa: BLE001 - documented to never raise
        return False


def unavailable_reason() -> Optional[str]:
    """Why :func:`is_available` is False, or None when the kernel is usable."""
    if _disabled_by_env():
        return f"disabled by the environment variable {_DISABLE_ENV}={os.environ.get(_DISABLE_ENV)}"
    if is_available():
        return None
    return _STATE.reason or "unknown error while loading the hymamba C++ CPU kernel"


def _require() -> Any:
    """The op namespace, or a RuntimeError that says why it is missing."""
    ops = None if _disabled_by_env() else _load()
    if ops is None:
        raise KernelUnavailable(
            "The hymamba C++ CPU selective-scan kernel is not available: "
            f"{unavailable_reason()}. Use impl='fast' (pure PyTorch), which works everywhere."
        )
    return ops


# ---------------------------------------------------------------------------
# dtype handling


def _cast(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Only a dtype change copies; the kernel reads u/delta/B/C/dout through
    # their strides, so non-contiguous float32 inputs cost nothing extra.
    return None if x is None else x.to(dtype)


def _run_fwd(
    ops: Any,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tensor:
    """y (batch, dim, L) in u's dtype, computed in float32 or float64."""
    cdt = compute_dtype(u, delta, A, B, C, D, delta_bias)
    y = ops.fwd(
        u.to(cdt), delta.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt), _cast(D, cdt), _cast(delta_bias, cdt), delta_softplus
    )
    return y.to(u.dtype)


def _run_bwd(
    ops: Any,
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype.

    dD / ddelta_bias are 0-element tensors when D / delta_bias is None.
    """
    cdt = compute_dtype(u, delta, A, B, C, D, delta_bias)
    grads = ops.bwd(
        dout.to(cdt),
        u.to(cdt),
        delta.to(cdt),
        A.to(cdt),
        B.to(cdt),
        C.to(cdt),
        _cast(D, cdt),
        _cast(delta_bias, cdt),
        delta_softplus,
    )
    like = (u, delta, A, B, C, u if D is None else D, u if delta_bias is None else delta_bias)
    return tuple(g.to(x.dtype) for g, x in zip(grads, like))  # type: ignore[return-value]


class _SelectiveScanFn(torch.autograd.Function):
    """Eager-mode autograd wrapper: calls the C++ ops directly, which costs
    less per call than going through the Python custom ops below. Uses the
    setup_context form so torch.func transforms (grad, jacrev) accept it."""

    @staticmethod
    def forward(  # type: ignore[override]
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
    ) -> Tensor:
        return _run_fwd(_require(), u, delta, A, B, C, D, delta_bias, delta_softplus)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
        # The original (not dtype-converted) inputs are saved: conversion is
        # cheap to redo and saving float32 copies of bf16 inputs would double
        # the memory held for backward.
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the kernel's backward is not differentiable
            return _differentiable_backward(ctx, dout)
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias = _run_bwd(
            _require(), dout, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus
        )
        return (
            du,
            ddelta,
            dA,
            dB,
            dC,
            None if D is None else dD,
            None if delta_bias is None else dbias,
            None,
        )


# ---------------------------------------------------------------------------
# Custom ops: what torch.compile / torch.export see (an opaque op with a fake
# implementation for shape propagation and a registered backward).


@torch.library.custom_op("hymamba::scan_cpu_fwd", mutates_args=(), device_types="cpu")
def scan_cpu_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tensor:
    """Forward scan: y (batch, dim, L) in u's dtype."""
    return _run_fwd(_require(), u, delta, A, B, C, D, delta_bias, delta_softplus)


@scan_cpu_fwd.register_fake
def _scan_cpu_fwd_fake(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tensor:
    return u.new_empty(u.shape)


@torch.library.custom_op("hymamba::scan_cpu_bwd", mutates_args=(), device_types="cpu")
def scan_cpu_bwd(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype.

    dD / ddelta_bias are 0-element tensors when D / delta_bias is None.
    """
    return _run_bwd(_require(), dout, u, delta, A, B, C, D, delta_bias, delta_softplus)


@scan_cpu_bwd.register_fake
def _scan_cpu_bwd_fake(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dD = u.new_empty((0,)) if D is None else D.new_empty(D.shape)
    dbias = u.new_empty((0,)) if delta_bias is None else delta_bias.new_empty(delta_bias.shape)
    return (
        u.new_empty(u.shape),
        delta.new_empty(delta.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        dD,
        dbias,
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.delta_softplus = delta_softplus


def _differentiable_backward(ctx: Any, dout: Tensor) -> tuple[Optional[Tensor], ...]:
    return differentiable_backward(ctx.saved_tensors, dout, ctx.delta_softplus, ctx.needs_input_grad)


def _backward(ctx: Any, dout: Tensor) -> tuple[Optional[Tensor], ...]:
    if torch.is_grad_enabled():  # create_graph=True
        return _differentiable_backward(ctx, dout)
    u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias = torch.ops.hymamba.scan_cpu_bwd(
        dout, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        None if D is None else dD,
        None if delta_bias is None else dbias,
        None,
    )


scan_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Selective scan with the compiled CPU kernel (differentiable).

    Args:
        u, delta: (batch, dim, L). A: (dim, N). B, C: (batch, N, L).
        D, delta_bias: (dim,) or None. delta_softplus: apply softplus to
            delta + delta_bias.

    Returns:
        y: (batch, dim, L) in u's dtype. Computed in float32 (float64 when an
        input is float64). Gradients flow to every tensor input.

    Raises:
        ValueError: on wrong shapes, non-CPU or non-floating tensors.
        RuntimeError: when the kernel could not be built (see
            :func:`unavailable_reason`).
    """
    check_inputs(u, delta, A, B, C, D, delta_bias, caller="selective_scan_cpu", device_type="cpu")
    delta_softplus = bool(delta_softplus)
    if torch.compiler.is_compiling() or any(
        type(x) not in _PLAIN_TENSOR_TYPES for x in (u, delta, A, B, C, D, delta_bias) if x is not None
    ):
        # Traced (torch.compile / torch.export) or tensor subclasses such as
        # FakeTensor: go through the custom op, which has a fake impl. Its
        # real impl checks availability when the graph runs.
        return torch.ops.hymamba.scan_cpu_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)
    inputs = (u, delta, A, B, C, D, delta_bias)
    if not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for x in inputs):
        # nothing to differentiate: skip the autograd.Function machinery (half the cost of a
        # small call, e.g. batch-1 inference)
        return _run_fwd(_require(), u, delta, A, B, C, D, delta_bias, delta_softplus)
    return _SelectiveScanFn.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
