"""``--strategy fsdp`` (FSDP2's ``fully_shard``): two real processes under torchrun (gloo, CPU) train
exactly as DDP does, write sharded checkpoints that resume exactly after SIGKILL (on two processes or
on one), and read back whole wherever weights are read (``hymamba convert``, ``validate``,
``create_model``). Plus the sharded index's safe reading and the strategy's clear errors."""
from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from imagefolder import TINY, cli_env, make_dataset, run_cli, wait_for_rows

from hymamba import create_model
from hymamba.engine.state import load_train_state
from hymamba.errors import CheckpointError, ConfigError
from hymamba.weights.io import read_state_dict

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

#: the comparison runs, with gradient accumulation. Without clipping: its global norm is summed over
#: shards under FSDP, in another order than over whole tensors (1e-7 relative), and a few AdamW steps
#: on a tiny model amplify that past any tolerance (measured: 5e-5 relative by the third step).
RUN = (*TINY, "--no-amp", "--epochs", "3", "--batch-size", "2", "--grad-accum", "2", "--opt", "adamw",
       "--clip-grad", "none")


def _torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hymamba.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=timeout)


def _rows(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fsdp") / "ds", train=8, val=3)


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory) -> dict:
    """The same 3-epoch run under DDP, and under FSDP with activation checkpointing."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for strategy, extra in (("ddp", ()), ("fsdp", ("--grad-checkpointing",))):
        out[strategy] = root / strategy
        proc = _torchrun("train", str(data), *RUN, "--strategy", strategy, *extra, "--output", str(out[strategy]))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fsdp_trains_as_ddp_does(runs: dict) -> None:
    ddp, fsdp = _rows(runs["ddp"] / "metrics.csv"), _rows(runs["fsdp"] / "metrics.csv")
    assert len(ddp) == len(fsdp) == 3
    for a, b in zip(ddp, fsdp):  # the same steps on the same data: the same training losses
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-5), (a, b)
        assert float(b["lr"]) == pytest.approx(float(a["lr"]))
    summary = json.loads((runs["fsdp"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["ranks_in_sync"] is True
    # the final weights (gathered whole into model.safetensors) are DDP's, BatchNorm statistics aside:
    # DDP hands rank 0's to every forward, FSDP keeps each rank's (both averaged at each epoch's end)
    a, b = _weights(runs["ddp"] / "model.safetensors"), _weights(runs["fsdp"] / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    create_model("test_mambavision", num_classes=3, checkpoint_path=runs["fsdp"] / "model.safetensors")
    config = (runs["fsdp"] / "config.yaml").read_text()
    assert "strategy: fsdp" in config and "grad_checkpointing: true" in config


def test_sharded_checkpoints_on_disk(runs: dict) -> None:
    out = runs["fsdp"]
    state = load_train_state(out)
    assert state["sharded"] == "sharded/epoch3-batch0" and "model" not in state and "optimizer" not in state
    assert len(state["ranks"]) == 2
    folders = sorted(p.name for p in (out / "sharded").iterdir())
    best = torch.load(out / "best.pth", weights_only=True)["sharded"]
    assert set(folders) == {"epoch3-batch0", best.split("/")[1]}  # the others were removed
    shards = sorted(p.name for p in (out / state["sharded"]).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per process


def test_sharded_checkpoint_reads_back_whole(runs: dict, data: Path, tmp_path: Path) -> None:
    out = runs["fsdp"]
    # the last checkpoint's EMA is the run's exported weights, bit for bit
    exported = _weights(out / "model.safetensors")
    ema = read_state_dict(out / "last.pth", use_ema=True)
    assert ema.keys() == exported.keys() and all(torch.equal(ema[k], exported[k]) for k in ema)
    # hymamba convert writes them as one file with its model.json; create_model loads it strictly
    conv = run_cli("convert", str(out / "last.pth"), str(tmp_path / "w.safetensors"))
    assert conv.returncode == 0, conv.stderr
    model = create_model("test_mambavision", num_classes=3, checkpoint_path=tmp_path / "w.safetensors")
    plain = read_state_dict(out / "last.pth")
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "w.json").read_text())["class_names"] == ["apple", "banana", "cherry"]
    # and validate reads the sharded last.pth as it reads any checkpoint
    val = run_cli("validate", "test_mambavision", str(data), "--checkpoint", str(out / "last.pth"), "--use-ema",
                  "--json", "--workers", "0")
    assert val.returncode == 0, val.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(val.stdout)["top1"] == pytest.approx(summary["final_top1"])


def test_sigkill_then_resume_is_exact(runs: dict, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "hymamba.cli", "train", str(data), *RUN, "--strategy", "fsdp", "--grad-checkpointing", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            start_new_session=True)
    wait_for_rows(out / "metrics.csv", 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, at once
    proc.wait()
    state = load_train_state(out)
    assert state["epoch"] in (1, 2) and not (out / "summary.json").exists()
    resumed = _torchrun("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = _rows(out / "metrics.csv"), _rows(runs["fsdp"] / "metrics.csv")
    assert [r["epoch"] for r in got] == ["1", "2", "3"]
    for g, w in zip(got, want):
        for key in ("train_loss", "loss", "ema_loss", "top1", "lr"):
            assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-6, abs=1e-7), (key, g, w)
    a, b = _weights(out / "model.safetensors"), _weights(runs["fsdp"] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_run_resumes_in_one_process(runs: dict, tmp_path: Path) -> None:
    """DCP reshards: a checkpoint written by two processes continues in one (not bit for bit: the
    random states of two processes cannot become one)."""
    import shutil

    out = tmp_path / "one"
    shutil.copytree(runs["fsdp"], out)
    state = load_train_state(out)
    moved = run_cli("train", "--resume", str(out), "--epochs", "4", "--quiet")
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "re-seeded" in moved.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["world_size"] == 1
    assert load_train_state(out)["global_step"] > state["global_step"]


def test_mixed_precision_and_the_switch_from_ddp(data: Path, tmp_path: Path) -> None:
    """Under AMP (bfloat16 on the CPU) both strategies run the same autocast compute on the same float32
    parameters; a DDP checkpoint is not resumed as a sharded run (the way out is said)."""
    losses = {}
    for strategy in ("ddp", "fsdp"):
        proc = _torchrun("train", str(data), *TINY, "--epochs", "1", "--strategy", strategy, "--clip-grad", "none",
                         "--output", str(tmp_path / strategy))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "amp: true" in (tmp_path / strategy / "config.yaml").read_text()
        losses[strategy] = float(_rows(tmp_path / strategy / "metrics.csv")[0]["train_loss"])
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
    switch = _torchrun("train", "--resume", str(tmp_path / "ddp"), "--strategy", "fsdp", "--epochs", "2")
    assert switch.returncode != 0  # (torchrun exits 1 whatever its workers' status: theirs was 2)
    assert "was saved by a run that was not sharded; resume it with --strategy ddp" in switch.stderr


DENSE = {
    "segment": ("--backbone", "test_mambavision", "--head-channels", "16", "--aux-channels", "8",
                "--max-train-samples", "16", "--max-val-samples", "8", "--batch-size", "4", "--warmup-epochs", "0.5",
                "--drop-path", "0", "--quiet", "--seed", "7", "--no-amp", "--epochs", "1"),
    "detect": ("--backbone", "test_mambavision", "--max-train-samples", "8", "--max-val-samples", "4", "--batch-size",
               "4", "--fpn-channels", "32", "--rois-per-image", "32", "--rpn-batch-size", "64", "--quiet", "--seed", "3",
               "--no-amp", "--epochs", "1"),
}


@pytest.mark.parametrize("command", sorted(DENSE))
def test_dense_training_under_fsdp(command: str, tmp_path: Path) -> None:
    """The dense tasks under FSDP: the backbone's blocks sharded, the heads in the root unit."""
    losses = {}
    for strategy in ("ddp", "fsdp"):
        proc = _torchrun(command, "train", *DENSE[command], "--strategy", strategy, "--output", str(tmp_path / strategy))
        assert proc.returncode == 0, f"{command} train --strategy {strategy}:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        losses[strategy] = float(_rows(tmp_path / strategy / "metrics.csv")[0]["train_loss"])
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
    ev = run_cli(command, "eval", str(tmp_path / "fsdp" / "last.pth"), "--max-samples", "4", "--json")
    assert ev.returncode == 0, f"{command} eval of the sharded last.pth:\n{ev.stderr[-3000:]}"


# ----------------------------------------------------------------------------------------------
# in one process: the index is read safely, errors are clear


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_foreign_index_is_refused_not_run(tmp_path: Path) -> None:
    from hymamba.weights.io import read_sharded

    folder = tmp_path / "run" / "sharded" / "epoch1-batch0"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        read_sharded(folder, "model", tmp_path / "run" / "last.pth")


def test_missing_sharded_folder_is_a_clear_error(tmp_path: Path) -> None:
    from hymamba.engine.state import FORMAT

    torch.save({"format": FORMAT, "sharded": "sharded/epoch1-batch0"}, tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match="missing; copy the whole output folder"):
        read_state_dict(tmp_path / "last.pth")


def test_strategy_errors() -> None:
    from hymamba.engine.strategies import make_strategy, set_grad_checkpointing
    from hymamba.utils.distributed import Dist

    with pytest.raises(ConfigError, match="strategy must be one of ddp, fsdp"):
        make_strategy("deepspeed", Dist())
    assert make_strategy("fsdp", Dist()).sharded is False  # one process: the model as it is
    with pytest.raises(ConfigError, match="has no module that supports"):
        set_grad_checkpointing(torch.nn.Linear(2, 2))


def test_a_torn_shard_is_a_clear_error(tmp_path: Path) -> None:
    """A shard file lost or cut short: reading the weights and resuming both say which folder and what to do."""
    import torch.distributed.checkpoint as dcp

    from hymamba.engine.state import FORMAT, load_sharded

    folder = tmp_path / "sharded" / "epoch1-batch0"
    weights = {"w": torch.randn(4, 3)}
    dcp.save({"model": weights}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"format": FORMAT, "sharded": "sharded/epoch1-batch0"}, tmp_path / "last.pth")
    assert torch.equal(read_state_dict(tmp_path / "last.pth")["w"], weights["w"])  # whole, in one process
    for shard in folder.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="cannot read the sharded checkpoint .*(zip|central directory).*copy it again"):
        read_state_dict(tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match="cannot read the sharded training state .*best.pth"):
        load_sharded({"model": {"w": torch.zeros(4, 3)}}, folder)
