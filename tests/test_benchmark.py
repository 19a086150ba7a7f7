"""The benchmark tool runs end to end (tiny model, tiny peer) and writes its table, CSV, JSON and PNG.
No timing is asserted: timings belong in benchmarks, not tests."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hymamba.apps.benchmark import BenchResult, format_table, mambavision_cases

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_cli_writes_outputs(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "hymamba.cli", "benchmark", "test_mambavision", "--image-size", "64", "--batch-size",
         "2", "--repeats", "1", "--paths", "reference", "default", "bf16", "optimized", "--peers", "resnet18",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 0, proc.stderr
    assert "test_mambavision reference" in proc.stdout and "resnet18" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["test_mambavision reference", "test_mambavision", "test_mambavision bf16",
                     "test_mambavision optimized", "resnet18"]
    for r in data["results"]:
        assert r["throughput"] > 0 and r["latency_ms"] > 0
        # memory is read after freed memory is handed back, so the baseline is never above the peak
        assert not r["train_peak_mib"] < 0
    trained = {r["name"]: r["train_step_s"] for r in data["results"]}
    assert trained["test_mambavision"] > 0 and trained["test_mambavision optimized"] != trained[
        "test_mambavision optimized"]  # NaN: the folded model is inference-only
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert (out / "throughput_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))


def test_bad_paths_and_sizes() -> None:
    with pytest.raises(ValueError, match="unknown benchmark paths"):
        mambavision_cases("test_mambavision", ["warp"])
    from hymamba.cli import main

    assert main(["benchmark", "test_mambavision", "--repeats", "0"]) == 2


def test_table_ratios() -> None:
    a = BenchResult("ref", 1.0, throughput=10, latency_ms=100, train_step_s=2.0, train_peak_mib=5)
    b = BenchResult("fast", 1.0, throughput=20, latency_ms=50, train_step_s=1.0, train_peak_mib=4)
    table = format_table([a, b], baseline="ref").splitlines()
    assert table[3].split()[2:8] == ["20.0", "2.00", "50.0", "2.00", "1.00", "2.00"]
