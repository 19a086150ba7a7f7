"""Reading weight files safely: official ``.pth.tar``, official Hugging Face folders, safetensors.

Model-agnostic: nothing here imports a model (loading into a model is :mod:`hymamba.weights.load`,
the metadata beside weights :mod:`hymamba.weights.metadata`). Nothing here touches the network.
Pickled files are read with ``torch.load(weights_only=True)`` and an explicit allow-list (only ``argparse.Namespace``, which the official training script stores
as ``args``); anything else in a pickle is refused, never executed. The one exception is an mmengine Runner
checkpoint (the official dense weights): a torch.save zip whose foreign objects (``message_hub``'s
``HistoryBuffer``s, ...) sit only in its bookkeeping is read by :mod:`hymamba.weights.foreign`, which
leaves them inert (never imported, never run).
"""
from __future__ import annotations

import argparse
import io
import logging
import mmap
import os
import pickle
import pickletools
import re
import stat
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from hymamba.errors import CheckpointError
from hymamba.utils.io import atomic_write
from hymamba.weights.foreign import is_runner_checkpoint, read_inert

__all__ = ["SAFE_GLOBALS", "checkpoint_dir", "read_file", "read_state_dict", "save_safetensors", "state_dict_from",
           "strip_prefixes", "weights_file"]

PathLike = Union[str, os.PathLike]

logger = logging.getLogger("hymamba")

#: classes a pickled checkpoint may contain besides tensors and plain containers
SAFE_GLOBALS: List[Any] = [argparse.Namespace]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def checkpoint_dir() -> Path:
    """Folder where ``pretrained=True`` looks for official weights (``$HYMAMBA_CHECKPOINT_DIR``,
    default ``~/.cache/hymamba/checkpoints``)."""
    env = os.environ.get("HYMAMBA_CHECKPOINT_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hymamba" / "checkpoints"


# ----------------------------------------------------------------------------------------------
# reading files
#
# Every failure to read a file becomes one CheckpointError that names the file, says what it is not
# and why (empty, corrupt or another format, or holding Python objects outside the allow-list), and
# what to do. Nothing in a file is ever executed: pickles go through torch's weights-only unpickler,
# and the only other look inside a pickle (naming a refused object) is ``pickletools.genops``, which
# decodes opcodes without building anything.

_FORMATS = "a file written by torch.save (.pth, .pth.tar, .bin) or a .safetensors file"
#: globals a pickled checkpoint may name without being suspicious (torch's own and the allow-list)
_PLAIN_GLOBALS = ("collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset")
#: torch's generic sentences around a weights-only failure: the reason is the line that is none of them
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch",
                      "Re-running", "(1)", "(2)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL_RE = re.compile(r"GLOBAL (\w+(?:\.\w+)*)")


def _allow_list() -> str:
    return ", ".join(c.__module__ + "." + c.__qualname__ for c in SAFE_GLOBALS)


def _reason(e: BaseException) -> str:
    """``Type: the one informative line`` of an exception raised while parsing a file."""
    text = _ANSI_RE.sub("", str(e))
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # torch wraps the reason in advice
    if found:
        text = found.group(1).strip()
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
        text = (useful or lines or [""])[0]
    if len(text) > 100 and ". " in text:  # miniz and friends append paragraphs of advice: keep the first sentence
        text = text.split(". ")[0]
    if len(text) > 160:
        text = text[:157] + "..."
    if not text:
        text = "the file ends too early" if isinstance(e, EOFError) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _sniff(path: Path) -> str:
    """A hint when the start of a file shows what it really is (else '')."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""
    if head.startswith(b"version https://git-lfs"):
        return "; it is a Git LFS pointer, not the weights: fetch them with 'git lfs pull'"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "; it is an HTML page (a failed download?): download the weights again"
    if len(head) >= 10 and head[8:10] == b'{"' and path.suffix != ".safetensors":
        return "; it looks like a safetensors file: give it the .safetensors extension"
    return ""


def _pickle_globals(path: Path) -> List[str]:
    """The module.name of every global a pickled file refers to, found by decoding opcodes only
    (``pickletools.genops`` builds no object, imports nothing and calls nothing)."""
    found: List[str] = []
    strings: List[str] = []
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            for _ in range(8):  # a legacy torch.save file is a few pickles in a row, then raw data
                if f.read(1) != b"\x80":
                    break
                f.seek(-1, os.SEEK_CUR)
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":
                        found.append(".".join(strings[-2:]) if len(strings) >= 2 else "?")
                    elif isinstance(arg, str):
                        strings = (strings + [arg])[-2:]
                if f.tell() >= size:
                    break
    except Exception:  # noqa: BLE001 - a corrupt pickle: report what was found before the damage
        pass
    return found


def _names_global(path: Path, name: str) -> bool:
    """Whether the file holds a complete GLOBAL opcode ``c<module>\\n<name>\\n`` for ``name`` (torch
    writes ``module.name``, a builtin without its module). Torch also names a global cut short by the
    end of a truncated file, which is no foreign object."""
    raw = name.encode()
    needles = [b"c" + raw[:i] + b"\n" + raw[i + 1:] + b"\n" for i in range(len(raw)) if raw[i:i + 1] == b"."]
    needles += [b"c" + module + b"\n" + raw + b"\n" for module in (b"builtins", b"__builtin__")]  # torch omits it
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return any(m.find(n) >= 0 for n in needles)
    except (OSError, ValueError):
        return False


def _refused_globals(e: BaseException, path: Path) -> List[str]:
    """The Python objects outside the allow-list that made a load fail (empty: it failed for another reason)."""
    allowed = {c.__module__ + "." + c.__qualname__ for c in SAFE_GLOBALS} | set(_PLAIN_GLOBALS)
    scanned = [g for g in _pickle_globals(path)  # names, not the garbage a damaged file may decode to
               if _GLOBAL_RE.fullmatch("GLOBAL " + g) and g not in allowed and not g.startswith("torch.")]
    named = []  # torch's weights-only unpickler met a global it does not allow (a complete one: not a truncation)
    if isinstance(e, pickle.UnpicklingError):
        named = [g for g in _GLOBAL_RE.findall(str(e)) if _names_global(path, g)]
    return list(dict.fromkeys(scanned + named))


def _check_regular_file(path: Path, kind: str) -> None:
    """A CheckpointError unless ``path`` is a non-empty regular file (reading a pipe or device could hang)."""
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"could not read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a {kind}: it is not a regular file; pass the weights file itself")
    if st.st_size == 0:
        raise CheckpointError(f"{path} is not a {kind}: it is empty (0 bytes); the download or save did not finish, "
                              "write or download it again")


def _is_interrupt(e: BaseException) -> bool:
    return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _torch_load(path: Path) -> Any:
    _check_regular_file(path, "PyTorch checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    except BaseException as e:  # noqa: BLE001 - whatever the parser raises on bad data becomes our error
        if _is_interrupt(e):
            raise
        error = e
    if isinstance(error, OSError) and not isinstance(error, io.UnsupportedOperation):
        raise CheckpointError(f"could not read {path}: {error.strerror or error}") from None
    refused = _refused_globals(error, path)
    if refused:
        runner = _read_runner_checkpoint(path)
        if runner is not None:
            return runner
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects outside the allow-list ({', '.join(refused[:5])}; "
            f"allowed: tensors, plain containers, {_allow_list()}); hymamba never unpickles arbitrary objects. "
            "Convert the file with a trusted tool or save only its state dict."
        ) from None
    raise CheckpointError(
        f"{path} is not a PyTorch checkpoint: the data is corrupt or in another format ({_reason(error)})"
        f"{_sniff(path)}. Expected {_FORMATS}; write or download it again"
    ) from None


def _read_runner_checkpoint(path: Path) -> Any:
    """An mmengine Runner checkpoint (torch.save zip) read with its foreign objects left inert, or None
    when ``path`` is not one (then its foreign objects are refused as in any other file)."""
    try:
        obj, replaced = read_inert(path)  # a CheckpointError unless a readable torch.save zip
    except CheckpointError:
        return None
    if not is_runner_checkpoint(obj):
        return None
    logger.info("%s: an mmengine checkpoint; %d globals in its bookkeeping were replaced by inert placeholders "
                "(never imported or run; numpy values decoded from their bytes): %s", path, len(replaced),
                ", ".join(replaced))
    return obj


def _safetensors_load(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _check_regular_file(path, "safetensors file")
    try:
        return load_file(str(path))
    except BaseException as e:  # noqa: BLE001 - SafetensorError, or a PanicException (a BaseException) from Rust
        if _is_interrupt(e):
            raise
        error = e
    if isinstance(error, OSError):
        raise CheckpointError(f"could not read {path}: {error.strerror or error}") from None
    raise CheckpointError(
        f"{path} is not a safetensors file: the data is corrupt or in another format ({_reason(error)})"
        f"{_sniff(path)}. Expected {_FORMATS}; write or download it again"
    ) from None


def read_file(path: Path) -> Any:
    """The object stored in one weights file (safetensors: a dict of tensors; else a safe unpickle).

    Raises:
        CheckpointError: the file cannot be read, is empty, corrupt, in another format, or holds
            Python objects outside the allow-list (which are never executed).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_load(path)
    return _torch_load(path)


def weights_file(path: PathLike) -> Path:
    """The file to read for ``path``: itself, or the weights file of a Hugging Face folder."""
    try:
        folder = Path(path).expanduser()
        exists, is_dir = folder.exists(), folder.is_dir()
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, an unknown ~user
        raise CheckpointError(f"cannot use {str(path)[:200]!r} as a checkpoint path: {e}") from None
    if not exists:
        raise CheckpointError(f"checkpoint not found: {folder}")
    if not is_dir:
        return folder
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder} is a folder but holds none of {', '.join(_WEIGHT_FILES)}; expected a Hugging Face "
        "snapshot (config.json + weights) or pass the weights file itself"
    )


def state_dict_from(obj: Any, use_ema: bool, path: Path) -> Dict[str, torch.Tensor]:
    """The model's tensors inside a file's object (checkpoint dicts, EMA, bare state dicts, the sharded
    folder a sharded training state names), prefixes removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("sharded"), str) and "model" not in obj:
        key = "model_ema" if use_ema else "model"
        return read_sharded(path.parent / obj["sharded"], key, path)
    return strip_prefixes(_pick_state_dict(obj, use_ema, path))


#: what the index of a torch.distributed.checkpoint folder (``.metadata``, a pickle) may name
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"} | {str(t).split(".")[1] for t in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
        torch.uint8, torch.bool, torch.complex64, torch.complex128)},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint index, refusing every global outside :data:`_DCP_GLOBALS` (nothing
    else is imported or called: torch's own reader would unpickle it without any check)."""

    def find_class(self, module: str, name: str) -> Any:
        if name not in _DCP_GLOBALS.get(module, ()):
            raise pickle.UnpicklingError(f"the index refers to {module}.{name}, which a checkpoint index never "
                                         "holds; it was not loaded")
        return super().find_class(module, name)


def sharded_failure(e: BaseException) -> str:
    """The one informative line of a failed sharded load (DCP wraps each rank's error in a CheckpointException)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, Mapping) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple):  # (exception, traceback) in some torch versions
            inner = next((x for x in inner if isinstance(x, BaseException)), inner)
        return _reason(getattr(inner, "exc", inner))
    return _reason(e)


def sharded_reader(folder: Path) -> Any:
    """A :mod:`torch.distributed.checkpoint` reader for ``folder`` whose index is read safely."""
    import torch.distributed.checkpoint as dcp

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            path = Path(str(self.path)) / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = _IndexUnpickler(f).load()
            except FileNotFoundError:
                raise CheckpointError(f"{folder} is not a sharded checkpoint: it has no .metadata index (an "
                                      "unfinished save?); resume from another checkpoint of the run") from None
            except Exception as e:  # noqa: BLE001 - torn, foreign or refused
                raise CheckpointError(f"cannot read the sharded checkpoint index {path}: {_reason(e)}") from None
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not a checkpoint index")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def read_sharded(folder: Path, key: str, named_by: Path) -> Dict[str, torch.Tensor]:
    """The whole tensors under ``key`` ('model' or 'model_ema') of a sharded training checkpoint (a
    :mod:`torch.distributed.checkpoint` folder written by ``--strategy fsdp``), in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not folder.is_dir():
        raise CheckpointError(f"{named_by} is a sharded training state whose tensors are in {folder}, which is "
                              "missing; copy the whole output folder (sharded/ included)")
    reader = sharded_reader(folder)
    entries = reader.read_metadata().state_dict_metadata
    prefix = key + "."
    template = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in entries.items() if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not template:
        what = "EMA weights" if key == "model_ema" else "model weights"
        raise CheckpointError(f"the sharded checkpoint {folder} (named by {named_by}) has no {what}"
                              + ("; read the model's weights instead (use_ema=False)" if key == "model_ema" else ""))
    try:
        with warnings.catch_warnings():  # ("no process group: loading in one process", as intended)
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: template}, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:  # a missing or torn shard (CheckpointException is no Exception)
        raise CheckpointError(f"cannot read the sharded checkpoint {folder}: {sharded_failure(e)}; copy it again") from None
    return template


def _keys(obj: Mapping) -> List[str]:
    """Up to ten of a mapping's keys, as text (keys of mixed types do not sort)."""
    return sorted(str(k) for k in obj)[:10]


def _tensors_only(sd: Mapping, path: Path, where: str) -> Dict[str, torch.Tensor]:
    """``sd`` as a dict, after checking it maps names to tensors."""
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path} is not a usable checkpoint: {where} has the key {k!r} "
                                  f"({type(k).__name__}), expected parameter names (text)")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path} is not a usable checkpoint: {where} maps {k[:100]!r} to a "
                                  f"{type(v).__name__}, expected a tensor")
    return dict(sd)


def _pick_state_dict(obj: Any, use_ema: bool, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors or a checkpoint dict")
    if use_ema:
        for key in ("state_dict_ema", "model_ema", "ema"):
            if isinstance(obj.get(key), Mapping):
                return _tensors_only(obj[key], path, f"its {key!r} entry")
        raise CheckpointError(
            f"use_ema=True but {path} has no EMA weights (looked for 'state_dict_ema', 'model_ema', 'ema'; "
            f"found keys {_keys({k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)})})"
        )
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), Mapping):
            return _tensors_only(obj[key], path, f"its {key!r} entry")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} has no tensors: top-level keys are {_keys(obj)}")
    return _tensors_only(tensors, path, "the file")


def strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) shared by every key."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def read_state_dict(path: PathLike, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a model state dict from any supported checkpoint.

    Args:
        path: an official ``.pth.tar`` (``state_dict``/``model``/bare; ``module.`` prefixes), a
            Hugging Face folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``,
            keys prefixed ``model.``), or a ``.safetensors`` file.
        use_ema: take the EMA weights (``state_dict_ema``) instead of the model weights.
    Returns:
        Plain parameter-name -> tensor dict with wrapper prefixes removed.
    """
    p = weights_file(path)
    return state_dict_from(read_file(p), use_ema, p)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write tensors to ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
