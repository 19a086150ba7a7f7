"""A study's report, written atomically into the study folder from whatever runs exist so far:

- ``results.csv``: one row per run (axis values, seed, status, final and best top-1, parameters,
  training seconds, epochs, folder);
- ``results.md``: one row per combination: final top-1 mean ± sample std over the finished seeds and
  their count n, best top-1 mean, parameters, GMACs, throughput, training time; the reference row
  marked, aliases (same model and settings as another row: trained once) noted;
- ``results.png``: mean final top-1 per combination with std error bars.

Parameters and GMACs come from the combination's model built on the ``meta`` device; throughput is
measured once, for all combinations side by side (CPU, float32, eval mode, batch 8, one batch of each
model per round, interleaved, median of 15 rounds; an alias shares its model's number), on the
machine writing the report, and kept in ``measurements.json`` so that later reports reuse it (delete
the file to measure again, e.g. on a quiet machine: ``--report-only``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from hymamba.studies.runner import FAILED, plan, read_summary, run_state
from hymamba.studies.spec import Study, expand
from hymamba.utils.io import atomic_write, atomic_write_bytes, write_json_atomic

__all__ = ["collect", "write_report"]

#: images per timed batch
THROUGHPUT_BATCH = 8
THROUGHPUT_NOTE = ("images/s: inference throughput on the machine that first wrote this report, all models measured "
                   "side by side (CPU, float32, eval mode, batch 8, interleaved batches, median of 15 rounds; "
                   "measurements.json), not during training")


def _config_key(cfg: Any) -> str:
    rest = {k: v for k, v in cfg.to_dict().items() if k not in ("output", "seed")}
    return hashlib.sha256(repr(sorted(rest.items())).encode()).hexdigest()[:16]


def _num_classes(out: Path, folders: List[str]) -> int:
    """The class count the runs trained with (their model.json), else the built-in digits' 10."""
    for folder in folders:
        try:
            n = json.loads((out / folder / "model.json").read_text(encoding="utf-8")).get("num_classes")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(n, int) and n > 0:
            return n
    return 10


def _measurements(out: Path, configs: Dict[str, Any], throughput: bool, num_classes: int,
                  aliases: Mapping[str, str]) -> Dict[str, Dict[str, Any]]:
    from hymamba.studies.models import measure, throughputs

    path = out / "measurements.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    cached = cached if isinstance(cached, dict) else {}
    result, changed = {}, False
    for combo, cfg in configs.items():
        key = f"{_config_key(cfg)}-{num_classes}"
        entry = cached.get(combo)
        if not isinstance(entry, dict) or entry.get("key") != key:
            entry = dict(measure(cfg, num_classes=num_classes), key=key, images_per_second=None, throughput_batch=None)
            cached[combo], changed = entry, True
        result[combo] = entry
    missing = [c for c in configs if result[c].get("images_per_second") is None]
    if throughput and missing:  # all combinations at once, side by side (an alias shares its model's number)
        own = [c for c in configs if c not in aliases]
        speeds = throughputs({c: configs[c] for c in own}, num_classes=num_classes, batch_size=THROUGHPUT_BATCH)
        for combo in configs:
            result[combo].update(images_per_second=speeds[aliases.get(combo, combo)], throughput_batch=THROUGHPUT_BATCH)
        changed = True
    if changed:
        write_json_atomic(path, cached)
    return result


def collect(study: Study, out_dir: str | Path, throughput: bool = True) -> Dict[str, Any]:
    """The study's runs and combinations as plain rows (what the report files show)."""
    out = Path(out_dir)
    runs = expand(study, out)
    trained, aliases = plan(study, out)
    configs: Dict[str, Any] = {}
    for r in runs:
        configs.setdefault(r.combo, r.config)
    measured = _measurements(out, configs, throughput, _num_classes(out, [r.folder for r in trained]), aliases)
    run_rows: List[Dict[str, Any]] = []
    for r in trained:
        run_dir = out / r.folder
        s = read_summary(run_dir) or {}
        status = run_state(run_dir)
        error = None
        if status == "failed":
            try:
                error = json.loads((run_dir / FAILED).read_text(encoding="utf-8")).get("error")
            except (OSError, ValueError, AttributeError):
                error = "unknown"
        done = status == "finished"
        run_rows.append(dict(
            combination=r.combo, **{k: v for k, v in r.values.items()}, seed=r.seed, status=status,
            final_top1=s.get("final_top1") if done else None, best_top1=s.get("best_top1") if done else None,
            params=measured[r.combo]["params"], train_seconds=s.get("wall_seconds") if done else None,
            epochs=s.get("epochs"), folder=r.folder, error=error))
    reference = None
    if study.reference is not None:
        from hymamba.studies.spec import combo_id

        reference = combo_id({k: study.reference[k] for k in study.axes})
    combos = []
    for combo, cfg in configs.items():
        source = aliases.get(combo, combo)
        rows = [r for r in run_rows if r["combination"] == source]
        done = [r for r in rows if r["status"] == "finished" and r["final_top1"] is not None]
        finals = [r["final_top1"] for r in done]
        m = measured[combo]
        combos.append(dict(
            combination=combo, values=next(r.values for r in runs if r.combo == combo), n=len(finals),
            runs=len(rows), failed=sum(r["status"] == "failed" for r in rows),
            top1_mean=statistics.fmean(finals) if finals else None,
            top1_std=statistics.stdev(finals) if len(finals) > 1 else None,
            best_mean=statistics.fmean([r["best_top1"] for r in done if r["best_top1"] is not None])
            if any(r["best_top1"] is not None for r in done) else None,
            train_seconds=statistics.fmean([r["train_seconds"] for r in done if r["train_seconds"] is not None])
            if done else None,
            params=m["params"], gmacs=m["gmacs"], images_per_second=m.get("images_per_second"),
            input_size=m["input_size"], reference=combo == reference, alias_of=aliases.get(combo)))
    return {"study": study.name, "axes": list(study.axes), "runs": run_rows, "combinations": combos,
            "aliases": aliases}


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _csv(data: Dict[str, Any]) -> bytes:
    columns = ["combination", *data["axes"], "seed", "status", "final_top1", "best_top1", "params", "train_seconds",
               "epochs", "folder", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in data["runs"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue().encode()


def _markdown(data: Dict[str, Any]) -> bytes:
    axes = data["axes"]
    lines = [f"# Study {data['study']}", "",
             "| " + " | ".join([*(f"`{a}`" for a in axes), "final top-1 % (mean ± std)", "n", "best top-1 %",
                                "params (M)", "GMACs", "images/s", "training s", "note"]) + " |",
             "|" + "---|" * (len(axes) + 8)]
    for c in data["combinations"]:
        top1 = "-" if c["top1_mean"] is None else (f"{c['top1_mean']:.2f} ± {c['top1_std']:.2f}"
                                                    if c["top1_std"] is not None else f"{c['top1_mean']:.2f}")
        notes = []
        if c["reference"]:
            notes.append("**reference**")
        if c["alias_of"]:
            notes.append(f"same model and settings as {c['alias_of']}: its runs")
        if c["failed"]:
            notes.append(f"{c['failed']} run(s) failed")
        if c["n"] < c["runs"] and not c["failed"]:
            notes.append(f"{c['runs'] - c['n']} run(s) not finished")
        values = [f"`{c['values'][a]}`" + (" (reference)" if c["reference"] else "") for a in axes]
        lines.append("| " + " | ".join([*values, top1, str(c["n"]), _fmt(c["best_mean"]), f"{c['params'] / 1e6:.3f}",
                                        _fmt(c["gmacs"], 3), _fmt(c["images_per_second"], 1),
                                        _fmt(c["train_seconds"], 0), "; ".join(notes)]) + " |")
    size = {c["input_size"] for c in data["combinations"]}
    lines += ["", f"top-1: final validation top-1 of each finished run (the EMA's when the recipe keeps one); std: "
              f"sample standard deviation over the seeds (n of them). GMACs at {'/'.join(map(str, sorted(size)))} px, "
              "fvcore's convention (as 'hymamba models'). " + THROUGHPUT_NOTE + ". training s: mean wall time of a "
              "run (its summary.json)."]
    if data["aliases"]:
        lines += ["", "Aliases (identical model and settings, trained once): "
                  + "; ".join(f"{a} = {b}" for a, b in data["aliases"].items()) + "."]
    return ("\n".join(lines) + "\n").encode()


def _plot(data: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = data["combinations"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(combos) + 1.5), 4.0))
    xs = range(len(combos))
    means = [c["top1_mean"] or 0.0 for c in combos]
    errs = [c["top1_std"] or 0.0 for c in combos]
    colours = ["tab:orange" if c["reference"] else "tab:blue" for c in combos]
    bars = ax.bar(xs, means, yerr=errs, capsize=4, color=colours)
    for bar, c in zip(bars, combos):
        if c["alias_of"]:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
        ax.annotate(f"n={c['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    finished = [m for m, c in zip(means, combos) if c["top1_mean"] is not None]
    if finished:
        low = min(m - e for m, e, c in zip(means, errs, combos) if c["top1_mean"] is not None)
        high = max(m + e for m, e, c in zip(means, errs, combos) if c["top1_mean"] is not None)
        ax.set_ylim(max(0.0, low - max(2.0, 0.1 * (100 - low))), min(101.0, high + 2.0))
    labels = [",".join(str(v) for v in c["values"].values()) or "base" for c in combos]
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final val top-1 % (mean ± std over seeds)")
    ax.set_title(f"study {data['study']} (orange: reference; hatched: alias)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(study: Study, out_dir: str | Path, throughput: bool = True) -> Dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``results.png`` (atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = collect(study, out, throughput)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png",
             "json": out / "results.json"}
    atomic_write_bytes(paths["csv"], _csv(data))
    atomic_write_bytes(paths["md"], _markdown(data))
    write_json_atomic(paths["json"], data)
    atomic_write(paths["png"], lambda tmp: _plot(data, tmp))
    return paths
