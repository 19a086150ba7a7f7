"""Property-based tests (hypothesis) of every reader of untrusted files.

Property: given any bytes — random, a real file cut short, a real file with bytes changed — a reader
returns what it promises (a dict of tensors, a config) or raises one of our errors
(:class:`~hymamba.errors.CheckpointError`, :class:`~hymamba.errors.ConfigError`); never another
exception, never a hang (``pytest-timeout``), never running anything the file asks for. Kept fast
(tens of examples per property); cases found once live on in ``test_bad_input.py``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from hymamba.engine.state import load_train_state
from hymamba.errors import CheckpointError, ConfigError
from hymamba.tasks.classification import ClassificationConfig
from hymamba.weights.io import read_state_dict
from hymamba.weights.metadata import read_checkpoint

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official" / "tiny_a.pth.tar"
SUFFIXES = (".pth", ".pth.tar", ".bin", ".safetensors")
SD = {"patch_embed.weight": torch.randn(4, 3), "head.bias": torch.arange(5), "x": torch.ones(2, dtype=torch.half)}

FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _seeds() -> dict:
    """Real files to cut and mutate: name (its suffix picks the reader) -> bytes."""
    seeds = {
        "zip.pth": _torch_bytes({"state_dict": SD, "args": argparse.Namespace(lr=0.1), "epoch": 3}),
        "legacy.pth.tar": _torch_bytes({"state_dict": SD, "args": argparse.Namespace(lr=0.1)}, legacy=True),
        "model.safetensors": save(SD, metadata={"format": "pt"}),
    }
    if FIXTURE.is_file():
        seeds["official.pth.tar"] = FIXTURE.read_bytes()
    return seeds


SEEDS = _seeds()


def _read_ok_or_ours(path: Path) -> None:
    """The property for weights readers: a dict of name -> tensor, or CheckpointError."""
    for read in (read_state_dict, lambda p: read_checkpoint(p).state_dict):
        try:
            sd = read(path)
        except CheckpointError as e:
            assert str(e) and "Traceback" not in str(e)
            continue
        assert isinstance(sd, dict)
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


# ----------------------------------------------------------------------------------------------
# weights files


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    path.write_bytes(data)
    _read_ok_or_ours(path)


@pytest.mark.timeout(120)
@FUZZ
@given(name=st.sampled_from(sorted(SEEDS)), fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_real_files(tmp_path: Path, name: str, fraction: float) -> None:
    data = SEEDS[name]
    path = tmp_path / name
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(CheckpointError):  # a cut file is never mistaken for a whole one
        read_state_dict(path)
    _read_ok_or_ours(path)


@pytest.mark.timeout(120)
@FUZZ
@given(name=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12))
def test_mutated_real_files(tmp_path: Path, name: str, edits) -> None:
    data = bytearray(SEEDS[name])
    for where, value in edits:
        data[int(len(data) * where)] = value
    path = tmp_path / name
    path.write_bytes(bytes(data))
    _read_ok_or_ours(path)


@pytest.mark.timeout(120)
@FUZZ
@given(header=st.binary(max_size=200), length=st.integers(0, 2 ** 64 - 1) | st.integers(0, 300))
def test_safetensors_header_of_any_length(tmp_path: Path, header: bytes, length: int) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + header)
    _read_ok_or_ours(path)


class _Touch:
    """A pickle payload that would create ``marker`` if anything ever unpickled it for real."""

    def __init__(self, marker: str, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "eval":
            return (eval, (f"open({self.marker!r}, 'w')",))
        return (open, (self.marker, "w"))


@pytest.mark.timeout(120)
@FUZZ
@given(how=st.sampled_from(["system", "eval", "open"]),
       fmt=st.sampled_from(["pickle2", "pickle4", "pickle5", "torch_zip", "torch_legacy"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=3),
       suffix=st.sampled_from((".pth", ".pth.tar", ".bin")))
def test_hostile_pickles_never_run(tmp_path: Path, how: str, fmt: str, edits, suffix: str) -> None:
    marker = tmp_path / "pwned"
    obj = {"state_dict": SD, "payload": _Touch(str(marker), how)}
    if fmt.startswith("pickle"):
        data = bytearray(pickle.dumps(obj, protocol=int(fmt[-1])))
    else:
        data = bytearray(_torch_bytes(obj, legacy=fmt == "torch_legacy"))
    for where, value in edits:  # damaged hostile files too: still refused, still never run
        data[int(len(data) * where)] = value
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(bytes(data))
    if not edits:
        with pytest.raises(CheckpointError, match="outside the allow-list"):
            read_state_dict(path)
    _read_ok_or_ours(path)
    with pytest.raises((CheckpointError, ConfigError)):
        load_train_state(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# training checkpoints


_GOOD_STATE = {"format": "hymamba-train-state-v1", "model": SD, "optimizer": {}, "scheduler": {},
               "config": {"epochs": 2}, "epoch": 1, "batches_done": 0, "global_step": 3, "history": [],
               "wall_seconds": 1.5, "world_size": 1, "ranks": []}
_STATE_BYTES = _torch_bytes(_GOOD_STATE)
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                            max_leaves=12)


@pytest.mark.timeout(120)
@FUZZ
@given(cut=st.floats(0, 1), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                           max_size=6))
def test_damaged_training_checkpoints(tmp_path: Path, cut: float, edits) -> None:
    data = bytearray(_STATE_BYTES[:max(1, int(len(_STATE_BYTES) * cut))])
    for where, value in edits:
        data[int(len(data) * where)] = value
    (tmp_path / "last.pth").write_bytes(bytes(data))
    try:
        state = load_train_state(tmp_path)
    except (CheckpointError, ConfigError):
        return
    assert state["format"] == "hymamba-train-state-v1" and isinstance(state["epoch"], int)


@pytest.mark.timeout(120)
@FUZZ
@given(entries=st.dictionaries(st.sampled_from(sorted(_GOOD_STATE)), _json_values, max_size=4))
def test_training_checkpoints_with_wrong_entries(tmp_path: Path, entries: dict) -> None:
    torch.save(dict(_GOOD_STATE, **entries), tmp_path / "last.pth")
    try:
        state = load_train_state(tmp_path)
    except (CheckpointError, ConfigError):
        return
    assert isinstance(state["config"], dict) and isinstance(state["ranks"], list)


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json


def _hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    if not (folder / "model.safetensors").exists():
        (folder / "model.safetensors").write_bytes(save({f"model.{k}": v for k, v in SD.items()}))
    return folder


_meta_keys = st.sampled_from(["mean", "std", "input_size", "crop_pct", "crop_mode", "interpolation", "id2label",
                              "class_names", "mixer_variant", "attention_pattern", "model_type"]) | st.text(max_size=8)


@pytest.mark.timeout(120)
@FUZZ
@given(config=_json_values | st.dictionaries(_meta_keys, _json_values, max_size=5))
def test_hf_config_json_any_json(tmp_path: Path, config) -> None:
    folder = _hf_folder(tmp_path)
    (folder / "config.json").write_text(json.dumps(config))
    try:
        ckpt = read_checkpoint(folder)
    except CheckpointError:
        return
    assert isinstance(ckpt.meta, dict) and set(ckpt.state_dict) == set(SD)


@pytest.mark.timeout(120)
@FUZZ
@given(text=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_hf_config_json_any_bytes(tmp_path: Path, text: bytes) -> None:
    folder = _hf_folder(tmp_path)
    (folder / "config.json").write_bytes(text)
    try:
        read_checkpoint(folder)
    except CheckpointError:
        pass


# ----------------------------------------------------------------------------------------------
# YAML configs

_FIELDS = sorted(ClassificationConfig.fields())
_yaml_scalars = (st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats()
                 | st.text(max_size=12) | st.sampled_from(["1e-3", "0x10", "yes", "off", "~", ".nan", "2024-01-01"]))
_yaml_values = st.recursive(_yaml_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                             c, max_size=3),
                            max_leaves=8)


def _build(path: Path) -> None:
    try:
        cfg = ClassificationConfig.build(config_file=path)
    except ConfigError as e:
        assert str(e) and len(str(e)) < 600
        return
    assert isinstance(cfg, ClassificationConfig)
    fields = ClassificationConfig.fields()
    for name in ClassificationConfig.load_yaml(path):  # every value read has its field's type
        value, f = getattr(cfg, name), fields[name]
        kind, length = ClassificationConfig.field_type(f)
        if value is None:
            assert ClassificationConfig.field_optional(f), name
        elif length:
            assert isinstance(value, tuple) and len(value) == length and all(type(v) is kind for v in value), name
        else:
            assert type(value) is kind, (name, value)


@pytest.mark.timeout(120)
@FUZZ
@given(values=st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6) | st.integers(), _yaml_values,
                              max_size=5))
def test_config_yaml_any_values(tmp_path: Path, values: dict) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True))
    _build(path)


@pytest.mark.timeout(120)
@FUZZ
@given(text=st.text(max_size=300) | st.lists(st.sampled_from(_FIELDS + ["- ", ": ", "[", "]", "{", "}", "&a ", "*a",
                                                                       "!!python/object:os.system ", "\n", "  ",
                                                                       "null", "1e-3", "'", '"', "#", "---\n"]),
                                              max_size=40).map("".join))
def test_config_yaml_any_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:  # lone surrogates: not writable as UTF-8
        assume(False)
    _build(path)


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.binary(max_size=300))
def test_config_yaml_any_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    _build(path)
