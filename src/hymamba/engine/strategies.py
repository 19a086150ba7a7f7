"""How several processes share a model: the distribution strategies of the training loop.

- **one process** (whatever the strategy): the model as it is.
- ``ddp`` (the default): every process holds the whole model and optimiser;
  :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients. Training checkpoints
  are one file (``last.pth``) written by rank 0.
- ``fsdp``: PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`). Parameters, gradients and
  optimiser state are sharded over the processes, each holding 1/N of them: one unit per block
  (``ConvBlock``, ``Block``) and the root (stem, downsampling, norms, heads). A unit's parameters are gathered just before its forward and
  backward and freed after, so a process holds whole only the block it is running. Training
  checkpoints are sharded (:mod:`torch.distributed.checkpoint`: every process writes its own
  shards into ``sharded/<position>/``; ``last.pth`` holds the rest and names that folder); they
  resume on any number of processes, and read back whole wherever weights are read
  (:func:`hymamba.load_checkpoint`, ``hymamba validate``, ``hymamba convert``).

Mixed precision under ``fsdp``: parameters are stored, gathered and updated in float32 and
gradients are reduce-scattered in float32; the compute runs under the loop's autocast, exactly as
with ``ddp``. (FSDP2's bfloat16 parameter policy is not used: BatchNorm keeps float32 running
statistics, CPU LayerNorm refuses bfloat16 weights with float32 inputs, and the selective scan's
``A_log``, ``D`` and ``dt`` parameters are the ones Mamba keeps in float32.)

Evaluation under ``fsdp`` gathers every unit once for the whole evaluation (processes evaluate
different numbers of batches, and a sharded forward would wait for the others), so evaluation
holds the whole model's parameters, as ``ddp`` always does. Activation checkpointing
(``grad_checkpointing``) works with both strategies.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Dict, Iterator, List, Tuple

import torch
from torch import nn

from hymamba.engine.config import STRATEGIES  # the one list (the config checks it without torch)
from hymamba.errors import ConfigError
from hymamba.utils.distributed import Dist

__all__ = ["STRATEGIES", "Strategy", "distribute_norm_statistics", "make_strategy", "set_grad_checkpointing"]


class Strategy:
    """One process: the model as it is, checkpoints in one file."""

    #: True when the model's and the optimiser's tensors are saved by every process (sharded)
    sharded = False

    def __init__(self, dist: Dist, asked: str = "ddp") -> None:
        self.dist, self.asked = dist, asked

    def describe(self) -> str:
        return " (one process: fsdp has nothing to shard; launch with torchrun)" if self.asked == "fsdp" else ""

    def start_equal(self, model: nn.Module) -> None:
        """Give every process rank 0's parameters and buffers (each built its model with its own seed).
        Before anything copies the model (the EMA) or shards it (FSDP keeps each rank's own shard)."""
        if self.dist.enabled:
            import torch.distributed as torch_dist

            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    torch_dist.broadcast(t.data, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls for training (may change ``model`` in place)."""
        return model

    def follow(self, module: nn.Module) -> None:
        """Distribute a copy of the model that is updated alongside it (the EMA) the same way."""

    def no_sync(self, wrapped: nn.Module) -> ContextManager:
        """A context for micro-batches whose gradients are accumulated, not yet averaged."""
        return nullcontext()

    def evaluating(self, module: nn.Module) -> ContextManager:
        """A context in which each process may run ``module`` on its own number of batches."""
        return nullcontext()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        return optimizer.state_dict()

    def full_state_dict(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """Every tensor of ``module`` whole, on rank 0 (collective; other ranks get an empty dict)."""
        return module.state_dict() if self.dist.is_main else {}

    def replicated(self, module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
        """The tensors every process holds whole (what should be identical on all ranks)."""
        return list(module.state_dict().items())


class DDPStrategy(Strategy):
    """Replicated model, gradients averaged by DistributedDataParallel."""

    def describe(self) -> str:
        return " (DDP)"

    def wrap(self, model: nn.Module) -> nn.Module:
        device = self.dist.device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, wrapped: nn.Module) -> ContextManager:
        return wrapped.no_sync()


def _units(model: nn.Module) -> List[nn.Module]:
    """The modules FSDP shards one by one: every block (convolutional, Mamba or attention)."""
    from hymamba.models.layers import Block, ConvBlock

    return [m for m in model.modules() if isinstance(m, (Block, ConvBlock))]


class FSDPStrategy(Strategy):
    """FSDP2: parameters, gradients and optimiser state sharded per block (see the module docstring)."""

    sharded = True

    def describe(self) -> str:
        return f" (FSDP: parameters, gradients and optimiser state sharded over {self.dist.world_size} processes)"

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for unit in _units(module):
            fully_shard(unit, mp_policy=policy)
        fully_shard(module, mp_policy=policy)

    def wrap(self, model: nn.Module) -> nn.Module:
        self._shard(model)
        return model

    def follow(self, module: nn.Module) -> None:
        self._shard(module)

    def no_sync(self, wrapped: nn.Module) -> ContextManager:
        return _gradient_sync_off(wrapped)

    def evaluating(self, module: nn.Module) -> ContextManager:
        return _gathered(module)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer)

    def full_state_dict(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.dist.is_main else {}

    def replicated(self, module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
        from torch.distributed.tensor import DTensor

        return [(k, v) for k, v in module.state_dict().items() if not isinstance(v, DTensor)]


@contextmanager
def _gradient_sync_off(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextmanager
def _gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``model`` gathered whole (one collective each, the same on every rank) and kept
    so until the end: the forwards inside need no communication."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    inner = [m for m in units if m is not model]  # (FSDP never reshards the root after forward)
    for m in units:
        m.unshard()
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)  # as fully_shard left them
        for m in units:
            m.reshard()


def make_strategy(name: str, dist: Dist) -> Strategy:
    """The strategy called ``name`` for this process (one process: the model as it is, whatever the name)."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if not dist.enabled:
        return Strategy(dist, name)
    return {"ddp": DDPStrategy, "fsdp": FSDPStrategy}[name](dist, name)


def set_grad_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass: on the model, or its backbone (the first module that
    offers ``set_grad_checkpointing``)."""
    for m in model.modules():
        if callable(getattr(m, "set_grad_checkpointing", None)):
            m.set_grad_checkpointing(True)
            return
    raise ConfigError(f"grad_checkpointing was asked for, but {type(model).__name__} has no module that supports "
                      "it (set_grad_checkpointing); train without --grad-checkpointing")


def distribute_norm_statistics(model: nn.Module, dist: Dist) -> None:
    """Average BatchNorm running statistics over processes (so every rank evaluates the same model)."""
    from timm.utils import distribute_bn

    if dist.enabled:
        distribute_bn(model, dist.world_size, reduce=True)
