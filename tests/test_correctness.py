"""Review findings, each with the test that caught it: features_only with weights, the mamba_ssm
kernel's input contract under AMP, float64 dispatch, the official initialisation, no head dropout,
ONNX export with an explicit scan implementation."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

import hymamba
from hymamba.errors import KernelUnavailable
from hymamba.models.layers import MambaVisionMixer
from hymamba.ops import dispatch, kernels
from hymamba.ops.scan_ref import selective_scan_ref

from conftest import load_case


# ----------------------------------------------------------------------------------------------
# features_only with weights (the weights go in before timm's feature wrapper prunes the head)


def test_features_only_with_a_checkpoint() -> None:
    """Before: the weights were loaded after timm's wrapper renamed the keys (118 missing keys)."""
    case = load_case("tiny_a")
    feats = hymamba.create_model("test_mambavision", checkpoint_path=case["checkpoint_path"], features_only=True,
                                 out_indices=(0, 1, 2, 3)).eval().double()
    with torch.no_grad():
        maps = feats(case["tensors"]["input"])
    assert len(maps) == 4
    for i, m in enumerate(maps):  # the official stage outputs, before each downsample
        torch.testing.assert_close(m, case["tensors"][f"stage{i + 1}"], rtol=1e-6, atol=1e-10)
    assert feats.feature_info.channels() == [16, 32, 64, 128]
    two = hymamba.create_model("test_mambavision", checkpoint_path=case["checkpoint_path"], features_only=True,
                               out_indices=(1, 3)).eval().double()
    with torch.no_grad():
        a, b = two(case["tensors"]["input"])
    torch.testing.assert_close(b, case["tensors"]["stage4"], rtol=1e-6, atol=1e-10)
    assert not hasattr(two.model, "head") or isinstance(two.model.head, torch.nn.Identity)  # pruned after loading


# ----------------------------------------------------------------------------------------------
# mamba_ssm: a stand-in module that enforces the real kernel's input contract


class _Calls(list):
    pass


def _stand_in_mamba_ssm(calls: _Calls) -> types.ModuleType:
    """``mamba_ssm.ops.selective_scan_interface`` with the real package's Python wrapper steps and
    the checks its CUDA kernel makes (csrc/selective_scan/selective_scan.cpp), computing with the
    reference recurrence in float32 and returning ``u``'s dtype, as the kernel does."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise RuntimeError(message)  # TORCH_CHECK raises RuntimeError

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        # the wrapper: last-dim contiguity, B/C (batch, N, L) -> (batch, 1, N, L)
        u = u if u.stride(-1) == 1 else u.contiguous()
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        B = B if B.stride(-1) == 1 else B.contiguous()
        C = C if C.stride(-1) == 1 else C.contiguous()
        D = D.contiguous() if D is not None else None
        B4, C4 = (B.unsqueeze(1) if B.dim() == 3 else B), (C.unsqueeze(1) if C.dim() == 3 else C)
        # the kernel
        itype = u.dtype
        check(itype in (torch.float32, torch.float16, torch.bfloat16), f"u must be fp32/fp16/bf16, got {itype}")
        check(A.dtype == torch.float32, f"A must be float32, got {A.dtype}")
        check(delta.dtype == itype, f"delta must have u's dtype {itype}, got {delta.dtype}")
        check(B4.dtype == itype and C4.dtype == itype, f"B, C must have u's dtype {itype}, got {B4.dtype}, {C4.dtype}")
        batch, dim, length = u.shape
        check(tuple(delta.shape) == (batch, dim, length), "delta shape")
        check(A.dim() == 2 and A.shape[0] == dim and A.shape[1] <= 256, "A shape")
        n = A.shape[1]
        check(tuple(B4.shape) == (batch, 1, n, length) and tuple(C4.shape) == (batch, 1, n, length), "B/C shape")
        check(D is None or (D.dtype == torch.float32 and tuple(D.shape) == (dim,)), "D must be float32 (dim,)")
        check(delta_bias is None or (delta_bias.dtype == torch.float32 and tuple(delta_bias.shape) == (dim,)),
              "delta_bias must be float32 (dim,)")
        check(z is None and not return_last_state, "hymamba calls the kernel without z and last state")
        calls.append({"u": itype, "delta": delta.dtype, "B": B.dtype, "C": C.dtype})
        y = selective_scan_ref(u.float(), delta.float(), A, B4[:, 0].float(), C4[:, 0].float(), D, delta_bias,
                               delta_softplus)
        return y.to(itype)

    module = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    module.selective_scan_fn = selective_scan_fn
    return module


@pytest.fixture
def mamba_ssm(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    """The stand-in installed where ``import mamba_ssm.ops.selective_scan_interface`` finds it."""
    calls = _Calls()
    interface = _stand_in_mamba_ssm(calls)
    package, ops = types.ModuleType("mamba_ssm"), types.ModuleType("mamba_ssm.ops")
    package.ops, ops.selective_scan_interface = ops, interface
    for name, mod in (("mamba_ssm", package), ("mamba_ssm.ops", ops),
                      ("mamba_ssm.ops.selective_scan_interface", interface)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(kernels, "_mamba_ssm", None)  # forget any earlier import attempt
    # these CPU tests stand for CUDA ones: let the stand-in run on CPU tensors
    real = dispatch._compiled_kernel

    def compiled_kernel(impl, device, why, dtype=torch.float32):
        if impl == "mamba_ssm" and device.type == "cpu":
            return real(impl, torch.device("cuda"), why, dtype)
        return real(impl, device, why, dtype)

    monkeypatch.setattr(dispatch, "_compiled_kernel", compiled_kernel)
    return calls


def test_auto_picks_mamba_ssm_on_cuda_but_not_for_float64(mamba_ssm: _Calls) -> None:
    assert kernels.mamba_ssm_scan_fn()[0] is not None  # found through the real import path
    assert dispatch._auto_impl_for("cuda", False, False, False)[0] == "mamba_ssm"
    impl, why = dispatch._auto_impl_for("cuda", False, False, True)
    assert impl == "fast" and "float64" in why


def test_explicit_mamba_ssm_refuses_float64(mamba_ssm: _Calls) -> None:
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with pytest.raises(KernelUnavailable, match="not float64"):
        hymamba.selective_scan(x, x.abs(), -torch.rand(4, 3, dtype=torch.float64), torch.randn(2, 3, 5).double(),
                               torch.randn(2, 3, 5).double(), impl="mamba_ssm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_training_meets_the_kernel_contract(mamba_ssm: _Calls, dtype: torch.dtype) -> None:
    """Under autocast the depthwise conv ran in float32 (its weight promoted x) while delta, B and C
    came out of the projections in half precision: mamba_ssm's kernel rejects that mix."""
    torch.manual_seed(0)
    model = hymamba.create_model("test_mambavision", scan_impl="mamba_ssm", num_classes=5)
    ref = hymamba.create_model("test_mambavision", scan_impl="reference", num_classes=5)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    with torch.autocast("cpu", dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    assert len(mamba_ssm) == sum(isinstance(m, MambaVisionMixer) for m in model.modules()) == 3  # one per mixer
    assert all(c == {"u": dtype, "delta": dtype, "B": dtype, "C": dtype} for c in mamba_ssm)
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 1e-2
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_mixer_convs_run_in_the_activation_dtype() -> None:
    """As the official nn.Conv1d under autocast: the conv output (the scan's u) is half precision."""
    mixer = MambaVisionMixer(32, scan_impl="reference")
    seen = {}
    real = dispatch.scan_ref

    def spy(u, delta, *args):
        seen.update(u=u.dtype, delta=delta.dtype)
        return real(u, delta, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "scan_ref", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixer(torch.randn(2, 6, 32))
    assert seen == {"u": torch.bfloat16, "delta": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# training from scratch follows the official recipe


def test_official_init_overwrites_dt_proj_like_every_linear() -> None:
    torch.manual_seed(0)
    model = hymamba.create_model("mambavision_nano")
    mixers = [m for m in model.modules() if isinstance(m, MambaVisionMixer)]
    weights = torch.cat([m.dt_proj.weight.flatten() for m in mixers])
    biases = torch.cat([m.dt_proj.bias for m in mixers])
    assert torch.equal(biases, torch.zeros_like(biases))  # official: zero bias
    # timm's trunc_normal_(std=.02), as the official _init_weights (its cut is at +-2, i.e. 100 std)
    assert 0.017 < weights.std().item() < 0.023 and abs(weights.mean().item()) < 0.003
    for m in mixers:  # A_log = log(1..N), D = 1 as in the official mixer
        n = m.A_log.shape[1]
        assert torch.allclose(m.A_log, torch.log(torch.arange(1, n + 1.0)).expand_as(m.A_log))
        assert torch.equal(m.D, torch.ones_like(m.D))


def test_mamba_init_is_an_option() -> None:
    torch.manual_seed(0)
    model = hymamba.create_model("mambavision_nano", ssm_init="mamba")
    for m in (m for m in model.modules() if isinstance(m, MambaVisionMixer)):
        dt = torch.nn.functional.softplus(m.dt_proj.bias)
        assert dt.min().item() >= 1e-4 - 1e-7 and dt.max().item() <= 0.1 + 1e-6  # dt in [dt_min, dt_max]
        bound = m.dt_rank ** -0.5
        assert m.dt_proj.weight.abs().max().item() <= bound and m.dt_proj.weight.std().item() > 0.1
    with pytest.raises(ValueError, match="ssm_init must be one of official, mamba"):
        hymamba.create_model("test_mambavision", ssm_init="xavier")


def test_no_dropout_before_the_classifier() -> None:
    model = hymamba.create_model("test_mambavision", drop_rate=0.5).train()
    feats = torch.randn(4, model.num_features, 2, 2)
    torch.testing.assert_close(model.forward_head(feats), model.forward_head(feats), rtol=0, atol=0)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules())  # the blocks keep it


# ----------------------------------------------------------------------------------------------
# ONNX with an explicit scan implementation


@pytest.mark.parametrize("impl", ["fast", "cpu"])
def test_onnx_export_with_an_explicit_scan(tmp_path: Path, impl: str) -> None:
    pytest.importorskip("onnxruntime")
    from hymamba.apps.export import check_onnx, export_onnx

    if impl not in hymamba.ops.available_scan_impls("cpu"):
        pytest.skip(f"scan impl {impl!r} unavailable here")
    model = hymamba.create_model("test_mambavision", scan_impl=impl).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=(64, 64))
    assert check_onnx(model, path, torch.randn(2, 3, 64, 64)) < 1e-4
    assert model.levels[2].blocks[0].mixer.scan_impl == impl  # the model keeps its choice


# ----------------------------------------------------------------------------------------------
# command-line values: a one-line error naming the value, exit status 2, nothing written


@pytest.mark.parametrize("argv, message", [
    (["validate", "mambavision_nano", "--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["validate", "mambavision_nano", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["predict", "mambavision_nano", "x.png", "--topk", "zero"], "argument --topk: expected a whole number"),
    (["forward", "test_mambavision", "--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
])
def test_bad_numbers_are_usage_errors(argv, message, capsys) -> None:
    from hymamba.cli.main import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_values_reach_no_file(tmp_path: Path, capsys) -> None:
    from hymamba.cli.main import main

    ckpt = tmp_path / "w.safetensors"
    from hymamba.weights.io import save_safetensors

    save_safetensors(hymamba.create_model("test_mambavision", num_classes=10).state_dict(), ckpt)
    for argv, message in (
        (["validate", "test_mambavision", "--checkpoint", str(ckpt), "--img-size", "8"], "input_size must be at least 32"),
        (["validate", "test_mambavision", "--checkpoint", str(ckpt), "--crop-pct", "5"], "crop_pct is the fraction"),
        (["export", "test_mambavision", "--output", str(tmp_path / "m.onnx"), "--opset", "3"], "opset must be between"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("hymamba: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


# ----------------------------------------------------------------------------------------------
# loading: metadata only from where it belongs, and no half-loaded models


def test_a_pth_does_not_take_a_stray_config_json(tmp_path: Path) -> None:
    """Before: any config.json in a .pth's folder was read as its metadata (class names, options)."""
    from hymamba.weights.metadata import read_checkpoint

    model = hymamba.create_model("test_mambavision", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    (tmp_path / "config.json").write_text('{"class_names": ["a", "b", "c"], "mixer_variant": "gated"}')
    assert read_checkpoint(tmp_path / "weights.pth").meta == {}
    assert hymamba.create_model("test_mambavision", checkpoint_path=tmp_path / "weights.pth").levels[2] \
        .blocks[0].mixer.variant == "concat"
    # a Hugging Face folder's weights file does take its folder's config.json
    from hymamba.weights.io import save_safetensors

    save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    assert read_checkpoint(tmp_path / "model.safetensors").meta["class_names"] == ["a", "b", "c"]


def test_a_failed_load_leaves_the_model_untouched(tmp_path: Path) -> None:
    """Before: load_pretrained loaded non-strictly into the model, then raised."""
    from hymamba.errors import CheckpointError

    other = hymamba.create_model("mambavision_nano", num_classes=10).state_dict()
    other["levels.3.blocks.0.mixer.D"] = torch.full_like(other["levels.3.blocks.0.mixer.D"], 7.0)
    del other["norm.weight"]  # does not fit: one key missing
    torch.save(other, tmp_path / "bad.pth")
    model = hymamba.create_model("mambavision_nano", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="1 missing keys: norm.weight"):
        hymamba.load_checkpoint(model, tmp_path / "bad.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
