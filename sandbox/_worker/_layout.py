"""Container side, torch-free: the layout of a plain torch-zip state dict.

Most real checkpoints are dicts of tensors whose pickle names only tensor-rebuilding globals.
For those the loader does not need torch: this module runs the file's ``data.pkl`` through
CPython's own unpickler with a ``find_class`` that resolves *only* those globals, to inert
stand-ins, and a ``persistent_load`` that records storage references instead of reading them.
Nothing of the file is called but the stand-ins. The result is a *layout* -- for every tensor
its name (as the extractor names it), storage key, dtype, shape, stride and offset -- plus the
JSON skeleton of the structure. The host checks the layout against its own, independent reading
of the archive and maps the tensor bytes straight from the input it holds: the bytes never cross
the channel. Anything else (another global, a byte-swapped archive, tensor metadata bits, an
object that is not plain data) raises :class:`NotPlain`, and the full torch loader runs.
"""

from __future__ import annotations

import collections
import math
import pickle
import zipfile
from typing import IO, Any

from . import _protocol as P

MAX_PICKLE_BYTES = 256 * 2**20


class NotPlain(Exception):
    """The file needs the full loader; the message says why."""


class _Storage:
    __slots__ = ("dtype", "key", "location", "numel")

    def __init__(self, key: str, dtype: str, numel: int, location: str) -> None:
        self.key, self.dtype, self.numel, self.location = key, dtype, numel, location


class _Tensor:
    __slots__ = ("offset", "parameter", "requires_grad", "shape", "storage", "stride")

    def __init__(
        self,
        storage: _Storage,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool,
    ) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.requires_grad, self.parameter = requires_grad, False


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


def _ints(v: object, what: str) -> tuple[int, ...]:
    if (
        not isinstance(v, tuple)
        or len(v) > P.MAX_NDIM
        or not all(type(x) is int and 0 <= x < 2**62 for x in v)
    ):
        raise NotPlain(f"tensor {what} is not a tuple of non-negative integers")
    return v


def _no_hooks(v: object) -> None:
    if not isinstance(v, collections.OrderedDict) or v:
        raise NotPlain("tensor backward hooks")


def _rebuild_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    metadata: object = None,
) -> _Tensor:
    if (
        not isinstance(storage, _Storage)
        or type(offset) is not int
        or offset < 0
        or type(requires_grad) is not bool
    ):
        raise NotPlain("a tensor rebuilt from unexpected arguments")
    _no_hooks(hooks)
    if metadata:
        raise NotPlain("tensor metadata bits (conj/neg)")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise NotPlain("tensor size and stride ranks differ")
    return _Tensor(storage, offset, shape, strides, requires_grad)


def _rebuild_parameter(data: object, requires_grad: object, hooks: object) -> _Tensor:
    if not isinstance(data, _Tensor) or type(requires_grad) is not bool:
        raise NotPlain("a parameter rebuilt from unexpected arguments")
    _no_hooks(hooks)
    t = _Tensor(data.storage, data.offset, data.shape, data.stride, requires_grad)
    t.parameter = True
    return t


_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in P.STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: IO[bytes]) -> None:
        super().__init__(f)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if found is None:
            raise NotPlain(f"the pickle imports {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[3], str)
            or type(pid[4]) is not int
            or pid[4] < 0
        ):
            raise NotPlain("a persistent id that is not a storage record")
        key, dtype = pid[2], pid[1].dtype
        if not key or len(key) > 64 or not key.isprintable() or len(pid[3]) > 64 or not pid[3].isprintable():
            raise NotPlain("a storage key or location that is not a short printable name")
        seen = self.storages.get(key)
        if seen is None:
            seen = self.storages[key] = _Storage(key, dtype, pid[4], pid[3])
        elif (seen.dtype, seen.numel) != (dtype, pid[4]):
            raise NotPlain(f"storage {key} claimed with two types or sizes")
        return seen


class _Walker(P.TensorNames):
    """The extractor's skeleton and naming (``_extract.Extractor``), for plain data only."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[dict[str, Any]] = []

    def walk(self, obj: Any, path: tuple[str, ...] = (), depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > P.MAX_SKELETON_NODES or depth > P.MAX_SKELETON_DEPTH:
            raise NotPlain("the structure is too large or too deep")
        if obj is None or type(obj) in (bool, int):
            return obj
        if type(obj) is str:
            if len(obj) > P.MAX_STRING_LEN:
                raise NotPlain("a string too long for the skeleton")
            return obj
        if type(obj) is float:
            return obj if math.isfinite(obj) else {"$": "float", "v": repr(obj)}
        if isinstance(obj, _Tensor):
            return {
                "$": "tensor",
                "ref": self._ref(obj, path),
                "parameter": obj.parameter,
                "requires_grad": obj.requires_grad,
            }
        if id(obj) in self.active:
            raise NotPlain("a reference cycle")
        self.active.add(id(obj))
        try:
            if type(obj) in (dict, collections.OrderedDict):
                items = []
                for key, value in obj.items():
                    if key is not None and type(key) not in (bool, int, str):
                        raise NotPlain("a dict key that is not a string or an integer")
                    comp = P.path_component(key)
                    items.append(
                        [
                            self.walk(key, path + (comp, "<key>"), depth + 1),
                            self.walk(value, path + (comp,), depth + 1),
                        ]
                    )
                if type(obj) is not collections.OrderedDict:
                    return {"$": "dict", "kind": "dict", "items": items}
                node = {"$": "dict", "kind": "OrderedDict", "items": items}
                raw = obj.__dict__.get("_metadata")  # the module versions, as the extractor
                if raw is not None:
                    meta = P.state_dict_metadata(raw)
                    if meta is None:  # the full loader's extractor notes it
                        raise NotPlain("a state dict's _metadata that is not module versions")
                    node["metadata"] = meta
                return node
            if type(obj) in (list, tuple):
                kind = "list" if type(obj) is list else "tuple"
                return {
                    "$": kind,
                    "items": [self.walk(v, path + (str(i),), depth + 1) for i, v in enumerate(obj)],
                }
        finally:
            self.active.discard(id(obj))
        raise NotPlain(f"a {type(obj).__name__} value")

    def _ref(self, t: _Tensor, path: tuple[str, ...]) -> str:
        name, new = self.name_of(t, path)
        if new:
            self.tensors.append(
                {
                    "name": name,
                    "key": t.storage.key,
                    "dtype": t.storage.dtype,
                    "shape": list(t.shape),
                    "stride": list(t.stride),
                    "offset": t.offset,
                    "parameter": t.parameter,
                    "location": t.storage.location,
                }
            )
        return name


def read(open_input: Any) -> dict[str, Any]:
    """The layout document of a plain torch-zip state dict (see the module docstring).
    ``open_input()`` gives a fresh binary file object of the input. Raises NotPlain."""
    with open_input() as raw:
        try:
            zf = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise NotPlain(f"the zip cannot be read here ({exc})") from None
        with zf:
            names = zf.namelist()
            pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise NotPlain("not exactly one data.pkl")
            prefix = pickles[0][: -len("data.pkl")]
            if any(n.endswith(("/constants.pkl", ".pkl")) and n != pickles[0] for n in names):
                raise NotPlain("more than one pickle in the archive")
            if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder")[:16] != b"little":
                raise NotPlain("a big-endian archive")
            info = zf.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise NotPlain("a very large pickle")
            with zf.open(info) as f:
                try:
                    obj = _Unpickler(f).load()
                except NotPlain:
                    raise
                except Exception as exc:  # a malformed stream: the full loader judges it
                    raise NotPlain(f"the pickle does not read as plain data ({exc})") from None
    walker = _Walker()
    skeleton = walker.walk(obj)
    if not walker.tensors:
        raise NotPlain("no tensors")
    return {"format": "torch-zip", "layout": walker.tensors, "skeleton": skeleton}
