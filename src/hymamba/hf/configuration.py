"""``MambaVisionConfig``: the Hugging Face config of a MambaVision model.

Field names follow the official snapshots' ``config.json`` (``nvidia/MambaVision-*``), so their
configs load as they are; ``auto_map`` (the pointer to the official remote code) is dropped, since
the classes here replace that code.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from transformers import PretrainedConfig

__all__ = ["MambaVisionConfig"]

# constructor arguments of hymamba.MambaVision that the config carries
_MODEL_FIELDS = ("dim", "in_dim", "depths", "window_size", "mlp_ratio", "num_heads", "drop_path_rate",
                 "in_chans", "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate", "layer_scale",
                 "layer_scale_conv")


class MambaVisionConfig(PretrainedConfig):
    """Architecture (MambaVision-T by default) and preprocessing of a MambaVision model.

    Args:
        depths, num_heads, window_size, dim, in_dim, mlp_ratio, drop_path_rate, layer_scale,
            layer_scale_conv, qkv_bias, qk_scale, drop_rate, attn_drop_rate, in_chans: the
            ``hymamba.MambaVision`` constructor arguments.
        mean, std, crop_pct, crop_mode, interpolation, input_size: preprocessing, as in the
            official configs.
        scan_impl, linear_impl: hymamba's implementation choices (not saved into the weights).
        kwargs: ``PretrainedConfig`` arguments (``id2label``, ``num_labels``, ...).
    """

    model_type = "mambavision"

    def __init__(
        self,
        depths: Sequence[int] = (1, 3, 8, 4),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: Sequence[int] = (8, 8, 14, 7),
        dim: int = 80,
        in_dim: int = 32,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        layer_scale: Optional[float] = None,
        layer_scale_conv: Optional[float] = None,
        qkv_bias: bool = True,
        qk_scale: Any = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        in_chans: int = 3,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        crop_pct: float = 1.0,
        crop_mode: str = "center",
        interpolation: str = "bicubic",
        input_size: Sequence[int] = (3, 224, 224),
        scan_impl: str = "auto",
        linear_impl: str = "auto",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("auto_map", None)  # the official remote code is not needed (nor run)
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 1000
        super().__init__(**kwargs)
        self.depths, self.num_heads, self.window_size = list(depths), list(num_heads), list(window_size)
        self.dim, self.in_dim, self.mlp_ratio = dim, in_dim, mlp_ratio
        self.drop_path_rate, self.layer_scale, self.layer_scale_conv = drop_path_rate, layer_scale, layer_scale_conv
        self.qkv_bias, self.qk_scale, self.drop_rate, self.attn_drop_rate = qkv_bias, qk_scale, drop_rate, attn_drop_rate
        self.in_chans = in_chans
        self.mean, self.std, self.crop_pct, self.crop_mode = list(mean), list(std), crop_pct, crop_mode
        self.input_size, self.interpolation = list(input_size), interpolation
        self.scan_impl, self.linear_impl = scan_impl, linear_impl

    def model_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``hymamba.MambaVision`` (without ``num_classes``)."""
        kwargs = {k: getattr(self, k) for k in _MODEL_FIELDS}
        kwargs.update(scan_impl=self.scan_impl, linear_impl=self.linear_impl)
        return kwargs

    @classmethod
    def from_variant(cls, name: str, **kwargs: Any) -> "MambaVisionConfig":
        """The config of a hymamba variant (``"mambavision_t"``, official names too), with overrides."""
        from hymamba.factory import resolve_model_name
        from hymamba.models.variants import VARIANTS

        variant = VARIANTS[resolve_model_name(name)]
        args, cfg = variant.args, variant.pretrained_cfg
        fields = {k: v for k, v in args.items() if k in _MODEL_FIELDS}
        for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation", "input_size"):
            fields[key] = cfg[key]
        fields["num_labels"] = cfg["num_classes"]
        fields.update(kwargs)
        return cls(**fields)
