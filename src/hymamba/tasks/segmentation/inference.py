"""Test-time inference of a segmenter, as mmseg's ``EncoderDecoder`` does it: whole image or sliding
window, with optional horizontal flip and multi-scale averaging.

``model`` is any module whose eval-mode ``model(x)`` returns logits (N, C, h, w) at the size of ``x``
(:class:`hymamba.models.upernet.Segmenter` does). ``images`` is a float tensor (N, 3, H, W), already
normalised; the result is logits (N, C, H, W). The functions run under ``torch.no_grad`` with the
model in eval mode (its mode is restored afterwards).

Sliding window (mmseg's ``slide_inference``): ``h_grids = max(H - crop_h + stride_h - 1, 0) //
stride_h + 1`` rows of windows (columns alike); window ``(i, j)`` starts at ``(i * stride_h, j *
stride_w)``, is cut at the border and then moved back so that it is ``crop`` large where the image
allows (the last windows end at the image border; a crop larger than the image is the whole image).
Each window goes through the model at its own size; the logits are summed into place and divided by
the number of windows that covered each pixel.

Augmentation: ``scales`` resizes the image by each ratio (size ``int(H * r + 0.5)``, bilinear,
``align_corners=False``), infers, and resizes the logits back to (H, W) the same way; ``flip`` also
infers the horizontally flipped image and flips its logits back. The results are averaged: as logits
by default (``merge="logits"``), or, as mmseg's ``SegTTAModel`` does, as softmax probabilities
(``merge="softmax"``, returning the averaged probabilities).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from hymamba.errors import ConfigError, DataError

__all__ = ["slide_inference", "whole_inference"]

Size = Union[int, Sequence[int]]


def whole_inference(model: nn.Module, images: torch.Tensor, *, flip: bool = False,
                    scales: Optional[Sequence[float]] = None, merge: str = "logits") -> torch.Tensor:
    """Logits (N, C, H, W) of the whole images in one forward per view (see the module docstring)."""
    _check_images(images)
    with _eval(model):
        return _augmented(lambda x: _forward(model, x), images, flip, scales, merge)


def slide_inference(model: nn.Module, images: torch.Tensor, crop_size: Size, stride: Size,
                    num_classes: int, *, flip: bool = False, scales: Optional[Sequence[float]] = None,
                    merge: str = "logits") -> torch.Tensor:
    """Logits (N, C, H, W) from overlapping windows (mmseg's ``slide_inference``; see the module
    docstring).

    Args:
        crop_size: window (h, w), or one int for both.
        stride: step between windows (h, w), or one int for both.
        num_classes: C, the model's output channels (checked against each window's logits).
    """
    _check_images(images)
    crop = _pair(crop_size, "crop_size")
    step = _pair(stride, "stride")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    with _eval(model):
        return _augmented(lambda x: _slide(model, x, crop, step, int(num_classes)), images, flip, scales, merge)


def _slide(model: nn.Module, images: torch.Tensor, crop: Tuple[int, int], stride: Tuple[int, int],
           num_classes: int) -> torch.Tensor:
    n, _, h, w = images.shape
    (ch, cw), (sh, sw) = crop, stride
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    logits: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, h, w, device=images.device)
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = _forward(model, images[:, :, y1:y2, x1:x2])
            if out.shape[1] != num_classes:
                raise ConfigError(f"the model returned {out.shape[1]} classes, num_classes is {num_classes}")
            if logits is None:
                logits = torch.zeros(n, num_classes, h, w, dtype=out.dtype, device=out.device)
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    assert logits is not None and bool((count > 0).all())
    return logits / count.to(logits.dtype)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0] \
            or out.shape[2:] != x.shape[2:]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return logits (N, C, H, W) at its input's size "
                          f"{tuple(x.shape[2:])} in eval mode, got {shape}")
    return out


def _augmented(infer: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, flip: bool,
               scales: Optional[Sequence[float]], merge: str) -> torch.Tensor:
    if merge not in ("logits", "softmax"):
        raise ConfigError(f"merge must be 'logits' or 'softmax', got {merge!r}")
    ratios = [1.0] if scales is None else [float(r) for r in scales]
    if not ratios or any(r <= 0 for r in ratios):
        raise ConfigError(f"scales must be positive ratios, got {scales!r}")
    h, w = images.shape[2:]
    total: Optional[torch.Tensor] = None
    views = 0
    for r in ratios:
        size = (max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5)))
        x = images if size == (h, w) else _resize(images, size)
        for flipped in ((False, True) if flip else (False,)):
            out = infer(x.flip(-1)) if flipped else infer(x)
            if flipped:
                out = out.flip(-1)
            if out.shape[2:] != (h, w):
                out = _resize(out, (h, w))
            if merge == "softmax":
                out = out.softmax(dim=1)
            total = out if total is None else total + out
            views += 1
    assert total is not None
    return total if views == 1 else total / views


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _pair(v: Size, name: str) -> Tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 2 or min(t) < 1:
        raise ConfigError(f"{name} must be a positive int or (h, w), got {v!r}")
    return t  # type: ignore[return-value]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"images must be a float tensor (N, C, H, W), got {what}")


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
