"""The detection task through the engine and the command line: a real (short) training run on the
built-in digit objects and on a COCO-format folder written to disk, its files, its COCO metrics
before and after, resume, and the config's checks."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from imagefolder import cli_env, killed_and_uninterrupted, run_cli

from hymamba.errors import ConfigError
from hymamba.tasks.detection import build_config

#: the smallest backbone on a few 128 px scenes: seconds per epoch on 2 cores
SMALL = ("--backbone", "test_mambavision", "--max-train-samples", "8", "--max-val-samples", "4", "--batch-size", "4",
         "--fpn-channels", "32", "--rois-per-image", "32", "--rpn-batch-size", "64", "--quiet", "--seed", "3",
         "--no-amp")


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_on_built_in_objects_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("detect", "train", *SMALL, "--epochs", "1", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: val box AP" in proc.stdout and "before training" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("initial_AP", "final_AP", "final_mask_AP", "initial_mask_AP"):
        assert summary[key] is not None and 0.0 <= summary[key] <= 100.0, key
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 1 and {"AP", "AP50", "AP75", "mask_AP", "mask_AP50"} <= set(rows[0])
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "detection" and meta["kind"] == "maskrcnn" and meta["num_classes"] == 11
    assert meta["class_names"] == [str(d) for d in range(10)]
    # detect eval scores the run folder exactly as the run's own validation did (same images, fp32)
    ev = run_cli("detect", "eval", str(out), "--max-samples", "4", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout)
    assert res["images"] == 4 and res["test_size"] == 128
    assert res["bbox"]["AP"] == pytest.approx(summary["final_AP"], abs=1e-9)
    assert res["segm"]["AP"] == pytest.approx(summary["final_mask_AP"], abs=1e-9)
    # detect predict: detections.json and drawn images; an unreadable file is skipped and counted
    from PIL import Image

    from hymamba.data.detection import DigitObjects

    images = tmp_path / "images"
    images.mkdir()
    scenes = DigitObjects("val", 128, n=2)
    for i in range(2):
        Image.fromarray(scenes.load_raw(i)[0]).save(images / f"scene{i}.png")
    (images / "broken.png").write_bytes(b"no")
    pred = run_cli("detect", "predict", str(out), str(images), "--out", str(tmp_path / "pred"), "--score-thresh", "0")
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert "broken.png" in pred.stderr
    entries = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(entries) == 3 and sum("error" in e for e in entries) == 1
    for e in (e for e in entries if "detections" in e):
        assert Image.open(e["drawn"]).size == (128, 128)
        for d in e["detections"]:
            assert d["class"] in meta["class_names"] and 0 <= d["score"] <= 1 and len(d["box"]) == 4
    resumed = run_cli("detect", "train", "--resume", str(out), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in _rows(out / "metrics.csv")] == ["1", "2"]


def test_train_on_a_coco_format_folder(tmp_path: Path) -> None:
    from hymamba.data.detection import DigitObjects, write_coco

    data = tmp_path / "coco"
    for split, n in (("train", 8), ("val", 4)):
        ann = write_coco(DigitObjects(split, 128, n=n), data / split)
        doc = json.loads(ann.read_text())  # COCO-like sparse category ids: 10, 20, ..., 100
        for c in doc["categories"]:
            c["id"] *= 10
        for a in doc["annotations"]:
            a["category_id"] *= 10
        ann.write_text(json.dumps(doc))
    out = tmp_path / "run"
    proc = run_cli("detect", "train", str(data), *SMALL, "--detector", "fasterrcnn", "--epochs", "1", "--crop-prob",
                   "0.5", "--workers", "0", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_images"] == 4 and summary["final_mask_AP"] is None  # boxes only
    assert json.loads((out / "model.json").read_text())["data"] == "coco folder"
    # detect eval --results: COCO's results format with the file's own ids, which pycocotools
    # scores against the annotation file to the AP the command reports
    results = tmp_path / "results.json"
    ev = run_cli("detect", "eval", str(out), str(data), "--results", str(results), "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout)
    dets = json.loads(results.read_text())
    assert len(dets) == res["detections"] and res["results_file"] == str(results)
    assert dets and {d["category_id"] for d in dets} <= set(range(10, 101, 10))
    assert all(len(d["bbox"]) == 4 and "segmentation" not in d for d in dets)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data / "val" / "annotations.json"))
        coco_eval = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
    assert 100 * coco_eval.stats[0] == pytest.approx(res["bbox"]["AP"], abs=1e-9)


@pytest.mark.parametrize("bad", [dict(detector="yolo"), dict(min_size=16), dict(train_sizes=(200, 100)),
                                 dict(milestones=(0.9, 0.5)), dict(fpn_channels=2), dict(frozen_stages=-2),
                                 dict(train_size_step=0), dict(crop_range=(0.9, 0.5)),
                                 dict(backbone="nope"), dict(backbone_checkpoint="/no/such.pth")])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ConfigError):
        build_config(overrides=bad).check()


def test_multi_scale_sizes_and_defaults() -> None:
    cfg = build_config(overrides={"train_sizes": (480, 800), "train_size_step": 32})
    assert cfg.train_min_sizes() == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)  # the official 11
    assert build_config(overrides={"train_sizes": (96, 150)}).train_min_sizes() == (96, 104, 112, 120, 128, 136,
                                                                                     144, 150)
    default = build_config()
    assert (default.opt, default.sched, default.weight_decay, default.milestones) == ("adamw", "multistep", 0.05,
                                                                                      (0.75, 0.9167))


# ----------------------------------------------------------------------------------------------
# resume after SIGKILL, and two processes


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Multi-scale sizes, RPN / RoI sampling and the step schedule all draw or count across the kill."""
    flags = (*SMALL, "--epochs", "3", "--no-eval-first", "--train-sizes", "96", "160")
    got, want = killed_and_uninterrupted(("detect", "train"), flags, tmp_path)
    assert len(got) == len(want) == 3
    # the 3x step schedule scaled to 3 epochs: x0.1 once 0.75 of the steps are done (timm's MultiStep
    # counts one update early), then again at 0.9167
    assert float(want[0]["lr"]) == pytest.approx(1e-3, rel=1e-5)
    assert float(want[2]["lr"]) < float(want[0]["lr"])
    for g, w in zip(got, want):
        for key in ("train_loss", "AP", "AP50", "mask_AP", "lr"):
            assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-4, abs=1e-5), (key, g, w)


def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "hymamba.cli", "detect", "train", *SMALL, "--epochs", "1", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["ranks_in_sync"] is True
    assert summary["train_images_per_epoch"] == 8
    # the detections gathered from the two shards score as one process scoring the whole split
    ev = run_cli("detect", "eval", str(out), "--max-samples", "4", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout)
    assert res["images"] == summary["val_images"] == 4
    assert res["bbox"]["AP"] == pytest.approx(summary["final_AP"], abs=1e-6)
    assert res["segm"]["AP"] == pytest.approx(summary["final_mask_AP"], abs=1e-6)


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_coco_recipes_match_the_official_configs(variant: str) -> None:
    """configs/maskrcnn_mambavision_*_coco.yaml: the official 3x COCO recipe on the official detector layout."""
    from hymamba.models.detectors import DETECTORS

    path = Path(__file__).resolve().parents[1] / "configs" / f"maskrcnn_mambavision_{variant}_coco.yaml"
    cfg = build_config(str(path), {"data": "/data/coco", "pretrained": False})
    cfg.check()
    spec = DETECTORS[f"maskrcnn_mambavision_{variant}"]
    assert (cfg.detector, cfg.backbone, tuple(cfg.window_size)) == (spec.kind, spec.backbone, spec.window_size)
    assert (cfg.fpn_channels, cfg.min_size, cfg.max_size) == (spec.fpn_channels, spec.min_size, spec.max_size)
    assert cfg.head_channels == 0 and (cfg.rpn_batch_size, cfg.rois_per_image) == (256, 512)  # mmdet's samplers
    assert cfg.train_min_sizes() == tuple(range(480, 801, 32)) and (cfg.flip_prob, cfg.crop_prob) == (0.5, 0.5)
    assert (cfg.opt, cfg.lr, cfg.weight_decay, cfg.epochs) == (spec.optimizer, spec.lr, spec.weight_decay, spec.epochs)
    assert cfg.sched == "multistep" and [round(m * cfg.epochs) for m in cfg.milestones] == [27, 33]
    # 1,000 warm-up iterations of 16 images over COCO train2017's 118,287, from 0.001 x lr
    assert cfg.batch_size * 8 == 16 and cfg.warmup_epochs == pytest.approx(1000 * 16 / 118_287, abs=0.001)
    assert cfg.warmup_lr == pytest.approx(cfg.lr * 1e-3) and cfg.drop_path == 0.2 and cfg.amp


def test_a_short_real_training_run_raises_box_and_mask_ap(tmp_path: Path) -> None:
    """60 steps of the smallest detector on 8 built-in scenes, scored on those same scenes: box and
    mask AP climb from about 0 (the held-out numbers of the full built-in job are in docs/detection.md)."""
    out = tmp_path / "run"
    proc = run_cli("detect", "train", "--backbone", "test_mambavision", "--max-train-samples", "8",
                   "--max-val-samples", "8", "--val-split", "train", "--batch-size", "4", "--fpn-channels", "32",
                   "--rois-per-image", "32", "--rpn-batch-size", "64", "--seed", "3", "--no-amp", "--quiet",
                   "--epochs", "30", "--warmup-epochs", "0.25", "--lr", "3e-3", "--output", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["initial_AP"] < 1 and s["initial_mask_AP"] < 1
    assert s["final_AP"] > s["initial_AP"] + 15 and s["final_mask_AP"] > s["initial_mask_AP"] + 12, s
    assert s["final_AP50"] > 40  # measured: box AP 0.06 -> 26.5, mask AP 0 -> 24.6, AP50 65
