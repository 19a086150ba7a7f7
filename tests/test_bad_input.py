"""Bad input, case by case: every reader of an untrusted file (checkpoints, Hugging Face folders,
training checkpoints, YAML configs) raises one of our errors with a message that names the file,
says what it is not and what to do; files hymamba writes get the user's usual permissions; the CLI
answers a bad config with one line and exit status 2. (Random inputs: ``test_fuzz.py``.)"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import random
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from hymamba.errors import CheckpointError, ConfigError
from hymamba.tasks.classification import ClassificationConfig
from hymamba.utils.io import atomic_write_bytes
from hymamba.weights.io import read_state_dict, save_safetensors
from hymamba.weights.metadata import read_checkpoint
from hymamba.engine.state import load_train_state

REPO = Path(__file__).resolve().parents[1]
SD = {"a.weight": torch.randn(4, 3), "b.bias": torch.arange(5)}
SUFFIXES = (".pth", ".pth.tar", ".bin", ".safetensors")


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _message(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    return str(err.value)


# ----------------------------------------------------------------------------------------------
# checkpoints: empty, random, truncated files


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_file_says_it_is_empty(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    path.write_bytes(b"")
    msg = _message(path)
    kind = "safetensors file" if suffix == ".safetensors" else "PyTorch checkpoint"
    assert f"{path} is not a {kind}: it is empty (0 bytes)" in msg  # before: an empty message


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_random_bytes_are_corrupt_not_foreign_objects(tmp_path: Path, suffix: str) -> None:
    rng = random.Random(suffix)
    for i in range(20):
        path = tmp_path / f"r{i}{suffix}"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        msg = _message(path)
        assert str(path) in msg and "allow-list" not in msg  # before: "objects outside the allow-list"
        assert "the data is corrupt or in another format (" in msg, msg
        assert "\n" not in msg


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_truncation_of_a_real_checkpoint(tmp_path: Path, legacy: bool) -> None:
    data = _torch_bytes({"state_dict": SD, "args": argparse.Namespace(lr=0.1)}, legacy=legacy)
    path = tmp_path / "t.pth.tar"
    for n in range(1, len(data), 1 if legacy else 7):  # before: IndexError / KeyError from some lengths
        path.write_bytes(data[:n])
        msg = _message(path)
        assert "the data is corrupt or in another format" in msg and "allow-list" not in msg, (n, msg)


def test_error_message_is_short_and_gives_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(_torch_bytes(SD)[:100])
    msg = _message(path)
    assert "(RuntimeError: PytorchStreamReader failed reading zip archive" in msg
    assert "miniz" not in msg and len(msg) < 400
    path.write_bytes(_torch_bytes(SD, legacy=True)[:20])
    assert "(EOFError: the file ends too early)" in _message(path)


def test_hints_for_files_that_are_something_else(tmp_path: Path) -> None:
    (tmp_path / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    assert "Git LFS pointer" in _message(tmp_path / "lfs.pth")
    (tmp_path / "page.pth.tar").write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    assert "HTML page" in _message(tmp_path / "page.pth.tar")
    (tmp_path / "st.pth").write_bytes(save(SD))
    assert "give it the .safetensors extension" in _message(tmp_path / "st.pth")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
@pytest.mark.timeout(60)
def test_a_named_pipe_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    assert "not a regular file" in _message(fifo)
    with pytest.raises(ConfigError, match="config file not found"):
        ClassificationConfig.build(config_file=fifo)


# ----------------------------------------------------------------------------------------------
# checkpoints: hostile pickles


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["pickle2", "pickle4", "pickle5", "torch_zip", "torch_legacy"])
@pytest.mark.parametrize("payload", [_System, _Open, _Eval])
def test_hostile_pickles_are_refused_and_never_run(tmp_path: Path, how: str, payload) -> None:
    marker = tmp_path / "pwned"
    obj = {"state_dict": SD, "payload": payload(marker)}
    if how.startswith("pickle"):
        data = pickle.dumps(obj, protocol=int(how[-1]))
    else:
        data = _torch_bytes(obj, legacy=how == "torch_legacy")
    path = tmp_path / "evil.pth.tar"
    path.write_bytes(data)
    msg = _message(path)
    assert "allow-list" in msg and any(f in msg for f in ("system", "open", "eval")), msg
    with pytest.raises(CheckpointError, match="allow-list"):
        read_checkpoint(path)
    assert not marker.exists()


def test_allowed_objects_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.pth.tar"
    path.write_bytes(_torch_bytes({"state_dict": SD, "args": argparse.Namespace(model="x")}, legacy=True))
    assert set(read_state_dict(path)) == set(SD)


# ----------------------------------------------------------------------------------------------
# checkpoints: safetensors headers that lie


def _st(header, data: bytes = b"", length=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


@pytest.mark.parametrize("data", [
    _st({}, length=2 ** 63),                                                   # huge header length
    _st({"a": F32}, b"\0" * 4, length=10_000),                                 # header longer than the file
    _st({"a": dict(F32, shape=[4], data_offsets=[0, 16])}, b"\0" * 4),         # offsets past the end
    _st({"a": dict(F32, shape=[2])}, b"\0" * 4),                               # shape disagrees with offsets
    _st({"a": F32, "b": F32}, b"\0" * 4),                                      # overlapping tensors
    _st({"a": dict(F32, shape=[2 ** 62, 2 ** 62])}, b"\0" * 4),                # overflowing size
    _st({"a": dict(F32, dtype="Q99")}, b"\0" * 4),                             # unknown dtype
    _st([1, 2]),                                                               # header not an object
    _st(b"{not json"),                                                         # header not JSON
    _st({"a": F32}, b"\0" * 12),                                               # trailing bytes
    save(SD)[:-3],                                                             # truncated
], ids=["huge-length", "length-past-end", "offsets-past-end", "shape", "overlap", "overflow", "dtype",
        "not-object", "not-json", "trailing", "truncated"])
def test_safetensors_header_lies(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    msg = _message(path)
    assert f"{path} is not a safetensors file: the data is corrupt or in another format (SafetensorError" in msg


# ----------------------------------------------------------------------------------------------
# checkpoints: contents that are not a state dict


@pytest.mark.parametrize("obj, message", [
    ({1: "a", "b": 2}, "has no tensors: top-level keys are"),            # before: TypeError sorting mixed keys
    ({"state_dict": {"a": torch.ones(1), "b": 3}}, "maps 'b' to a int, expected a tensor"),
    ({"state_dict": {1: torch.ones(1)}}, "has the key 1 (int), expected parameter names"),
    ([torch.ones(1)], "holds a list, expected a dict of tensors"),
])
def test_contents_that_are_not_a_state_dict(tmp_path: Path, obj, message: str) -> None:
    path = tmp_path / "c.pth"
    torch.save(obj, path)
    assert message in _message(path)


def test_use_ema_lists_mixed_keys(tmp_path: Path) -> None:
    torch.save({1: "x", "state_dict": SD}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        read_state_dict(tmp_path / "c.pth", use_ema=True)


# ----------------------------------------------------------------------------------------------
# Hugging Face folders and the metadata beside weights


def _hf(tmp_path: Path, config: str | bytes, weights: bytes | None = None) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(config.encode() if isinstance(config, str) else config)
    (folder / "model.safetensors").write_bytes(save({f"model.{k}": v for k, v in SD.items()}) if weights is None
                                              else weights)
    return folder


@pytest.mark.parametrize("config, message", [
    ("{not json", "config.json beside the weights is not valid JSON (JSONDecodeError"),
    (b"\xff\xfe{}", "is not valid JSON (UnicodeDecodeError"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON (RecursionError"),          # before: RecursionError
    ('{"a": ' + "1" * 5000 + "}", "is not valid JSON (ValueError"),              # before: ValueError
    ("[1, 2]", "should hold a JSON object of metadata, found a list"),
    ('"text"', "should hold a JSON object of metadata, found a str"),
    ('{"mean": "red"}', "metadata entry 'mean' should be a list of 3 numbers, found 'red'"),
    ('{"input_size": [3, 224]}', "metadata entry 'input_size' should be a list of 3 positive whole numbers"),
    ('{"crop_pct": "0.9"}', "metadata entry 'crop_pct' should be a positive number"),
    ('{"id2label": ["cat"]}', "metadata entry 'id2label' should be an object"),
])
def test_hf_config_json_that_cannot_be_used(tmp_path: Path, config, message: str) -> None:
    folder = _hf(tmp_path, config)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(folder)
    assert message in str(err.value) and str(folder / "config.json") in str(err.value)


def test_hf_folder_with_corrupt_weights(tmp_path: Path) -> None:
    folder = _hf(tmp_path, '{"model_type": "mambavision"}', weights=b"\x08\x00\x00\x00\x00\x00\x00\x00{}junk")
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file: the data is corrupt"):
        read_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is not a PyTorch checkpoint: it is empty \(0 bytes\)"):
        read_checkpoint(folder)


def test_hf_folder_good_config_reads(tmp_path: Path) -> None:
    folder = _hf(tmp_path, json.dumps({"mean": [0.5] * 3, "std": [0.2] * 3, "input_size": [3, 64, 64],
                                       "crop_pct": 0.9, "id2label": {"0": "cat"}}))
    ckpt = read_checkpoint(folder)
    assert set(ckpt.state_dict) == set(SD) and ckpt.meta["crop_pct"] == 0.9


def test_damaged_training_state_metadata(tmp_path: Path) -> None:
    torch.save({"format": "hymamba-train-state-v1", "model": SD, "architecture": [1, 2]}, tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match="damaged training checkpoint: its 'architecture' entry"):
        read_checkpoint(tmp_path / "last.pth")  # before: TypeError from dict(**[1, 2])
    torch.save({"format": "hymamba-train-state-v1", "model": SD, "data_config": {"mean": "x"}},
               tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match="metadata entry 'mean'"):
        read_checkpoint(tmp_path / "last.pth")


# ----------------------------------------------------------------------------------------------
# training checkpoints (--resume)


def _good_state() -> dict:
    return {"format": "hymamba-train-state-v1", "model": SD, "optimizer": {}, "scheduler": {},
            "config": {"epochs": 2}, "epoch": 1, "batches_done": 0, "global_step": 3, "history": [],
            "wall_seconds": 1.5, "world_size": 1, "ranks": []}


def test_load_train_state_reads_a_good_state(tmp_path: Path) -> None:
    torch.save(_good_state(), tmp_path / "last.pth")
    state = load_train_state(tmp_path)
    assert state["epoch"] == 1 and state["path"] == str(tmp_path / "last.pth")


@pytest.mark.parametrize("content, error, message", [
    (b"", CheckpointError, r"last.pth is not a PyTorch checkpoint: it is empty \(0 bytes\)"),
    (b"\x80\x02garbage", CheckpointError, "last.pth is not a PyTorch checkpoint: the data is corrupt"),
    ("truncated", CheckpointError, "the data is corrupt or in another format"),
    ("weights", ConfigError, "is not a hymamba training checkpoint .* use --checkpoint instead of --resume"),
    ("no-epoch", CheckpointError, "damaged training checkpoint: its 'epoch' entry should be int, found nothing"),
    ("bad-config", CheckpointError, "damaged training checkpoint: its 'config' entry should be dict, found list"),
    ("evil", CheckpointError, "allow-list"),
])
def test_load_train_state_errors(tmp_path: Path, content, error, message: str) -> None:
    path = tmp_path / "last.pth"
    if content == "truncated":
        content = _torch_bytes(_good_state())[:-50]
    elif content == "weights":
        content = _torch_bytes({"state_dict": SD})
    elif content == "no-epoch":
        content = _torch_bytes({k: v for k, v in _good_state().items() if k != "epoch"})
    elif content == "bad-config":
        content = _torch_bytes(dict(_good_state(), config=[1]))
    elif content == "evil":
        content = pickle.dumps(dict(_good_state(), x=_Open(tmp_path / "pwned")))
    path.write_bytes(content)
    with pytest.raises(error, match=message) as err:
        load_train_state(tmp_path)
    assert "Weights only load failed" not in str(err.value)  # before: torch's paragraph of advice
    assert not (tmp_path / "pwned").exists()


def test_load_train_state_nothing_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        load_train_state(tmp_path)


# ----------------------------------------------------------------------------------------------
# file permissions of what hymamba writes


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_usual_mode(tmp_path: Path, mask: int) -> None:
    with _umask(mask):
        st_path = save_safetensors(SD, tmp_path / "out" / "model.safetensors")  # before: 0600 whatever the umask
        raw = atomic_write_bytes(tmp_path / "out" / "model.json", b"{}")
        (tmp_path / "out" / "plain.txt").write_text("x")  # what any file the user writes gets
        raw.chmod(0o600)
        again = atomic_write_bytes(raw, b"{}\n")  # replacing a file: the new file's mode, as for a new one
    expected = 0o666 & ~mask
    for path in (st_path, again, tmp_path / "out" / "plain.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.json", "model.safetensors", "plain.txt"]


# ----------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("text, message", [
    ("batch_size: null\n", r"option batch_size cannot be null: expected a whole number; remove it to keep the "
                           r"default \(64\)"),
    ("model_ema: null\n", "option model_ema cannot be null: expected true or false"),
    ("epochs: [1\n", "could not read the config file .*line 1"),
    ("- lr\n- 0.1\n", r"must hold option: value lines \(a YAML mapping\), found a list \['lr', 0.1\]"),
    ("42\n", "must hold option: value lines .* found a number 42"),
    ("0\n", "must hold option: value lines .* found a number 0"),
    ("just text\n", "must hold option: value lines .* found text 'just text'"),
    ("1: 2\n", "option names must be text, found a number 1"),
    ("true: 2\n", "option names must be text, found a boolean true"),
    ("scale: [a, b]\n", r"option scale needs 2 numbers, got \['a', 'b'\]: 'a' is not a number"),
    ("scale: [0.5]\n", r"option scale needs 2 numbers, got \[0.5\]"),
    ("scale: 0.5\n", "option scale needs 2 numbers, got 0.5"),
    ("epochs: ten\n", "option epochs must be a number, got 'ten'"),
    ("epochs: 2.5\n", "option epochs must be a whole number, got 2.5"),
    ("epochs: true\n", "option epochs must be a number, got true"),
    ("amp: 1\n", "option amp must be true or false, got 1"),
    ("model: [a]\n", r"option model must be text, got \['a'\]"),
    ("aa: off\n", "option aa must be text, got false .*quote the text"),
    ("lr: !!python/object/apply:os.system [echo]\n", "could not read the config file .*constructor"),
    ("epochs: " + "1" * 5000 + "\n", "could not read the config file .*too many digits"),
    ("scale: " + "[" * 3000 + "]" * 3000 + "\n", "could not read the config file .*nest too deeply"),
])
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        ClassificationConfig.build(config_file=path)
    assert "\n" not in str(err.value)


def test_config_file_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="could not read the config file .*utf-8"):
        ClassificationConfig.build(config_file=tmp_path / "c.yaml")


@pytest.mark.timeout(60)
def test_config_alias_bomb_is_quick(tmp_path: Path) -> None:
    # nine levels of nine aliases: 9**9 leaves if anything walked it (before: the error message's repr did)
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp_path / "c.yaml").write_text(f"scale: [{', '.join(items)}]\n")
    with pytest.raises(ConfigError, match=r"option scale needs 2 numbers, got \[\[") as err:
        ClassificationConfig.build(config_file=tmp_path / "c.yaml")
    assert len(str(err.value)) < 400
    (tmp_path / "e.yaml").write_text("# only a comment\n")  # an empty mapping: the defaults
    assert ClassificationConfig.build(config_file=tmp_path / "e.yaml") == ClassificationConfig()


def test_config_values_in_their_usual_spellings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nepochs: '3'\nwarmup_epochs: 0\noutput: 2024\nscale: [0.5, 1]\nval_batch_size: null\n")
    cfg = ClassificationConfig.build(config_file=path)
    assert (cfg.lr, cfg.epochs, cfg.output, cfg.scale, cfg.val_batch_size) == (1e-3, 3, "2024", (0.5, 1.0), None)
    assert type(cfg.warmup_epochs) is float and type(cfg.scale[1]) is float


def test_null_from_a_flag_or_a_resumed_config() -> None:
    with pytest.raises(ConfigError, match="^option batch_size cannot be null"):
        ClassificationConfig.build(overrides={"batch_size": None})
    with pytest.raises(ConfigError, match="^resumed checkpoint: option epochs must be a number"):
        ClassificationConfig.build(base={"epochs": "x"})


@pytest.mark.parametrize("text", [
    "batch_size: null\n",          # before: a TypeError traceback from the checks
    "epochs: [1\n",
    "- a\n- b\n",
    "1: 2\n",
    "scale: [a, b]\n",
])
def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path, text: str) -> None:
    path, out = tmp_path / "c.yaml", tmp_path / "out"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "hymamba.cli", "train", "--config", str(path), "--output", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hymamba: error:"), proc.stderr
    assert not out.exists()


def test_cli_corrupt_resume_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pth").write_bytes(_torch_bytes(_good_state())[:200])
    proc = subprocess.run([sys.executable, "-m", "hymamba.cli", "train", "--resume", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "last.pth is not a PyTorch checkpoint: the data is corrupt" in lines[0], proc.stderr
