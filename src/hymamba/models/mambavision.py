"""MambaVision: a hybrid Mamba-Transformer vision backbone.

Paper: Hatamizadeh & Kautz, "MambaVision: A Hybrid Mamba-Transformer Vision Backbone", CVPR 2025
(arXiv:2407.08083). Official code: NVlabs/MambaVision (CUDA only). This is an independent
re-implementation that keeps the official state-dict names, so the released checkpoints load with
``strict=True``, and reproduces the official numerics (quirks included, each marked ``Quirk``).

The model reads top to bottom like the paper's figure:
stem (two stride-2 convs) -> levels 0-1 (residual conv blocks) -> levels 2-3 (windowed token blocks:
MambaVision mixers first, self-attention in the last half) -> BatchNorm -> pool -> linear head.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from hymamba.ops import selective_scan
from hymamba.ops.linear import LINEAR_IMPLS, FastLinear, gelu_linear, layer_norm_linear

__all__ = ["MambaVision", "MambaVisionMixer", "Attention", "Block", "ConvBlock", "MambaVisionLayer"]


# ----------------------------------------------------------------------------------------------
# helpers


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a feature map into non-overlapping windows of tokens.

    Args:
        x: (B, C, H, W) with H and W multiples of ``window_size``.
    Returns:
        (B * H/ws * W/ws, ws*ws, C): windows row-major, tokens row-major inside each window.
    """
    b, c, h, w = x.shape
    x = x.view(b, c, h // window_size, window_size, w // window_size, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW, ws*ws, C) -> (B, C, H, W)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h, w)


def conv_layout(x: torch.Tensor) -> torch.Tensor:
    """The activation layout the convolutions run fastest in: NHWC strides ('channels_last') on CPU.

    oneDNN computes convolutions in NHWC; given NCHW activations it reorders them on every call,
    forward and backward. Same values, different strides; the weights keep their layout.
    """
    if x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# ----------------------------------------------------------------------------------------------
# stem, downsample, conv block


class PatchEmbed(nn.Module):
    """Stem: two 3x3 stride-2 convs with BatchNorm (eps 1e-4) and ReLU; H x W -> H/4 x W/4."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96) -> None:
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x)


class Downsample(nn.Module):
    """3x3 stride-2 conv that doubles the width. No norm: the official weights have none."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


class ConvBlock(nn.Module):
    """Residual block: conv3x3 -> BN -> GELU(tanh) -> conv3x3 -> BN [-> gamma] -> + input."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: Optional[float] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if _is_number(layer_scale) else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


# ----------------------------------------------------------------------------------------------
# token mixers


MIXER_VARIANTS = ("concat", "gated", "regular_conv", "causal_conv")


class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer: an SSM branch and a symmetric conv branch, concatenated.

    in_proj splits the C channels into x and z (C/2 each); both go through a regular (non-causal)
    depthwise conv1d and SiLU; x then goes through the selective scan; out_proj mixes [y, z].

    ``variant`` selects the paper's token-mixer ablation (the official model is ``"concat"``):

    * ``"causal_conv"``: Mamba's own formulation: causal conv on x, no conv on z, output gated
      ``y * silu(z)``, out_proj C/2 -> C;
    * ``"regular_conv"``: the same with a regular (non-causal) conv;
    * ``"gated"``: the symmetric branch (conv + SiLU on z) but Mamba's gating ``y * z``;
    * ``"concat"``: the symmetric branch concatenated with y (MambaVision).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 8,
        d_conv: int = 3,
        expand: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_impl: str = "auto",
        variant: str = "concat",
    ) -> None:
        super().__init__()
        if variant not in MIXER_VARIANTS:
            raise ValueError(f"mixer variant must be one of {MIXER_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_impl = scan_impl
        half = self.d_inner // 2
        self.in_proj = FastLinear(d_model, self.d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        gated = variant != "concat"  # y * gate: out_proj reads C/2 channels
        self.out_proj = FastLinear(half if gated else self.d_inner, d_model, bias=False)
        # The official code writes bias=conv_bias//2 with conv_bias=True, i.e. no bias.
        self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        if variant in ("concat", "gated"):  # the symmetric branch
            self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of the SSM parameters (A_log = log(1..N), D = 1, dt_proj)."""
        dt_min, dt_max, floor = self._dt_init
        half = self.d_inner // 2
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D.fill_(1.0)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(half) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def extra_macs(self, hidden_states: torch.Tensor) -> int:
        """Multiply-adds of the depthwise convs, which FLOP counters cannot see as convolutions."""
        b, length, _ = hidden_states.shape
        channels = self.d_inner if self.variant in ("concat", "gated") else self.d_inner // 2
        return b * length * channels * self.conv1d_x.kernel_size[0]

    def forward(self, hidden_states: torch.Tensor, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """(B, L, C) -> (B, L, C); ``norm`` (the block's pre-norm) is applied first when given.

        Computed token-major, (B, L, C), so that no activation is transposed in memory: the two
        depthwise 'same' convs along L run as one set of shifted multiply-adds over all C channels
        (what a k=3 depthwise conv is, without the conv kernel's layout changes), and the scan
        reads its inputs through strided (B, C/2, L) views. Same maths as the official
        per-branch code.
        """
        half = self.d_inner // 2
        xz = self.in_proj(hidden_states) if norm is None else \
            layer_norm_linear(hidden_states, norm, self.in_proj, self.in_proj.impl)  # (B, L, C)
        if self.variant in ("concat", "gated"):
            conv_w = torch.cat([self.conv1d_x.weight, self.conv1d_z.weight], dim=0)[:, 0]  # (C, d_conv)
            xz = F.silu(depthwise_conv_same(xz, conv_w))  # (B, L, C)
            x, z = xz[..., :half], xz[..., half:]  # (B, L, C/2) each
        else:  # Mamba's formulation: conv on x only (causal or not), z a plain SiLU gate
            causal = self.variant == "causal_conv"
            x = F.silu(depthwise_conv_same(xz[..., :half], self.conv1d_x.weight[:, 0], causal=causal))
            z = F.silu(xz[..., half:])
        x_dbl = F.linear(x, self.x_proj.weight)  # (B, L, dt_rank + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # Quirk: dt_proj applies its bias here and the scan adds it again as delta_bias; the
        # released weights were trained that way.
        delta = self.dt_proj(dt)  # (B, L, C/2)
        y = selective_scan(
            x.transpose(1, 2),
            delta.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            b.transpose(1, 2),
            c.transpose(1, 2),
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            impl=self.scan_impl,
        )  # (B, C/2, L)
        y = y.transpose(1, 2).to(z.dtype)
        if self.variant != "concat":
            return self.out_proj(y * z)
        return self.out_proj(torch.cat([y, z], dim=-1))


def depthwise_conv_same(x: torch.Tensor, weight: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Depthwise 1-D convolution along L with 'same' zero padding, no bias, token-major.

    Args:
        x: (B, L, C).
        weight: (C, K): the kernel of each channel (``conv.weight[:, 0]``).
        causal: pad K-1 zeros on the left only (each output sees itself and earlier tokens).
    Returns:
        (B, L, C), equal to ``F.conv1d(x^T, weight[:, None], padding='same', groups=C)^T``
        (causal: ``F.conv1d(F.pad(x^T, (K-1, 0)), weight[:, None], groups=C)^T``).
    """
    k = weight.shape[1]
    # torch's 'same': the extra pad of an even kernel goes right; causal: everything left
    left = k - 1 if causal else (k - 1) // 2
    length = x.shape[1]
    out = x * weight[:, left]
    for j in range(k):
        shift = j - left  # out[t] += w[j] * x[t + shift]
        if j == left or abs(shift) >= length:
            continue
        if shift < 0:
            out[:, -shift:] += x[:, :shift] * weight[:, j]
        else:
            out[:, :-shift] += x[:, shift:] * weight[:, j]
    return out


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of one window."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} must be divisible by num_heads, got num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = FastLinear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = FastLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); ``norm`` (the block's pre-norm) is applied first when given."""
        b, n, c = x.shape
        qkv = self.qkv(x) if norm is None else layer_norm_linear(x, norm, self.qkv, self.qkv.impl)
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # The official code passes the dropout rate even in eval mode; apply it only in training.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's ``Mlp`` layout and parameter names).

    Without dropout, training recomputes the GELU in backward instead of keeping its output
    (:func:`hymamba.ops.linear.gelu_linear`): less memory, same gradients.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = FastLinear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = FastLinear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); ``norm`` (the block's pre-norm) is applied first when given."""
        h = self.fc1(x) if norm is None else layer_norm_linear(x, norm, self.fc1, self.fc1.impl)
        if self.drop1.p == 0.0 or not self.training:  # the released models use no MLP dropout
            return self.drop2(gelu_linear(h, self.fc2, self.fc2.impl))
        return self.drop2(self.fc2(self.drop1(self.act(h))))


class Block(nn.Module):
    """Pre-norm token block: x += gamma_1 * mixer(norm1(x)); x += gamma_2 * mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        use_attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Any = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: Optional[float] = None,
        scan_impl: str = "auto",
        mixer_variant: str = "concat",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if use_attention:
            # Quirk: the official code hands `qk_scale` to the attention as `qk_norm`, so a truthy
            # value adds LayerNorms on q and k (the released models use None).
            self.mixer: nn.Module = Attention(dim, num_heads, qkv_bias, bool(qk_scale), attn_drop, drop)
        else:
            self.mixer = MambaVisionMixer(dim, d_state=8, d_conv=3, expand=1, scan_impl=scan_impl,
                                          variant=mixer_variant)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        use_ls = _is_number(layer_scale)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the norms are handed to the next layer, which recomputes them in backward instead of
        # keeping their outputs (hymamba.ops.linear.layer_norm_linear); same maths
        y = self.mixer(x, self.norm1)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(x, self.norm2)
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


ATTENTION_PATTERNS = ("last_half", "first_half", "interleave", "mamba_only", "attention_only")
#: constructor options of the ablations, stored beside trained weights (model.json)
ABLATION_OPTIONS = ("mixer_variant", "attention_pattern")


def attention_block_indices(depth: int, pattern: str = "last_half") -> List[int]:
    """Which blocks of a token level are self-attention.

    ``"last_half"`` (the official model): the last ``depth // 2`` blocks, mixers first. The
    paper's hybrid-pattern ablation: ``"first_half"`` (as many attention blocks, first),
    ``"interleave"`` (every second block, starting with a mixer), ``"mamba_only"`` (all mixers),
    ``"attention_only"`` (all attention).
    """
    n = depth // 2
    patterns = {
        "last_half": range(depth - n, depth),
        "first_half": range(n),
        "interleave": range(1, depth, 2),
        "mamba_only": range(0),
        "attention_only": range(depth),
    }
    if pattern not in patterns:
        raise ValueError(f"attention_pattern must be one of {ATTENTION_PATTERNS}, got {pattern!r}")
    return list(patterns[pattern])


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
        _, _, h, w = x.shape
        ws = self.window_size
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        # The padded zeros are ordinary tokens (no mask), exactly as in the official model.
        if pad_r or pad_b:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        x = window_reverse(self._run_blocks(window_partition(x, ws)), ws, hp, wp)
        if pad_r or pad_b:
            x = x[:, :, :h, :w].contiguous()
        return x


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
        drop_rate: dropout in MLPs and attention projection.
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
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_config(depths, window_size, num_heads, global_pool, kwargs)
        if mixer_variant not in MIXER_VARIANTS:
            raise ValueError(f"mixer_variant must be one of {MIXER_VARIANTS}, got {mixer_variant!r}")
        if attention_pattern not in ATTENTION_PATTERNS:
            raise ValueError(f"attention_pattern must be one of {ATTENTION_PATTERNS}, got {attention_pattern!r}")
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
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, MambaVisionMixer):
                m.reset_ssm_parameters()
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
        for m in self.modules():
            if isinstance(m, MambaVisionMixer):
                m.scan_impl = impl

    def set_linear_impl(self, impl: str) -> None:
        """Choose how the token levels' and the head's linear layers run ('auto', 'torch', 'onednn')."""
        if impl not in LINEAR_IMPLS:
            raise ValueError(f"linear_impl must be one of {LINEAR_IMPLS}, got {impl!r}")
        self.linear_impl = impl
        for m in self.modules():
            if isinstance(m, FastLinear):
                m.impl = impl

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
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
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
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
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
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(depths: Sequence[int], window_size: Sequence[int], num_heads: Sequence[int],
                  global_pool: str, extra: Dict[str, Any]) -> None:
    if len(depths) != 4:
        raise ValueError(f"MambaVision has 4 levels: depths needs 4 entries, got {list(depths)}")
    for name, value in (("window_size", window_size), ("num_heads", num_heads)):
        if len(value) != 4:
            raise ValueError(f"{name} needs one entry per level (4), got {list(value)}")
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    # The official constructor swallows **kwargs; we accept the keys its configs carry and
    # reject anything else so typos do not pass silently.
    unknown = set(extra) - _OFFICIAL_EXTRA_KEYS
    if unknown:
        raise TypeError(f"MambaVision got unexpected arguments {sorted(unknown)}")


# keys that official configs / timm's builder may hand to the constructor and that do not matter here
_OFFICIAL_EXTRA_KEYS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "resolution", "model_path",
                        "cache_dir", "mean", "std", "crop_pct", "crop_mode", "id2label", "label2id"}


# ----------------------------------------------------------------------------------------------
# variants and pretrained configs


def _hf_url(repo: str, filename: str) -> str:
    return f"https://huggingface.co/nvidia/{repo}/resolve/main/{filename}"


def _cfg(repo: Optional[str], filename: Optional[str], **kwargs: Any) -> Dict[str, Any]:
    weights = dict(url=_hf_url(repo, filename), hf_hub_id=f"nvidia/{repo}", hf_hub_filename=filename) if repo else {}
    cfg = dict(
        **weights,
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=1.0,
        crop_mode="center",
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        first_conv="patch_embed.conv_down.0",
        classifier="head",
        license="nvidia-source-code-license-nc",
        paper_ids="arXiv:2407.08083",
    )
    cfg.update(kwargs)
    return cfg


_T = dict(dim=80, in_dim=32, depths=(1, 3, 8, 4), num_heads=(2, 4, 8, 16), window_size=(8, 8, 14, 7),
          mlp_ratio=4, drop_path_rate=0.2)
_B = dict(dim=128, in_dim=64, depths=(3, 3, 10, 5), num_heads=(2, 4, 8, 16), window_size=(8, 8, 14, 7),
          mlp_ratio=4, drop_path_rate=0.3, layer_scale=1e-5, layer_scale_conv=None)
_L = dict(dim=196, in_dim=64, depths=(3, 3, 10, 5), num_heads=(4, 8, 16, 32), window_size=(8, 8, 14, 7),
          mlp_ratio=4, drop_path_rate=0.3, layer_scale=1e-5, layer_scale_conv=None)
_L2 = dict(_L, depths=(3, 3, 12, 5))
_L3 = dict(dim=256, in_dim=64, depths=(3, 3, 20, 10), num_heads=(4, 8, 16, 32), window_size=(8, 8, 16, 8),
           mlp_ratio=4, drop_path_rate=0.5, layer_scale=1e-5, layer_scale_conv=None)

#: name -> (constructor arguments, pretrained config, official name, ImageNet-1K top-1 from the paper);
#: models of our own (no official weights) have None for the last two.
VARIANTS: Dict[str, Tuple[Dict[str, Any], Dict[str, Any], Optional[str], Optional[float]]] = {
    "mambavision_t": (_T, _cfg("MambaVision-T-1K", "mambavision_tiny_1k.pth.tar"), "mamba_vision_T", 82.3),
    "mambavision_t2": (dict(_T, depths=(1, 3, 11, 4)),
                       _cfg("MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", crop_pct=0.98),
                       "mamba_vision_T2", 82.7),
    "mambavision_s": (dict(_T, dim=96, in_dim=64, depths=(3, 3, 7, 5)),
                      _cfg("MambaVision-S-1K", "mambavision_small_1k.pth.tar", crop_pct=0.93),
                      "mamba_vision_S", 83.3),
    "mambavision_b": (_B, _cfg("MambaVision-B-1K", "mambavision_base_1k.pth.tar"), "mamba_vision_B", 84.2),
    "mambavision_l": (_L, _cfg("MambaVision-L-1K", "mambavision_large_1k.pth.tar"), "mamba_vision_L", 85.0),
    "mambavision_l2": (_L2, _cfg("MambaVision-L2-1K", "mambavision_large2_1k.pth.tar"), "mamba_vision_L2", 85.3),
    "mambavision_b_21k": (_B, _cfg("MambaVision-B-21K", "mambavision_base_21k.pth.tar"),
                          "mamba_vision_B_21k", 84.9),
    "mambavision_l_21k": (_L, _cfg("MambaVision-L-21K", "mambavision_large_21k.pth.tar"),
                          "mamba_vision_L_21k", 86.1),
    "mambavision_l2_512_21k": (dict(_L2, window_size=(8, 8, 32, 16)),
                               _cfg("MambaVision-L2-512-21K", "mambavision_L2_21k_240m_512.pth.tar",
                                    input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93,
                                    crop_mode="squash"),
                               "mamba_vision_L2_512_21k", 87.3),
    "mambavision_l3_256_21k": (_L3, _cfg("MambaVision-L3-256-21K", "mambavision_L3_21k_740m_256.pth.tar",
                                         input_size=(3, 256, 256), pool_size=(8, 8)),
                               "mamba_vision_L3_256_21k", 87.3),
    "mambavision_l3_512_21k": (dict(_L3, window_size=(8, 8, 32, 16)),
                               _cfg("MambaVision-L3-512-21K", "mambavision_L3_21k_740m_512.pth.tar",
                                    input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93,
                                    crop_mode="squash"),
                               "mamba_vision_L3_512_21k", 88.1),
    # small, made of the same blocks, for the built-in digits job (trains in minutes on 2 CPU cores)
    "mambavision_nano": (dict(dim=32, in_dim=16, depths=(1, 2, 2, 2), num_heads=(2, 4, 8, 16),
                              window_size=(8, 8, 4, 2), mlp_ratio=4, drop_path_rate=0.1),
                         _cfg(None, None, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0,
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_classes=10, license="apache-2.0"),
                         None, None),
    # tiny, for fast tests (the shape of the official fixture tiny_a)
    "test_mambavision": (dict(dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(1, 2, 2, 4),
                              window_size=(8, 8, 4, 2), mlp_ratio=4, drop_path_rate=0.0),
                         _cfg(None, None, input_size=(3, 64, 64), pool_size=(2, 2), license="apache-2.0"),
                         None, None),
}

default_cfgs = generate_default_cfgs({name: cfg for name, (_, cfg, _, _) in VARIANTS.items()})


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """Build a variant through timm's builder; pretrained weights come only from local files."""
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    model_args = dict(VARIANTS[variant][0], **kwargs)
    model = build_model_with_cfg(
        MambaVision, variant, pretrained=False,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **model_args,
    )
    if pretrained or checkpoint_path:
        from hymamba.checkpoint import load_pretrained

        load_pretrained(model, variant, checkpoint_path)
    return model


@register_model
def mambavision_nano(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_nano", pretrained, **kwargs)


@register_model
def test_mambavision(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("test_mambavision", pretrained, **kwargs)


@register_model
def mambavision_t(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_t", pretrained, **kwargs)


@register_model
def mambavision_t2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_t2", pretrained, **kwargs)


@register_model
def mambavision_s(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_s", pretrained, **kwargs)


@register_model
def mambavision_b(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_b", pretrained, **kwargs)


@register_model
def mambavision_l(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_l", pretrained, **kwargs)


@register_model
def mambavision_l2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_l2", pretrained, **kwargs)


@register_model
def mambavision_b_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_b_21k", pretrained, **kwargs)


@register_model
def mambavision_l_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_l_21k", pretrained, **kwargs)


@register_model
def mambavision_l2_512_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_l2_512_21k", pretrained, **kwargs)


@register_model
def mambavision_l3_256_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_l3_256_21k", pretrained, **kwargs)


@register_model
def mambavision_l3_512_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    return _create_mambavision("mambavision_l3_512_21k", pretrained, **kwargs)
