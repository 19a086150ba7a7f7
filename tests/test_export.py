"""ONNX export, run for real in ONNX Runtime, against PyTorch and the official fixtures."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import hymamba
from hymamba.apps.export import check_onnx, export_onnx

from conftest import load_case

REPO = Path(__file__).resolve().parents[1]


def test_export_reproduces_official_fixture_with_padding(tmp_path: Path) -> None:
    case = load_case("tiny_b")  # 72x88: the window-padding path
    model = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(model, case["checkpoint_path"])
    x = case["tensors"]["input"].float()
    path = export_onnx(model, tmp_path / "tiny_b.onnx", image_size=tuple(x.shape[2:]))
    assert not list(tmp_path.glob(".*tmp*"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": x.numpy()})
    np.testing.assert_allclose(logits, case["tensors"]["logits"].numpy(), rtol=0, atol=1e-4)
    # the batch dimension is dynamic
    (one,) = session.run(None, {"pixel_values": x[:1].numpy()})
    np.testing.assert_allclose(one, logits[:1], rtol=0, atol=1e-5)


def test_check_onnx_and_training_mode_restored(tmp_path: Path) -> None:
    model = hymamba.create_model("test_mambavision", num_classes=5).train()
    path = export_onnx(model, tmp_path / "m.onnx")
    assert model.training
    assert check_onnx(model, path, torch.randn(3, 3, 64, 64)) < 1e-4
    assert model.training


def test_export_cli_subprocess(tmp_path: Path, fixtures: Path) -> None:
    out = tmp_path / "out" / "tiny.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "hymamba.cli", "export", "test_mambavision", "--checkpoint",
         str(fixtures / "tiny_a.pth.tar"), "--output", str(out), "--size", "64"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "max |difference|" in proc.stdout and "(N, 10)" in proc.stdout
