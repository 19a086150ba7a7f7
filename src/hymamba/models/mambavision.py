"""MambaVision: a hybrid Mamba-Transformer vision backbone.

Paper: Hatamizadeh & Kautz, "MambaVision: A Hybrid Mamba-Transformer Vision Backbone", CVPR 2025
(arXiv:2407.08083). Official code: NVlabs/MambaVision (CUDA only). This is an independent
re-implementation that keeps the official state-dict names, so the released checkpoints load with
``strict=True``, and reproduces the official numerics (quirks included, each marked ``Quirk``).

The model reads top to bottom like the paper's figure:
stem (two stride-2 convs) -> levels 0-1 (residual conv blocks) -> levels 2-3 (windowed token blocks:
MambaVision mixers first, self-attention in the last half) -> BatchNorm -> pool -> linear head.
The blocks are in :mod:`hymamba.models.layers`, the variants in :mod:`hymamba.models.variants`; the
timm registration (which can load weights) is in :mod:`hymamba.factory`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices

from hymamba.errors import ConfigError
from hymamba.models.layers import (Block, ConvBlock, Downsample, MambaVisionMixer, PatchEmbed, conv_layout,
                                   set_linear_impl, set_scan_impl, window_partition, window_reverse)
from hymamba.models.options import attention_block_indices, check_option
from hymamba.ops import check_scan_impl
from hymamba.ops.linear import FastLinear

__all__ = ["MambaVision", "MambaVisionLayer"]


# ----------------------------------------------------------------------------------------------
# levels and model


class MambaVisionLayer(nn.Module):
    """One level: conv blocks (levels 0-1) or windowed token blocks (levels 2-3), then downsample.

    ``forward`` returns the level output *before* the downsample; ``downsample`` is applied by the
    model, so that stage features for dense tasks come for free.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        conv: bool,
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Any = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        layer_scale: Optional[float] = None,
        layer_scale_conv: Optional[float] = None,
        scan_impl: str = "auto",
        mixer_variant: str = "concat",
        attention_pattern: str = "last_half",
    ) -> None:
        super().__init__()
        dpr = list(drop_path) or [0.0] * depth
        self.conv = conv
        self.window_size = window_size
        self.grad_checkpointing = False
        if conv:
            self.blocks = nn.ModuleList(ConvBlock(dim, dpr[i], layer_scale_conv) for i in range(depth))
        else:
            attn = set(attention_block_indices(depth, attention_pattern))
            self.blocks = nn.ModuleList(
                Block(dim, num_heads, i in attn, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, dpr[i],
                      layer_scale, scan_impl, mixer_variant)
                for i in range(depth)
            )
        self.downsample = Downsample(dim) if downsample else None

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if self.conv:
            return self._run_blocks(x)
        b, _, h, w = x.shape
        ws = self.window_size
        # whole windows: (h + ws - 1) // ws * ws, which torch.export can reason about symbolically
        hp, wp = (h + ws - 1) // ws * ws, (w + ws - 1) // ws * ws
        exporting = _is_exporting()
        # The padded zeros are ordinary tokens (no mask), exactly as in the official model. Under
        # export the pad and crop are always in the graph (by 0 where nothing is padded), so that
        # one exported graph serves every input size.
        if exporting or hp != h or wp != w:
            x = F.pad(x, (0, wp - w, 0, hp - h))
        if exporting:  # plain NCHW strides: reshaping channels-last strides makes export guard on sizes
            x = x.contiguous()
        x = window_reverse(self._run_blocks(window_partition(x, ws)), ws, hp, wp, b)
        if exporting:  # index_select, not a slice: a slice's end is a bound torch.export guards on
            rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
            return x.index_select(2, rows).index_select(3, cols)
        if hp != h or wp != w:
            x = x[:, :, :h, :w].contiguous()
        return x


# torch.compiler.is_exporting appeared in torch 2.6 (the same fallback as hymamba.ops.dispatch)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


class MambaVision(nn.Module):
    """MambaVision backbone and classifier (official constructor arguments and state-dict names).

    Args:
        dim: width of level 0 (doubles at each level).
        in_dim: width of the stem's first conv.
        depths: blocks per level (4 levels).
        window_size: window side per level (used by levels 2-3).
        mlp_ratio: MLP hidden width / block width.
        num_heads: attention heads per level.
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        qkv_bias: bias in the attention's qkv projection.
        qk_scale: official quirk: a truthy value adds q/k LayerNorms.
        drop_rate: dropout in MLPs and the attention projection (as the official model; there is no
            dropout before the classifier).
        attn_drop_rate: attention dropout (training only).
        layer_scale: layer-scale init for token blocks (None: no gamma).
        layer_scale_conv: layer-scale init for conv blocks (None: no gamma).
        global_pool: 'avg' or '' (no pooling in forward_head).
        scan_impl: selective-scan implementation ('auto', 'fast', 'reference', 'cpu', 'mamba_ssm').
        linear_impl: linear-layer implementation ('auto': oneDNN on CPU float32 where it is
            faster, else ``F.linear``; 'torch': stock layers; 'onednn').
        mixer_variant: the paper's token-mixer ablation (:data:`MIXER_VARIANTS`; the official
            model is 'concat').
        attention_pattern: the paper's hybrid-pattern ablation: where attention blocks go in
            levels 2-3 (:data:`ATTENTION_PATTERNS`; the official model is 'last_half').
        ssm_init: initialisation of a fresh model's SSM parameters: 'official' (as the official
            model: dt_proj initialised like every Linear) or 'mamba' (Mamba's dt_proj init).
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        depths: Sequence[int],
        window_size: Sequence[int],
        mlp_ratio: float,
        num_heads: Sequence[int],
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        num_classes: int = 1000,
        qkv_bias: bool = True,
        qk_scale: Any = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        layer_scale: Optional[float] = None,
        layer_scale_conv: Optional[float] = None,
        global_pool: str = "avg",
        scan_impl: str = "auto",
        linear_impl: str = "auto",
        mixer_variant: str = "concat",
        attention_pattern: str = "last_half",
        ssm_init: str = "official",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_config(depths, window_size, num_heads, global_pool, kwargs)
        check_option("mixer_variant", mixer_variant)
        check_option("attention_pattern", attention_pattern)
        check_scan_impl(scan_impl)
        check_option("ssm_init", ssm_init)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = int(dim * 2 ** (len(depths) - 1))
        self.patch_embed = PatchEmbed(in_chans, in_dim, dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.levels = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        for i, depth in enumerate(depths):
            width = int(dim * 2**i)
            self.levels.append(
                MambaVisionLayer(
                    width, depth, num_heads[i], window_size[i], conv=i < 2, downsample=i < 3,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[i].tolist(), layer_scale=layer_scale,
                    layer_scale_conv=layer_scale_conv, scan_impl=scan_impl, mixer_variant=mixer_variant,
                    attention_pattern=attention_pattern,
                )
            )
            self.feature_info.append(dict(num_chs=width, reduction=4 * 2**i, module=f"levels.{i}"))
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = FastLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # As the official constructor: every Linear (dt_proj too) truncated normal std 0.02, then
        # with ssm_init="mamba" Mamba's dt_proj init on top.
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, MambaVisionMixer):
                m.reset_ssm_parameters(ssm_init)
        self.set_linear_impl(linear_impl)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- scan implementation -----------------------------------------------------------------

    def set_scan_impl(self, impl: str) -> None:
        """Choose the selective-scan implementation of every mixer ('auto', 'fast', ...)."""
        set_scan_impl(self, impl)

    def set_linear_impl(self, impl: str) -> None:
        """Choose how the token levels' and the head's linear layers run ('auto', 'torch', 'onednn')."""
        self.linear_impl = set_linear_impl(self, impl)

    # -- timm model contract -----------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay: the SSM's A_log and D."""
        return {n for n, _ in self.named_parameters() if n.endswith(("mixer.A_log", "mixer.D"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise LR decay (stem, then blocks, then head)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)" if coarse else [
                (r"^levels\.(\d+)\.downsample", (0,)),
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a freshly initialised one with ``num_classes`` outputs."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ConfigError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        ref = next(self.patch_embed.parameters())
        self.head = FastLinear(self.num_features, num_classes, impl=self.linear_impl, device=ref.device,
                               dtype=ref.dtype) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stage outputs (before each downsample).

        Args:
            x: images (B, C, H, W).
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: apply the final BatchNorm to the last stage's intermediate.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the intermediates.
        Returns:
            The intermediates, or (final features after the norm, intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.levels), indices)
        last = max_index if stop_early or intermediates_only else len(self.levels) - 1
        intermediates = []
        x = self.patch_embed(conv_layout(x))
        for i, level in enumerate(self.levels[: last + 1]):
            x = level(x)
            if i in take:
                feat = self.norm(x) if norm and i == len(self.levels) - 1 else x
                intermediates.append(feat.contiguous() if output_fmt == "NCHW" else feat.permute(0, 2, 3, 1))
            if level.downsample is not None and i < last:
                x = level.downsample(conv_layout(x))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the levels (and optionally the norm and head) not needed for ``indices``."""
        take, max_index = feature_take_indices(len(self.levels), indices)
        self.levels = self.levels[: max_index + 1]
        if max_index < 3:
            self.levels[-1].downsample = None
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head or max_index < 3:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> unpooled features after the final norm (B, num_features, H/32, W/32)."""
        x = self.patch_embed(conv_layout(x))
        for level in self.levels:
            x = level(x)
            if level.downsample is not None:
                x = level.downsample(conv_layout(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(depths: Sequence[int], window_size: Sequence[int], num_heads: Sequence[int],
                  global_pool: str, extra: Dict[str, Any]) -> None:
    if len(depths) != 4:
        raise ConfigError(f"MambaVision has 4 levels: depths needs 4 entries, got {list(depths)}")
    for name, value in (("window_size", window_size), ("num_heads", num_heads)):
        if len(value) != 4:
            raise ConfigError(f"{name} needs one entry per level (4), got {list(value)}")
    if global_pool not in ("avg", ""):
        raise ConfigError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    # The official constructor swallows **kwargs; we accept the keys its configs carry and
    # reject anything else so typos do not pass silently.
    unknown = set(extra) - _OFFICIAL_EXTRA_KEYS
    if unknown:
        raise TypeError(f"MambaVision got unexpected arguments {sorted(unknown)}")


# keys that official configs / timm's builder may hand to the constructor and that do not matter here
_OFFICIAL_EXTRA_KEYS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "resolution", "model_path",
                        "cache_dir", "mean", "std", "crop_pct", "crop_mode", "id2label", "label2id"}
