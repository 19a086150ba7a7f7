"""``hymamba convert``: official .pth.tar <-> .safetensors + model.json <-> Hugging Face folder, with the
official fixture, transformers' Auto classes and image processor, and the command line as a subprocess."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_case
from imagefolder import run_cli
from PIL import Image

import hymamba
from hymamba.apps.convert import convert
from hymamba.data.transforms import eval_transform, resolve_data_config
from hymamba.errors import CheckpointError, ConfigError
from hymamba.weights.io import read_state_dict, save_safetensors
from hymamba.weights.metadata import write_model_json

CLASSES = ["cat", "dog", "fox", "owl"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """A nano classifier with 4 named classes, as a run folder writes it (safetensors + model.json)."""
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(3)
    model = hymamba.create_model("mambavision_nano", num_classes=4).eval()
    for p in model.parameters():  # not the initialisation: every tensor differs from a fresh model's
        p.data.add_(0.01 * torch.randn_like(p))
    path = save_safetensors(model.state_dict(), root / "model.safetensors")
    write_model_json(path, {"model": "mambavision_nano", "num_classes": 4, "class_names": CLASSES,
                            "input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                            "crop_mode": "center", "interpolation": "bicubic"})
    return model, Path(path)


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_official_fixture_to_safetensors_reproduces_the_official_outputs(tmp_path: Path) -> None:
    case = load_case("tiny_a")  # an official timm-style checkpoint of the test architecture
    with pytest.raises(ConfigError, match="--model NAME"):
        convert(case["checkpoint_path"], tmp_path / "a.safetensors")
    res = convert(case["checkpoint_path"], tmp_path / "a.safetensors", model_name="test_mambavision")
    assert res["format"] == "safetensors" and res["num_classes"] == 10
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["model"] == "test_mambavision" and meta["num_classes"] == 10
    model = hymamba.create_model("test_mambavision", checkpoint_path=tmp_path / "a.safetensors").double().eval()
    with torch.no_grad():
        logits = model(case["tensors"]["input"])
    torch.testing.assert_close(logits, case["tensors"]["logits"], rtol=1e-6, atol=1e-9)
    _same_tensors(read_state_dict(tmp_path / "a.safetensors"), read_state_dict(case["checkpoint_path"]))


def test_round_trip_through_hugging_face_and_official_layouts(trained, tmp_path: Path) -> None:
    model, src = trained
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    res = convert(src, tmp_path / "hf")
    assert res["format"] == "hf" and res["model"] == "mambavision_nano"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mambavision" and config["architectures"] == ["MambaVisionModelForImageClassification"]
    assert config["id2label"] == {str(i): c for i, c in enumerate(CLASSES)} and config["dim"] == 32
    from safetensors.torch import load_file

    assert all(k.startswith("model.") for k in load_file(tmp_path / "hf" / "model.safetensors"))
    # transformers' own Auto classes read the folder (hymamba.hf registers the model type; no remote code)
    pytest.importorskip("transformers")
    import hymamba.hf  # noqa: F401
    from transformers import AutoModelForImageClassification

    hf_model = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(pixel_values=x).logits, want, rtol=0, atol=0)
    assert hf_model.config.id2label[1] == "dog"
    # HF folder -> official file (the name comes from config.json) -> safetensors: the same tensors throughout
    res = convert(tmp_path / "hf", tmp_path / "nano.pth.tar")
    assert res["format"] == "official" and res["model"] == "mambavision_nano"
    raw = torch.load(tmp_path / "nano.pth.tar", weights_only=True, map_location="cpu")
    assert set(raw) == {"state_dict", "arch"} and raw["arch"] == "mambavision_nano"
    convert(tmp_path / "nano.pth.tar", tmp_path / "back.safetensors")
    _same_tensors(read_state_dict(tmp_path / "back.safetensors"), read_state_dict(src))
    again = hymamba.create_model("mambavision_nano", checkpoint_path=tmp_path / "back.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)


def test_image_processor_reproduces_the_evaluation_preprocessing(trained, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from torchvision.transforms import functional as TF
    from transformers import AutoImageProcessor

    model, src = trained
    convert(src, tmp_path / "hf")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    ours = eval_transform(resolve_data_config(model.pretrained_cfg, json.loads(src.with_suffix(".json").read_text())))
    rng = np.random.default_rng(0)
    for h, w in [(300, 400), (257, 333), (500, 281), (64, 64), (99, 170), (64, 150)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = processor(img, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(got, ours(img), rtol=0, atol=1e-6)
    # an odd margin (65x97 -> 64x95: 31 pixels to crop): transformers starts the crop at 15, torchvision at 16
    img = Image.fromarray(rng.integers(0, 256, (65, 97, 3), dtype=np.uint8))
    got = processor(img, return_tensors="pt")["pixel_values"][0]
    resized = TF.to_tensor(TF.resize(img, 64, interpolation=TF.InterpolationMode.BICUBIC))
    for left, matches in ((15, True), (16, False)):
        crop = TF.normalize(resized[:, :, left:left + 64], [0.5] * 3, [0.5] * 3)
        assert torch.allclose(crop, got, atol=1e-6) is matches
    assert torch.allclose(ours(img), TF.normalize(resized[:, :, 16:80], [0.5] * 3, [0.5] * 3), atol=1e-6)


def test_cli_and_bad_requests(trained, tmp_path: Path) -> None:
    model, src = trained
    res = run_cli("convert", str(src), str(tmp_path / "out.pth.tar"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["format"] == "official" and (tmp_path / "out.pth.tar").is_file()
    res = run_cli("convert", str(src), str(tmp_path / "wrong.safetensors"), "--model", "mambavision_t")
    assert res.returncode == 2 and "is not a mambavision_t checkpoint" in res.stderr
    assert not (tmp_path / "wrong.safetensors").exists() and not (tmp_path / "wrong.json").exists()
    with pytest.raises(ConfigError, match="the destination is the source"):
        convert(src, src)
    # an ablation variant has no Hugging Face config fields: refused, the safetensors layout keeps it
    ablated = hymamba.create_model("mambavision_nano", num_classes=4, attention_pattern="first_half")
    path = save_safetensors(ablated.state_dict(), tmp_path / "abl.safetensors")
    write_model_json(path, {"model": "mambavision_nano", "attention_pattern": "first_half"})
    with pytest.raises(ConfigError, match="cannot describe the ablation options"):
        convert(path, tmp_path / "abl_hf")
    convert(path, tmp_path / "abl2.safetensors")
    assert json.loads((tmp_path / "abl2.json").read_text())["attention_pattern"] == "first_half"
    with pytest.raises(CheckpointError):
        convert(tmp_path / "missing.pth.tar", tmp_path / "x.safetensors")
    # a crop mode transformers has no processor for: refused before anything is written
    squash = save_safetensors(model.state_dict(), tmp_path / "squash.safetensors")
    write_model_json(squash, {"model": "mambavision_nano", "crop_mode": "squash"})
    with pytest.raises(ConfigError, match="crop_mode 'squash'"):
        convert(squash, tmp_path / "squash_hf")
    assert not (tmp_path / "squash_hf").exists()
