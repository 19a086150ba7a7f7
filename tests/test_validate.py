"""``hymamba validate`` and ``hymamba predict``: the numbers of timm's evaluation pipeline, class
names from model.json, per-class accuracy, clear errors; real image files on disk."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from imagefolder import CLASSES, make_dataset, make_image_folder, run_cli

from hymamba import create_model
from hymamba.weights.io import save_safetensors
from hymamba.cli import main
from hymamba.apps.predict import predict
from hymamba.apps.validate import validate
from hymamba.tasks.classification import train
from hymamba.tasks.classification import build_config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny model trained for one epoch on 3 classes of 48x40 images; its output folder."""
    root = tmp_path_factory.mktemp("val")
    make_dataset(root / "ds", train=6, val=5, size=48)
    out = root / "run"
    train(build_config(overrides=dict(data=str(root / "ds"), output=str(out), model="test_mambavision",
                                      input_size=32, batch_size=6, workers=0, epochs=1, warmup_epochs=0,
                                      cooldown_epochs=0, quiet=True)))
    return out


def _reference(model: torch.nn.Module, folder: Path, data_config: dict, class_names=None) -> tuple:
    """What timm's (and the official) validation computes, written out independently.

    ``class_names``: the model's classes, when the folder's own class indices are not the model's
    (a folder with a subset of the classes, in another order): targets are then mapped by name.
    """
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    tf = create_transform(data_config["input_size"], interpolation=data_config["interpolation"],
                          mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                          crop_mode=data_config["crop_mode"])
    ds = ImageFolder(str(folder), transform=tf, is_valid_file=lambda p: "zz_" not in p and p.endswith((".png", ".jpg")))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    if class_names is not None:
        y = torch.tensor([list(class_names).index(ds.classes[t]) for t in ds.targets])
    model.eval()
    with torch.no_grad():
        logits = model(x)
    top = logits.topk(3, dim=1).indices
    return (100.0 * (top[:, 0] == y).float().mean().item(), 100.0 * (top == y[:, None]).any(1).float().mean().item(),
            F.cross_entropy(logits, y).item(), len(ds))


@pytest.mark.parametrize("crop_pct, crop_mode", [(None, None), (0.875, "center"), (0.9, "squash")])
def test_validate_matches_timms_pipeline(run: Path, crop_pct, crop_mode) -> None:
    ckpt = run / "model.safetensors"
    res = validate("test_mambavision", ckpt, data=str(run.parent / "ds"), workers=0, crop_pct=crop_pct,
                   crop_mode=crop_mode)
    pp = res["preprocessing"]
    assert pp["input_size"] == [3, 32, 32] and pp["crop_pct"] == (crop_pct or 1.0)
    assert pp["crop_mode"] == (crop_mode or "center")
    model = create_model("test_mambavision", checkpoint_path=ckpt)
    top1, top5, loss, n = _reference(model, run.parent / "ds" / "val", pp)
    assert res["images"] == n == 15 and res["skipped_images"] == 2
    assert res["top1"] == pytest.approx(top1) and res["top5"] == pytest.approx(top5)
    assert res["loss"] == pytest.approx(loss, rel=1e-5)


def test_validate_cli_per_class_and_ema(run: Path, capsys) -> None:
    data = str(run.parent / "ds")
    assert main(["validate", "test_mambavision", data, "--checkpoint", str(run / "model.safetensors"),
                 "--per-class", "--json", "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in res["per_class"]] == list(CLASSES)
    assert [r["images"] for r in res["per_class"]] == [5, 5, 5]
    assert sum(r["top1"] * r["images"] for r in res["per_class"]) / 15 == pytest.approx(res["top1"])
    # the training checkpoint's EMA weights are what model.safetensors holds
    assert main(["validate", "test_mambavision", data, "--checkpoint", str(run / "last.pth"), "--use-ema",
                 "--json", "--workers", "0"]) == 0
    ema = json.loads(capsys.readouterr().out)
    assert ema["top1"] == res["top1"] and ema["loss"] == pytest.approx(res["loss"])
    assert main(["validate", "test_mambavision", data, "--checkpoint", str(run / "model.safetensors"),
                 "--per-class", "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "crop_pct 1.0" in text and "banana" in text


def test_class_names_map_by_name_and_mismatches_are_errors(run: Path, tmp_path: Path, capsys) -> None:
    ckpt = str(run / "model.safetensors")
    make_image_folder(tmp_path / "two", {"cherry": 2, "apple": 2}, corrupt=False, classes=("cherry", "apple"))
    sub = validate("test_mambavision", ckpt, data=str(tmp_path / "two"), workers=0)
    full = validate("test_mambavision", ckpt, data=str(run.parent / "ds"), workers=0)
    assert sub["images"] == 4 and full["images"] == 15
    # apple and cherry are the model's classes 0 and 2 (model.json), not the folder's 0 and 1
    model = create_model("test_mambavision", checkpoint_path=ckpt)
    top1, _, loss, n = _reference(model, tmp_path / "two", sub["preprocessing"], class_names=CLASSES)
    assert n == 4 and sub["top1"] == pytest.approx(top1) and sub["loss"] == pytest.approx(loss, rel=1e-5)
    wrong = _reference(model, tmp_path / "two", sub["preprocessing"])  # the folder's own indices
    assert sub["loss"] != pytest.approx(wrong[2], rel=1e-3)  # so the check above tells the two apart
    make_image_folder(tmp_path / "four" / "val", {c: 1 for c in ("a", "b", "c", "d")}, corrupt=False,
                      classes=("a", "b", "c", "d"))
    assert main(["validate", "test_mambavision", str(tmp_path / "four"), "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hymamba: error: the data set") and "has 4 classes" in err and "3 outputs" in err
    assert main(["validate", "test_mambavision", str(tmp_path / "nowhere"), "--checkpoint", ckpt]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["validate", "test_mambavision", str(tmp_path / "two")]) == 2
    assert "no weights to evaluate" in capsys.readouterr().err


def test_validate_digits_split(tmp_path: Path) -> None:
    model = create_model("mambavision_nano")
    save_safetensors(model.state_dict(), tmp_path / "nano.safetensors")
    res = validate("mambavision_nano", tmp_path / "nano.safetensors", max_samples=40)
    assert res["data"] == "digits" and res["images"] == 40 and res["preprocessing"]["input_size"] == [3, 64, 64]
    res = validate("mambavision_nano", tmp_path / "nano.safetensors", data="cued-digits", max_samples=30)
    assert res["data"] == "cued-digits" and res["images"] == 30


def test_predict(run: Path, tmp_path: Path) -> None:
    images = sorted((run.parent / "ds" / "val" / "banana").glob("*.png"))[:2]
    bad = run.parent / "ds" / "val" / "apple" / "zz_not_an_image.jpg"
    out = predict("test_mambavision", run / "model.safetensors", [*images, bad], topk=2)
    assert [r["image"] for r in out] == [str(p) for p in (*images, bad)]
    assert "error" in out[2]
    for r in out[:2]:
        assert len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"]
        assert {t["class"] for t in r["top"]} <= set(CLASSES)

    proc = run_cli("predict", "test_mambavision", "--checkpoint", str(run / "model.safetensors"),
                   str(images[0]), str(bad), "--json", "--topk", "3")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(t["class"] for t in rows[0]["top"]) == sorted(CLASSES)
    assert sum(t["prob"] for t in rows[0]["top"]) == pytest.approx(1.0, abs=1e-5)
    assert "warning: skipped" in proc.stderr and str(bad) in proc.stderr
    proc = run_cli("predict", "test_mambavision", "--checkpoint", str(run / "model.safetensors"), str(bad))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("hymamba: error: none of")
