"""Data for every task: the image reader (``images``), preprocessing resolved once
(``transforms``), task-agnostic samplers (``samplers``) and the classification data sets
(``datasets``: image folders and the built-in digits)."""
from hymamba.data.images import IMG_EXTENSIONS, load_image

__all__ = ["IMG_EXTENSIONS", "load_image"]
