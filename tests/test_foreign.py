"""mmengine Runner checkpoints (the official dense weights): read with their foreign objects left inert.

Nothing a file names is imported or called: foreign classes become ``ForeignObject``s, hostile
``__reduce__`` payloads stay data, and damaged files raise CheckpointError.
"""
from __future__ import annotations

import io
import logging
import pickle
import sys
import textwrap
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hymamba.errors import CheckpointError
from hymamba.weights.foreign import ForeignObject, foreign_names, is_runner_checkpoint, read_inert
from hymamba.weights.io import read_file, read_state_dict
from hymamba.weights.metadata import read_checkpoint

CLASSES = ("sky", "tree", "road", "car", "person")
PALETTE = [[70, 130, 180], [107, 142, 35], [128, 64, 128], [0, 0, 142], [220, 20, 60]]


@pytest.fixture()
def upernet(fixtures: Path) -> Path:
    return fixtures / "upernet_tiny_a.pth"


# ----------------------------------------------------------------------------------------------
# the official fixture


def test_fixture_is_refused_by_plain_weights_only(upernet: Path) -> None:
    with pytest.raises(pickle.UnpicklingError):
        torch.load(upernet, weights_only=True)


def test_fixture_loads_tensors_classes_palette(upernet: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="hymamba"):
        ckpt = read_checkpoint(upernet)
    assert ckpt.meta["classes"] == list(CLASSES) and ckpt.meta["palette"] == PALETTE
    sd = ckpt.state_dict
    assert len(sd) == 208 and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert {k.split(".")[0] for k in sd} == {"backbone", "decode_head", "auxiliary_head"}
    assert sd["backbone.patch_embed.conv_down.0.weight"].shape == (8, 3, 3, 3)
    assert "mmengine.logging.history_buffer.HistoryBuffer" in caplog.text and "inert placeholders" in caplog.text
    assert read_state_dict(upernet).keys() == sd.keys()
    assert "mmengine" not in sys.modules


def test_fixture_message_hub_is_inert_data(upernet: Path) -> None:
    obj = read_file(upernet)
    buf = obj["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, ForeignObject) and buf.qualified_name() == "mmengine.logging.history_buffer.HistoryBuffer"
    assert isinstance(buf.state["_log_history"], np.ndarray)  # numpy values come back as numpy objects
    np.testing.assert_array_equal(buf.state["_log_history"], [0.75])
    assert buf.state["statistics_methods"]["min"].args[1] == "min"  # getattr(HistoryBuffer, 'min'): recorded
    assert obj["meta"]["dataset_meta"]["classes"] == CLASSES


def test_read_inert_reports_replaced_classes(upernet: Path) -> None:
    obj, replaced = read_inert(upernet)
    assert replaced == ["mmengine.logging.history_buffer.HistoryBuffer", "numpy._core.multiarray._reconstruct",
                        "numpy.ndarray", "numpy.dtype", "builtins.getattr"]
    # the numpy arrays were decoded from their bytes; what stays inert is mmengine's
    assert is_runner_checkpoint(obj)
    assert foreign_names(obj["message_hub"]) == {"mmengine.logging.history_buffer.HistoryBuffer", "builtins.getattr"}


# ----------------------------------------------------------------------------------------------
# generated mmengine-style files, with classes from a module that is gone or must never be imported

SD = {"backbone.w": torch.arange(6.0).reshape(2, 3), "decode_head.b": torch.ones(2, dtype=torch.float64)}


def _module(tmp_path: Path, marker: Path) -> object:
    """An importable module whose import, ``__setstate__`` and ``__reduce__`` would each touch ``marker``."""
    name = f"hymamba_throwaway_{abs(hash(str(tmp_path)))}"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(textwrap.dedent(f"""
        import os
        from collections import OrderedDict
        open({str(marker) + '.import'!r}, "w").close()

        class HistoryBuffer:
            def __init__(self, values):
                self._log_history = values
                self.max_length = 10
            def __setstate__(self, state):
                open({str(marker) + '.setstate'!r}, "w").close()
                self.__dict__.update(state)

        class ConfigDict(dict):  # a dict subclass (mmengine's ConfigDict is one)
            pass

        class Scalars(list):
            pass

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))

        class EvilEval:
            def __reduce__(self):
                return (eval, ("open({str(marker)!r}, 'w')",))
    """))
    sys.path.insert(0, str(tmp_path / "mods"))
    try:
        __import__(name)
    finally:
        sys.path.remove(str(tmp_path / "mods"))
    return sys.modules[name]


def _runner_file(tmp_path: Path, mod, where: str = "message_hub") -> Path:
    hub = {
        "log_scalars": {"train/loss": mod.HistoryBuffer(np.array([0.5, 0.25])),
                        "lr": mod.HistoryBuffer(np.array([1e-4], dtype=np.float32))},
        "runtime_info": {"iter": np.int64(100), "flag": np.bool_(True), "cfg": mod.ConfigDict(a=1, b=[1, 2]),
                         "seen": mod.Scalars([1, 2, 3]), "bytes": b"\x00\x01", "set": {1, 2}},
    }
    obj = {
        "meta": {"mmengine_version": "0.10.7", "dataset_meta": {"classes": CLASSES, "palette": PALETTE}},
        "state_dict": SD,
        "message_hub": hub,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "param_schedulers": [{"last_step": 100, "base_values": [1e-4]}],
    }
    evil = [mod.Evil(), mod.EvilEval()]
    if where == "message_hub":
        hub["runtime_info"]["payload"] = evil
    elif where == "state_dict":
        obj["state_dict"] = dict(SD, payload=evil)
    else:
        obj[where] = evil
    path = tmp_path / "runner.pth"
    torch.save(obj, path)
    return path


@pytest.fixture()
def armed(tmp_path: Path):
    """(module, marker): the throwaway module imported once to save with, then forgotten."""
    marker = tmp_path / "pwned"
    mod = _module(tmp_path, marker)
    Path(str(marker) + ".import").unlink()
    yield mod, marker
    sys.modules.pop(mod.__name__, None)


def _forget(mod) -> None:
    del sys.modules[mod.__name__]


def _nothing_ran(marker: Path, mod) -> None:
    assert not list(marker.parent.glob(marker.name + "*")), list(marker.parent.glob(marker.name + "*"))
    assert mod.__name__ not in sys.modules


def test_generated_runner_checkpoint_loads_inert(tmp_path: Path, armed, caplog) -> None:
    mod, marker = armed
    path = _runner_file(tmp_path, mod)
    _forget(mod)
    sys.path.insert(0, str(tmp_path / "mods"))  # importable: still never imported
    try:
        with caplog.at_level(logging.INFO, logger="hymamba"):
            ckpt = read_checkpoint(path)
            obj = read_file(path)
    finally:
        sys.path.remove(str(tmp_path / "mods"))
    _nothing_ran(marker, mod)
    assert ckpt.meta["classes"] == list(CLASSES) and ckpt.meta["palette"] == PALETTE
    assert ckpt.state_dict.keys() == SD.keys()
    for k, v in SD.items():
        assert torch.equal(ckpt.state_dict[k], v) and ckpt.state_dict[k].dtype == v.dtype
    assert f"{mod.__name__}.HistoryBuffer" in caplog.text and "posix.system" in caplog.text
    hub = obj["message_hub"]
    buf = hub["log_scalars"]["train/loss"]
    assert buf.qualified_name() == f"{mod.__name__}.HistoryBuffer" and buf.state["max_length"] == 10
    np.testing.assert_array_equal(buf.state["_log_history"], [0.5, 0.25])
    assert hub["log_scalars"]["lr"].state["_log_history"].dtype == np.float32
    info = hub["runtime_info"]
    assert info["iter"] == 100 and isinstance(info["iter"], np.int64) and info["flag"] == np.True_
    assert info["cfg"].dict_items == {"a": 1, "b": [1, 2]} and info["seen"].list_items == [1, 2, 3]
    assert info["bytes"] == b"\x00\x01" and info["set"] == {1, 2}
    system, evaluated = info["payload"]
    assert system.qualified_name() == "posix.system" and system.args == (f"touch {marker}",)
    assert evaluated.qualified_name() == "builtins.eval"
    assert torch.equal(obj["optimizer"]["state"][0]["exp_avg"], torch.zeros(3))


@pytest.mark.parametrize("where", ["state_dict", "state_dict_sibling", "args"])
def test_foreign_objects_outside_the_bookkeeping_are_refused(tmp_path: Path, armed, where: str) -> None:
    mod, marker = armed
    path = _runner_file(tmp_path, mod, where=where)
    _forget(mod)
    with pytest.raises(CheckpointError, match="allow-list"):
        read_checkpoint(path)
    _nothing_ran(marker, mod)


def test_foreign_objects_in_a_plain_file_are_still_refused(tmp_path: Path, armed) -> None:
    mod, marker = armed
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": SD, "message_hub": {"x": mod.Evil()}}, path)  # no meta: not a Runner checkpoint
    _forget(mod)
    with pytest.raises(CheckpointError, match="allow-list"):
        read_state_dict(path)
    obj, replaced = read_inert(path)  # the inert reader itself reads it, and runs nothing
    assert replaced == ["posix.system"] and not is_runner_checkpoint(obj)
    _nothing_ran(marker, mod)


def test_big_endian_archive(tmp_path: Path, armed) -> None:
    """A file written on a big-endian machine (its byteorder record says 'big') is byte-swapped."""
    mod, marker = armed
    sd = {"a": torch.randn(5, dtype=torch.float64), "b": torch.arange(4, dtype=torch.float64)}
    src = tmp_path / "little.pth"
    torch.save({"meta": {}, "state_dict": sd, "message_hub": {"x": mod.HistoryBuffer([1])}}, src)
    _forget(mod)
    with zipfile.ZipFile(src) as z:
        records = {n: z.read(n) for n in z.namelist()}
    for name, data in records.items():
        if name.endswith("/byteorder"):
            records[name] = b"big"
        elif name.split("/")[-2:-1] == ["data"]:  # the storages: all float64 here
            records[name] = np.frombuffer(data, dtype="<f8").astype(">f8").tobytes()
    path = tmp_path / "big.pth"
    path.write_bytes(_zip(records))
    loaded = read_checkpoint(path).state_dict
    for k, v in sd.items():
        assert torch.equal(loaded[k], v)
    _nothing_ran(marker, mod)


# ----------------------------------------------------------------------------------------------
# damaged files


def test_truncated_and_random_files_raise(tmp_path: Path, upernet: Path) -> None:
    data = upernet.read_bytes()
    rng = np.random.default_rng(0)
    cases = {f"cut{n}": data[:n] for n in (10, 200, len(data) // 3, len(data) // 2, len(data) - 30)}
    cases["random"] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cases["zip_of_nothing"] = _zip({"a.txt": b"hello"})
    for name, content in cases.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(content)
        with pytest.raises(CheckpointError):
            read_checkpoint(path)
        with pytest.raises(CheckpointError):
            read_inert(path)


def test_damaged_records_raise(tmp_path: Path, upernet: Path) -> None:
    with zipfile.ZipFile(upernet) as z:
        records = {n: z.read(n) for n in z.namelist()}
    prefix = next(n for n in records if n.endswith("/data.pkl")).rsplit("/", 1)[0]
    first = f"{prefix}/data/0"
    variants = {
        "missing_storage": {k: v for k, v in records.items() if k != first},
        "short_storage": {**records, first: records[first][:-3]},
        "bad_byteorder": {**records, f"{prefix}/byteorder": b"middle"},
        "cut_pickle": {**records, f"{prefix}/data.pkl": records[f"{prefix}/data.pkl"][:-100]},
    }
    for name, recs in variants.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(_zip(recs))
        with pytest.raises(CheckpointError):
            read_inert(path)
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_flipped_bytes_never_escape(tmp_path: Path, upernet: Path) -> None:
    data = bytearray(upernet.read_bytes())
    rng = np.random.default_rng(1)
    for i in range(20):
        damaged = bytearray(data)
        for where in rng.integers(0, len(data), 3):
            damaged[where] = int(rng.integers(0, 256))
        path = tmp_path / f"flip{i}.pth"
        path.write_bytes(bytes(damaged))
        try:
            sd = read_checkpoint(path).state_dict
        except CheckpointError as e:
            assert str(e) and "Traceback" not in str(e)
            continue
        assert all(isinstance(v, torch.Tensor) for v in sd.values())


def _zip(records: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_foreign_object_records_without_running() -> None:
    cls = type("X", (ForeignObject,), {"__slots__": (), "foreign_module": "m", "foreign_name": "X"})
    obj = cls(1, k=2)
    obj.__setstate__({"s": 1})
    obj["a"] = 1
    obj.append(3)
    recorded = (obj.args, obj.kwargs, obj.state, obj.dict_items, obj.list_items)
    assert recorded == ((1,), {"k": 2}, {"s": 1}, {"a": 1}, [3])
    assert repr(obj) == "<inert m.X>" and not callable(obj)


def _pickle_zip(tmp_path: Path, pkl: bytes) -> Path:
    path = tmp_path / "crafted.pth"
    path.write_bytes(_zip({"crafted/data.pkl": pkl, "crafted/byteorder": b"little"}))
    return path


def _build(target: bytes, attribute: str, value: bytes) -> bytes:
    """Pickle opcodes: push the global ``target``, then BUILD it with slot state {attribute: value}."""
    name = attribute.encode()
    return (b"c" + target + b"N}X" + len(name).to_bytes(4, "little") + name + value + b"s\x86b")


def test_shared_torch_objects_cannot_be_altered(tmp_path: Path) -> None:
    """pickle's BUILD on torch's allowed globals (shared, process-wide) only ever reaches per-load copies."""
    from torch import _weights_only_unpickler as wo

    rebuild_defaults = torch._utils._rebuild_tensor_v2.__defaults__
    most_common = Counter.most_common
    outcomes = []
    attacks = [
        _build(b"torch\nFloatStorage\n", "dtype", b"ctorch\nint8\n"),
        _build(b"torch\nFloatStorage\n", "_dtype", b"ctorch\nint8\n").replace(b"N}X", b"}X").replace(b"s\x86b", b"sb"),
        _build(b"collections\nCounter\n", "most_common", b"N"),
        _build(b"torch._utils\n_rebuild_tensor_v2\n", "__defaults__", b"(K\x01t"),
        _build(b"torch\nSize\n", "x", b"N"),
    ]
    for attack in attacks:
        pkl = b"\x80\x02}(X\x04\x00\x00\x00metaq\x00}X\x0b\x00\x00\x00message_hub]" + attack + b"au."
        try:
            obj, _ = read_inert(_pickle_zip(tmp_path, pkl))
            outcomes.append(type(obj["message_hub"][0]).__name__)
        except CheckpointError as e:  # refused: fine too
            outcomes.append(str(e).split("(")[-1])
    # BUILD reached per-load copies (a storage kind, fresh functions) or failed on an immutable class
    assert outcomes[0] == "_StorageKind" and "AttributeError" in outcomes[1], outcomes
    assert outcomes[2:4] == ["function", "function"] and "TypeError" in outcomes[4], outcomes
    assert wo._get_allowed_globals()["torch.FloatStorage"].dtype is torch.float32
    assert Counter.most_common is most_common and not hasattr(torch.Size, "x")
    assert torch._utils._rebuild_tensor_v2.__defaults__ == rebuild_defaults
    path = tmp_path / "plain.pth"
    torch.save({"w": torch.arange(4.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))


def test_numpy_dtype_with_flags_stays_inert(tmp_path: Path) -> None:
    """A numpy dtype state claiming object items (flags) is never handed to numpy: it stays a record."""
    arr = pickle.dumps(np.array([1.0, 2.0]), protocol=2)
    assert b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t" in arr
    crafted = arr.replace(b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ft")
    body = crafted[2:-1]  # without PROTO and STOP
    pkl = b"\x80\x02}(X\x04\x00\x00\x00meta}X\x0b\x00\x00\x00message_hub" + body + b"u."
    obj, _ = read_inert(_pickle_zip(tmp_path, pkl))
    assert isinstance(obj["message_hub"], ForeignObject)  # not decoded
    good = b"\x80\x02}(X\x04\x00\x00\x00meta}X\x0b\x00\x00\x00message_hub" + arr[2:-1] + b"u."
    obj, _ = read_inert(_pickle_zip(tmp_path, good))
    np.testing.assert_array_equal(obj["message_hub"], [1.0, 2.0])
