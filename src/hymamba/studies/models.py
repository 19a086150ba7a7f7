"""What a combination builds: a structural fingerprint (to train identical architectures once), its
parameters and GMACs (shapes only, on the ``meta`` device), and its inference throughput.

Alias rule: two combinations are the same experiment when their models have the same fingerprint
(the ordered module class names with their plain settings, and every parameter and buffer name
with its shape: :func:`fingerprint`) and every
other config field is equal (the model name compared after resolving official names). The model
is built as the task builds it (ablation options, ``drop_path``, ``ssm_init``), with the built-in
digits' 10 classes standing for any class count (the same for all combinations of a study).
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from hymamba.factory import create_model, resolve_model_name
from hymamba.models.options import ABLATION_OPTIONS, options_from
from hymamba.models.variants import VARIANTS

__all__ = ["alias_key", "build", "find_aliases", "fingerprint", "measure", "throughputs"]


def build(cfg: Any, device: str = "meta", num_classes: int = 10) -> torch.nn.Module:
    """The combination's model, as :class:`~hymamba.tasks.classification.ClassificationTask` builds it."""
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, ssm_init=cfg.ssm_init, **options_from(cfg.__dict__))
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    with torch.device(device):
        return create_model(resolve_model_name(cfg.model), **kwargs)


_PLAIN = (str, int, float, bool, tuple, type(None))


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of the ordered module classes with their plain settings (``extra_repr`` and public
    attributes such as a mixer's ``variant``: ``regular_conv`` and ``causal_conv`` have the same
    parameters but not the same forward) and the parameter/buffer names and shapes."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN))
        h.update(f"m {name} {type(m).__name__} {m.extra_repr()} {attrs}\n".encode())
    for name, t in model.state_dict().items():
        h.update(f"p {name} {tuple(t.shape)}\n".encode())
    return h.hexdigest()[:16]


def alias_key(cfg: Any) -> Tuple[str, str]:
    """(fingerprint, the other settings): equal keys mean the same experiment."""
    rest = {k: v for k, v in cfg.to_dict().items() if k not in ABLATION_OPTIONS + ("output", "seed")}
    rest["model"] = resolve_model_name(cfg.model)
    return fingerprint(build(cfg)), repr(sorted(rest.items()))


def find_aliases(configs: Mapping[str, Any]) -> Dict[str, str]:
    """{combination: the earlier combination it duplicates} over ``{combination: config}`` (in order)."""
    first: Dict[Tuple[str, str], str] = {}
    aliases: Dict[str, str] = {}
    for combo, cfg in configs.items():
        key = alias_key(cfg)
        if key in first:
            aliases[combo] = first[key]
        else:
            first[key] = combo
    return aliases


def _input_size(cfg: Any) -> List[int]:
    size = VARIANTS[resolve_model_name(cfg.model)].input_size
    return [3, cfg.input_size, cfg.input_size] if cfg.input_size else list(size)


@torch.no_grad()
def measure(cfg: Any, num_classes: int = 10) -> Dict[str, Any]:
    """Parameters and GMACs (fvcore's convention, :func:`hymamba.apps.flops.count_macs`) at the
    run's input size."""
    from hymamba.apps.flops import count_macs

    size = _input_size(cfg)
    meta = build(cfg, num_classes=num_classes)
    return {"params": sum(p.numel() for p in meta.parameters()),
            "gmacs": count_macs(meta, tuple(size))[0] / 1e9, "input_size": size[-1]}


def throughputs(cfgs: Mapping[str, Any], num_classes: int = 10, batch_size: int = 8,
                rounds: int = 15) -> Dict[str, float]:
    """Eval-mode images/s on this machine's CPU (float32, batch ``batch_size``) of each config's model,
    measured side by side: one batch of every model per round, interleaved, so that the machine's
    noise hits every model alike; the median over ``rounds`` after one warm-up batch each."""
    models = {k: build(cfg, device="cpu", num_classes=num_classes).eval() for k, cfg in cfgs.items()}
    inputs = {k: torch.randn(batch_size, *_input_size(cfg)) for k, cfg in cfgs.items()}
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.no_grad():
        for k, m in models.items():
            m(inputs[k])
        for _ in range(rounds):
            for k, m in models.items():
                times[k].append(_timed(m, inputs[k]))
    return {k: batch_size / sorted(v)[len(v) // 2] for k, v in times.items()}


def _timed(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return max(time.perf_counter() - start, 1e-9)


def describe_aliases(aliases: Mapping[str, str], order: Sequence[str]) -> List[str]:
    """One line per alias, in the study's order."""
    return [f"{c} builds the same model as {aliases[c]} with the same settings: trained once, reported as "
            f"{aliases[c]}'s runs" for c in order if c in aliases]
