"""The ``hymamba`` command, in-process through ``main(argv)`` and as a real subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


from hymamba.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "hymamba.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=600)


def test_models_json_in_process(capsys, variants_json) -> None:
    assert main(["models", "mambavision_t*", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"mambavision_t", "mambavision_t2"}
    t = rows["mambavision_t"]
    assert t["params"] == variants_json["mamba_vision_T"]["params"]
    assert round(t["gmacs"], 2) == variants_json["mamba_vision_T"]["fvcore_gmacs_at_input_size"]
    assert t["top1"] == 82.3 and t["input_size"] == [3, 224, 224]


def test_models_table_subprocess() -> None:
    proc = _run("models", "mambavision_[bs]")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "official"]
    body = {line.split()[0]: line.split() for line in lines[2:] if line.startswith("mambavision")}
    assert body["mambavision_s"][1:5] == ["mamba_vision_S", "50.1", "7.50", "224"]
    assert body["mambavision_b"][1:5] == ["mamba_vision_B", "97.7", "14.98", "224"]


def test_forward_subprocess(fixtures: Path) -> None:
    proc = _run("forward", "test_mambavision", "--size", "72", "88", "--checkpoint",
                str(fixtures / "tiny_a.pth.tar"), "--scan-impl", "reference")
    assert proc.returncode == 0, proc.stderr
    assert "-> logits (2, 10)" in proc.stdout and "selective scan: reference" in proc.stdout
    assert "stage4: (2, 128, 3, 3)" in proc.stdout
    from hymamba.ops.linear import onednn_linear_available

    used = re.search(r"linear layers: (\d+) of (\d+) through oneDNN \(linear_impl=auto\)", proc.stdout)
    assert used and int(used.group(2)) > 0
    if onednn_linear_available()[0]:  # the level-4 layers (width 128) qualify; the head does not
        assert 0 < int(used.group(1)) < int(used.group(2))
    stock = _run("forward", "test_mambavision", "--linear-impl", "torch")
    assert stock.returncode == 0, stock.stderr
    assert re.search(r"linear layers: 0 of \d+ through oneDNN \(linear_impl=torch\)", stock.stdout)


def test_user_errors_are_one_line(capsys) -> None:
    assert main(["models", "nothing_like_this"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hymamba: error: no model matches")
    assert main(["forward", "mambavision_zz"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_missing_checkpoint_subprocess(tmp_path: Path) -> None:
    proc = _run("forward", "test_mambavision", "--checkpoint", str(tmp_path / "none.pth"))
    assert proc.returncode == 2
    assert "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "models" in capsys.readouterr().out


def test_bad_size_is_one_line(capsys) -> None:
    assert main(["forward", "test_mambavision", "--size", "64", "64", "64"]) == 2
    assert "--size takes H [W]" in capsys.readouterr().err
