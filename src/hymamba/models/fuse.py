"""Inference-time rewrites that keep the outputs (to float rounding): BatchNorm folding, packed weights.

In eval mode a BatchNorm after a convolution is a per-channel affine map, so it folds into the
convolution's weight and bias; a ConvBlock's layer-scale ``gamma`` folds the same way. What
remains is the same function with fewer passes over memory.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from hymamba.models.layers import ConvBlock
from hymamba.models.mambavision import MambaVision
from hymamba.ops.linear import FastLinear

__all__ = ["optimize_for_inference", "fold_batchnorm"]


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d, scale: torch.Tensor | None = None) -> nn.Conv2d:
    """A conv computing ``scale * bn(conv(x))`` (eval-mode BN) in one layer.

    Args:
        conv: the convolution (bias optional).
        bn: the BatchNorm that follows it.
        scale: an optional extra per-channel factor (layer scale).
    Returns:
        A new ``nn.Conv2d`` with a bias.
    """
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    factor = bn.weight.double() / std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    shift = (bias - bn.running_mean.double()) * factor + bn.bias.double()
    if scale is not None:
        factor, shift = factor * scale.double(), shift * scale.double()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight.double() * factor.view(-1, 1, 1, 1))
    fused.bias.copy_(shift)
    return fused


@torch.no_grad()
def optimize_for_inference(model: MambaVision, channels_last: bool = False, prepack: bool = True) -> MambaVision:
    """A copy of ``model`` for inference: eval mode, BatchNorms folded into the convolutions.

    Args:
        model: a MambaVision (left unchanged).
        channels_last: also convert the copy to ``torch.channels_last`` memory format.
        prepack: let the linear layers that run through oneDNN (CPU, float32) keep a copy of
            their weight in oneDNN's blocked layout (faster; the weights take twice the memory).
    Returns:
        The optimised copy; its outputs equal the original's within float32 rounding.
    """
    if not isinstance(model, MambaVision):
        raise TypeError(f"optimize_for_inference expects a hymamba MambaVision, got {type(model).__name__}")
    out = copy.deepcopy(model).eval()
    stem = out.patch_embed.conv_down
    for conv_idx, bn_idx in ((0, 1), (3, 4)):
        stem[conv_idx] = fold_batchnorm(stem[conv_idx], stem[bn_idx])
        stem[bn_idx] = nn.Identity()
    for module in out.modules():
        if isinstance(module, ConvBlock):
            module.conv1 = fold_batchnorm(module.conv1, module.norm1)
            module.conv2 = fold_batchnorm(module.conv2, module.norm2, module.gamma)
            module.norm1, module.norm2, module.gamma = nn.Identity(), nn.Identity(), None
    for module in out.modules():
        if isinstance(module, FastLinear):
            module.prepacked = prepack
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    return out
