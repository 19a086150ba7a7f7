"""``hymamba convert``: one classifier's weights between the three layouts people exchange.

- **official** ``*.pth.tar`` / ``*.pth``: what NVlabs/MambaVision's training writes and its model
  file loads, ``{"state_dict": {...}, "arch": "mamba_vision_T"}`` (timm's checkpoint layout; the
  official ``load_checkpoint`` and ours both read it).
- **ours** ``*.safetensors`` with ``*.json`` beside it (what ``hymamba train`` writes as
  ``model.safetensors`` + ``model.json``: the model name, class names, preprocessing, ablation options).
- **Hugging Face** a folder: ``config.json`` with the official snapshots' field names,
  ``model.safetensors`` with the ``model.`` prefix (as ``nvidia/MambaVision-*``), and
  ``preprocessor_config.json`` for ``transformers.AutoImageProcessor`` (a ``CLIPImageProcessor``:
  shortest edge resized to ``floor(size / crop_pct)`` bicubic, centre crop, rescale, normalise; with
  ``backend="pil"`` it gives our evaluation tensors exactly, except that where the resized long side
  exceeds the crop by an odd number of pixels transformers' crop starts one pixel earlier (it rounds
  the offset down, torchvision to the nearest even)).

Every source is read as :func:`~hymamba.weights.metadata.read_checkpoint` reads it (so training
checkpoints, EMA weights and official Hugging Face snapshots work too), loaded strictly into the
named architecture before anything is written (a mismatch is an error, never a half-converted
file), and written atomically; the tensors are copied bit for bit.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from hymamba.errors import CheckpointError, ConfigError
from hymamba.factory import create_model, load_checkpoint, resolve_model_name
from hymamba.models.options import DEFAULT_OPTIONS, options_from
from hymamba.models.variants import VARIANTS
from hymamba.utils.io import atomic_write, write_json_atomic
from hymamba.weights.io import save_safetensors
from hymamba.weights.metadata import class_names_from, read_checkpoint

__all__ = ["FORMATS", "convert", "output_format"]

#: the layouts, by what the destination looks like
FORMATS = ("official", "safetensors", "hf")
#: the architecture fields of an official config.json, and hymamba's constructor names for them
_HF_ARCH_FIELDS = ("dim", "in_dim", "depths", "num_heads", "window_size", "mlp_ratio", "layer_scale",
                   "layer_scale_conv")
_PREPROCESSING = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
#: PIL resampling numbers (what preprocessor_config.json's "resample" holds)
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


def output_format(dst: str | os.PathLike) -> str:
    """``"official"`` for ``*.pth(.tar)``, ``"safetensors"`` for ``*.safetensors``, ``"hf"`` for a folder."""
    name = Path(dst).name
    if name.endswith((".pth.tar", ".pth", ".tar")):
        return "official"
    if name.endswith(".safetensors"):
        return "safetensors"
    if Path(dst).is_file():
        raise ConfigError(f"{dst} is an existing file that is neither .pth(.tar) nor .safetensors; give FILE.pth.tar "
                          "(official), FILE.safetensors (hymamba) or a folder (Hugging Face)")
    return "hf"


def _name_from_config(meta: Mapping[str, Any]) -> Optional[str]:
    """The variant whose architecture a Hugging Face config.json describes, if any."""
    if not all(k in meta for k in ("dim", "depths", "num_heads")):
        return None
    for name, variant in VARIANTS.items():
        args = variant.args
        if all(_same(meta.get(k, args.get(k)), args.get(k)) for k in _HF_ARCH_FIELDS):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and list(a) == list(b)
    return a == b


def _resolve_name(model_name: Optional[str], meta: Mapping[str, Any], arch: Callable[[], Optional[str]]) -> str:
    """--model, else model.json's name, else a matching config.json, else the official file's ``arch``."""
    for given in (model_name, meta.get("model")):
        if given:
            try:
                return resolve_model_name(str(given))
            except (KeyError, ValueError, ConfigError):
                if given is model_name:
                    raise
    found = _name_from_config(meta)
    if found is not None:
        return found
    official = arch()  # reads the file again: only when nothing else names the model
    if official:
        try:
            return resolve_model_name(official)
        except ConfigError:
            raise ConfigError(f"the checkpoint's arch is {official!r}, which is none of hymamba's variants; say which "
                              "architecture it is with --model NAME (see 'hymamba models')") from None
    raise ConfigError("the source does not say which architecture it is (no model.json 'model', no 'arch', no "
                      "config.json matching a variant); say it with --model NAME (see 'hymamba models')")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, model_name: Optional[str] = None,
            use_ema: bool = False) -> Dict[str, Any]:
    """Convert ``src`` (any checkpoint hymamba reads) to ``dst`` (see :func:`output_format`).

    Args:
        src: an official ``.pth.tar``, a ``.safetensors`` (with its ``.json``), a training ``.pth``, a
            run folder's weights or a Hugging Face folder.
        dst: ``FILE.pth.tar`` (official), ``FILE.safetensors`` (+ ``FILE.json``) or a folder (Hugging Face).
        model_name: the architecture, when the source does not name it.
        use_ema: convert the EMA weights of a checkpoint that has them.
    Returns:
        ``{"src", "dst", "format", "model", "num_classes", "tensors", "files"}``.
    """
    src_path, dst_path = Path(src).expanduser(), Path(dst).expanduser()
    if src_path.resolve() == dst_path.resolve():
        raise ConfigError(f"the destination is the source ({src_path}); give another path")
    fmt = output_format(dst_path)
    ckpt = read_checkpoint(src_path, use_ema=use_ema)
    name = _resolve_name(model_name, ckpt.meta, lambda: _official_arch(src_path))
    num_classes = ckpt.num_classes or 0
    options = options_from(ckpt.meta)
    model = create_model(name, num_classes=num_classes, **options)
    try:
        load_checkpoint(model, ckpt, strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{src_path} is not a {name} checkpoint: {e}; give the right --model") from e
    sd = {k: v.contiguous() for k, v in ckpt.state_dict.items()}  # the source's tensors, dtype and all
    meta = _metadata(name, model, ckpt.meta, num_classes, options)
    if fmt == "official":
        official = VARIANTS[name].official_name or name
        files = [atomic_write(dst_path, lambda tmp: torch.save({"state_dict": sd, "arch": official}, tmp))]
    elif fmt == "safetensors":
        files = [save_safetensors(sd, dst_path, metadata={"format": "pt"}),
                 write_json_atomic(dst_path.with_suffix(".json"), meta)]
    else:
        changed = {k: v for k, v in options.items() if DEFAULT_OPTIONS.get(k) != v}
        if changed:
            raise ConfigError(f"a Hugging Face config.json cannot describe the ablation options {changed}: the "
                              "model would load as the official architecture; convert to .safetensors instead")
        config, processor = _hf_config(name, meta), image_processor_config(meta)  # both checked before writing
        dst_path.mkdir(parents=True, exist_ok=True)
        files = [save_safetensors({f"model.{k}": v for k, v in sd.items()}, dst_path / "model.safetensors",
                                  metadata={"format": "pt"}),
                 write_json_atomic(dst_path / "config.json", config),
                 write_json_atomic(dst_path / "preprocessor_config.json", processor)]
    return {"src": str(src_path), "dst": str(dst_path), "format": fmt, "model": name, "num_classes": num_classes,
            "tensors": len(sd), "files": [str(f) for f in files]}


def _official_arch(path: Path) -> Optional[str]:
    """The ``arch`` entry of an official (timm-style) checkpoint, if the file is one."""
    if path.is_dir() or path.suffix == ".safetensors":
        return None
    from hymamba.weights.io import read_file, weights_file

    try:
        obj = read_file(weights_file(path))
    except CheckpointError:
        return None
    arch = obj.get("arch") if isinstance(obj, Mapping) else None
    return arch if isinstance(arch, str) else None


def _metadata(name: str, model: torch.nn.Module, meta: Mapping[str, Any], num_classes: int,
              options: Mapping[str, str]) -> Dict[str, Any]:
    """model.json: the name, the classes, the preprocessing (the source's, else the variant's), the options."""
    cfg = model.pretrained_cfg
    out: Dict[str, Any] = {"model": name, "num_classes": num_classes}
    names = class_names_from(meta, num_classes)
    if names is not None:
        out["class_names"] = names
    for key in _PREPROCESSING:
        value = meta.get(key, cfg.get(key))
        out[key] = list(value) if isinstance(value, tuple) else value
    out.update(options)
    return out


def _hf_config(name: str, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """config.json in the official snapshots' field names (readable by their remote code and by hymamba.hf)."""
    args = VARIANTS[name].args
    config: Dict[str, Any] = {"architectures": ["MambaVisionModelForImageClassification"], "model_type": "mambavision"}
    for key in _HF_ARCH_FIELDS + ("drop_path_rate",):
        value = args.get(key)
        config[key] = list(value) if isinstance(value, tuple) else value
    for key in _PREPROCESSING:
        config[key] = meta[key]
    names: List[str] = meta.get("class_names") or [f"LABEL_{i}" for i in range(meta["num_classes"])]
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    config["torch_dtype"] = "float32"
    return config


def image_processor_config(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """preprocessor_config.json for ``AutoImageProcessor``: our evaluation preprocessing (see the module docstring)."""
    size = int(meta["input_size"][-1])
    if meta.get("crop_mode", "center") != "center":
        raise ConfigError(f"crop_mode {meta['crop_mode']!r} has no transformers image processor; only 'center' does")
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": int(math.floor(size / float(meta["crop_pct"])))},
        "resample": _RESAMPLE.get(str(meta["interpolation"]), 3),
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(meta["mean"]),
        "image_std": list(meta["std"]),
    }
