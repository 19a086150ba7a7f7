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


def test_int8_dynamic_and_static_stay_close_to_the_official_fixture(tmp_path: Path) -> None:
    from hymamba.apps.quantize import calibration_batches, compare_with_model, int8_path, quantize_onnx
    from hymamba.data.transforms import eval_transform, resolve_data_config

    case = load_case("tiny_a")
    model = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(model, case["checkpoint_path"])
    model.eval()
    path = export_onnx(model, tmp_path / "tiny_a.onnx", image_size=(64, 64))
    cfg = resolve_data_config(hymamba.create_model("test_mambavision").pretrained_cfg, {}, input_size=64)
    batches = calibration_batches("digits", eval_transform(cfg), 64, count=32)
    assert sum(len(b) for b in batches) == 32 and batches[0].dtype == np.float32
    x, want = case["tensors"]["input"].float().numpy(), case["tensors"]["logits"].numpy()
    scale = float(np.abs(want).max())
    for mode in ("dynamic", "static"):
        info = quantize_onnx(path, int8_path(path).with_name(f"tiny_a.{mode}.onnx"), mode, calibration=batches)
        assert info["quantized_nodes"] > 20 and info["bytes_int8"] < 0.5 * info["bytes_float"]
        got = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
        # int8 moves the official logits by a few percent of their range, never the predicted class
        assert 0 < np.abs(got - want).max() < 0.15 * scale, mode
        assert (got.argmax(1) == want.argmax(1)).all()
        cmp = compare_with_model(model, info["path"], batches)
        assert cmp["images"] == 32 and cmp["top1_agreement"] >= 0.9 and cmp["max_abs_diff"] < 0.15 * scale
    assert not list(tmp_path.glob(".*tmp*"))


def test_int8_cli_with_a_calibration_folder(tmp_path: Path) -> None:
    from imagefolder import make_image_folder

    folder = make_image_folder(tmp_path / "calib", {"apple": 3, "banana": 3}, size=48)  # + 2 unreadable files
    out = tmp_path / "m.onnx"
    base = [sys.executable, "-m", "hymamba.cli", "export", "test_mambavision", "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(base + ["--int8", "static", "--calibration", str(folder), "--calibration-images", "5"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.int8.onnx").is_file() and "static int8" in proc.stdout
    assert "int8 vs PyTorch on 5 calibration images" in proc.stdout
    proc = subprocess.run(base + ["--int8", "dynamic", "--size", "64", "96"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 2 and "export a square size for int8" in proc.stderr
