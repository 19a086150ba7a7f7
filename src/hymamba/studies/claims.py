"""Claiming a run, so that several processes (or machines sharing the study folder) split a study.

A run is claimed by creating ``<run>/claim.json`` with ``O_CREAT | O_EXCL`` (only one creator
wins, also on NFS v3+ and other POSIX file systems) holding the host, pid, the process's start time
and the time. While the run trains, its holder touches the file every ``HEARTBEAT`` seconds.

Whose claim is stale (may be taken over):

- this host: the claim's process is gone (no such pid, or the pid now belongs to a process that
  started at another time); a live process's claim is always respected;
- another host: its heartbeat (the file's modification time) is older than ``stale_after`` seconds;
  without ``stale_after`` claims from other hosts are always respected (a crashed machine's claim
  then needs ``--stale-after`` or deleting the file by hand).

Taking over is serialised by a second ``O_EXCL`` file (``claim.json.takeover``), so two processes
that both find the same stale claim cannot both win.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["HEARTBEAT", "Claim", "claim_info", "is_stale", "release", "try_claim"]

CLAIM = "claim.json"
#: seconds between the holder's touches of its claim file
HEARTBEAT = 30.0
#: a take-over lock older than this is left over from a crash and removed
_TAKEOVER_STALE = 60.0


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


def _me() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
            "time": time.time()}


def claim_info(path: Path) -> Optional[Dict[str, Any]]:
    """The claim at ``path`` (its JSON plus ``mtime``), {} for an unreadable one, None for none."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    info["mtime"] = mtime
    return info


def is_stale(info: Dict[str, Any], stale_after: Optional[float] = None, now: Optional[float] = None) -> bool:
    """Whether a claim may be taken over (see the module's rule)."""
    now = time.time() if now is None else now
    age = now - float(info.get("mtime", now))
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if info["pid"] == os.getpid() and info.get("started") == _start_time(os.getpid()):
            return True  # our own, left by an earlier attempt in this process
        return not _alive(info["pid"], info.get("started"))
    if "host" not in info:  # half-written or unreadable: its writer may be between create and write
        return age > max(_TAKEOVER_STALE, stale_after or 0)
    return stale_after is not None and age > stale_after


class Claim:
    """A held claim: keeps its file fresh from a background thread until :meth:`release`."""

    def __init__(self, path: Path, heartbeat: float = HEARTBEAT) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        release(self.path)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_me(), f)
    return True


def try_claim(run_dir: str | os.PathLike, stale_after: Optional[float] = None,
              heartbeat: float = HEARTBEAT) -> Optional[Claim]:
    """Claim the run in ``run_dir``: a :class:`Claim` when this process now holds it, None when
    another live holder does."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM
    if _create(path):
        return Claim(path, heartbeat)
    info = claim_info(path)
    if info is not None and not is_stale(info, stale_after):
        return None
    lock = path.with_name(CLAIM + ".takeover")
    if not _create(lock):
        lock_info = claim_info(lock)
        if lock_info is None or time.time() - lock_info.get("mtime", time.time()) <= _TAKEOVER_STALE:
            return None  # someone else is taking it over right now
        release(lock)
        if not _create(lock):
            return None
    try:
        info = claim_info(path)  # again, under the lock: it may have been taken over meanwhile
        if info is not None and not is_stale(info, stale_after):
            return None
        release(path)
        return Claim(path, heartbeat) if _create(path) else None
    finally:
        release(lock)


def release(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
