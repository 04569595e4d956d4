"""Stage 6 helper, host: rebuild a plain state_dict's tensors from the file's own records.

The sandbox *loads* a checkpoint and returns tensors; a pickle can change weights while it is
being loaded (Sleepy Pickle: ``torch.add(stored, delta)``, an in-place ``fill_``, a sign bit
set through tensor metadata). When the file is a plain state_dict (a possibly nested dict of
tensors and literals that imports nothing but the tensor rebuild functions), the tensors it
describes can be computed without unpickling anything: every tensor is a
``_rebuild_tensor_v2``/``_v3``/``_rebuild_parameter`` call whose arguments are literals and a
``persistent_load`` storage record, and the storage bytes lie in the archive. This module does
that computation and compares the result with what the sandbox returned.

* :func:`try_reconstruct` returns a :class:`Reconstruction` (every tensor's name, dtype,
  shape, stride, storage offset and sha256 of its row-major bytes) or a
  :class:`NotReconstructed` with the reason no comparison is possible (a global that is not a
  rebuild function, an opcode a plain ``torch.save`` never writes, a container trick the static
  scan flagged, ...). :func:`reconstruct` is the same with ``None`` for the second case.
* :func:`compare` returns ``weights-tampered`` / ``weights-mismatch`` findings.

Formats: torch zip (``<prefix>/data/<key>`` records, ``<prefix>/byteorder`` honoured), legacy
stacked pickles (raw storages after the storage-keys list: an int64 little-endian element
count, then the bytes, in list order) and the legacy tar format (``storages``, ``tensors`` and
``pickle`` members).

How it reads. The file is memory-mapped; the zip directory and tar headers are parsed by
:mod:`sandbox._scan` (whose :func:`~sandbox._scan.scan_file` runs first and must report an
allowlist-only file without evasion findings). Pickle streams are evaluated by a small opcode
interpreter here that implements the binary opcodes of protocols 2-5 with the C unpickler's
stack, mark and memo rules, resolves only the globals listed in ``_CALLABLES``/storage and
dtype names, and stops (``NotReconstructed``) at anything else. Storage bytes are taken only
from inside the record that holds them (every offset and length is checked against the record
and the file); a view that needs bytes the record does not hold is a finding
(``storage-too-short``), never a read past the record. Tensors are named the way the worker's
extractor names them (``sandbox/_worker/_extract.py``: dict keys joined with ``.``, list
indices as numbers, ``#n`` suffixes for clashes), so names can be compared one to one.

torch and numpy are imported only inside the functions that build tensors.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sandbox import _scan
from sandbox._formats import npy, tar_archive
from sandbox._formats.buffer import Buf, open_buffer, sha256_region
from sandbox._formats.pickle_ops import (
    BIG_INT,
    LEGACY_MAGIC,
    STACK_OPS,
    Fault,
    resolve_name,
    stack_op,
    step,
    text,
)
from sandbox._formats.zip_archive import ZipEntry, find_zip, torch_target
from sandbox._scan.globals import STORAGE_TYPES
from sandbox._worker import _protocol as P
from sandbox.errors import MalformedInput
from sandbox.report import Finding, Severity

if TYPE_CHECKING:
    import torch

__all__ = [
    "NotReconstructed",
    "Inventory",
    "Placement",
    "Reconstruction",
    "StaticTensor",
    "TensorRecord",
    "compare",
    "read",
    "reconstruct",
    "row_major",
    "try_inventory",
    "try_place",
    "try_reconstruct",
]

_MAX_OPS = 50_000_000
_MAX_MEMO = 5_000_000
CANCELLED = "the reading was cancelled: its result is no longer wanted"
_TIME_BUDGET_S = 300.0
_MAX_EVIDENCE = 20  # tensors named in one finding

_REBUILDERS = frozenset(
    {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
    }
)
_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "short": "int16",
    "int": "int32",
    "long": "int64",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
}
_LEGACY_PROTOCOL_VERSION = 1001


# --------------------------------------------------------------------------------------------
# Public data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TensorRecord(P.StridedTensor):
    """One tensor as the file's records describe it: the fields :class:`StaticTensor` and
    :class:`Placement` share.

    It lies in root storage ``key``; ``offset`` is relative to the storage the pickle names,
    which in a legacy file may itself be a view starting inside the root storage.
    """

    key: str


@dataclass(frozen=True, kw_only=True)
class StaticTensor(TensorRecord):
    """One tensor as the file's records describe it (see :class:`TensorRecord`), with its bytes.

    ``sha256`` is the digest of the tensor's bytes in row-major order (what
    ``sandbox._convert.tensor_digest`` computes for a loaded tensor); ``data`` holds those
    bytes when :func:`try_reconstruct` was asked to keep them, else ``None``.
    ``metadata`` is the ``conj``/``neg`` bits the pickle set on the tensor (already applied to
    ``sha256`` and ``data``, as ``torch.load`` applies them).
    """

    sha256: str
    data: bytes | None = None
    metadata: tuple[tuple[str, bool], ...] = ()

    def to_torch(self) -> torch.Tensor:
        """The tensor as a fresh contiguous torch tensor (needs ``data``)."""
        import torch

        if self.data is None:
            raise ValueError(f"{self.name}: reconstructed without keep_data=True")
        dtype = getattr(torch, self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(dtype).reshape(self.shape)


@dataclass(frozen=True)
class Reconstruction:
    """The tensors a plain state_dict file describes, rebuilt from its raw records.

    ``tensors`` maps worker-style names to :class:`StaticTensor`. ``unreadable`` names tensors
    whose view needs bytes the file does not hold (each has a finding in ``findings``); they
    are left out of :func:`compare`. ``findings`` are observations made while rebuilding
    (storage records shorter or longer than their claim, tensors whose sign/conjugate bit the
    pickle sets); they are not repeated by :func:`compare`.
    """

    format: str
    tensors: Mapping[str, StaticTensor]
    unreadable: frozenset[str] = frozenset()
    findings: tuple[Finding, ...] = ()
    #: every path (dict keys and list indices from the top) at which the file puts each
    #: tensor: the skeleton the host rebuilds the returned structure from must put it there
    paths: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class NotReconstructed:
    """Why the file's tensors cannot be rebuilt statically (so no comparison is possible)."""

    reason: str
    format: str | None = None


class _Unsupported(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Symbolic values of the interpreter
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Global:
    name: str


@dataclass(slots=True, eq=False)
class _StorageType:
    name: str
    dtype: str


@dataclass(slots=True, eq=False)
class _Dtype:
    name: str


class _Storage:
    """A storage: ``nbytes`` bytes at ``offset`` inside root storage ``root``."""

    __slots__ = ("dtype", "nbytes", "offset", "root")

    def __init__(self, root: str, dtype: str, offset: int, nbytes: int) -> None:
        self.root = root
        self.dtype = dtype
        self.offset = offset
        self.nbytes = nbytes


class _Tensor:
    __slots__ = ("dtype", "metadata", "offset", "parameter", "shape", "storage", "stride", "tainted")

    def __init__(
        self,
        storage: _Storage,
        dtype: str,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        metadata: tuple[tuple[str, bool], ...] = (),
        parameter: bool = False,
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.metadata = metadata
        self.parameter = parameter
        self.tainted = False  # its state was set after it was built: its bytes are unknown


class _Opaque:
    """General reading: an object of a class, or the result of a call, that is not rebuilt.
    ``parts`` keeps its arguments, state and items (tensors inside it are still found)."""

    __slots__ = ("name", "parts")

    def __init__(self, name: str, parts: list[object]) -> None:
        self.name = name
        self.parts = parts


class _NpDtype:
    __slots__ = ("code", "order")

    def __init__(self, code: str) -> None:
        self.code = code
        self.order = "="


class _NpArray:
    """A numpy array or scalar as its pickle describes it; complete once ``data`` is set."""

    __slots__ = ("data", "dtype", "fortran", "shape")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: _NpDtype | None = None
        self.fortran = False
        self.data: bytes | None = None


_NP_RECONSTRUCT = frozenset({"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"})
_NP_SCALAR = frozenset({"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"})
_NP_FROMBUFFER = frozenset({"numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"})
_NP_CODE = re.compile(r"[<>|=]?[?bBhHiIlLqQefdgFDGuicf][0-9]{0,2}")
_NP_KINDS = frozenset("biufc")


_Persistent = Callable[[object], object]


def _element_size(dtype: str) -> int:
    entry = P.TORCH_DTYPES.get(dtype)
    if entry is None:
        raise _Unsupported(f"dtype {dtype} is not one the sandbox hands back")
    return entry[1]


def _storage_type(name: str) -> _StorageType | None:
    """torch's unpickler maps any global whose name contains ``Storage`` to a storage type."""
    base = name.rsplit(".", 1)[-1]
    entry = STORAGE_TYPES.get(base)
    if entry is None:
        return None
    # a quantized storage holds the bytes of its integer representation (what the sandbox
    # returns as a quantized tensor's int_repr)
    return _StorageType(base, {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}.get(entry[0], entry[0]))


# --------------------------------------------------------------------------------------------
# The opcode interpreter (binary opcodes of protocols 2-5; no code is ever run)
# --------------------------------------------------------------------------------------------


class _Budget:
    """Limits of one reading, and its mode. ``general``: the inventory reading (see
    :func:`try_inventory`): any global is an inert stand-in, and every tensor and numpy array
    the pickle builds is recorded in ``made``."""

    def __init__(self, *, general: bool = False, cancel: threading.Event | None = None) -> None:
        self.ops = 0
        self.deadline = time.monotonic() + _TIME_BUDGET_S
        self.general = general
        self.made: list[_Tensor | _NpArray] = []
        #: the quantizer of each quantized tensor the pickle rebuilds (see Inventory.quantizers)
        self.quantizers: set[Quantizer] = set()
        #: the size of each sparse tensor the pickle rebuilds (see Inventory.sparse_sizes)
        self.sparse_sizes: set[SparseSize] = set()
        self.cancel = cancel

    def check(self) -> None:
        """Raise when the time budget is spent or the caller no longer wants the reading."""
        if time.monotonic() > self.deadline:
            raise _Unsupported("time budget exhausted")
        if self.cancel is not None and self.cancel.is_set():
            raise _Unsupported(CANCELLED)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(v: object, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(_is_int(x) for x in v):
        raise _Unsupported(f"tensor {what} is not a sequence of integers")
    if len(v) > P.MAX_NDIM:
        raise _Unsupported(f"tensor has more than {P.MAX_NDIM} dimensions")
    return tuple(int(x) for x in v)


def _check_hooks(v: object) -> None:
    if not isinstance(v, dict) or v:
        raise _Unsupported("tensor backward_hooks is not an empty OrderedDict")


def _metadata(v: object) -> tuple[tuple[str, bool], ...]:
    if v is None:
        return ()
    if not isinstance(v, dict) or not all(k in ("conj", "neg") and isinstance(b, bool) for k, b in v.items()):
        raise _Unsupported("tensor metadata other than the conj/neg bits")
    return tuple(sorted((str(k), bool(b)) for k, b in v.items() if b))


def _make_tensor(
    storage: object, offset: object, size: object, stride: object, dtype: str | None, metadata: object
) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Unsupported("a tensor is rebuilt from something other than a storage record")
    if not _is_int(offset) or not isinstance(offset, int) or offset < 0:
        raise _Unsupported("tensor storage offset is not a non-negative integer")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides) or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise _Unsupported("tensor size and stride do not describe a strided view")
    dt = storage.dtype if dtype is None else dtype
    _element_size(dt)
    return _Tensor(storage, dt, offset, shape, strides, _metadata(metadata))


def _call(func: object, args: object, budget: _Budget) -> object:
    """REDUCE: the few callables a plain state_dict uses, evaluated symbolically; in the
    general reading also numpy's array rebuilders, and an inert :class:`_Opaque` for any other
    call."""
    if not budget.general:
        return _call_known(func, args, budget)
    try:
        value = _call_known(func, args, budget)
    except _Unsupported:  # e.g. a tensor rebuilt from a storage made by a call: not verified
        return _Opaque(getattr(func, "name", "<call>"), [args])
    if isinstance(value, (_Tensor, _NpArray)):
        budget.made.append(value)
    return value


def _call_known(func: object, args: object, budget: _Budget) -> object:
    if budget.general and (not isinstance(func, _Global) or not isinstance(args, tuple)):
        return _Opaque("<call>", [func, args])
    if not isinstance(func, _Global):
        raise _Unsupported("REDUCE of something that is not an allowlisted global")
    if not isinstance(args, tuple):
        raise _Unsupported("REDUCE arguments are not a tuple")
    name, n = func.name, len(args)
    if budget.general:
        general = _call_general(name, args, budget)
        if general is not None:
            return general
    if name == "collections.OrderedDict":
        if n:
            raise _Unsupported("OrderedDict built from arguments")
        return collections.OrderedDict()
    if name == "_codecs.encode":
        if n == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise _Unsupported("bytes literal does not encode") from None
        raise _Unsupported("_codecs.encode with arguments other than (str, 'latin1')")
    if name == "torch._utils._rebuild_tensor":
        if n != 4:
            raise _Unsupported(f"{name} with {n} arguments")
        return _make_tensor(args[0], args[1], args[2], args[3], None, None)
    if name in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"):
        # (storage, offset, size, stride, requires_grad, hooks[, dtype: v3 only][, metadata])
        v3 = name == "torch._utils._rebuild_tensor_v3"
        fixed = 7 if v3 else 6  # the arguments before the optional metadata
        if n not in (fixed, fixed + 1):
            raise _Unsupported(f"{name} with {n} arguments")
        if not isinstance(args[4], bool):
            raise _Unsupported("requires_grad is not a bool")
        _check_hooks(args[5])
        dtype = None
        if v3:
            if not isinstance(args[6], _Dtype):
                raise _Unsupported("_rebuild_tensor_v3 without a dtype")
            dtype = args[6].name
        return _make_tensor(args[0], args[1], args[2], args[3], dtype, args[fixed] if n > fixed else None)
    if name == "torch._utils._rebuild_parameter":
        if n != 3 or not isinstance(args[0], _Tensor) or not isinstance(args[1], bool):
            raise _Unsupported("_rebuild_parameter with unexpected arguments")
        _check_hooks(args[2])
        t = args[0]
        return _Tensor(t.storage, t.dtype, t.offset, t.shape, t.stride, t.metadata, parameter=True)
    if budget.general:
        return _Opaque(name, list(args))
    raise _Unsupported(f"the pickle calls {name}, which is not a tensor rebuild function")


def _call_general(name: str, args: tuple[object, ...], budget: _Budget) -> object | None:
    """The general reading's extra callables; None for the plain ones and opaque calls."""
    n = len(args)
    if name in ("torch._tensor._rebuild_from_type_v2", "torch._tensor._rebuild_from_type"):
        # a tensor subclass: the tensor is func(*args); the subclass and its state are dropped
        # by the worker (returned as a plain tensor), so only the inner rebuild matters
        if n >= 3 and isinstance(args[2], tuple):
            inner = _call(args[0], args[2], budget)
            if n == 4 and isinstance(inner, _Tensor) and not _harmless_state(args[3]):
                inner.tainted = True  # state that may replace the data (``data``, a class)
            return inner
        return _Opaque(name, list(args))
    if name == "torch._utils._rebuild_parameter_with_state":
        if n == 4 and isinstance(args[0], _Tensor) and isinstance(args[1], bool):
            _check_hooks(args[2])
            t = args[0]
            p = _Tensor(t.storage, t.dtype, t.offset, t.shape, t.stride, t.metadata, parameter=True)
            p.tainted = t.tainted or not _harmless_state(args[3])
            return p
        return _Opaque(name, list(args))
    if name == "torch._utils._rebuild_qtensor":
        # (storage, offset, size, stride, quantizer params, requires_grad, hooks): the storage
        # holds the integer representation, which the sandbox returns as ``<name>.int_repr``
        # (the quantizer's per-channel tensors are read where the params build them)
        if n == 7 and isinstance(args[0], _Storage):
            t = _make_tensor(args[0], args[1], args[2], args[3], None, None)
            q = _quantizer(t, args[4])
            if q is not None:
                budget.quantizers.add(q)
            return t
        return _Opaque(name, list(args))
    if name == "torch._utils._rebuild_sparse_tensor":
        # (layout, (indices, values, size[, coalesced])) or, compressed, (layout,
        # (compressed indices, plain indices, values, size)): the parts are tensors found like
        # any other; the size is a torch.Size of literals, which the skeleton must repeat
        size = _sparse_size(args)
        if size is not None:
            budget.sparse_sizes.add(size)
        return _Opaque(name, list(args))
    if name == "builtins.bytes" and n == 0:  # protocol 2 pickles b"" as bytes()
        return b""
    if name == "builtins.bytearray" and n == 0:
        return bytearray()
    if (
        name == "builtins.bytearray"
        and n == 2
        and isinstance(args[0], str)
        and args[1] in ("latin1", "latin-1")
    ):
        try:
            return bytearray(args[0].encode("latin-1"))
        except UnicodeEncodeError:
            return _Opaque(name, list(args))
    if name in _NP_RECONSTRUCT:
        return _NpArray()
    if name == "numpy.dtype":
        if n >= 1 and isinstance(args[0], str) and _NP_CODE.fullmatch(args[0]):
            return _NpDtype(args[0])
        return _Opaque(name, list(args))
    if name in _NP_SCALAR:
        if n == 2 and isinstance(args[0], _NpDtype) and isinstance(args[1], bytes):
            a = _NpArray()
            a.dtype, a.data = args[0], args[1]
            return a
        return _Opaque(name, list(args))
    if name in _NP_FROMBUFFER:
        if (
            n == 4
            and isinstance(args[0], (bytes, bytearray))
            and isinstance(args[1], _NpDtype)
            and args[3] in ("C", "F")
        ):
            a = _NpArray()
            a.data, a.dtype, a.fortran = bytes(args[0]), args[1], args[3] == "F"
            a.shape = _int_tuple(args[2], "shape") if isinstance(args[2], (tuple, list)) else ()
            return a
        return _Opaque(name, list(args))
    return None


#: a quantized tensor's quantizer as the worker returns it (its composite's kind and the
#: parameters that are not tensors), with the dtype and shape of its integer values:
#: ("quantized_per_tensor", dtype, shape, scale, zero point) or ("quantized_per_channel",
#: dtype, shape, axis)
Quantizer = tuple[object, ...]


#: a sparse tensor's size with the dtype of its values: (dtype, size)
SparseSize = tuple[str, tuple[int, ...]]


def _sparse_size(args: tuple[object, ...]) -> SparseSize | None:
    """The (values dtype, size) of a ``_rebuild_sparse_tensor`` call, where both are literals."""
    data = args[1] if len(args) == 2 else None
    if not isinstance(data, tuple) or len(data) not in (3, 4):
        return None
    # COO: (indices, values, size[, coalesced]); compressed: (crow, col, values, size)
    values, size = (data[1], data[2]) if not isinstance(data[2], _Tensor) else (data[2], data[3])
    if not isinstance(values, _Tensor) or not isinstance(size, _Opaque) or size.name != "torch.Size":
        return None
    dims = size.parts[0] if len(size.parts) == 1 else None  # torch.Size's one argument
    if not isinstance(dims, (tuple, list)) or not all(_is_int(d) for d in dims):
        return None
    return (values.dtype, tuple(dims))


def _quantizer(t: _Tensor, params: object) -> Quantizer | None:
    """The quantizer of ``t`` that ``_rebuild_qtensor``'s parameters describe, where they are
    literals (else None: none the file describes, so a returned one is unverified)."""
    if not isinstance(params, tuple) or not params or not isinstance(params[0], _Global):
        return None
    scheme = params[0].name
    if scheme == "torch.per_tensor_affine" and len(params) == 3:
        scale, zero = params[1], params[2]
        if isinstance(scale, float) and _is_int(zero):
            return ("quantized_per_tensor", t.dtype, t.shape, scale, zero)
    if scheme == "torch.per_channel_affine" and len(params) == 4 and _is_int(params[3]):
        return ("quantized_per_channel", t.dtype, t.shape, params[3])
    return None


def _harmless_state(state: object) -> bool:
    """State set on a rebuilt tensor that cannot change its values: plain attributes (a flag a
    library attaches to a parameter) other than the ones that reach the data."""
    if state is None:
        return True
    if isinstance(state, tuple) and len(state) == 2:
        return all(_harmless_state(s) for s in state)
    if not isinstance(state, dict):
        return False
    return all(
        isinstance(k, str)
        and not k.startswith("_data")
        and k not in ("data", "grad", "real", "imag", "__class__", "__dict__")
        and (v is None or isinstance(v, (bool, int, float, str)))
        for k, v in state.items()
    )


def _resolve_global(module: str, name: str, proto: int, budget: _Budget) -> object:
    module, name = resolve_name(module, name, proto)
    if module == "torch.tensor":  # torch's load_module_mapping
        module = "torch._tensor"
    if "Storage" in name:
        st = _storage_type(name)
        if st is not None and st.name != "UntypedStorage":
            return st
        if f"{module}.{name}" in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
            return _StorageType("UntypedStorage", "uint8")
    full = f"{module}.{name}"
    if full in _REBUILDERS or full in ("collections.OrderedDict", "_codecs.encode"):
        return _Global(full)
    if module == "torch":
        dtype = _DTYPE_ALIASES.get(name, name)
        if dtype in P.TORCH_DTYPES:
            return _Dtype(dtype)
    if budget.general:
        return _Global(full)  # inert: calling it gives an _Opaque, unless _call_general knows it
    raise _Unsupported(f"the pickle imports {full}, which a plain state_dict does not need")


def _evaluate(
    buf: Buf, start: int, end: int, persistent: _Persistent | None, budget: _Budget
) -> tuple[object, int]:
    """Evaluate one pickle stream in ``buf[start:end]``; returns (value, offset after STOP).

    Raises ``_Unsupported`` for anything a plain ``torch.save`` of a state_dict does not write
    and for every error the real unpickler would raise.
    """
    try:
        return _interpret(buf, start, end, persistent, budget)
    except Fault as exc:
        raise _Unsupported(exc.message) from None


def _interpret(
    buf: Buf, pos: int, end: int, persistent: _Persistent | None, budget: _Budget
) -> tuple[object, int]:
    """The reconstruction's interpreter over the shared opcode decoder (see :func:`_evaluate`)."""
    proto = 0
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def fence() -> int:
        return marks[-1] if marks else 0

    def pop() -> object:
        if len(stack) <= fence():
            raise _Unsupported("unpickling stack underflow")
        return stack.pop()

    def top() -> object:
        if len(stack) <= fence():
            raise _Unsupported("unpickling stack underflow")
        return stack[-1]

    def pop_mark() -> list[object]:
        if not marks:
            raise _Unsupported("pickle has no MARK where one is needed")
        k = marks.pop()
        items = stack[k:]
        del stack[k:]
        return items

    def put(idx: int) -> None:
        if idx not in memo and len(memo) >= _MAX_MEMO:
            raise _Unsupported(f"more than {_MAX_MEMO} memo entries")
        memo[idx] = top()

    def setitems(target: object, items: list[object]) -> None:
        if budget.general and isinstance(target, _Opaque):
            target.parts.extend(items)  # a dict subclass, or __setitem__ of anything
            return
        if not isinstance(target, dict):
            raise _Unsupported("SETITEM(S) on something that is not a dict")
        try:
            for i in range(0, len(items), 2):
                key = items[i]
                if not _plain_key(key):
                    if not budget.general:
                        raise _Unsupported("a dict key is not a str/int/float/bool/None/bytes/tuple")
                    key = _Opaque("<key>", [key])
                target[key] = items[i + 1]
        except TypeError:
            if not budget.general:
                raise _Unsupported("unhashable dict key") from None
            for i in range(0, len(items), 2):  # keep the values: tensors may hide there
                target[_Opaque("<key>", [items[i]])] = items[i + 1]

    while True:
        budget.ops += 1
        if budget.ops > _MAX_OPS:
            raise _Unsupported(f"more than {_MAX_OPS} pickle opcodes")
        if not budget.ops & 0xFFFF:
            budget.check()
        op, arg, pos = step(buf, pos, end)
        if op == 0x80:  # PROTO
            proto = arg
        elif op == 0x95:  # FRAME: a length the unpickler does not need
            pass
        elif op == 0x2E:  # STOP
            return pop(), pos
        elif op == 0x28:  # MARK
            marks.append(len(stack))
        elif op == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif op == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif op == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif op == 0x74:  # TUPLE
            stack.append(tuple(pop_mark()))
        elif op in (0x85, 0x86, 0x87):  # TUPLE1/2/3
            n = op - 0x84
            if len(stack) - fence() < n:
                raise _Unsupported("unpickling stack underflow")
            items = stack[len(stack) - n :]
            del stack[len(stack) - n :]
            stack.append(tuple(items))
        elif op == 0x6C:  # LIST
            stack.append(pop_mark())
        elif op == 0x64:  # DICT
            items = pop_mark()
            if len(items) % 2:
                raise _Unsupported("odd number of items for DICT")
            d: dict[object, object] = {}
            setitems(d, items)
            stack.append(d)
        elif op == 0x73:  # SETITEM
            value = pop()
            key = pop()
            setitems(top(), [key, value])
        elif op == 0x75:  # SETITEMS
            items = pop_mark()
            if len(items) % 2:
                raise _Unsupported("odd number of items for SETITEMS")
            setitems(top(), items)
        elif op == 0x61 or op == 0x65:  # APPEND / APPENDS
            items = [pop()] if op == 0x61 else pop_mark()
            target = top()
            if budget.general and isinstance(target, _Opaque):
                target.parts.extend(items)
            elif not isinstance(target, list):
                raise _Unsupported("APPEND(S) to something that is not a list")
            else:
                target.extend(items)
        elif op == 0x71 or op == 0x72:  # BINPUT / LONG_BINPUT
            put(arg)
        elif op == 0x94:  # MEMOIZE
            put(len(memo))
        elif op == 0x68 or op == 0x6A:  # BINGET / LONG_BINGET
            if arg not in memo:
                raise _Unsupported(f"memo value not found at index {arg}")
            stack.append(memo[arg])
        elif op in (0x4B, 0x4D, 0x4A, 0x47):  # BININT1 / BININT2 / BININT / BINFLOAT
            stack.append(arg)
        elif op == 0x8A or op == 0x8B:  # LONG1 / LONG4
            if arg is BIG_INT:
                raise _Unsupported("integer literal longer than 64 bytes")
            stack.append(arg)
        elif op == 0x4E:  # NONE
            stack.append(None)
        elif op == 0x88:  # NEWTRUE
            stack.append(True)
        elif op == 0x89:  # NEWFALSE
            stack.append(False)
        elif op in (0x58, 0x8C, 0x8D):  # BINUNICODE / SHORT_BINUNICODE / BINUNICODE8
            stack.append(text(buf, arg))
        elif op in (0x42, 0x43, 0x8E):  # BINBYTES / SHORT_BINBYTES / BINBYTES8
            stack.append(bytes(buf[arg[0] : arg[1]]))
        elif op == 0x63:  # GLOBAL
            stack.append(_resolve_global(arg[0], arg[1], proto, budget))
        elif op == 0x93:  # STACK_GLOBAL
            name_v = pop()
            module_v = pop()
            if not isinstance(module_v, str) or not isinstance(name_v, str):
                raise _Unsupported("STACK_GLOBAL operands are not strings")
            stack.append(_resolve_global(module_v, name_v, proto, budget))
        elif op == 0x52:  # REDUCE
            args = pop()
            func = pop()
            stack.append(_call(func, args, budget))
        elif op == 0x62:  # BUILD
            state = pop()
            inst = top()
            if budget.general and not isinstance(inst, (dict, list, tuple)):
                _build_general(inst, state, budget)
            elif not isinstance(inst, collections.OrderedDict) or not _attr_state(state):
                raise _Unsupported("BUILD (setstate) on something other than an OrderedDict's attributes")
        elif op == 0x51:  # BINPERSID
            pid = pop()
            if persistent is None:
                raise _Unsupported("a persistent id where torch has no persistent_load")
            stack.append(persistent(pid))
        elif op in STACK_OPS:  # POP / POP_MARK / DUP
            stack_op(op, stack, marks, pop, pop_mark, top)
        elif budget.general and op in _GENERAL_OPS:
            _general_op(op, stack, pop, pop_mark, budget)
        elif budget.general and op == 0x69:  # INST module\nname\n, MARK args
            stack.append(_Opaque(f"{arg[0]}.{arg[1]}", pop_mark()))
        elif budget.general and op in (0x55, 0x54):  # SHORT_BINSTRING / BINSTRING
            stack.append(bytes(buf[arg[0] : arg[1]]).decode("latin-1"))
        elif budget.general and op == 0x96:  # BYTEARRAY8
            stack.append(bytearray(bytes(buf[arg[0] : arg[1]])))
        elif budget.general and op in (0x82, 0x83, 0x84):  # EXT1/2/4: copyreg's registry
            stack.append(_Global(f"<extension {arg}>"))
        else:
            raise _Unsupported(f"pickle opcode 0x{op:02x} is not one torch.save writes for a state_dict")


_GENERAL_OPS = frozenset({0x81, 0x92, 0x6F, 0x8F, 0x90, 0x91})


def _general_op(
    op: int,
    stack: list[object],
    pop: Callable[[], object],
    pop_mark: Callable[[], list[object]],
    budget: _Budget,
) -> None:
    """The general reading's object and set opcodes: every new object is inert."""
    if op == 0x81:  # NEWOBJ cls args
        args = pop()
        cls = pop()
        stack.append(_Opaque(getattr(cls, "name", "<class>"), [cls, args]))
    elif op == 0x92:  # NEWOBJ_EX cls args kwargs
        kwargs = pop()
        args = pop()
        cls = pop()
        stack.append(_Opaque(getattr(cls, "name", "<class>"), [cls, args, kwargs]))
    elif op == 0x6F:  # OBJ: MARK cls args...
        items = pop_mark()
        if not items:
            raise _Unsupported("OBJ without a class")
        stack.append(_Opaque(getattr(items[0], "name", "<class>"), items))
    elif op == 0x8F:  # EMPTY_SET: kept as a list (members may be unhashable stand-ins)
        stack.append(_Opaque("builtins.set", []))
    elif op == 0x90:  # ADDITEMS
        items = pop_mark()
        target = stack[-1] if stack else None
        if not isinstance(target, _Opaque):
            raise _Unsupported("ADDITEMS to something that is not a set")
        target.parts.extend(items)
    else:  # FROZENSET
        stack.append(_Opaque("builtins.frozenset", pop_mark()))


def _build_general(inst: object, state: object, budget: _Budget) -> None:
    """BUILD in the general reading: numpy arrays and dtypes take their state; a tensor whose
    state is set may have other values than its record; any other object keeps the state."""
    if isinstance(inst, _Opaque):
        inst.parts.append(state)
    elif isinstance(inst, _NpDtype):
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            inst.order = str(state[1])
    elif isinstance(inst, _NpArray):
        # ndarray.__setstate__: (version, shape, dtype, is_fortran, data)
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4 or inst.data is not None:
            raise _Unsupported("numpy array state is not (shape, dtype, fortran, data)")
        shape, dtype, fortran, data = state
        if (
            isinstance(dtype, _NpDtype)
            and isinstance(data, (bytes, bytearray))
            and isinstance(fortran, bool)
            and isinstance(shape, (tuple, list))
        ):
            inst.shape, inst.dtype, inst.fortran = _int_tuple(shape, "shape"), dtype, fortran
            inst.data = bytes(data)
        # else: an object array (data is a list) or something odd: not a numeric array
    elif isinstance(inst, _Tensor):
        if not _harmless_state(state):
            inst.tainted = True  # Tensor.__setstate__ can set_() another storage
    else:
        raise _Unsupported("BUILD (setstate) on a value that has no state")


def _plain_key(key: object) -> bool:
    if key is None or isinstance(key, (str, int, float, bytes)):
        return True
    return isinstance(key, tuple) and all(_plain_key(k) for k in key)


def _attr_state(state: object) -> bool:
    """A BUILD state that only sets instance attributes (``state_dict._metadata``)."""
    if isinstance(state, tuple) and len(state) == 2:
        return all(s is None or isinstance(s, dict) for s in state)
    return state is None or isinstance(state, dict)


def _decode_ascii(v: object) -> object:
    return v.decode("ascii", "replace") if isinstance(v, bytes) else v


# --------------------------------------------------------------------------------------------
# Naming, as the worker's extractor does it
# --------------------------------------------------------------------------------------------


class _Namer(P.TensorNames):
    """The tensors of a value in the order the worker's extractor names them (its naming state,
    exactly: :class:`sandbox._worker._protocol.TensorNames`)."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, _Tensor]] = []
        #: every path at which each named tensor lies (an object met again keeps its name)
        self.paths: dict[str, list[tuple[str, ...]]] = {}
        #: the sparse and nested tensors (rebuilt by a call the general reading keeps opaque)
        #: and the paths at which each lies, by object
        self.composites: dict[int, list[tuple[str, ...]]] = {}

    def walk(self, obj: object, path: tuple[str, ...] = (), depth: int = 0) -> None:
        self.nodes += 1
        if self.nodes > P.MAX_SKELETON_NODES:
            raise _Unsupported(f"more than {P.MAX_SKELETON_NODES} values")
        if depth > P.MAX_SKELETON_DEPTH:
            return  # the worker makes it opaque: no tensors from here
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return
        if isinstance(obj, _Tensor):
            name, new = self.name_of(obj, path)
            if new:
                self.order.append((name, obj))
            self.paths.setdefault(name, []).append(path)
            return
        if isinstance(obj, _Opaque) and obj.name in _COMPOSITE_REBUILDS:
            self.composites.setdefault(id(obj), []).append(path)
            return
        if not isinstance(obj, (dict, list, tuple)):
            return  # a storage, dtype or class as a value: no tensor, opaque or a leaf
        if id(obj) in self.active:
            return  # a reference cycle: opaque in the worker
        self.active.add(id(obj))
        try:
            if isinstance(obj, dict):
                for key, value in obj.items():
                    comp = P.path_component(key)
                    self.walk(key, path + (comp, "<key>"), depth + 1)
                    self.walk(value, path + (comp,), depth + 1)
            else:
                for i, value in enumerate(obj):
                    self.walk(value, path + (str(i),), depth + 1)
        finally:
            self.active.discard(id(obj))


# --------------------------------------------------------------------------------------------
# Formats: where each root storage's bytes are
# --------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """What a format's loader produced: the object, and where each root storage's bytes are."""

    value: object
    # root storage -> (file offset of its bytes, bytes the file holds for it, bytes claimed)
    regions: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    swap: bool = False
    findings: list[Finding] = field(default_factory=list)


def _storage_claims(
    claims: dict[object, _Storage], key: object, stype: object, numel: object, *, legacy: bool = False
) -> _Storage:
    """persistent_load's cache: the first record of a key fixes its dtype and size."""
    try:
        cached = claims.get(key)
    except TypeError:
        raise _Unsupported("unhashable storage key") from None
    if cached is not None:
        return cached
    if not isinstance(stype, _StorageType):
        raise _Unsupported("storage record without a storage type")
    if not _is_int(numel) or not isinstance(numel, int) or numel < 0:
        raise _Unsupported("storage record with an invalid element count")
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise _Unsupported("storage key is not a string or an integer")
    if legacy and stype.name == "UntypedStorage":
        raise _Unsupported("a legacy file names an UntypedStorage; torch's legacy loader fails on it")
    storage = _Storage(str(key), stype.dtype, 0, numel * _element_size(stype.dtype))
    claims[key] = storage
    return storage


def _zip_layout(buf: Buf, budget: _Budget) -> _Layout:
    z = find_zip(buf)
    if z is None or z.shift or z.disagreement is not None:
        raise _Unsupported("the zip directory cannot be located unambiguously")
    target, matches, prefix = torch_target(z.entries)
    if target is None or prefix is None or len(matches) != 1:
        raise _Unsupported("no single <prefix>/data.pkl")
    by_name: dict[bytes, list[ZipEntry]] = {}
    for e in z.entries:
        by_name.setdefault(e.name.lower(), []).append(e)

    def record(name: str) -> ZipEntry | None:
        found = by_name.get((prefix + b"/" + name.encode()).lower(), [])
        if len(found) > 1:
            raise _Unsupported(f"more than one zip member is named {name}")
        return found[0] if found else None

    def stored(e: ZipEntry) -> tuple[int, int]:
        if e.method != 0:
            raise _Unsupported(
                f"zip member {e.text} is compressed (method {e.method}); torch's "
                "mmap reader would use its compressed bytes"
            )
        return e.data_start, e.csize

    out = _Layout(value=None)
    order = record("byteorder")
    if order is not None:
        at, n = stored(order)
        mark = bytes(buf[at : at + min(n, 16)])
        if mark not in (b"little", b"big"):
            raise _Unsupported("byteorder record is neither 'little' nor 'big'")
        out.swap = mark == b"big"
    claims: dict[object, _Storage] = {}

    def persistent(pid: object) -> object:
        if not isinstance(pid, tuple) or len(pid) != 5 or _decode_ascii(pid[0]) != "storage":
            raise _Unsupported("persistent id is not a ('storage', type, key, location, numel) record")
        return _storage_claims(claims, pid[2], pid[1], pid[4])

    at, n = stored(matches[0])
    out.value, _ = _evaluate(buf, at, at + n, persistent, budget)
    for storage in claims.values():
        member = record(f"data/{storage.root}")
        if member is None:
            raise _Unsupported(f"storage {storage.root} has no data/{storage.root} record")
        start, size = stored(member)
        out.regions[storage.root] = (start, min(size, storage.nbytes), storage.nbytes)
        if size != storage.nbytes:
            out.findings.append(
                Finding(
                    rule="storage-size-mismatch",
                    severity=Severity.MEDIUM,
                    category="evasion",
                    message=(
                        f"zip record data/{storage.root} holds {size} bytes but its storage "
                        f"claims {storage.nbytes}; torch's mmap reader reads the claimed size "
                        "from the record's start"
                    ),
                    evidence={"storage": storage.root, "record_bytes": size, "claimed_bytes": storage.nbytes},
                )
            )
    return out


def _legacy_layout(buf: Buf, budget: _Budget) -> _Layout:
    size = len(buf)
    magic, p = _evaluate(buf, 0, size, None, budget)
    if magic != LEGACY_MAGIC:
        raise _Unsupported("legacy file does not start with torch's magic number")
    version, p = _evaluate(buf, p, size, None, budget)
    if version != _LEGACY_PROTOCOL_VERSION:
        raise _Unsupported(f"legacy protocol version {version!r}; torch refuses the file")
    _, p = _evaluate(buf, p, size, None, budget)  # sys_info
    claims: dict[object, _Storage] = {}
    views: dict[object, _Storage] = {}

    def persistent(pid: object) -> object:
        if budget.general and isinstance(pid, tuple) and pid and _decode_ascii(pid[0]) == "module":
            return _Global("<module class>")  # (type, source file, source): the class itself
        if not isinstance(pid, tuple) or len(pid) != 6 or _decode_ascii(pid[0]) != "storage":
            raise _Unsupported("persistent id is not a legacy storage record")
        root = _storage_claims(claims, pid[2], pid[1], pid[4], legacy=True)
        meta = pid[5]
        if meta is None:
            return root
        if not isinstance(meta, tuple) or len(meta) != 3 or not all(_is_int(x) for x in meta[1:]):
            raise _Unsupported("storage view metadata is not (key, offset, size)")
        try:
            if meta[0] in views:
                return views[meta[0]]
        except TypeError:
            raise _Unsupported("unhashable storage view key") from None
        elem = _element_size(root.dtype)
        off, n = meta[1], meta[2]
        if not isinstance(off, int) or not isinstance(n, int) or off < 0 or n < 0:
            raise _Unsupported("negative storage view offset or size")
        view = _Storage(root.root, root.dtype, root.offset + off * elem, n * elem)
        views[meta[0]] = view
        return view

    out = _Layout(value=None)
    out.value, p = _evaluate(buf, p, size, persistent, budget)
    keys, p = _evaluate(buf, p, size, None, budget)
    if not isinstance(keys, list):
        raise _Unsupported("the storage-keys record is not a list")
    by_root = {str(k): s for k, s in claims.items()}
    for key in keys:
        try:
            storage = claims.get(key)
        except TypeError:
            raise _Unsupported("unhashable storage key in the keys list") from None
        if storage is None:
            raise _Unsupported(f"storage key {key!r} is listed but no tensor names it")
        if p + 8 > size:
            raise _Unsupported("the file ends inside the raw storages")
        count = int.from_bytes(buf[p : p + 8], "little", signed=True)
        nbytes = count * _element_size(storage.dtype)
        if count < 0 or nbytes != storage.nbytes:
            raise _Unsupported(
                f"storage {storage.root} holds {count} elements on disk but "
                f"{storage.nbytes // _element_size(storage.dtype)} in its record; "
                "torch refuses the file"
            )
        if p + 8 + nbytes > size:
            raise _Unsupported("the file ends inside the raw storages")
        out.regions[storage.root] = (p + 8, nbytes, nbytes)
        p += 8 + nbytes
    for root in by_root:
        if root not in out.regions:
            out.findings.append(
                Finding(
                    rule="storage-data-missing",
                    severity=Severity.MEDIUM,
                    category="evasion",
                    message=f"storage {root} is used by a tensor but the file holds no data for it; "
                    "torch leaves its memory uninitialised",
                    evidence={"storage": root},
                )
            )
            out.regions[root] = (0, 0, by_root[root].nbytes)
    return out


def _tar_layout(buf: Buf, budget: _Budget) -> _Layout:
    members, odd, capped = tar_archive.members(buf)
    if odd or capped:
        raise _Unsupported("the tar archive has members that are not plain files")
    for name in ("storages", "tensors", "pickle"):
        if name not in members:
            raise _Unsupported(f"the tar archive has no {name!r} member")
    out = _Layout(value=None)
    objects: dict[object, object] = {}

    def count_of(value: object, what: str) -> int:
        if not _is_int(value) or not isinstance(value, int) or value < 0:
            raise _Unsupported(f"tar member {what!r} does not start with a count")
        return value

    def storage_of(key: object, key_name: str, unknown: str) -> _Storage:
        """The storage recorded under ``key``; errors name the key ``key_name``."""
        try:
            found = objects.get(key)
        except TypeError:
            raise _Unsupported(f"unhashable tar storage {key_name}") from None
        if not isinstance(found, _Storage):
            raise _Unsupported(unknown)
        return found

    start, length = members["storages"][-1]  # tarfile (and torch) use the last copy
    end = start + length
    n, p = _evaluate(buf, start, end, None, budget)
    for _ in range(count_of(n, "storages")):
        rec, p = _evaluate(buf, p, end, None, budget)
        if (
            not isinstance(rec, tuple)
            or len(rec) != 3
            or not isinstance(rec[2], _StorageType)
            or rec[2].name == "UntypedStorage"
        ):
            raise _Unsupported("tar storage entry is not (key, location, typed storage type)")
        elem = _element_size(rec[2].dtype)
        if p + 8 > end:
            raise _Unsupported("tar storage header is truncated")
        numel = int.from_bytes(buf[p : p + 8], "little", signed=True)
        if numel < 0 or p + 8 + numel * elem > end:
            raise _Unsupported("tar storage data is truncated")
        try:
            root = f"storage:{len(out.regions)}"
            objects[rec[0]] = _Storage(root, rec[2].dtype, 0, numel * elem)
        except TypeError:
            raise _Unsupported("unhashable tar storage key") from None
        out.regions[root] = (p + 8, numel * elem, numel * elem)
        p += 8 + numel * elem
    views, p = _evaluate(buf, p, end, None, budget)
    if not isinstance(views, list):
        raise _Unsupported("tar storage views are not a list")
    for v in views:
        if not isinstance(v, tuple) or len(v) != 4 or not all(_is_int(x) for x in v[2:]):
            raise _Unsupported("tar storage view is not (key, root, offset, numel)")
        root_s = storage_of(v[1], "key", "tar storage view of an unknown storage")
        elem = _element_size(root_s.dtype)
        off, cnt = v[2], v[3]
        assert isinstance(off, int) and isinstance(cnt, int)
        if off < 0 or cnt < 0:
            raise _Unsupported("negative tar storage view offset or size")
        objects[v[0]] = _Storage(root_s.root, root_s.dtype, root_s.offset + off * elem, cnt * elem)

    start, length = members["tensors"][-1]
    end = start + length
    n, p = _evaluate(buf, start, end, None, budget)
    for _ in range(count_of(n, "tensors")):
        rec, p = _evaluate(buf, p, end, None, budget)
        if not isinstance(rec, tuple) or len(rec) != 3:
            raise _Unsupported("tar tensor entry is not (key, storage id, type)")
        storage = storage_of(rec[1], "id", "tar tensor names an unknown storage")
        if p + 8 > end:
            raise _Unsupported("tar tensor header is truncated")
        ndim = int.from_bytes(buf[p : p + 4], "little", signed=True)
        if ndim < 0 or ndim > P.MAX_NDIM or p + 8 + 16 * ndim + 8 > end:
            raise _Unsupported("tar tensor header is truncated or has too many dimensions")
        q = p + 8
        shape = struct.unpack_from(f"<{ndim}q", buf, q)
        stride = struct.unpack_from(f"<{ndim}q", buf, q + 8 * ndim)
        (offset,) = struct.unpack_from("<q", buf, q + 16 * ndim)
        p = q + 16 * ndim + 8
        try:
            objects[rec[0]] = made = _make_tensor(storage, offset, shape, stride, None, None)
            if budget.general:
                budget.made.append(made)
        except TypeError:
            raise _Unsupported("unhashable tar tensor key") from None

    def persistent(pid: object) -> object:
        if isinstance(pid, tuple):
            raise _Unsupported("the tar pickle restores a module container")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise _Unsupported("tar persistent id is not a key")
        try:
            obj = objects[int(pid)]
        except (ValueError, KeyError):
            raise _Unsupported(f"tar persistent id {pid!r} names nothing") from None
        return obj

    start, length = members["pickle"][-1]
    out.value, _ = _evaluate(buf, start, start + length, persistent, budget)
    return out


# --------------------------------------------------------------------------------------------
# Building tensors from bytes
# --------------------------------------------------------------------------------------------


def _storage_copy(buf: Buf, start: int, size: int, swap_as: str | None) -> bytearray:
    """A writable copy of a storage's bytes (torch.frombuffer needs one), byte-swapped by the
    dtype ``swap_as`` of the record that created it when the archive is big-endian (as torch
    does)."""
    import torch

    with memoryview(buf) as file_view:
        with file_view[start : start + size] as region:
            raw = bytearray(region)
    unit = _swap_unit(swap_as) if swap_as is not None else 1
    whole = len(raw) - len(raw) % unit
    if unit > 1 and whole:
        base = torch.frombuffer(raw, dtype=torch.uint8, count=whole)
        base.view(-1, unit).copy_(base.view(-1, unit).flip(1))
    return raw


def row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a strided view's elements are one run in row-major order (size-1 dimensions
    may have any stride)."""
    step = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and s != step:
            return False
        step *= d
    return True


def _swap_unit(dtype: str) -> int:
    size = _element_size(dtype)
    return size // 2 if dtype.startswith("complex") else size


def _materialise(
    layout: _Layout,
    named: list[tuple[str, _Tensor]],
    buf: Buf,
    fmt: str,
    *,
    keep_data: bool,
    budget: _Budget,
    spans: dict[str, tuple[int, int]] | None = None,
) -> Reconstruction:
    """The tensors ``named`` describes, each with its digest. ``spans``: a tensor whose bytes
    lie in the file as they are (row-major, native order, no metadata bits) is not hashed: its
    byte range in the file goes into ``spans`` by name, and its ``sha256`` is empty."""
    import torch

    from sandbox._convert import tensor_digest

    findings = list(layout.findings)
    unreadable: set[str] = set()
    tensors: dict[str, StaticTensor] = {}
    by_root: dict[str, list[tuple[str, _Tensor]]] = collections.defaultdict(list)
    for name, t in named:
        by_root[t.storage.root].append((name, t))
    for root, uses in by_root.items():
        budget.check()
        start, available, _claimed = layout.regions[root]
        raw: bytearray | None = None  # the storage's bytes, copied only when torch needs them
        # one digest per distinct view: a module's Parameter and the tensor it wraps, or two
        # names for one tensor, are the same bytes (hashed once)
        seen: dict[tuple[object, ...], tuple[str, bytes | None]] = {}
        seen_as: dict[tuple[object, ...], str] = {}  # the first name of each
        for name, t in uses:
            elem = _element_size(t.dtype)
            numel = 1
            for d in t.shape:
                numel *= d
            first = t.storage.offset + t.offset * elem
            last = first + elem * (1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True)))
            window = min(t.storage.offset + t.storage.nbytes, available)
            if numel and last > window:
                unreadable.add(name)
                findings.append(
                    Finding(
                        rule="storage-too-short",
                        severity=Severity.MEDIUM,
                        category="evasion",
                        message=(
                            f"tensor {name} needs bytes {first}..{last} of storage {root} but "
                            f"the file holds only {window}; torch would read memory that is not "
                            "the file's"
                        ),
                        evidence={"tensor": name, "storage": root, "needs_bytes": last, "has_bytes": window},
                    )
                )
                continue
            data: bytes | None = None
            same = (t.storage.offset, t.storage.dtype, t.dtype, t.offset, t.shape, t.stride, t.metadata)
            if same in seen:
                digest, data = seen[same]
                if spans is not None and not digest:
                    spans[name] = spans[seen_as[same]]
                if t.metadata:
                    findings.append(_metadata_finding(name, dict(t.metadata)))
            elif (
                numel
                and not keep_data
                and not layout.swap
                and not t.metadata
                and row_major(t.shape, t.stride)
            ):
                # the common case: the digest of the file's own bytes, with no torch (or,
                # where the caller compares bytes, only where those bytes are)
                if spans is not None:
                    digest, spans[name] = "", (start + first, start + last)
                else:
                    digest = sha256_region(buf, start + first, start + last)
            else:
                dtype = getattr(torch, t.dtype)
                if numel:
                    if raw is None:
                        raw = _storage_copy(
                            buf, start, available, uses[0][1].storage.dtype if layout.swap else None
                        )
                    flat = torch.frombuffer(raw, dtype=torch.uint8, offset=first, count=last - first)
                    view = flat.view(dtype).as_strided(t.shape, t.stride, 0)
                else:
                    view = torch.empty(t.shape, dtype=dtype)
                meta = dict(t.metadata)
                if meta:
                    view = view.clone()
                    try:
                        torch._utils.set_tensor_metadata(view, meta)  # type: ignore[no-untyped-call]
                        view = view.resolve_conj().resolve_neg()
                    except (RuntimeError, NotImplementedError):
                        raise _Unsupported(
                            f"torch cannot set the {'/'.join(meta)} bit on a {t.dtype} tensor; the load fails"
                        ) from None
                    findings.append(_metadata_finding(name, meta))
                data = (
                    view.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    if keep_data and numel
                    else (b"" if keep_data else None)
                )
                digest = tensor_digest(view)
            seen[same] = (digest, data)
            seen_as.setdefault(same, name)
            tensors[name] = StaticTensor(
                name=name,
                dtype=t.dtype,
                shape=t.shape,
                stride=t.stride,
                key=root,
                offset=t.offset,
                sha256=digest,
                data=data,
                metadata=t.metadata,
            )
    ordered = {name: tensors[name] for name, _ in named if name in tensors}
    return Reconstruction(
        format=fmt, tensors=ordered, unreadable=frozenset(unreadable), findings=tuple(findings)
    )


def _metadata_finding(name: str, meta: dict[str, bool]) -> Finding:
    """The finding for a tensor whose pickle sets its conj/neg bits."""
    return Finding(
        rule="tensor-metadata-bits",
        severity=Severity.MEDIUM,
        category="evasion",
        message=(
            f"the pickle sets the {'/'.join(meta)} bit on tensor {name}: the "
            "loaded values are not the stored bytes but their "
            + (
                "negation"
                if "neg" in meta and "conj" not in meta
                else "conjugate"
                if "neg" not in meta
                else "negated conjugate"
            )
        ),
        evidence={"tensor": name, "bits": sorted(meta)},
    )


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

_LAYOUTS: dict[str, Callable[[Buf, _Budget], _Layout]] = {
    "torch-zip": _zip_layout,
    "torch-legacy": _legacy_layout,
    "torch-tar": _tar_layout,
}


def _scanned(
    path: str | os.PathLike[str], scan: _scan.StaticScan | None
) -> _scan.StaticScan | NotReconstructed:
    """The static stage's scan when the caller has it, else a scan of ``path`` now."""
    if scan is not None:
        return scan
    try:
        return _scan.scan_file(path)
    except MalformedInput as exc:
        return NotReconstructed(f"the static scan could not read the file ({exc.message})")


def _foreign(scan: _scan.StaticScan) -> list[str]:
    """The globals a plain state dict does not import."""
    return sorted({g.qualname for g in scan.globals if g.classification != "allowed"})


def _tricky(scan: _scan.StaticScan) -> NotReconstructed | None:
    """Why the file has no single reading, when the static scan found container or stream
    tricks in it."""
    tricks = sorted({f.rule for f in scan.findings if f.category in ("evasion", "resource")})
    if not tricks:
        return None
    return NotReconstructed(
        f"the static scan found container or stream tricks ({', '.join(tricks)}); the file has "
        "no single reading",
        scan.format,
    )


def _named(value: object) -> list[tuple[str, _Tensor]]:
    """The tensors of ``value`` under the worker's names (plain containers only)."""
    return _walked(value).order


#: the calls that rebuild a tensor the worker returns as a composite of ordinary tensors (a
#: quantized one is rebuilt from its storage as any tensor is, and named like one)
_COMPOSITE_REBUILDS = frozenset(
    {"torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_nested_tensor"}
)


def _composite_paths(namer: _Namer) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Where the file puts each sparse or nested tensor that it puts in one place, by the name
    the worker gives its composite (that of its path; left out where a tensor's name is the
    same, so that the worker's may differ)."""
    out: dict[str, tuple[tuple[str, ...], ...]] = {}
    for where in namer.composites.values():
        if len(where) == 1 and "<key>" not in where[0]:
            name = P.tensor_name(where[0], set())
            if name not in namer.paths and "#" not in name:
                out[name] = (where[0],)
    return out


def _walked(value: object) -> _Namer:
    """The walk of ``value`` that names its tensors (plain containers only)."""
    namer = _Namer()
    namer.walk(value)
    if len(namer.order) > P.MAX_TENSORS:
        raise _Unsupported(f"more than {P.MAX_TENSORS} tensors")
    return namer


_R = TypeVar("_R")


def _guarded(fmt: str, read: Callable[[], _R]) -> _R | NotReconstructed:
    """``read()``, with every way file content can make it fail turned into the reason."""
    try:
        return read()
    except _Unsupported as exc:
        return NotReconstructed(exc.reason, fmt)
    except MalformedInput as exc:
        return NotReconstructed(f"the file could not be read ({exc.message})", fmt)
    except RecursionError:
        return NotReconstructed("the pickle nests containers too deeply", fmt)


def read(
    path: str | os.PathLike[str],
    scan: _scan.StaticScan | None = None,
    cancel: threading.Event | None = None,
    *,
    spans: bool = False,
) -> Reconstruction | Inventory | NotReconstructed:
    """The host's independent reading of the file: the plain reconstruction where it applies,
    else the general inventory (or why there is none), from one static scan. Runs nothing;
    never raises for file content. Setting ``cancel`` ends it soon after (the reason is then
    :data:`CANCELLED`). ``spans``: see :func:`try_inventory`."""
    scanned = _scanned(path, scan)
    if isinstance(scanned, NotReconstructed):
        return scanned
    rec = try_reconstruct(path, scan=scanned, cancel=cancel)
    if isinstance(rec, Reconstruction):
        return rec
    return try_inventory(path, scan=scanned, cancel=cancel, spans=spans)


def try_reconstruct(
    path: str | os.PathLike[str],
    *,
    keep_data: bool = False,
    scan: _scan.StaticScan | None = None,
    cancel: threading.Event | None = None,
) -> Reconstruction | NotReconstructed:
    """Rebuild every tensor of a plain state_dict at ``path`` from the file's raw records.

    Runs :func:`sandbox._scan.scan_file` first: the file must be a torch zip, legacy or legacy
    tar checkpoint whose pickles import only allowlisted globals, with no evasion finding (a
    parser-differential trick makes any static view of the file doubtful). Then the pickle is
    evaluated symbolically (see the module docstring) and each tensor's bytes are cut out of
    its storage record. With ``keep_data`` each :class:`StaticTensor` keeps its row-major
    bytes (memory: the tensors' total size); without it only their sha256 is kept, and at most
    one storage is in memory at a time. Never raises for file content: unreadable or unusual
    files give :class:`NotReconstructed`.
    """
    scanned = _scanned(path, scan)
    if isinstance(scanned, NotReconstructed):
        return scanned
    scan = scanned
    fmt = scan.format
    if fmt not in _LAYOUTS:
        return NotReconstructed(f"format {fmt} is not a torch checkpoint with raw storage records", fmt)
    foreign = _foreign(scan)
    if foreign:
        return NotReconstructed(
            "the pickle imports globals a plain state_dict does not: " + ", ".join(foreign[:5]), fmt
        )
    tricky = _tricky(scan)
    if tricky is not None:
        return tricky

    def rebuild() -> Reconstruction:
        budget = _Budget(cancel=cancel)
        with open_buffer(path) as buf:
            layout = _LAYOUTS[fmt](buf, budget)
            namer = _walked(layout.value)
            rec = _materialise(layout, namer.order, buf, fmt, keep_data=keep_data, budget=budget)
            return dataclasses.replace(rec, paths={n: tuple(namer.paths[n]) for n in rec.tensors})

    return _guarded(fmt, rebuild)


#: one tensor as (torch dtype name, shape, sha256 of its row-major native-order bytes)
Digest = tuple[str, tuple[int, ...], str]
#: one tensor the file stores as it is (row-major, native order): (torch dtype name, shape,
#: (begin, end) of its bytes in the file), compared byte for byte rather than hashed
Stored = tuple[str, tuple[int, ...], tuple[int, int]]

_NP_TORCH = {
    n: n
    for n in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
_MAX_INVENTORY_MEMBER = 1 << 31  # bytes of one npz member read to hash it


@dataclass(frozen=True)
class Inventory:
    """Every tensor and numeric numpy array a checkpoint's pickles build, wherever it sits in
    the structure (inside objects of any class, optimizer states, numpy arrays), as digests.

    The general reading behind it interprets the pickle like :func:`try_reconstruct`, except
    that a global it does not know is an inert stand-in and a call of one yields an inert
    object (whose arguments and state are still read): nothing is run, and no stand-in's
    behaviour is guessed. A tensor whose state is set after it was built (``__setstate__``
    that could swap its data) is left out, so what the loader returns for it is unverified.
    ``digests`` and ``stored`` hold what the file describes; a tensor the sandbox returns that
    is not among them was computed while loading. ``stored`` (read with ``spans=True``, for a
    host that holds the returned bytes) lists where the tensors the file stores as they are
    lie, by dtype and shape, instead of hashing them; ``digests`` then holds the rest."""

    format: str
    digests: frozenset[Digest]
    findings: tuple[Finding, ...] = ()
    #: tensors reachable from the top through plain dicts, lists and tuples only, by the name
    #: the worker gives them: the host compares these by name (a payload that rearranges a
    #: plain container after it was built is caught even when the bytes are the file's)
    named: Mapping[str, Digest | Stored] = field(default_factory=dict)
    stored: Mapping[tuple[str, tuple[int, ...]], tuple[tuple[int, int], ...]] = field(default_factory=dict)
    #: where each of ``named`` lies: every path (dict keys and list indices, as the worker
    #: writes them) through plain containers from the top at which the file puts it. The
    #: host rebuilds the returned structure from the sandbox's skeleton, so a tensor the
    #: skeleton puts at one of these paths must be the one named here
    paths: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    #: the quantizers of the quantized tensors the file describes (see :data:`Quantizer`):
    #: a returned quantized tensor's parameters must be one of them
    quantizers: frozenset[Quantizer] = frozenset()
    #: the sizes of the sparse tensors the file describes (see :data:`SparseSize`): a returned
    #: sparse tensor's size must be one of them
    sparse_sizes: frozenset[SparseSize] = frozenset()


def _np_digest(dtype: _NpDtype | str, shape: tuple[int, ...], fortran: bool, data: object) -> Digest | None:
    """The digest of a numeric numpy array as the worker returns it (native byte order,
    C-contiguous, as a torch tensor); None for arrays the worker does not return as tensors
    or that numpy would refuse to build."""
    import numpy as np

    code = dtype if isinstance(dtype, str) else dtype.order + dtype.code.lstrip("<>|=")
    if not _NP_CODE.fullmatch(code):
        return None
    try:
        dt = np.dtype(code)
    except TypeError:
        return None
    name = _NP_TORCH.get(dt.newbyteorder("=").name)
    if dt.kind not in _NP_KINDS or dt.fields is not None or dt.subdtype is not None or not name:
        return None
    numel = 1
    for d in shape:
        numel *= d
        if numel * dt.itemsize > len(data):  # type: ignore[arg-type]
            return None
    if numel * dt.itemsize != len(data) or len(shape) > P.MAX_NDIM:  # type: ignore[arg-type]
        return None
    a = np.frombuffer(data, dtype=dt, count=numel).reshape(  # type: ignore[call-overload]
        shape, order="F" if fortran else "C"
    )
    native = np.ascontiguousarray(a.astype(dt.newbyteorder("="), copy=False))
    return name, tuple(shape), hashlib.sha256(native.reshape(-1).view(np.uint8).data).hexdigest()


def _npy_digests(buf: Buf, start: int, end: int, label: str, budget: _Budget) -> list[Digest]:
    """A ``.npy`` record: its array's digest, or (an object array) what its pickle builds."""
    header, data_at = npy.header(buf, start, end, label)
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if npy.descr_has_object(descr):
        _evaluate(buf, data_at, end, None, budget)
        return []  # the arrays and tensors it built are in budget.made
    if not isinstance(descr, str) or not isinstance(fortran, bool) or not isinstance(shape, tuple):
        return []  # a structured array: not returned as a tensor
    shape_t = _int_tuple(shape, "shape")
    with memoryview(buf) as view:
        digest = _np_digest(descr, shape_t, fortran, view[data_at:end])
    return [digest] if digest is not None else []


def _npz_digests(path: str | os.PathLike[str], budget: _Budget) -> list[Digest]:
    """Every ``.npy`` member of an ``.npz``, read with the zipfile module numpy itself uses."""
    import zipfile

    out: list[Digest] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                if info.file_size > _MAX_INVENTORY_MEMBER:
                    raise _Unsupported(
                        f"npz member {info.filename!r} is larger than {_MAX_INVENTORY_MEMBER} bytes"
                    )
                with zf.open(info) as member:
                    data = member.read(_MAX_INVENTORY_MEMBER + 1)
                if len(data) > _MAX_INVENTORY_MEMBER:
                    raise _Unsupported(f"npz member {info.filename!r} inflates past its size")
                out += _npy_digests(data, 0, len(data), info.filename, budget)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        raise _Unsupported(f"the npz archive cannot be read: {exc}") from None
    return out


def try_inventory(
    path: str | os.PathLike[str],
    scan: _scan.StaticScan | None = None,
    cancel: threading.Event | None = None,
    *,
    spans: bool = False,
) -> Inventory | NotReconstructed:
    """The general reading of the file at ``path`` (see :class:`Inventory`), or why there is
    none: a format without one, a container or stream trick that leaves the file without a
    single reading, a budget exhausted. ``scan``: the static stage's scan of the same file
    when the caller has it; ``spans``: where the file's own bytes are (``Inventory.stored``)
    instead of their digests. Never raises for file content."""
    scanned = _scanned(path, scan)
    if isinstance(scanned, NotReconstructed):
        return scanned
    scan = scanned
    fmt = scan.format
    tricky = _tricky(scan)
    if tricky is not None:
        return tricky

    def inventory() -> Inventory:
        budget = _Budget(general=True, cancel=cancel)
        digests: list[Digest] = []
        findings: list[Finding] = []
        with open_buffer(path) as buf:
            if fmt in _LAYOUTS or fmt == "torchscript":  # TorchScript: a torch zip's records
                layout = _LAYOUTS.get(fmt, _zip_layout)(buf, budget)
                findings += layout.findings
            elif fmt == "pickle":
                layout = _Layout(value=_evaluate(buf, 0, len(buf), None, budget)[0])
            elif fmt == "numpy-npy":
                layout = _Layout(value=None)
                digests += _npy_digests(buf, 0, len(buf), "<npy>", budget)
            elif fmt == "numpy-npz":
                layout = _Layout(value=None)
                digests += _npz_digests(path, budget)
            else:
                raise _Unsupported(f"format {fmt} has no general reading")
            unique = {id(m): m for m in budget.made}
            if len(unique) > P.MAX_TENSORS:
                raise _Unsupported(f"more than {P.MAX_TENSORS} tensors")
            tensors = [
                (f"#{i}", t)
                for i, t in enumerate(unique.values())
                if isinstance(t, _Tensor) and not t.tainted
            ]
            where: dict[str, tuple[int, int]] | None = {} if spans else None
            rec = _materialise(layout, tensors, buf, fmt, keep_data=False, budget=budget, spans=where)
            findings += [f for f in rec.findings if f not in findings]
            stored: dict[tuple[str, tuple[int, ...]], set[tuple[int, int]]] = collections.defaultdict(set)
            kept: dict[str, Digest | Stored] = {}
            for name, st in rec.tensors.items():
                if where is not None and name in where:
                    stored[(st.dtype, st.shape)].add(where[name])
                    kept[name] = (st.dtype, st.shape, where[name])
                else:
                    digests.append((st.dtype, st.shape, st.sha256))
                    kept[name] = (st.dtype, st.shape, st.sha256)
            by_id = {id(t): kept[name] for name, t in tensors if name in kept}
            namer = _walked(layout.value)
            named = {
                name: ref
                for name, t in namer.order
                if "#" not in name and (ref := by_id.get(id(t))) is not None
            }
            paths = {name: tuple(namer.paths[name]) for name in named} | _composite_paths(namer)
            for m in unique.values():
                if isinstance(m, _NpArray) and m.data is not None and m.dtype is not None:
                    budget.check()
                    d = _np_digest(m.dtype, m.shape, m.fortran, m.data)
                    if d is not None:
                        digests.append(d)
            return Inventory(
                format=fmt,
                digests=frozenset(digests),
                findings=tuple(findings),
                named=named,
                stored={k: tuple(sorted(v)) for k, v in stored.items()},
                paths=paths,
                quantizers=frozenset(budget.quantizers),
                sparse_sizes=frozenset(budget.sparse_sizes),
            )

    return _guarded(fmt, inventory)


@dataclass(frozen=True, kw_only=True)
class Placement(TensorRecord):
    """Where one tensor of a plain torch-zip state dict (see :class:`TensorRecord`) lies in the
    file: ``file_offset`` is the byte offset of its first element, ``extent`` the bytes from
    there to its last one; both lie inside the record of its storage (checked)."""

    parameter: bool
    file_offset: int
    extent: int


def try_place(
    path: str | os.PathLike[str], scan: _scan.StaticScan | None = None
) -> list[Placement] | NotReconstructed:
    """Every tensor of a plain, little-endian torch-zip state dict at ``path``, placed in the
    file (no tensor bytes are read). The same checks as :func:`try_reconstruct`; in addition
    any finding of the reading (a storage record of another size than its claim), a
    metadata bit or a view past its record makes the file not placeable. ``scan``: the static
    stage's scan of the same file, when the caller has it (it is not read twice)."""
    scanned = _scanned(path, scan)
    if isinstance(scanned, NotReconstructed):
        return scanned
    scan = scanned
    if scan.format != "torch-zip":
        return NotReconstructed(f"format {scan.format} is not a torch zip", scan.format)
    if _foreign(scan) or _tricky(scan) is not None:
        return NotReconstructed("not a plain state dict without tricks", scan.format)

    def place() -> list[Placement]:
        with open_buffer(path) as buf:
            layout = _zip_layout(buf, _Budget())
            if layout.swap or layout.findings:
                raise _Unsupported("a big-endian archive, or records of unexpected sizes")
            placed = []
            for name, t in _named(layout.value):
                if t.metadata:
                    raise _Unsupported(f"tensor {name} sets metadata bits")
                start, available, _claimed = layout.regions[t.storage.root]
                elem = _element_size(t.dtype)
                first = t.storage.offset + t.offset * elem
                numel = 1
                for d in t.shape:
                    numel *= d
                extent = (
                    elem * (1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride, strict=True)))
                    if numel
                    else 0
                )
                if numel and first + extent > min(t.storage.offset + t.storage.nbytes, available):
                    raise _Unsupported(f"tensor {name} reaches past its storage record")
                placed.append(
                    Placement(
                        name=name,
                        dtype=t.dtype,
                        shape=t.shape,
                        stride=t.stride,
                        key=t.storage.root,
                        offset=t.offset,
                        parameter=t.parameter,
                        file_offset=start + first,
                        extent=extent,
                    )
                )
            return placed

    return _guarded(scan.format, place)


def reconstruct(path: str | os.PathLike[str], *, keep_data: bool = False) -> Reconstruction | None:
    """:func:`try_reconstruct`, with ``None`` where no reconstruction is possible."""
    result = try_reconstruct(path, keep_data=keep_data)
    return result if isinstance(result, Reconstruction) else None


#: what the sandbox returned for one tensor: (dtype name, shape, sha256 or None when its bytes
#: are not to be compared, e.g. a view whose base is compared instead)
Actual = tuple[str, tuple[int, ...], "str | None"]


def compare(reconstruction: Reconstruction, tensors: Mapping[str, torch.Tensor]) -> list[Finding]:
    """Findings where the sandbox's tensors differ from the file's records.

    ``tensors`` is what the host read back from the sandbox (``_convert.load_tensors``: names
    as the worker gives them, views included). See :func:`compare_digests`."""
    from sandbox._convert import tensor_digest

    actual: dict[str, Actual] = {}
    for name, got in tensors.items():
        dtype = str(got.dtype).removeprefix("torch.")
        shape = tuple(int(d) for d in got.shape)
        want = reconstruction.tensors.get(name)
        same_kind = want is not None and (want.dtype, want.shape) == (dtype, shape)
        actual[name] = (dtype, shape, tensor_digest(got.resolve_conj().resolve_neg()) if same_kind else None)
    return compare_digests(reconstruction, actual)


def compare_digests(
    reconstruction: Reconstruction, actual: Mapping[str, Actual], moved: Sequence[Mapping[str, Any]] = ()
) -> list[Finding]:
    """Findings where what the sandbox returned differs from the file's records.

    A tensor whose dtype, shape or bytes differ is listed in one HIGH ``weights-tampered``
    finding (expected and actual sha256 per tensor); names on one side only are listed in one
    HIGH ``weights-mismatch`` finding. Tensors in ``reconstruction.unreadable`` are skipped
    (their findings are in the reconstruction). ``moved``: tensors the returned structure does
    not put where the file does (name, path, what is there instead), listed as tampered unless
    already listed. Returns ``[]`` when everything matches.
    """
    findings: list[Finding] = []
    expected = reconstruction.tensors
    skip = reconstruction.unreadable
    missing = sorted(n for n in expected if n not in actual)
    extra = sorted(n for n in actual if n not in expected and n not in skip)
    changed: list[dict[str, Any]] = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            continue
        got_dtype, got_shape, digest = got
        if got_dtype != want.dtype or tuple(got_shape) != want.shape:
            changed.append(
                {
                    "name": name,
                    "expected_dtype": want.dtype,
                    "actual_dtype": got_dtype,
                    "expected_shape": list(want.shape),
                    "actual_shape": list(got_shape),
                    "expected_sha256": want.sha256,
                    "actual_sha256": digest,
                }
            )
        elif digest is not None and digest != want.sha256:
            changed.append({"name": name, "expected_sha256": want.sha256, "actual_sha256": digest})
    listed = {c["name"] for c in changed} | set(missing)
    for m in moved:
        if m["name"] not in listed:
            listed.add(m["name"])
            changed.append(dict(m))
    if changed:
        names = [c["name"] for c in changed]
        findings.append(
            Finding(
                rule="weights-tampered",
                severity=Severity.HIGH,
                category="evasion",
                message=(
                    "the loader returned weights that are not in the file: "
                    + ", ".join(names[:5])
                    + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                ),
                evidence={
                    "tensors": changed[:_MAX_EVIDENCE],
                    "count": len(changed),
                    "format": reconstruction.format,
                },
            )
        )
    if missing or extra:
        findings.append(
            Finding(
                rule="weights-mismatch",
                severity=Severity.HIGH,
                category="evasion",
                message=(
                    f"the loader returned {len(extra)} tensor(s) the file does not describe and "
                    f"lacks {len(missing)} that it does"
                ),
                evidence={
                    "missing": missing[:_MAX_EVIDENCE],
                    "extra": extra[:_MAX_EVIDENCE],
                    "missing_count": len(missing),
                    "extra_count": len(extra),
                    "format": reconstruction.format,
                },
            )
        )
    return findings
