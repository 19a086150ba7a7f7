"""Counting multiply-adds the way the paper (and fvcore) counts them.

fvcore traces the model and counts, per operator: convolutions and linear/matmul layers as
multiply-adds, BatchNorm in eval mode as 2 per element (1 without affine), LayerNorm as 5 per
element (4 without affine), adaptive average pooling as 1 per input element. Everything else —
activations, additions, softmax, the fused attention kernel and the selective scan — is not
counted. We reproduce that convention at the ``torch.nn.functional`` level with a
``TorchFunctionMode``, so no tracing or extra dependency is needed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["count_macs"]


def _numel(shape: Tuple[int, ...]) -> int:
    return math.prod(shape)


def _conv(args, kwargs, out) -> int:
    w = args[1] if len(args) > 1 else kwargs["weight"]
    # output elements x (input channels per group x kernel size) multiply-adds each
    return _numel(out.shape) * _numel(w.shape[1:])


def _linear(args, kwargs, out) -> int:
    w = args[1] if len(args) > 1 else kwargs["weight"]
    return _numel(out.shape) * w.shape[1]


def _matmul(args, kwargs, out) -> int:
    return _numel(out.shape) * args[0].shape[-1]


def _batch_norm(args, kwargs, out) -> int:
    weight = kwargs.get("weight", args[3] if len(args) > 3 else None)
    return _numel(args[0].shape) * (2 if weight is not None else 1)


def _layer_norm(args, kwargs, out) -> int:
    weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
    return _numel(args[0].shape) * (5 if weight is not None else 4)


def _adaptive_pool(args, kwargs, out) -> int:
    return _numel(args[0].shape)


_HANDLERS: Dict[Callable, Callable] = {
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.linear: _linear,
    torch.matmul: _matmul,
    torch.bmm: _matmul,
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.adaptive_avg_pool2d: _adaptive_pool,
}


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: Dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        handler = _HANDLERS.get(func)
        if handler is not None:
            n = int(handler(args, kwargs, out))
            self.total += n
            name = getattr(func, "__name__", str(func))
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> Tuple[int, Dict[str, int]]:
    """Multiply-adds of one forward pass of ``model`` on one image of ``input_size``, fvcore-style.

    Args:
        model: any module; it is run once in eval mode on zeros (mode restored afterwards). A
            model on the ``meta`` device is counted without computing anything.
        input_size: (C, H, W).
    Returns:
        (total multiply-adds, per-operator breakdown).
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    counter = _Counter()

    def add_extra(module: nn.Module, args: tuple) -> None:
        n = int(module.extra_macs(args[0]))
        counter.total += n
        counter.by_op[type(module).__name__] = counter.by_op.get(type(module).__name__, 0) + n

    hooks = [m.register_forward_pre_hook(add_extra) for m in model.modules() if callable(getattr(m, "extra_macs", None))]
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return counter.total, counter.by_op


def model_table(pattern: str = "*", flops: bool = True) -> List[Dict[str, Any]]:
    """One row per variant matching ``pattern``: parameters, GMACs at its input size, paper top-1."""
    from hymamba.factory import create_model, list_models
    from hymamba.models.variants import VARIANTS

    rows = []
    for name in list_models(pattern):
        variant = VARIANTS[name]
        with torch.device("meta"):  # shapes only: counting needs no memory and no compute
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, variant.input_size)[0] if flops else None
        rows.append(dict(name=name, official_name=variant.official_name or "-", params=params,
                         gmacs=macs and macs / 1e9, input_size=list(variant.input_size),
                         crop_pct=variant.pretrained_cfg["crop_pct"], top1=variant.top1))
    return rows
