"""``hymamba ablate``: study specs (expansion, errors), aliases (identical models trained once), claims
(several processes on one study), the runner (skip finished, resume, record failures) and the report,
end to end through the command line on a tiny recipe."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hymamba.errors import ConfigError
from hymamba.studies import claims
from hymamba.studies.spec import BUILTIN_SPECS, expand, load_spec, with_overrides
from imagefolder import run_cli

#: a tiny recipe: the test model at 32 px on 16 digits, one epoch
TINY_BASE = dict(model="test_mambavision", input_size=32, epochs=1, batch_size=8, warmup_epochs=0, cooldown_epochs=0,
                 max_train_samples=16, max_val_samples=8, workers=0, quiet=True, aa=None)


def tiny_spec(**changes) -> dict:
    spec = dict(name="tiny", base=dict(TINY_BASE), axes={"mixer_variant": ["concat", "gated"]}, seeds=[0, 1],
                reference={"mixer_variant": "concat"})
    spec.update(changes)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# the spec


def test_expansion_gives_stable_folders_and_checked_configs(tmp_path: Path) -> None:
    study = load_spec(tiny_spec(axes={"mixer_variant": ["concat", "gated"], "lr": [0.001, 0.004]}, seeds=[3, 1],
                                reference=None))
    runs = expand(study, tmp_path)
    assert [r.id for r in runs][:3] == ["mixer_variant=concat,lr=0.001/seed=3", "mixer_variant=concat,lr=0.001/seed=1",
                                        "mixer_variant=concat,lr=0.004/seed=3"]
    assert len(runs) == 8 and len({r.folder for r in runs}) == 8
    r = runs[-1]
    assert r.folder == "runs/mixer_variant=gated,lr=0.004/seed=1"
    assert (r.config.mixer_variant, r.config.lr, r.config.seed) == ("gated", 0.004, 1)
    assert r.config.output == str(tmp_path / r.folder) and r.config.model == "test_mambavision"
    assert [x.folder for x in expand(study, tmp_path)] == [x.folder for x in runs]  # same spec, same folders
    # overrides from the command line change the base recipe and the seeds
    changed = with_overrides(study, {"epochs": 2}, seeds=[5])
    assert {(x.config.epochs, x.seed) for x in expand(changed, tmp_path)} == {(2, 5)}
    with pytest.raises(ConfigError, match="lr is an axis"):
        with_overrides(study, {"lr": 0.1})


def test_builtin_specs_and_yaml_files_with_a_base_config(tmp_path: Path) -> None:
    for name in BUILTIN_SPECS:
        study = load_spec(name)
        assert study.name == name and study.seeds == [0, 1, 2] and study.reference is not None
        assert study.base["data"] == "cued-digits" and study.base["model"] == "mambavision_nano"
        runs = expand(study, tmp_path)  # every run's config is complete and checked
        assert {r.config.hflip for r in runs} == {0.0} and {r.config.aa for r in runs} == {None}
    assert load_spec("mixer").axes == {"mixer_variant": ["concat", "gated", "regular_conv", "causal_conv"]}
    assert len(load_spec("pattern").axes["attention_pattern"]) == 5
    (tmp_path / "recipe.yaml").write_text("epochs: 3\nlr: 0.002\n")
    spec = tiny_spec(base=dict(TINY_BASE, config="recipe.yaml"))
    del spec["base"]["epochs"]
    study = load_spec(write_spec(tmp_path / "s.yaml", spec))  # config: relative to the spec file
    cfg = expand(study, tmp_path / "out")[0].config
    assert (cfg.epochs, cfg.lr, cfg.input_size) == (3, 0.002, 32)


@pytest.mark.parametrize("change, message", [
    (dict(colour="red"), "unknown key"),
    (dict(name="a b"), "name must be"),
    (dict(base={"epoch": 3}), "epoch .did you mean epochs"),
    (dict(base={"epochs": "many"}), "epochs must be a number"),
    (dict(base={"seed": 1}), "base sets seed"),
    (dict(axes={"mixer_variant": "concat"}), "non-empty list"),
    (dict(axes={"mixer_variant": []}), "non-empty list"),
    (dict(axes={"mixer_variant": ["concat", "concat"]}), "twice"),
    (dict(axes={"seed": [1, 2]}), "seed cannot be an axis"),
    (dict(axes={"mixer_varient": ["concat"]}), "did you mean mixer_variant"),
    (dict(seeds=[]), "seeds must be"),
    (dict(seeds=[1, 1]), "seeds must be"),
    (dict(seeds=["a"]), "seeds must be"),
    (dict(reference={"mixer_variant": "nope"}), "reference mixer_variant must be one of"),
    (dict(reference={"attention_pattern": "last_half"}), "reference must give a value for every axis"),
])
def test_bad_specs_are_rejected_with_what_to_do(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_spec(tiny_spec(**change))


def test_bad_values_are_rejected_before_any_training(tmp_path: Path) -> None:
    study = load_spec(tiny_spec(axes={"mixer_variant": ["concat", "nope"]}))
    with pytest.raises(ConfigError, match="combination mixer_variant=nope: mixer_variant must be one of"):
        expand(study, tmp_path)
    with pytest.raises(ConfigError, match="cooldown_epochs"):
        expand(load_spec(tiny_spec(base=dict(TINY_BASE, cooldown_epochs=1))), tmp_path)
    with pytest.raises(ConfigError, match="study spec not found"):
        load_spec(str(tmp_path / "missing.yaml"))
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# aliases


def test_identical_models_are_trained_once(tmp_path: Path) -> None:
    from hymamba.studies.runner import plan

    # nano has 2 blocks per token level: interleave puts attention where last_half does
    pattern = load_spec(dict(name="p", base={"model": "mambavision_nano"}, seeds=[0, 1],
                             axes={"attention_pattern": ["last_half", "first_half", "interleave"]}))
    runs, aliases = plan(pattern, tmp_path)
    assert aliases == {"attention_pattern=interleave": "attention_pattern=last_half"}
    assert {r.combo for r in runs} == {"attention_pattern=last_half", "attention_pattern=first_half"}
    assert len(runs) == 4
    # the test model has 3 blocks in level 2: there interleave is another model
    small = load_spec(dict(name="p", base={"model": "test_mambavision"},
                           axes={"attention_pattern": ["last_half", "interleave"]}))
    assert plan(small, tmp_path)[1] == {}
    # same parameters, different forward (causal padding): not an alias
    mixer = load_spec(dict(name="m", base={"model": "mambavision_nano"},
                           axes={"mixer_variant": ["regular_conv", "causal_conv"]}))
    assert plan(mixer, tmp_path)[1] == {}
    # same model, other settings: not an alias either
    other = load_spec(dict(name="o", base={"model": "mambavision_nano", "lr": 0.001},
                           axes={"attention_pattern": ["last_half", "interleave"], "epochs": [3, 4]}))
    assert plan(other, tmp_path)[1] == {"attention_pattern=interleave,epochs=3": "attention_pattern=last_half,epochs=3",
                                        "attention_pattern=interleave,epochs=4": "attention_pattern=last_half,epochs=4"}
    assert not any(tmp_path.iterdir())  # planning writes nothing
    # measured side by side, once: an alias reports its model's speed, and the numbers are kept
    from hymamba.studies.report import collect

    combos = {c["combination"]: c for c in collect(pattern, tmp_path / "report")["combinations"]}
    speed = {k: c["images_per_second"] for k, c in combos.items()}
    assert all(v and v > 0 for v in speed.values())
    assert speed["attention_pattern=interleave"] == speed["attention_pattern=last_half"]
    cached = json.loads((tmp_path / "report" / "measurements.json").read_text())
    assert {k: v["images_per_second"] for k, v in cached.items()} == speed
    assert {c["images_per_second"] for c in collect(pattern, tmp_path / "report")["combinations"]} == set(speed.values())


# ----------------------------------------------------------------------------------------------
# claims


def _write_claim(folder: Path, **info) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / claims.CLAIM
    path.write_text(json.dumps(info))
    return path


def test_live_claims_are_respected_and_stale_ones_taken_over(tmp_path: Path) -> None:
    host = socket.gethostname()
    # a live process on this host (our parent): skipped
    parent = os.getppid()
    _write_claim(tmp_path / "live", host=host, pid=parent, started=claims._start_time(parent), time=time.time())
    assert claims.try_claim(tmp_path / "live") is None
    # a finished process on this host: stale, taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_claim(tmp_path / "dead", host=host, pid=dead.pid, started="1", time=time.time())
    claim = claims.try_claim(tmp_path / "dead")
    assert claim is not None
    assert json.loads((tmp_path / "dead" / claims.CLAIM).read_text())["pid"] == os.getpid()
    again = claims.try_claim(tmp_path / "dead")  # our own claim (an earlier attempt in this process): ours again
    assert again is not None
    again.release()
    claim.release()
    assert not (tmp_path / "dead" / claims.CLAIM).exists()
    # a pid reused by another process (its start time differs): stale
    _write_claim(tmp_path / "reused", host=host, pid=parent, started="-1", time=time.time())
    claims.try_claim(tmp_path / "reused").release()
    # another host: respected until its heartbeat is older than --stale-after
    path = _write_claim(tmp_path / "remote", host=host + "-elsewhere", pid=1, time=time.time() - 500)
    assert claims.try_claim(tmp_path / "remote") is None
    assert claims.try_claim(tmp_path / "remote", stale_after=1000) is None
    os.utime(path, (time.time() - 500, time.time() - 500))
    assert claims.try_claim(tmp_path / "remote", stale_after=1000) is None
    with claims.try_claim(tmp_path / "remote", stale_after=100) as taken:
        assert json.loads(taken.path.read_text())["host"] == host
    # a half-written claim (its writer between create and write) is respected while fresh
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / claims.CLAIM).write_text("")
    assert claims.try_claim(tmp_path / "torn", stale_after=100) is None
    # the holder keeps its claim fresh
    with claims.try_claim(tmp_path / "beat", heartbeat=0.05) as held:
        os.utime(held.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - held.path.stat().st_mtime < 5


# ----------------------------------------------------------------------------------------------
# the runner, in process (a fake training)


def test_a_failed_run_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    from hymamba.studies.report import write_report
    from hymamba.studies.runner import run_study

    calls = []

    def train_one(run, run_dir, echo):
        calls.append(run.id)
        if run.id == "mixer_variant=gated/seed=0":
            raise RuntimeError("boom")
        summary = dict(interrupted=False, final_top1=50.0 + run.seed, best_top1=60.0, wall_seconds=1.5, epochs=1)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    study = load_spec(tiny_spec())
    result = run_study(study, tmp_path, train_one=train_one, echo=lambda line: None)
    assert len(calls) == 4 and result.failed == ["mixer_variant=gated/seed=0"] and len(result.trained) == 3
    failed = json.loads((tmp_path / "runs/mixer_variant=gated/seed=0/failed.json").read_text())
    assert "RuntimeError: boom" in failed["error"]
    assert not list(tmp_path.rglob(claims.CLAIM))  # every claim released
    paths = write_report(study, tmp_path, throughput=False)
    table = {(r["combination"], r["seed"]): r for r in rows(paths["csv"])}
    assert table[("mixer_variant=gated", "0")]["status"] == "failed"
    assert "boom" in table[("mixer_variant=gated", "0")]["error"]
    assert table[("mixer_variant=concat", "1")]["final_top1"] == "51.0"
    md = paths["md"].read_text()
    assert "50.50 ± 0.71 | 2" in md and "1 run(s) failed" in md
    # again: only the failed run is retried
    calls.clear()
    result = run_study(study, tmp_path, train_one=train_one, echo=lambda line: None)
    assert calls == ["mixer_variant=gated/seed=0"] and len(result.skipped_finished) == 3


# ----------------------------------------------------------------------------------------------
# end to end through the command line


def test_a_tiny_study_end_to_end_resumed_and_reported(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "tiny.yaml", tiny_spec())
    out = tmp_path / "study"
    dry = run_cli("ablate", str(spec), "--out", str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "4 run(s) to train" in dry.stdout and "mixer_variant=gated/seed=1" in dry.stdout
    assert not out.exists()  # a dry run writes nothing

    done = run_cli("ablate", str(spec), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 trained, 0 resumed, 0 already finished" in done.stdout
    table = rows(out / "results.csv")
    assert len(table) == 4 and {r["status"] for r in table} == {"finished"}
    assert {(r["mixer_variant"], r["seed"]) for r in table} == {(v, s) for v in ("concat", "gated") for s in "01"}
    assert all(0 <= float(r["final_top1"]) <= 100 and int(r["params"]) > 0 for r in table)
    md = (out / "results.md").read_text()
    assert "`concat` (reference)" in md and "| 2 |" in md and "`gated`" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # half-finished: one run lost its summary (resumed from last.pth), another never started
    runs = out / "runs"
    (runs / "mixer_variant=concat/seed=1/summary.json").unlink()
    import shutil

    shutil.rmtree(runs / "mixer_variant=gated/seed=0")
    kept = {p: p.stat().st_mtime_ns for p in (runs / "mixer_variant=concat/seed=0/last.pth",
                                               runs / "mixer_variant=gated/seed=1/summary.json")}
    assert (runs / "mixer_variant=gated/seed=1/train.log").is_file()  # each run trained in its own process
    again = run_cli("ablate", str(spec), "--out", str(out), "--in-process")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 trained, 1 resumed, 2 already finished" in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished runs were not retrained
    assert {r["status"] for r in rows(out / "results.csv")} == {"finished"}

    # the report alone
    for name in ("results.csv", "results.md", "results.png"):
        (out / name).unlink()
    report = run_cli("ablate", str(spec), "--out", str(out), "--report-only", "--no-throughput")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "trained" not in report.stdout and len(rows(out / "results.csv")) == 4
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


def test_a_failing_study_exits_non_zero(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "bad.yaml", tiny_spec(base=dict(TINY_BASE, data=str(tmp_path / "no_data")),
                                                       axes={}, seeds=[0], reference=None))
    proc = run_cli("ablate", str(spec), "--out", str(tmp_path / "out"), "--no-throughput")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 run(s) failed" in proc.stderr
    assert (tmp_path / "out/runs/base/seed=0/failed.json").is_file()
    failed = rows(tmp_path / "out/results.csv")[0]
    assert failed["status"] == "failed" and "data folder not found" in failed["error"]
    bad = run_cli("ablate", "no_such_study", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "study spec not found" in bad.stderr
