"""``hymamba forward``: one timed forward pass on a random batch, and what ran."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from hymamba.factory import create_model
from hymamba.ops import last_scan_impl
from hymamba.ops.linear import FastLinear, linear_impl_for

__all__ = ["forward"]


def forward(model_name: str, checkpoint: Optional[str | os.PathLike] = None, batch_size: int = 2,
            size: Optional[Callable[[Sequence[int]], Sequence[int]]] = None, scan_impl: str = "auto",
            linear_impl: str = "auto") -> Dict[str, Any]:
    """Build ``model_name`` (with ``checkpoint``), run a seeded random batch through it, report.

    ``size`` maps the model's input size (H, W) to the size to use (default: unchanged).
    """
    model = create_model(model_name, checkpoint_path=checkpoint, scan_impl=scan_impl, linear_impl=linear_impl).eval()
    default = list(model.pretrained_cfg["input_size"][1:])
    hw = list(size(default)) if size is not None else default
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, *hw)
    with torch.inference_mode():
        start = time.perf_counter()
        feats, stages = model.forward_intermediates(x)
        logits = model.forward_head(feats)
        seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, FastLinear)]
    onednn = sum(linear_impl_for(x.new_empty(1, m.in_features), m.weight, m.impl) == "onednn" for m in layers)
    return {"params": sum(p.numel() for p in model.parameters()), "input": tuple(x.shape),
            "logits": tuple(logits.shape), "seconds": seconds, "scan_impl": last_scan_impl(),
            "linear": len(layers), "onednn_linear": onednn, "stages": [tuple(s.shape) for s in stages],
            "finite": bool(torch.isfinite(logits).all())}
