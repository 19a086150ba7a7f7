"""Creating models by name, and the only place that puts weights into a new model.

- :func:`create_model`: a variant by name (official names are aliases), optionally with weights
  (``checkpoint_path=`` or ``pretrained=True`` from a local file; nothing is downloaded);
- :func:`load_checkpoint`: weights into an existing model, with a report;
- :func:`load_trained_model`: a classifier with trained weights, for evaluation and prediction;
- :func:`create_backbone`: the dense backbone (the official ``MM_mamba_vision``) of a variant, with
  ImageNet or official dense (mmengine) weights;
- :func:`create_segmenter`: an official UPerNet segmenter (ADE20K configs), with official weights;
- :func:`load_trained_segmenter`: a segmenter with trained weights (a run of ``hymamba segment train``
  or an official checkpoint), for evaluation and prediction;
- :func:`create_detector`: a torchvision Mask / Faster R-CNN on the dense backbone (COCO settings),
  with backbone weights (ImageNet, official dense) or our own whole-detector weights;
  :func:`load_trained_detector`: a run of ``hymamba detect train``, for evaluation and prediction;
- the timm registration: every variant is a timm model (``timm.create_model("mambavision_t")``),
  whose entrypoint is :func:`create_model`, so ``pretrained=True``/``checkpoint_path=`` work there too.

Weights are read once, checked against the model before anything is loaded (no half-loaded
models), and a checkpoint that does not fit names the variant whose shapes it has.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet

from hymamba.errors import CheckpointError, ConfigError, WeightsNotFound
from hymamba.models.backbone import OFFICIAL_DENSE_DROP_PATH, MambaVisionBackbone
from hymamba.models.mambavision import MambaVision
from hymamba.models.options import options_from
from hymamba.models.detectors import DETECTORS
from hymamba.models.segmenters import SEGMENTERS
from hymamba.models.upernet import Segmenter, build_segmenter
from hymamba.models.variants import VARIANTS
from hymamba.weights.io import checkpoint_dir
from hymamba.weights.load import LoadReport, load_state_dict
from hymamba.weights.metadata import Checkpoint, read_checkpoint

__all__ = ["ALIASES", "create_backbone", "create_detector", "create_model", "create_segmenter", "detect_variant",
           "list_models", "load_backbone_weights",
           "load_checkpoint", "load_trained_detector", "load_trained_model", "load_trained_segmenter",
           "official_weights_path",
           "resolve_model_name"]

PathLike = Union[str, os.PathLike]

logger = logging.getLogger("hymamba")

#: official model names (as in NVlabs/MambaVision) -> hymamba names
ALIASES = {v.official_name: name for name, v in VARIANTS.items() if v.official_name}
#: a checkpoint "fits except the head" when only these keys are mis-shaped (fine-tuning: a new classifier)
HEAD_PREFIXES = ("head.",)
_FEATURE_KEYS = ("out_indices", "feature_cls", "output_fmt", "norm", "prune", "flatten_sequential", "feature_cfg")


def list_models(pattern: str = "*") -> List[str]:
    """hymamba model names matching a shell-style ``pattern``."""
    return [n for n in VARIANTS if fnmatch.fnmatch(n, pattern)]


def resolve_model_name(name: str) -> str:
    """Map an official or differently-cased name to a hymamba name; raise with suggestions."""
    if name in VARIANTS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    lowered = {k.lower(): v for k, v in ALIASES.items()}
    key = name.lower().replace("-", "_")
    if key in VARIANTS:
        return key
    if key in lowered:
        return lowered[key]
    raise ConfigError(
        f"unknown model {name!r}. Known models: {', '.join(VARIANTS)} "
        f"(official names such as {', '.join(list(ALIASES)[:2])} also work)"
    )


# ----------------------------------------------------------------------------------------------
# variant detection (for error messages)


@lru_cache(maxsize=None)
def _variant_shapes(name: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = MambaVision(**VARIANTS[name].args)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES))


def detect_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Name of the variant whose keys and shapes match ``state_dict`` (the head may differ)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
    for name in VARIANTS:
        if dict(_variant_shapes(name)) == shapes:
            return name
    return None


def _hint(state_dict: Dict[str, torch.Tensor]) -> str:
    variant = detect_variant(state_dict)
    if variant:
        return (f"the checkpoint's shapes match the variant '{variant}': "
                f"use hymamba.create_model('{variant}', checkpoint_path=...)")
    return "the checkpoint matches no known MambaVision variant"


# ----------------------------------------------------------------------------------------------
# weights into models


def load_checkpoint(model: nn.Module, path: Union[PathLike, Checkpoint], strict: bool = True,
                    use_ema: bool = False) -> LoadReport:
    """Load a checkpoint file or folder (or an already read :class:`Checkpoint`) into ``model``.

    Args:
        model: the model to fill.
        path: an official ``.pth.tar``, a Hugging Face folder, a safetensors file, a training checkpoint.
        strict: raise :class:`CheckpointError` unless every key matches in name and shape; nothing is
            loaded then. With ``strict=False``, mis-shaped tensors (e.g. a classifier for another
            class count) are skipped and reported.
        use_ema: load the EMA weights.
    Returns:
        A :class:`~hymamba.weights.load.LoadReport` of missing, unexpected and mis-shaped keys.
    """
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path, use_ema=use_ema)
    return load_state_dict(model, ckpt.state_dict, strict=strict, source=str(ckpt.path),
                           hint=lambda: _hint(ckpt.state_dict))


def official_weights_path(name: str) -> Path:
    """The local file (or Hugging Face folder) of ``name``'s official weights; never downloads."""
    variant = VARIANTS[resolve_model_name(name)]
    cfg = variant.pretrained_cfg
    if not variant.has_official_weights:
        raise CheckpointError(f"'{variant.name}' has no official weights; pass checkpoint_path=... to load your own")
    folder = checkpoint_dir()
    candidates = [folder / cfg["hf_hub_filename"], folder / cfg["hf_hub_id"].split("/")[-1]]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise WeightsNotFound(
            f"no local weights for '{variant.name}'. hymamba never downloads: fetch {cfg['url']} by hand "
            f"and put it in {folder} (or set HYMAMBA_CHECKPOINT_DIR), or pass checkpoint_path=..."
        )
    return found


def _wrap_features(model: MambaVision, options: Dict[str, Any]) -> nn.Module:
    """timm's ``features_only`` wrapper, applied after the weights are in (it prunes the head)."""
    options = dict(options.pop("feature_cfg", None) or {}, **options)
    feature_cls = options.pop("feature_cls", "getter")
    options.pop("flatten_sequential", None)
    if feature_cls not in ("getter", FeatureGetterNet):
        raise ConfigError(f"MambaVision's features_only supports feature_cls='getter' (stage outputs through "
                          f"forward_intermediates), got {feature_cls!r}")
    options.setdefault("out_indices", (0, 1, 2, 3))
    wrapped = FeatureGetterNet(model, **options)
    wrapped.pretrained_cfg = wrapped.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return wrapped


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: Optional[PathLike] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a model by name.

    Args:
        name: a name from :func:`list_models` or an official name (``mamba_vision_T``, ...).
        pretrained: load the official weights from a local file (see
            :func:`hymamba.weights.checkpoint_dir`); nothing is downloaded.
        checkpoint_path: a checkpoint to load (official ``.pth.tar``, Hugging Face folder,
            safetensors or a training checkpoint). Unless ``num_classes`` is given, the classifier
            takes the checkpoint's size; ``mixer_variant``/``attention_pattern`` recorded beside
            the weights (``model.json``) apply too. Only the classifier may differ in shape (it is
            then freshly initialised); anything else that does not fit raises CheckpointError.
        **kwargs: constructor overrides (``num_classes``, ``drop_path_rate``, ``scan_impl``,
            ``features_only``, ``out_indices``, ...).
    Returns:
        The model (in train mode, as timm returns it); with ``features_only=True`` timm's feature
        wrapper around it, weights loaded first.
    """
    name = resolve_model_name(name)
    if pretrained and checkpoint_path is None:
        checkpoint_path = official_weights_path(name)
    ckpt = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None:
        if "num_classes" not in kwargs and ckpt.num_classes is not None:
            kwargs["num_classes"] = ckpt.num_classes
        for key, value in options_from(ckpt.meta).items():  # ablation options the weights were trained with
            kwargs.setdefault(key, value)
    features_only = bool(kwargs.pop("features_only", False))
    feature_options = {k: kwargs.pop(k) for k in _FEATURE_KEYS if k in kwargs}
    model_args = dict(VARIANTS[name].args, **kwargs)
    model = build_model_with_cfg(MambaVision, name, pretrained=False, **model_args)
    if ckpt is not None:
        load_state_dict(model, ckpt.state_dict, strict=True, ignore_mismatch=HEAD_PREFIXES, source=str(ckpt.path),
                        hint=lambda: _hint(ckpt.state_dict))
    return _wrap_features(model, feature_options) if features_only else model


def load_trained_model(name: str, checkpoint: Optional[PathLike] = None, *, pretrained: bool = False,
                       use_ema: bool = False, scan_impl: str = "auto") -> Tuple[nn.Module, Dict[str, Any]]:
    """A classifier with trained weights, and the metadata that came with them (for evaluation).

    The classifier takes the checkpoint's class count and must load exactly. Raises ConfigError
    when neither ``checkpoint`` nor ``pretrained`` is given (evaluating random weights is never
    what is wanted).
    """
    if checkpoint is None and not pretrained:
        raise ConfigError("no weights to evaluate: pass --checkpoint PATH (a model.safetensors, a training .pth, "
                          "an official .pth.tar or a Hugging Face folder) or --pretrained")
    ckpt = read_checkpoint(checkpoint if checkpoint is not None else official_weights_path(name), use_ema=use_ema)
    if ckpt.num_classes is None:
        raise CheckpointError(f"{ckpt.path} has no classifier head (no head.weight); it cannot classify images")
    model = create_model(name, num_classes=ckpt.num_classes, scan_impl=scan_impl, **options_from(ckpt.meta))
    load_checkpoint(model, ckpt, strict=True)
    return model, ckpt.meta


# ----------------------------------------------------------------------------------------------
# the dense backbone

#: what a classification checkpoint has that the backbone has not (dropped, and reported)
CLASSIFIER_PREFIXES = ("head.", "norm.")
#: where a dense (mmengine) checkpoint keeps the backbone
DENSE_PREFIX = "backbone."


def create_backbone(
    name: str,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    window_size: Optional[Sequence[int]] = None,
    drop_path_rate: Optional[float] = None,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    checkpoint_path: Optional[PathLike] = None,
    **overrides: Any,
) -> MambaVisionBackbone:
    """A variant's dense backbone (:class:`~hymamba.models.backbone.MambaVisionBackbone`), with weights.

    Args:
        name: a name from :func:`list_models` or an official name.
        out_indices: the levels whose (outnorm-ed) maps are returned.
        window_size: windows per level, e.g. ``(8, 8, 64, 32)`` as the official ADE20K tiny config
            (default: the variant's ImageNet windows).
        drop_path_rate: stochastic depth (default 0.2: what every official dense run used, whatever
            its config said).
        frozen_stages, norm_eval: see :class:`~hymamba.models.backbone.MambaVisionBackbone`.
        checkpoint_path: weights to load:

            - an ImageNet checkpoint (official ``.pth.tar``, Hugging Face folder, safetensors, a
              training checkpoint): its ``head.*`` and final ``norm.*`` are dropped, the outnorms keep
              their fresh values (weight 1, bias 0);
            - an official dense checkpoint (mmengine ``.pth`` of a segmenter or detector): its
              ``backbone.*`` tensors are taken, everything else (heads, necks) is left out.

            Both are strict on the backbone's own keys: a missing or mis-shaped one raises
            :class:`CheckpointError` and nothing is loaded. What was left out and what stayed fresh
            is logged and kept as ``model.load_report`` (a :class:`~hymamba.weights.load.LoadReport`:
            ``unexpected`` = the file's keys not loaded, ``missing`` = the backbone's keys left fresh).
        **overrides: constructor arguments over the variant's (``num_heads``, ``scan_impl``,
            ``norm_layer``, ``layer_scale``, ...); ``pretrained=True`` loads the variant's official
            ImageNet weights from a local file, as :func:`create_model` (nothing is downloaded).
    """
    name = resolve_model_name(name)
    if overrides.pop("pretrained", False) and checkpoint_path is None:
        checkpoint_path = official_weights_path(name)
    ckpt = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    args = {k: v for k, v in VARIANTS[name].args.items() if k != "num_classes"}
    if ckpt is not None:
        for key, value in options_from(ckpt.meta).items():  # ablation options the weights were trained with
            overrides.setdefault(key, value)
    args.update(overrides)
    args["drop_path_rate"] = OFFICIAL_DENSE_DROP_PATH if drop_path_rate is None else drop_path_rate
    if window_size is not None:
        args["window_size"] = tuple(window_size)
    model = MambaVisionBackbone(out_indices=out_indices, frozen_stages=frozen_stages, norm_eval=norm_eval, **args)
    model.load_report = None
    if ckpt is not None:
        model.load_report = load_backbone_weights(model, ckpt)
    return model


def load_backbone_weights(model: MambaVisionBackbone, ckpt: Checkpoint) -> LoadReport:
    """Load an ImageNet or dense checkpoint into a backbone (see :func:`create_backbone`); all or nothing."""
    sd = ckpt.state_dict
    dense = any(k.startswith(DENSE_PREFIX) for k in sd)
    if dense:
        own = {k[len(DENSE_PREFIX):]: v for k, v in sd.items() if k.startswith(DENSE_PREFIX)}
        left_out = [k for k in sd if not k.startswith(DENSE_PREFIX)]
    else:
        own = {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}
        left_out = [k for k in sd if k.startswith(CLASSIFIER_PREFIXES)]
    prefix = DENSE_PREFIX if dense else ""
    outnorms = {f"outnorm{i}." for i in model.out_indices}
    for k in [k for k in own if k.startswith("outnorm") and not k.startswith(tuple(outnorms))]:
        own.pop(k)  # the norm of a map this backbone does not return
        left_out.append(prefix + k)
    fresh = []
    if not any(k.startswith("outnorm") for k in own):  # an ImageNet checkpoint: the outnorms start fresh
        fresh = [k for k in model.state_dict() if k.startswith(tuple(outnorms))]
        own.update({k: v for k, v in model.state_dict().items() if k in fresh})
    load_state_dict(model, own, strict=True, source=str(ckpt.path), hint=lambda: _backbone_hint(own))
    report = LoadReport(missing=fresh, unexpected=left_out, source=str(ckpt.path))
    logger.info("%s: loaded %d backbone tensors (%s checkpoint); left out %d keys%s; left fresh: %s", ckpt.path,
                len(own) - len(fresh), "dense" if dense else "classification", len(left_out),
                f" ({', '.join(left_out[:6])}{', ...' if len(left_out) > 6 else ''})" if left_out else "",
                ", ".join(fresh) or "nothing")
    return report


def _backbone_hint(sd: Dict[str, torch.Tensor]) -> str:
    """Which variant's stem and levels have the shapes of ``sd`` (for error messages)."""
    body = ("patch_embed.", "levels.")
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(body)}
    for name in VARIANTS:
        if {k: v for k, v in _variant_shapes(name) if k.startswith(body)} == shapes:
            return (f"the checkpoint's stem and levels match the variant '{name}': "
                    f"use hymamba.create_backbone('{name}', checkpoint_path=...)")
    return "the checkpoint's stem and levels match no known MambaVision variant"


# ----------------------------------------------------------------------------------------------
# the segmenters (UPerNet)

#: create_segmenter overrides that shape the heads (the rest go to the backbone)
_HEAD_KEYS = ("channels", "aux_channels", "pool_scales", "aux_index", "dropout_ratio")


def create_segmenter(name: str, num_classes: int = 150, checkpoint_path: Union[PathLike, Checkpoint, None] = None,
                     **overrides: Any) -> Segmenter:
    """An official UPerNet segmenter (:class:`~hymamba.models.upernet.Segmenter`), with its weights.

    Args:
        name: ``upernet_mambavision_{t,s,b,l3}`` (:data:`~hymamba.models.segmenters.SEGMENTERS`); the
            defaults are the official ADE20K configs (windows, drop path, layer scale, UPerHead 512 and
            FCNHead 256 channels).
        num_classes: output classes (ADE20K: 150).
        checkpoint_path: an official mmengine ``.pth`` (or any file :func:`read_checkpoint` reads) of
            the whole segmenter (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``): loaded with
            ``strict=True``, nothing loaded when it does not fit (:class:`CheckpointError`). Class names
            and palette from its ``meta`` become ``model.class_names`` and ``model.palette``.
        **overrides: head settings (``channels``, ``aux_channels`` (0/None: no auxiliary head),
            ``pool_scales``, ``aux_index``, ``dropout_ratio``) and backbone arguments
            (``window_size``, ``drop_path_rate``, ``frozen_stages``, ``norm_eval``, ``scan_impl``, ...).
    Returns:
        The segmenter in train mode.
    """
    if name not in SEGMENTERS:
        raise ConfigError(f"unknown segmenter {name!r}. Known segmenters: {', '.join(SEGMENTERS)}")
    spec = SEGMENTERS[name]
    head = dict(channels=spec.channels, aux_channels=spec.aux_channels, pool_scales=spec.pool_scales,
                aux_index=spec.aux_index, dropout_ratio=spec.dropout_ratio)
    head.update({k: overrides.pop(k) for k in _HEAD_KEYS if k in overrides})
    ckpt = (checkpoint_path if isinstance(checkpoint_path, Checkpoint) or checkpoint_path is None
            else read_checkpoint(checkpoint_path))
    overrides.setdefault("window_size", spec.window_size)
    overrides.setdefault("drop_path_rate", spec.drop_path_rate)
    backbone = create_backbone(spec.backbone, **overrides)
    model = build_segmenter(backbone, num_classes, **head)
    if ckpt is not None:
        load_state_dict(model, ckpt.state_dict, strict=True, source=str(ckpt.path))
        classes, palette = ckpt.meta.get("classes"), ckpt.meta.get("palette")
        model.class_names = list(classes) if classes is not None and len(classes) == num_classes else None
        model.palette = [list(c) for c in palette] if palette is not None and len(palette) == num_classes else None
    return model


#: the classifier of the decode head: its rows are the segmenter's classes
_SEG_CLASSIFIER = "decode_head.conv_seg.weight"


def load_trained_segmenter(checkpoint: PathLike, name: Optional[str] = None, *, use_ema: bool = False,
                           scan_impl: str = "auto") -> Tuple[Segmenter, Dict[str, Any]]:
    """A segmenter with trained weights, and the metadata that came with them (for evaluation).

    Args:
        checkpoint: a run folder's ``model.safetensors`` (its ``model.json`` says how to rebuild the
            segmenter), a training checkpoint (``last.pth``/``best.pth``), or an official mmengine
            ``.pth`` (then ``name`` says which segmenter it is).
        name: ``upernet_mambavision_{t,s,b,l3}`` for files without hymamba's metadata; for our own
            runs it may be left out (given, it must agree with the metadata).
    Returns:
        ``(model in eval mode, metadata)``; the model has ``class_names`` and ``palette`` (None
        where the file has none) and loads the file with ``strict=True``.
    """
    ckpt = read_checkpoint(checkpoint, use_ema=use_ema)
    meta = dict(ckpt.meta)
    if _SEG_CLASSIFIER not in ckpt.state_dict:
        raise CheckpointError(f"{ckpt.path} is not a segmenter checkpoint (it has no {_SEG_CLASSIFIER}); for a "
                              "classifier use 'hymamba validate' / 'hymamba predict'")
    num_classes = int(ckpt.state_dict[_SEG_CLASSIFIER].shape[0])
    if meta.get("task") == "segmentation":
        if name is not None and name != meta.get("model"):
            raise ConfigError(f"{ckpt.path} holds {meta.get('model')!r} (see its metadata), not {name!r}; "
                              "leave the model name out")
        kwargs: Dict[str, Any] = dict(drop_path_rate=0.0, scan_impl=scan_impl)
        if meta.get("window_size"):
            kwargs["window_size"] = tuple(meta["window_size"])
        for key, value in options_from(meta).items():
            kwargs.setdefault(key, value)
        backbone = create_backbone(meta["backbone"], **kwargs)
        model = build_segmenter(backbone, num_classes, channels=int(meta["channels"]),
                                aux_channels=meta.get("aux_channels"), pool_scales=tuple(meta["pool_scales"]),
                                aux_index=int(meta["aux_index"]), dropout_ratio=float(meta["dropout_ratio"]),
                                align_corners=bool(meta.get("align_corners", False)))
        load_state_dict(model, ckpt.state_dict, strict=True, source=str(ckpt.path))
        classes, palette = meta.get("class_names"), meta.get("palette")
    elif name is None:
        raise ConfigError(f"{ckpt.path} does not say which segmenter it holds (no model.json with 'task: "
                          f"segmentation' beside it); name it, e.g. --model upernet_mambavision_t "
                          f"(known: {', '.join(SEGMENTERS)})")
    else:
        aux = any(k.startswith("auxiliary_head.") for k in ckpt.state_dict)
        model = create_segmenter(name, num_classes=num_classes, checkpoint_path=ckpt, scan_impl=scan_impl,
                                 drop_path_rate=0.0, **({} if aux else {"aux_channels": None}))
        classes, palette = model.class_names, model.palette
        meta.setdefault("model", name)
    model.class_names = [str(c) for c in classes] if classes is not None and len(classes) == num_classes else None
    model.palette = ([[int(v) for v in c] for c in palette]
                     if palette is not None and len(palette) == num_classes else None)
    return model.eval(), meta


# ----------------------------------------------------------------------------------------------
# the detectors (torchvision Mask / Faster R-CNN)

#: where our own detectors keep the backbone (MambaVisionFPN.body inside torchvision's ``backbone``)
_DETECTOR_BODY = "backbone.body."


def _as_checkpoint(path: Union[PathLike, Checkpoint]) -> Checkpoint:
    return path if isinstance(path, Checkpoint) else read_checkpoint(path)


def _load_detector_backbone(backbone: MambaVisionBackbone, ckpt: Checkpoint) -> LoadReport:
    """:func:`load_backbone_weights`, also from one of our detectors (its ``backbone.body.*``)."""
    sd = ckpt.state_dict
    if not any(k.startswith(_DETECTOR_BODY) for k in sd):
        return load_backbone_weights(backbone, ckpt)
    body = {DENSE_PREFIX + k[len(_DETECTOR_BODY):]: v for k, v in sd.items() if k.startswith(_DETECTOR_BODY)}
    report = load_backbone_weights(backbone, Checkpoint(path=ckpt.path, state_dict=body, meta=ckpt.meta))
    report.unexpected = ([_DETECTOR_BODY + k[len(DENSE_PREFIX):] for k in report.unexpected]
                         + [k for k in sd if not k.startswith(_DETECTOR_BODY)])
    return report


def create_detector(name: str, num_classes: Optional[int] = None,
                    checkpoint_path: Union[PathLike, Checkpoint, None] = None,
                    backbone_checkpoint: Union[PathLike, Checkpoint, None] = None, **overrides: Any) -> nn.Module:
    """A torchvision Mask R-CNN or Faster R-CNN on MambaVision (:mod:`hymamba.models.detection`), with weights.

    Args:
        name: ``{maskrcnn,fasterrcnn}_mambavision_{t,s,b}``
            (:data:`~hymamba.models.detectors.DETECTORS`); the backbone defaults are the official COCO
            configs' (windows (8, 8, 112, 56), configured drop path, layer scale).
        num_classes: classes including the background (torchvision's convention). Default: the
            checkpoint's (``checkpoint_path``), else 91 (COCO in torchvision's numbering).
        checkpoint_path: our own whole-detector state dict (safetensors, a ``.pth`` of
            ``model.state_dict()``, a training checkpoint): loaded with ``strict=True``; nothing is
            loaded when it does not fit (:class:`CheckpointError`).
        backbone_checkpoint: backbone weights only, through :func:`load_backbone_weights`: an ImageNet
            checkpoint, an official dense mmengine file (e.g. the official Cascade Mask R-CNN:
            its ``backbone.*``), or one of our detectors (its ``backbone.body.*``). Strict on the
            backbone's keys; what was left out (necks, heads) is in ``model.load_report``.
        **overrides: torchvision detector arguments (``min_size``, ``max_size``, ``box_score_thresh``,
            ``rpn_*``, ``box_*``, ``size_divisible``, ...) and ``fpn_channels`` go to
            :func:`~hymamba.models.detection.build_detector`; the rest to :func:`create_backbone`
            (``window_size``, ``drop_path_rate``, ``frozen_stages``, ``norm_eval``, ``scan_impl``, ...).
    Returns:
        The detector in train mode, with ``load_report`` (a :class:`LoadReport`, or None without weights).
    """
    from hymamba.models.detection import build_detector, detector_kwargs

    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}. Known detectors: {', '.join(DETECTORS)}")
    if checkpoint_path is not None and backbone_checkpoint is not None:
        raise ConfigError("pass checkpoint_path (a whole detector) or backbone_checkpoint (backbone weights), not both")
    spec = DETECTORS[name]
    det_keys = set(detector_kwargs(spec.kind)) | {"fpn_channels", "head_channels"}
    det_kwargs: Dict[str, Any] = dict(fpn_channels=spec.fpn_channels, min_size=spec.min_size, max_size=spec.max_size)
    det_kwargs.update({k: overrides.pop(k) for k in list(overrides) if k in det_keys})
    ckpt = _as_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    bb_ckpt = _as_checkpoint(backbone_checkpoint) if backbone_checkpoint is not None else None
    for weights in (ckpt, bb_ckpt):
        for key, value in options_from(weights.meta if weights is not None else {}).items():
            overrides.setdefault(key, value)  # ablation options the weights were trained with
    if num_classes is None:
        cls_score = ckpt.state_dict.get("roi_heads.box_predictor.cls_score.weight") if ckpt is not None else None
        num_classes = int(cls_score.shape[0]) if cls_score is not None else spec.num_classes
    overrides.setdefault("window_size", spec.window_size)
    overrides.setdefault("drop_path_rate", spec.drop_path_rate)
    backbone = create_backbone(spec.backbone, **overrides)
    report = _load_detector_backbone(backbone, bb_ckpt) if bb_ckpt is not None else None
    model = build_detector(backbone, spec.kind, num_classes, **det_kwargs)
    if ckpt is not None:
        report = load_state_dict(model, ckpt.state_dict, strict=True, source=str(ckpt.path))
    model.load_report = report
    return model


def load_trained_detector(checkpoint: PathLike, *, use_ema: bool = False,
                          scan_impl: str = "auto") -> Tuple[nn.Module, Dict[str, Any]]:
    """A detector trained with ``hymamba detect train`` (a run folder, its ``model.safetensors`` or a
    ``.pth`` it wrote), rebuilt from its metadata and loaded with ``strict=True``, in eval mode, with
    ``class_names``; and the metadata."""
    from hymamba.models.detection import build_detector

    ckpt = read_checkpoint(checkpoint, use_ema=use_ema)
    meta = dict(ckpt.meta)
    if meta.get("task") != "detection":
        raise CheckpointError(f"{ckpt.path} is not a detector run of hymamba (no model.json with 'task: detection' "
                              "beside it); for an official Cascade Mask R-CNN file, take its backbone with "
                              "create_detector(name, backbone_checkpoint=...)")
    kwargs: Dict[str, Any] = dict(drop_path_rate=0.0, scan_impl=scan_impl)
    if meta.get("window_size"):
        kwargs["window_size"] = tuple(meta["window_size"])
    backbone = create_backbone(meta["backbone"], **kwargs)
    model = build_detector(backbone, meta["kind"], int(meta["num_classes"]), **dict(meta.get("detector_kwargs") or {}))
    load_state_dict(model, ckpt.state_dict, strict=True, source=str(ckpt.path))
    names = meta.get("class_names")
    model.class_names = [str(c) for c in names] if names and len(names) == int(meta["num_classes"]) - 1 else None
    return model.eval(), meta


# ----------------------------------------------------------------------------------------------
# timm registration: each variant's entrypoint is create_model


default_cfgs = generate_default_cfgs({name: dict(v.pretrained_cfg) for name, v in VARIANTS.items()})


def _entrypoint(name: str) -> Any:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name}: see hymamba.create_model."
    return register_model(entrypoint)


for _name in VARIANTS:
    globals()[_name] = _entrypoint(_name)
del _name
