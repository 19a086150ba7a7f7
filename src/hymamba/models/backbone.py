"""MambaVision as a dense-prediction backbone: the four stage maps, for segmentation and detection.

The official dense backbone is ``MM_mamba_vision`` (NVlabs/MambaVision,
``semantic_segmentation/tools/mamba_vision.py``; the detection copy is the same): the classifier's stem
and levels, the final BatchNorm and the head deleted, and one ``outnorm{i}`` per returned stage — an
instance of that file's own :class:`LayerNorm2d` — applied to the level's output *before* its
downsample. :class:`MambaVisionBackbone` is that module, built from the same blocks as
:class:`~hymamba.models.mambavision.MambaVision`, with the official dense state-dict names
(``patch_embed.*``, ``levels.*``, ``outnorm{i}.*``; no ``norm``, no ``head``), so the official dense
checkpoints' ``backbone.*`` tensors load with ``strict=True`` and the outputs are the official ones
(the unmasked window padding of levels 2-3 included).

What ours adds, all off by default except the first:

- ``drop_path_rate`` reaches the blocks. ``MM_mamba_vision`` passes only dim, in_dim, depths,
  window_size, mlp_ratio, num_heads and layer_scale on, so every official dense run trained with
  MambaVision's default stochastic depth 0.2, whatever its config said; our default is that 0.2.
- ``frozen_stages`` and ``norm_eval`` (the official configs set them; the official class ignores them).
- gradient checkpointing (:meth:`MambaVisionBackbone.set_grad_checkpointing`);
- ``out_channels`` / ``strides`` / ``feature_info`` for the returned maps, and ``window_size`` per level
  (the dense configs enlarge levels 2-3: ADE20K 512 tiny (8, 8, 64, 32), COCO (8, 8, 112, 56)).

Weights go in through :func:`hymamba.create_backbone` (ImageNet or official dense checkpoints).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hymamba.errors import ConfigError
from hymamba.models.layers import MambaVisionMixer, PatchEmbed, conv_layout, set_linear_impl, set_scan_impl
from hymamba.models.mambavision import _OFFICIAL_EXTRA_KEYS, MambaVision, MambaVisionLayer
from hymamba.models.options import check_option
from hymamba.ops import check_scan_impl

__all__ = ["LayerNorm2d", "MambaVisionBackbone", "OFFICIAL_DENSE_DROP_PATH", "OUT_NORMS"]

#: the stochastic depth every official dense run trained with (MM_mamba_vision drops the configured one)
OFFICIAL_DENSE_DROP_PATH = 0.2


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map: the official dense file's own ``LayerNorm2d``.

    A plain ``nn.LayerNorm(C)`` subclass, so its eps is ``nn.LayerNorm``'s default **1e-5** (timm's
    ``LayerNorm2d`` uses 1e-6) and its parameters are ``weight``/``bias`` of shape (C,). The forward
    moves the channels last (N, H, W, C), normalises each pixel's C values with ``F.layer_norm`` and
    moves them back: mean and (biased) variance over the channels only, per pixel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


#: the official ``norm_layer`` choices that work on NCHW maps ('ln', a plain nn.LayerNorm over the last
#: axis, normalises over the width of an NCHW map in the official code; no official config uses it)
OUT_NORMS = {"ln2d": LayerNorm2d, "bn": nn.BatchNorm2d}


class MambaVisionBackbone(nn.Module):
    """MambaVision's stem and four levels returning the stage maps (the official ``MM_mamba_vision``).

    ``forward(x)`` returns a list with, for each ``i`` in ``out_indices`` (in level order), level i's
    output before its downsample, through ``outnorm{i}``: strides 4, 8, 16, 32 and widths
    ``dim * 2**i``, NCHW and contiguous. Levels past the last requested one are built (their weights
    are in the checkpoints) but not run.

    Args:
        dim, in_dim, depths, window_size, mlp_ratio, num_heads, in_chans, qkv_bias, qk_scale,
        drop_rate, attn_drop_rate, layer_scale, layer_scale_conv, scan_impl, linear_impl,
        mixer_variant, attention_pattern, ssm_init: as :class:`~hymamba.models.mambavision.MambaVision`.
            The official dense class passes no ``layer_scale_conv`` (None) and keeps the last four at
            their defaults.
        out_indices: the levels whose maps are returned (each in 0..3, no repeats); one ``outnorm{i}``
            each.
        drop_path_rate: stochastic depth, rising linearly over all blocks (default 0.2: what every
            official dense run used, see the module docstring).
        norm_layer: the outnorms: ``"ln2d"`` (the official default and every official config) or ``"bn"``.
        frozen_stages: mmseg/mmdet Swin's convention. -1: nothing frozen; 0: the stem (``patch_embed``);
            i >= 1: the stem and levels 0..i-1, each with its downsample (our level i ends with the
            conv that halves the map, as a Swin stage ends with its patch merging) and the outnorm of
            every returned one among them. Frozen parameters get ``requires_grad=False`` and frozen
            modules stay in eval mode through :meth:`train` (BatchNorm statistics kept, no stochastic
            depth). 4 freezes everything.
        norm_eval: keep every BatchNorm (stem and conv levels; LayerNorms are not affected) in eval
            mode while training: running statistics are used and never updated (as mmseg's
            ``norm_eval``; sensible with 1-2 images per GPU).
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        depths: Sequence[int],
        window_size: Sequence[int],
        mlp_ratio: float,
        num_heads: Sequence[int],
        out_indices: Sequence[int] = (0, 1, 2, 3),
        drop_path_rate: float = OFFICIAL_DENSE_DROP_PATH,
        in_chans: int = 3,
        qkv_bias: bool = True,
        qk_scale: Any = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        layer_scale: Optional[float] = None,
        layer_scale_conv: Optional[float] = None,
        norm_layer: str = "ln2d",
        frozen_stages: int = -1,
        norm_eval: bool = False,
        scan_impl: str = "auto",
        linear_impl: str = "auto",
        mixer_variant: str = "concat",
        attention_pattern: str = "last_half",
        ssm_init: str = "official",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        out_indices = _check_args(depths, window_size, num_heads, out_indices, norm_layer, frozen_stages, kwargs)
        check_option("mixer_variant", mixer_variant)
        check_option("attention_pattern", attention_pattern)
        check_option("ssm_init", ssm_init)
        check_scan_impl(scan_impl)
        self.out_indices: Tuple[int, ...] = out_indices
        self.frozen_stages = int(frozen_stages)
        self.norm_eval = bool(norm_eval)
        self.dims: Tuple[int, ...] = tuple(int(dim * 2**i) for i in range(len(depths)))
        self.window_size: Tuple[int, ...] = tuple(int(w) for w in window_size)
        self.drop_path_rate = float(drop_path_rate)
        self.patch_embed = PatchEmbed(in_chans, in_dim, dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.levels = nn.ModuleList(
            MambaVisionLayer(
                self.dims[i], depth, num_heads[i], self.window_size[i], conv=i < 2, downsample=i < 3,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i].tolist(), layer_scale=layer_scale, layer_scale_conv=layer_scale_conv,
                scan_impl=scan_impl, mixer_variant=mixer_variant, attention_pattern=attention_pattern,
            )
            for i, depth in enumerate(depths)
        )
        # as the official constructor (MambaVision.__init__'s init, then the outnorms at their defaults)
        self.apply(MambaVision._init_weights)
        for m in self.modules():
            if isinstance(m, MambaVisionMixer):
                m.reset_ssm_parameters(ssm_init)
        for i in out_indices:
            self.add_module(f"outnorm{i}", OUT_NORMS[norm_layer](self.dims[i]))
        self.feature_info: List[Dict[str, Any]] = [
            dict(num_chs=self.dims[i], reduction=4 * 2**i, module=f"levels.{i}") for i in out_indices]
        self.set_linear_impl(linear_impl)
        self._freeze_stages()

    # -- what the returned maps are ----------------------------------------------------------

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each returned map (in the order returned)."""
        return tuple(f["num_chs"] for f in self.feature_info)

    @property
    def strides(self) -> Tuple[int, ...]:
        """Stride (input pixels per map pixel) of each returned map: 4, 8, 16, 32 for levels 0-3."""
        return tuple(f["reduction"] for f in self.feature_info)

    # -- implementations -----------------------------------------------------------------------

    def set_scan_impl(self, impl: str) -> None:
        """Choose the selective-scan implementation of every mixer ('auto', 'fast', ...)."""
        set_scan_impl(self, impl)

    def set_linear_impl(self, impl: str) -> None:
        """Choose how the token levels' linear layers run ('auto', 'torch', 'onednn')."""
        self.linear_impl = set_linear_impl(self, impl)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (same gradients)."""
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay: the SSM's A_log and D (as the classifier)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("mixer.A_log", "mixer.D"))}

    # -- frozen stages and norm_eval ---------------------------------------------------------

    def frozen_modules(self) -> List[nn.Module]:
        """The modules ``frozen_stages`` freezes (see the class docstring)."""
        if self.frozen_stages < 0:
            return []
        frozen: List[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            frozen.append(self.levels[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f"outnorm{i}"))
        return frozen

    def _freeze_stages(self) -> None:
        for m in self.frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "MambaVisionBackbone":
        """As ``nn.Module.train``, but frozen stages stay in eval mode, and with ``norm_eval`` every
        BatchNorm too."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Images (B, C, H, W) -> [outnorm{i}(level i's map before its downsample) for i in out_indices]."""
        last = max(self.out_indices)
        outs = []
        x = self.patch_embed(conv_layout(x))
        for i, level in enumerate(self.levels[: last + 1]):
            x = level(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"outnorm{i}")(x).contiguous())
            if level.downsample is not None and i < last:
                x = level.downsample(conv_layout(x))
        return outs


def _check_args(depths: Sequence[int], window_size: Sequence[int], num_heads: Sequence[int], out_indices: Any,
                norm_layer: str, frozen_stages: Any, extra: Dict[str, Any]) -> Tuple[int, ...]:
    """The constructor's checks; returns ``out_indices`` as a tuple."""
    if len(depths) != 4:
        raise ConfigError(f"MambaVision has 4 levels: depths needs 4 entries, got {list(depths)}")
    for name, value in (("window_size", window_size), ("num_heads", num_heads)):
        if isinstance(value, (int, str)) or len(value) != 4:
            raise ConfigError(f"{name} needs one entry per level (4), got {value!r}")
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window_size):
        raise ConfigError(f"window_size needs 4 positive whole numbers, got {list(window_size)}")
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    indices = tuple(out_indices)
    if (not indices or len(set(indices)) != len(indices)
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 4 for i in indices)):
        raise ConfigError(f"out_indices must name one or more of the levels 0, 1, 2, 3, each once, got {out_indices!r}")
    if norm_layer not in OUT_NORMS:
        raise ConfigError(f"norm_layer must be one of {sorted(OUT_NORMS)}, got {norm_layer!r}")
    if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
        raise ConfigError(f"frozen_stages must be -1 (nothing), 0 (the stem) or 1..4 (the stem and that many "
                          f"levels), got {frozen_stages!r}")
    if extra.get("pretrained"):  # the official class loads a file named here; weights enter through the factory
        raise ConfigError("MambaVisionBackbone loads no weights (pretrained=...): use "
                          "hymamba.create_backbone(name, checkpoint_path=...)")
    unknown = set(extra) - _OFFICIAL_EXTRA_KEYS
    if unknown:
        raise TypeError(f"MambaVisionBackbone got unexpected arguments {sorted(unknown)}")
    return tuple(sorted(indices))
