"""The official MambaVision UPerNet segmenters (ADE20K): one typed record each.

Read from NVlabs/MambaVision ``semantic_segmentation/configs/mamba_vision/`` (base
``_base_/models/upernet_swin.py``): UPerHead channels 512 with pool scales (1, 2, 3, 6), an FCNHead
auxiliary on the stride-16 map with 256 channels, dropout 0.1, align_corners False, 150 classes, and
enlarged windows on levels 2-3. ``drop_path_rate`` is the configured value; the official class
(``MM_mamba_vision``) did not pass it on, so every official run actually trained with 0.2
(:data:`~hymamba.models.backbone.OFFICIAL_DENSE_DROP_PATH`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["SEGMENTERS", "SegmenterVariant"]


@dataclass(frozen=True)
class SegmenterVariant:
    """One official UPerNet segmenter.

    Attributes:
        name: hymamba's name.
        backbone: the classification variant (:data:`~hymamba.models.variants.VARIANTS`) whose
            stem and levels the backbone has (layer scale included).
        window_size: windows per level in the dense config.
        drop_path_rate: the config's stochastic depth (see the module docstring).
        crop_size: training crop (H, W).
        channels, aux_channels: UPerHead and FCNHead widths.
        num_classes: ADE20K's 150.
        pool_scales, aux_index, dropout_ratio: head settings.
        official_name: the config / checkpoint name in NVlabs/MambaVision.
        miou: ADE20K val mIoU reported (single scale).
        params_m: parameters reported, in millions.
        hf_repo: see :attr:`url` (None where the file name is not known to us: L3).
    """

    name: str
    backbone: str
    window_size: Tuple[int, int, int, int]
    drop_path_rate: float
    crop_size: Tuple[int, int] = (512, 512)
    channels: int = 512
    aux_channels: int = 256
    num_classes: int = 150
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    aux_index: int = 2
    dropout_ratio: float = 0.1
    official_name: Optional[str] = None
    miou: Optional[float] = None
    params_m: Optional[float] = None

    #: the official weights' Hugging Face repository (under ``nvidia/``; the file is ``<repo>.pth``), when known
    hf_repo: Optional[str] = None

    @property
    def url(self) -> Optional[str]:
        """Where the official weights are published (hymamba never downloads them)."""
        return f"https://huggingface.co/nvidia/{self.hf_repo}/resolve/main/{self.hf_repo}.pth" if self.hf_repo else None


SEGMENTERS: Dict[str, SegmenterVariant] = {s.name: s for s in (
    SegmenterVariant("upernet_mambavision_t", "mambavision_t", (8, 8, 64, 32), 0.3,
                     official_name="mamba_vision_160k_ade20k-512x512_tiny",
                     hf_repo="mamba_vision_160k_ade20k-512x512_tiny", miou=46.0, params_m=55),
    SegmenterVariant("upernet_mambavision_s", "mambavision_s", (8, 8, 160, 56), 0.7,
                     official_name="mamba_vision_160k_ade20k-512x512_small",
                     hf_repo="mamba_vision_160k_ade20k-512x512_small", miou=48.2, params_m=84),
    SegmenterVariant("upernet_mambavision_b", "mambavision_b", (8, 8, 64, 32), 0.4,
                     official_name="mamba_vision_160k_ade20k-512x512_base",
                     hf_repo="mamba_vision_160k_ade20k-512x512_base", miou=49.1, params_m=126),
    SegmenterVariant("upernet_mambavision_l3", "mambavision_l3_512_21k", (8, 8, 64, 32), 0.8, crop_size=(640, 640),
                     official_name="mamba_vision_160k_ade20k-640x640_l3_21k", miou=53.2, params_m=780),
)}
