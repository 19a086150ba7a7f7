"""Putting a state dict into a model: one loader, one report, no half-loaded models.

:func:`load_state_dict` compares names and shapes first and raises :class:`CheckpointError` (with
the missing, unexpected and mis-shaped keys) *before* touching the model, so a model is either
loaded as asked or left exactly as it was. Model-agnostic: the caller may pass a ``hint`` that
names the variant a mismatching checkpoint belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from hymamba.errors import CheckpointError

__all__ = ["LoadReport", "compare", "describe", "load_state_dict"]


@dataclass
class LoadReport:
    """What happened when a state dict was loaded into a model."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    source: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self, ignore_mismatch: Sequence[str] = ()) -> List[str]:
        """Keys that break a strict load, leaving out mis-shaped keys under ``ignore_mismatch`` prefixes."""
        bad = [k for k, _, _ in self.mismatched if not k.startswith(tuple(ignore_mismatch))]
        return self.missing + self.unexpected + bad


def compare(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> LoadReport:
    """Names and shapes of ``sd`` against ``model.state_dict()``."""
    own = model.state_dict()
    report = LoadReport()
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                         if k in sd and sd[k].shape != own[k].shape]
    return report


def describe(report: LoadReport, hint: Optional[str] = None, limit: int = 12) -> str:
    """The report as indented lines for an error message."""
    lines = []
    for title, items in (("missing", report.missing), ("unexpected", report.unexpected)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title} keys: {', '.join(items[:limit])}{more}")
    if report.mismatched:
        shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in report.mismatched[:limit])
        lines.append(f"  {len(report.mismatched)} mis-shaped keys: {shown}")
    if hint:
        lines.append(f"  {hint}")
    return "\n".join(lines)


def load_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool = True,
                    ignore_mismatch: Sequence[str] = (), source: str = "",
                    hint: Optional[Callable[[], Optional[str]]] = None) -> LoadReport:
    """Load ``sd`` into ``model``; all or nothing.

    Args:
        model: the model to fill.
        sd: parameter name -> tensor.
        strict: raise unless every key matches in name and shape (mis-shaped keys under an
            ``ignore_mismatch`` prefix excepted: they keep the model's own values, e.g. a new
            classifier). With ``strict=False`` whatever fits is loaded, mis-shaped tensors skipped.
        ignore_mismatch: key prefixes whose mis-shaped tensors are skipped even when strict.
        source: where ``sd`` came from (for messages and the report).
        hint: called only on failure; a line to add to the error (e.g. which variant fits).
    Returns:
        A :class:`LoadReport` of missing, unexpected and mis-shaped keys.
    Raises:
        CheckpointError: before anything is loaded, when a strict load does not fit.
    """
    report = compare(model, sd)
    report.source = source
    if strict and report.problems(ignore_mismatch):
        where = f"checkpoint {source}" if source else "the state dict"
        raise CheckpointError(f"{where} does not fit {type(model).__name__}:\n"
                              f"{describe(report, hint() if hint else None)}")
    skip = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k not in skip}, strict=False)
    return report
