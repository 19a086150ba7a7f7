"""MambaVision detectors (COCO): one typed record each, for torchvision's Mask R-CNN and Faster R-CNN.

The backbone settings are read from NVlabs/MambaVision
``object_detection/configs/mamba_vision/cascade_mask_rcnn_mamba_vision_{tiny,small,base}_3x_coco.py``:
windows (8, 8, 112, 56) on every size (the 800x1333 input's stride-16 map, padded to a multiple of
32, fits one 112x112 window: global attention plus padding) and the configured stochastic depth
0.2 / 0.3 / 0.5. The official class (``MM_mamba_vision``) did not pass ``drop_path_rate`` on, so
every official run actually trained with 0.2
(:data:`~hymamba.models.backbone.OFFICIAL_DENSE_DROP_PATH`); ours honours the configured value.

The official detector is mmdetection's Cascade Mask R-CNN, which torchvision does not have (see
:mod:`hymamba.models.detection` for what differs). The recipe fields (AdamW learning rate, weight
decay, epochs) and the reported AP are those of the official Cascade runs, kept as a reference:
they are not results of these models. The official checkpoints' ``backbone.*`` tensors load into
these detectors' backbones (``hymamba.create_detector(name, backbone_checkpoint=...)``); their heads
do not fit torchvision's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["DETECTORS", "DetectorVariant"]

#: the official COCO configs' windows (every size)
_COCO_WINDOWS = (8, 8, 112, 56)


@dataclass(frozen=True)
class DetectorVariant:
    """One MambaVision detector on COCO.

    Attributes:
        name: hymamba's name.
        kind: the torchvision detector, ``"maskrcnn"`` or ``"fasterrcnn"``.
        backbone: the classification variant (:data:`~hymamba.models.variants.VARIANTS`) whose stem
            and levels the backbone has (layer scale included).
        window_size: windows per level in the official detection config.
        drop_path_rate: the config's stochastic depth (see the module docstring).
        fpn_channels: the FPN's width (256).
        num_classes: torchvision's COCO numbering, background included (91).
        min_size, max_size: the test size (short side, long side cap): the official 1333x800.
        lr, weight_decay, optimizer, epochs: the official recipe (AdamW, 36 epochs with steps at 27
            and 33, 1,000-iteration warm-up, batch 16, no decay on norms), for reference.
        official_name: the config / checkpoint name in NVlabs/MambaVision (a Cascade Mask R-CNN).
        official_box_ap, official_mask_ap: COCO val AP reported for the official Cascade Mask R-CNN
            (information only: not what this torchvision model reaches).
        hf_repo: see :attr:`url`.
    """

    name: str
    kind: str
    backbone: str
    window_size: Tuple[int, int, int, int]
    drop_path_rate: float
    fpn_channels: int = 256
    num_classes: int = 91
    min_size: int = 800
    max_size: int = 1333
    lr: float = 1e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    epochs: int = 36
    official_name: Optional[str] = None
    official_box_ap: Optional[float] = None
    official_mask_ap: Optional[float] = None

    #: the official weights' Hugging Face repository (under ``nvidia/``; the file is ``<repo>.pth``)
    hf_repo: Optional[str] = None

    @property
    def url(self) -> Optional[str]:
        """Where the official (Cascade Mask R-CNN) weights are published (hymamba never downloads them)."""
        return f"https://huggingface.co/nvidia/{self.hf_repo}/resolve/main/{self.hf_repo}.pth" if self.hf_repo else None


def _pair(size: str, letter: str, drop_path: float, lr: float, box_ap: float,
          mask_ap: float) -> Tuple[DetectorVariant, ...]:
    """The Mask R-CNN and Faster R-CNN records of one backbone size."""
    official = f"cascade_mask_rcnn_mamba_vision_{size}_3x_coco"
    return tuple(
        DetectorVariant(f"{kind}_mambavision_{letter}", kind, f"mambavision_{letter}", _COCO_WINDOWS, drop_path,
                        lr=lr, official_name=official, hf_repo=official, official_box_ap=box_ap,
                        official_mask_ap=mask_ap)
        for kind in ("maskrcnn", "fasterrcnn"))


DETECTORS: Dict[str, DetectorVariant] = {d.name: d for d in (
    *_pair("tiny", "t", 0.2, 1e-4, 51.1, 44.3),
    *_pair("small", "s", 0.3, 1e-4, 52.3, 45.2),
    *_pair("base", "b", 0.5, 2e-4, 52.8, 45.7),
)}
