"""A study: a base recipe x axes x seeds, loaded from YAML or a dict, checked, and expanded into runs.

The spec (YAML)::

    name: mixer                           # the study's name
    base:                                 # ClassificationConfig fields; may include config: recipe.yaml
      model: mambavision_nano
      epochs: 20
    axes:                                 # config field -> values; the runs are the cartesian product
      mixer_variant: [concat, gated, regular_conv, causal_conv]
    seeds: [0, 1, 2]                      # each combination is trained once per seed (config field seed)
    reference: {mixer_variant: concat}    # optional: the official configuration's row

A combination's id is ``field=value`` per axis, joined by ``,`` (``base`` without axes); a run's
folder is ``runs/<combination>/seed=<seed>`` under the study folder, so the same spec always maps
to the same folders. Every combination's config is built and checked (the config class's own
``check``) before anything trains. This module imports no torch (the checks do, when called).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hymamba.errors import ConfigError

__all__ = ["BUILTIN_SPECS", "Run", "Study", "expand", "load_spec", "spec_names"]

#: the built-in studies (``src/hymamba/studies/specs/<name>.yaml``)
BUILTIN_SPECS = ("mixer", "pattern")
_KEYS = ("name", "base", "axes", "seeds", "reference")
#: fields a study sets itself for every run
_RESERVED = ("seed", "output")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass
class Study:
    """A checked study spec (not yet expanded: see :func:`expand`)."""

    name: str
    base: Dict[str, Any]
    axes: Dict[str, List[Any]]
    seeds: List[int]
    reference: Optional[Dict[str, Any]] = None
    config_file: Optional[str] = None  # the base recipe's ``config:`` file, resolved
    source: str = "<dict>"

    def combinations(self) -> List[Dict[str, Any]]:
        """Every combination of axis values, in the spec's order (the first axis varies slowest)."""
        names = list(self.axes)
        return [dict(zip(names, values)) for values in itertools.product(*(self.axes[n] for n in names))]

    def to_dict(self) -> Dict[str, Any]:
        base = dict(self.base, **({"config": self.config_file} if self.config_file else {}))
        return {"name": self.name, "base": base, "axes": self.axes, "seeds": self.seeds,
                "reference": self.reference}


@dataclass
class Run:
    """One training run: a combination and a seed, with its folder and checked config."""

    combo: str  # the combination's id, e.g. "mixer_variant=gated"
    values: Dict[str, Any]
    seed: int
    folder: str  # relative to the study folder, e.g. "runs/mixer_variant=gated/seed=1"
    config: Any = field(repr=False, default=None)  # a ClassificationConfig, output set to the run folder

    @property
    def id(self) -> str:
        return f"{self.combo}/seed={self.seed}"


def _fail(source: str, what: str, found: Any, todo: str) -> ConfigError:
    return ConfigError(f"{source}: {what}, found {found!r}; {todo}")


def spec_names() -> Tuple[str, ...]:
    return BUILTIN_SPECS


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"could not read the study spec {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())[:200]
        raise ConfigError(f"could not read the study spec {path}: {detail}; it must be YAML with name, base, "
                          "axes and seeds") from None


def load_spec(spec: Any) -> Study:
    """A study from a built-in name (``mixer``, ``pattern``), a YAML path, or a dict; checked.

    The config fields are checked here by name and type; :func:`expand` builds and checks every
    combination's full config. Raises ConfigError saying what was expected, what was found and what
    to do.
    """
    folder = Path.cwd()
    if isinstance(spec, Mapping):
        values, source = dict(spec), "study spec"
    elif isinstance(spec, (str, Path)) and str(spec) in BUILTIN_SPECS:
        text = resources.files("hymamba.studies").joinpath("specs", f"{spec}.yaml").read_text(encoding="utf-8")
        import yaml

        values, source = yaml.safe_load(text), f"built-in study {spec}"
    elif isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"study spec not found: {spec}; give a YAML file or a built-in study "
                              f"({', '.join(BUILTIN_SPECS)})")
        values, source, folder = _read_yaml(path), str(path), path.parent
    else:
        raise ConfigError(f"a study spec is a built-in name, a YAML path or a dict, found {type(spec).__name__}")
    if not isinstance(values, Mapping):
        raise _fail(source, "expected a mapping with name, base, axes and seeds", values,
                    "write the spec as 'key: value' lines")
    unknown = sorted(set(map(str, values)) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; a study spec has {', '.join(_KEYS)} "
                          "(config fields go under base:)")
    return _check(values, source, folder)


def _check(values: Mapping[str, Any], source: str, folder: Path) -> Study:
    from hymamba.tasks.classification.config import ClassificationConfig as Cfg

    name = values.get("name")
    if not isinstance(name, str) or not name or _SAFE.search(name):
        raise _fail(source, "name must be text of letters, digits, '.', '_', '+' or '-'", name,
                    "give the study a short name, e.g. name: mixer")
    base = values.get("base") or {}
    if not isinstance(base, Mapping):
        raise _fail(source, "base must be a mapping of config fields (the base recipe)", base,
                    "write e.g. base: {model: mambavision_nano, epochs: 20}")
    base = dict(base)
    config_file = base.pop("config", None)
    if config_file is not None:
        if not isinstance(config_file, str):
            raise _fail(source, "base: config must be the path of a YAML recipe", config_file, "give a path")
        p = Path(config_file).expanduser()
        if not p.is_absolute() and not p.exists() and (folder / p).exists():
            p = folder / p  # relative to the spec file
        config_file = str(p)
        Cfg.load_yaml(config_file)  # ConfigError: missing, unreadable or unknown keys
    Cfg._check_keys(base, f"{source}: base")
    for k, v in base.items():
        Cfg._coerce(k, v, f"{source}: base")
    for k in _RESERVED:
        if k in base:
            raise ConfigError(f"{source}: base sets {k}, which the study sets for every run; "
                              + ("list the seeds under seeds:" if k == "seed" else "remove it (runs go under --out)"))
    axes = values.get("axes") or {}
    if not isinstance(axes, Mapping):
        raise _fail(source, "axes must map config fields to lists of values", axes,
                    "write e.g. axes: {mixer_variant: [concat, gated]}")
    axes = {str(k): v for k, v in axes.items()}
    Cfg._check_keys(axes, f"{source}: axes")
    for k, vs in axes.items():
        if k in _RESERVED:
            raise ConfigError(f"{source}: {k} cannot be an axis; "
                              + ("list the seeds under seeds:" if k == "seed" else "the study sets it"))
        if not isinstance(vs, list) or not vs:
            raise _fail(source, f"axis {k} must be a non-empty list of values", vs, f"write e.g. {k}: [a, b]")
        coerced = [Cfg._coerce(k, v, f"{source}: axis {k}") for v in vs]
        if len(set(map(repr, coerced))) != len(coerced):
            raise _fail(source, f"axis {k} lists a value twice", vs, "list each value once")
        if k in base:
            raise ConfigError(f"{source}: {k} is both in base and an axis; remove it from base")
    seeds = values.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise _fail(source, "seeds must be a non-empty list of distinct whole numbers >= 0", seeds,
                    "write e.g. seeds: [0, 1, 2]")
    reference = values.get("reference")
    if reference is not None:
        if not isinstance(reference, Mapping) or set(map(str, reference)) != set(axes):
            raise _fail(source, f"reference must give a value for every axis ({', '.join(axes) or 'none'})",
                        reference, "name the official configuration's row, e.g. reference: {mixer_variant: concat}")
        reference = {str(k): v for k, v in reference.items()}
        for k, v in reference.items():
            if v not in axes[k]:
                raise _fail(source, f"reference {k} must be one of the axis values {axes[k]}", v,
                            "pick a value the axis lists")
    return Study(name=name, base=base, axes={k: list(v) for k, v in axes.items()}, seeds=list(seeds),
                 reference=reference, config_file=config_file, source=source)


def with_overrides(study: Study, overrides: Optional[Mapping[str, Any]] = None,
                   seeds: Optional[Sequence[int]] = None) -> Study:
    """The study with config fields (e.g. from the command line) set in its base, and other seeds."""
    values = study.to_dict()
    for k in overrides or {}:
        if k in study.axes:
            raise ConfigError(f"{k} is an axis of the study {study.name} (values {study.axes[k]}); it cannot be "
                              "overridden: edit the spec instead")
    values["base"] = dict(values["base"], **(overrides or {}))
    if seeds is not None:
        values["seeds"] = list(seeds)
    return _check(values, study.source, Path.cwd())


def _slug(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return _SAFE.sub("_", text)[:60]


def combo_id(values: Mapping[str, Any]) -> str:
    """``field=value,...`` (``base`` without axes): the combination's row name and folder."""
    return ",".join(f"{k}={_slug(v)}" for k, v in values.items()) or "base"


def expand(study: Study, out_dir: str | Path) -> List[Run]:
    """Every run (combination x seed) with its checked config; nothing is trained.

    Raises ConfigError for a combination whose config the config class rejects (naming it).
    """
    from hymamba.tasks.classification.config import ClassificationConfig as Cfg

    out = Path(out_dir)
    runs: List[Run] = []
    seen: Dict[str, Dict[str, Any]] = {}
    for values in study.combinations():
        cid = combo_id(values)
        if cid in seen:
            raise ConfigError(f"{study.source}: combinations {seen[cid]} and {values} map to the same folder {cid}; "
                              "use axis values that differ in letters, digits or . _ + -")
        seen[cid] = values
        for seed in study.seeds:
            folder = f"runs/{cid}/seed={seed}"
            try:
                cfg = Cfg.build(study.config_file, dict(study.base, **values, seed=seed, output=str(out / folder)))
                cfg.check()
            except ConfigError as e:
                raise ConfigError(f"{study.source}: combination {cid}: {e}") from None
            runs.append(Run(combo=cid, values=dict(values), seed=seed, folder=folder, config=cfg))
    return runs
