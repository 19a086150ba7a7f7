"""The package's shape: layers import only downwards (import-linter), no import cycles at all (also
not through imports inside functions), no file over 600 lines, and a command line that answers
``--help`` without loading torch. Also the CLI's error policy."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "hymamba"
BIN = Path(sys.executable).parent


def test_layers_contract_is_kept() -> None:
    exe = BIN / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 kept, 0 broken" in proc.stdout


def _strongly_connected(graph: dict) -> list:
    """Tarjan's algorithm: the strongly connected components with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("hymamba", exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m.startswith("hymamba")}
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & modules for m in modules}
    assert _strongly_connected(edges) == []
    # the check can fail: with the type-checking-only import of the trainer it sees a cycle
    full = grimp.build_graph("hymamba", exclude_type_checking_imports=False)
    edges = {m: set(full.find_modules_directly_imported_by(m)) & modules for m in modules}
    assert ["hymamba.engine.callbacks", "hymamba.engine.loop"] in _strongly_connected(edges)


def test_no_file_over_600_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}


def test_every_subpackage_says_its_job() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        text = init.read_text(encoding="utf-8").lstrip()
        assert text.startswith('"""'), f"{init.relative_to(PACKAGE)} has no docstring"


def test_help_does_not_import_torch() -> None:
    exe = BIN / "hymamba"
    if not exe.exists():
        pytest.skip("the hymamba command is not installed (pip install -e .)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for command in ("models", "train", "validate", "predict", "export", "benchmark"):
        assert command in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "hymamba.cli.main" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "timm", "numpy")}


# ----------------------------------------------------------------------------------------------
# the error policy


def test_our_errors_are_one_line_with_status_2_or_1(monkeypatch, capsys) -> None:
    from hymamba.cli.commands import models
    from hymamba.cli.main import main
    from hymamba.errors import ConfigError, HymambaError, TrainingError

    for error, status in ((ConfigError("bad value 7: expected 1-3"), 2), (TrainingError("diverged"), 1),
                          (HymambaError("kernel failed"), 1)):
        def fail(args, error=error):
            raise error
        monkeypatch.setattr(models, "run", fail)
        assert main(["models"]) == status
        err = capsys.readouterr().err
        assert err == f"hymamba: error: {error}\n" and "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    from hymamba.cli.commands import models
    from hymamba.cli.main import main

    def bug(args):
        raise ValueError("an internal mistake")  # not a HymambaError: a bug, not the user's input
    monkeypatch.setattr(models, "run", bug)
    with pytest.raises(ValueError, match="an internal mistake"):
        main(["models"])


def test_a_bug_in_a_subprocess_prints_a_traceback(tmp_path: Path) -> None:
    code = ("import sys; from hymamba.cli.commands import models; from hymamba.cli.main import main\n"
            "def bug(args): raise KeyError('oops')\n"
            "models.run = bug\n"
            "sys.exit(main(['models']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'oops'" in proc.stderr
