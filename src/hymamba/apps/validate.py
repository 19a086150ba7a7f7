"""``hymamba validate``: top-1/top-5/loss of trained weights on an image folder or the digits.

Preprocessing is the model's own (:func:`hymamba.data.transforms.resolve_data_config`: the variant's
config < the metadata beside the weights < explicit overrides): resize by ``crop_pct``, center crop
or squash, interpolation, mean/std — what the official validation script does, so the numbers
match it for the same weights and data.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from hymamba.data.datasets import BUILTIN, ImageFolderDataset, builtin_dataset, collate_batch, subset, warn_unreadable
from hymamba.data.samplers import ShardSampler
from hymamba.data.transforms import eval_transform, resolve_data_config
from hymamba.errors import ConfigError, DataError
from hymamba.factory import load_trained_model
from hymamba.tasks.classification.metrics import evaluate
from hymamba.utils import distributed
from hymamba.utils.amp import amp_dtype
from hymamba.weights.metadata import class_names_from

logger = logging.getLogger(__name__)

__all__ = ["target_map", "validate"]


def target_map(model_names: Optional[List[str]], num_outputs: int, data_names: List[str],
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
    raise DataError(f"the data set ({source}) has {len(data_names)} classes ({', '.join(data_names[:10])}"
                    f"{' ...' if len(data_names) > 10 else ''}) but the model's head has {num_outputs} outputs; "
                    f"{hint}evaluate on data with the classes the model was trained on, or fine-tune it "
                    "('hymamba train DATA --checkpoint ...')")


def validate(model_name: str, checkpoint: Optional[str | os.PathLike] = None, *, data: str = "digits",
             split: str = "val", pretrained: bool = False, use_ema: bool = False, batch_size: int = 64,
             workers: Optional[int] = None, amp: bool = False, device: str = "auto",
             input_size: Optional[int] = None, crop_pct: Optional[float] = None, crop_mode: Optional[str] = None,
             interpolation: Optional[str] = None, max_samples: Optional[int] = None,
             scan_impl: str = "auto") -> Dict[str, Any]:
    """Evaluate weights on an ImageFolder split or a built-in set's validation split.

    Args:
        model_name: the architecture (``hymamba models``).
        checkpoint: the weights (``model.safetensors``, a training ``.pth``, official files).
        data: ImageFolder root (``DATA/<split>/<class>/...``), a split folder itself, or a built-in
            set ("digits", "cued-digits").
        split: subfolder of ``data`` to evaluate.
        pretrained: use the official weights (a local file) instead of ``checkpoint``.
        use_ema: take the EMA weights of a training checkpoint or official file.
        batch_size: images per batch and process.
        workers: data-loading processes (default: min(8, cores); 0 for digits).
        amp: evaluate under autocast (see :mod:`hymamba.utils.amp`).
        device: 'auto', 'cpu' or 'cuda'.
        input_size, crop_pct, crop_mode, interpolation: preprocessing overrides.
        max_samples: evaluate only this many images (spread over the split).
        scan_impl: selective-scan implementation.
    Returns:
        A dict with top1, top5, loss, images, skipped_images, per_class and the preprocessing used.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    dist = distributed.setup(device)
    try:
        model, meta = load_trained_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema,
                                         scan_impl=scan_impl)
        data_config = resolve_data_config(model.pretrained_cfg, meta, input_size=input_size, crop_pct=crop_pct,
                                          crop_mode=crop_mode, interpolation=interpolation)
        transform = eval_transform(data_config)
        if data in BUILTIN:
            dataset: Any = builtin_dataset(data, split, data_config["input_size"][-1], transform)
            workers = 0 if workers is None else workers
        else:
            root = Path(data).expanduser()
            folder = root / split if (root / split).is_dir() else root
            if not (root / split).is_dir() and not root.is_dir():
                raise DataError(f"data folder not found: {root}")
            if folder == root and not (root / split).is_dir():
                logger.warning("%s has no '%s' subfolder; evaluating %s itself as the split", root, split, root)
            dataset = ImageFolderDataset(folder, transform)
            workers = min(8, os.cpu_count() or 1) if workers is None else workers
        dataset = subset(dataset, max_samples)
        names = class_names_from(meta, model.num_classes)
        mapping = target_map(names, model.num_classes, dataset.class_names, str(dataset.root))
        model.to(dist.device)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                             sampler=ShardSampler(len(dataset), dist.world_size, dist.rank),
                                             collate_fn=collate_batch, pin_memory=dist.device.type == "cuda")
        res = evaluate(model, loader, dist.device, amp_dtype=amp_dtype(dist.device, amp), dist=dist,
                       class_names=dataset.class_names, target_map=mapping)
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
