"""MambaVision's building blocks, in the order the paper's figure draws them.

Stem (:class:`PatchEmbed`, two stride-2 convs), :class:`Downsample`, the residual :class:`ConvBlock`
of levels 0-1, and the token blocks of levels 2-3: :class:`Block` = pre-norm token mixer
(:class:`MambaVisionMixer` or windowed :class:`Attention`) + :class:`Mlp`. Parameter names are the
official ones, so the released checkpoints load with ``strict=True``; each numerical quirk of the
official code that we keep is marked ``Quirk``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath

from hymamba.errors import ConfigError
from hymamba.models.options import check_option
from hymamba.ops import check_scan_impl, selective_scan
from hymamba.ops.linear import LINEAR_IMPLS, FastLinear, gelu_linear, layer_norm_linear

__all__ = ["Attention", "Block", "ConvBlock", "Downsample", "MambaVisionMixer", "Mlp", "PatchEmbed", "conv_layout",
           "depthwise_conv_same", "is_number", "set_linear_impl", "set_scan_impl", "window_partition", "window_reverse"]


# ----------------------------------------------------------------------------------------------
# helpers


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a feature map into non-overlapping windows of tokens.

    Args:
        x: (B, C, H, W) with H and W multiples of ``window_size``.
    Returns:
        (B * H/ws * W/ws, ws*ws, C): windows row-major, tokens row-major inside each window.

    Every size is spelled out (no ``-1``): under ``torch.export`` the window count stays a product of
    the symbolic sizes, so the exported graph computes it from the input's shape.
    """
    b, c, h, w = x.shape
    nh, nw = h // window_size, w // window_size
    x = x.view(b, c, nh, window_size, nw, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b * nh * nw, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int,
                   batch: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW, ws*ws, C) -> (B, C, H, W).

    ``batch`` (B) spells the batch out for ``torch.export``; default: inferred from the window count.
    """
    c = windows.shape[-1]
    nh, nw = h // window_size, w // window_size
    b = windows.shape[0] // (nh * nw) if batch is None else batch
    x = windows.reshape(b, nh, nw, window_size, window_size, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


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
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if is_number(layer_scale) else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


# ----------------------------------------------------------------------------------------------
# token mixers




#: Mamba's own depthwise conv width (``mamba_ssm.Mamba(d_conv=4)``), used by the ``causal_conv`` variant
MAMBA_D_CONV = 4


class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer: an SSM branch and a symmetric conv branch, concatenated.

    in_proj splits the C channels into x and z (C/2 each); both go through a regular (non-causal)
    depthwise conv1d and SiLU; x then goes through the selective scan; out_proj mixes [y, z].

    ``variant`` selects the paper's token-mixer ablation (the official model is ``"concat"``):

    * ``"causal_conv"``: Mamba's original mixer: a causal depthwise conv of width 4 *with* bias
      (``mamba_ssm``'s ``d_conv=4, conv_bias=True``) and SiLU on x, no conv on z, output gated
      ``y * silu(z)``, out_proj C/2 -> C (the paper's first token-mixer row);
    * ``"regular_conv"``: the same gating with MambaVision's conv instead: regular (non-causal),
      width ``d_conv`` (3), no bias (the second row);
    * ``"gated"``: adds the symmetric branch (conv + SiLU on z) but keeps Mamba's gating ``y * z``
      (the third row);
    * ``"concat"``: the symmetric branch concatenated with y (MambaVision, the last row).
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
        check_option("mixer_variant", variant)
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
        # The official code writes bias=conv_bias//2 with conv_bias=True, i.e. no bias; Mamba's own
        # mixer (causal_conv) has a width-4 conv with bias.
        if variant == "causal_conv":
            self.conv1d_x = nn.Conv1d(half, half, MAMBA_D_CONV, groups=half, bias=True)
        else:
            self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        if variant in ("concat", "gated"):  # the symmetric branch
            self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_init: str = "mamba") -> None:
        """The SSM parameters' initialisation: A_log = log(1..N), D = 1, and ``dt_init``:

        * ``"mamba"``: Mamba's dt_proj (uniform weight, bias = softplus^-1 of a log-uniform dt in
          [dt_min, dt_max]);
        * ``"official"``: dt_proj left as it is — the official MambaVision initialises it like every
          other Linear (its model-level init overwrites the mixer's Mamba init: truncated normal
          std 0.02, zero bias).
        """
        check_option("ssm_init", dt_init)
        half = self.d_inner // 2
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D.fill_(1.0)
        if dt_init != "mamba":
            return
        dt_min, dt_max, floor = self._dt_init
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
        # The convs run in the activations' dtype: under autocast the official nn.Conv1d computes in
        # half precision, and mamba_ssm's kernel needs u (the conv output) in delta's and B/C's dtype.
        if self.variant in ("concat", "gated"):
            conv_w = torch.cat([self.conv1d_x.weight, self.conv1d_z.weight], dim=0)[:, 0]  # (C, d_conv)
            xz = F.silu(depthwise_conv_same(xz, conv_w.to(xz.dtype)))  # (B, L, C)
            x, z = xz[..., :half], xz[..., half:]  # (B, L, C/2) each
        else:  # Mamba's formulation: conv on x only (causal or not), z a plain SiLU gate
            causal = self.variant == "causal_conv"
            x = depthwise_conv_same(xz[..., :half], self.conv1d_x.weight[:, 0].to(xz.dtype), causal=causal)
            if self.conv1d_x.bias is not None:
                x = x + self.conv1d_x.bias.to(x.dtype)
            x = F.silu(x)
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
            raise ConfigError(f"attention width {dim} must be divisible by num_heads, got num_heads={num_heads}")
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
        use_ls = is_number(layer_scale)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the norms are handed to the next layer, which recomputes them in backward instead of
        # keeping their outputs (hymamba.ops.linear.layer_norm_linear); same maths
        y = self.mixer(x, self.norm1)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(x, self.norm2)
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


def is_number(value: Any) -> bool:
    """A real number (not a bool): how the official code tells "layer scale on" from None/False."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def set_scan_impl(module: nn.Module, impl: str) -> str:
    """Set the selective-scan implementation of every mixer in ``module``; returns ``impl`` (checked)."""
    check_scan_impl(impl)
    for m in module.modules():
        if isinstance(m, MambaVisionMixer):
            m.scan_impl = impl
    return impl


def set_linear_impl(module: nn.Module, impl: str) -> str:
    """Set how every FastLinear in ``module`` runs ('auto', 'torch', 'onednn'); returns ``impl`` (checked)."""
    if impl not in LINEAR_IMPLS:
        raise ConfigError(f"linear_impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    for m in module.modules():
        if isinstance(m, FastLinear):
            m.impl = impl
    return impl
