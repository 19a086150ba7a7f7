"""Process-group helpers: one code path for a single process and for ``torchrun``.

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; then a process group is created (nccl on
CUDA, gloo on CPU) and each process uses its own GPU. Without them everything here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

from hymamba.utils.amp import resolve_device

__all__ = ["Dist", "setup"]


@dataclass
class Dist:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: List[float]) -> List[float]:
        """Sum a list of numbers over all ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_reduce_tensor_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks in place."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()
            self.initialised = False

    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def setup(device: str = "auto") -> Dist:
    """Create the process group when launched by ``torchrun`` and pick this process's device.

    Args:
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
    Returns:
        A :class:`Dist`; call ``close()`` when done.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    d = Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                    device_id=dev if use_cuda else None)
            d.initialised = True
    return d
