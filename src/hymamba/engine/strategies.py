"""How several processes share a model: the distribution strategies of the training loop.

``ddp`` (the default, and today the only one): every process holds the whole model and optimiser;
gradients are averaged by :class:`torch.nn.parallel.DistributedDataParallel`. A single process
trains the model as it is. A sharded strategy (FSDP2's ``fully_shard``) plugs in here: wrap the
model in :func:`wrap_model` and save/load sharded states.
"""
from __future__ import annotations

from torch import nn

from hymamba.engine.config import STRATEGIES  # the one list (the config checks it without torch)
from hymamba.errors import ConfigError
from hymamba.utils.distributed import Dist

__all__ = ["STRATEGIES", "distribute_norm_statistics", "wrap_model"]


def wrap_model(model: nn.Module, dist: Dist, strategy: str = "ddp") -> nn.Module:
    """The module the loop calls: ``model`` itself in one process, else wrapped by ``strategy``."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not dist.enabled:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def distribute_norm_statistics(model: nn.Module, dist: Dist) -> None:
    """Average BatchNorm running statistics over processes (so every rank evaluates the same model)."""
    from timm.utils import distribute_bn

    if dist.enabled:
        distribute_bn(model, dist.world_size, reduce=True)
