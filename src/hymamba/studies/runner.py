"""Running a study: every run trained once, wherever it stopped, by as many processes as you start.

For each run (in the spec's order, alias combinations left out): skip it when it is finished (its
``summary.json`` says not interrupted) or claimed by a live process (:mod:`hymamba.studies.claims`);
else claim it and resume it from ``last.pth`` when a previous attempt left one (the mechanism of
``hymamba train --resume``: the checkpoint restores weights, optimiser, schedule, data order and
random states; the config is the spec's), or start it; each in a fresh process
(:mod:`hymamba.studies.worker`), so that nothing a run leaves in a process (imports, caches, random
states) reaches the next one. A run that raises writes ``failed.json`` (the error) and the study goes
on; a later ``run_study`` retries it. Ctrl-C / SIGTERM stop the current run with a checkpoint (as
``hymamba train``) and end the study.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from hymamba.studies.claims import CLAIM, claim_info, is_stale, try_claim
from hymamba.studies.spec import Run, Study, expand
from hymamba.utils.io import write_json_atomic

__all__ = ["StudyResult", "plan", "run_state", "run_study", "train_in_process", "train_in_subprocess"]

logger = logging.getLogger(__name__)

FAILED = "failed.json"


@dataclass
class StudyResult:
    """What one ``run_study`` call did."""

    out_dir: Path
    trained: List[str] = field(default_factory=list)
    resumed: List[str] = field(default_factory=list)
    skipped_finished: List[str] = field(default_factory=list)
    skipped_claimed: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    interrupted: bool = False
    aliases: Dict[str, str] = field(default_factory=dict)


def plan(study: Study, out_dir: str | os.PathLike) -> tuple:
    """``(runs to train, aliases)``: every run of the expanded study except those of combinations that
    build the same model with the same settings as an earlier one (``aliases``: {alias: original})."""
    from hymamba.studies.models import find_aliases

    runs = expand(study, out_dir)
    configs: Dict[str, Any] = {}
    for r in runs:
        configs.setdefault(r.combo, r.config)
    aliases = find_aliases(configs)
    return [r for r in runs if r.combo not in aliases], aliases


def read_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_state(run_dir: Path, stale_after: Optional[float] = None) -> str:
    """finished, failed, running (claimed by a live process), partial (a checkpoint to resume) or pending."""
    summary = read_summary(run_dir)
    if summary is not None and not summary.get("interrupted"):
        return "finished"
    info = claim_info(run_dir / CLAIM)
    if info is not None and not is_stale(info, stale_after):
        return "running"
    if (run_dir / FAILED).exists():
        return "failed"
    return "partial" if (run_dir / "last.pth").exists() else "pending"


def train_in_process(run: Run, run_dir: Path, echo: Callable[[str], None]) -> Dict[str, Any]:
    """Train (or resume) the run in this process; returns its summary."""
    from hymamba.engine import load_train_state
    from hymamba.tasks.classification import train

    state = load_train_state(run_dir) if (run_dir / "last.pth").exists() else None
    return train(run.config, resume=state, echo=echo)


def train_in_subprocess(run: Run, run_dir: Path, echo: Callable[[str], None]) -> Dict[str, Any]:
    """Train (or resume) the run in a fresh process (:mod:`hymamba.studies.worker`), its output
    appended to ``<run>/train.log``; returns its summary. Ctrl-C reaches the child (same process
    group), which stops with a checkpoint; SIGTERM is passed on to it."""
    import signal
    import subprocess
    import sys

    import yaml

    from hymamba.engine import INTERRUPTED_EXIT
    from hymamba.errors import TrainingError
    from hymamba.utils.io import atomic_write_bytes

    config = run_dir / "study_config.yaml"
    atomic_write_bytes(config, yaml.safe_dump(run.config.to_dict(), sort_keys=False).encode())
    log = run_dir / "train.log"
    echo(f"  log: {log}")
    with open(log, "ab") as f:
        child = subprocess.Popen([sys.executable, "-m", "hymamba.studies.worker", str(config)], stdout=f,
                                 stderr=subprocess.STDOUT)
        previous = {}
        try:
            previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda n, _: child.send_signal(n))}
        except ValueError:  # not the main thread: no handlers to change
            pass
        try:
            status = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    summary = read_summary(run_dir)
    if status in (0, INTERRUPTED_EXIT) and summary is not None:
        return summary
    if status == INTERRUPTED_EXIT:
        return {"interrupted": True}
    tail = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()][-3:]
    raise TrainingError(f"training exited with status {status}: {' / '.join(tail)[-1000:]} (log: {log})")


def run_study(study: Study, out_dir: str | os.PathLike, stale_after: Optional[float] = None,
              echo: Callable[[str], None] = print, train_one: Optional[Callable] = None,
              isolate: bool = True) -> StudyResult:
    """Train every run of ``study`` under ``out_dir`` that is not finished nor claimed elsewhere.

    Args:
        study: a checked study (:func:`hymamba.studies.load_spec`).
        out_dir: the study folder (shared by every process and machine working on the study).
        stale_after: seconds after which a claim from another host counts as abandoned (None: never).
        echo: where progress lines go.
        train_one: ``(run, run_dir, echo) -> summary`` (tests); default: the classification training,
            in a fresh process per run with ``isolate`` (:func:`train_in_subprocess`: results do not
            depend on which runs a process trained before), else in this process.
    Returns:
        What was trained, resumed, skipped and failed. The report is written by
        :func:`hymamba.studies.report.write_report`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, aliases = plan(study, out)
    result = StudyResult(out_dir=out, aliases=aliases)
    write_json_atomic(out / "study.json", dict(study.to_dict(), aliases=aliases,
                                               runs=[{"id": r.id, "folder": r.folder} for r in runs]))
    train_one = train_one or (train_in_subprocess if isolate else train_in_process)
    for i, run in enumerate(runs, 1):
        run_dir = out / run.folder
        where = f"[{i}/{len(runs)}] {run.id}"
        if run_state(run_dir) == "finished":
            result.skipped_finished.append(run.id)
            echo(f"{where}: finished, skipped")
            continue
        claim = try_claim(run_dir, stale_after)
        if claim is None:
            result.skipped_claimed.append(run.id)
            echo(f"{where}: claimed by another process, skipped")
            continue
        with claim:
            if run_state(run_dir) == "finished":  # finished by another process between the checks
                result.skipped_finished.append(run.id)
                continue
            resuming = (run_dir / "last.pth").exists()
            echo(f"{where}: {'resuming' if resuming else 'training'} in {run_dir}")
            try:
                summary = train_one(run, run_dir, echo)
            except Exception as e:  # noqa: BLE001 - one failed run must not stop the study
                result.failed.append(run.id)
                write_json_atomic(run_dir / FAILED, {
                    "run": run.id, "error": f"{type(e).__name__}: {e}", "host": socket.gethostname(),
                    "pid": os.getpid(), "time": time.time(), "traceback": traceback.format_exc()[-5000:]})
                echo(f"{where}: FAILED: {type(e).__name__}: {e}")
                logger.debug("run %s failed", run.id, exc_info=True)
                continue
            (run_dir / FAILED).unlink(missing_ok=True)
            if summary.get("interrupted"):
                result.interrupted = True
                echo(f"{where}: interrupted; its checkpoint is kept, run the study again to resume it")
                break
            (result.resumed if resuming else result.trained).append(run.id)
            top1 = summary.get("final_top1")
            echo(f"{where}: done, val top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else f"{where}: done")
    return result
