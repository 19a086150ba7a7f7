"""``hymamba segment train|eval|predict`` end to end: real subprocesses on the built-in scenes and on an
ADE20K-layout folder written to disk, an official-format (mmengine) checkpoint through the command
line, resume after SIGKILL, and two processes under torchrun (gloo)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from imagefolder import cli_env, killed_and_uninterrupted, run_cli
from PIL import Image

from hymamba.cli import main
from hymamba.data.segmentation import DigitScenes

#: a tiny segmenter on a few scenes: seconds per epoch on 2 cores
SMALL = ("--backbone", "test_mambavision", "--head-channels", "16", "--aux-channels", "8", "--max-train-samples",
         "16", "--max-val-samples", "8", "--batch-size", "4", "--warmup-epochs", "0.5", "--drop-path", "0",
         "--quiet", "--seed", "7", "--no-amp")


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    proc = run_cli("segment", "train", *SMALL, "--epochs", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: val mIoU" in proc.stdout and "before training" in proc.stdout
    return out


def test_train_reports_before_and_after(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initial_mIoU"] is not None and summary["final_mIoU"] is not None
    assert summary["epochs"] == 2 and len(_rows(run_dir / "metrics.csv")) == 2
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["task"] == "segmentation" and meta["data"] == "digitscenes" and meta["scene_size"] == 64


def test_eval_scores_like_the_run(run_dir: Path) -> None:
    """``segment eval`` on the run folder (and on last.pth) gives the run's own final validation."""
    summary = json.loads((run_dir / "summary.json").read_text())
    for weights in (run_dir, run_dir / "last.pth"):
        proc = run_cli("segment", "eval", str(weights), "--max-samples", "8", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(proc.stdout)
        assert res["images"] == 8 and res["model"] == "upernet_test_mambavision"
        assert res["mIoU"] == pytest.approx(summary["final_mIoU"], abs=1e-6)
        assert res["aAcc"] == pytest.approx(summary["final_aAcc"], abs=1e-6)
        assert [r["class"] for r in res["per_class"]] == ["background"] + [str(d) for d in range(10)]
    text = run_cli("segment", "eval", str(run_dir), "--max-samples", "4", "--mode", "slide", "--crop-size", "32",
                   "--flip")
    assert text.returncode == 0, text.stderr
    assert "slide 32x32 stride 21x21" in text.stdout and "+ flip" in text.stdout
    assert text.stdout.count("\n") >= 13  # the summary line, the header and 11 classes


def _scene_images(folder: Path, n: int = 3) -> list:
    """Real scenes written as files of two sizes (one not square), plus an unreadable file."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = DigitScenes("val", 96)
    paths = []
    for i in range(n):
        img = ds.scene(i)["image"]
        if i == 1:
            img = img[:, :80]  # 96 x 80
        p = folder / f"scene{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return paths


def test_predict_writes_palette_masks_and_overlays(run_dir: Path, tmp_path: Path) -> None:
    from hymamba.apps.segment import settings_from
    from hymamba.data.seg_transforms import SegEvalTransform
    from hymamba.factory import load_trained_segmenter

    images = _scene_images(tmp_path / "in" / "sub")
    single = tmp_path / "one.jpg"
    Image.open(images[0]).convert("RGB").save(single, quality=95)
    out = tmp_path / "out"
    proc = run_cli("segment", "predict", str(run_dir), str(tmp_path / "in"), str(single), "--out", str(out),
                   "--json", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == 5 and sum("error" in r for r in results) == 1
    meta = json.loads((run_dir / "model.json").read_text())
    model, meta = load_trained_segmenter(run_dir)
    st = settings_from(meta, None)
    for r in (r for r in results if "mask" in r):
        src = np.asarray(Image.open(r["image"]).convert("RGB"))
        mask_img = Image.open(r["mask"])
        assert mask_img.mode == "P" and mask_img.size == (src.shape[1], src.shape[0])
        pal = mask_img.getpalette()[:33]
        assert [pal[i:i + 3] for i in range(0, 33, 3)] == meta["palette"]
        overlay = Image.open(r["overlay"])
        assert overlay.mode == "RGB" and overlay.size == mask_img.size
        # the mask is the model's arg-max at the image's own size, by the run's own preprocessing
        x, _ = SegEvalTransform(st.scale, st.mean, st.std)(src, np.zeros(src.shape[:2], dtype=np.int64))
        with torch.no_grad():
            logits = model(x[None])
        want = F.interpolate(logits, size=src.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0)
        assert np.array_equal(np.asarray(mask_img), want.numpy().astype(np.uint8)), r["image"]
        assert sum(r["classes"].values()) == pytest.approx(1.0)
    assert (out / "sub" / "scene1.png").is_file() and (out / "one.png").is_file()

    nothing = run_cli("segment", "predict", str(run_dir), str(tmp_path / "in" / "sub" / "broken.jpg"),
                      "--out", str(tmp_path / "none"))
    assert nothing.returncode == 2 and "none of the 1 image(s) could be read" in nothing.stderr
    assert not list((tmp_path / "none").glob("*.png"))


def test_export_runs_in_onnx_runtime(run_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "seg.onnx"
    proc = run_cli("segment", "export", str(run_dir), "--output", str(out), "--size", "64", "96")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |difference|" in proc.stdout
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["class_names"][0] == "background" and len(info["palette"]) == 11 and info["input"] == [None, 3, 64, 96]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": np.zeros((3, 3, 64, 96), dtype=np.float32)})
    assert logits.shape == (3, 11, 64, 96)


def test_export_any_size_runs_in_onnx_runtime(run_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "seg_any.onnx"
    proc = run_cli("segment", "export", str(run_dir), "--output", str(out), "--size", "64", "--dynamic-size")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(N, 3, H, W)" in proc.stdout and "H and W too" in proc.stdout and "at 64x64, 80x80" in proc.stdout
    assert json.loads(out.with_suffix(".json").read_text())["input"] == [None, 3, None, None]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for size in ((64, 64), (72, 104)):
        (logits,) = session.run(None, {"pixel_values": np.zeros((2, 3, *size), dtype=np.float32)})
        assert logits.shape == (2, 11, *size)


def _ade_layout(root: Path, train: int = 8, val: int = 4) -> Path:
    """An ADE20K-layout folder (images/ + annotations/, training/ + validation/, .jpg + .png) holding
    real scenes; annotations are 1 + the scene's class (0 = "other", ignored under reduce_zero_label)."""
    for split, n, name in (("training", train, "train"), ("validation", val, "val")):
        ds = DigitScenes(name, 64)
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            s = ds.scene(i)
            ann = (s["mask"] + 1).astype(np.uint8)
            ann[:2] = 0  # a band of "other"
            Image.fromarray(s["image"]).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            Image.fromarray(ann).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    (root / "classes.txt").write_text("\n".join(["background"] + [f"digit {d}" for d in range(10)]) + "\n")
    return root


def test_ade20k_layout_end_to_end(tmp_path: Path) -> None:
    data = _ade_layout(tmp_path / "ADEChallengeData2016")
    out = tmp_path / "run"
    proc = run_cli("segment", "train", str(data), *SMALL, "--epochs", "1", "--crop-size", "48", "--workers", "0",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "model.json").read_text())
    assert meta["reduce_zero_label"] is True and meta["num_classes"] == 11 and meta["data"] == "ade20k"
    assert meta["class_names"][1] == "digit 0"
    summary = json.loads((out / "summary.json").read_text())
    ev = run_cli("segment", "eval", str(out), str(data), "--json", "--workers", "0")
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout)
    assert res["kind"] == "ade20k" and res["split"] == "validation" and res["images"] == 4
    assert res["reduce_zero_label"] is True
    assert res["mIoU"] == pytest.approx(summary["final_mIoU"], abs=1e-6)
    # the band of "other" is ignored: the scored pixels are the scenes' own
    assert sum(r["pixels"] for r in res["per_class"]) == 4 * 62 * 64
    pred = run_cli("segment", "predict", str(out), str(data / "images" / "validation"), "--out",
                   str(tmp_path / "pred"))
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert len(list((tmp_path / "pred").glob("*_overlay.png"))) == 4


# ----------------------------------------------------------------------------------------------
# an official-format checkpoint (mmengine Runner file) through the command line


@pytest.fixture()
def official_tiny(fixtures: Path, tiny_case_backbone: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recorded official case, registered as a named segmenter for the length of a test."""
    from hymamba.models.segmenters import SEGMENTERS, SegmenterVariant

    spec = tiny_case_backbone
    monkeypatch.setitem(SEGMENTERS, "upernet_tiny_case", SegmenterVariant(
        "upernet_tiny_case", "_tiny_case", tuple(spec["backbone"]["window_size"]), 0.0, crop_size=(64, 64),
        channels=spec["decode_head"]["channels"], aux_channels=spec["auxiliary_head"]["channels"]))
    return fixtures / "upernet_tiny_a.pth"


def test_official_checkpoint_through_the_cli(official_tiny: Path, tmp_path: Path, capsys) -> None:
    from hymamba.weights.metadata import read_checkpoint

    images = _scene_images(tmp_path / "in", n=2)
    assert main(["segment", "predict", str(official_tiny), *map(str, images), "--model", "upernet_tiny_case",
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    results = [r for r in json.loads(capsys.readouterr().out) if "mask" in r]
    classes = read_checkpoint(official_tiny).meta["classes"]
    assert len(results) == 2 and set(results[0]["classes"]) <= set(classes)  # names from the file's meta
    # without --model the file does not say what it is: a clear error, exit 2
    assert main(["segment", "predict", str(official_tiny), str(images[0]), "--out", str(tmp_path / "x")]) == 2
    assert "--model upernet_mambavision_t" in capsys.readouterr().err


def test_clear_errors(fixtures: Path, tmp_path: Path, capsys) -> None:
    assert main(["segment", "eval", str(fixtures / "tiny_a.pth.tar")]) == 2  # a classifier
    assert "not a segmenter checkpoint" in capsys.readouterr().err
    assert main(["segment", "eval", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["segment", "train", str(tmp_path / "no_data"), "--epochs", "1", "--output",
                 str(tmp_path / "o")]) == 2
    assert "data folder not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# resume after SIGKILL, and two processes


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    got, want = killed_and_uninterrupted(("segment", "train"), (*SMALL, "--epochs", "3", "--no-eval-first"), tmp_path)
    assert len(got) == len(want) == 3
    # the official poly schedule (power 1): linear from the peak (4e-3) to 0 at the last step
    assert [float(r["lr"]) for r in want] == pytest.approx([4e-3 * 2 / 3, 4e-3 / 3, 0.0], rel=1e-5, abs=1e-9)  # csv: 6 digits
    for g, w in zip(got, want):
        for key in ("train_loss", "loss", "mIoU", "aAcc", "lr"):
            assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-4, abs=1e-5), (key, g, w)


def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "hymamba.cli", "segment", "train", *SMALL, "--epochs", "1", "--no-amp", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["ranks_in_sync"] is True
    assert summary["train_images_per_epoch"] == 16
    # the confusion matrix summed over the two shards equals one process scoring the whole split
    ev = run_cli("segment", "eval", str(out), "--max-samples", "8", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout)
    assert res["images"] == summary["val_images"] == 8
    assert res["mIoU"] == pytest.approx(summary["final_mIoU"], abs=1e-6)
