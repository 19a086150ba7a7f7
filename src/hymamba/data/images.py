"""The one image reader of every task: a file path in, a PIL RGB image out.

What counts as unreadable (a truncated, corrupt or non-image file) is :data:`UNREADABLE`: the data
sets skip such images with a warning and count them, and never stop a long job over one file.
"""
from __future__ import annotations

import os
from typing import Union

from PIL import Image

__all__ = ["IMG_EXTENSIONS", "UNREADABLE", "load_image"]

#: file suffixes read as images (case-insensitive)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: the exceptions that mean "this file is not a readable image"
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Read an image file as RGB (the file is closed before returning)."""
    with Image.open(path) as img:
        return img.convert("RGB")
