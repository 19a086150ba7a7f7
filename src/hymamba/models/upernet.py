"""UPerNet for semantic segmentation in plain PyTorch, with mmsegmentation's state-dict names.

The official MambaVision segmenters are mmsegmentation ``EncoderDecoder`` models: the dense backbone
(:class:`~hymamba.models.backbone.MambaVisionBackbone`), a :class:`UPerHead` decode head on all four
maps and an :class:`FCNHead` auxiliary head on the stride-16 map. The modules here compute what
mmseg 1.x computes (no mmcv needed) and carry its parameter names, so the official checkpoints'
``state_dict`` loads with ``strict=True`` into :class:`Segmenter`:

- ``ConvModule``: ``conv`` (no bias) -> ``bn`` -> ReLU. The configs' ``SyncBN`` has BatchNorm's
  defaults (eps 1e-5, momentum 0.1); a single process runs it as ``nn.BatchNorm2d`` (convert with
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` for several).
- ``UPerHead``: PPM on the last map (adaptive average pooling to 1, 2, 3, 6, a 1x1 ConvModule each,
  bilinear back with ``align_corners=False``), concatenated with the map, ``bottleneck`` 3x3; 1x1
  ``lateral_convs`` on the other maps; top-down: each lateral plus the bilinear-upsampled one above;
  3x3 ``fpn_convs``; all levels resized to the first map's size, concatenated, ``fpn_bottleneck`` 3x3;
  ``Dropout2d(0.1)``; ``conv_seg`` 1x1 with bias.
- ``FCNHead`` (the auxiliary): ``num_convs`` 3x3 ConvModules, no ``concat_input``, dropout, ``conv_seg``.
- ``Segmenter`` (mmseg's ``EncoderDecoder``, whole-image inference): in eval mode ``model(x)`` is the
  decode head's logits (stride 4) resized bilinearly (``align_corners=False``) to the input's size;
  in train mode it returns ``{"decode": ..., "aux": ...}`` at the heads' own resolutions.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from hymamba.errors import ConfigError

__all__ = ["PPM", "AdaptiveAvgPool", "ConvModule", "FCNHead", "Segmenter", "UPerHead", "build_segmenter"]

#: mmseg's SyncBN defaults (BatchNorm's): what the official configs use
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` as mmseg builds it with a norm: ``conv`` (no bias), ``bn``, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.activate = nn.ReLU(inplace=True)
        # mmcv's init: Kaiming normal (fan_out, ReLU) for the conv, BatchNorm at 1/0
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


# torch.compiler.is_exporting appeared in torch 2.6 (the same fallback as hymamba.ops.dispatch)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _resize(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    # under torch.export the sizes stay symbolic (int() would fix them at the example's)
    size = tuple(size) if _is_exporting() else tuple(int(s) for s in size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class _DecodeHead(nn.Module):
    """What mmseg's ``BaseDecodeHead`` gives every head: ``Dropout2d`` then the 1x1 ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float, align_corners: bool) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.align_corners = bool(align_corners)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's init_cfg for conv_seg
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(feats))


class AdaptiveAvgPool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(size)`` that also exports to ONNX.

    The ONNX exporter cannot export adaptive pooling to a size that does not divide the input (it
    loses the spatial shape inside the backbone: "adaptive_avg_pool2d, input size not accessible").
    While tracing, this computes PyTorch's own bins explicitly - bin ``i`` of ``n`` cells into ``s``
    spans ``floor(i * n / s)`` to ``ceil((i + 1) * n / s)`` - as slices and means, fixed at the traced
    size (the exported graph then serves that input size). Under ``torch.export`` (the any-size ONNX
    export) the same bins are built from the symbolic size as averaging matrices (bin i's cells
    weighted 1/count), applied to rows and columns by two matrix products: one graph for every size.
    Eager mode runs PyTorch's kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size, self.output_size)
        if _is_exporting():
            rows = _bin_weights(x.shape[-2], size[0] or x.shape[-2], x)  # (sh, H)
            cols = _bin_weights(x.shape[-1], size[1] or x.shape[-1], x)  # (sw, W)
            return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))
        (sh, sw), h, w = size, int(x.shape[-2]), int(x.shape[-1])
        sh, sw = sh or h, sw or w

        def bins(n: int, s: int) -> List[tuple]:
            return [((i * n) // s, -((-(i + 1) * n) // s)) for i in range(s)]

        rows = [torch.cat([x[..., r0:r1, c0:c1].mean(dim=(-2, -1), keepdim=True) for c0, c1 in bins(w, sw)], dim=-1)
                for r0, r1 in bins(h, sh)]
        return torch.cat(rows, dim=-2)


def _bin_weights(n: Any, s: int, like: torch.Tensor) -> torch.Tensor:
    """(s, n): row i averages PyTorch's adaptive-pooling bin i of n cells into s, floor(i*n/s) to
    ceil((i+1)*n/s), computed with tensor ops so that ``n`` may be symbolic."""
    i = torch.arange(s, device=like.device)
    start = torch.div(i * n, s, rounding_mode="floor")
    end = torch.div((i + 1) * n + s - 1, s, rounding_mode="floor")
    j = torch.arange(n, device=like.device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class PPM(nn.ModuleList):
    """Pyramid pooling: per scale ``(AdaptiveAvgPool(scale), ConvModule 1x1)``, resized back."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool) -> None:
        super().__init__(
            nn.Sequential(AdaptiveAvgPool(int(s)), ConvModule(in_channels, channels, 1)) for s in pool_scales)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        return [_resize(ppm(x), x.shape[2:], self.align_corners) for ppm in self]


class UPerHead(_DecodeHead):
    """mmseg's ``UPerHead`` (UPerNet: PPM on the last map + FPN), on the maps selected by ``in_index``.

    Args:
        in_channels: channels of the selected maps (finest first).
        channels: width of every internal ConvModule (512 in the official configs).
        num_classes: output classes.
        pool_scales: PPM output sizes.
        in_index: which of the backbone's maps to use (all four by default).
        dropout_ratio: ``Dropout2d`` before ``conv_seg``.
        align_corners: for every bilinear resize.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), in_index: Sequence[int] = (0, 1, 2, 3),
                 dropout_ratio: float = 0.1, align_corners: bool = False) -> None:
        super().__init__(channels, num_classes, dropout_ratio, align_corners)
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) != len(in_index) or len(in_channels) < 1:
            raise ConfigError(f"UPerHead: in_channels {in_channels} and in_index {list(in_index)} must match in length")
        self.in_channels = in_channels
        self.in_index = tuple(int(i) for i in in_index)
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.psp_modules = PPM(self.pool_scales, in_channels[-1], channels, self.align_corners)
        self.bottleneck = ConvModule(in_channels[-1] + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused stride-4 features before dropout and ``conv_seg``."""
        maps = [inputs[i] for i in self.in_index]
        laterals = [conv(maps[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(maps[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size, self.align_corners) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.forward_features(inputs))


class FCNHead(_DecodeHead):
    """mmseg's ``FCNHead`` as the official auxiliary head: ``num_convs`` ConvModules on one map.

    Args:
        in_channels: channels of map ``in_index``.
        channels: width of the convs (256 in the official configs).
        num_classes: output classes.
        in_index: which backbone map (2: stride 16).
        num_convs, kernel_size, dilation: the conv stack (``convs.{i}``).
        concat_input: concatenate the input with the convs' output and fuse with ``conv_cat``.
        dropout_ratio, align_corners: as :class:`UPerHead`.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2, num_convs: int = 1,
                 kernel_size: int = 3, dilation: int = 1, concat_input: bool = False, dropout_ratio: float = 0.1,
                 align_corners: bool = False) -> None:
        super().__init__(channels, num_classes, dropout_ratio, align_corners)
        if num_convs < 0 or (num_convs == 0 and in_channels != channels):
            raise ConfigError(f"FCNHead: num_convs {num_convs} needs in_channels == channels when 0")
        self.in_channels = int(in_channels)
        self.in_index = int(in_index)
        self.concat_input = bool(concat_input)
        pad = (kernel_size // 2) * dilation
        convs = [ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=pad, dilation=dilation)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if self.concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs[self.in_index]
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)


class Segmenter(nn.Module):
    """mmseg's ``EncoderDecoder``: ``backbone``, ``decode_head``, optional ``auxiliary_head``.

    ``forward(x)``: in eval mode the logits at ``x``'s size (whole-image inference: the decode head's
    stride-4 logits resized bilinearly); in train mode ``{"decode": logits, "aux": logits}`` at the
    heads' own resolutions (``"aux"`` only with an auxiliary head), for the losses.

    Attributes:
        class_names, palette: from the checkpoint's ``meta`` when one was loaded (else None).
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: Optional[nn.Module] = None,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.align_corners = bool(align_corners)
        self.num_classes = int(getattr(decode_head, "num_classes", 0)) or None
        self.class_names: Optional[List[str]] = None
        self.palette: Optional[List[List[int]]] = None

    def extract_feat(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.backbone(x))

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size (mmseg's ``encode_decode``)."""
        logits = self.decode_head(self.extract_feat(x))
        return _resize(logits, x.shape[2:], self.align_corners)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        if not self.training:
            return self.encode_decode(x)
        feats = self.extract_feat(x)
        out = {"decode": self.decode_head(feats)}
        if self.auxiliary_head is not None:
            out["aux"] = self.auxiliary_head(feats)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class index per pixel (N, H, W), in eval mode whatever the module's mode."""
        was_training = self.training
        self.eval()
        try:
            return self.encode_decode(x).argmax(dim=1)
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, align_corners={self.align_corners}"


def build_segmenter(backbone: nn.Module, num_classes: int, channels: int = 512, aux_channels: Optional[int] = 256,
                    pool_scales: Sequence[int] = (1, 2, 3, 6), aux_index: int = 2, dropout_ratio: float = 0.1,
                    align_corners: bool = False) -> Segmenter:
    """A UPerNet on ``backbone`` (which must have ``out_channels`` of four maps): the official layout."""
    in_channels = list(backbone.out_channels)  # type: ignore[attr-defined]
    decode = UPerHead(in_channels, channels, num_classes, pool_scales=pool_scales,
                      in_index=tuple(range(len(in_channels))), dropout_ratio=dropout_ratio, align_corners=align_corners)
    aux = None
    if aux_channels:
        aux = FCNHead(in_channels[aux_index], aux_channels, num_classes, in_index=aux_index,
                      dropout_ratio=dropout_ratio, align_corners=align_corners)
    return Segmenter(backbone, decode, aux, align_corners=align_corners)
