"""The one image reader of every task: a file path in, a PIL RGB image out, as a viewer shows it.

:func:`load_image` reads what ``Image.open(path).convert("RGB")`` gets wrong:

- 16-bit and 32-bit integer grayscale (PIL modes ``I;16*``, ``I``): the full 0..65535 range is
  scaled to 0..255 (``convert("RGB")`` clips it, so a 16-bit photo comes out almost all white);
- 32-bit float (``F``): 0..1 when the largest finite value is at most 1, else 0..255 (see
  :func:`load_image`);
- the EXIF Orientation tag (phone photos): the pixels are turned as a viewer turns them;
- transparency (``RGBA``, ``LA``, ``PA``, palette or colour-key transparency): composited onto
  white, not left at whatever colour the transparent pixels happen to hold;
- CMYK with an embedded ICC profile (Photoshop's CMYK JPEGs): converted to sRGB through that
  profile (without one, or without LittleCMS, the plain ink formula ``(1 - C)(1 - K)`` is used).

What counts as unreadable (a truncated, corrupt or non-image file, a decompression bomb) is
:data:`UNREADABLE`: the data sets skip such images with a warning and count them, and never stop a
long job over one file. Any other error a decoder raises on a corrupt file is re-raised as
:class:`UnreadableImageError` (one of :data:`UNREADABLE`).
"""
from __future__ import annotations

import io
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from hymamba.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "IMG_EXTENSIONS", "UNREADABLE", "UnreadableImageError", "image_files", "load_image", "read_images",
           "read_or_substitute"]

#: file suffixes read as images (case-insensitive)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: the PIL decoders tried, whatever a file's suffix (MPO: the multi-picture JPEGs of many cameras);
#: no others, so that a mislabelled file never reaches an exotic decoder (e.g. EPS, which runs
#: Ghostscript)
FORMATS = ("JPEG", "MPO", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")


class UnreadableImageError(OSError):
    """A decoder failed on a corrupt file with an error PIL does not report as OSError itself."""


#: the exceptions that mean "this file is not a readable image"
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

#: what transparent pixels are composited onto (Hugging Face transformers' ``convert_to_rgb`` rule)
BACKGROUND = (255, 255, 255)

#: modes with an alpha channel (premultiplied: lower-case "a")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_ORIENTATION_TAG = 0x0112
#: EXIF orientation -> the transpose that shows the image upright (orientation 1: as stored)
_UPRIGHT = {
    2: Image.FLIP_LEFT_RIGHT,
    3: Image.ROTATE_180,
    4: Image.FLIP_TOP_BOTTOM,
    5: Image.TRANSPOSE,
    6: Image.ROTATE_270,
    7: Image.TRANSVERSE,
    8: Image.ROTATE_90,
}


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Read an image file as an 8-bit RGB image, upright and opaque, as an image viewer shows it.

    The first frame of a multi-frame file is read; the file is closed before returning.

    - ``1``, ``L``, ``P``, ``RGB``, ``YCbCr``, ...: PIL's own conversion to RGB.
    - ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit) and ``I`` (32-bit integer) grayscale:
      ``round(v * 255 / 65535)`` after clipping ``v`` to 0..65535.
    - ``F`` (32-bit float) grayscale: if the largest finite value is at most 1 the image is taken as
      0..1 (``round(v * 255)``), otherwise as 0..255 (``round(v)``); either way clipped to 0..255,
      NaN reads as 0, +inf as 255 and -inf as 0.
    - An alpha channel or a transparent colour/palette index: composited onto white.
    - ``CMYK``: through the embedded ICC profile to sRGB when there is one (perceptual intent),
      otherwise PIL's ``(1 - C)(1 - K)`` formula (JPEGs: PIL already undoes Adobe's inverted CMYK).
    - EXIF Orientation 2..8: flipped/rotated upright (a broken EXIF block is ignored, not fatal).

    Raises:
        One of :data:`UNREADABLE` when the file is missing, not an image in one of
        :data:`FORMATS`, truncated or corrupt, or a decompression bomb (more than
        ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels).
    """
    try:
        with open(path, "rb") as f, Image.open(f, formats=_formats()) as img:
            img.load()
            orientation = _orientation(img)
            rgb = _to_rgb(img)
    except UNREADABLE:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types on corrupt data
        raise UnreadableImageError(f"cannot decode {os.fspath(path)!s} ({type(e).__name__}: {e})") from e
    transpose = _UPRIGHT.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


@lru_cache(maxsize=1)
def _formats() -> Tuple[str, ...]:
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1 when absent, invalid or unreadable: the pixels are still fine)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block does not make the pixels unreadable
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    transparency = img.info.get("transparency")
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(img)
        gray = Image.fromarray(_scale_16bit(values))
        if isinstance(transparency, int):  # a PNG colour key, in 16-bit units
            alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
            return _onto_background(gray.convert("RGB"), Image.fromarray(alpha))
        return gray.convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_float(np.asarray(img))).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode in _WITH_ALPHA or transparency is not None or (mode == "P" and _palette_has_alpha(img)):
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return _onto_background(rgba.convert("RGB"), alpha)
        return rgba.convert("RGB")
    return img.convert("RGB")


def _palette_has_alpha(img: Image.Image) -> bool:
    return img.palette is not None and img.palette.mode.endswith("A")


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded half up (exact integer arithmetic)."""
    v = np.clip(values, 0, 65535).astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float32, copy=True)
    finite = np.isfinite(v)
    peak = float(v[finite].max()) if finite.any() else 0.0
    v[np.isnan(v)] = 0.0
    if peak <= 1.0:
        v = v * 255.0
    return np.rint(np.clip(v, 0.0, 255.0)).astype(np.uint8)


def _onto_background(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgb.size, BACKGROUND)
    out.paste(rgb, (0, 0), alpha)
    return out


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        transform = _cmyk_transform(bytes(icc))
        if transform is not None:
            return transform.apply(img)
    return img.convert("RGB")


@lru_cache(maxsize=8)
def _cmyk_transform(icc: bytes) -> Optional[Any]:
    """A CMYK -> sRGB transform through an embedded ICC profile (None: no LittleCMS or a bad profile)."""
    try:
        from PIL import ImageCms
    except ImportError:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if source.profile.xcolor_space.strip() != "CMYK":
            return None
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), "CMYK", "RGB",
                                       renderingIntent=0)  # perceptual
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def read_or_substitute(i: int, n: int, load: Callable[[int], Any], name: Callable[[int], str],
                       substitute_bad: bool, where: str) -> Tuple[Optional[int], Any, List[str]]:
    """Sample ``i`` of ``n`` through ``load(j)``, by the data sets' unreadable-image policy.

    An unreadable file (one of :data:`UNREADABLE`, except a :class:`DataError`, which is the data's
    fault and raised) is recorded as ``"<name(j)> (<error>)"``; then either ``(None, None, bad)`` is
    returned, or with ``substitute_bad`` the next readable sample is (``j`` wraps around).
    Returns ``(j, load(j), bad)``. Raises DataError when no sample of ``where`` can be read.
    """
    bad: List[str] = []
    for attempt in range(n):
        j = (i + attempt) % n
        try:
            return j, load(j), bad
        except UNREADABLE as e:
            if isinstance(e, DataError):
                raise
            bad.append(f"{name(j)} ({type(e).__name__}: {e})")
            if not substitute_bad:
                return None, None, bad
    raise DataError(f"no image of {where} could be read; first failures: {bad[:3]}")


def image_files(inputs: Sequence[str | os.PathLike]) -> List[Tuple[Path, Path]]:
    """``(image, output name without suffix)`` for files and folders (searched recursively, sorted);
    names keep a folder's relative paths and are made unique."""
    found: List[Tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                logger.warning("%s holds no images (%s)", p, ", ".join(IMG_EXTENSIONS))
            found.extend((f, f.relative_to(p).with_suffix("")) for f in files)
        elif p.is_file():
            found.append((p, Path(p.stem)))
        else:
            raise DataError(f"not found: {p} (give image files or folders of images)")
    seen: Dict[str, int] = {}
    out = []
    for path, name in found:
        key = str(name)
        if key in seen:
            seen[key] += 1
            name = name.with_name(f"{name.name}_{seen[key]}")
        else:
            seen[key] = 0
        out.append((path, name))
    return out


def read_images(files: Sequence[Tuple[Path, Path]], results: List[Dict[str, Any]],
                progress: Optional[Callable[[Iterator], Iterator]] = None) -> Iterator[Tuple[Path, Path, np.ndarray]]:
    """``(path, output name, uint8 RGB array)`` of each readable file; every file gets an entry
    ``{"image": path}`` appended to ``results`` (with ``error`` for an unreadable one, which is skipped)."""
    for path, name in (files if progress is None else progress(iter(files))):
        results.append({"image": str(path)})
        try:
            yield path, name, np.asarray(load_image(path))
        except UNREADABLE as e:
            results[-1]["error"] = f"{type(e).__name__}: {e}"
