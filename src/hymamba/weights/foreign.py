"""Reading ``torch.save`` files that hold foreign Python objects, without importing or running any of them.

mmengine Runner checkpoints (the official dense MambaVision weights) keep, beside ``state_dict`` and
``meta``, a ``message_hub`` of mmengine ``HistoryBuffer`` objects and numpy values, and may keep
``optimizer`` and ``param_schedulers``. ``torch.load(weights_only=True)`` refuses such a file, and
``weights_only=False`` would import mmengine and call whatever the pickle names.

:func:`read_inert` unpickles the file's ``data.pkl`` with :class:`InertUnpickler`, a
``pickle.Unpickler`` whose ``find_class`` is the only door to Python objects:

- torch's tensor-rebuilding functions, storages, dtypes and the few builtins torch allows: taken
  from torch's own weights-only allow-list (what ``torch.load(weights_only=True)`` would call), each
  load getting fresh callables and storage markers, so that nothing in a pickle can alter them;
- every other global -- foreign classes, numpy's reconstruction functions, ``builtins.getattr``,
  ``os.system`` alike -- becomes a :class:`ForeignObject` subclass that only records its name and what
  it was built with. Nothing is imported; no ``__reduce__`` callable and no ``__setstate__`` of
  foreign code (numpy's included) ever runs.

Afterwards, recorded numpy arrays and scalars of plain number or bool dtypes are decoded from their
bytes (``np.frombuffer``), so numpy values come back as numpy objects; anything else numpy stays inert.
Storages are read from the zip archive (``<archive>/data/<key>``, byte order from
``<archive>/byteorder``, CRC-checked) onto the CPU; sparse tensors are validated as torch validates them.
Imports only torch, numpy, the standard library and :mod:`hymamba.errors`.
"""
from __future__ import annotations

import _compat_pickle
import inspect
import io
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import numpy as np
import torch

from hymamba.errors import CheckpointError

__all__ = ["ForeignObject", "InertUnpickler", "RUNNER_BOOKKEEPING", "foreign_names", "is_runner_checkpoint",
           "read_inert"]

PathLike = Union[str, os.PathLike]

#: where an mmengine Runner checkpoint keeps its bookkeeping: the only places foreign objects are accepted
RUNNER_BOOKKEEPING = ("meta", "message_hub", "optimizer", "param_schedulers")


class ForeignObject:
    """Stands for an object (or a call) of a class or function that was not loaded.

    Each foreign global ``module.name`` becomes its own subclass with ``foreign_module`` and
    ``foreign_name`` set; the pickle's operations on it are only recorded:

    - calling it (pickle's REDUCE/NEWOBJ/INST) records ``args`` and ``kwargs``;
    - BUILD records ``state``; dict and list items pickled after it go to ``dict_items``/``list_items``.
    """

    __slots__ = ("args", "kwargs", "state", "dict_items", "list_items")
    foreign_module = ""
    foreign_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "ForeignObject":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.dict_items, obj.list_items = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything was recorded by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        try:
            self.dict_items[key] = value
        except TypeError:  # an unhashable key: keep it anyway
            self.dict_items[("unhashable", id(key))] = (key, value)

    def append(self, item: Any) -> None:
        self.list_items.append(item)

    def extend(self, items: Any) -> None:
        self.list_items.extend(items)

    def add(self, item: Any) -> None:  # pickle's ADDITEMS (sets)
        self.list_items.append(item)

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.foreign_module}.{cls.foreign_name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name()}>"


def _foreign_class(module: str, name: str) -> type:
    return type(str(name), (ForeignObject,), {"__slots__": (), "__module__": __name__,
                                             "foreign_module": str(module), "foreign_name": str(name)})


_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: setattr on the class fails


class _StorageKind:
    """A storage class as a pickle names it (``torch.FloatStorage``, ...): only its dtype is used."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _fresh(f: Callable[..., Any]) -> Callable[..., Any]:
    """A new function that calls ``f``: what a pickle holds instead of a shared, mutable ``f``."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    call.__name__ = call.__qualname__ = str(getattr(f, "__name__", "call"))
    return call


def _shareable_class(cls: type) -> bool:
    """A class a pickle may hold as it is: pickle's BUILD on it cannot change it (setattr fails, or its
    ``__setstate__`` is a plain method that fails when called on the class)."""
    return bool(cls.__flags__ & _IMMUTABLE_TYPE) or inspect.isfunction(getattr(cls, "__setstate__", None))


def _torch_globals() -> Dict[str, Any]:
    """torch's weights-only allow-list (what ``torch.load(weights_only=True)`` resolves), made safe to hand
    to a ``pickle.Unpickler``: torch's own rebuild functions and storages, and nothing a pickle could change.

    torch's unpickler refuses BUILD on its allowed functions, classes and storage-type objects (they are
    shared, process-wide); a ``pickle.Unpickler`` does not, so each load gets fresh callables and
    storage kinds, and only classes that BUILD cannot alter are given as they are.
    """
    from torch import _weights_only_unpickler as wo

    rc: Dict[str, Any] = {}
    for name, value in wo._get_allowed_globals().items():
        if value is torch.storage.UntypedStorage:
            rc[name] = _StorageKind(torch.uint8)
        elif isinstance(value, torch.serialization.StorageType):
            rc[name] = _StorageKind(value.dtype)
        elif isinstance(value, type):
            if value is not torch.storage.TypedStorage:  # a storage-type marker only torch's own loader reads
                rc[name] = value if _shareable_class(value) else _fresh(value)
        elif callable(value):
            rc[name] = _fresh(value)
        elif not hasattr(value, "__dict__"):  # dtypes, layouts, qschemes: immutable values
            rc[name] = value
    return rc


class InertUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that builds tensors and leaves everything else inert.

    Args:
        file: the pickle (``data.pkl`` of a torch zip archive).
        load_storage: ``(dtype, key) -> torch.storage.TypedStorage``, for the archive's storages.
    Attributes:
        replaced: ``module.name`` of every global that became a :class:`ForeignObject` class.
    """

    def __init__(self, file: io.BufferedIOBase,
                 load_storage: Callable[[torch.dtype, str], "torch.storage.TypedStorage"]) -> None:
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage
        self._allowed = _torch_globals()
        self._placeholders: Dict[str, type] = {}
        self.replaced: List[str] = []

    def find_class(self, module: str, name: str) -> Any:
        module, name = str(module), str(name)
        # protocol-2 names of Python 2 (torch.save writes protocol 2), as torch's own unpickler maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch.tensor":  # renamed module (torch.load maps it too)
            module = "torch._tensor"
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if full not in self._placeholders:
            self._placeholders[full] = _foreign_class(module, name)
            self.replaced.append(full)
        return self._placeholders[full]

    def persistent_load(self, pid: Any) -> Any:
        """A storage of the archive: ``('storage', storage type, key, location, numel)`` (anything else is refused)."""
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError(f"unsupported persistent id {type(pid).__name__}")
        typename, storage_type, key, _location, numel = pid
        if isinstance(typename, bytes):
            typename = typename.decode("ascii", "replace")
        if typename != "storage" or not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int):
            raise pickle.UnpicklingError("unsupported persistent id: only storages can be loaded")
        if not isinstance(storage_type, _StorageKind) or not isinstance(storage_type.dtype, torch.dtype):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        storage = self._load_storage(storage_type.dtype, key)
        if storage.size() != numel:
            raise pickle.UnpicklingError(f"storage {key} holds {storage.size()} elements, the pickle says {numel}")
        return storage


# ----------------------------------------------------------------------------------------------
# numpy values: decoded from the recorded bytes, never through numpy's own unpickling


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_DTYPE = re.compile(r"(b1|[iu][1248]|f(2|4|8|16)|c(8|16|32))")


def _named(obj: Any, module: Union[str, Tuple[str, ...]], name: str, cls: bool = False) -> bool:
    """Whether ``obj`` is an inert ``module.name`` object (``cls``: the inert class itself)."""
    kind = obj if cls else type(obj)
    return isinstance(kind, type) and issubclass(kind, ForeignObject) and kind.foreign_name == name and \
        kind.foreign_module in ((module,) if isinstance(module, str) else module)


def _numpy_dtype(spec: Any) -> Optional[np.dtype]:
    """The dtype a pickled ``numpy.dtype('f8', False, True)`` with state ``(3, '<', None, None, None, -1,
    -1, 0)`` stands for: plain numbers and bools only (no fields, objects or flags)."""
    if not _named(spec, "numpy", "dtype") or len(spec.args) < 1 or not isinstance(spec.args[0], str):
        return None
    state = spec.state
    if not (_NUMPY_DTYPE.fullmatch(spec.args[0]) and isinstance(state, tuple) and len(state) in (8, 9)
            and state[0] == 3 and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
            and state[-1] == 0):
        return None
    dtype = np.dtype(spec.args[0])
    return dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype


def _numpy_value(obj: Any) -> Any:
    """A numpy array or scalar for a recorded numpy reconstruction, else ``obj`` unchanged."""
    if _named(obj, _NUMPY_MODULES, "scalar") and len(obj.args) == 2 and isinstance(obj.args[1], bytes):
        dtype = _numpy_dtype(obj.args[0])
        if dtype is not None and len(obj.args[1]) == dtype.itemsize:
            return np.frombuffer(obj.args[1], dtype=dtype)[0]
    if _named(obj, _NUMPY_MODULES, "_reconstruct") and len(obj.args) == 3 \
            and _named(obj.args[0], "numpy", "ndarray", cls=True):
        state = obj.state
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in state[1])
                and isinstance(state[3], bool) and isinstance(state[4], bytes)):
            return obj
        dtype = _numpy_dtype(state[2])
        count = int(np.prod(state[1], dtype=np.int64)) if state[1] else 1
        if dtype is None or len(state[4]) != count * dtype.itemsize:
            return obj
        flat = np.frombuffer(state[4], dtype=dtype).copy()
        return flat.reshape(state[1], order="F" if state[3] else "C")
    return obj


def _decode_numpy(root: Any) -> Any:
    """Replace recorded numpy arrays and scalars by numpy objects, in dicts, lists and inert objects."""
    decoded: Dict[int, Any] = {}

    def value(v: Any) -> Any:
        if isinstance(v, ForeignObject):
            if id(v) not in decoded:
                decoded[id(v)] = _numpy_value(v)
            return decoded[id(v)]
        return v

    root = value(root)
    seen: Set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for k, v in list(item.items()):
                if value(v) is not v:
                    item[k] = value(v)
            stack.extend(item.values())
        elif isinstance(item, list):
            item[:] = [value(v) for v in item]
            stack.extend(item)
        elif isinstance(item, (tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, ForeignObject):
            item.args = tuple(value(v) for v in item.args)
            item.state = value(item.state)
            stack.extend((item.args, item.kwargs, item.state, item.dict_items, item.list_items))
    return root


class _Archive:
    """The storages of a torch zip archive, each read once, on the CPU."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str) -> None:
        self.zf, self.prefix = zf, prefix
        order = self._record("byteorder") if f"{prefix}/byteorder" in zf.NameToInfo else b"little"
        if order not in (b"little", b"big"):
            raise CheckpointError(f"unknown byte order {order[:20]!r}")
        self.swap = order.decode() != sys.byteorder
        self.loaded: Dict[str, Tuple[torch.dtype, "torch.storage.TypedStorage"]] = {}

    def _record(self, name: str) -> bytes:
        return self.zf.read(f"{self.prefix}/{name}")

    def storage(self, dtype: torch.dtype, key: str) -> "torch.storage.TypedStorage":
        if key in self.loaded:
            seen, typed = self.loaded[key]
            if seen != dtype:
                raise pickle.UnpicklingError(f"storage {key} is read as {seen} and as {dtype}")
            return typed
        name = f"data/{key}"
        if f"{self.prefix}/{name}" not in self.zf.NameToInfo:
            raise pickle.UnpicklingError(f"the archive has no record {name}")
        raw = self._record(name)
        size = torch.empty((), dtype=dtype).element_size()
        if len(raw) % size:
            raise pickle.UnpicklingError(f"record {name} ({len(raw)} bytes) is not whole {dtype} elements")
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        if self.swap and size > 1:
            untyped.byteswap(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated; torch's rebuild takes it
            typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        self.loaded[key] = (dtype, typed)
        return typed


def _pickle_record(zf: zipfile.ZipFile) -> str:
    """The ``<archive>/data.pkl`` record of a torch.save zip (the archive name is the records' folder)."""
    names = zf.namelist()
    candidates = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(candidates) != 1:
        raise CheckpointError("it is a zip archive but not one written by torch.save (no single <name>/data.pkl)")
    if any(n.endswith("/constants.pkl") for n in names):
        raise CheckpointError("it is a TorchScript archive, not a torch.save checkpoint")
    return candidates[0]


def read_inert(path: PathLike) -> Tuple[Any, List[str]]:
    """Read a ``torch.save`` zip file with foreign objects left inert.

    Returns:
        The stored object (tensors on the CPU, numpy values as numpy objects, every other foreign
        object a :class:`ForeignObject`), and the ``module.name`` of each global replaced by one.
    Raises:
        CheckpointError: not a torch.save zip file, or damaged (nothing is ever run either way).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            record = _pickle_record(zf)
            archive = _Archive(zf, record.rsplit("/", 1)[0])
            unpickler = InertUnpickler(io.BytesIO(zf.read(record)), archive.storage)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation; sparse checks
                    obj = unpickler.load()
                    _validate_sparse(strict=True)
                obj = _decode_numpy(obj)
            finally:
                _validate_sparse(strict=False)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - whatever bad data makes the parsers raise becomes our error
        text = str(e).splitlines()[0][:160] if str(e) else ""
        raise CheckpointError(f"{path} could not be read as a torch.save archive with inert foreign objects "
                              f"({type(e).__name__}{': ' + text if text else ''})") from None
    return obj, list(unpickler.replaced)


def _validate_sparse(strict: bool) -> None:
    """torch's check of the sparse tensors just rebuilt (their indices in range); ``strict=False`` only clears."""
    from torch import _utils

    if strict and _utils._sparse_tensors_to_validate:
        try:
            _utils._validate_loaded_sparse_tensors(weights_only=True)
        except TypeError:  # torch < 2.6 has no weights_only argument (and always validates)
            _utils._validate_loaded_sparse_tensors()
    _utils._sparse_tensors_to_validate.clear()


# ----------------------------------------------------------------------------------------------
# where the foreign objects are


def _children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, Mapping):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif isinstance(obj, ForeignObject):
        yield from (obj.args, obj.kwargs, obj.state, obj.dict_items, obj.list_items)


def foreign_names(obj: Any) -> Set[str]:
    """``module.name`` of every :class:`ForeignObject` (or such class) reachable from ``obj``."""
    found: Set[str] = set()
    seen: Set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, type) and issubclass(item, ForeignObject):
            found.add(item.qualified_name())
            continue
        if isinstance(item, ForeignObject):
            found.add(item.qualified_name())
        stack.extend(_children(item))
    return found


def is_runner_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` is an mmengine Runner checkpoint whose foreign objects are all bookkeeping.

    That is a dict with a ``state_dict`` and a ``meta`` mapping, foreign objects only under
    :data:`RUNNER_BOOKKEEPING` keys (never in ``state_dict`` or any other entry).
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping) \
            or not isinstance(obj.get("meta"), Mapping):
        return False
    return not foreign_names({k: v for k, v in obj.items() if k not in RUNNER_BOOKKEEPING})
