"""The MambaVision variants: one typed record each (constructor arguments, timm pretrained config,
official name, the paper's ImageNet-1K top-1).

The official weights live on the Hugging Face hub under ``nvidia/``; hymamba never downloads them
(see :func:`hymamba.factory.create_model`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["VARIANTS", "Variant"]


@dataclass(frozen=True)
class Variant:
    """One model variant.

    Attributes:
        name: hymamba's name (also the timm name).
        args: :class:`~hymamba.models.mambavision.MambaVision` constructor arguments.
        pretrained_cfg: timm's pretrained config (input size, crop, mean/std, weight file and url).
        official_name: the name in NVlabs/MambaVision, None for models of our own.
        top1: ImageNet-1K top-1 reported in the paper, None for models of our own.
    """

    name: str
    args: Mapping[str, Any]
    pretrained_cfg: Mapping[str, Any] = field(default_factory=dict)
    official_name: Optional[str] = None
    top1: Optional[float] = None

    @property
    def input_size(self) -> Tuple[int, int, int]:
        return tuple(self.pretrained_cfg["input_size"])  # type: ignore[return-value]

    @property
    def has_official_weights(self) -> bool:
        return "url" in self.pretrained_cfg


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

VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("mambavision_t", _T, _cfg("MambaVision-T-1K", "mambavision_tiny_1k.pth.tar"),
            official_name="mamba_vision_T", top1=82.3),
    Variant("mambavision_t2", dict(_T, depths=(1, 3, 11, 4)),
            _cfg("MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", crop_pct=0.98),
            official_name="mamba_vision_T2", top1=82.7),
    Variant("mambavision_s", dict(_T, dim=96, in_dim=64, depths=(3, 3, 7, 5)),
            _cfg("MambaVision-S-1K", "mambavision_small_1k.pth.tar", crop_pct=0.93),
            official_name="mamba_vision_S", top1=83.3),
    Variant("mambavision_b", _B, _cfg("MambaVision-B-1K", "mambavision_base_1k.pth.tar"),
            official_name="mamba_vision_B", top1=84.2),
    Variant("mambavision_l", _L, _cfg("MambaVision-L-1K", "mambavision_large_1k.pth.tar"),
            official_name="mamba_vision_L", top1=85.0),
    Variant("mambavision_l2", _L2, _cfg("MambaVision-L2-1K", "mambavision_large2_1k.pth.tar"),
            official_name="mamba_vision_L2", top1=85.3),
    Variant("mambavision_b_21k", _B, _cfg("MambaVision-B-21K", "mambavision_base_21k.pth.tar"),
            official_name="mamba_vision_B_21k", top1=84.9),
    Variant("mambavision_l_21k", _L, _cfg("MambaVision-L-21K", "mambavision_large_21k.pth.tar"),
            official_name="mamba_vision_L_21k", top1=86.1),
    Variant("mambavision_l2_512_21k", dict(_L2, window_size=(8, 8, 32, 16)),
            _cfg("MambaVision-L2-512-21K", "mambavision_L2_21k_240m_512.pth.tar", input_size=(3, 512, 512),
                 pool_size=(16, 16), crop_pct=0.93, crop_mode="squash"),
            official_name="mamba_vision_L2_512_21k", top1=87.3),
    Variant("mambavision_l3_256_21k", _L3,
            _cfg("MambaVision-L3-256-21K", "mambavision_L3_21k_740m_256.pth.tar", input_size=(3, 256, 256),
                 pool_size=(8, 8)),
            official_name="mamba_vision_L3_256_21k", top1=87.3),
    Variant("mambavision_l3_512_21k", dict(_L3, window_size=(8, 8, 32, 16)),
            _cfg("MambaVision-L3-512-21K", "mambavision_L3_21k_740m_512.pth.tar", input_size=(3, 512, 512),
                 pool_size=(16, 16), crop_pct=0.93, crop_mode="squash"),
            official_name="mamba_vision_L3_512_21k", top1=88.1),
    # small, made of the same blocks, for the built-in digits job (trains in minutes on 2 CPU cores)
    Variant("mambavision_nano",
            dict(dim=32, in_dim=16, depths=(1, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=(8, 8, 4, 2),
                 mlp_ratio=4, drop_path_rate=0.1),
            _cfg(None, None, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5), num_classes=10, license="apache-2.0")),
    # tiny, for fast tests (the shape of the official fixture tiny_a)
    Variant("test_mambavision",
            dict(dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
                 mlp_ratio=4, drop_path_rate=0.0),
            _cfg(None, None, input_size=(3, 64, 64), pool_size=(2, 2), license="apache-2.0")),
)}
