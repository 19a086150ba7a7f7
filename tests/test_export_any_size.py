"""The any-size ONNX export (``export_onnx(..., dynamic_size=True)``): one file that runs at every H x W,
for a classifier, the backbone's four maps and the segmenter, in real ONNX Runtime sessions, against
PyTorch and the official fixtures.

The issue's sizes are 224 x 224, 256 x 320 and 160 x 200 (the last two need window padding in
MambaVision-T). Each file is exported at one size and run at the others, including a file traced with
a single window per token level run where they have several, and one traced with several run where
they have one (torch.export must not have specialised on the window count).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

import hymamba
from hymamba.apps.export import compare_onnx, export_onnx
from hymamba.errors import ConfigError
from hymamba.models.layers import MambaVisionMixer
from hymamba.ops.scan_onnx import scan_loop
from hymamba.ops.scan_ref import scan_ref

from conftest import load_case

REPO = Path(__file__).resolve().parents[1]
#: the issue's sizes
SIZES = [(224, 224), (256, 320), (160, 200)]
#: relative to the largest |value| of PyTorch's output
RTOL = 1e-4


def _windows(model: torch.nn.Module, size: tuple) -> list:
    """Windows per token level (levels 2 and 3) at input ``size``: (rows, cols) each."""
    out = []
    for level in (2, 3):
        side = [s for s in size]
        for _ in range(level + 2):  # stem (2 halvings) and one downsample per level before
            side = [math.ceil(s / 2) for s in side]
        ws = model.levels[level].window_size
        out.append(tuple(math.ceil(s / ws) for s in side))
    return out


def _assert_parity(model: torch.nn.Module, path: Path, size: tuple, batch: int = 1) -> None:
    torch.manual_seed(sum(size))
    result = compare_onnx(model, path, torch.randn(batch, 3, *size))
    for name, c in result.items():
        assert c["relative"] <= RTOL, f"{name} at {size}: {c}"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple:
    """The official tiny_b classifier, exported at its recorded 72 x 88 (2 x 2 windows on both token levels)."""
    case = load_case("tiny_b")
    model = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(model, case["checkpoint_path"])
    model.eval()
    path = export_onnx(model, tmp_path_factory.mktemp("cls") / "tiny_b.onnx", image_size=(72, 88), dynamic_size=True)
    return model, path, case


def test_classifier_file_is_shape_generic_and_official(classifier: tuple) -> None:
    import onnx

    model, path, case = classifier
    assert not list(path.parent.glob("*.data")) and not list(path.parent.glob(".*tmp*"))  # one file, written atomically
    graph = onnx.load(str(path)).graph
    mixers = sum(isinstance(m, MambaVisionMixer) for m in model.modules())
    assert sum(n.op_type == "Scan" for n in graph.node) == mixers  # one loop per mixer, not one step per token
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "pixel_values" and inp.shape[1] == 3 and all(isinstance(d, str) for d in (inp.shape[0], *inp.shape[2:]))
    assert out.name == "logits" and out.shape[1] == 7
    x = case["tensors"]["input"].float()
    (logits,) = session.run(None, {"pixel_values": x.numpy()})
    np.testing.assert_allclose(logits, case["tensors"]["logits"].numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", SIZES + [(32, 32), (33, 47)])
def test_classifier_any_size(classifier: tuple, size: tuple) -> None:
    model, path, _ = classifier
    _assert_parity(model, path, size, batch=2 if size == (160, 200) else 1)


def test_traced_with_several_windows_runs_with_one(classifier: tuple) -> None:
    model, path, _ = classifier
    assert all(r >= 2 and c >= 2 for r, c in _windows(model, (72, 88)))  # the traced example
    assert _windows(model, (32, 32)) == [(1, 1), (1, 1)]
    _assert_parity(model, path, (32, 32))


# ----------------------------------------------------------------------------------------------
# backbone and segmenter: the official UPerNet fixture


@pytest.fixture(scope="module")
def seg_case(fixtures: Path) -> dict:
    from test_segmenter import _fixture_segmenter

    with open(fixtures / "upernet_tiny_a.json") as f:
        spec = json.load(f)
    case = dict(spec=spec, path=fixtures / "upernet_tiny_a.pth",
                tensors=load_file(str(fixtures / "upernet_tiny_a.expected.safetensors")))
    case["model"] = _fixture_segmenter(case).eval()
    return case


def _official(out: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.float().numpy()
    assert out.shape == ref.shape
    assert float(np.abs(out - ref).max()) <= RTOL * float(np.abs(ref).max())


def test_backbone_four_maps_any_size(seg_case: dict, tmp_path: Path) -> None:
    """Exported where every token level is one window (64 x 96), run where they are several (256 x 320)."""
    backbone = seg_case["model"].backbone
    assert _windows(backbone, (64, 96)) == [(1, 1), (1, 1)]
    assert all(r * c > 1 for r, c in _windows(backbone, (256, 320)))
    path = export_onnx(backbone, tmp_path / "backbone.onnx", image_size=(64, 96), dynamic_size=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["stage1", "stage2", "stage3", "stage4"]
    exp = seg_case["tensors"]
    for hw in ("64x96", "72x56"):  # the recorded official maps
        maps = session.run(None, {"pixel_values": exp[f"input_{hw}"].float().numpy()})
        for i, m in enumerate(maps):
            _official(m, exp[f"backbone{i}_{hw}"])
    for size in SIZES:
        maps = session.run(None, {"pixel_values": np.zeros((1, 3, *size), dtype=np.float32)})
        assert [m.shape[2:] for m in maps] == [tuple(math.ceil(s / 2 ** (i + 2)) for s in size) for i in range(4)]
        _assert_parity(backbone, path, size)


def test_segmenter_any_size(seg_case: dict, tmp_path: Path) -> None:
    model = seg_case["model"]
    path = export_onnx(model, tmp_path / "seg.onnx", image_size=(64, 96), dynamic_size=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exp = seg_case["tensors"]
    for hw in ("64x96", "72x56"):
        (logits,) = session.run(None, {"pixel_values": exp[f"input_{hw}"].float().numpy()})
        _official(logits, exp[f"logits_{hw}"])
    for size in SIZES:
        _assert_parity(model, path, size)


# ----------------------------------------------------------------------------------------------
# bad input and the command line


def test_bad_requests_are_refused_before_exporting(tmp_path: Path) -> None:
    model = hymamba.create_model("test_mambavision")
    with pytest.raises(ConfigError, match="opsets 18 to"):
        export_onnx(model, tmp_path / "m.onnx", opset=17, dynamic_size=True)
    with pytest.raises(ConfigError, match="at least 2"):
        export_onnx(model, tmp_path / "m.onnx", image_size=(1, 64), dynamic_size=True)
    with pytest.raises(ConfigError, match="two whole numbers"):
        export_onnx(model, tmp_path / "m.onnx", image_size=(64,))
    assert not list(tmp_path.iterdir())


def test_export_cli_dynamic_size_and_int8_subprocess(tmp_path: Path, fixtures: Path) -> None:
    """``hymamba export --dynamic-size``: checked at two sizes; its int8 copy runs at any size too."""
    out = tmp_path / "tiny.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "hymamba.cli", "export", "test_mambavision", "--checkpoint",
         str(fixtures / "tiny_a.pth.tar"), "--output", str(out), "--size", "64", "--dynamic-size",
         "--int8", "dynamic", "--calibration-images", "8"],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 0, proc.stderr
    assert "(N, 3, H, W)" in proc.stdout and "H and W too" in proc.stdout
    assert "at 64x64" in proc.stdout and "at 80x80" in proc.stdout  # checked at a second size
    x = np.random.default_rng(0).standard_normal((3, 3, 100, 150)).astype(np.float32)
    (fp32,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
    (int8,) = ort.InferenceSession(str(tmp_path / "tiny.int8.onnx"),
                                   providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
    assert fp32.shape == int8.shape == (3, 10)
    assert np.abs(int8 - fp32).max() < 0.15 * np.abs(fp32).max()  # int8's usual few percent


@pytest.mark.parametrize("size, scale", [((2, 3), 6), ((7, 5), 3), ((6, 6), 2), ((4, 9), 1), ((1, 1), 6), ((16, 25), 6)])
def test_any_size_pooling_bins_are_pytorchs(size: tuple, scale: int) -> None:
    """The PPM's pooling under torch.export: averaging matrices built from the (symbolic) size."""
    from hymamba.models.upernet import _bin_weights

    x = torch.randn(2, 4, *size, dtype=torch.float64)
    got = _bin_weights(size[0], scale, x) @ x @ _bin_weights(size[1], scale, x).T
    torch.testing.assert_close(got, torch.nn.functional.adaptive_avg_pool2d(x, scale), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_d_bias", [True, False])
def test_scan_loop_is_the_reference(dtype: torch.dtype, with_d_bias: bool) -> None:
    """The any-size export's scan (one loop op) computes the reference's products in its order: equal."""
    g = torch.Generator().manual_seed(3)
    b, d, length, n = 3, 6, 11, 4
    u, delta = torch.randn(b, d, length, generator=g, dtype=dtype), torch.randn(b, d, length, generator=g, dtype=dtype)
    A = -torch.rand(d, n, generator=g, dtype=dtype)
    B, C = torch.randn(b, n, length, generator=g, dtype=dtype), torch.randn(b, n, length, generator=g, dtype=dtype)
    D, bias = (torch.randn(d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)) if with_d_bias \
        else (None, None)
    want = scan_ref(u, delta, A, B, C, D, bias, with_d_bias)
    torch.testing.assert_close(scan_loop(u, delta, A, B, C, D, bias, with_d_bias), want, rtol=0, atol=0)
