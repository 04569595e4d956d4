"""Static pre-flight scanner: what a checkpoint *would* import, without loading it.

Nothing here unpickles, executes or imports anything the file names. The scanner reads
bytes, walks pickle opcodes with its own reader and a symbolic stack, and reports:

* the format, identified by content (:func:`identify`), never by file name;
* every global a pickle stream would import (:class:`GlobalRef`), classified against an
  allowlist of what legitimate checkpoints use (anything else is ``unknown``) and a table of
  known-dangerous callables (``dangerous``);
* the tensor storages named by ``persistent_load`` records (:class:`StorageRecord`);
* container tricks that make other readers disagree with torch's reader (findings).

Only the standard library is used. Tensor data is never read. The file is memory-mapped, so
pages the scanner does not touch are never read. In a zip archive it reads the central
directory, every local header, the pickle members (``*.pkl``, the member torch would load as
``data.pkl``, and members outside ``<prefix>/data/`` whose first two bytes are a pickle
protocol header) and the headers of ``.npy`` members (a whole ``.npy`` member only when it is
an object array). Legacy stacked pickles are walked up to the storage-keys list; legacy tar
storages and joblib's inline array bytes are skipped by the sizes their records give.

Errors. Every public function raises only :class:`~sandbox.errors.MalformedInput` (or its
subclass :class:`MalformedStream`); content that is not recognised is format ``unknown``, and
deciding what to refuse (``UnsupportedFormat``) is left to the caller:

* a stream that ends before its STOP opcode, or a length claim beyond the end of the data, is
  *truncated*: :func:`scan_file` raises :class:`MalformedStream` (``offset`` and ``member``
  set, ``partial`` holds everything found before the fault, so dangerous globals seen before
  the truncation are still visible);
* a stream that is structurally invalid (unknown opcode, stack underflow, missing memo
  entry, ...) is a finding ``pickle-parse-error`` (MEDIUM, evasion) in :func:`scan_file`,
  because the real unpickler runs every opcode before the fault; :func:`scan_pickle_bytes`
  raises :class:`MalformedStream` for both kinds;
* a corrupt container (zip without a readable central directory, bad ``.npy`` or
  safetensors header, unreadable tar) raises :class:`~sandbox.errors.MalformedInput`;
* a scan limit (ops, memo size, nesting, time, bytes) that is reached ends that stream's walk
  with a finding ``scan-limit-exceeded`` (HIGH, resource): the scan is then incomplete.

An I/O error while reading the file is reported as ``MalformedInput`` too (the caller checks
that the path exists before scanning).
"""

from __future__ import annotations

import _compat_pickle
import ast
import bz2
import codecs
import hashlib
import io
import json
import lzma
import mmap
import os
import re
import struct
import tarfile
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import MalformedInput, MalformedStream
from .report import Finding, Severity

__all__ = [
    "ALLOWED_GLOBALS",
    "DANGEROUS_GLOBALS",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_MEMO",
    "DEFAULT_MAX_OPS",
    "DEFAULT_MAX_PICKLE_BYTES",
    "DEFAULT_TIME_BUDGET_S",
    "FORMATS",
    "GlobalRef",
    "MalformedStream",
    "PickleScan",
    "StaticScan",
    "StorageRecord",
    "classify_global",
    "identify",
    "scan_file",
    "scan_pickle_bytes",
]

FORMATS: tuple[str, ...] = (
    "torch-zip", "torch-legacy", "torch-tar", "pickle", "numpy-npy", "numpy-npz", "joblib",
    "torchscript", "safetensors", "unknown",
)

DEFAULT_MAX_PICKLE_BYTES = 1 << 30  # one materialised stream (zip member, decompressed data)
DEFAULT_MAX_OPS = 50_000_000  # opcodes over the whole file
DEFAULT_MAX_MEMO = 2_000_000  # memo entries in one stream
DEFAULT_MAX_DEPTH = 10_000  # open MARKs in one stream
DEFAULT_TIME_BUDGET_S = 120.0

_MAX_NESTING = 4  # pickles inside pickles inside ...
_MAX_STACK = 5_000_000  # symbolic stack entries in one stream
_MAX_KEEP = 64  # container items kept for symbolic evaluation
_MAX_STR = 1 << 16  # longer strings are kept only as their length
_MAX_TAR_MEMBERS = 100_000
_MAX_ZIP_ENTRIES = 1_000_000
_MAX_NPY_HEADER = 1 << 20
_MAX_SAFETENSORS_HEADER = 100_000_000
_MAX_TRAILING_STREAMS = 16
_BOMB_MIN_BYTES = 256 << 20  # a compressed zip member this large when inflated, and
_BOMB_RATIO = 200  # compressed more than this, is a decompression bomb
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# --------------------------------------------------------------------------------------------
# Classification tables (immutable)
# --------------------------------------------------------------------------------------------

_STORAGE_TYPES: dict[str, tuple[str, int]] = {
    # storage class name -> (dtype, element size); torch/storage.py _dtype_to_storage_type_map
    "DoubleStorage": ("float64", 8), "FloatStorage": ("float32", 4), "HalfStorage": ("float16", 2),
    "LongStorage": ("int64", 8), "IntStorage": ("int32", 4), "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
    "BFloat16Storage": ("bfloat16", 2), "ComplexDoubleStorage": ("complex128", 16),
    "ComplexFloatStorage": ("complex64", 8), "QInt8Storage": ("qint8", 1),
    "QInt32Storage": ("qint32", 4), "QUInt8Storage": ("quint8", 1),
    "QUInt4x2Storage": ("quint4x2", 1), "QUInt2x4Storage": ("quint2x4", 1),
    "UntypedStorage": ("uint8", 1),
}

_TORCH_DTYPE_NAMES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int8", "uint8",
    "int16", "short", "int32", "int", "int64", "long", "bool", "complex32", "chalf", "complex64",
    "cfloat", "complex128", "cdouble", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2",
    "bits8", "bits16",
)
_TORCH_ENUM_VALUES = (
    "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn",
    "jagged", "contiguous_format", "channels_last", "channels_last_3d", "preserve_format",
    "per_tensor_affine", "per_channel_affine", "per_tensor_symmetric", "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)
_TORCH_REBUILDERS = (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
    "_rebuild_sparse_csr_tensor", "_rebuild_wrapper_subclass", "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor", "_rebuild_meta_tensor_no_storage",
    "_rebuild_nested_tensor",
)

#: Full dotted names that legitimate checkpoints import. Exact matches only.
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    [f"torch._utils.{n}" for n in _TORCH_REBUILDERS]
    + [f"torch.{n}" for n in _STORAGE_TYPES]
    + [f"torch.cuda.{n}" for n in _STORAGE_TYPES if n != "UntypedStorage"]
    + [f"torch.{n}" for n in _TORCH_DTYPE_NAMES + _TORCH_ENUM_VALUES]
    + [
        "torch.storage.UntypedStorage", "torch.storage.TypedStorage", "torch.TypedStorage",
        "torch.Size", "torch.device", "torch.Tensor", "torch._tensor.Tensor",
        "torch._tensor._rebuild_from_type", "torch._tensor._rebuild_from_type_v2",
        "torch.nn.parameter.Parameter", "torch.nn.parameter.Buffer",
        "torch.serialization._get_layout",
        "collections.OrderedDict", "collections.defaultdict", "collections.Counter",
        "collections.deque",
        "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
        "builtins.bytearray", "builtins.bytes", "builtins.range", "builtins.int",
        "builtins.float", "builtins.str", "builtins.bool", "builtins.dict", "builtins.list",
        "builtins.tuple", "builtins.object",
        "_codecs.encode", "codecs.encode",
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
        "numpy.ndarray", "numpy.dtype",
        "argparse.Namespace",
        "joblib.numpy_pickle.NumpyArrayWrapper",
    ]
)

# (dotted prefix, category). A global is dangerous when its full name equals a prefix or
# continues it with a dot.
DANGEROUS_GLOBALS: tuple[tuple[str, str], ...] = (
    # code execution and interpreter control
    ("os", "exec"), ("posix", "exec"), ("nt", "exec"), ("subprocess", "exec"),
    ("_posixsubprocess", "exec"), ("pty", "exec"), ("runpy", "exec"), ("importlib", "exec"),
    ("imp", "exec"), ("code", "exec"), ("codeop", "exec"), ("pydoc", "exec"), ("timeit", "exec"),
    ("cProfile", "exec"), ("profile", "exec"), ("pdb", "exec"), ("bdb", "exec"), ("trace", "exec"),
    ("doctest", "exec"), ("idlelib", "exec"), ("ensurepip", "exec"), ("pip", "exec"),
    ("setuptools", "exec"), ("distutils", "exec"), ("venv", "exec"), ("site", "exec"),
    ("zipimport", "exec"), ("pkgutil", "exec"), ("marshal", "exec"), ("sys", "exec"),
    ("platform", "exec"), ("uuid._get_command_stdout", "exec"), ("logging.config", "exec"),
    ("threading", "exec"), ("_thread", "exec"), ("multiprocessing", "exec"),
    ("concurrent", "exec"), ("asyncio", "exec"), ("signal", "exec"), ("test", "exec"),
    ("builtins.eval", "exec"), ("builtins.exec", "exec"), ("builtins.compile", "exec"),
    ("builtins.__import__", "exec"), ("builtins.getattr", "exec"), ("builtins.setattr", "exec"),
    ("builtins.delattr", "exec"), ("builtins.globals", "exec"), ("builtins.locals", "exec"),
    ("builtins.vars", "exec"), ("builtins.breakpoint", "exec"), ("builtins.input", "exec"),
    ("builtins.__build_class__", "exec"), ("builtins.help", "exec"), ("builtins.exit", "exec"),
    ("builtins.quit", "exec"), ("builtins.memoryview", "exec"),
    ("types.CodeType", "exec"), ("types.FunctionType", "exec"), ("types.LambdaType", "exec"),
    ("types.MethodType", "exec"), ("types.ModuleType", "exec"),
    ("pickle", "exec"), ("_pickle", "exec"), ("dill", "exec"), ("cloudpickle", "exec"),
    ("shelve", "exec"), ("joblib.load", "exec"), ("joblib.numpy_pickle.load", "exec"),
    ("operator.attrgetter", "exec"), ("operator.methodcaller", "exec"),
    ("_operator.attrgetter", "exec"), ("_operator.methodcaller", "exec"),
    ("functools.partial", "exec"), ("functools.partialmethod", "exec"),
    ("functools.reduce", "exec"), ("_functools", "exec"),
    ("torch.load", "exec"), ("torch.serialization.load", "exec"),
    ("torch.serialization._load", "exec"), ("torch.serialization._legacy_load", "exec"),
    # (torch.storage._load_from_bytes is "unknown", not dangerous: every tensor written with
    # plain pickle.dump reduces its storage through it, to a nested torch zip that the
    # sandboxed load, not this scan, judges.)
    ("torch.hub", "exec"), ("torch.package", "exec"),
    ("torch.jit", "exec"), ("torch._C", "exec"), ("torch._dynamo", "exec"),
    ("torch._inductor", "exec"), ("torch.utils.cpp_extension", "exec"),
    ("torch.utils.collect_env", "exec"), ("torch.distributed.rpc", "exec"),
    ("torch.fx.graph_module.reduce_graph_module", "exec"),
    ("torch.fx.graph_module.reduce_package_graph_module", "exec"),
    ("torch.fx.graph_module._deserialize_graph_module", "exec"),
    ("numpy.load", "exec"), ("numpy.lib.npyio", "exec"), ("numpy.lib.format", "exec"),
    ("numpy.f2py", "exec"), ("numpy.distutils", "exec"), ("numpy.testing", "exec"),
    # published gadgets (scanner advisories): helpers that run a shell command, evaluate a
    # string or unpickle their argument, in modules a plain allowlist would not know
    ("_aix_support", "exec"), ("_osx_support", "exec"), ("_pyrepl", "exec"),
    ("lib2to3", "exec"), ("torch.utils.bottleneck", "exec"),
    ("torch.utils.data.datapipes.utils.decoder", "exec"), ("torch.utils._config_module", "exec"),
    ("logging.FileHandler", "file"), ("logging.handlers", "network"),
    # network
    ("socket", "network"), ("_socket", "network"), ("ssl", "network"), ("http", "network"),
    ("urllib", "network"), ("urllib3", "network"), ("requests", "network"), ("httpx", "network"),
    ("aiohttp", "network"), ("ftplib", "network"), ("smtplib", "network"), ("poplib", "network"),
    ("imaplib", "network"), ("nntplib", "network"), ("telnetlib", "network"),
    ("xmlrpc", "network"), ("socketserver", "network"), ("webbrowser", "network"),
    # files
    ("builtins.open", "file"), ("io.open", "file"), ("io.FileIO", "file"), ("io.open_code", "file"),
    ("_io", "file"), ("fileinput", "file"), ("tempfile", "file"), ("shutil", "file"),
    ("mmap", "file"), ("numpy.memmap", "file"), ("numpy.fromfile", "file"),
    ("numpy.loadtxt", "file"), ("numpy.genfromtxt", "file"), ("numpy.save", "file"),
    ("numpy.savez", "file"), ("numpy.savetxt", "file"),
    # credentials and privileges
    ("getpass", "credential"), ("keyring", "credential"), ("netrc", "credential"),
    ("pwd", "credential"), ("spwd", "credential"), ("grp", "credential"),
    ("ctypes", "privilege"), ("_ctypes", "privilege"), ("cffi", "privilege"),
    ("numpy.ctypeslib", "privilege"), ("resource", "privilege"), ("_winapi", "privilege"),
    ("msvcrt", "privilege"), ("winreg", "privilege"),
)

# Attribute names that make an attribute chain (a dotted name) dangerous wherever it starts.
_DANGEROUS_ATTRS: frozenset[str] = frozenset({
    "eval", "exec", "compile", "system", "popen", "getattr", "setattr", "delattr", "__import__",
    "import_module", "open", "execfile", "globals", "locals", "vars", "breakpoint", "input",
    "loads", "load", "run", "call", "check_call", "check_output", "spawn", "fork", "execv",
    "execve", "spawnv", "Popen",
})
_SAFE_DUNDERS: frozenset[str] = frozenset({"__newobj__", "__newobj_ex__"})

# Activation functions implemented in torch's C extension, which configs store (often bound
# with functools.partial): pure tensor math under the dangerous ``torch._C`` prefix. They are
# unknown globals, not dangerous ones; a weight they compute while loading is unverified.
_MATH_BUILTINS: frozenset[str] = frozenset(
    f"torch._C._nn.{n}" for n in (
        "gelu", "silu", "elu", "leaky_relu", "hardtanh", "softplus", "hardswish",
        "hardsigmoid", "mish", "relu6", "glu", "log_sigmoid", "softshrink", "hardshrink"))

# Callables that unpickle their bytes argument (nested pickles).
_NESTED_LOADERS: frozenset[str] = frozenset({
    "pickle.loads", "pickle.load", "pickle._loads", "pickle._load", "_pickle.loads",
    "_pickle.load", "torch.load", "torch.serialization.load", "torch.storage._load_from_bytes",
    "dill.loads", "cloudpickle.loads", "joblib.load", "numpy.loads",
})
_JOBLIB_WRAPPERS: frozenset[str] = frozenset({
    "joblib.numpy_pickle.NumpyArrayWrapper", "sklearn.externals.joblib.numpy_pickle.NumpyArrayWrapper",
})

_SEVERITY_OF = {"dangerous": Severity.CRITICAL, "unknown": Severity.MEDIUM}


def _is_dunder(part: str) -> bool:
    return len(part) > 4 and part.startswith("__") and part.endswith("__")


def _dangerous_prefix(full: str) -> str | None:
    for prefix, category in DANGEROUS_GLOBALS:
        if full == prefix or full.startswith(prefix + "."):
            return category
    return None


def classify_global(module: str, name: str) -> tuple[str, str | None]:
    """Classify ``module.name`` as ``allowed``, ``unknown`` or ``dangerous``.

    Returns ``(classification, category)``; the category (``exec``, ``network``, ``file``,
    ``credential``, ``privilege``) is set only for dangerous globals. ``allowed`` needs an
    exact match in :data:`ALLOWED_GLOBALS`. A dotted ``name`` is an attribute chain
    (``getattr`` applied step by step, as ``pickle`` does for protocol 4+): it is dangerous
    when any suffix of the full path starts a dangerous prefix (``torch.serialization`` +
    ``os.system``), or when any attribute is a dunder or a dangerous attribute name.
    """
    full = f"{module}.{name}"
    if full in ALLOWED_GLOBALS:
        return "allowed", None
    if full in _MATH_BUILTINS:
        return "unknown", None
    category = _dangerous_prefix(full)
    if category is not None:
        return "dangerous", category
    name_parts = name.split(".")
    if any(_is_dunder(p) and p not in _SAFE_DUNDERS for p in name_parts):
        return "dangerous", "exec"
    if len(name_parts) > 1:
        parts = full.split(".")
        for i in range(1, len(parts)):
            category = _dangerous_prefix(".".join(parts[i:]))
            if category is not None:
                return "dangerous", category
        if any(p in _DANGEROUS_ATTRS for p in name_parts):
            return "dangerous", "exec"
    return "unknown", None


# --------------------------------------------------------------------------------------------
# Public data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalRef:
    """One global a pickle stream would import.

    ``module``/``name`` are what the unpickler would resolve (Python-2 names already mapped
    through ``_compat_pickle`` when the stream's protocol is below 3, as ``pickle`` does);
    ``<unresolved>`` when a STACK_GLOBAL operand or an EXT code cannot be resolved statically.
    ``member`` names the stream, ``opcode`` the opcode that imported it (GLOBAL, STACK_GLOBAL,
    INST, EXT1/EXT2/EXT4), ``offset`` its position in that stream. ``called`` is true when a
    REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, INST or OBJ applied it directly (best effort: a global
    passed as an argument to another callable is not marked).
    """

    module: str
    name: str
    member: str
    opcode: str
    offset: int
    classification: str
    called: bool

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class StorageRecord:
    """One tensor storage named by a ``persistent_load`` record.

    ``key`` is the record key (``archive/data/<key>`` in a torch zip, the storage key of a
    legacy file), ``dtype`` comes from the storage type (``FloatStorage`` -> ``float32``;
    ``UntypedStorage`` -> ``uint8`` with ``numel`` counted in bytes), ``numel`` is the element
    count the record claims and ``location`` its device tag (``cpu``, ``cuda:0``).
    """

    key: str
    dtype: str
    numel: int
    location: str
    member: str


@dataclass(frozen=True)
class PickleScan:
    """What :func:`scan_pickle_bytes` found in one stream (and the pickles nested in it)."""

    member: str
    pickles: tuple[str, ...]
    globals: tuple[GlobalRef, ...]
    storages: tuple[StorageRecord, ...]
    findings: tuple[Finding, ...]
    protocol: int
    end: int  # offset just past the STOP opcode


@dataclass(frozen=True)
class JoblibArray:
    """One numeric array joblib wrote inline after its wrapper: how the wrapper describes it
    and the sha256 of its raw bytes (``fortran``: column-major)."""

    code: str
    byteorder: str
    shape: tuple[int, ...]
    fortran: bool
    sha256: str


@dataclass(frozen=True)
class StaticScan:
    """Everything the static scan of one file found. See the module docstring."""

    format: str
    pickles: tuple[str, ...]
    globals: tuple[GlobalRef, ...]
    storages: tuple[StorageRecord, ...]
    findings: tuple[Finding, ...]
    protocol_max: int | None
    torch_would_load: str | None
    joblib_arrays: tuple[JoblibArray, ...] = ()  # the inline arrays of a joblib file

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)


# --------------------------------------------------------------------------------------------
# Scan context
# --------------------------------------------------------------------------------------------


class _TruncatedError(Exception):
    def __init__(self, offset: int, message: str = "pickle data is truncated") -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class _InvalidError(Exception):
    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class _LimitError(Exception):
    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


@dataclass
class _RefRec:
    module: str
    name: str
    member: str
    opcode: str
    offset: int
    classification: str
    category: str | None
    called: bool = False
    unresolved: bool = False
    # functools.partial only: True while every partial it made binds a global that is not
    # dangerous to literal arguments and none of them is called in the stream; False once one
    # is not; None when it made none
    inert_partial: bool | None = None


@dataclass
class _Ctx:
    max_pickle_bytes: int
    max_ops: int
    max_memo: int
    max_depth: int
    deadline: float
    ops: int = 0
    refs: list[_RefRec] = field(default_factory=list)
    storages: list[StorageRecord] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    joblib_arrays: list[JoblibArray] = field(default_factory=list)
    protocol_max: int | None = None
    format: str = "unknown"  # as far as known; reported in MalformedStream.partial
    target: str | None = None

    def add(self, rule: str, severity: Severity, category: str, message: str,
            **evidence: object) -> None:
        self.findings.append(Finding(rule=rule, severity=severity, category=category,
                                     message=message, evidence=dict(evidence)))

    def mark(self) -> tuple[int, int, int, int]:
        return len(self.refs), len(self.storages), len(self.findings), len(self.pickles)

    def rollback(self, mark: tuple[int, int, int, int]) -> None:
        del self.refs[mark[0]:]
        del self.storages[mark[1]:]
        del self.findings[mark[2]:]
        del self.pickles[mark[3]:]

    def limit(self, member: str, exc: _LimitError) -> None:
        self.add("scan-limit-exceeded", Severity.HIGH, "resource",
                 f"scan of {member} stopped: {exc.message}; the scan is incomplete",
                 member=member, offset=exc.offset)


def _new_ctx(max_pickle_bytes: int, max_ops: int, max_memo: int, max_depth: int,
             time_budget_s: float) -> _Ctx:
    return _Ctx(max_pickle_bytes=max(1, int(max_pickle_bytes)), max_ops=max(1, int(max_ops)),
                max_memo=max(1, int(max_memo)), max_depth=max(1, int(max_depth)),
                deadline=time.monotonic() + float(time_budget_s))


# --------------------------------------------------------------------------------------------
# Symbolic values
# --------------------------------------------------------------------------------------------

_Buf = bytes | bytearray | mmap.mmap


class _Global:
    __slots__ = ("idx",)

    def __init__(self, idx: int) -> None:
        self.idx = idx


class _Obj:
    """Result of a call (REDUCE, NEWOBJ, INST, OBJ) or of persistent_load."""

    __slots__ = ("args", "callee", "kind", "state")

    def __init__(self, kind: str, callee: object, args: object) -> None:
        self.kind = kind
        self.callee = callee
        self.args = args
        self.state: object = None


class _List:
    __slots__ = ("count", "items")

    def __init__(self, items: list[object]) -> None:
        self.items = items[:_MAX_KEEP]
        self.count = len(items)

    def extend(self, items: list[object]) -> None:
        room = _MAX_KEEP - len(self.items)
        if room > 0:
            self.items.extend(items[:room])
        self.count += len(items)


class _Dict:
    __slots__ = ("count", "items")

    def __init__(self) -> None:
        self.items: list[tuple[object, object]] = []
        self.count = 0

    def add(self, key: object, value: object) -> None:
        if len(self.items) < _MAX_KEEP:
            self.items.append((key, value))
        self.count += 1

    def get(self, key: str) -> object:
        for k, v in self.items:
            if k == key:
                return v
        return _MISSING


class _Bytes:
    """A bytes constant, kept as a region of the stream's buffer."""

    __slots__ = ("buf", "end", "start")

    def __init__(self, buf: _Buf, start: int, end: int) -> None:
        self.buf = buf
        self.start = start
        self.end = end


class _Opaque:
    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


_MISSING = _Opaque("missing")
_OPAQUE = _Opaque("value")
_LONG_STR = _Opaque("long str")
_BIG_INT = _Opaque("big int")


# --------------------------------------------------------------------------------------------
# Opcode reader
# --------------------------------------------------------------------------------------------

# opcode -> protocol that introduced it (pickletools' table, written out for our reader)
_OP_PROTO: dict[int, int] = {
    **{ord(c): 0 for c in "ILSNVFaltds02(gpcRbi.P"},
    **{ord(c): 1 for c in "JKMTUXG]e)}u1hjqroQ"},
    **{c: 2 for c in (0x8A, 0x8B, 0x88, 0x89, 0x85, 0x86, 0x87, 0x82, 0x83, 0x84, 0x81, 0x80)},
    ord("B"): 3, ord("C"): 3,
    **{c: 4 for c in (0x8E, 0x8C, 0x8D, 0x8F, 0x90, 0x91, 0x94, 0x93, 0x92, 0x95)},
    0x96: 5, 0x97: 5, 0x98: 5,
}
_HIGHEST_PROTOCOL = 5


@dataclass
class _WalkOut:
    value: object
    end: int
    protocol: int


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _pickle_like(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= _HIGHEST_PROTOCOL


def _resolve_name(module: str, name: str, proto: int) -> tuple[str, str]:
    if proto < 3:
        mapped = _compat_pickle.NAME_MAPPING.get((module, name))
        if mapped is not None:
            return mapped
        if module in _compat_pickle.IMPORT_MAPPING:
            return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


def _walk(ctx: _Ctx, buf: _Buf, start: int, end: int, member: str, *, nest: int = 0,
          joblib: bool = False) -> _WalkOut:
    """Walk one pickle stream in ``buf[start:end]`` up to its STOP opcode.

    Emulates the C unpickler's stack, mark stack and memo symbolically. Raises ``_TruncatedError``,
    ``_InvalidError`` or ``_LimitError``; globals, storages and findings seen before the fault stay
    in ``ctx``. With ``joblib`` the raw array bytes joblib writes after each
    ``NumpyArrayWrapper`` BUILD are skipped as ``joblib.load`` does.
    """
    ctx.pickles.append(member)
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    proto = 0
    max_proto = 0
    frame_end = -1
    straddle_reported = False
    pos = start
    max_ops = ctx.max_ops
    deadline = ctx.deadline
    fence = 0

    def need(n: int) -> None:
        if n < 0 or pos + n > end:
            raise _TruncatedError(op_off - start,
                                  f"length claim of {n} bytes runs past the end of the data")

    def readline() -> bytes:
        nonlocal pos
        idx = buf.find(b"\n", pos, end)
        if idx < 0:
            raise _TruncatedError(op_off - start, "line argument without newline")
        line = bytes(buf[pos:idx])
        pos = idx + 1
        return line

    def memo_index(short: bool, long_: bool, name: str, at: int) -> int:
        """The memo index of PUT/GET (text), BINPUT/BINGET (1 byte), LONG_* (4 bytes)."""
        nonlocal pos
        if short:
            need(1)
            pos += 1
            return buf[pos - 1]
        if long_:
            need(4)
            pos += 4
            return int.from_bytes(buf[pos - 4:pos], "little")
        try:
            return int(readline())
        except ValueError:
            raise _InvalidError(at - start, f"bad {name} argument") from None

    def pop() -> object:
        if len(stack) <= fence:
            raise _InvalidError(op_off - start, "unpickling stack underflow")
        return stack.pop()

    def top() -> object:
        if len(stack) <= fence:
            raise _InvalidError(op_off - start, "unpickling stack underflow")
        return stack[-1]

    def pop_mark() -> list[object]:
        nonlocal fence
        if not marks:
            raise _InvalidError(op_off - start, "could not find MARK")
        k = marks.pop()
        fence = marks[-1] if marks else 0
        items = stack[k:]
        del stack[k:]
        return items

    def called(value: object) -> None:
        if isinstance(value, _Global):
            ctx.refs[value.idx].called = True
        elif isinstance(value, _Obj) and _partial_ref(ctx, value.callee) is not None:
            _partial_ref(ctx, value.callee).inert_partial = False  # type: ignore[union-attr]

    def add_global(module: str, name: str, opcode: str) -> _Global:
        module, name = _resolve_name(module, name, proto)
        classification, category = classify_global(module, name)
        ctx.refs.append(_RefRec(module, name, member, opcode, op_off - start, classification,
                                category))
        return _Global(len(ctx.refs) - 1)

    def add_unresolved(opcode: str, why: str) -> _Global:
        ctx.refs.append(_RefRec("<unresolved>", "<unresolved>", member, opcode, op_off - start,
                                "unknown", None, unresolved=True))
        ctx.add("unresolved-global", Severity.HIGH, "evasion",
                f"{opcode} in {member} imports a global that cannot be resolved statically ({why})",
                member=member, offset=op_off - start, opcode=opcode)
        return _Global(len(ctx.refs) - 1)

    def text_line(line: bytes) -> str:
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            raise _InvalidError(op_off - start, "global name is not UTF-8") from None

    def push_str(raw: bytes, a: int, b: int, *, utf8: bool) -> None:
        if b - a > _MAX_STR:
            if utf8:
                try:
                    codecs.decode(bytes(buf[a:b]), "utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    raise _InvalidError(op_off - start, "invalid UTF-8 in string") from None
            stack.append(_LONG_STR)
            return
        try:
            s = raw.decode("utf-8", "surrogatepass") if utf8 else raw.decode("latin-1")
        except UnicodeDecodeError:
            raise _InvalidError(op_off - start, "invalid UTF-8 in string") from None
        stack.append(s)
        if len(s) >= 4 and s[0] == "\x80" and ord(s[1]) <= _HIGHEST_PROTOCOL:
            try:
                data = s.encode("latin-1")
            except UnicodeEncodeError:
                return
            nested(data, 0, len(data), a - start, is_str=True)

    def push_bytes(a: int, b: int) -> None:
        stack.append(_Bytes(buf, a, b))
        if b - a >= 4 and buf[a] == 0x80 and buf[a + 1] <= _HIGHEST_PROTOCOL:
            nested(buf, a, b, a - start, is_str=False)

    def nested(data: _Buf, a: int, b: int, rel: int, *, is_str: bool) -> None:
        name = f"{member}#nested@{rel}"
        if nest + 1 > _MAX_NESTING:
            ctx.add("scan-limit-exceeded", Severity.HIGH, "resource",
                    f"pickle nested more than {_MAX_NESTING} deep in {member}; not scanned",
                    member=name, offset=rel)
            return
        saved = ctx.mark()
        try:
            _walk(ctx, data, a, b, name, nest=nest + 1)
        except (_TruncatedError, _InvalidError):
            if len(ctx.refs) == saved[0]:
                ctx.rollback(saved)
                return
        except _LimitError as exc:
            ctx.limit(name, exc)
        # Hiding a pickle inside a pickle is evasion when what it hides is not plain data; a
        # nested stream of allowlisted globals is how torch pickles storages (legacy bytes
        # handed to torch.storage._load_from_bytes), so that is only noted.
        hidden = [r for r in ctx.refs[saved[0]:] if r.classification != "allowed"]
        ctx.add("nested-pickle", Severity.HIGH if hidden else Severity.INFO, "evasion",
                f"{member} holds a {'str' if is_str else 'bytes'} constant that is itself a "
                f"pickle ({name}); scanned too",
                member=name, offset=rel)

    def record_persistent(pid: object) -> None:
        if not isinstance(pid, tuple) or not pid:
            return
        tag = pid[0]
        if isinstance(tag, _Bytes):
            tag = bytes(tag.buf[tag.start:tag.end]).decode("latin-1")
        if tag != "storage":
            return
        rec = _storage_record(ctx, pid, member)
        if rec is None:
            ctx.add("malformed-storage-record", Severity.MEDIUM, "format",
                    f"persistent id in {member} names a storage but is not a valid storage record",
                    member=member, offset=op_off - start)
        else:
            ctx.storages.append(rec)

    def joblib_array(inst: _Obj, state: object) -> None:
        nonlocal pos, frame_end
        if frame_end > pos:  # joblib ends the frame before writing the array bytes
            ctx.add("pickle-frame-mismatch", Severity.MEDIUM, "evasion",
                    f"joblib array data in {member} starts inside a FRAME",
                    member=member, offset=pos - start)
        frame_end = -1
        info = _joblib_layout(state)
        if info is None:
            raise _InvalidError(op_off - start, "joblib NumpyArrayWrapper state cannot be followed")
        nbytes, has_object, aligned = info
        if has_object:
            name = f"{member}#joblib-array@{pos - start}"
            out = _walk(ctx, buf, pos, end, name, nest=nest + 1)
            pos = out.end
            return
        if aligned:
            need(1)
            pad = buf[pos]
            pos += 1
            need(pad)
            pos += pad
        need(nbytes)
        if isinstance(state, _Dict):  # the host's own reading of the array, for _verify
            h = hashlib.sha256()
            for lo in range(pos, pos + nbytes, 1 << 24):  # in slices: no copy of a large array
                h.update(buf[lo:min(lo + (1 << 24), pos + nbytes)])
            ctx.joblib_arrays.append(_joblib_digest(state, h.hexdigest()))
        pos += nbytes

    op_off = pos
    while True:
        if pos >= end:
            raise _TruncatedError(pos - start, "pickle data ended before the STOP opcode")
        ctx.ops += 1
        if ctx.ops > max_ops:
            raise _LimitError(pos - start, f"more than {max_ops} opcodes")
        if not ctx.ops & 0xFFF:
            if time.monotonic() > deadline:
                raise _LimitError(pos - start, "time budget exhausted")
            if len(stack) > _MAX_STACK:
                raise _LimitError(pos - start, f"more than {_MAX_STACK} values on the stack")
        op_off = pos
        op = buf[pos]
        pos += 1
        op_proto = _OP_PROTO.get(op)
        if op_proto is None:
            raise _InvalidError(op_off - start, f"invalid opcode 0x{op:02x}")
        if op_proto > max_proto:
            max_proto = op_proto

        if op == 0x71 or op == 0x72 or op == 0x70:  # BINPUT / LONG_BINPUT / PUT
            idx = memo_index(op == 0x71, op == 0x72, "PUT", op_off)
            if idx < 0:
                raise _InvalidError(op_off - start, "negative PUT argument")
            if idx not in memo and len(memo) >= ctx.max_memo:
                raise _LimitError(op_off - start, f"more than {ctx.max_memo} memo entries")
            memo[idx] = top()
        elif op == 0x68 or op == 0x6A or op == 0x67:  # BINGET / LONG_BINGET / GET
            idx = memo_index(op == 0x68, op == 0x6A, "GET", op_off)
            if idx not in memo:
                raise _InvalidError(op_off - start, f"memo value not found at index {idx}")
            stack.append(memo[idx])
        elif op == 0x94:  # MEMOIZE
            if len(memo) >= ctx.max_memo:
                raise _LimitError(op_off - start, f"more than {ctx.max_memo} memo entries")
            memo[len(memo)] = top()
        elif op == 0x58 or op == 0x8C or op == 0x8D:  # BINUNICODE / SHORT_BINUNICODE / 8
            width = 4 if op == 0x58 else (1 if op == 0x8C else 8)
            need(width)
            n = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
            need(n)
            a = pos
            pos += n
            push_str(bytes(buf[a:pos]) if n <= _MAX_STR else b"", a, pos, utf8=True)
        elif op == 0x28:  # MARK
            marks.append(len(stack))
            fence = len(stack)
            if len(marks) > ctx.max_depth:
                raise _LimitError(op_off - start, f"more than {ctx.max_depth} nested MARKs")
        elif op == 0x4B:  # BININT1
            need(1)
            stack.append(buf[pos])
            pos += 1
        elif op == 0x4D:  # BININT2
            need(2)
            stack.append(int.from_bytes(buf[pos:pos + 2], "little"))
            pos += 2
        elif op == 0x4A:  # BININT
            need(4)
            stack.append(int.from_bytes(buf[pos:pos + 4], "little", signed=True))
            pos += 4
        elif op == 0x74:  # TUPLE
            stack.append(tuple(pop_mark()))
        elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1/2/3
            n = op - 0x84
            if len(stack) - fence < n:
                raise _InvalidError(op_off - start, "unpickling stack underflow")
            items = stack[len(stack) - n:]
            del stack[len(stack) - n:]
            stack.append(tuple(items))
        elif op == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif op == 0x52:  # REDUCE
            args = pop()
            func = pop()
            called(func)
            _note_partial(ctx, func, isinstance(args, tuple) and len(args) >= 1
                          and _inert_target(ctx, args[0]) and _literal(args[1:]))
            stack.append(_Obj("reduce", func, args))
        elif op == 0x62:  # BUILD
            state = pop()
            inst = top()
            if isinstance(inst, _Obj) and _partial_ref(ctx, inst.callee) is not None:
                # partial.__setstate__((func, args, keywords, __dict__)): still not a call
                _note_partial(ctx, inst.callee, isinstance(state, tuple) and len(state) == 4
                              and _inert_target(ctx, state[0]) and _literal(state[1:]))
            else:
                called(inst)
            if isinstance(inst, _Obj):
                inst.state = state
                if joblib and _callee_name(ctx, inst) in _JOBLIB_WRAPPERS:
                    joblib_array(inst, state)
        elif op == 0x81:  # NEWOBJ
            args = pop()
            cls = pop()
            called(cls)
            stack.append(_Obj("newobj", cls, args))
        elif op == 0x92:  # NEWOBJ_EX
            pop()
            args = pop()
            cls = pop()
            called(cls)
            stack.append(_Obj("newobj", cls, args))
        elif op == 0x63 or op == 0x69:  # GLOBAL / INST
            module = text_line(readline())
            name = text_line(readline())
            g = add_global(module, name, "GLOBAL" if op == 0x63 else "INST")
            if op == 0x63:
                stack.append(g)
            else:
                items = pop_mark()
                called(g)
                stack.append(_Obj("inst", g, tuple(items)))
        elif op == 0x93:  # STACK_GLOBAL
            name_v = pop()
            module_v = pop()
            if isinstance(module_v, str) and isinstance(name_v, str):
                stack.append(add_global(module_v, name_v, "STACK_GLOBAL"))
            elif isinstance(module_v, (_Bytes, int, float, tuple, _List, _Dict, type(None))) or \
                    isinstance(name_v, (_Bytes, int, float, tuple, _List, _Dict, type(None))):
                raise _InvalidError(op_off - start, "STACK_GLOBAL requires str operands")
            else:
                stack.append(add_unresolved("STACK_GLOBAL", "operands are not constant strings"))
        elif op == 0x6F:  # OBJ
            items = pop_mark()
            if not items:
                raise _InvalidError(op_off - start, "unpickling stack underflow")
            called(items[0])
            stack.append(_Obj("obj", items[0], tuple(items[1:])))
        elif op == 0x7D:  # EMPTY_DICT
            stack.append(_Dict())
        elif op == 0x5D:  # EMPTY_LIST
            stack.append(_List([]))
        elif op == 0x75:  # SETITEMS
            items = pop_mark()
            if len(items) % 2:
                raise _InvalidError(op_off - start, "odd number of items for SETITEMS")
            target = top()
            if isinstance(target, _Dict):
                for i in range(0, min(len(items), 2 * _MAX_KEEP), 2):
                    target.add(items[i], items[i + 1])
                target.count += max(0, len(items) // 2 - _MAX_KEEP)
        elif op == 0x73:  # SETITEM
            value = pop()
            key = pop()
            target = top()
            if isinstance(target, _Dict):
                target.add(key, value)
        elif op == 0x61:  # APPEND
            value = pop()
            target = top()
            if isinstance(target, _List):
                target.extend([value])
        elif op == 0x65:  # APPENDS
            items = pop_mark()
            target = top()
            if isinstance(target, _List):
                target.extend(items)
        elif op == 0x51:  # BINPERSID
            pid = pop()
            record_persistent(pid)
            stack.append(_Obj("persid", None, pid))
        elif op == 0x50:  # PERSID
            line = readline()
            stack.append(_Obj("persid", None, line.decode("latin-1")))
        elif op == 0x4E:  # NONE
            stack.append(None)
        elif op == 0x88:
            stack.append(True)
        elif op == 0x89:
            stack.append(False)
        elif op == 0x47:  # BINFLOAT
            need(8)
            stack.append(struct.unpack(">d", buf[pos:pos + 8])[0])
            pos += 8
        elif op == 0x8A or op == 0x8B:  # LONG1 / LONG4
            if op == 0x8A:
                need(1)
                n = buf[pos]
                pos += 1
            else:
                need(4)
                n = int.from_bytes(buf[pos:pos + 4], "little", signed=True)
                pos += 4
                if n < 0:
                    raise _InvalidError(op_off - start, "LONG4 byte count < 0")
            need(n)
            stack.append(int.from_bytes(buf[pos:pos + n], "little", signed=True) if n <= 64
                         else _BIG_INT)
            pos += n
        elif op in (0x42, 0x43, 0x8E, 0x96):  # BINBYTES / SHORT_BINBYTES / BINBYTES8 / BYTEARRAY8
            width = 4 if op == 0x42 else (1 if op == 0x43 else 8)
            need(width)
            n = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
            need(n)
            a = pos
            pos += n
            if op == 0x96:
                stack.append(_OPAQUE)
            else:
                push_bytes(a, pos)
        elif op == 0x54 or op == 0x55:  # BINSTRING / SHORT_BINSTRING
            if op == 0x54:
                need(4)
                n = int.from_bytes(buf[pos:pos + 4], "little", signed=True)
                pos += 4
                if n < 0:
                    raise _InvalidError(op_off - start, "BINSTRING pickle has negative byte count")
            else:
                need(1)
                n = buf[pos]
                pos += 1
            need(n)
            a = pos
            pos += n
            push_str(bytes(buf[a:pos]) if n <= _MAX_STR else b"", a, pos, utf8=False)
        elif op == 0x53:  # STRING
            a = pos
            line = readline()
            if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
                try:
                    with warnings.catch_warnings():  # pickle decodes it the same way, quietly
                        warnings.simplefilter("ignore", DeprecationWarning)
                        raw = codecs.escape_decode(line[1:-1])[0]
                except ValueError:
                    raise _InvalidError(op_off - start, "bad STRING escape") from None
                if len(raw) > _MAX_STR:
                    stack.append(_LONG_STR)
                else:
                    push_str(raw, a, a + len(raw), utf8=False)
            else:
                raise _InvalidError(op_off - start, "the STRING opcode argument must be quoted")
        elif op == 0x56:  # UNICODE
            line = readline()
            try:
                s = line.decode("raw-unicode-escape")
            except UnicodeDecodeError:
                raise _InvalidError(op_off - start, "bad UNICODE argument") from None
            stack.append(s if len(s) <= _MAX_STR else _LONG_STR)
        elif op == 0x49 or op == 0x4C:  # INT / LONG
            line = readline()
            text = line.strip()
            if op == 0x4C and text.endswith(b"L"):
                text = text[:-1]
            if op == 0x49 and text in (b"00", b"01"):
                stack.append(text == b"01")
            else:
                if len(text) > 4000:
                    raise _InvalidError(op_off - start, "integer literal too long")
                try:
                    stack.append(int(text, 0) if op == 0x49 else int(text))
                except ValueError:
                    try:
                        stack.append(int(text))
                    except ValueError:
                        raise _InvalidError(op_off - start, "bad integer literal") from None
        elif op == 0x46:  # FLOAT
            try:
                stack.append(float(readline()))
            except ValueError:
                raise _InvalidError(op_off - start, "bad FLOAT literal") from None
        elif op == 0x80:  # PROTO
            need(1)
            proto = buf[pos]
            pos += 1
            if proto > _HIGHEST_PROTOCOL:
                raise _InvalidError(op_off - start, f"unsupported pickle protocol: {proto}")
            max_proto = max(max_proto, proto)
        elif op == 0x95:  # FRAME
            need(8)
            n = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
            if pos + n > end:
                # the C unpickler reads on regardless of a lying FRAME length: so do we, or a
                # scanner goes blind while the loader runs every opcode that follows
                ctx.add("pickle-frame-mismatch", Severity.MEDIUM, "evasion",
                        f"a FRAME in {member} claims {n} bytes but only {end - pos} follow; "
                        "the opcodes after it are read anyway",
                        member=member, offset=op_off - start)
                frame_end = -1
            else:
                frame_end = pos + n
        elif op == 0x2E:  # STOP
            value = pop()
            ctx.protocol_max = max_proto if ctx.protocol_max is None else max(ctx.protocol_max,
                                                                              max_proto)
            return _WalkOut(value, pos, max_proto)
        elif op == 0x30:  # POP
            if marks and marks[-1] == len(stack):
                marks.pop()
                fence = marks[-1] if marks else 0
            else:
                pop()
        elif op == 0x31:  # POP_MARK
            pop_mark()
        elif op == 0x32:  # DUP
            stack.append(top())
        elif op == 0x6C:  # LIST
            stack.append(_List(pop_mark()))
        elif op == 0x64:  # DICT
            items = pop_mark()
            if len(items) % 2:
                raise _InvalidError(op_off - start, "odd number of items for DICT")
            d = _Dict()
            for i in range(0, min(len(items), 2 * _MAX_KEEP), 2):
                d.add(items[i], items[i + 1])
            d.count += max(0, len(items) // 2 - _MAX_KEEP)
            stack.append(d)
        elif op == 0x8F:  # EMPTY_SET
            stack.append(_OPAQUE)
        elif op == 0x90:  # ADDITEMS
            pop_mark()
            top()
        elif op == 0x91:  # FROZENSET
            pop_mark()
            stack.append(_OPAQUE)
        elif op in (0x82, 0x83, 0x84):  # EXT1 / EXT2 / EXT4
            width = {0x82: 1, 0x83: 2, 0x84: 4}[op]
            need(width)
            code = int.from_bytes(buf[pos:pos + width], "little", signed=(width == 4))
            pos += width
            stack.append(add_unresolved(f"EXT{width}", f"extension code {code}"))
        elif op == 0x97:  # NEXT_BUFFER
            raise _InvalidError(op_off - start, "out-of-band buffer (NEXT_BUFFER) without buffers")
        elif op == 0x98:  # READONLY_BUFFER
            top()
        else:  # pragma: no cover - every opcode in _OP_PROTO is handled above
            raise _InvalidError(op_off - start, f"unhandled opcode 0x{op:02x}")

        if frame_end >= 0:
            if pos > frame_end and op_off < frame_end and not straddle_reported:
                straddle_reported = True
                ctx.add("pickle-frame-mismatch", Severity.MEDIUM, "evasion",
                        f"an opcode in {member} runs past the end of its FRAME; framed readers "
                        "and the C unpickler disagree on such streams",
                        member=member, offset=op_off - start)
            if pos >= frame_end:
                frame_end = -1


_PARTIAL = ("functools", "partial")


def _partial_ref(ctx: _Ctx, value: object) -> _RefRec | None:
    """The import record of ``functools.partial`` when ``value`` is that global."""
    if isinstance(value, _Global):
        ref = ctx.refs[value.idx]
        if (ref.module, ref.name) == _PARTIAL:
            return ref
    return None


def _note_partial(ctx: _Ctx, func: object, inert: bool) -> None:
    ref = _partial_ref(ctx, func)
    if ref is not None and ref.inert_partial is not False:
        ref.inert_partial = inert


def _inert_target(ctx: _Ctx, value: object) -> bool:
    """A global a partial may bind without risk at load time: one that is not dangerous (an
    optimizer or scheduler class, an activation function); binding never calls it."""
    return isinstance(value, _Global) and ctx.refs[value.idx].classification != "dangerous" \
        and not ctx.refs[value.idx].unresolved


def _literal(value: object, depth: int = 0) -> bool:
    """Plain data the static reading kept whole: no global, call or truncated container."""
    if value is None or isinstance(value, (bool, int, float, str, _Bytes)):
        return True
    if depth > 16:
        return False
    if isinstance(value, tuple):
        return all(_literal(v, depth + 1) for v in value)
    if isinstance(value, _List):
        return value.count == len(value.items) and all(_literal(v, depth + 1)
                                                      for v in value.items)
    if isinstance(value, _Dict):
        return value.count == len(value.items) and all(
            _literal(k, depth + 1) and _literal(v, depth + 1) for k, v in value.items)
    return False


def _classification(r: _RefRec) -> str:
    """A ref's classification, with the one context rule: ``functools.partial`` binding a
    global that is not dangerous to literal arguments, and never called, only stores a
    callable (as configs do with optimizer classes) and counts as allowed."""
    if (r.module, r.name) == _PARTIAL and r.inert_partial:
        return "allowed"
    return r.classification


def _callee_name(ctx: _Ctx, obj: _Obj) -> str | None:
    if isinstance(obj.callee, _Global):
        ref = ctx.refs[obj.callee.idx]
        return f"{ref.module}.{ref.name}"
    return None


def _storage_record(ctx: _Ctx, pid: tuple[object, ...], member: str) -> StorageRecord | None:
    """Decode ``('storage', StorageType, key, location, numel[, view_metadata])``."""
    if len(pid) not in (5, 6):
        return None
    stype, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if not isinstance(stype, _Global):
        return None
    ref = ctx.refs[stype.idx]
    entry = _STORAGE_TYPES.get(ref.name)
    if entry is None or not ref.module.startswith("torch"):
        return None
    if isinstance(location, _Bytes):
        location = bytes(location.buf[location.start:location.end]).decode("latin-1")
    if not isinstance(key, (str, int)) or isinstance(key, bool) or not isinstance(location, str):
        return None
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        return None
    return StorageRecord(key=str(key), dtype=entry[0], numel=numel, location=location,
                         member=member)


def _dtype_itemsize(code: str) -> int | None:
    """Item size of a numpy dtype string such as ``f8``, ``<i4``, ``U5``, ``V24``, ``b1``."""
    code = code.lstrip("<>|=")
    if not code:
        return None
    kind, digits = code[0], code[1:]
    if kind == "?" and not digits:
        return 1
    if not digits.isdigit() or len(digits) > 12:
        return None
    n = int(digits)
    return n * 4 if kind == "U" else n


def _joblib_digest(state: _Dict, sha256: str) -> JoblibArray:
    """dtype code, byte order, shape, memory order and sha256 of one inline joblib array."""
    dtype = state.get("dtype")
    code = dtype.args[0] if isinstance(dtype, _Obj) and isinstance(dtype.args, tuple) and \
        dtype.args and isinstance(dtype.args[0], str) else "?"
    dstate = dtype.state if isinstance(dtype, _Obj) else None
    order = dstate[1] if isinstance(dstate, tuple) and len(dstate) > 1 and \
        isinstance(dstate[1], str) else "|"
    shape = state.get("shape")
    memory = state.get("order")
    return JoblibArray(code, order, shape if isinstance(shape, tuple) else (),
                       memory == "F", sha256)


def _joblib_layout(state: object) -> tuple[int, bool, bool] | None:
    """(array bytes, holds objects, has alignment padding) from a NumpyArrayWrapper state."""
    if not isinstance(state, _Dict):
        return None
    shape = state.get("shape")
    dtype = state.get("dtype")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if not isinstance(dtype, _Obj) or not isinstance(dtype.args, tuple) or not dtype.args:
        return None
    code = dtype.args[0]
    if not isinstance(code, str):
        return None
    has_object = code.lstrip("<>|=").startswith("O")
    itemsize = _dtype_itemsize(code) if not has_object else 8
    dstate = dtype.state
    if isinstance(dstate, tuple) and len(dstate) >= 8:
        if isinstance(dstate[5], int) and dstate[5] > 0:
            itemsize = dstate[5]
        if isinstance(dstate[7], int) and dstate[7] & 1:
            has_object = True
    if itemsize is None:
        return None
    count = 1
    for d in shape:
        count *= d
        if count > 1 << 62:
            return None
    alignment = state.get("numpy_array_alignment_bytes")
    aligned = alignment is not _MISSING and alignment is not None
    return count * itemsize, has_object, aligned


# --------------------------------------------------------------------------------------------
# Building results
# --------------------------------------------------------------------------------------------


def _global_refs(ctx: _Ctx) -> tuple[GlobalRef, ...]:
    return tuple(GlobalRef(module=r.module, name=r.name, member=r.member, opcode=r.opcode,
                           offset=r.offset, classification=_classification(r), called=r.called)
                 for r in ctx.refs)


def _global_findings(ctx: _Ctx) -> list[Finding]:
    """One finding per (member, global) that is not allowed."""
    groups: dict[tuple[str, str, str], list[_RefRec]] = {}
    for r in ctx.refs:
        if _classification(r) == "allowed" or r.unresolved:
            continue
        groups.setdefault((r.member, r.module, r.name), []).append(r)
    out = []
    for (member, module, name), refs in groups.items():
        first = next((r for r in refs if _classification(r) == "dangerous"), refs[0])
        dangerous = _classification(first) == "dangerous"
        out.append(Finding(
            rule="dangerous-global" if dangerous else "unknown-global",
            severity=_SEVERITY_OF[_classification(first)],
            category=(first.category or "exec") if dangerous else "exec",
            message=(f"{member} imports {'dangerous' if dangerous else 'non-allowlisted'} "
                     f"global {module}.{name}"
                     + (" and calls it" if any(r.called for r in refs) else "")),
            evidence={"global": f"{module}.{name}", "member": member, "offset": first.offset,
                      "opcode": first.opcode, "count": len(refs),
                      "called": any(r.called for r in refs)},
        ))
    return out


def _result(ctx: _Ctx, fmt: str, torch_would_load: str | None) -> StaticScan:
    return StaticScan(format=fmt, pickles=tuple(ctx.pickles), globals=_global_refs(ctx),
                      storages=tuple(ctx.storages),
                      findings=tuple(ctx.findings) + tuple(_global_findings(ctx)),
                      protocol_max=ctx.protocol_max, torch_would_load=torch_would_load,
                      joblib_arrays=tuple(ctx.joblib_arrays))


# --------------------------------------------------------------------------------------------
# scan_pickle_bytes
# --------------------------------------------------------------------------------------------


def scan_pickle_bytes(data: bytes, *, member: str = "<raw>",
                      max_ops: int = DEFAULT_MAX_OPS, max_memo: int = DEFAULT_MAX_MEMO,
                      max_depth: int = DEFAULT_MAX_DEPTH,
                      time_budget_s: float = DEFAULT_TIME_BUDGET_S) -> PickleScan:
    """Walk the first pickle stream in ``data`` (and any pickles nested in its constants).

    Trailing bytes after STOP are ignored (``end`` says where the stream stopped). Raises
    :class:`MalformedStream` when the stream is truncated or invalid; its ``partial`` holds
    what was found before the fault. A scan limit ends the walk with a
    ``scan-limit-exceeded`` finding instead.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedInput(f"expected bytes, got {type(data).__name__}")
    ctx = _new_ctx(len(data), max_ops, max_memo, max_depth, time_budget_s)
    end = 0
    proto = 0
    try:
        out = _walk(ctx, bytes(data), 0, len(data), member)
        end, proto = out.end, out.protocol
    except (_TruncatedError, _InvalidError) as exc:
        raise MalformedStream(f"{member}: {exc.message} at offset {exc.offset}", offset=exc.offset,
                              member=member, partial=_result(ctx, "pickle", None)) from None
    except _LimitError as exc:
        ctx.limit(member, exc)
    scan = _result(ctx, "pickle", None)
    return PickleScan(member=member, pickles=scan.pickles, globals=scan.globals,
                      storages=scan.storages, findings=scan.findings, protocol=proto, end=end)


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


@contextmanager
def _open_buffer(path: str | os.PathLike[str]) -> Iterator[_Buf]:
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise MalformedInput(f"cannot read {os.fspath(path)!s}: {exc.strerror or exc}",
                             path=os.fspath(path)) from None
    try:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                yield b""
                return
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise MalformedInput(f"cannot map {os.fspath(path)!s}: {exc}", path=os.fspath(path)) from None
        try:
            yield mm
        finally:
            mm.close()
    finally:
        fh.close()


def _u16(buf: _Buf, at: int) -> int:
    return int.from_bytes(buf[at:at + 2], "little")


def _u32(buf: _Buf, at: int) -> int:
    return int.from_bytes(buf[at:at + 4], "little")


def _u64(buf: _Buf, at: int) -> int:
    return int.from_bytes(buf[at:at + 8], "little")


# ---- zip ------------------------------------------------------------------------------------

_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_ZIP_SUSPICIOUS_FLAGS = 0x0001 | 0x0020 | 0x0040 | 0x2000  # encrypted, patch, strong, masked


@dataclass
class _ZipEntry:
    index: int
    name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    header: int  # local header offset (already shifted)
    local_name: bytes = b""
    local_flags: int = 0
    local_method: int = 0
    data_start: int = 0

    @property
    def text(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")


@dataclass
class _Zip:
    entries: list[_ZipEntry]
    shift: int  # bytes before the archive that the central directory does not account for


def _find_zip(buf: _Buf) -> _Zip | None:
    """Parse the central directory the way readers that start from the end do.

    Returns ``None`` when there is no end-of-central-directory record; raises
    ``MalformedInput`` when there is one but the directory it points to is unreadable.
    """
    size = len(buf)
    if size < 22:
        return None
    lo = max(0, size - 22 - 0xFFFF)
    eocd = buf.rfind(_ZIP_EOCD, lo, size)
    while eocd >= 0 and eocd + 22 > size:
        eocd = buf.rfind(_ZIP_EOCD, lo, eocd)
    if eocd < 0:
        return None
    total = _u16(buf, eocd + 10)
    cd_size = _u32(buf, eocd + 12)
    cd_off = _u32(buf, eocd + 16)
    cd_end = eocd
    loc = eocd - 20
    if loc >= 56 and buf[loc:loc + 4] == _ZIP64_LOCATOR:
        # the zip64 end record sits right before its locator (its recorded offset is off by
        # the length of any data prepended to the archive)
        rec = loc - 56
        if buf[rec:rec + 4] == _ZIP64_EOCD:
            total = _u64(buf, rec + 32)
            cd_size = _u64(buf, rec + 40)
            cd_off = _u64(buf, rec + 48)
            cd_end = rec
    shift = cd_end - cd_size - cd_off
    if cd_off + cd_size <= size and buf[cd_off:cd_off + 4] == _ZIP_CENTRAL:
        base, shift = cd_off, 0
    elif shift > 0 and buf[cd_off + shift:cd_off + shift + 4] == _ZIP_CENTRAL:
        base = cd_off + shift
    elif total == 0 and cd_size == 0:
        return _Zip([], 0)
    else:
        if eocd < 4 or not _zip_like_start(buf):
            return None  # stray signature inside other data
        raise MalformedInput("zip central directory not found where the end record points",
                             offset=cd_off)
    if total > _MAX_ZIP_ENTRIES or total * 46 > cd_size:
        raise MalformedInput(f"zip claims {total} entries, more than the file can hold",
                             offset=eocd)
    entries: list[_ZipEntry] = []
    p = base
    stop = min(size, base + cd_size)
    for index in range(total):
        if p + 46 > stop or buf[p:p + 4] != _ZIP_CENTRAL:
            raise MalformedInput(f"zip central directory entry {index} is truncated", offset=p)
        flags, method = _u16(buf, p + 8), _u16(buf, p + 10)
        crc, csize, usize = _u32(buf, p + 16), _u32(buf, p + 20), _u32(buf, p + 24)
        nlen, elen, clen = _u16(buf, p + 28), _u16(buf, p + 30), _u16(buf, p + 32)
        header = _u32(buf, p + 42)
        if p + 46 + nlen + elen + clen > stop:
            raise MalformedInput(f"zip central directory entry {index} is truncated", offset=p)
        name = bytes(buf[p + 46:p + 46 + nlen])
        extra = bytes(buf[p + 46 + nlen:p + 46 + nlen + elen])
        usize, csize, header = _zip64_fields(extra, usize, csize, header)
        entries.append(_ZipEntry(index, name, flags, method, crc, csize, usize, header + shift))
        p += 46 + nlen + elen + clen
    for e in entries:
        h = e.header
        if h < 0 or h + 30 > size or buf[h:h + 4] != _ZIP_LOCAL:
            raise MalformedInput(f"zip local header of {e.text!r} is missing or truncated",
                                 offset=h)
        e.local_flags, e.local_method = _u16(buf, h + 6), _u16(buf, h + 8)
        lnlen, lelen = _u16(buf, h + 26), _u16(buf, h + 28)
        e.local_name = bytes(buf[h + 30:h + 30 + lnlen])
        e.data_start = h + 30 + lnlen + lelen
        if e.data_start + e.csize > size:
            raise MalformedInput(f"zip member {e.text!r} runs past the end of the file",
                                 offset=e.data_start)
    return _Zip(entries, shift)


def _zip_like_start(buf: _Buf) -> bool:
    return bytes(buf[:4]) == _ZIP_LOCAL


def _zip64_fields(extra: bytes, usize: int, csize: int, header: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, n = int.from_bytes(extra[i:i + 2], "little"), int.from_bytes(extra[i + 2:i + 4], "little")
        body = extra[i + 4:i + 4 + n]
        if tag == 1:
            j = 0
            if usize == 0xFFFFFFFF and j + 8 <= len(body):
                usize = int.from_bytes(body[j:j + 8], "little")
                j += 8
            if csize == 0xFFFFFFFF and j + 8 <= len(body):
                csize = int.from_bytes(body[j:j + 8], "little")
                j += 8
            if header == 0xFFFFFFFF and j + 8 <= len(body):
                header = int.from_bytes(body[j:j + 8], "little")
        i += 4 + n
    return usize, csize, header


def _member_bytes(ctx: _Ctx, buf: _Buf, e: _ZipEntry, label: str, *,
                  limit: int | None = None) -> bytes | None:
    """Uncompressed bytes of a zip member (at most ``limit``), or ``None`` with a finding."""
    cap = ctx.max_pickle_bytes if limit is None else limit
    raw_end = e.data_start + e.csize
    if e.method == 0:
        if e.csize > cap:
            if limit is None:
                ctx.add("scan-limit-exceeded", Severity.HIGH, "resource",
                        f"zip member {label} is {e.csize} bytes, over the scan limit; not scanned",
                        member=label)
                return None
            return bytes(buf[e.data_start:e.data_start + cap])
        return bytes(buf[e.data_start:raw_end])
    if e.method == 8:
        d = zlib.decompressobj(-15)
        out = bytearray()
        p = e.data_start
        try:
            while p < raw_end and len(out) <= cap:
                chunk = bytes(buf[p:min(raw_end, p + (1 << 20))])
                p += len(chunk)
                out += d.decompress(chunk, cap + 1 - len(out))
                while d.unconsumed_tail and len(out) <= cap:
                    out += d.decompress(d.unconsumed_tail, cap + 1 - len(out))
                if d.eof:
                    break
        except zlib.error as exc:
            raise MalformedInput(f"zip member {label} does not inflate: {exc}",
                                 offset=e.data_start) from None
        if len(out) > cap:
            if limit is None:
                ctx.add("scan-limit-exceeded", Severity.HIGH, "resource",
                        f"zip member {label} inflates past the scan limit; not scanned",
                        member=label)
                return None
            return bytes(out[:cap])
        return bytes(out)
    ctx.add("zip-unsupported-compression", Severity.HIGH, "evasion",
            f"zip member {label} uses compression method {e.method}; it cannot be scanned",
            member=label, method=e.method)
    return None


def _check_zip(ctx: _Ctx, buf: _Buf, z: _Zip, prefix: str) -> None:
    """Findings for container tricks: flag bits, header mismatches, duplicates, CRC."""
    seen: dict[bytes, int] = {}
    # an archive without a pickle or an array in it is no checkpoint: the loader refuses it, so
    # its flag bits (an encrypted text file, say) are no evasion
    loadable = any(e.name.lower().endswith((b".pkl", b".npy")) for e in z.entries)
    for e in z.entries:
        label = prefix + e.text
        key = e.name.lower()
        if key in seen:
            ctx.add("zip-duplicate-name", Severity.HIGH, "evasion",
                    f"zip holds more than one member named {e.text!r} (case-insensitively); "
                    "readers disagree on which one they use", member=label,
                    entries=[seen[key], e.index])
        else:
            seen[key] = e.index
        if e.local_name != e.name:
            ctx.add("zip-header-mismatch", Severity.HIGH, "evasion",
                    f"zip local header names {e.local_name.decode('utf-8', 'backslashreplace')!r} "
                    f"but the central directory names {e.text!r}", member=label)
        if e.local_method != e.method:
            ctx.add("zip-header-mismatch", Severity.HIGH, "evasion",
                    f"zip member {e.text!r}: local header says compression {e.local_method}, "
                    f"central directory {e.method}", member=label)
        if (e.flags | e.local_flags) & _ZIP_SUSPICIOUS_FLAGS or e.flags != e.local_flags:
            ctx.add("zip-flag-bits", Severity.HIGH if loadable else Severity.INFO, "evasion",
                    f"zip member {e.text!r} has flag bits central=0x{e.flags:04x} "
                    f"local=0x{e.local_flags:04x} (encryption/patch bits, or headers disagree)",
                    member=label, central=e.flags, local=e.local_flags)


def _check_crc(ctx: _Ctx, e: _ZipEntry, data: bytes, label: str) -> None:
    if len(data) != e.usize:
        ctx.add("zip-header-mismatch", Severity.HIGH, "evasion",
                f"zip member {e.text!r} holds {len(data)} bytes but the directory says {e.usize}",
                member=label)
    if zlib.crc32(data) != e.crc:
        ctx.add("zip-bad-crc", Severity.HIGH, "evasion",
                f"zip member {e.text!r} fails its CRC-32 check; torch's reader does not check it, "
                "other readers refuse the file", member=label)


def _torch_target(entries: list[_ZipEntry]) -> tuple[str | None, list[_ZipEntry], bytes | None]:
    """What torch's zip reader would unpickle: ``<first component of entry 0>/data.pkl``.

    miniz looks names up case-insensitively. Returns (member name, all matches, prefix).
    """
    if not entries:
        return None, [], None
    first = entries[0].name
    slash = first.find(b"/")
    if slash < 0:
        return None, [], None
    prefix = first[:slash]
    want = (prefix + b"/data.pkl").lower()
    matches = [e for e in entries if e.name.lower() == want]
    return (matches[0].text if matches else None), matches, prefix


def _zip_format(z: _Zip) -> tuple[str, str | None]:
    target, _, prefix = _torch_target(z.entries)
    lower = [e.name.lower() for e in z.entries]
    if target is not None and prefix is not None:
        p = prefix.lower() + b"/"
        if any(n == p + b"constants.pkl" or n.startswith(p + b"code/") for n in lower):
            return "torchscript", target
        return "torch-zip", target
    if lower and all(n.endswith(b".npy") or n.endswith(b"/") for n in lower):
        return "numpy-npz", None
    if any(n.endswith(b".pkl") for n in lower):
        return "torch-zip", None
    return "unknown", None


def _scan_zip(ctx: _Ctx, buf: _Buf, z: _Zip, fmt: str, prefix: str = "") -> None:
    """Walk every member that could be unpickled; read no tensor data."""
    _check_zip(ctx, buf, z, prefix)
    target, matches, arch = _torch_target(z.entries)
    data_dir = (arch.lower() + b"/data/") if arch is not None else None
    for e in z.entries:
        label = prefix + e.text
        lname = e.name.lower()
        if lname.endswith(b"/") and e.usize == 0:
            continue
        if e.method != 0 and e.usize >= _BOMB_MIN_BYTES and e.usize > _BOMB_RATIO * max(e.csize, 1):
            ctx.add("resource-abuse", Severity.MEDIUM, "resource",
                    f"zip member {label} declares {e.usize} bytes from {e.csize} compressed "
                    f"({e.usize // max(e.csize, 1)}:1): a decompression bomb for the loader; "
                    "the scan does not inflate it", member=label, declared_bytes=e.usize,
                    compressed_bytes=e.csize, ratio=e.usize // max(e.csize, 1))
        if lname.endswith(b".npy"):
            _scan_npz_member(ctx, buf, e, label)
            continue
        if data_dir is not None and lname.startswith(data_dir) and e not in matches:
            continue  # raw tensor bytes: torch never unpickles them
        wanted = e in matches or lname.endswith(b".pkl")
        if not wanted:
            head = _member_bytes(ctx, buf, e, label, limit=2)
            wanted = head is not None and _pickle_like(head)
        if not wanted:
            continue
        data = _member_bytes(ctx, buf, e, label)
        if data is None:
            continue
        _check_crc(ctx, e, data, label)
        _walk_member(ctx, data, label, truncation_fatal=(e in matches))
    if fmt in ("torch-zip", "torchscript") and target is None:
        ctx.add("zip-no-data-pkl", Severity.MEDIUM, "format",
                "zip holds pickles but no <prefix>/data.pkl that torch's reader would load")


def _walk_member(ctx: _Ctx, data: _Buf, label: str, *, truncation_fatal: bool) -> None:
    try:
        _walk(ctx, data, 0, len(data), label)
    except _TruncatedError as exc:
        if truncation_fatal:
            raise _FatalError(label, exc.offset, exc.message) from None
        _parse_error(ctx, label, exc.offset, exc.message)
    except _InvalidError as exc:
        _parse_error(ctx, label, exc.offset, exc.message)
    except _LimitError as exc:
        ctx.limit(label, exc)


class _FatalError(Exception):
    def __init__(self, member: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.member = member
        self.offset = offset
        self.message = message


def _parse_error(ctx: _Ctx, member: str, offset: int, message: str) -> None:
    ctx.add("pickle-parse-error", Severity.MEDIUM, "evasion",
            f"{member} is not a valid pickle stream ({message}); the unpickler runs every "
            "opcode before the fault", member=member, offset=offset)


# ---- numpy ----------------------------------------------------------------------------------


def _npy_header(data: _Buf, base: int, end: int, label: str) -> tuple[dict[str, object], int]:
    """Parse a ``.npy`` header at ``base``; returns (header dict, offset of the data)."""
    if end - base < 10 or bytes(data[base:base + 6]) != b"\x93NUMPY":
        raise MalformedInput(f"{label}: not a .npy header", offset=base)
    major = data[base + 6]
    if major == 1:
        hlen, start = _u16(data, base + 8), base + 10
    elif major in (2, 3):
        if end - base < 12:
            raise MalformedInput(f"{label}: truncated .npy header", offset=base)
        hlen, start = _u32(data, base + 8), base + 12
    else:
        raise MalformedInput(f"{label}: unsupported .npy version {major}", offset=base + 6)
    if hlen > _MAX_NPY_HEADER or start + hlen > end:
        raise MalformedInput(f"{label}: .npy header length {hlen} is invalid", offset=base + 8)
    raw = bytes(data[start:start + hlen])
    try:
        text = raw.decode("utf-8" if major == 3 else "latin-1")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError,
            TypeError):
        raise MalformedInput(f"{label}: .npy header is not a Python literal", offset=start) from None
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise MalformedInput(f"{label}: .npy header lacks descr/fortran_order/shape", offset=start)
    return {str(k): v for k, v in header.items()}, start + hlen


def _descr_has_object(descr: object, depth: int = 0) -> bool:
    if depth > 32:
        return True
    if isinstance(descr, str):
        return descr.lstrip("<>|=").startswith("O")
    if isinstance(descr, (list, tuple)):
        return any(_descr_has_object(d, depth + 1) for d in descr)
    return False


def _scan_npy(ctx: _Ctx, data: _Buf, end: int, label: str) -> None:
    header, start = _npy_header(data, 0, end, label)
    if _descr_has_object(header.get("descr")):
        member = f"{label}#pickle@{start}"
        plain = True
        try:
            _walk(ctx, data, start, end, member)
        except (_TruncatedError, _InvalidError) as exc:
            plain = False
            _parse_error(ctx, member, exc.offset, exc.message)
        except _LimitError as exc:
            plain = False
            ctx.limit(label, exc)
        # an object array of plain values (numbers, strings, nested lists) imports nothing a
        # checkpoint does not: numpy still unpickles it, but there is nothing to run
        plain = plain and all(r.classification == "allowed" for r in ctx.refs
                              if r.member == member)
        ctx.add("numpy-object-array", Severity.INFO if plain else Severity.MEDIUM, "exec",
                f"{label} is an object array: numpy.load(allow_pickle=True) unpickles its data"
                + (" (plain values only)" if plain else ""),
                member=label, offset=start)


def _scan_npz_member(ctx: _Ctx, buf: _Buf, e: _ZipEntry, label: str) -> None:
    head = _member_bytes(ctx, buf, e, label, limit=12)  # magic, version, header length
    if head is None:
        return
    if len(head) >= 12 and head[:6] == b"\x93NUMPY" and head[6] in (1, 2, 3):
        hlen = _u16(head, 8) + 10 if head[6] == 1 else _u32(head, 8) + 12
        head = _member_bytes(ctx, buf, e, label, limit=min(hlen, _MAX_NPY_HEADER + 12))
        if head is None:
            return
    header, _ = _npy_header(head, 0, len(head), label)
    if not _descr_has_object(header.get("descr")):
        return
    data = _member_bytes(ctx, buf, e, label)
    if data is None:
        return
    _check_crc(ctx, e, data, label)
    _scan_npy(ctx, data, len(data), label)


# ---- tar (torch < 0.1.10) -------------------------------------------------------------------


def _is_tar(buf: _Buf) -> bool:
    if len(buf) < 512:
        return False
    block = bytes(buf[:512])
    if block.count(0) == 512:
        return False
    field_ = block[148:156].replace(b"\x00", b" ").strip()
    try:
        claimed = int(field_ or b"x", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 0x20
    return claimed in (unsigned, signed)


_TORCH_TAR_MEMBERS = ("sys_info", "pickle", "tensors", "storages")


def _tar_members(buf: _Buf) -> tuple[dict[str, list[tuple[int, int]]], list[str], bool]:
    """Headers of a tar archive: ({name: [(data offset, size)]}, odd members, capped).

    Only the four member names torch's legacy loader uses are collected; member data is not
    read. Raises ``MalformedInput`` for an unreadable archive.
    """
    members: dict[str, list[tuple[int, int]]] = {}
    odd: list[str] = []
    fileobj = buf if isinstance(buf, mmap.mmap) else io.BytesIO(bytes(buf))
    fileobj.seek(0)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for count in range(_MAX_TAR_MEMBERS + 1):
                info = tar.next()
                if info is None:
                    return members, odd, False
                if count == _MAX_TAR_MEMBERS:
                    return members, odd, True
                if info.name not in _TORCH_TAR_MEMBERS:
                    continue
                if not info.isreg() or info.issparse():
                    odd.append(info.name)
                    continue
                if info.offset_data + info.size > len(buf):
                    raise MalformedInput(f"tar member {info.name!r} is truncated",
                                         offset=info.offset_data)
                members.setdefault(info.name, []).append((info.offset_data, info.size))
    except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError, OverflowError) as exc:
        raise MalformedInput(f"unreadable tar archive: {exc}") from None
    return members, odd, False


def _scan_tar(ctx: _Ctx, buf: _Buf) -> str:
    members, odd, capped = _tar_members(buf)
    if capped:
        ctx.limit("tar", _LimitError(0, f"more than {_MAX_TAR_MEMBERS} tar members"))
    for name in odd:
        ctx.add("legacy-tar-unparsed", Severity.HIGH, "evasion",
                f"tar member {name!r} is not a plain file", member=f"tar:{name}")
    if "storages" not in members and "pickle" not in members:
        return "unknown"
    for name, copies in members.items():
        if len(copies) > 1:
            ctx.add("zip-duplicate-name", Severity.HIGH, "evasion",
                    f"tar holds {len(copies)} members named {name!r}; torch uses the last",
                    member=f"tar:{name}")
    for missing in ("storages", "tensors", "pickle"):
        if missing not in members:
            ctx.add("legacy-tar-incomplete", Severity.MEDIUM, "format",
                    f"legacy tar checkpoint has no {missing!r} member", member=f"tar:{missing}")
    for start, size in members.get("storages", []):
        _tar_storages(ctx, buf, start, start + size)
    for start, size in members.get("tensors", []):
        _tar_tensors(ctx, buf, start, start + size)
    for start, size in members.get("pickle", []):
        _walk_member_region(ctx, buf, start, start + size, "tar:pickle")
    return "torch-tar"


def _walk_member_region(ctx: _Ctx, buf: _Buf, start: int, end: int, label: str) -> None:
    try:
        _walk(ctx, buf, start, end, label)
    except _TruncatedError as exc:
        raise _FatalError(label, exc.offset, exc.message) from None
    except _InvalidError as exc:
        _parse_error(ctx, label, exc.offset, exc.message)
    except _LimitError as exc:
        ctx.limit(label, exc)


def _tar_walk(ctx: _Ctx, buf: _Buf, p: int, end: int, base: int, what: str) -> _WalkOut:
    label = f"tar:{what}@{p - base}"
    try:
        return _walk(ctx, buf, p, end, label)
    except _TruncatedError as exc:
        raise _FatalError(label, exc.offset, exc.message) from None


def _tar_count(value: object, p: int, end: int, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > end - p:
        raise _InvalidError(0, f"{label} does not start with a record count")
    return value


def _tar_storages(ctx: _Ctx, buf: _Buf, start: int, end: int) -> None:
    """``storages``: count, then per storage (key, location, type) + int64 numel + data."""
    try:
        out = _tar_walk(ctx, buf, start, end, start, "storages")
        p = out.end
        for _ in range(_tar_count(out.value, p, end, "tar:storages")):
            out = _tar_walk(ctx, buf, p, end, start, "storages")
            p = out.end
            rec = out.value
            if not (isinstance(rec, tuple) and len(rec) == 3 and isinstance(rec[2], _Global)):
                raise _InvalidError(p - start, "storage entry is not (key, location, storage type)")
            key, location, stype = rec
            ref = ctx.refs[stype.idx]
            entry = _STORAGE_TYPES.get(ref.name)
            if entry is None or not isinstance(location, str) or not isinstance(key, (str, int)):
                raise _InvalidError(p - start, f"storage type {ref.module}.{ref.name} is not known")
            if p + 8 > end:
                raise _FatalError("tar:storages", p - start, "storage size header is truncated")
            numel = int.from_bytes(buf[p:p + 8], "little", signed=True)
            nbytes = numel * entry[1]
            if numel < 0 or p + 8 + nbytes > end:
                raise _FatalError("tar:storages", p - start, "storage data is truncated")
            ctx.storages.append(StorageRecord(key=str(key), dtype=entry[0], numel=numel,
                                              location=location, member="tar:storages"))
            p += 8 + nbytes
        _tar_walk(ctx, buf, p, end, start, "storages")  # storage views
    except _InvalidError as exc:
        ctx.add("legacy-tar-unparsed", Severity.HIGH, "evasion",
                f"tar member 'storages' cannot be followed ({exc.message}); the rest of it was "
                "not scanned", member="tar:storages", offset=exc.offset)
    except _LimitError as exc:
        ctx.limit("tar:storages", exc)


def _tar_tensors(ctx: _Ctx, buf: _Buf, start: int, end: int) -> None:
    """``tensors``: count, then per tensor (key, storage id, type) + ndim + sizes + strides."""
    try:
        out = _tar_walk(ctx, buf, start, end, start, "tensors")
        p = out.end
        for _ in range(_tar_count(out.value, p, end, "tar:tensors")):
            out = _tar_walk(ctx, buf, p, end, start, "tensors")
            p = out.end
            if p + 8 > end:
                raise _FatalError("tar:tensors", p - start, "tensor header is truncated")
            ndim = int.from_bytes(buf[p:p + 4], "little", signed=True)
            skip = 8 + 16 * ndim + 8
            if ndim < 0 or p + skip > end:
                raise _FatalError("tar:tensors", p - start, "tensor header is truncated")
            p += skip
    except _InvalidError as exc:
        ctx.add("legacy-tar-unparsed", Severity.HIGH, "evasion",
                f"tar member 'tensors' cannot be followed ({exc.message}); the rest of it was "
                "not scanned", member="tar:tensors", offset=exc.offset)
    except _LimitError as exc:
        ctx.limit("tar:tensors", exc)


# ---- safetensors ----------------------------------------------------------------------------

_SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def _looks_safetensors(buf: _Buf) -> bool:
    if len(buf) < 10:
        return False
    n = _u64(buf, 0)
    if not (2 <= n <= min(_MAX_SAFETENSORS_HEADER, len(buf) - 8) and buf[8] == 0x7B):
        return False
    try:
        return isinstance(json.loads(bytes(buf[8:8 + n]).decode("utf-8")), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def _check_safetensors(buf: _Buf) -> None:
    n = _u64(buf, 0)
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedInput(f"safetensors header is not JSON: {exc}", offset=8) from None
    if not isinstance(header, dict):
        raise MalformedInput("safetensors header is not a JSON object", offset=8)
    data_len = len(buf) - 8 - n
    for key, spec in header.items():
        if key == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise MalformedInput("safetensors __metadata__ must map strings to strings", offset=8)
            continue
        if not isinstance(spec, dict):
            raise MalformedInput(f"safetensors entry {key!r} is not an object", offset=8)
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise MalformedInput(f"safetensors entry {key!r} has unknown dtype {dtype!r}", offset=8)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and d >= 0 for d in shape):
            raise MalformedInput(f"safetensors entry {key!r} has an invalid shape", offset=8)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise MalformedInput(f"safetensors entry {key!r} has invalid data_offsets", offset=8)
        count = 1
        for d in shape:
            count *= d
        if count * _SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise MalformedInput(f"safetensors entry {key!r}: shape and byte range disagree",
                                 offset=8)


# ---- compressed pickles (joblib) ------------------------------------------------------------


def _compression(buf: _Buf) -> str | None:
    head = bytes(buf[:6])
    if len(head) >= 2 and head[0] == 0x78 and ((head[0] << 8) | head[1]) % 31 == 0:
        return "zlib"
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    if head[:3] == b"BZh" and len(head) >= 4 and 0x31 <= head[3] <= 0x39:
        return "bz2"
    if head == b"\xfd7zXZ\x00":
        return "xz"
    if head[:3] == b"\x5d\x00\x00":
        return "lzma"
    if head[:4] == b"\x04\x22\x4d\x18":
        return "lz4"  # an LZ4 frame: joblib.dump(compress="lz4")
    return None


def _decompress(ctx: _Ctx, buf: _Buf, kind: str, cap: int) -> tuple[bytes, bool]:
    """Decompress ``buf`` with the stdlib, at most ``cap`` bytes. Returns (data, capped)."""
    out = bytearray()
    p = 0
    size = len(buf)
    chunk = 1 << 20
    try:
        if kind in ("zlib", "gzip"):
            wbits = 15 if kind == "zlib" else 31
            z = zlib.decompressobj(wbits)
            while len(out) <= cap:
                if time.monotonic() > ctx.deadline:
                    break
                if z.unconsumed_tail:
                    data = z.unconsumed_tail
                elif z.eof:
                    rest = z.unused_data
                    if kind != "gzip" or not rest.startswith(b"\x1f\x8b"):
                        break
                    z = zlib.decompressobj(wbits)
                    data = rest
                elif p < size:
                    data = bytes(buf[p:p + chunk])
                    p += len(data)
                else:
                    break
                out += z.decompress(data, cap + 1 - len(out))
        else:
            def fresh() -> Any:  # bz2, lzma and lz4 decompressors share one interface
                if kind == "lz4":
                    import lz4.frame

                    return lz4.frame.LZ4FrameDecompressor()
                return bz2.BZ2Decompressor() if kind == "bz2" else lzma.LZMADecompressor()
            d = fresh()
            pending = b""
            while len(out) <= cap:
                if time.monotonic() > ctx.deadline:
                    break
                if d.eof:
                    rest = (d.unused_data or b"") + pending  # lz4: None when empty
                    if not rest or kind not in ("bz2", "xz", "lz4"):
                        break
                    d, pending = fresh(), b""
                    out += d.decompress(rest, cap + 1 - len(out))
                    continue
                if d.needs_input:
                    if pending:
                        data, pending = pending, b""
                    elif p < size:
                        data = bytes(buf[p:p + chunk])
                        p += len(data)
                    else:
                        break
                else:
                    data = b""
                out += d.decompress(data, cap + 1 - len(out))
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError, RuntimeError) as exc:
        raise MalformedInput(f"{kind} data does not decompress: {exc}") from None
    return bytes(out[:cap]), len(out) > cap


# ---- stacked pickles ------------------------------------------------------------------------


def _has_joblib_wrapper(ctx: _Ctx, first_ref: int) -> bool:
    return any(f"{r.module}.{r.name}" in _JOBLIB_WRAPPERS for r in ctx.refs[first_ref:])


def _scan_pickle_file(ctx: _Ctx, buf: _Buf, member: str) -> tuple[str, str | None] | None:
    """Raw pickle, legacy stacked torch pickles, or a joblib pickle with inline arrays.

    Returns ``None`` (and records nothing) when offset 0 does not start a pickle: the walk
    failed, imported nothing, and the data does not begin with a PROTO opcode.
    """
    size = len(buf)
    saved = ctx.mark()
    joblib = False
    try:
        out = _walk(ctx, buf, 0, size, member)
        joblib = _has_joblib_wrapper(ctx, saved[0])
    except (_TruncatedError, _InvalidError) as exc:
        if _has_joblib_wrapper(ctx, saved[0]):
            joblib = True
        elif not _pickle_like(bytes(buf[:2])) and len(ctx.refs) == saved[0]:
            ctx.rollback(saved)
            return None
        elif isinstance(exc, _TruncatedError):
            raise _FatalError(member, exc.offset, exc.message) from None
        else:
            _parse_error(ctx, member, exc.offset, exc.message)
            return "pickle", member
    except _LimitError as exc:
        ctx.limit(member, exc)
        return "pickle", member
    if joblib:
        ctx.format = "joblib"
        # Walk again the way joblib.load reads it; the plain walk above (kept) is what
        # pickle.load / torch.load would run on the same bytes.
        plain_refs = {(r.module, r.name, r.offset) for r in ctx.refs[saved[0]:]}
        plain_findings = len(ctx.findings)
        del ctx.findings[saved[2]:plain_findings]
        mark = len(ctx.refs)
        label = f"{member}#joblib"
        try:
            out = _walk(ctx, buf, 0, size, label, joblib=True)
        except _TruncatedError as exc:
            raise _FatalError(label, exc.offset, exc.message) from None
        except _InvalidError as exc:
            _parse_error(ctx, label, exc.offset, exc.message)
            return "joblib", member
        except _LimitError as exc:
            ctx.limit(label, exc)
            return "joblib", member
        # drop duplicates of what the plain walk already recorded at the same offsets
        ctx.refs[mark:] = [r for r in ctx.refs[mark:] if (r.module, r.name, r.offset) not in plain_refs]
        _trailing(ctx, buf, out.end, member)
        return "joblib", member
    if out.value == _LEGACY_MAGIC:
        ctx.format, ctx.target = "torch-legacy", "<legacy:3>"
        names = ["<legacy:1>", "<legacy:2>", "<legacy:3>", "<legacy:4>"]
        ctx.pickles[saved[3]] = "<legacy:0>"
        for ref in ctx.refs[saved[0]:]:
            ref.member = "<legacy:0>"
        p = out.end
        for i, name in enumerate(names):
            try:
                step = _walk(ctx, buf, p, size, name)
            except (_TruncatedError, _InvalidError) as exc:
                raise _FatalError(name, exc.offset, exc.message) from None
            except _LimitError as exc:
                ctx.limit(name, exc)
                return "torch-legacy", "<legacy:3>"
            if i == 0 and step.value != _LEGACY_PROTOCOL_VERSION:
                ctx.add("pickle-parse-error", Severity.MEDIUM, "format",
                        f"legacy torch protocol version is {step.value!r}, not 1001; torch "
                        "refuses the file after unpickling the first two streams", member=name)
            p = step.end
        return "torch-legacy", "<legacy:3>"
    _trailing(ctx, buf, out.end, member)
    return "pickle", member


def _trailing(ctx: _Ctx, buf: _Buf, p: int, member: str) -> None:
    size = len(buf)
    if p >= size:
        return
    ctx.add("pickle-trailing-data", Severity.LOW, "format",
            f"{size - p} bytes follow the first pickle stream; pickle.load ignores them",
            member=member, offset=p, length=size - p)
    for _ in range(_MAX_TRAILING_STREAMS):
        if p >= size or not _pickle_like(bytes(buf[p:p + 2])):
            return
        label = f"{member}@{p}"
        saved = ctx.mark()
        try:
            p = _walk(ctx, buf, p, size, label).end
        except (_TruncatedError, _InvalidError):
            if len(ctx.refs) == saved[0]:
                ctx.rollback(saved)
            return
        except _LimitError as exc:
            ctx.limit(label, exc)
            return


# --------------------------------------------------------------------------------------------
# identify / scan_file
# --------------------------------------------------------------------------------------------


def _first_pickle_kind(buf: _Buf) -> str | None:
    """``pickle``/``torch-legacy``/``joblib`` when offset 0 starts a pickle stream, else None."""
    ctx = _new_ctx(DEFAULT_MAX_PICKLE_BYTES, 2_000_000, DEFAULT_MAX_MEMO, DEFAULT_MAX_DEPTH, 10.0)
    head = bytes(buf[:2])
    if not head or head[0] not in _OP_PROTO:
        return None
    try:
        out = _walk(ctx, buf, 0, len(buf), "<raw>")
    except (_TruncatedError, _InvalidError, _LimitError):
        if _has_joblib_wrapper(ctx, 0):
            return "joblib"
        # a broken stream is still a pickle when it names a global Python could import; text
        # that merely starts with an opcode letter ("chat_template: ..." reads as GLOBAL) is not
        return "pickle" if _pickle_like(head) or any(
            _DOTTED.fullmatch(r.module) and _DOTTED.fullmatch(r.name) for r in ctx.refs) else None
    if _has_joblib_wrapper(ctx, 0):
        return "joblib"
    return "torch-legacy" if out.value == _LEGACY_MAGIC else "pickle"


def _identify_buf(buf: _Buf) -> str:
    head = bytes(buf[:8])
    if head[:4] == _ZIP_LOCAL:
        try:
            z = _find_zip(buf)
        except MalformedInput:
            return "unknown"
        return _zip_format(z)[0] if z is not None else "unknown"
    if head[:6] == b"\x93NUMPY":
        return "numpy-npy"
    if _looks_safetensors(buf):
        return "safetensors"
    if _is_tar(buf):
        try:
            members, _, _ = _tar_members(buf)
        except MalformedInput:
            return "unknown"
        return "torch-tar" if "storages" in members or "pickle" in members else "unknown"
    kind = _first_pickle_kind(buf)
    if kind is not None:
        return kind
    comp = _compression(buf)
    if comp is not None:
        ctx = _new_ctx(DEFAULT_MAX_PICKLE_BYTES, DEFAULT_MAX_OPS, DEFAULT_MAX_MEMO,
                       DEFAULT_MAX_DEPTH, 10.0)
        try:
            data, _ = _decompress(ctx, buf[:1 << 16] if len(buf) > 1 << 16 else buf, comp, 1 << 16)
        except MalformedInput:
            return "unknown"
        return "joblib" if _pickle_like(data[:2]) else "unknown"
    return "unknown"


def identify(path: str | os.PathLike[str]) -> str:
    """The format of the file at ``path``, by content (one of :data:`FORMATS`).

    Zip archives are told apart by their central directory (torch zip, TorchScript, npz);
    a pickle at offset 0 is walked to tell legacy torch files (magic number first) and joblib
    pickles from plain pickles; compressed files are recognised when their first decompressed
    bytes start a pickle. Never raises for unrecognised content (``unknown``); raises
    ``MalformedInput`` only when the file cannot be read.
    """
    with _open_buffer(path) as buf:
        return _identify_buf(buf)


def scan_file(path: str | os.PathLike[str], *, max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
              max_ops: int = DEFAULT_MAX_OPS, max_memo: int = DEFAULT_MAX_MEMO,
              max_depth: int = DEFAULT_MAX_DEPTH,
              time_budget_s: float = DEFAULT_TIME_BUDGET_S) -> StaticScan:
    """Statically scan the file at ``path``; see the module docstring for what is reported.

    ``max_pickle_bytes`` bounds each stream the scanner has to materialise (a zip member, a
    decompressed file); ``max_ops`` bounds opcodes over the whole file, ``max_memo`` memo
    entries and ``max_depth`` open MARKs per stream; ``time_budget_s`` bounds the whole scan.
    Raises ``MalformedInput`` (``MalformedStream`` for pickle streams) for truncated or
    corrupt files; an unrecognised file gives format ``unknown``, not an exception.
    """
    ctx = _new_ctx(max_pickle_bytes, max_ops, max_memo, max_depth, time_budget_s)
    with _open_buffer(path) as buf:
        try:
            fmt, target = _dispatch(ctx, buf)
        except _FatalError as exc:
            raise MalformedStream(f"{exc.member}: {exc.message} at offset {exc.offset}",
                                  path=os.fspath(path), offset=exc.offset, member=exc.member,
                                  partial=_result(ctx, ctx.format, ctx.target)) from None
        except MalformedStream:
            raise
        except MalformedInput as exc:
            if exc.path is None:
                raise MalformedInput(exc.message, path=os.fspath(path), offset=exc.offset) from None
            raise
    return _result(ctx, fmt, target)


def _dispatch(ctx: _Ctx, buf: _Buf) -> tuple[str, str | None]:
    size = len(buf)
    head = bytes(buf[:8])
    if head[:4] == _ZIP_LOCAL:
        z = _find_zip(buf)
        if z is None:
            raise MalformedInput("file starts like a zip archive but has no end-of-central-"
                                 "directory record (truncated?)", offset=size)
        fmt, target = _zip_format(z)
        ctx.format, ctx.target = fmt, target
        if z.shift:
            ctx.add("zip-polyglot", Severity.HIGH, "evasion",
                    f"{z.shift} bytes precede the zip archive that its directory does not "
                    "account for; readers disagree on member offsets", shift=z.shift)
        _scan_zip(ctx, buf, z, fmt)
        return fmt, target
    if head[:6] == b"\x93NUMPY":
        ctx.format = "numpy-npy"
        _scan_npy(ctx, buf, size, "<npy>")
        _polyglot(ctx, buf)
        return "numpy-npy", None
    if _looks_safetensors(buf):
        _check_safetensors(buf)
        _polyglot(ctx, buf)
        return "safetensors", None
    if _is_tar(buf):
        ctx.format = "torch-tar"
        fmt = _scan_tar(ctx, buf)
        return fmt, ("tar:pickle" if fmt == "torch-tar" else None)
    if head and head[0] in _OP_PROTO:
        ctx.format, ctx.target = "pickle", "<raw>"
        found = _scan_pickle_file(ctx, buf, "<raw>")
        if found is not None:
            _polyglot(ctx, buf)
            return found
        ctx.format, ctx.target = "unknown", None
    comp = _compression(buf)
    if comp is not None:
        data, capped = _decompress(ctx, buf, comp, ctx.max_pickle_bytes)
        if _pickle_like(data[:2]):
            member = f"<{comp}>"
            ctx.format, ctx.target = "joblib", None
            if capped:
                ctx.add("scan-limit-exceeded", Severity.HIGH, "resource",
                        f"{comp} stream decompresses past {ctx.max_pickle_bytes} bytes; only the "
                        "start was scanned", member=member)
            try:
                if _scan_pickle_file(ctx, data, member) is None:
                    _parse_error(ctx, member, 0, "decompressed data is not a pickle stream")
            except _FatalError:
                if not capped:
                    raise
            return "joblib", None
    _polyglot(ctx, buf)
    return "unknown", None


def _polyglot(ctx: _Ctx, buf: _Buf) -> None:
    """A zip archive inside a file that torch does not read as a zip (no PK at offset 0)."""
    try:
        z = _find_zip(buf)
    except MalformedInput:
        return
    if z is None or not z.entries:
        return
    ctx.add("zip-polyglot", Severity.HIGH, "evasion",
            "the file is also a zip archive (zip readers find it from the end) but torch reads "
            "it from offset 0; its members are scanned too", entries=len(z.entries))
    try:
        _scan_zip(ctx, buf, z, _zip_format(z)[0], prefix="zip:")
    except _FatalError as exc:
        _parse_error(ctx, exc.member, exc.offset, exc.message)
    except MalformedInput:
        return

