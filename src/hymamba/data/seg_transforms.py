"""Segmentation transforms: an image and its label mask transformed together, reproducibly.

The semantics follow mmsegmentation's ADE20K pipeline (our own code; see ``../shared/dense.md``):

- training (:class:`SegTrainTransform`): random resize (ratio 0.5-2.0 of ``scale``, keep-ratio as
  mmseg's ``RandomResize``), random crop of ``crop_size`` with ``cat_max_ratio`` (mmseg's
  ``RandomCrop``), horizontal flip, photometric distortion (mmseg's ``PhotoMetricDistortion``), pad
  to ``crop_size`` (image 0, mask ``ignore_index``), normalise;
- evaluation (:class:`SegEvalTransform`): keep-ratio resize to ``scale`` (mmseg's ``Resize`` to
  (2048, 512) with ``keep_ratio=True``: the short side becomes 512 unless the long side would pass
  2048), normalise;
- :func:`collate_segmentation`: pads a batch to its largest H, W (image 0, mask ``ignore_index``).

Images are resized bilinearly, masks with nearest only (labels are never mixed). Every random
choice comes from the ``numpy.random.Generator`` passed to the call, so a run is reproducible from
its seed. Images enter as ``uint8`` ``(H, W, 3)`` RGB arrays (or PIL RGB images), masks as integer
``(H, W)`` arrays; a transform returns ``(image float tensor (3, H, W), mask long tensor (H, W))``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["ADE_MEAN", "ADE_STD", "IGNORE_INDEX", "SegEvalTransform", "SegNormalize", "SegTrainTransform",
           "collate_segmentation", "crop_with_cat_max_ratio", "hflip", "keep_ratio_size", "pad_to",
           "photometric_distortion", "random_resize", "resize_pair"]

#: the label that losses and metrics ignore (mmseg's 255)
IGNORE_INDEX = 255
#: mmseg's ADE20K normalisation (RGB, 0..255 scale)
ADE_MEAN = (123.675, 116.28, 103.53)
ADE_STD = (58.395, 57.12, 57.375)

ImageLike = Union[np.ndarray, Image.Image]


def _as_uint8(image: ImageLike) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr if arr.dtype == np.uint8 else np.clip(np.round(arr), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# geometry


def keep_ratio_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """The (H, W) mmcv's keep-ratio rescale gives: as large as fits in ``scale`` (long, short edge)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _nearest(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer mask (pixel centres, as PIL's NEAREST); values kept exactly."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def resize_pair(image: np.ndarray, mask: Optional[np.ndarray], size: Tuple[int, int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize to ``size`` (H, W): the image bilinearly, the mask with nearest only."""
    if image.shape[:2] != tuple(size):
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    if mask is not None and mask.shape != tuple(size):
        mask = _nearest(mask, size)
    return image, mask


def random_resize(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, scale: Tuple[int, int],
                  ratio_range: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)``: scale times a uniform ratio."""
    ratio = rng.uniform(*ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize_pair(image, mask, keep_ratio_size(*image.shape[:2], target))  # type: ignore[return-value]


def _crop_box(shape: Tuple[int, ...], crop: Tuple[int, int], rng: np.random.Generator) -> Tuple[int, int]:
    top = int(rng.integers(0, max(shape[0] - crop[0], 0) + 1))
    left = int(rng.integers(0, max(shape[1] - crop[1], 0) + 1))
    return top, left


def _max_class_ratio(mask: np.ndarray, ignore_index: int) -> Tuple[int, float]:
    labels, counts = np.unique(mask, return_counts=True)
    counts = counts[labels != ignore_index]
    if counts.size == 0:
        return 0, 1.0
    return counts.size, float(counts.max() / counts.sum())


def crop_with_cat_max_ratio(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: Tuple[int, int],
                            cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                            tries: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)``: a random crop (at most ``crop`` (H, W)) in
    which no single class (``ignore_index`` left out) covers ``cat_max_ratio`` or more and at least
    two classes appear, tried up to ``tries`` times. Unlike mmseg, when no try succeeds the best crop
    seen (fewest-dominated, most classes) is kept instead of an eleventh, unchecked one."""
    top, left = _crop_box(image.shape, crop, rng)
    if cat_max_ratio < 1.0:
        best = None
        for _ in range(tries):
            n, ratio = _max_class_ratio(mask[top:top + crop[0], left:left + crop[1]], ignore_index)
            if n > 1 and ratio < cat_max_ratio:
                best = None
                break
            key = (ratio, -n)
            if best is None or key < best[0]:
                best = (key, top, left)
            top, left = _crop_box(image.shape, crop, rng)
        if best is not None:
            top, left = best[1], best[2]
    return image[top:top + crop[0], left:left + crop[1]], mask[top:top + crop[0], left:left + crop[1]]


def hflip(image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror left-right."""
    return image[:, ::-1], mask[:, ::-1]


def pad_to(image: np.ndarray, mask: np.ndarray, size: Tuple[int, int],
           ignore_index: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least ``size`` (H, W): the image with 0, the mask with ``ignore_index``."""
    h, w = mask.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=ignore_index)
    return image, mask


# ----------------------------------------------------------------------------------------------
# colour


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB in 0..1 -> HSV, each in 0..1 (hue as a fraction of the full circle)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, c / np.where(v > 0, v, 1), 0.0)
    safe = np.where(c > 0, c, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range: Tuple[float, float] = (0.5, 1.5),
                           saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on a uint8 RGB image, each step with probability 0.5:
    brightness (add ``U(-32, 32)``), contrast (multiply by ``U(0.5, 1.5)``; before or after the
    colour steps, at random), saturation (multiply S by ``U(0.5, 1.5)``), hue (shift by an integer
    in ``[-18, 18]`` OpenCV hue units, 180 to the circle). Values are clipped to 0..255 after each
    step and the result is rounded to uint8."""
    img = image.astype(np.float64)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        return np.clip(x * rng.uniform(*contrast_range), 0, 255) if rng.integers(2) else x

    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img / 255.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 1)
        img = np.clip(_hsv_to_rgb(hsv) * 255.0, 0, 255)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img / 255.0)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-hue_delta, hue_delta + 1)) / 180.0) % 1.0
        img = np.clip(_hsv_to_rgb(hsv) * 255.0, 0, 255)
    if not contrast_first:
        img = contrast(img)
    return np.round(img).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# the pipelines


class SegNormalize:
    """uint8 RGB + mask -> (normalised float tensor (3, H, W), long tensor (H, W)); no resizing."""

    def __init__(self, mean: Sequence[float] = ADE_MEAN, std: Sequence[float] = ADE_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def to_tensors(self, image: np.ndarray, mask: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        return (x - self.mean) / self.std, torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))

    def __call__(self, image: ImageLike, mask: np.ndarray,
                 rng: Optional[np.random.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.to_tensors(_as_uint8(image), np.asarray(mask))


class SegEvalTransform(SegNormalize):
    """Keep-ratio resize of the image to ``scale`` ((2048, 512): short side 512), then normalise.
    ``scale=None``: the image's own size.

    The mask keeps its own size, as in mmseg's test pipeline (the annotation is loaded after the
    resize): predictions are resized back to it and scored there. ``resize_mask=True`` resizes it with
    the image (nearest) instead."""

    def __init__(self, scale: Optional[Tuple[int, int]] = (2048, 512), mean: Sequence[float] = ADE_MEAN,
                 std: Sequence[float] = ADE_STD, resize_mask: bool = False) -> None:
        super().__init__(mean, std)
        self.scale = scale
        self.resize_mask = resize_mask

    def __call__(self, image: ImageLike, mask: np.ndarray,
                 rng: Optional[np.random.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        img, m = _as_uint8(image), np.asarray(mask)
        if self.scale is not None:
            size = keep_ratio_size(*img.shape[:2], self.scale)
            img, resized = resize_pair(img, m if self.resize_mask else None, size)
            m = resized if self.resize_mask else m  # type: ignore[assignment]
        return self.to_tensors(img, m)


class SegTrainTransform(SegNormalize):
    """mmseg's ADE20K training pipeline: random resize, cat-max-ratio crop, flip, photometric
    distortion, pad to ``crop_size`` (H, W), normalise. Set a step off with ``ratio_range=None``,
    ``crop_size=None``, ``flip_prob=0`` or ``photometric=False``."""

    def __init__(self, crop_size: Optional[Tuple[int, int]] = (512, 512), scale: Tuple[int, int] = (2048, 512),
                 ratio_range: Optional[Tuple[float, float]] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, mean: Sequence[float] = ADE_MEAN,
                 std: Sequence[float] = ADE_STD, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(mean, std)
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index

    def apply(self, image: ImageLike, mask: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """The augmented uint8 image and mask, before normalisation."""
        img, m = _as_uint8(image), np.asarray(mask)
        if img.shape[:2] != m.shape:
            raise ValueError(f"image {img.shape[:2]} and mask {m.shape} differ in size")
        if self.ratio_range is not None:
            img, m = random_resize(img, m, rng, self.scale, self.ratio_range)
        if self.crop_size is not None:
            img, m = crop_with_cat_max_ratio(img, m, rng, self.crop_size, self.cat_max_ratio, self.ignore_index)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            img, m = hflip(img, m)
        if self.photometric:
            img = photometric_distortion(img, rng)
        if self.crop_size is not None:
            img, m = pad_to(img, m, self.crop_size, self.ignore_index)
        return img, m

    def __call__(self, image: ImageLike, mask: np.ndarray,
                 rng: Optional[np.random.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if rng is None:
            raise ValueError("the training transform needs a numpy Generator (rng=np.random.default_rng(seed))")
        return self.to_tensors(*self.apply(image, mask, rng))


def collate_segmentation(samples: Sequence[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], List[str]]],
                         ignore_index: int = IGNORE_INDEX) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Stack a batch padded bottom/right to its largest H, W (image 0, mask ``ignore_index``), leaving
    out unreadable samples; returns (images (B, 3, H, W), masks (B, H, W) long, unreadable paths)."""
    bad = [p for _, _, paths in samples for p in paths]
    good = [(x, y) for x, y, _ in samples if x is not None and y is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    h = max(x.shape[-2] for x, _ in good)
    w = max(x.shape[-1] for x, _ in good)
    mh = max(y.shape[-2] for _, y in good)  # an evaluation mask keeps its own size (SegEvalTransform)
    mw = max(y.shape[-1] for _, y in good)
    images = torch.zeros(len(good), good[0][0].shape[0], h, w, dtype=good[0][0].dtype)
    masks = torch.full((len(good), mh, mw), ignore_index, dtype=torch.long)
    for i, (x, y) in enumerate(good):
        images[i, :, :x.shape[-2], :x.shape[-1]] = x
        masks[i, :y.shape[-2], :y.shape[-1]] = y
    return images, masks, bad
