"""Hugging Face transformers integration: official-style snapshots load (through the Auto classes
too, without remote code) and reproduce the official fixtures; save_pretrained round-trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import hymamba  # noqa: E402
from hymamba.weights.io import read_state_dict, save_safetensors  # noqa: E402
from hymamba.hf import (  # noqa: E402
    MambaVisionConfig,
    MambaVisionForImageClassification,
    MambaVisionModel,
    MambaVisionModelForImageClassification,
)

from conftest import load_case  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def official_snapshot(case: dict, folder: Path) -> Path:
    """A folder laid out like nvidia/MambaVision-*: config.json with the official field names and
    remote-code pointers, weights under the ``model.`` prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(case["config"])
    num_classes = cfg.pop("num_classes")
    cfg.setdefault("layer_scale", None)
    cfg.setdefault("layer_scale_conv", None)
    config = dict(
        cfg,
        architectures=["MambaVisionModelForImageClassification"],
        auto_map={"AutoConfig": "configuration_mambavision.MambaVisionConfig",
                  "AutoModel": "modeling_mambavision.MambaVisionModel",
                  "AutoModelForImageClassification": "modeling_mambavision.MambaVisionModelForImageClassification"},
        model_type="mambavision",
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.875, crop_mode="center",
        id2label={str(i): f"class_{i}" for i in range(num_classes)},
        label2id={f"class_{i}": i for i in range(num_classes)},
        torch_dtype="float32",
    )
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    sd = read_state_dict(case["checkpoint_path"])
    save_safetensors({f"model.{k}": v.float() for k, v in sd.items()}, folder / "model.safetensors",
                     metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> tuple[dict, Path]:
    case = load_case("tiny_b")
    return case, official_snapshot(case, tmp_path_factory.mktemp("hf") / "MambaVision-tiny-b")


def test_official_snapshot_reproduces_fixture(snapshot) -> None:
    case, folder = snapshot
    exp = case["tensors"]
    model = MambaVisionForImageClassification.from_pretrained(folder).eval()
    assert model.config.num_labels == case["config"]["num_classes"] and model.config.id2label[3] == "class_3"
    x = exp["input"].float()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.logits, exp["logits"].float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(out["logits"], out.logits)  # the official dict access
        labels = torch.tensor([1, 5])
        loss = model(x, labels=labels).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert MambaVisionModelForImageClassification is MambaVisionForImageClassification


def test_backbone_gives_pooled_and_stage_features(snapshot) -> None:
    case, folder = snapshot
    exp = case["tensors"]
    backbone = MambaVisionModel.from_pretrained(folder).eval()  # the head's weights go unused
    with torch.no_grad():
        pooled, features = backbone(exp["input"].float())  # the official usage
        as_dict = backbone(exp["input"].float(), return_dict=True)
    torch.testing.assert_close(pooled, exp["pooled"].float(), rtol=0, atol=1e-4)
    assert len(features) == 4
    for i, f in enumerate(features):
        torch.testing.assert_close(f, exp[f"stage{i + 1}"].float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(as_dict.pooler_output, pooled)


def test_auto_classes_without_remote_code(snapshot) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    case, folder = snapshot
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, MambaVisionConfig) and not hasattr(config, "auto_map")
    classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert isinstance(classifier, MambaVisionForImageClassification)
    assert isinstance(AutoModel.from_pretrained(folder), MambaVisionModel)
    with torch.no_grad():
        logits = classifier(case["tensors"]["input"].float()).logits
    torch.testing.assert_close(logits, case["tensors"]["logits"].float(), rtol=0, atol=1e-4)


def test_save_pretrained_round_trip_and_hymamba_loader(snapshot, tmp_path: Path) -> None:
    case, folder = snapshot
    model = MambaVisionForImageClassification.from_pretrained(folder).eval()
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "mambavision" and "auto_map" not in saved
    again = MambaVisionForImageClassification.from_pretrained(tmp_path / "saved").eval()
    x = case["tensors"]["input"].float()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
    # the saved folder is also an ordinary hymamba checkpoint
    plain = hymamba.MambaVision(**case["config"])
    report = hymamba.load_checkpoint(plain, tmp_path / "saved", strict=True)
    assert report.ok
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x).logits, rtol=0, atol=0)


def test_config_from_variant_and_fresh_init() -> None:
    config = MambaVisionConfig.from_variant("mamba_vision_T", num_labels=5, drop_path_rate=0.0)
    assert config.dim == 80 and config.depths == [1, 3, 8, 4] and config.num_labels == 5
    assert config.crop_pct == hymamba.create_model("mambavision_t").pretrained_cfg["crop_pct"]
    model = MambaVisionForImageClassification(config)
    reference = hymamba.create_model("mambavision_t", num_classes=5)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    mixer = model.model.levels[2].blocks[0].mixer
    # the official initialisation survives transformers' post_init: A_log = log(1..N), D = 1, and dt_proj
    # initialised like every Linear (zero bias), as hymamba.create_model does
    torch.testing.assert_close(mixer.A_log[0], torch.log(torch.arange(1.0, 9.0)))
    assert torch.equal(mixer.D.detach(), torch.ones_like(mixer.D))
    assert torch.equal(mixer.dt_proj.bias.detach(), torch.zeros_like(mixer.dt_proj.bias))
    assert 0.015 < float(mixer.dt_proj.weight.std()) < 0.025
