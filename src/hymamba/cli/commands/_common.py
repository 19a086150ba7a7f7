"""Argument helpers shared by the subcommands."""
from __future__ import annotations

import math

from typing import Callable, List, Optional, Sequence

from hymamba.errors import ConfigError

__all__ = ["image_size", "non_negative_int", "none_or", "positive_int", "progress_bar", "report_unreadable",
           "without_nan"]


def image_size(given: Optional[Sequence[int]], default: Sequence[int]) -> List[int]:
    """``--size H [W]`` as [H, W], defaulting to ``default`` (the model's input size)."""
    size = list(given) if given else list(default)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"--size takes H [W], positive numbers; got {' '.join(map(str, given or []))}")
    return size


def none_or(kind: type) -> Callable[[str], object]:
    """argparse type: a value of ``kind``, or None for 'none'/'null'."""
    def parse(text: str) -> object:
        if text.lower() in ("none", "null"):
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def _int_at_least(text: str, low: int) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    return _int_at_least(text, 0)


def report_unreadable(results: Sequence[dict]) -> int:
    """Warn once per result with an ``error`` (an image that could not be read); raise DataError when
    no image at all could be read. Returns how many were skipped."""
    import sys

    from hymamba.errors import DataError

    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"hymamba: warning: skipped {r['image']}: {r['error']}", file=sys.stderr)
    if len(failed) == len(results):
        raise DataError(f"none of the {len(results)} image(s) could be read")
    return len(failed)


def without_nan(v: object) -> object:
    """``v`` with every float NaN (a metric with nothing to score) as None: JSON has no NaN."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: without_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [without_nan(x) for x in v]
    return v


def progress_bar(desc: str) -> Optional[Callable]:
    """A tqdm wrapper for an iterator of images when stderr is a terminal, else None (no bar in logs)."""
    import sys

    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="image")
