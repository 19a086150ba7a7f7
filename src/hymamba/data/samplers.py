"""Samplers: the training order (seeded per epoch, sharded over processes, resumable mid-epoch)
and the evaluation order (every sample exactly once over all processes). Task-agnostic."""
from __future__ import annotations

import math
from typing import Iterator, List

import torch
from torch.utils.data import Sampler

from hymamba.errors import ConfigError

__all__ = ["EpochSampler", "ShardSampler"]


class EpochSampler(Sampler[int]):
    """Training order: a permutation seeded by (seed, epoch), sharded over ranks.

    Like :class:`torch.utils.data.DistributedSampler` (the shards are disjoint and equally long,
    padded by wrapping around), but usable without a process group and able to skip the samples
    already consumed in an interrupted epoch, so a resumed run sees the same order.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.size, self.num_replicas, self.rank, self.seed, self.shuffle = size, num_replicas, rank, seed, shuffle
        self.per_rank = math.ceil(size / num_replicas)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the order of ``epoch`` and leave out this rank's first ``skip`` samples."""
        self.epoch, self.skip = epoch, skip

    def shard(self) -> List[int]:
        """This rank's indices for the current epoch (before skipping)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / max(1, self.size)))[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip


class ShardSampler(Sampler[int]):
    """Evaluation order: every sample exactly once over all ranks (rank r takes r, r+W, ...)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
