"""Training checkpoints: everything needed to continue a run exactly, in plain tensors and dicts.

A checkpoint loads back with ``torch.load(weights_only=True)`` (no custom classes inside) and is
written atomically (temporary file + ``os.replace``), so a run killed at any moment leaves either
the previous checkpoint or the new one, never a torn file. Its ``model`` / ``model_ema`` entries
make it a valid input for :func:`hymamba.load_checkpoint` (``use_ema=True`` picks the EMA).

A sharded run (``--strategy fsdp``) keeps its model, optimiser and EMA tensors in a folder written
by every process with :mod:`torch.distributed.checkpoint` (:func:`save_sharded`); ``last.pth`` holds
everything else and names that folder (``sharded``, relative to ``last.pth``). The folder is
complete before ``last.pth`` names it, and a folder is never rewritten while a checkpoint names it.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from hymamba.errors import CheckpointError, ConfigError
from hymamba.utils.io import atomic_write
from hymamba.weights.io import read_file, sharded_failure, sharded_reader
from hymamba.weights.metadata import TRAIN_STATE_FORMAT as FORMAT

__all__ = ["FORMAT", "SHARDED_KEYS", "get_rng_state", "load_sharded", "load_train_state", "save_sharded",
           "save_train_state", "set_rng_state"]

#: the entries of a training state that a sharded run saves in its ``sharded/`` folder
SHARDED_KEYS = ("model", "optimizer", "model_ema")


def get_rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's random-number-generator states (python, numpy, torch, CUDA) as plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_train_state(state: Dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a training checkpoint atomically; ``state`` holds only tensors and plain values."""
    p = Path(path)
    atomic_write(p, lambda tmp: torch.save(dict(state, format=FORMAT), tmp))
    return p


def save_sharded(tensors: Dict[str, Any], folder: Path, dist: Any) -> None:
    """Every process writes its shards of ``tensors`` (nested dicts of DTensors and plain values) into
    ``folder`` (collective). A folder of that name left by an earlier, unfinished save is removed first."""
    import shutil

    import torch.distributed.checkpoint as dcp

    if dist.is_main and folder.exists():
        shutil.rmtree(folder)
    dist.barrier()
    dcp.save(tensors, checkpoint_id=str(folder))
    dist.barrier()


def load_sharded(template: Dict[str, Any], folder: Path) -> None:
    """Fill ``template`` (the states of this run's model, optimiser and EMA, sharded or whole) in place
    from a sharded checkpoint folder, resharding for this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if not folder.is_dir():
        raise CheckpointError(f"the sharded training state {folder} is missing (the run's last.pth names it); "
                              "copy the whole output folder, sharded/ included")
    try:
        dcp.load(template, storage_reader=sharded_reader(folder))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps failures in a CheckpointException (a BaseException)
        raise CheckpointError(f"cannot read the sharded training state {folder}: {sharded_failure(e)}; "
                              "resume from another checkpoint of the run (best.pth) or start afresh") from None


#: what the training loop reads back from a checkpoint, and the type each entry must have
_STATE_ENTRIES = {"model": dict, "optimizer": dict, "scheduler": dict, "config": dict, "epoch": int,
                  "batches_done": int, "global_step": int, "history": list, "wall_seconds": (int, float),
                  "world_size": int, "ranks": list}


def load_train_state(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a training checkpoint: a file, or an output folder (its ``last.pth``).

    Raises:
        ConfigError: the path holds no hymamba training checkpoint (nothing there, or plain weights).
        CheckpointError: the file cannot be read (empty, torn, corrupt, foreign objects) or is damaged.
    """
    try:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "last.pth"
        found = p.is_file()
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, an unknown ~user
        raise ConfigError(f"cannot use {str(path)[:200]!r} to resume: {e}") from None
    if not found:
        raise ConfigError(f"nothing to resume at {path}: expected a training output folder holding last.pth, "
                          "or a .pth written by 'hymamba train'")
    state = read_file(p)  # CheckpointError naming the file and what is wrong with it
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{p} is not a hymamba training checkpoint (format {FORMAT}); to fine-tune from plain "
                          "weights use --checkpoint instead of --resume")
    for key, kind in _STATE_ENTRIES.items():
        if key in SHARDED_KEYS and isinstance(state.get("sharded"), str):
            continue  # in the sharded folder, read when the run is set up
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise CheckpointError(f"{p} is a damaged training checkpoint: its {key!r} entry should be {expected}, "
                                  f"found {'nothing' if key not in state else type(value).__name__}; resume from "
                                  "another checkpoint of the run (best.pth) or start afresh")
    state["path"] = str(p)
    return state
