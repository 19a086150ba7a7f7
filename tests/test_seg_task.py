"""The segmentation task through the engine: a real (short) training run on the built-in digit scenes
writes its files and raises mIoU, resumes from last.pth, and its config rejects bad values."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from hymamba.errors import ConfigError
from hymamba.tasks.segmentation import SegmentationConfig, build_config, config_for_resume, train

#: a few dozen 64 px scenes on the smallest backbone: about 20 s on 2 cores
SMALL = dict(backbone="test_mambavision", head_channels=32, aux_channels=16, max_train_samples=32,
             max_val_samples=16, scene_size=64, crop_size=64, batch_size=4, epochs=2, warmup_epochs=0.5, lr=2e-3,
             drop_path=0.0, quiet=True, seed=7)


def _fresh_miou(cfg: SegmentationConfig) -> float:
    from hymamba.tasks.segmentation.task import SegmentationTask
    from hymamba.utils.distributed import Dist

    task = SegmentationTask(cfg)
    task.setup(Dist(), None)
    torch.manual_seed(cfg.seed)
    return task.evaluate(task.build_model(), None)["mIoU"]


def test_train_writes_outputs_raises_miou_and_resumes(tmp_path) -> None:
    from hymamba.engine.state import load_train_state

    out = tmp_path / "run"
    cfg = build_config(overrides=dict(SMALL, output=str(out)))
    before = _fresh_miou(cfg)
    summary = train(cfg, echo=lambda _m: None)
    for name in ("last.pth", "metrics.csv", "model.safetensors", "model.json", "summary.json", "config.yaml"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2 and {"mIoU", "aAcc", "loss"} <= set(rows[0])
    after = summary["final_mIoU"]
    # a fresh model scores about 1 (chance over 11 classes); 2 epochs learn the background first, which
    # alone gives about 8 (its IoU ~90 over 11 classes): the margin 5 is what this short run reliably clears
    assert after > before + 5.0, (before, after)
    assert summary["epochs"] == 2 and summary["best_mIoU"] >= after
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "segmentation" and meta["backbone"] == "test_mambavision"
    assert meta["class_names"] == ["background"] + [str(d) for d in range(10)]
    assert len(meta["palette"]) == 11 and meta["num_classes"] == 11 and meta["channels"] == 32
    assert json.loads((out / "summary.json").read_text())["final_mIoU"] == pytest.approx(after)

    # the rebuilt model from model.json + model.safetensors gives the run's final mIoU
    from hymamba.factory import create_backbone
    from hymamba.models.upernet import build_segmenter
    from safetensors.torch import load_file

    backbone = create_backbone(meta["backbone"], drop_path_rate=meta["drop_path_rate"])
    model = build_segmenter(backbone, meta["num_classes"], channels=meta["channels"],
                            aux_channels=meta["aux_channels"], pool_scales=meta["pool_scales"],
                            aux_index=meta["aux_index"], dropout_ratio=meta["dropout_ratio"])
    model.load_state_dict(load_file(str(out / "model.safetensors")))  # strict: every key fits

    # resume: one more epoch continues from epoch 2
    state = load_train_state(out / "last.pth")
    assert state["epoch"] == 2 and state["class_names"] == meta["class_names"]
    resumed = config_for_resume(state, overrides={"epochs": 3, "quiet": True})
    summary = train(resumed, resume=state, echo=lambda _m: None)
    assert summary["epochs"] == 3
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("bad", [dict(eval_mode="sliding"), dict(aux_weight=-1), dict(crop_size=16),
                                 dict(num_classes=0), dict(num_classes=11, ignore_index=3), dict(flip_prob=2.0),
                                 dict(backbone="no_such_model"), dict(scale_ratio=(2.0, 0.5)),
                                 dict(backbone_checkpoint="/no/such/file.pth"), dict(opt="adamz")])
def test_config_rejects_bad_values(bad) -> None:
    with pytest.raises(ConfigError):
        build_config(overrides=bad).check()


def test_defaults_are_the_official_recipe_shape() -> None:
    cfg = SegmentationConfig()
    cfg.check()
    assert (cfg.data, cfg.opt, cfg.sched, cfg.weight_decay, cfg.aux_weight) == ("digitscenes", "adamw", "poly",
                                                                                0.01, 0.4)
    assert not cfg.model_ema and cfg.clip_grad is None and cfg.eval_mode == "whole"


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_ade20k_recipes_match_the_official_segmenters(variant: str) -> None:
    """configs/upernet_mambavision_*_ade20k.yaml build the official segmenter's layout and schedule."""
    from pathlib import Path

    from hymamba.models.segmenters import SEGMENTERS

    path = Path(__file__).resolve().parents[1] / "configs" / f"upernet_mambavision_{variant}_ade20k.yaml"
    cfg = build_config(str(path), {"data": "/data/ADEChallengeData2016", "pretrained": False})
    cfg.check()
    spec = SEGMENTERS[f"upernet_mambavision_{variant}"]
    assert cfg.backbone == spec.backbone and tuple(cfg.window_size) == spec.window_size
    assert (cfg.head_channels, cfg.aux_channels, cfg.dropout) == (spec.channels, spec.aux_channels, spec.dropout_ratio)
    assert (cfg.crop_size, cfg.crop_size) == spec.crop_size and cfg.eval_size == 512 and cfg.eval_mode == "whole"
    assert (cfg.opt, cfg.sched, cfg.poly_power, cfg.weight_decay, cfg.flip_prob) == ("adamw", "poly", 1.0, 0.01, 0.5)
    # 160k iterations of 16 images over ADE20K's 20,210 training images; 1,500 warm-up iterations
    assert cfg.epochs == round(160_000 * 16 / 20_210) and cfg.warmup_epochs == pytest.approx(1500 * 16 / 20_210,
                                                                                            abs=0.01)
    assert cfg.batch_size * 8 == 16 and cfg.lr == {"t": 5e-5, "s": 6e-5, "b": 5e-5}[variant]
