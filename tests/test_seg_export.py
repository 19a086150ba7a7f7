"""ONNX export of a UPerNet segmenter (output (N, C, H, W)), run in ONNX Runtime against PyTorch.

The PPM's adaptive pooling exports through :class:`hymamba.models.upernet.AdaptiveAvgPool` (the same
bins as PyTorch's, as slices and means at the traced size); it is checked here against PyTorch's own
kernel at sizes where the bins overlap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import hymamba
from hymamba.apps.export import check_onnx, export_onnx
from hymamba.models.upernet import build_segmenter


def _tiny_segmenter() -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = hymamba.create_backbone("test_mambavision", window_size=(8, 8, 4, 2))
    model = build_segmenter(backbone, num_classes=5, channels=16, aux_channels=8).eval()
    # random BatchNorm statistics, so that the exported graph's folded BN is actually checked
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("size", [
    (64, 96),  # stride-16 map 4x6 in windows of 4 and stride-32 map 2x3 in windows of 2: padded
    (72, 88),  # not a multiple of 32 either: every token level pads its windows
])
def test_segmenter_onnx_parity(tmp_path: Path, size: tuple[int, int]) -> None:
    model = _tiny_segmenter()
    x = torch.randn(2, 3, *size)
    path = export_onnx(model, tmp_path / "seg.onnx", image_size=size)
    assert not model.training
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (2, 5, *size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    assert got.shape == (2, 5, *size)
    diff = float(np.abs(got - ref.numpy()).max())
    print(f"segmenter ONNX {size}: max |ORT - torch| = {diff:.3g}")
    assert diff < 1e-4
    # the batch dimension is dynamic; check_onnx agrees
    (one,) = session.run(None, {"pixel_values": x[:1].numpy()})
    np.testing.assert_allclose(one, got[:1], rtol=0, atol=1e-5)
    assert check_onnx(model, path, x) < 1e-4


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("size, scale", [((2, 3), 6), ((7, 5), 3), ((6, 6), 2), ((4, 9), 1), ((3, 3), 6)])
def test_traced_adaptive_pool_has_pytorchs_bins(size: tuple, scale: int) -> None:
    from hymamba.models.upernet import AdaptiveAvgPool

    pool = AdaptiveAvgPool(scale)
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    traced = torch.jit.trace(pool, (x,), check_trace=False)
    assert "adaptive_avg_pool2d" not in str(traced.graph)  # the explicit bins were traced
    torch.testing.assert_close(traced(x), torch.nn.functional.adaptive_avg_pool2d(x, scale), rtol=0, atol=1e-12)
    torch.testing.assert_close(pool(x), torch.nn.functional.adaptive_avg_pool2d(x, scale), rtol=0, atol=0)


def test_segmenter_export_restores_training_mode(tmp_path: Path) -> None:
    model = _tiny_segmenter().train()
    export_onnx(model, tmp_path / "seg.onnx", image_size=(64, 64))
    assert model.training
