"""The paper's ablation options, in one place: what each value means, its checks, and which of
them travel with trained weights (``model.json``, training checkpoints). Also the choice of
initialisation for models trained from scratch (``ssm_init``), which changes no architecture.

The defaults are the official MambaVision; every other value is one row of the paper's ablation
tables (token mixer: Table 4; hybrid pattern: Table 5).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from hymamba.errors import ConfigError

__all__ = ["ABLATION_OPTIONS", "ATTENTION_PATTERNS", "DEFAULT_OPTIONS", "MIXER_VARIANTS", "SSM_INITS",
           "attention_block_indices", "check_option", "options_from"]

#: the token mixer: concat (MambaVision), gated, regular_conv, causal_conv (Mamba's own)
MIXER_VARIANTS: Tuple[str, ...] = ("concat", "gated", "regular_conv", "causal_conv")
#: where attention blocks go in levels 2-3: last_half (MambaVision), first_half, interleave, none or all
ATTENTION_PATTERNS: Tuple[str, ...] = ("last_half", "first_half", "interleave", "mamba_only", "attention_only")
#: constructor options of the ablations, stored beside trained weights (model.json)
ABLATION_OPTIONS: Tuple[str, ...] = ("mixer_variant", "attention_pattern")


def attention_block_indices(depth: int, pattern: str = "last_half") -> List[int]:
    """Which blocks of a token level are self-attention.

    ``"last_half"`` (the official model): the last ``depth // 2`` blocks, mixers first. The
    paper's hybrid-pattern ablation: ``"first_half"`` (as many attention blocks, first),
    ``"interleave"`` (every second block, starting with a mixer), ``"mamba_only"`` (all mixers),
    ``"attention_only"`` (all attention).
    """
    n = depth // 2
    patterns = {
        "last_half": range(depth - n, depth),
        "first_half": range(n),
        "interleave": range(1, depth, 2),
        "mamba_only": range(0),
        "attention_only": range(depth),
    }
    check_option("attention_pattern", pattern)
    return list(patterns[pattern])


#: how a fresh model's SSM parameters start: official (dt_proj like every Linear), mamba (Mamba's dt init)
SSM_INITS: Tuple[str, ...] = ("official", "mamba")

#: option -> (allowed values, default)
_CHOICES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "mixer_variant": (MIXER_VARIANTS, "concat"),
    "attention_pattern": (ATTENTION_PATTERNS, "last_half"),
    "ssm_init": (SSM_INITS, "official"),
}


#: the official model's value of each ablation option
DEFAULT_OPTIONS: Dict[str, str] = {k: _CHOICES[k][1] for k in ABLATION_OPTIONS}


def check_option(name: str, value: Any) -> str:
    """``value`` if it is a valid value of the ablation option ``name``, else a ConfigError."""
    allowed, default = _CHOICES[name]
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)} (the official model: {default}), "
                          f"got {value!r}")
    return value


def options_from(values: Mapping[str, Any]) -> Dict[str, str]:
    """The ablation options present (as strings) in ``values`` (a config, a model.json, kwargs), checked."""
    return {k: check_option(k, values[k]) for k in ABLATION_OPTIONS if isinstance(values.get(k), str)}
