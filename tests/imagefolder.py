"""Helpers for the training tests: small real image folders on disk and the CLI as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("apple", "banana", "cherry")
_COLOURS = {"apple": (200, 40, 40), "banana": (220, 210, 60), "cherry": (120, 20, 90)}


def make_image_folder(root: Path, per_class: Dict[str, int], size: int = 40, corrupt: bool = True,
                      seed: int = 0, classes: Sequence[str] = CLASSES) -> Path:
    """Write ``root/<class>/*.png|jpg``: a class colour plus noise and a bright square (learnable).

    With ``corrupt``, one file per folder root (in the first class) is not an image at all and one
    is a truncated PNG.
    """
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(_COLOURS.get(name, (60 * ci % 255, 90, 160)), dtype=np.float32)
        for i in range(per_class.get(name, 0)):
            img = base + rng.normal(0, 25, (size, size, 3))
            y, x = rng.integers(0, size // 2, 2)
            img[y:y + size // 3, x:x + size // 3] = 255 - base
            pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
            if i % 2:
                pil.save(folder / f"{i:03d}.jpg", quality=90)
            else:
                pil.save(folder / f"{i:03d}.png")
    if corrupt:
        first = root / classes[0]
        (first / "zz_not_an_image.jpg").write_bytes(b"this is not a JPEG file at all")
        good = next(first.glob("*.png")).read_bytes()
        (first / "zz_truncated.png").write_bytes(good[: len(good) // 3])
    (root / classes[0] / "notes.txt").write_text("ignored: not an image")
    return root


def make_dataset(root: Path, train: int = 12, val: int = 4, size: int = 40, corrupt: bool = True,
                 classes: Sequence[str] = CLASSES) -> Path:
    """``root/train`` and ``root/val`` with ``train``/``val`` images per class (+2 corrupt files each)."""
    make_image_folder(root / "train", {c: train for c in classes}, size, corrupt, seed=1, classes=classes)
    make_image_folder(root / "val", {c: val for c in classes}, size, corrupt, seed=2, classes=classes)
    return root


def cli_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", **(extra or {}))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(*args: str, cwd: Optional[Path] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m hymamba.cli ARGS`` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "hymamba.cli", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=cwd, timeout=timeout)


def popen_cli(*args: str, cwd: Optional[Path] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hymamba.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd)


#: flags for a tiny, fast, deterministic training run (test model, 32px, no data-loader workers)
TINY = ("--model", "test_mambavision", "--input-size", "32", "--batch-size", "4", "--workers", "0",
        "--warmup-epochs", "0", "--cooldown-epochs", "0", "--quiet")


def wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the CSV at ``path`` has ``n`` data rows (a running training's metrics.csv)."""
    import csv
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            with open(path, newline="") as f:
                if len(list(csv.DictReader(f))) >= n:
                    return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    raise AssertionError("training too slow")


def killed_and_uninterrupted(command: Sequence[str], flags: Sequence[str], root: Path) -> tuple:
    """Train ``command`` (e.g. ``("segment", "train")``) with ``flags`` twice: once uninterrupted,
    once SIGKILLed after its first epoch's metrics row and resumed with ``--resume``. Returns the two
    runs' ``metrics.csv`` rows ``(resumed, uninterrupted)``."""
    import csv
    import signal

    def rows(path: Path) -> list:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    ref = root / "uninterrupted"
    done = run_cli(*command, *flags, "--output", str(ref))
    assert done.returncode == 0, done.stderr[-3000:]
    out = root / "killed"
    proc = popen_cli(*command, *flags, "--output", str(out))
    wait_for_rows(out / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    resumed = run_cli(*command, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return rows(out / "metrics.csv"), rows(ref / "metrics.csv")
