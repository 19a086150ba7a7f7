"""Atomic file writing: write to a temporary file beside the target, then rename over it, so a
reader (or a run killed at any moment) sees either the old file or the complete new one.

The file gets the permissions of any file the user creates (``0o666 & ~umask``, e.g. 0644), whatever
mode the writer gave the temporary file (some libraries create theirs private, 0600)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["atomic_copy", "atomic_write", "atomic_write_bytes", "write_json_atomic"]


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS, old kernels): read it by setting it back at once
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``.

    Args:
        path: the destination; its folder is created if needed.
        write: fills the temporary path it is given (e.g. ``lambda p: torch.save(obj, p)``).
    Returns:
        ``path`` as a Path, mode ``0o666 & ~umask`` like any new file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:  # a file system without permissions (some network and FUSE mounts): keep its mode
            pass
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file so that ``dst`` is always complete."""
    import shutil

    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def write_json_atomic(path: str | os.PathLike, obj: object) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    import json

    return atomic_write_bytes(Path(path), (json.dumps(obj, indent=2) + "\n").encode())
