"""Checkpoints: every official shape of file, Hugging Face folders, our safetensors, safety, errors."""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hymamba
from hymamba.errors import CheckpointError
from hymamba.factory import detect_variant
from hymamba.weights.io import read_state_dict, save_safetensors

from conftest import load_case


def _tiny(name: str = "tiny_a") -> tuple[dict, hymamba.MambaVision]:
    case = load_case(name)
    return case, hymamba.MambaVision(**case["config"]).eval()


def _logits(model: hymamba.MambaVision, case: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.double()(case["tensors"]["input"])


def test_official_timm_style_has_namespace_args(fixtures: Path) -> None:
    # the raw file needs the allow-list: plain weights_only loading refuses argparse.Namespace
    with pytest.raises(pickle.UnpicklingError):
        torch.load(fixtures / "tiny_a.pth.tar", weights_only=True)
    sd = read_state_dict(fixtures / "tiny_a.pth.tar")
    assert "patch_embed.conv_down.0.weight" in sd


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_official_checkpoints_load_strict(name: str) -> None:
    case, model = _tiny(name)
    report = hymamba.load_checkpoint(model, case["checkpoint_path"], strict=True)
    assert report.ok
    torch.testing.assert_close(_logits(model, case), case["tensors"]["logits"], rtol=1e-6, atol=1e-10)


def _official_sd() -> dict:
    return read_state_dict(load_case("tiny_a")["checkpoint_path"])


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_folder(tmp_path: Path, weights: str) -> None:
    case = load_case("tiny_a")
    sd = {f"model.{k}": v for k, v in _official_sd().items()}
    (tmp_path / "config.json").write_text(json.dumps(dict(case["config"], architectures=["MambaVisionModel"])))
    if weights.endswith(".safetensors"):
        save_file(sd, str(tmp_path / weights))
    else:
        torch.save(sd, tmp_path / weights)
    model = hymamba.MambaVision(**case["config"]).eval()
    hymamba.load_checkpoint(model, tmp_path)
    torch.testing.assert_close(_logits(model, case), case["tensors"]["logits"], rtol=1e-6, atol=1e-10)


def test_bare_dict_module_prefix_and_ema(tmp_path: Path) -> None:
    case = load_case("tiny_a")
    sd = _official_sd()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()},
                "state_dict_ema": ema, "args": argparse.Namespace(lr=0.005)}, tmp_path / "ckpt.pth.tar")
    torch.save(sd, tmp_path / "bare.pth")
    for path in (tmp_path / "ckpt.pth.tar", tmp_path / "bare.pth"):
        model = hymamba.MambaVision(**case["config"]).eval()
        hymamba.load_checkpoint(model, path)
        torch.testing.assert_close(_logits(model, case), case["tensors"]["logits"], rtol=1e-6, atol=1e-10)
    model = hymamba.MambaVision(**case["config"])
    hymamba.load_checkpoint(model, tmp_path / "ckpt.pth.tar", use_ema=True)
    torch.testing.assert_close(model.head.bias, ema["head.bias"])
    with pytest.raises(CheckpointError, match="no EMA"):
        hymamba.load_checkpoint(model, tmp_path / "bare.pth", use_ema=True)


def test_own_safetensors_roundtrip_and_create_model(tmp_path: Path) -> None:
    model = hymamba.create_model("test_mambavision", num_classes=3).eval()
    path = save_safetensors(model.state_dict(), tmp_path / "out" / "model.safetensors")
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    again = hymamba.create_model("test_mambavision", checkpoint_path=path).eval()
    assert again.num_classes == 3  # taken from the checkpoint's head
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {}, "payload": Evil()}, f)
    with pytest.raises(CheckpointError, match="allow-list"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_mismatch_error_lists_keys_and_names_variant(tmp_path: Path) -> None:
    _, model_a = _tiny("tiny_a")
    with pytest.raises(CheckpointError) as err:
        hymamba.load_checkpoint(model_a, load_case("tiny_b")["checkpoint_path"])
    msg = str(err.value)
    assert "unexpected keys" in msg and "mis-shaped keys" in msg and "checkpoint (24," in msg
    assert "matches no known MambaVision variant" in msg
    # tiny_a has the shapes of our registered test model
    _, model_b = _tiny("tiny_b")
    with pytest.raises(CheckpointError, match="match the variant 'test_mambavision'"):
        hymamba.load_checkpoint(model_b, load_case("tiny_a")["checkpoint_path"])
    # a checkpoint shaped like mambavision_s loaded into mambavision_t names the right variant
    with torch.device("meta"):
        s_shapes = {k: v.shape for k, v in hymamba.create_model("mambavision_s").state_dict().items()}
    save_file({k: torch.zeros(s, dtype=torch.uint8) for k, s in s_shapes.items()}, str(tmp_path / "s.safetensors"))
    assert detect_variant(read_state_dict(tmp_path / "s.safetensors")) == "mambavision_s"
    with torch.device("meta"):
        model_t = hymamba.create_model("mambavision_t")
    with pytest.raises(CheckpointError, match="match the variant 'mambavision_s'"):
        hymamba.load_checkpoint(model_t, tmp_path / "s.safetensors")


def test_non_strict_skips_new_head() -> None:
    case = load_case("tiny_a")
    model = hymamba.MambaVision(**dict(case["config"], num_classes=4))
    report = hymamba.load_checkpoint(model, case["checkpoint_path"], strict=False)
    assert [k for k, _, _ in report.mismatched] == ["head.weight", "head.bias"]
    sd = _official_sd()
    torch.testing.assert_close(model.patch_embed.conv_down[0].weight, sd["patch_embed.conv_down.0.weight"])


def test_pretrained_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYMAMBA_CHECKPOINT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"https://huggingface.co/nvidia/MambaVision-T-1K/resolve/main/"
                                                r"mambavision_tiny_1k.pth.tar"):
        hymamba.create_model("mambavision_t", pretrained=True)


def test_pretrained_reads_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYMAMBA_CHECKPOINT_DIR", str(tmp_path))
    ref = hymamba.create_model("mambavision_t")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd, "args": argparse.Namespace(model="mamba_vision_T")},
               tmp_path / "mambavision_tiny_1k.pth.tar")
    model = hymamba.create_model("mamba_vision_T", pretrained=True)
    torch.testing.assert_close(model.head.weight, sd["head.weight"].float())
    # fine-tuning: another class count keeps a fresh head and loads everything else
    ft = hymamba.create_model("mambavision_t", pretrained=True, num_classes=7)
    assert ft.head.weight.shape == (7, 640)
    torch.testing.assert_close(ft.norm.weight, sd["norm.weight"].float())


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "bad.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        read_state_dict(tmp_path / "empty")
