"""Object detection and instance segmentation on MambaVision: torchvision's Mask / Faster R-CNN.

:class:`MambaVisionFPN` runs the dense backbone (:class:`~hymamba.models.backbone.MambaVisionBackbone`,
the official ``MM_mamba_vision``) and feeds its four maps - each level's output *before* its
downsample, through ``outnorm{i}``; strides 4, 8, 16, 32 - to ``torchvision.ops.FeaturePyramidNetwork``
(256 channels) with a ``LastLevelMaxPool``: five maps ``"0"``-``"3"`` and ``"pool"`` (stride 64), the
``OrderedDict`` torchvision's detectors expect. torchvision's own ``BackboneWithFPN`` cannot be used:
its ``IntermediateLayerGetter`` taps a child module's output, and the maps needed here are taken in
the middle of each level (before the downsample) and normalised by the outnorms.

:func:`build_detector` puts ``torchvision.models.detection.MaskRCNN`` or ``FasterRCNN`` on it, with
the settings of the official COCO configs where torchvision has them: RPN anchors 32-512 (mmdet's
scale 8 on strides 4-64) at ratios 0.5/1/2, RoIAlign over the four finest maps, test size short side
800 / long side at most 1333, padding to a multiple of 32, ImageNet mean and std (images in 0..1).

**What differs from the paper's detector.** The official MambaVision COCO results (51.1 / 52.3 /
52.8 box AP for T / S / B) come from mmdetection's **Cascade Mask R-CNN**: three box stages at IoU
0.5 / 0.6 / 0.7 (loss weights 1 / 0.5 / 0.25), each a ``ConvFCBBoxHead`` with 4 convs + 1 fc and
SyncBN, GIoU box loss x10, class-agnostic regression, and an ``FCNMaskHead`` of 4 convs. torchvision
has no cascade heads. The models here are the single-stage-head torchvision R-CNNs: one box head
(``TwoMLPHead``: two fc layers, no norm), smooth-L1 box loss, class-specific regression, one IoU
threshold (0.5), torchvision's ``MaskRCNNHeads`` (4 convs, no norm). Expect lower AP than the paper's
numbers with the same backbone and recipe; the official detectors' weights are not loadable into
these heads, only their backbone (``backbone.*``, see :func:`hymamba.create_detector`). Also:
torchvision numbers COCO's classes 1..90 with 0 as background (``num_classes=91``), mmdet uses 80
contiguous classes; torchvision resizes float images bilinearly (mmdet: cv2 on uint8 pixels).
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from hymamba.errors import ConfigError

__all__ = ["ANCHOR_RATIOS", "ANCHOR_SIZES", "DETECTOR_KINDS", "FPN_LEVELS", "IMAGENET_MEAN", "IMAGENET_STD",
           "MambaVisionFPN", "build_detector", "detector_kwargs"]

#: the FPN's outputs, finest first: the four backbone levels and the max-pooled extra level (stride 64)
FPN_LEVELS: Tuple[str, ...] = ("0", "1", "2", "3", "pool")
#: one anchor size per FPN level (mmdet's octave base scale 8 times the strides 4..64)
ANCHOR_SIZES: Tuple[Tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
#: height / width ratios of the anchors, on every level
ANCHOR_RATIOS: Tuple[float, ...] = (0.5, 1.0, 2.0)
#: ImageNet normalisation, for images scaled to 0..1 (the official configs: 123.675/58.395, ... on 0..255)
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)
#: the torchvision detectors available
DETECTOR_KINDS: Dict[str, type] = {"maskrcnn": MaskRCNN, "fasterrcnn": FasterRCNN}
#: keyword arguments torchvision's GeneralizedRCNNTransform takes besides those in the detectors' signatures
_TRANSFORM_KEYS = ("size_divisible", "fixed_size", "_skip_resize")


class MambaVisionFPN(nn.Module):
    """The dense backbone and a feature pyramid: images -> ``OrderedDict`` of five 256-channel maps.

    Args:
        backbone: a module returning a list of NCHW maps, finest first, with ``out_channels`` (one
            width per map): :class:`~hymamba.models.backbone.MambaVisionBackbone`.
        out_channels: the FPN's width (256 in the official configs).

    Attributes:
        body: the backbone (state-dict prefix ``body.``, as torchvision's ``BackboneWithFPN``).
        fpn: ``torchvision.ops.FeaturePyramidNetwork`` with ``LastLevelMaxPool``.
        out_channels: the width of every returned map (what torchvision's detectors read).

    ``forward(x)`` returns ``OrderedDict("0": stride 4, ..., "3": stride 32, "pool": stride 64)`` for
    four backbone maps (map ``i`` of the backbone is key ``str(i)``).
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        in_channels = [int(c) for c in getattr(backbone, "out_channels", ())]
        if not in_channels:
            raise ConfigError("MambaVisionFPN needs a backbone with out_channels (the width of each returned map)")
        if int(out_channels) < 1:
            raise ConfigError(f"the FPN's out_channels must be positive, got {out_channels}")
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels, out_channels=int(out_channels),
                                         extra_blocks=LastLevelMaxPool())
        self.in_channels: Tuple[int, ...] = tuple(in_channels)
        self.out_channels = int(out_channels)

    def backbone_maps(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """The backbone's maps under the FPN's input names ``"0"``, ``"1"``, ... (finest first)."""
        return OrderedDict((str(i), m) for i, m in enumerate(self.body(x)))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.backbone_maps(x))


def detector_kwargs(kind: str) -> Tuple[str, ...]:
    """The keyword arguments ``kind``'s torchvision class (and its image transform) accepts."""
    cls = _detector_class(kind)
    params = inspect.signature(cls.__init__).parameters
    named = tuple(n for n, p in params.items() if n not in ("self", "backbone", "num_classes")
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return named + _TRANSFORM_KEYS


def _detector_class(kind: str) -> type:
    if kind not in DETECTOR_KINDS:
        raise ConfigError(f"unknown detector kind {kind!r}; choose one of {', '.join(DETECTOR_KINDS)}")
    return DETECTOR_KINDS[kind]


def build_detector(backbone: nn.Module, kind: str, num_classes: int, fpn_channels: int = 256,
                   head_channels: Optional[int] = None, **torchvision_kwargs: Any) -> nn.Module:
    """A torchvision Mask R-CNN (``kind="maskrcnn"``) or Faster R-CNN (``"fasterrcnn"``) on ``backbone``.

    Args:
        backbone: the dense backbone with four maps (strides 4-32) and ``out_channels``; it is wrapped
            in a :class:`MambaVisionFPN` (the detector's ``backbone``).
        kind: ``"maskrcnn"`` or ``"fasterrcnn"``.
        num_classes: classes *including* the background (torchvision's convention; COCO: 91).
        fpn_channels: the FPN's width.
        head_channels: the width of the box head's two fc layers and of the mask head's four convs
            (None: torchvision's 1024 and 256; small detectors on a CPU train much faster with less,
            the mask head's convolutions being most of a training step).
        **torchvision_kwargs: anything the torchvision class takes (``min_size``, ``max_size``,
            ``box_score_thresh``, ``rpn_*``, ``box_*``, ``size_divisible``, ...). Defaults here:
            ``min_size=800``, ``max_size=1333`` (the official COCO test size), ImageNet
            ``image_mean``/``image_std``, anchors :data:`ANCHOR_SIZES` x :data:`ANCHOR_RATIOS` on the
            five FPN levels, ``MultiScaleRoIAlign`` over ``"0"``-``"3"`` (7x7 for boxes, 14x14 for
            masks, sampling ratio 2).
    Returns:
        The detector, in train mode. Train mode: ``model(images, targets)`` -> loss dict; eval mode:
        ``model(images)`` -> one dict per image (``boxes``, ``labels``, ``scores``, and ``masks``
        for Mask R-CNN), at the input images' sizes.
    """
    cls = _detector_class(kind)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes counts the background too (torchvision): at least 2, got {num_classes!r}")
    allowed = set(detector_kwargs(kind))
    unknown = sorted(set(torchvision_kwargs) - allowed)
    if unknown:
        raise ConfigError(f"{cls.__name__} does not take {', '.join(unknown)}")
    fpn = MambaVisionFPN(backbone, out_channels=fpn_channels)
    if len(fpn.in_channels) != len(FPN_LEVELS) - 1:
        raise ConfigError(f"the detector's anchors and RoI pooling are sized for four backbone maps (strides "
                          f"4-32) plus the pooled level; the backbone returns {len(fpn.in_channels)} "
                          "(use out_indices=(0, 1, 2, 3))")
    kwargs: Dict[str, Any] = dict(
        min_size=800, max_size=1333, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, (ANCHOR_RATIOS,) * len(ANCHOR_SIZES)),
        box_roi_pool=MultiScaleRoIAlign(list(FPN_LEVELS[:4]), output_size=7, sampling_ratio=2),
    )
    if kind == "maskrcnn":
        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(list(FPN_LEVELS[:4]), output_size=14, sampling_ratio=2)
    if head_channels is not None:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        if int(head_channels) < 1:
            raise ConfigError(f"head_channels must be positive (or None for torchvision's), got {head_channels}")
        c = int(head_channels)
        kwargs["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, c)
        kwargs["box_predictor"] = FastRCNNPredictor(c, num_classes)
        if kind == "maskrcnn":
            kwargs["mask_head"] = MaskRCNNHeads(fpn_channels, [c] * 4, 1)
            kwargs["mask_predictor"] = MaskRCNNPredictor(c, c, num_classes)
        num_classes = None  # torchvision: given with a box_predictor it must be None
    kwargs.update(torchvision_kwargs)
    model = cls(fpn, num_classes=num_classes, **kwargs)
    model.kind = kind
    return model

