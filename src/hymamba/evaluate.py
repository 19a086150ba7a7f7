"""Evaluation: top-1/top-5/loss on a data set (``hymamba validate``) and top-k predictions
(``hymamba predict``).

Preprocessing comes from the model's pretrained config, overridden by the ``model.json`` (or
Hugging Face ``config.json``) stored beside the weights, through timm's ``resolve_data_config`` and
``create_transform``: resize by ``crop_pct``, center crop or squash, interpolation, mean/std — what
the official validation script does, so the numbers match it for the same weights and data.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hymamba.distributed import Dist

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate", "load_model", "model_class_names", "predict", "resolve_preprocessing",
           "validate"]


@dataclass
class EvalResult:
    """Metrics of one pass over a data set (accuracies in percent)."""

    top1: float
    top5: float
    loss: float
    count: int
    per_class: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Mixed-precision context for ``device`` (no-op when ``dtype`` is None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, dist: Optional[Dist] = None, class_names: Optional[Sequence[str]] = None,
             target_map: Optional[torch.Tensor] = None) -> EvalResult:
    """Top-1/top-5 accuracy and mean cross-entropy of ``model`` over ``loader``, summed over ranks.

    Args:
        model: the classifier (put in eval mode here).
        loader: yields (images, targets, unreadable paths) as :func:`hymamba.data.collate_batch` makes them.
        device: where to run.
        amp_dtype: autocast dtype, or None for full precision.
        channels_last: feed channels_last tensors.
        dist: the process group; each rank sees its shard and the sums are reduced.
        class_names: the data set's classes; when given, per-class accuracy is computed.
        target_map: data-set class index -> model output index (when the orders differ).
    Returns:
        An :class:`EvalResult`: metrics identical on every rank; ``skipped`` lists this rank's
        unreadable images.
    """
    dist = dist or Dist(device=device)
    model.eval()
    num_classes = len(class_names) if class_names is not None else 0
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1 hits, top-5 hits, images
    per_class = torch.zeros(2, max(num_classes, 1), dtype=torch.float64)  # hits, images
    skipped: List[str] = []
    for images, targets, bad in loader:
        skipped.extend(bad)
        if images.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)
        model_targets = target_map.to(device)[targets] if target_map is not None else targets
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit1 = top[:, 0] == model_targets
        hitk = (top == model_targets[:, None]).any(dim=1)
        sums += torch.tensor([F.cross_entropy(logits, model_targets, reduction="sum").item(),
                              hit1.sum().item(), hitk.sum().item(), len(targets)], dtype=torch.float64)
        if num_classes:
            t = targets.cpu()
            per_class[0] += torch.bincount(t, weights=hit1.cpu().double(), minlength=num_classes)
            per_class[1] += torch.bincount(t, minlength=num_classes).double()
    sums = torch.tensor(dist.all_reduce_sum(sums.tolist()), dtype=torch.float64)
    if num_classes:
        per_class = dist.all_reduce_tensor_(per_class.to(dist._comm_device())).cpu()
    n = int(sums[3].item())
    if n == 0:
        raise ValueError("no image could be evaluated: every image in the split was unreadable")
    result = EvalResult(top1=100.0 * sums[1].item() / n, top5=100.0 * sums[2].item() / n,
                        loss=sums[0].item() / n, count=n, skipped=skipped)
    if num_classes:
        result.per_class = [
            {"class": name, "images": int(per_class[1, i].item()),
             "top1": 100.0 * per_class[0, i].item() / per_class[1, i].item() if per_class[1, i] > 0 else None}
            for i, name in enumerate(class_names or [])
        ]
    return result


# ----------------------------------------------------------------------------------------------
# models and their metadata


def model_metadata(checkpoint: Optional[str | os.PathLike]) -> Dict[str, Any]:
    """Preprocessing and class names of a checkpoint: the ``model.json`` / HF ``config.json`` beside
    it, or those stored inside a training checkpoint (``last.pth``/``best.pth``); else {}."""
    if checkpoint is None:
        return {}
    from hymamba.checkpoint import read_config
    from hymamba.train_state import FORMAT

    meta = read_config(checkpoint)
    if meta:
        return meta
    path = Path(checkpoint)
    if not path.is_file() or path.suffix == ".safetensors":
        return {}
    try:  # memory-mapped: only the small entries are read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours (e.g. an official file with pickled arguments): no metadata
        return {}
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return {}
    return dict(state.get("data_config", {}), **state.get("architecture", {}), class_names=state.get("class_names"))


def model_class_names(meta: Dict[str, Any], num_outputs: int) -> Optional[List[str]]:
    """Class names from ``model.json`` (``class_names``) or a Hugging Face config (``id2label``)."""
    names = meta.get("class_names")
    if names is None and isinstance(meta.get("id2label"), dict):
        id2label = meta["id2label"]
        names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if names is None or len(names) != num_outputs or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def load_model(model_name: str, checkpoint: Optional[str | os.PathLike] = None, *, pretrained: bool = False,
               use_ema: bool = False, scan_impl: str = "auto") -> nn.Module:
    """A model with trained weights for evaluation: from ``checkpoint`` or the official weights.

    The classifier takes the checkpoint's class count. Raises ``ValueError`` when neither source
    is given (evaluating random weights is never what is wanted).
    """
    from hymamba.checkpoint import checkpoint_num_classes, load_checkpoint
    from hymamba.factory import create_model
    from hymamba.models.mambavision import ABLATION_OPTIONS

    if checkpoint is None and not pretrained:
        raise ValueError("no weights to evaluate: pass --checkpoint PATH (a model.safetensors, a training .pth, "
                         "an official .pth.tar or a Hugging Face folder) or --pretrained")
    if checkpoint is None:
        return create_model(model_name, pretrained=True, scan_impl=scan_impl)
    num_classes = checkpoint_num_classes(checkpoint)
    if num_classes is None:
        raise ValueError(f"{checkpoint} has no classifier head (no head.weight); it cannot classify images")
    meta = model_metadata(checkpoint)  # ablation options the weights were trained with, if any
    architecture = {k: meta[k] for k in ABLATION_OPTIONS if isinstance(meta.get(k), str)}
    model = create_model(model_name, num_classes=num_classes, scan_impl=scan_impl, **architecture)
    load_checkpoint(model, checkpoint, strict=True, use_ema=use_ema)
    return model


def resolve_preprocessing(model: nn.Module, meta: Dict[str, Any], *, input_size: Optional[int] = None,
                          crop_pct: Optional[float] = None, crop_mode: Optional[str] = None,
                          interpolation: Optional[str] = None) -> Dict[str, Any]:
    """timm data config: model defaults < ``meta`` (beside the weights) < explicit arguments."""
    from timm.data import resolve_data_config

    args: Dict[str, Any] = {}
    for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation"):
        if meta.get(key) is not None:
            args[key] = tuple(meta[key]) if isinstance(meta[key], list) else meta[key]
    if meta.get("input_size") is not None:
        args["input_size"] = tuple(meta["input_size"])
    if input_size is not None:
        args["input_size"] = (3, input_size, input_size)
    for key, value in (("crop_pct", crop_pct), ("crop_mode", crop_mode), ("interpolation", interpolation)):
        if value is not None:
            args[key] = value
    if args.get("crop_mode", "center") not in ("center", "squash", "border"):
        raise ValueError(f"crop_mode must be center, squash or border, got {args['crop_mode']!r}")
    return resolve_data_config(args, model=model)


def _target_map(model_names: Optional[List[str]], num_outputs: int, data_names: List[str],
                source: str) -> Optional[torch.Tensor]:
    """Data-set class index -> model output, by name when the model knows its classes, else by position."""
    if model_names is not None and set(data_names) <= set(model_names):
        if list(data_names) == list(model_names):
            return None
        index = {n: i for i, n in enumerate(model_names)}
        return torch.tensor([index[n] for n in data_names])
    if len(data_names) == num_outputs:
        return None
    hint = (f"the model's classes are {model_names[:10]}{' ...' if len(model_names) > 10 else ''}; "
            if model_names else "")
    raise ValueError(f"the data set ({source}) has {len(data_names)} classes ({', '.join(data_names[:10])}"
                     f"{' ...' if len(data_names) > 10 else ''}) but the model's head has {num_outputs} outputs; "
                     f"{hint}evaluate on data with the classes the model was trained on, or fine-tune it "
                     "('hymamba train DATA --checkpoint ...')")


# ----------------------------------------------------------------------------------------------
# validate and predict


def validate(model_name: str, checkpoint: Optional[str | os.PathLike] = None, *, data: str = "digits",
             split: str = "val", pretrained: bool = False, use_ema: bool = False, batch_size: int = 64,
             workers: Optional[int] = None, amp: bool = False, device: str = "auto",
             input_size: Optional[int] = None, crop_pct: Optional[float] = None, crop_mode: Optional[str] = None,
             interpolation: Optional[str] = None, max_samples: Optional[int] = None,
             scan_impl: str = "auto") -> Dict[str, Any]:
    """Evaluate weights on an ImageFolder split or the built-in digits validation split.

    Args:
        model_name: the architecture (``hymamba models``).
        checkpoint: the weights (``model.safetensors``, a training ``.pth``, official files).
        data: ImageFolder root (``DATA/<split>/<class>/...``), a split folder itself, or 'digits'.
        split: subfolder of ``data`` to evaluate.
        pretrained: use the official weights (a local file) instead of ``checkpoint``.
        use_ema: take the EMA weights of a training checkpoint or official file.
        batch_size: images per batch and process.
        workers: data-loading processes (default: min(8, cores); 0 for digits).
        amp: evaluate under autocast (bfloat16 on CPU, float16 on CUDA).
        device: 'auto', 'cpu' or 'cuda'.
        input_size, crop_pct, crop_mode, interpolation: preprocessing overrides.
        max_samples: evaluate only this many images (spread over the split).
        scan_impl: selective-scan implementation.
    Returns:
        A dict with top1, top5, loss, images, skipped_images, per_class and the preprocessing used.
    """
    from hymamba import distributed
    from hymamba.data import DIGITS, DigitsDataset, ImageFolderDataset, ShardSampler, collate_batch, \
        eval_transform, subset, warn_unreadable

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dist = distributed.setup(device)
    try:
        model = load_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema, scan_impl=scan_impl)
        meta = model_metadata(checkpoint)
        data_config = resolve_preprocessing(model, meta, input_size=input_size, crop_pct=crop_pct,
                                            crop_mode=crop_mode, interpolation=interpolation)
        transform = eval_transform(data_config)
        if data == DIGITS:
            dataset: Any = DigitsDataset(split, data_config["input_size"][-1], transform)
            workers = 0 if workers is None else workers
        else:
            root = Path(data).expanduser()
            folder = root / split if (root / split).is_dir() else root
            if not (root / split).is_dir() and not root.is_dir():
                raise ValueError(f"data folder not found: {root}")
            if folder == root and not (root / split).is_dir():
                logger.warning("%s has no '%s' subfolder; evaluating %s itself as the split", root, split, root)
            dataset = ImageFolderDataset(folder, transform)
            workers = min(8, os.cpu_count() or 1) if workers is None else workers
        dataset = subset(dataset, max_samples)
        names = model_class_names(meta, model.num_classes)
        target_map = _target_map(names, model.num_classes, dataset.class_names, str(dataset.root))
        model.to(dist.device)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                             sampler=ShardSampler(len(dataset), dist.world_size, dist.rank),
                                             collate_fn=collate_batch, pin_memory=dist.device.type == "cuda")
        amp_dtype = (torch.bfloat16 if dist.device.type == "cpu" else torch.float16) if amp else None
        res = evaluate(model, loader, dist.device, amp_dtype=amp_dtype, dist=dist, class_names=dataset.class_names,
                       target_map=target_map)
        warn_unreadable(res.skipped, set())
        res.skipped = sorted({p for part in dist.gather_objects(res.skipped) for p in part})
    finally:
        dist.close()
    return {
        "model": model_name, "checkpoint": str(checkpoint) if checkpoint else "official", "data": str(data),
        "split": split, "images": res.count, "skipped_images": len(res.skipped), "top1": res.top1,
        "top5": res.top5, "loss": res.loss, "per_class": res.per_class,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }


@torch.no_grad()
def predict(model_name: str, checkpoint: Optional[str | os.PathLike], images: Sequence[str | os.PathLike], *,
            topk: int = 5, pretrained: bool = False, use_ema: bool = False, batch_size: int = 16,
            device: str = "auto", scan_impl: str = "auto") -> List[Dict[str, Any]]:
    """Top-k classes of each image.

    Returns:
        One dict per image, in order: ``{"image", "top": [{"index", "class", "prob"}, ...]}``, or
        ``{"image", "error"}`` for an image that could not be read.
    """
    from PIL import Image

    from hymamba.data import eval_transform

    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    if not images:
        raise ValueError("no images given: pass one or more image files")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    model = load_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema, scan_impl=scan_impl)
    model.to(dev).eval()
    meta = model_metadata(checkpoint)
    names = model_class_names(meta, model.num_classes)
    transform = eval_transform(resolve_preprocessing(model, meta))
    results: List[Dict[str, Any]] = []
    pending: List[tuple] = []

    def flush() -> None:
        if not pending:
            return
        probs = model(torch.stack([x for _, x in pending]).to(dev)).float().softmax(dim=1)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        for (slot, _), vals, idxs in zip(pending, values.tolist(), indices.tolist()):
            results[slot]["top"] = [{"index": i, "class": names[i] if names else str(i), "prob": v}
                                    for v, i in zip(vals, idxs)]
        pending.clear()

    for path in images:
        results.append({"image": str(path)})
        try:
            with Image.open(path) as img:
                x = transform(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            results[-1]["error"] = f"{type(e).__name__}: {e}"
            continue
        pending.append((len(results) - 1, x))
        if len(pending) == batch_size:
            flush()
    flush()
    return results
