"""Training: configs, checks before work, real training steps, checkpoints, resume after SIGKILL and
Ctrl-C, torchrun with two processes (gloo), and the built-in digits job."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from imagefolder import CLASSES, TINY, cli_env, make_dataset, popen_cli, run_cli, wait_for_rows

from hymamba import create_model, load_checkpoint
from hymamba.cli import main
from hymamba.tasks.classification import train
from hymamba.tasks.classification import ClassificationConfig as TrainConfig
from hymamba.tasks.classification import build_config, check_config, config_fields
from hymamba.engine.state import load_train_state

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _rows(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def _tiny(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(out), model="test_mambavision", input_size=32, batch_size=4,
                  workers=0, epochs=2, warmup_epochs=0, cooldown_epochs=0, quiet=True)
    values.update(kw)
    return build_config(overrides=values)


def _by_hand(model: torch.nn.Module, folder: Path, data_config: dict, amp: bool = False) -> tuple:
    """(top-1 %, mean cross-entropy, images) of ``model`` on an ImageFolder split, computed
    independently: timm's eval transform with the recorded preprocessing, torchvision's ImageFolder
    (the corrupt files left out by name), one batch, optionally under bf16 autocast."""
    import torch.nn.functional as F
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    tf = create_transform(data_config["input_size"], interpolation=data_config["interpolation"],
                          mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                          crop_mode=data_config["crop_mode"])
    ds = ImageFolder(str(folder), transform=tf, is_valid_file=lambda p: "zz_" not in p and p.endswith((".png", ".jpg")))
    assert ds.classes == list(CLASSES)
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model.eval()(x).float()
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item(), len(ds)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", train=8, val=3)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory) -> Path:
    """One real in-process run of the tiny model; its output folder."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    summary = train(_tiny(data, out))
    assert summary["epochs"] == 2
    return out


# ----------------------------------------------------------------------------------------------
# configs


def test_digits_recipe_is_the_default() -> None:
    assert build_config(CONFIGS / "digits_nano.yaml") == TrainConfig()


@pytest.mark.parametrize("name, model, wd, warmup, drop_path, mesa, start", [
    ("mambavision_t_1k", "mambavision_t", 0.05, 20, 0.2, 0.5, 0.25),
    ("mambavision_t2_1k", "mambavision_t2", 0.05, 20, 0.2, 0.75, 0.25),
    ("mambavision_s_1k", "mambavision_s", 0.05, 20, 0.2, 1.0, 0.25),
    ("mambavision_b_1k", "mambavision_b", 0.075, 35, 0.3, 1.0, 0.3),
    ("mambavision_l_1k", "mambavision_l", 0.12, 20, 0.3, 6.0, 0.25),
    ("mambavision_l2_1k", "mambavision_l2", 0.12, 20, 0.3, 6.0, 0.25),
])
def test_official_recipes(name, model, wd, warmup, drop_path, mesa, start) -> None:
    c = build_config(CONFIGS / f"{name}.yaml", {"data": "/imagenet"})
    assert (c.model, c.weight_decay, c.warmup_epochs, c.drop_path, c.mesa, c.mesa_start_ratio) == \
        (model, wd, warmup, drop_path, mesa, start)
    assert (c.batch_size, c.epochs, c.cooldown_epochs, c.lr, c.min_lr, c.warmup_lr, c.opt) == \
        (128, 310, 10, 0.005, 5e-6, 1e-6, "lamb")
    assert (c.clip_grad, c.model_ema_decay, c.mixup, c.cutmix, c.smoothing, c.aa, c.reprob, c.color_jitter,
            c.seed) == (5.0, 0.9998, 0.8, 1.0, 0.1, "rand-m9-mstd0.5-inc1", 0.25, 0.4, 31)
    assert c.lr_base_size is None and c.amp and c.channels_last and c.model_ema
    check_config(c)
    with pytest.raises(ValueError, match="needs DATA"):
        check_config(build_config(CONFIGS / f"{name}.yaml"))


def test_finetune_recipe_checks() -> None:
    c = build_config(CONFIGS / "finetune.yaml", {"data": "/mydata", "pretrained": False})
    assert c.layer_decay == 0.8 and c.opt == "adamw" and c.lr_base_size == 256
    check_config(c)


def test_precedence_and_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("lr: 0.1\nepochs: 7\nopt_betas: [0.8, 0.9]\n")
    c = build_config(tmp_path / "a.yaml", {"epochs": 3})
    assert (c.lr, c.epochs, c.opt_betas, c.batch_size) == (0.1, 3, (0.8, 0.9), TrainConfig().batch_size)
    (tmp_path / "b.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rate"):
        build_config(tmp_path / "b.yaml")
    with pytest.raises(ValueError, match="config file not found"):
        build_config(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match="option epochs must be a number"):
        build_config(overrides={"epochs": "ten"})


@pytest.mark.parametrize("override, message", [
    ({"epochs": -1}, "epochs must be at least 1, got -1"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"opt": "lamb2"}, "unknown optimizer 'lamb2'; did you mean lamb"),
    ({"cooldown_epochs": 20}, "must be fewer than epochs"),
    ({"warmup_epochs": 30}, "warmup_epochs .* must fit"),
    ({"mesa": 1.0, "model_ema": False}, "MESA distils from the EMA model"),
    ({"reprob": 1.5}, "reprob is a probability"),
    ({"model": "mambavision_zz"}, "unknown model"),
    ({"amp_dtype": "int8"}, "amp_dtype must be one of"),
    ({"freeze_stages": 5}, "freeze_stages must be 0-4"),
    ({"mixer_variant": "mamba2"}, "mixer_variant must be one of concat, gated"),
    ({"attention_pattern": "random"}, "attention_pattern must be one of last_half"),
])
def test_impossible_options_are_rejected(override, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_config(build_config(overrides=override))


def test_every_option_has_a_flag() -> None:
    from hymamba.cli.main import build_parser as _build_parser

    text = _build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in config_fields():
        assert name == "data" or f"--{name.replace('_', '-')}" in text


@pytest.mark.parametrize("value", ["mamba_only", "attention_only", "first_half"])
def test_ablation_flags_parse_to_valid_options(value: str) -> None:
    from hymamba.cli.main import build_parser as _build_parser

    args = _build_parser().parse_args(["train", "--attention-pattern", value, "--mixer-variant", "gated"])
    cfg = build_config(overrides={k: v for k, v in vars(args).items() if k in config_fields()})
    check_config(cfg)
    assert cfg.attention_pattern == value and cfg.mixer_variant == "gated"


def test_none_flag_means_none_only_where_none_is_allowed() -> None:
    from hymamba.cli.main import build_parser as _build_parser

    args = _build_parser().parse_args(["train", "--drop-path", "none", "--attention-pattern", "none"])
    assert args.drop_path is None  # Optional: 'none' is the null value
    cfg = build_config(overrides={k: v for k, v in vars(args).items() if k in config_fields()})
    assert cfg.attention_pattern == "none"  # a string option keeps the word, and the check names it
    with pytest.raises(ValueError, match="attention_pattern must be one of .* got 'none'"):
        check_config(cfg)


# ----------------------------------------------------------------------------------------------
# errors before any work, through the CLI


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hymamba: error: "), err
    return err[0]


def test_cli_errors_are_one_clear_line(capsys, tmp_path: Path, data: Path) -> None:
    assert "epochs must be at least 1" in _error(capsys, "train", "--epochs", "-1")
    assert "batch_size must be at least 1" in _error(capsys, "train", "--batch-size", "0")
    assert "unknown optimizer" in _error(capsys, "train", "--opt", "sgdd")
    assert "data folder not found" in _error(capsys, "train", str(tmp_path / "nope"))
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    assert "holds no images" in _error(capsys, "train", str(tmp_path / "empty"), "--output", str(tmp_path / "o1"))
    one = make_dataset(tmp_path / "one", train=6, val=2, corrupt=False, classes=("solo",))
    assert "only 1 class (solo)" in _error(capsys, "train", str(one), "--mixup", "0.8", *TINY,
                                            "--output", str(tmp_path / "o2"))
    assert "fewer than batch_size" in _error(capsys, "train", str(data), "--model", "test_mambavision",
                                             "--batch-size", "512", "--output", str(tmp_path / "o3"))
    assert "nothing to resume" in _error(capsys, "train", "--resume", str(tmp_path / "none"))
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # nothing made before the checks
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install tensorboard" in _error(capsys, "train", "--tensorboard")


def test_existing_output_needs_resume(capsys, trained: Path, data: Path) -> None:
    assert "--resume" in _error(capsys, "train", str(data), *TINY, "--output", str(trained))


# ----------------------------------------------------------------------------------------------
# a real run and its outputs


def test_outputs_of_a_run(trained: Path, data: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    for key in ("best_top1", "final_top1", "epochs", "wall_seconds", "skipped_images"):
        assert key in summary
    # the reported numbers are the delivered weights' (the EMA's), evaluated under bf16 autocast
    # (amp is on): recomputed by hand from model.safetensors and the preprocessing in model.json
    assert summary["metric_from"] == "ema"
    final = create_model("test_mambavision", checkpoint_path=trained / "model.safetensors")
    top1, loss, n = _by_hand(final, data / "val", json.loads((trained / "model.json").read_text()), amp=True)
    assert n == 9 and summary["final_top1"] == pytest.approx(top1)
    assert summary["final_loss"] == pytest.approx(loss, rel=1e-4)  # measured: equal
    assert summary["epochs"] == 2 and summary["skipped_images"] == 4  # 2 corrupt files in train/ and in val/
    assert summary["val_images"] == 9 and summary["train_images_per_epoch"] == 24
    rows = _rows(trained / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["lr"]) > 0
    # metrics.csv holds 4 decimals
    assert float(rows[-1]["ema_top1"]) == pytest.approx(summary["final_top1"], abs=1e-3)
    assert summary["best_top1"] == pytest.approx(max(float(r["ema_top1"]) for r in rows), abs=1e-3)
    assert (trained / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "config.yaml").is_file() and (trained / "best.pth").is_file()
    assert not list(trained.glob(".*tmp*"))  # no temporary files left behind

    state = torch.load(trained / "last.pth", weights_only=True)  # plain tensors and containers only
    for key in ("model", "model_ema", "optimizer", "scheduler", "epoch", "ranks", "config", "class_names"):
        assert key in state
    assert state["epoch"] == 2 and state["class_names"] == list(CLASSES)
    assert set(state["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}

    meta = json.loads((trained / "model.json").read_text())
    assert meta["model"] == "test_mambavision" and meta["class_names"] == list(CLASSES)
    assert meta["input_size"] == [3, 32, 32] and meta["num_classes"] == 3
    model = create_model("test_mambavision", checkpoint_path=trained / "model.safetensors")
    assert model.num_classes == 3
    ema = create_model("test_mambavision", num_classes=3)
    load_checkpoint(ema, trained / "last.pth", use_ema=True)
    assert torch.equal(ema.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_full_recipe_features_run(data: Path, trained: Path, tmp_path: Path) -> None:
    """Mixup/CutMix, MESA, layer decay, frozen stages, accumulation, AdamW, channels_last together."""
    start = trained / "model.safetensors"
    cfg = _tiny(data, tmp_path / "full", epochs=2, mixup=0.8, cutmix=1.0, mesa=1.0, mesa_start_ratio=0.25,
                layer_decay=0.8, freeze_stages=2, grad_accum=2, opt="adamw", channels_last=True,
                color_jitter=0.4, hflip=0.5, aa="rand-m9-mstd0.5-inc1", reprob=0.25, lr_base_size=4,
                checkpoint=str(start))
    summary = train(cfg)
    assert summary["epochs"] == 2 and summary["global_batch"] == 8 and summary["lr"] == pytest.approx(0.008)
    state = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    assert len({g.get("lr_scale") for g in state["optimizer"]["param_groups"]}) > 2  # layer-wise LR decay
    # frozen: the stem and levels 0-1 never change, BatchNorm statistics included; the rest trains
    before = create_model("test_mambavision", checkpoint_path=start).state_dict()
    after = state["model"]
    frozen = [k for k in after if k.startswith(("patch_embed.", "levels.0.", "levels.1."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["levels.2.blocks.0.mlp.fc1.weight"], before["levels.2.blocks.0.mlp.fc1.weight"])


def test_ablation_variant_trains_and_evaluates(data: Path, tmp_path: Path) -> None:
    """--mixer-variant / --attention-pattern reach the model, are recorded beside the weights and
    rebuild the same architecture in create_model, validate and predict."""
    from hymamba.apps.predict import predict
    from hymamba.apps.validate import validate
    from hymamba.models.layers import Attention, MambaVisionMixer

    out = tmp_path / "ablate"
    summary = train(_tiny(data, out, epochs=1, mixer_variant="causal_conv", attention_pattern="first_half"))
    assert summary["epochs"] == 1
    meta = json.loads((out / "model.json").read_text())
    assert meta["mixer_variant"] == "causal_conv" and meta["attention_pattern"] == "first_half"
    model = create_model("test_mambavision", checkpoint_path=out / "model.safetensors")
    mixers = [m for m in model.modules() if isinstance(m, MambaVisionMixer)]
    assert mixers and all(m.variant == "causal_conv" for m in mixers)
    assert isinstance(model.levels[2].blocks[0].mixer, Attention)  # attention first
    final = validate("test_mambavision", out / "model.safetensors", data=str(data), batch_size=4, workers=0)
    assert final["top1"] == pytest.approx(summary["final_top1"])
    resumable = validate("test_mambavision", out / "last.pth", data=str(data), batch_size=4, workers=0)
    # the training checkpoint records the options too: validate rebuilds the causal_conv /
    # first_half model from it and evaluates its raw (non-EMA) weights; the same by hand:
    raw = create_model("test_mambavision", num_classes=3, mixer_variant="causal_conv", attention_pattern="first_half")
    raw.load_state_dict(torch.load(out / "last.pth", weights_only=True)["model"])
    top1, loss, n = _by_hand(raw, data / "val", resumable["preprocessing"])
    assert resumable["images"] == n == 9
    assert resumable["top1"] == pytest.approx(top1) and resumable["loss"] == pytest.approx(loss, rel=1e-5)
    image = next((data / "val").rglob("*.png"))
    assert len(predict("test_mambavision", out / "model.safetensors", [image], topk=2)[0]["top"]) == 2


def test_cued_digits_train_on_fresh_scenes_and_refuse_flips(tmp_path: Path, monkeypatch) -> None:
    from hymamba.data.datasets import CuedDigits
    from hymamba.errors import ConfigError

    seen = []
    original = CuedDigits.set_epoch
    monkeypatch.setattr(CuedDigits, "set_epoch", lambda self, e: (seen.append((self.split, e)), original(self, e)))
    cfg = build_config(overrides=dict(data="cued-digits", output=str(tmp_path / "run"), model="test_mambavision",
                                      batch_size=4, workers=0, epochs=2, warmup_epochs=0, cooldown_epochs=0,
                                      max_train_samples=8, max_val_samples=12, quiet=True))
    summary = train(cfg)
    assert summary["num_classes"] == 10 and summary["val_images"] == 12 and summary["train_images_per_epoch"] == 8
    assert seen == [("train", 0), ("train", 1)]  # the engine asks for each epoch's scenes
    with pytest.raises(ConfigError, match="mirrors cued-digits scenes"):
        train(build_config(overrides=dict(cfg.__dict__, output=str(tmp_path / "flip"), hflip=0.5)))


def test_fine_tune_with_a_new_head(trained: Path, tmp_path: Path) -> None:
    four = make_dataset(tmp_path / "four", train=4, val=2, corrupt=False,
                        classes=("apple", "banana", "cherry", "durian"))
    summary = train(_tiny(four, tmp_path / "ft", epochs=1, checkpoint=str(trained / "model.safetensors"),
                          layer_decay=0.75, freeze_stages=1))
    assert summary["num_classes"] == 4
    sd = torch.load(tmp_path / "ft" / "last.pth", weights_only=True)["model"]
    src = create_model("test_mambavision", checkpoint_path=trained / "model.safetensors").state_dict()
    assert torch.equal(sd["patch_embed.conv_down.0.weight"], src["patch_embed.conv_down.0.weight"])  # frozen
    assert sd["head.weight"].shape == (4, 128)
    from hymamba.errors import CheckpointError

    other = tmp_path / "other.safetensors"
    from hymamba.weights.io import save_safetensors

    save_safetensors(create_model("mambavision_nano").state_dict(), other)
    with pytest.raises(CheckpointError, match="does not fit test_mambavision"):
        train(_tiny(four, tmp_path / "ft2", epochs=1, checkpoint=str(other)))


# ----------------------------------------------------------------------------------------------
# resume: SIGKILL, Ctrl-C, and exactness


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("long") / "ds", train=40, val=4, size=32)


@pytest.fixture(scope="module")
def reference(long_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cli("train", str(long_data), *TINY, "--epochs", "3", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_sigkill_mid_epoch_then_resume_matches(long_data: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = popen_cli("train", str(long_data), *TINY, "--epochs", "3", "--output", str(out))
    wait_for_rows(out / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_train_state(out)["epoch"] == 1  # epoch 2 was under way, not saved
    assert not (out / "summary.json").exists()
    resumed = run_cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    got, want = _rows(out / "metrics.csv"), _rows(reference / "metrics.csv")
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        for key in ("train_loss", "loss", "ema_loss", "top1", "ema_top1", "lr"):
            assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-4, abs=1e-5), (key, g, w)
    a = create_model("test_mambavision", checkpoint_path=out / "model.safetensors").state_dict()
    b = create_model("test_mambavision", checkpoint_path=reference / "model.safetensors").state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def test_ctrl_c_leaves_a_resumable_checkpoint(long_data: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    proc = popen_cli("train", str(long_data), *TINY, "--epochs", "3", "--output", str(out))
    wait_for_rows(out / "metrics.csv", 1, proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with: hymamba train --resume" in err
    state = load_train_state(out / "last.pth")
    assert state["epoch"] >= 1 and json.loads((out / "summary.json").read_text())["interrupted"]
    resumed = run_cli("train", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    got, want = _rows(out / "metrics.csv"), _rows(reference / "metrics.csv")
    assert [r["epoch"] for r in got] == ["1", "2", "3"]
    assert float(got[0]["train_loss"]) == pytest.approx(float(want[0]["train_loss"]), rel=1e-4)
    for g, w in zip(got[1:], want[1:]):  # a mid-epoch resume repeats one batch's augmentation draw
        assert abs(float(g["train_loss"]) - float(w["train_loss"])) < 0.1
    assert json.loads((out / "summary.json").read_text())["interrupted"] is False


def test_stop_mid_epoch_saves_the_position_and_resumes(data: Path, tmp_path: Path, monkeypatch) -> None:
    """A signal in the middle of an epoch: the checkpoint records how far the epoch got."""
    import hymamba.tasks.classification.task as train_module

    calls = {"n": 0}
    real = train_module.warn_unreadable

    def interrupt_after_three_batches(paths, seen):  # called once per training batch
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(paths, seen)

    monkeypatch.setattr(train_module, "warn_unreadable", interrupt_after_three_batches)
    out = tmp_path / "stopped"
    summary = train(_tiny(data, out, epochs=2))
    assert summary["interrupted"] and summary["epochs"] == 0
    state = load_train_state(out)
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, 3, 3)
    monkeypatch.setattr(train_module, "warn_unreadable", real)
    from hymamba.tasks.classification import config_for_resume

    summary = train(config_for_resume(state), resume=state)
    assert not summary["interrupted"] and summary["epochs"] == 2
    assert load_train_state(out)["global_step"] == 2 * 6  # 24 images / batch 4 per epoch, none repeated


# ----------------------------------------------------------------------------------------------
# distributed: torchrun, two processes, gloo


def test_torchrun_two_processes(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hymamba.cli", "train", str(data), *TINY, "--epochs", "2", "--no-amp", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["ranks_in_sync"] is True  # identical weights (and BN statistics) on both ranks
    # 24 readable train images, 12 per rank = 3 full batches of 4 each: every image once per epoch
    assert summary["train_images_per_epoch"] == 24
    assert summary["skipped_images"] == 4  # gathered from both ranks
    state = torch.load(out / "last.pth", weights_only=True)
    assert len(state["ranks"]) == 2 and not torch.equal(state["ranks"][0]["rng"]["torch"],
                                                        state["ranks"][1]["rng"]["torch"])
    # metrics reduced over the two shards equal a single-process evaluation of the whole split
    val = run_cli("validate", "test_mambavision", str(data), "--checkpoint", str(out / "model.safetensors"),
                  "--json", "--workers", "0")
    assert val.returncode == 0, val.stderr
    res = json.loads(val.stdout)
    assert res["images"] == summary["val_images"] == 9
    assert res["top1"] == pytest.approx(summary["final_top1"]) and res["loss"] == pytest.approx(
        summary["final_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# the built-in job, for real


@pytest.mark.slow
def test_default_digits_job_learns(tmp_path: Path) -> None:
    proc = run_cli("train", "--epochs", "8", "--output", str(tmp_path / "digits"), timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "global batch 64 = 64 per process x 1 process(es)" in proc.stdout and "used as given" in proc.stdout
    summary = json.loads((tmp_path / "digits" / "summary.json").read_text())
    assert summary["final_top1"] >= 95.0, summary
    assert summary["val_images"] == 360 and summary["train_images_per_epoch"] == 22 * 64


@pytest.mark.parametrize("sched, checks", [
    ("poly", [(0, 1.0), (6, 0.5), (9, 0.25)]),                  # power 1: linear to 0 over 12 epochs
    ("multistep", [(8.8, 1.0), (9.1, 0.1), (11.1, 0.01)]),       # x0.1 at 0.75 and 0.9167 of 12 epochs
])
def test_poly_and_multistep_schedules_have_the_asked_shape(sched: str, checks: list) -> None:
    """timm's defaults would give poly power 0.1 and milestones at epochs 90/180/270; the engine passes ours."""
    from timm.scheduler import create_scheduler_v2

    from hymamba.engine.loop import Trainer

    cfg = TrainConfig(sched=sched, epochs=12, warmup_epochs=0, cooldown_epochs=0, min_lr=0.0, lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, _ = create_scheduler_v2(opt, sched=sched, num_epochs=12, warmup_epochs=0, min_lr=0.0,
                                       step_on_epochs=False, updates_per_epoch=10, **Trainer._schedule_shape(cfg))
    for epoch, want in checks:
        scheduler.step_update(num_updates=round(epoch * 10))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, abs=1e-9), (epoch, want)


def test_a_run_does_not_depend_on_what_its_process_ran_before(tmp_path: Path) -> None:
    """The same config trained three times in one fresh process gives the same metrics each time:
    libraries imported lazily during the first run's set-up (rich draws from Python's generator at
    import) must not shift the augmentation's random stream."""
    script = """
import sys, tempfile
from hymamba.tasks.classification import build_config, train
rows = []
for _ in range(3):
    out = tempfile.mkdtemp(dir=sys.argv[1])
    cfg = build_config(None, dict(model="test_mambavision", input_size=32, epochs=1, batch_size=8, warmup_epochs=0,
                                  cooldown_epochs=0, max_train_samples=16, max_val_samples=8, workers=0, quiet=True,
                                  seed=0, output=out))
    train(cfg, echo=lambda *a: None)
    rows.append(open(out + "/metrics.csv").read().splitlines()[1].split(",")[:-2])  # without the timings
print(rows[0] == rows[1] == rows[2], rows)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("True"), proc.stdout
