"""``hymamba segment eval`` and ``hymamba segment predict``: score a trained segmenter on a data set,
and write masks and overlays for images.

Weights come from :func:`hymamba.factory.load_trained_segmenter`: a run folder (or its
``model.safetensors`` / ``last.pth``), whose metadata says how the segmenter was built and how it
evaluates (mean/std, test scale, whole or slide), or an official mmengine checkpoint with its
segmenter named (then the official ADE20K test settings apply: short side 512, whole image).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hymamba.data.seg_transforms import ADE_MEAN, ADE_STD, SegEvalTransform, collate_segmentation
from hymamba.data.segmentation import open_split, spread_subset
from hymamba.data.images import image_files, read_images
from hymamba.errors import ConfigError, DataError
from hymamba.factory import load_trained_segmenter
from hymamba.models.segmenters import SEGMENTERS
from hymamba.tasks.segmentation.evaluation import Inference, evaluate_segmenter
from hymamba.utils.amp import amp_dtype as resolve_amp_dtype
from hymamba.utils.amp import autocast, resolve_device
from hymamba.utils.io import atomic_write

__all__ = ["SegmentationSettings", "evaluate", "export", "palette_for", "predict", "settings_from"]

logger = logging.getLogger("hymamba")


@dataclass(frozen=True)
class SegmentationSettings:
    """How a segmenter is fed and run at test time (from its metadata, then the caller's overrides)."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    scale: Optional[Tuple[int, int]]  # keep-ratio resize target (long side cap, short side); None: own size
    inference: Inference
    reduce_zero_label: bool
    ignore_index: int

    def describe(self) -> str:
        size = f"short side {self.scale[1]} (long side at most {self.scale[0]})" if self.scale else "own size"
        return f"resize to {size}, {self.inference.describe()} inference"


def settings_from(meta: Mapping[str, Any], model_name: Optional[str], *, size: Optional[int] = None,
                  mode: Optional[str] = None, crop_size: Optional[int] = None, stride: Optional[int] = None,
                  flip: bool = False, scales: Optional[Sequence[float]] = None) -> SegmentationSettings:
    """Test settings: ``meta`` (a run's model.json) or the official ADE20K test for ``model_name``, with
    the given overrides (``size``: the short side, 0 for the images' own size)."""
    spec = SEGMENTERS.get(str(meta.get("model") or model_name or ""))
    own = meta.get("task") == "segmentation"
    crop = tuple(meta["crop_size"]) if own and meta.get("crop_size") else spec.crop_size if spec else (512, 512)
    if crop_size is not None:
        crop = (int(crop_size), int(crop_size))
    default_scale = tuple(meta["eval_scale"]) if own and meta.get("eval_scale") else None if own else (
        4 * crop[0], crop[0])  # mmseg's ADE20K test: Resize(scale=(2048, 512), keep_ratio=True)
    if size is not None:
        if size != 0 and size < 32:
            raise ConfigError(f"--size must be 0 (the images' own size) or at least 32, got {size}")
        scale: Optional[Tuple[int, int]] = (4 * int(size), int(size)) if size else None
    else:
        scale = default_scale  # type: ignore[assignment]
    step = stride or (int(meta["eval_stride"]) if own and meta.get("eval_stride") and crop_size is None
                      else max(1, (2 * crop[0]) // 3))  # mmseg's ADE20K slide config: 512 / 341
    inference = Inference(mode or (meta.get("eval_mode") if own else None) or "whole", (int(crop[0]), int(crop[1])),
                          (int(step), int(step)), flip=flip, scales=tuple(scales) if scales else None)
    mean = tuple(meta.get("mean") or ADE_MEAN)
    std = tuple(meta.get("std") or ADE_STD)
    return SegmentationSettings(mean=mean, std=std, scale=scale, inference=inference,  # type: ignore[arg-type]
                                reduce_zero_label=bool(meta.get("reduce_zero_label", False)),
                                ignore_index=int(meta.get("ignore_index", 255)))


def palette_for(model: Any, n: int) -> List[List[int]]:
    """The model's palette, or PASCAL VOC's colour map for ``n`` classes."""
    from hymamba.tasks.segmentation.task import default_palette

    palette = getattr(model, "palette", None)
    return [list(c) for c in palette] if palette is not None and len(palette) == n else default_palette(n)


def _load(checkpoint: str | os.PathLike, model_name: Optional[str], use_ema: bool, device: str,
          scan_impl: str) -> Tuple[Any, Dict[str, Any], torch.device]:
    dev = resolve_device(device)
    model, meta = load_trained_segmenter(checkpoint, model_name, use_ema=use_ema, scan_impl=scan_impl)
    return model.to(dev).eval(), meta, dev


def evaluate(checkpoint: str | os.PathLike, data: str = "digitscenes", *, model_name: Optional[str] = None,
             split: Optional[str] = None, reduce_zero_label: Optional[bool] = None, size: Optional[int] = None,
             mode: Optional[str] = None, crop_size: Optional[int] = None, stride: Optional[int] = None,
             flip: bool = False, scales: Optional[Sequence[float]] = None, batch_size: Optional[int] = None,
             workers: Optional[int] = None, max_samples: Optional[int] = None, amp: bool = False,
             use_ema: bool = False, device: str = "auto", scan_impl: str = "auto",
             progress: bool = False) -> Dict[str, Any]:
    """mIoU, aAcc, mAcc and per-class IoU / accuracy of a trained segmenter on a split of ``data``.

    ``data``: ``"digitscenes"``, an ADE20K root or a mask folder (see
    :func:`hymamba.data.segmentation.open_split`); the split defaults to the validation split.
    Returns a dict with the metrics, ``per_class`` (``{"class", "IoU", "Acc", "pixels"}``; NaN IoU
    where a class is neither in the annotations nor predicted), the settings used and the counts.
    """
    model, meta, dev = _load(checkpoint, model_name, use_ema, device, scan_impl)
    num_classes = model.num_classes
    st = settings_from(meta, model_name, size=size, mode=mode, crop_size=crop_size, stride=stride, flip=flip,
                       scales=scales)
    transform = SegEvalTransform(scale=st.scale, mean=st.mean, std=st.std)
    reduce = st.reduce_zero_label if reduce_zero_label is None and meta.get("task") == "segmentation" \
        else reduce_zero_label
    dataset, kind, reduce = open_split(data, split, "val", reduce_zero=reduce, transform=transform,
                                       scene_size=int(meta.get("scene_size") or 64))
    if max_samples is not None:
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
        dataset = spread_subset(dataset, max_samples)
    batch = (batch_size or 16) if kind == "digitscenes" else 1  # images of different sizes: one at a time
    if batch_size and batch_size > 1 and kind != "digitscenes":
        logger.warning("folder data is scored one image at a time (images differ in size); --batch-size ignored")
    n_workers = (0 if kind == "digitscenes" else min(8, os.cpu_count() or 1)) if workers is None else workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=n_workers,
                                         collate_fn=lambda s: collate_segmentation(s, st.ignore_index))
    batches: Any = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="evaluating", unit="batch", leave=False)
    skipped: set = set()
    res = evaluate_segmenter(model, batches, num_classes, inference=st.inference, ignore_index=st.ignore_index,
                             device=dev, amp_dtype=resolve_amp_dtype(dev, amp), skipped=skipped)
    names = model.class_names or [f"class {k}" for k in range(num_classes)]
    if kind == "digitscenes" and num_classes == 11 and model.class_names is None:
        from hymamba.tasks.segmentation.task import DIGIT_SCENE_CLASSES

        names = list(DIGIT_SCENE_CLASSES)
    per_class = [{"class": names[k], "IoU": res["IoU"][k], "Acc": res["Acc"][k], "pixels": res["pixels"][k]}
                 for k in range(num_classes)]
    return {"model": meta.get("model") or model_name, "checkpoint": str(checkpoint), "data": str(data),
            "split": getattr(dataset, "split", split) or ("val" if kind == "digitscenes" else split), "kind": kind,
            "mIoU": res["mIoU"], "aAcc": res["aAcc"], "mAcc": res["mAcc"], "loss": res["loss"],
            "images": res["images"], "skipped_images": len(skipped), "per_class": per_class,
            "reduce_zero_label": reduce, "settings": st.describe()}


# ----------------------------------------------------------------------------------------------
# predict


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def mask_image(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """An index mask as a palette PNG image (classes up to 256), else a 16-bit grey one."""
    if len(palette) <= 256:
        img = Image.fromarray(mask.astype(np.uint8), mode="P")
        flat = [v for c in palette for v in c]
        img.putpalette(flat + [0] * (768 - len(flat)))
        return img
    return Image.fromarray(mask.astype(np.uint16))


def overlay_image(image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]],
                  alpha: float) -> Image.Image:
    """The image with the class colours blended in (``alpha`` of colour)."""
    colours = np.asarray(palette, dtype=np.float32)[mask]
    return Image.fromarray((image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8))


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
            model_name: Optional[str] = None, overlay: bool = True, alpha: float = 0.5, size: Optional[int] = None,
            mode: Optional[str] = None, crop_size: Optional[int] = None, stride: Optional[int] = None,
            flip: bool = False, scales: Optional[Sequence[float]] = None, batch_size: int = 8, amp: bool = False,
            use_ema: bool = False, device: str = "auto", scan_impl: str = "auto",
            progress: Optional[Callable[[Iterator], Iterator]] = None) -> List[Dict[str, Any]]:
    """Segment images: for each, ``OUT/<name>.png`` (the class indices, a palette PNG at the image's
    size) and, with ``overlay``, ``OUT/<name>_overlay.png``.

    Images of the same size after resizing go through the model together (``batch_size`` at most).
    An unreadable image is skipped (its entry has ``error``); nothing is half-written (atomic files).
    Returns one dict per image: ``image``, ``mask``, ``overlay``, ``classes`` (name -> fraction of
    pixels, largest first) or ``error``.
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    files = image_files(inputs)
    if not files:
        raise DataError("no images to segment: give image files or folders holding images")
    model, meta, dev = _load(checkpoint, model_name, use_ema, device, scan_impl)
    num_classes = model.num_classes
    names = model.class_names or [f"class {k}" for k in range(num_classes)]
    palette = palette_for(model, num_classes)
    st = settings_from(meta, model_name, size=size, mode=mode, crop_size=crop_size, stride=stride, flip=flip,
                       scales=scales)
    transform = SegEvalTransform(scale=st.scale, mean=st.mean, std=st.std)
    dtype = resolve_amp_dtype(dev, amp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: List[Dict[str, Any]] = []
    pending: List[Tuple[int, np.ndarray, torch.Tensor, Path]] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.stack([t for _, _, t, _ in pending]).to(dev)
        with autocast(dev, dtype):
            logits = st.inference.logits(model, x, num_classes)
        for (slot, image, _, name), lg in zip(pending, logits.float()):
            lg = F.interpolate(lg[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            mask = lg.argmax(0).cpu().numpy()
            entry = results[slot]
            entry["mask"] = str(out / f"{name}.png")
            _save_png(mask_image(mask, palette), Path(entry["mask"]))
            if overlay:
                entry["overlay"] = str(out / f"{name}_overlay.png")
                _save_png(overlay_image(image, mask, palette, alpha), Path(entry["overlay"]))
            counts = np.bincount(mask.reshape(-1), minlength=num_classes)
            order = np.argsort(-counts, kind="stable")
            entry["classes"] = {names[k]: round(float(counts[k]) / mask.size, 6) for k in order if counts[k] > 0}
        pending.clear()

    for path, name, image in read_images(files, results, progress):
        x, _ = transform(image, np.zeros(image.shape[:2], dtype=np.int64))
        if pending and (len(pending) >= batch_size or pending[0][2].shape != x.shape):
            flush()
        pending.append((len(results) - 1, image, x, name))
    flush()
    return results


# ----------------------------------------------------------------------------------------------
# export


def export(checkpoint: str | os.PathLike, output: str | os.PathLike, *, model_name: Optional[str] = None,
           size: Optional[Tuple[int, int]] = None, opset: Optional[int] = None, check: bool = True,
           scan_impl: str = "auto", dynamic_size: bool = False) -> Dict[str, Any]:
    """The segmenter as an ONNX file (input ``pixel_values`` (N, 3, H, W), normalised; output
    ``logits`` (N, C, H, W)), with ``OUTPUT.json`` beside it (classes, palette, mean/std, size), and
    with ``check`` the max |ONNX Runtime - PyTorch| on a random batch of 2 (``max_abs_diff``; with
    ``dynamic_size`` the largest over ``size`` and a second size, ``checked_sizes``).

    ``size`` (H, W) defaults to the training crop (official: 512 x 512); the batch is dynamic. With
    ``dynamic_size`` the file runs at any H x W (``input`` then reads ``[None, 3, None, None]``) and
    ``size`` is only what the export traces and checks at (see :func:`hymamba.apps.export.export_onnx`).
    """
    from hymamba.apps.export import check_onnx, check_sizes, export_onnx
    from hymamba.utils.io import write_json_atomic

    model, meta, _ = _load(checkpoint, model_name, False, "cpu", scan_impl)
    st = settings_from(meta, model_name)
    h, w = (int(v) for v in (size if size is not None else st.inference.crop_size))
    path = export_onnx(model, output, image_size=(h, w), opset=opset, dynamic_size=dynamic_size)
    n = model.num_classes
    hw = [None, None] if dynamic_size else [h, w]
    info: Dict[str, Any] = {
        "onnx": str(path), "input": [None, 3, *hw], "output": [None, n, *hw],
        "class_names": model.class_names or [f"class {k}" for k in range(n)], "palette": palette_for(model, n),
        "mean": list(st.mean), "std": list(st.std), "model": meta.get("model") or model_name,
    }
    write_json_atomic(Path(path).with_suffix(".json"), info)
    if check:
        sizes = check_sizes((h, w), dynamic_size)
        diffs = []
        for sh, sw in sizes:
            torch.manual_seed(0)
            diffs.append(check_onnx(model, path, torch.randn(2, 3, sh, sw)))
        info["max_abs_diff"], info["checked_sizes"] = max(diffs), [list(s) for s in sizes]
    return info
