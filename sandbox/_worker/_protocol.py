"""The wire format between the container-side worker and the host.

Stdlib only: the host imports this module (and only this one) from the worker package.

**The channel.** Nothing crosses the boundary through a directory the sandbox can write. The
host owns one unix ``SOCK_SEQPACKET`` socket per sandbox, in a directory bind-mounted
*read-only* at :data:`CHANNEL_DIR`; only the supervisor (the container's PID 1) connects, before
any loader code has seen an input, and the host accepts exactly one connection and then removes
the socket file. Every message is one frame: a one-byte type and a payload of at most
:data:`MAX_FRAME` bytes, with file descriptors only where the type says so::

    supervisor -> host   HELLO    {"protocol", "pid"}                   the sandbox is ready (warm)
    host -> supervisor   JOB      JobConfig JSON + 1 fd: the input, opened read-only by the host
    supervisor -> host   EVENTS   JSON lines, streamed while the load runs
    supervisor -> host   OUTPUT   {"name": "manifest"|"tensors", "size"} + 1 fd: a sealed memfd
                                  (or, under gVisor, {..., "inline": true} and no fd, followed by
                                  CHUNK frames of exactly "size" bytes in all)
    supervisor -> host   CHUNK    raw bytes of the inline output announced last
    host -> supervisor   STOP     {"kind", "category", "t"} -- under gVisor, where the host sees
                                  the refusals (in gVisor's trace): the policy ends the load
    supervisor -> host   STATUS   how the loader ended, resource figures, canary values
    supervisor -> host   DONE     {} -- the supervisor completed; nothing follows

Outputs are memfds the supervisor created before it forked the loader, sealed by the supervisor
(:data:`OUTPUT_SEALS`) once every loader process is dead; their pages are charged to the
container's memory cgroup, so the memory limit bounds them. gVisor cannot pass its descriptors
to a host socket (``sendmsg`` with ``SCM_RIGHTS`` fails with ``EINVAL``): there the supervisor
sends the same bytes *inline* (CHUNK frames), and the host writes them into a memfd of its own,
which it seals before anything reads it. The host checks the seals and the
size before it maps anything, and reads every frame with the caps below. When the host end
closes, the supervisor kills the load and the container exits.

Outputs::

    tensors    a SafeTensors file of every stored tensor (written by the loader)
    manifest   JSON: tensors (name, dtype, shape; sha256 only when no bytes were sent: a
               scan), views, skeleton, unrepresentable
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Self, TypeVar

PROTOCOL_VERSION = 2

# -- the channel --------------------------------------------------------------------------------

CHANNEL_DIR = "/run/sandbox"  # inside the container: the host's socket directory, read-only
SOCKET_NAME = "channel"
SOCKET_PATH = f"{CHANNEL_DIR}/{SOCKET_NAME}"
STAGE2 = "--stage2"  # the supervisor's argument: its environment is already empty
# The sandbox's first interpreter (``python3 -I -S -c BOOT ARGS...``) only re-executes the
# supervisor with an empty environment (the engine always adds PATH, HOSTNAME and HOME; bwrap,
# PWD): it imports nothing, so a sandbox pays the supervisor's imports once, not twice.
BOOT = (
    "import os,sys;e=sys.executable;"
    f"os.execve(e,[e,'-I','-m','sandbox_worker','{STAGE2}',*sys.argv[1:]],{{}})"
)
COLD = "--cold"  # the supervisor's argument: do not import torch ahead of a job
NPROC = "--nproc="  # the supervisor's argument (bwrap runner): its RLIMIT_NPROC
# the supervisor's argument (bwrap runner): no control group bounds the sandbox's shared memory,
# so the loader may not make memfds of its own (each is held only to RLIMIT_FSIZE, and
# RLIMIT_AS does not count one that is not mapped: a payload held gigabytes past the limit)
SHMEM_UNBOUNDED = "--shmem-unbounded"
# the supervisor's argument under gVisor (runsc), where seccomp user notification does not exist:
# the loader's filter refuses in the kernel (SECCOMP_RET_ERRNO) what the supervisor would refuse,
# and the evidence is gVisor's own trace of the sandbox's system calls, read by the host
PLAIN_FILTER = "--plain-filter"

LOADER_SCRATCH = "/tmp/.loader/"  # torch's own temporary files (legacy tar extraction)
INPUT_FD = 1000  # where the loader keeps the input descriptor (nofile is 1024)
INPUT_ALIAS = "<input>"  # how events name an open of the input through /proc/self/fd

HELLO, JOB, EVENTS, OUTPUT, STATUS, DONE, CHUNK = b"H", b"J", b"E", b"O", b"S", b"D", b"C"
STOP = b"X"
FRAME_TYPES = frozenset({HELLO, JOB, EVENTS, OUTPUT, STATUS, DONE, CHUNK, STOP})
FDS_OF = {JOB: 1, OUTPUT: 1}  # frames that carry descriptors, and how many; others none
MAX_FRAME = 64 * 1024  # payload bytes; a larger frame is a protocol violation
OUTPUT_NAMES = ("manifest", "tensors")

# memfd seals (linux/fcntl.h): the host maps an output only when all four are set
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
OUTPUT_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE

# Names of the outputs in messages and errors.
TENSORS_FILE = "tensors"
MANIFEST_FILE = "manifest"
STATUS_FILE = "status"
EVENTS_FILE = "events"


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One message on the channel."""
    if kind not in FRAME_TYPES or len(payload) > MAX_FRAME:
        raise ValueError("bad frame")
    return kind + payload


def json_frame(kind: bytes, doc: object) -> bytes:
    return frame(kind, json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode())


class ProtocolError(ValueError):
    """A document that crossed the boundary is not what the protocol allows."""


def _no_constants(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(data: bytes, what: str) -> object:
    """Strict JSON (UTF-8, no NaN/Infinity), any nesting error turned into ProtocolError."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


# -- typed documents ------------------------------------------------------------------------


def _finite(v: object) -> bool:
    """Whether ``v`` is a JSON number a float holds: JSON integers have any number of digits,
    and ``math.isfinite``/``float()`` raise OverflowError for one past 2**1024."""
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool) and -(2**1000) < v < 2**1000


def _num(v: object, lo: float, hi: float, what: str) -> float:
    if not _finite(v) or not lo <= v <= hi:  # type: ignore[operator]
        raise ProtocolError(f"{what} is not a number in [{lo:g}, {hi:g}]")
    return float(v)  # type: ignore[arg-type]


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError(f"{what} is not an integer in [{lo}, {hi}]")
    return v


@dataclass(frozen=True)
class JobConfig:
    """What the host asks of one sandbox: sent with the input descriptor in the JOB frame.
    The supervisor parses it with :meth:`from_json` (total: any bytes in, a config or a
    ProtocolError out), so even a host bug cannot crash it."""

    wall_clock_s: float = 120.0
    cpu_s: float = 0.0
    max_output_bytes: int = 0
    write_tensors: bool = True
    fatal: tuple[str, ...] = ()
    errno: int = _errno.EPERM
    allow_read: tuple[str, ...] = ()
    layout: bool = True  # a plain torch-zip state dict may come back as a layout (no bytes)
    hash_input: bool = True  # the supervisor hashes the input (the host's own check for big files)

    def to_json(self) -> bytes:
        d = asdict(self)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobConfig:
        d = parse_json(data, "job")
        if not isinstance(d, dict) or set(d) - {f for f in cls.__dataclass_fields__}:
            raise ProtocolError("job: not an object of known fields")
        fatal, allow = d.get("fatal", []), d.get("allow_read", [])
        if not isinstance(fatal, list) or not all(f in FATAL_CATEGORIES for f in fatal):
            raise ProtocolError("job: fatal names an unknown category")
        if (
            not isinstance(allow, list)
            or len(allow) > 64
            or not all(isinstance(a, str) and 0 < len(a) <= 4096 for a in allow)
        ):
            raise ProtocolError("job: allow_read malformed")
        for flag in ("write_tensors", "layout", "hash_input"):
            if not isinstance(d.get(flag, True), bool):
                raise ProtocolError(f"job: {flag} is not a boolean")
        return cls(
            wall_clock_s=_num(d.get("wall_clock_s", 120.0), 0.001, 1e7, "wall_clock_s"),
            cpu_s=_num(d.get("cpu_s", 0.0), 0, 1e7, "cpu_s"),
            max_output_bytes=_int(d.get("max_output_bytes", 0), 0, 2**62, "max_output_bytes"),
            write_tensors=d.get("write_tensors", True),
            fatal=tuple(fatal),
            errno=_int(d.get("errno", _errno.EPERM), 1, 4095, "errno"),
            allow_read=tuple(allow),
            layout=d.get("layout", True),
            hash_input=d.get("hash_input", True),
        )


@dataclass(frozen=True)
class Output:
    """An OUTPUT frame's document: which output the attached memfd holds, and its size."""

    name: str
    size: int
    inline: bool = False  # no memfd: CHUNK frames carry the bytes (under gVisor)

    @classmethod
    def from_json(cls, data: bytes) -> Output:
        d = parse_json(data, "output")
        if not isinstance(d, dict) or d.get("name") not in OUTPUT_NAMES:
            raise ProtocolError("output: unknown name")
        inline = d.get("inline", False)
        if not isinstance(inline, bool):
            raise ProtocolError("output: inline is not a boolean")
        return cls(name=str(d["name"]), size=_int(d.get("size"), 0, 2**62, "output size"), inline=inline)


@dataclass(frozen=True)
class Hello:
    protocol: int
    pid: int
    warm: bool = False

    @classmethod
    def from_json(cls, data: bytes) -> Hello:
        d = parse_json(data, "hello")
        if not isinstance(d, dict) or d.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError("hello: wrong protocol version")
        return cls(
            protocol=PROTOCOL_VERSION, pid=_int(d.get("pid"), 1, 2**31, "pid"), warm=d.get("warm") is True
        )


# -- the documents the sandbox sends back: one definition, parsed by the host, checked by the
# -- supervisor before it sends them. ``from_obj`` is total: any JSON value in, a document or a
# -- ProtocolError out; nothing outside these classes reads an untrusted dict.

_SHA256_CHARS = frozenset("0123456789abcdef")


def _req(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v: str, limit: int) -> str:
    """``v`` cut to ``limit`` characters, as text any stream can carry: a JSON string may hold
    a lone surrogate (``"\\ud800"``), which has no UTF-8 and would stop whatever prints or
    writes the report it reaches; it is kept as its escape."""
    v = v[:limit]
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    return v


def _opt_str(d: dict[str, object], key: str, limit: int, what: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    _req(isinstance(v, str), f"{what}.{key} is not a string")
    assert isinstance(v, str)
    return _text(v, limit)


def _opt_num(d: dict[str, object], key: str, what: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    _req(_finite(v), f"{what}.{key} is not a number")
    return float(v)  # type: ignore[arg-type]


def _opt_int(d: dict[str, object], key: str, what: str, lo: int = -(2**63), hi: int = 2**63) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    _req(_is_int(v) and lo <= v < hi, f"{what}.{key} is not an integer")  # type: ignore[operator]
    return v  # type: ignore[return-value]


def _sha256(v: object) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _SHA256_CHARS


def _dims(v: object, what: str) -> tuple[int, ...]:
    _req(
        isinstance(v, list) and len(v) <= MAX_NDIM and all(_is_int(s) and 0 <= s < 2**62 for s in v),
        f"{what} malformed",
    )  # type: ignore[union-attr]
    return tuple(v)  # type: ignore[arg-type]


def _shape(v: object, what: str) -> tuple[int, ...]:
    """The dims of a tensor the host makes contiguous: its row-major strides (the product of
    the dims after each, an empty dim counted as 1, as torch computes them) fit in an int64,
    or ``torch.empty`` of an empty tensor of shape [0, 2**61, 2**61] raises RuntimeError."""
    shape = _dims(v, what)
    stride = 1
    for d in shape[:0:-1]:
        stride *= max(d, 1)
        _req(stride < 2**63, f"{what}: its strides overflow")
    return shape


def _name(v: object, taken: set[str], what: str) -> str:
    # printable, as tensor_name makes every name: a name reaches messages, reports and the
    # headers of converted files, and a lone surrogate there cannot even be encoded
    _req(
        isinstance(v, str) and 0 < len(v) <= MAX_NAME_LEN and v != "__metadata__" and v.isprintable(),
        f"{what}: tensor name malformed",
    )
    assert isinstance(v, str)
    _req(v not in taken, f"{what}: duplicate tensor name {v[:80]!r}")
    taken.add(v)
    return v


#: a tensor's location as torch.load's restore functions name it: a device type (a backend's
#: own name for privateuse1 ones), and an index
_LOCATION = re.compile(r"[a-z][a-z0-9_]{0,31}(:[0-9]{1,4})?")


def _location(v: object, what: str) -> str:
    _req(isinstance(v, str) and _LOCATION.fullmatch(v) is not None, f"{what}: location malformed")
    return v  # type: ignore[return-value]


def _obj(v: object, what: str) -> dict[str, object]:
    _req(isinstance(v, dict), f"{what} is not an object")
    return v  # type: ignore[return-value]


def _doc(data: bytes, what: str) -> dict[str, object]:
    return _obj(parse_json(data, what), what)


def _good_items(raw: object, limit: int, good: Callable[[Any, Any], bool]) -> tuple[tuple[Any, Any], ...]:
    """The entries among the first ``limit`` of a JSON object that pass ``good``, in order; none
    where ``raw`` is not an object (for the parts of a document that are read leniently)."""
    if not isinstance(raw, dict):
        return ()
    return tuple((k, v) for k, v in list(raw.items())[:limit] if good(k, v))


_T = TypeVar("_T")


def _optional(raw: object, what: str, read: Callable[[dict[str, object], str], _T]) -> _T | None:
    """``read`` of the object ``raw`` (called ``what`` in errors); None where ``raw`` is None."""
    return None if raw is None else read(_obj(raw, what), what)


class _Returned:
    """A document the sandbox sends back, called :attr:`WHAT` in errors: :meth:`from_json`
    parses its bytes, ``from_obj`` checks the parsed value."""

    WHAT: ClassVar[str]

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        return cls.from_obj(parse_json(data, cls.WHAT))

    @classmethod
    def from_obj(cls, data: object) -> Self:
        raise NotImplementedError

    @classmethod
    def _fields(cls, data: object) -> dict[str, object]:
        """``data`` as an object of this protocol's version."""
        d = _obj(data, cls.WHAT)
        _req(d.get("protocol") == PROTOCOL_VERSION, f"{cls.WHAT}: wrong protocol version")
        return d


@dataclass(frozen=True)
class TensorEntry:
    """A stored tensor: its bytes are in the tensors output, ``nbytes`` long, in the safetensors
    dtype ``stored_as`` (raw ``U8`` where safetensors has no such dtype); or, with ``span``,
    they are the input's own bytes ``span[0]:span[1]``, untouched by the load, which the host
    reads from its own descriptor of the input instead (the claim is checked there: see
    ``_verify``; such an entry has no ``sha256``: the file's bytes at the span stand for it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stored_as: str
    nbytes: int
    sha256: str | None  # None: the bytes came to the host, which hashes them itself
    location: str = "cpu"
    span: tuple[int, int] | None = None
    #: the tensor's own strides where they are not row-major (channels_last, a transpose): a
    #: dense layout (:func:`dense_strides`); its bytes cross in row-major order all the same
    stride: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return self.nbytes // TORCH_DTYPES[self.dtype][1]


@dataclass(frozen=True, kw_only=True)
class StridedTensor:
    """A tensor as a strided window on the elements of what it lies in (a subclass says what):
    ``shape`` and ``stride`` from the element at ``offset``, all counted in elements as torch
    counts them; ``dtype`` is the torch dtype name (``float32``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True, kw_only=True)
class ViewEntry(StridedTensor):
    """A tensor that is a strided view of the stored tensor ``base`` (``offset`` counts from
    its first element)."""

    base: str
    location: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class LayoutEntry(StridedTensor):
    """One tensor of the layout hand-off: where it lies in the input's storage record ``key``
    (``offset`` counts from the record's first element); the host places it in the file
    itself."""

    key: str
    parameter: bool
    location: str = "cpu"


@dataclass(frozen=True)
class Unrepresentable:
    """An object replaced by a placeholder: where it was, its type, and why."""

    path: str
    type: str
    reason: str = ""


_LAYOUT_KEYS = frozenset(f.name for f in fields(LayoutEntry))


@dataclass(frozen=True)
class Manifest(_Returned):
    """What the loader returned, as data: stored tensors, views, or (the layout hand-off) where
    each tensor lies in the input; the skeleton of the returned structure (a JSON tree checked
    node by node where the host rebuilds it); what could not be represented; notes."""

    format: str
    tensors: tuple[TensorEntry, ...] = ()
    views: tuple[ViewEntry, ...] = ()
    layout: tuple[LayoutEntry, ...] | None = None
    skeleton: object = None
    unrepresentable: tuple[Unrepresentable, ...] = ()
    notes: tuple[str, ...] = ()

    WHAT: ClassVar[str] = MANIFEST_FILE

    def to_obj(self) -> dict[str, object]:
        d: dict[str, object] = {
            "protocol": PROTOCOL_VERSION,
            "format": self.format,
            "tensors": [asdict(t) for t in self.tensors],
            "views": [asdict(v) for v in self.views],
            "skeleton": self.skeleton,  # plain JSON already (asdict would deep-copy it)
            "unrepresentable": [asdict(u) for u in self.unrepresentable],
            "notes": list(self.notes),
        }
        if self.layout is not None:
            d["layout"] = [asdict(t) for t in self.layout]
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_obj(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_obj(cls, data: object) -> Manifest:
        what = MANIFEST_FILE
        d = cls._fields(data)
        raw_tensors, raw_views = d.get("tensors"), d.get("views")
        _req(isinstance(raw_tensors, list) and len(raw_tensors) <= MAX_TENSORS, f"{what}: tensors malformed")
        _req(isinstance(raw_views, list) and len(raw_views) <= MAX_TENSORS, f"{what}: views malformed")
        assert isinstance(raw_tensors, list) and isinstance(raw_views, list)
        taken: set[str] = set()
        tensors = tuple(cls._tensor(t, taken) for t in raw_tensors)
        stored = {t.name: t for t in tensors}
        views = tuple(cls._view(v, taken, stored) for v in raw_views)
        layout = None
        if d.get("layout") is not None:
            raw = d["layout"]
            _req(
                isinstance(raw, list) and 0 < len(raw) <= MAX_TENSORS and not tensors and not views,
                f"{what}: layout malformed",
            )
            assert isinstance(raw, list)
            layout = tuple(cls._placed(t, taken) for t in raw)
        unrep = d.get("unrepresentable", [])
        _req(isinstance(unrep, list), f"{what}: unrepresentable malformed")
        assert isinstance(unrep, list)
        unrepresentable = []
        for u in unrep[:10_000]:
            u = _obj(u, f"{what}: unrepresentable entry")
            _req(
                isinstance(u.get("path"), str) and isinstance(u.get("type"), str),
                f"{what}: unrepresentable entry malformed",
            )
            unrepresentable.append(
                Unrepresentable(
                    path=_text(str(u["path"]), 4000),
                    type=_text(str(u["type"]), 400),
                    reason=_opt_str(u, "reason", 400, what) or "",
                )
            )
        notes = d.get("notes", [])
        _req(isinstance(notes, list) and all(isinstance(n, str) for n in notes), f"{what}: notes malformed")
        assert isinstance(notes, list)
        fmt = d.get("format")
        _req(isinstance(fmt, str) and len(fmt) <= 64, f"{what}: format missing")
        return cls(
            format=_text(str(fmt), 64),
            tensors=tensors,
            views=views,
            layout=layout,
            skeleton=d.get("skeleton"),
            unrepresentable=tuple(unrepresentable),
            notes=tuple(_text(str(n), 4000) for n in notes[:10_000]),
        )

    @staticmethod
    def _tensor(raw: object, taken: set[str]) -> TensorEntry:
        what = MANIFEST_FILE
        t = _obj(raw, f"{what}: tensor entry")
        name = _name(t.get("name"), taken, what)
        dtype = t.get("dtype")
        _req(isinstance(dtype, str) and dtype in TORCH_DTYPES, f"{what}: unknown dtype {str(dtype)[:40]}")
        assert isinstance(dtype, str)
        stored_as, size = TORCH_DTYPES[dtype]
        _req(t.get("stored_as") == stored_as, f"{what}: {name}: wrong storage dtype")
        shape = _shape(t.get("shape"), f"{what}: {name}: shape")
        numel = 1
        for s in shape:
            numel *= s
        _req(t.get("nbytes") == numel * size, f"{what}: {name}: nbytes does not match shape")
        sha = t.get("sha256")
        _req(sha is None or _sha256(sha), f"{what}: {name}: sha256 malformed")
        raw_span = t.get("span")
        span = None
        if raw_span is not None:
            _req(
                isinstance(raw_span, list)
                and len(raw_span) == 2
                and all(_is_int(x) and 0 <= x < 2**62 for x in raw_span)
                and raw_span[1] - raw_span[0] == numel * size,  # type: ignore[index]
                f"{what}: {name}: span malformed",
            )
            # the bytes are the input's at the span, hashed by the host where it must: a digest
            # of the sandbox's beside it would stand for bytes nobody checked against it
            _req(sha is None, f"{what}: {name}: a span and a sha256")
            assert isinstance(raw_span, list)
            span = (int(raw_span[0]), int(raw_span[1]))
        stride = None
        if t.get("stride") is not None:
            stride = _dims(t.get("stride"), f"{what}: {name}: stride")
            _req(
                len(stride) == len(shape) and dense_strides(shape, stride),
                f"{what}: {name}: stride is not a dense layout of its shape",
            )
        return TensorEntry(
            name=name,
            dtype=dtype,
            shape=shape,
            stored_as=stored_as,
            nbytes=numel * size,
            sha256=None if sha is None else str(sha),
            location=_location(t.get("location"), what),
            span=span,
            stride=stride,
        )

    @staticmethod
    def _view(raw: object, taken: set[str], stored: dict[str, TensorEntry]) -> ViewEntry:
        what = MANIFEST_FILE
        v = _obj(raw, f"{what}: view entry")
        name = _name(v.get("name"), taken, what)
        base_name = v.get("base")
        base = stored.get(base_name) if isinstance(base_name, str) else None
        _req(base is not None, f"{what}: view {name} names no stored base")
        assert base is not None
        _req(v.get("dtype") == base.dtype, f"{what}: view {name}: dtype differs from base")
        _req(base.stride is None, f"{what}: view {name}: its base is not row-major")
        shape = _dims(v.get("shape"), f"{what}: view {name}: shape")
        stride = _dims(v.get("stride"), f"{what}: view {name}: stride")
        _req(len(stride) == len(shape), f"{what}: view {name}: stride rank")
        offset = v.get("offset")
        # bounded like every count of the manifest (an empty view's is not held to its base's)
        _req(_is_int(offset) and 0 <= offset < 2**62, f"{what}: view {name}: offset")  # type: ignore[operator]
        assert isinstance(offset, int)
        last = (
            offset + sum((s - 1) * st for s, st in zip(shape, stride, strict=True))
            if all(s > 0 for s in shape)
            else offset
        )
        _req(
            last < base.numel or (base.numel == 0 and 0 in shape),
            f"{what}: view {name}: reaches past its base",
        )
        return ViewEntry(
            name=name,
            base=base.name,
            offset=offset,
            shape=shape,
            stride=stride,
            dtype=base.dtype,
            location=_location(v.get("location"), what),
        )

    @staticmethod
    def _placed(raw: object, taken: set[str]) -> LayoutEntry:
        what = MANIFEST_FILE
        t = _obj(raw, f"{what}: layout entry")
        _req(set(t) == _LAYOUT_KEYS, f"{what}: layout entry malformed")
        name = _name(t["name"], taken, what)
        key = t["key"]
        _req(
            isinstance(key, str) and 0 < len(key) <= 64 and key.isprintable(), f"{what}: layout key malformed"
        )
        dtype = t["dtype"]
        _req(isinstance(dtype, str) and dtype in TORCH_DTYPES, f"{what}: layout dtype unknown")
        shape = _shape(t["shape"], f"{what}: layout shape")
        stride = _dims(t["stride"], f"{what}: layout stride")
        _req(len(shape) == len(stride), f"{what}: layout stride rank")
        offset = t["offset"]
        _req(_is_int(offset) and 0 <= offset < 2**62, f"{what}: layout offset")  # type: ignore[operator]
        _req(isinstance(t["parameter"], bool), f"{what}: layout parameter flag")
        return LayoutEntry(
            name=name,
            key=str(key),
            dtype=str(dtype),
            shape=shape,
            stride=stride,
            offset=int(offset),  # type: ignore[call-overload]
            parameter=bool(t["parameter"]),
            location=_location(t["location"], what),
        )


@dataclass(frozen=True)
class Stopped:
    """The policy ended the load at a refused call of this kind and category."""

    kind: str
    category: str
    t: float


@dataclass(frozen=True)
class LoadResult:
    """How the loader said it ended (what it says can be forged once a payload ran: the host
    believes ``ok`` only together with the engine's exit code and the supervisor's DONE)."""

    ok: bool = False
    kind: str | None = None
    message: str | None = None
    type: str | None = None
    format: str | None = None
    detected: str | None = None
    handoff: str | None = None
    tensors: int | None = None


@dataclass(frozen=True)
class Usage:
    """What the loader's processes used, as the kernel counted it (``getrusage`` of the
    supervisor's children, once they are killed and reaped), and the load's wall time."""

    wall_s: float
    cpu_user_s: float
    cpu_system_s: float
    max_rss_kb: int  # the largest process's peak


_USAGE_KEYS = frozenset(f.name for f in fields(Usage))
_RESOURCE_SECONDS = ("cpu_s", "sample_s")
_RESOURCE_COUNTS = ("rss_peak_bytes", "threads_peak", "children_peak", "samples")
SUPERVISOR_LIMITS = ("wall_clock", "cpu", "output_bytes")


@dataclass(frozen=True)
class Status(_Returned):
    """The supervisor's account of one job: the input it saw, how the loader ended (and the
    limit it enforced, if any), what it used, the canary values it planted and the monitor's
    counts.

    ``canaries`` (name -> value) and ``counts`` ((source, kind, action) key -> number) are
    read leniently: a malformed entry is dropped, never the status."""

    env_keys: tuple[str, ...] = ()
    # the input, as the supervisor read it
    input_sha256: str | None = None
    input_size: int | None = None
    input_error: str | None = None
    # how the load ended
    exit_code: int | None = None
    limit: str | None = None
    timed_out: bool = False
    stopped: Stopped | None = None
    result: LoadResult | None = None
    # what it used: the kernel's count, and the supervisor's samples (totals, peaks, over time)
    usage: Usage | None = None
    resources: tuple[tuple[str, float | int | str], ...] = ()
    #: the supervisor's samples over time: (seconds since the job began, CPU seconds, RSS bytes)
    series: tuple[tuple[float, float, int], ...] = ()
    # the canaries, the monitor's counts, the outputs it could not send
    canaries: tuple[tuple[str, str], ...] = ()
    canary_files: tuple[str, ...] = ()
    kernel_monitor: bool = False
    counts: tuple[tuple[str, int], ...] = ()
    truncated: bool = False
    output_problems: tuple[tuple[str, str], ...] = ()

    WHAT: ClassVar[str] = STATUS_FILE

    @classmethod
    def from_obj(cls, data: object) -> Status:
        what = STATUS_FILE
        d = cls._fields(data)
        sha = d.get("input_sha256")
        _req(sha is None or _sha256(sha), f"{what}: input_sha256 is not a sha256")
        env = d.get("env_keys", [])
        _req(isinstance(env, list) and all(isinstance(k, str) for k in env), f"{what}: env_keys malformed")
        assert isinstance(env, list)
        limit = d.get("limit")
        _req(limit is None or limit in SUPERVISOR_LIMITS, f"{what}: limit is not one the supervisor enforces")
        timed_out = d.get("timed_out", False)
        _req(isinstance(timed_out, bool), f"{what}: timed_out is not a boolean")
        problems = d.get("output_problems", {})
        _req(
            isinstance(problems, dict)
            and all(k in OUTPUT_NAMES and isinstance(v, str) for k, v in problems.items()),
            f"{what}: output_problems malformed",
        )
        assert isinstance(problems, dict)
        canaries, canary_files = cls._canaries(d.get("canaries"))
        counts, kernel, truncated = cls._monitor(d.get("monitor"))
        return cls(
            env_keys=tuple(_text(k, 200) for k in env[:1000]),
            input_sha256=str(sha) if sha is not None else None,
            input_size=_opt_int(d, "input_size", what, 0),
            input_error=_opt_str(d, "input_error", 200, what),
            exit_code=_opt_int(d, "exit_code", what),
            limit=str(limit) if limit is not None else None,
            timed_out=timed_out is True,
            stopped=_optional(d.get("stopped"), f"{what}.stopped", cls._stopped),
            result=_optional(d.get("result"), f"{what}.result", cls._result),
            usage=_optional(d.get("usage"), f"{what}.usage", cls._usage),
            resources=cls._resources(d.get("resources")),
            series=cls._series(d.get("resources")),
            canaries=canaries,
            canary_files=canary_files,
            kernel_monitor=kernel,
            counts=counts,
            truncated=truncated,
            output_problems=tuple(sorted((str(k), _text(str(v), 200)) for k, v in problems.items())),
        )

    @staticmethod
    def _usage(u: dict[str, object], what: str) -> Usage:
        _req(set(u) == _USAGE_KEYS, f"{what} is not the figures {', '.join(sorted(_USAGE_KEYS))}")
        return Usage(
            wall_s=_num(u["wall_s"], 0, 1e9, f"{what}.wall_s"),
            cpu_user_s=_num(u["cpu_user_s"], 0, 1e9, f"{what}.cpu_user_s"),
            cpu_system_s=_num(u["cpu_system_s"], 0, 1e9, f"{what}.cpu_system_s"),
            max_rss_kb=_int(u["max_rss_kb"], 0, 2**62, f"{what}.max_rss_kb"),
        )

    @staticmethod
    def _resources(raw: object) -> tuple[tuple[str, float | int | str], ...]:
        if raw is None:
            return ()
        what = f"{STATUS_FILE}.resources"
        r = _obj(raw, what)
        out: list[tuple[str, float | int | str]] = []
        for key in _RESOURCE_SECONDS:
            v = _opt_num(r, key, what)
            if v is not None:
                _req(0 <= v <= 1e9, f"{what}.{key} is not a duration")
                out.append((key, v))
        for key in _RESOURCE_COUNTS:
            n = _opt_int(r, key, what, 0)
            if n is not None:
                out.append((key, n))
        err = _opt_str(r, "error", 200, what)
        if err is not None:
            out.append(("error", err))
        return tuple(out)

    @staticmethod
    def _series(raw: object) -> tuple[tuple[float, float, int], ...]:
        """``resources.series``: at most :data:`MAX_RESOURCE_POINTS` triples of finite,
        non-negative numbers, in time order."""
        if not isinstance(raw, dict) or raw.get("series") is None:
            return ()
        what = f"{STATUS_FILE}.resources.series"
        points = raw["series"]
        _req(
            isinstance(points, list) and len(points) <= MAX_RESOURCE_POINTS,
            f"{what} is not a list of at most {MAX_RESOURCE_POINTS} samples",
        )
        out: list[tuple[float, float, int]] = []
        for p in points:
            _req(
                isinstance(p, list) and len(p) == 3 and all(_finite(v) for v in p) and isinstance(p[2], int),
                f"{what}: a sample is not [t, cpu_s, rss_bytes]",
            )
            t, cpu, rss = float(p[0]), float(p[1]), int(p[2])
            _req(0 <= t <= 1e7 and 0 <= cpu <= 1e9 and 0 <= rss < 2**50, f"{what}: a sample is out of range")
            _req(not out or t >= out[-1][0], f"{what}: samples are not in time order")
            out.append((t, cpu, rss))
        return tuple(out)

    @staticmethod
    def _stopped(s: dict[str, object], what: str) -> Stopped:
        kind, category = _opt_str(s, "kind", 40, what), _opt_str(s, "category", 40, what)
        t = _opt_num(s, "t", what)
        _req(kind is not None and category is not None and t is not None, f"{what} malformed")
        assert kind is not None and category is not None and t is not None
        return Stopped(kind=kind, category=category, t=t)

    @staticmethod
    def _result(r: dict[str, object], what: str) -> LoadResult:
        ok = r.get("ok", False)
        _req(isinstance(ok, bool), f"{what}.ok is not a boolean")
        return LoadResult(
            ok=bool(ok),
            kind=_opt_str(r, "kind", 64, what),
            message=_opt_str(r, "message", 4000, what),
            type=_opt_str(r, "type", 200, what),
            format=_opt_str(r, "format", 64, what),
            detected=_opt_str(r, "detected", 64, what),
            handoff=_opt_str(r, "handoff", 16, what),
            tensors=_opt_int(r, "tensors", what, 0, 2**40),
        )

    @staticmethod
    def _canaries(raw: object) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        if not isinstance(raw, dict):
            return (), ()
        files = raw.get("files")
        good = _good_items(
            raw.get("values"),
            MAX_CANARIES,
            # values the host searches the outputs for as bytes: the supervisor's are printable
            # ASCII, and a lone surrogate has no bytes (UnicodeEncodeError in the search)
            lambda k, v: (
                isinstance(k, str)
                and isinstance(v, str)
                and 12 <= len(v) <= 512
                and len(k) <= 64
                and k.isprintable()
                and v.isascii()
                and v.isprintable()
            ),
        )
        paths = (
            tuple(p for p in files[:MAX_CANARIES] if isinstance(p, str) and len(p) <= 256)
            if isinstance(files, list)
            else ()
        )
        return good, paths

    @staticmethod
    def _monitor(raw: object) -> tuple[tuple[tuple[str, int], ...], bool, bool]:
        if not isinstance(raw, dict):
            return (), False, False
        good = _good_items(
            raw.get("counts"),
            1000,
            lambda k, v: (
                isinstance(k, str) and len(k) <= 160 and k.isprintable() and _is_int(v) and 0 <= v < 2**53
            ),
        )
        return good, raw.get("kernel") is True, raw.get("truncated") is True


# -- event lines: what the supervisor streams while the load runs --------------------------------

_EVENT_KIND = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_MAX_EVENT_STR = 2048
_MAX_EVENT_ITEMS = 64
_MAX_EVENT_DEPTH = 4


def printable(text: str, limit: int = _MAX_EVENT_STR) -> str:
    """``text`` cut to ``limit`` characters, with every unprintable character escaped."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in text
    )


def _plain(value: object, depth: int = 0) -> object:
    """A bounded, printable copy of a JSON value (None where it is not plain data)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return printable(value)
    if depth >= _MAX_EVENT_DEPTH:
        return None
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value[:_MAX_EVENT_ITEMS]]
    if isinstance(value, dict):
        return {
            printable(str(k), 64): _plain(v, depth + 1) for k, v in list(value.items())[:_MAX_EVENT_ITEMS]
        }
    return None


@dataclass(frozen=True)
class EventLine:
    """One line of the event stream. ``detail`` is a bounded, printable copy of what the
    supervisor decoded (its keys depend on ``kind``: a path, an address, an argv...)."""

    id: int
    t: float
    source: str
    kind: str
    detail: dict[str, object]
    action: str

    @classmethod
    def from_obj(cls, obj: object) -> EventLine | None:
        """The line, or None where it is not one (lines are refused one by one)."""
        if not isinstance(obj, dict):
            return None
        eid, t, source, kind = obj.get("id"), obj.get("t"), obj.get("source"), obj.get("kind")
        detail, action = obj.get("detail", {}), obj.get("action")
        if not (_is_int(eid) and 0 < eid < 2**53):  # type: ignore[operator]
            return None
        if not (_finite(t) and t >= 0):  # type: ignore[operator]
            return None
        if (
            not isinstance(source, str)
            or not isinstance(action, str)
            or source not in EVENT_SOURCES
            or action not in EVENT_ACTIONS
        ):
            return None
        if not (isinstance(kind, str) and _EVENT_KIND.match(kind)) or not isinstance(detail, dict):
            return None
        clean = _plain(detail)
        assert isinstance(clean, dict)
        return cls(
            id=int(eid),  # type: ignore[arg-type]
            t=float(t),  # type: ignore[arg-type]
            source=source,
            kind=kind,
            detail=clean,
            action=action,
        )


def memfd_seals(fd: int) -> int:
    """The seals of ``fd`` (raises OSError for a descriptor that is not a memfd)."""
    import fcntl

    return fcntl.fcntl(fd, F_GET_SEALS)


def memfd_create(name: str) -> int:
    """A sealable, close-on-exec memfd."""
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


# The canary home: a small tmpfs the supervisor fills with fake credentials for the loader.
CANARY_HOME = "/home/user"  # an ordinary name: nothing here says "sandbox"

# Path classes, decided from the normalised path (the supervisor's decoder and the host's reader
# of gVisor's trace use the same tables). Reads under QUIET_* are not worth an event.
QUIET_READ_PREFIXES = (
    "/opt/python/",
    "/usr/lib/",
    "/usr/lib64/",
    "/lib/",
    "/lib64/",
    "/usr/share/",
    "/sys/",
    "/tmp/",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/sys/",
    "/proc/filesystems",
)
QUIET_EXACT = frozenset(
    {
        "/dev/null",
        "/dev/urandom",
        "/dev/random",
        "/dev/zero",
        "/dev/tty",
        INPUT_ALIAS,
        "/tmp",
        "/",
        "/opt/python",
        "/usr/lib",
        "/etc",
    }
)
# Reads that tell a container or a sandbox apart from a workstation: evidence of a payload that
# checks where it runs before it acts (LOW alone)
PROBE_RE = re.compile(r"^/proc/(\d+|self|thread-self)/(mountinfo|mounts|mountstats|cgroup)$")
PROBE_PATHS = frozenset(
    {
        "/.dockerenv",
        "/run/.containerenv",
        "/proc/1/sched",
        "/proc/self/cgroup",
        "/sys/class/dmi/id/product_name",
        "/sys/class/dmi/id/sys_vendor",
        "/proc/sys/kernel/hostname",
        "/etc/hostname",
    }
)
PROBE_PREFIXES = ("/sys/class/dmi/", "/sys/devices/virtual/dmi/", "/sys/hypervisor/")
WRITABLE_PREFIXES = ("/tmp/",)  # the sandbox's own scratch tmpfs: nothing of the host
SENSITIVE_PREFIXES = (
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/root",
    "/home/",
    "/run/secrets",
    "/var/run/",
    "/run/",
    "/proc/1/",
    "/proc/kcore",
    "/sys/kernel/",
    "/dev/mem",
    "/etc/ssh",
    "/.dockerenv",
    "/proc/kallsyms",
    "/sys/fs/cgroup",
)


def classify_path(
    path: str,
    *,
    canary_files: frozenset[str] | set[str],
    own: tuple[str, ...] = (),
    quiet_prefixes: tuple[str, ...] = QUIET_READ_PREFIXES,
) -> str:
    """The class of an opened path: ``canary``, ``canary_home``, ``probe``, ``quiet``,
    ``sensitive`` or ``other``. ``own``: the caller's own ``/proc/<pid>/`` prefixes (its own
    environment is the canaries it already has)."""
    if path in canary_files:
        return "canary"
    if path.startswith(CANARY_HOME + "/"):
        return "canary_home"
    if PROBE_RE.match(path) or path in PROBE_PATHS or path.startswith(PROBE_PREFIXES):
        return "probe"  # looking for signs of a container or a sandbox
    if own and path.startswith(own):
        return "quiet"
    if path.startswith("/proc/") and path[6:7].isdigit():
        return "sensitive"
    if any(path == p.rstrip("/") or path.startswith(p) for p in SENSITIVE_PREFIXES):
        return "sensitive"
    if path in QUIET_EXACT or path.startswith(quiet_prefixes):
        return "quiet"
    return "other"


# Monitoring events (events.jsonl): one JSON object per line,
#   {"id": int, "t": float, "source": str, "kind": str, "detail": {...}, "action": str}
# written by the supervisor after every loader process is dead. Kernel events and the loader's
# self-reported ones have separate budgets, so a flood of one cannot push out the other; the
# exact number of every (source, kind, action) is in status.json under "monitor".
EVENT_SOURCES = frozenset({"kernel", "self_reported", "supervisor"})
EVENT_ACTIONS = frozenset({"denied", "allowed", "recorded"})
MAX_KERNEL_EVENTS = 5000
MAX_SELF_REPORTED_EVENTS = 1000
MAX_EVENT_LINE = 16 * 1024
MAX_EVENTS_BYTES = 16 * 1024 * 1024
MAX_CANARIES = 32
MAX_RESOURCE_POINTS = 300  # (t, cpu_s, rss_bytes) samples of the loader's tree in a status

# Bounds the host applies when reading (the worker keeps within them too).
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_STATUS_BYTES = 1 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_NAME_LEN = 1024
MAX_SKELETON_DEPTH = 200
MAX_SKELETON_NODES = 2_000_000
MAX_STRING_LEN = 1 * 1024 * 1024
MAX_NDIM = 64

# The skeleton: JSON for the returned structure. Primitives (None, bool, int, finite float,
# str) stand for themselves; everything else is an object whose "$" key names its kind.
NODE_KINDS = frozenset(
    {
        "float",  # {"v": "nan" | "inf" | "-inf"}
        "bytes",  # {"b64": str}
        "list",
        "tuple",
        "set",
        "frozenset",  # {"items": [node...]}
        # {"kind": "dict"|"OrderedDict"|"defaultdict", "items": [[key, value]...]}; an
        # OrderedDict may add "metadata": its ``_metadata`` (see :func:`state_dict_metadata`)
        "dict",
        "tensor",  # {"ref": name, "parameter": bool, "requires_grad": bool}
        "ndarray",  # {"ref": name}
        "npscalar",  # {"dtype": str, "ref": name}
        "dtype",  # {"v": "float32"}
        "device",  # {"v": "cpu"}
        "size",  # {"v": [int...]}
        "complex",  # {"re": float-node, "im": float-node}
        "namespace",  # {"items": [[str, node]...]}  argparse.Namespace
        "module",  # {"type": "pkg.Class", "state": dict-node}  nn.Module / optimizer -> state_dict
        "opaque",  # {"type": "pkg.Class", "path": str}  an object we will not rebuild
        "value",  # {"type": one of VALUE_TYPES, "v": JSON}  a stdlib value type
        # a sparse / quantized / nested tensor as ordinary component tensors: {"kind": one of
        # COMPOSITE_KINDS, "name": str, "dtype": str, "shape": [int...], "parts": {part: tensor-node},
        # "params": {str: JSON}, "parameter": bool, "requires_grad": bool}
        "composite",
    }
)
# composite kind -> (the parts it needs, the optional parts); the host's _convert.assemble
# rebuilds each, the worker's _extract._recipe takes it apart (nested tensors have no fixed
# shape: "shape" is null).
COMPOSITE_KINDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "sparse_coo": (frozenset({"indices", "values"}), frozenset()),
    "sparse_csr": (frozenset({"crow_indices", "col_indices", "values"}), frozenset()),
    "sparse_bsr": (frozenset({"crow_indices", "col_indices", "values"}), frozenset()),
    "sparse_csc": (frozenset({"ccol_indices", "row_indices", "values"}), frozenset()),
    "sparse_bsc": (frozenset({"ccol_indices", "row_indices", "values"}), frozenset()),
    "quantized_per_tensor": (frozenset({"int_repr"}), frozenset()),  # scale, zero_point: params
    "quantized_per_channel": (frozenset({"int_repr", "scales", "zero_points"}), frozenset()),
    "nested": (frozenset({"values", "sizes", "strides", "storage_offsets"}), frozenset()),
    "nested_jagged": (frozenset({"values", "offsets"}), frozenset()),
}
# Standard-library value types the host rebuilds from plain data (no code runs to make them):
# "v" is an ISO string (dates, times), [days, seconds, microseconds] (timedelta), the str()
# of the value (paths, Decimal, Fraction, UUID), or [start, stop, step] (range, slice).
VALUE_TYPES = frozenset(
    {
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib.WindowsPath",
        "pathlib.PureWindowsPath",
        "decimal.Decimal",
        "fractions.Fraction",
        "uuid.UUID",
        "builtins.range",
        "builtins.slice",
    }
)
DICT_KINDS = frozenset({"dict", "OrderedDict", "defaultdict"})
#: the most entries (module prefixes, and their keys) a state dict's ``_metadata`` may have
MAX_METADATA_ENTRIES = 200_000
_METADATA_SCALARS = (int, str, bool, float, type(None))


def state_dict_metadata(value: object) -> list[list[Any]] | None:
    """torch's ``state_dict()._metadata`` (module prefix -> ``{"version": 1, ...}``, which
    ``load_state_dict`` hands to each module's ``_load_from_state_dict``) as JSON: ``[[prefix,
    {key: scalar}]...]``. Takes the attribute (a mapping; the worker) or that JSON (a list;
    the host), and returns None for anything else: other shapes, values that are not finite
    scalars, or more than :data:`MAX_METADATA_ENTRIES` entries. Both sides use it, so the host
    rebuilds only what an honest worker can send."""
    if isinstance(value, Mapping):
        pairs: Iterable[object] = ([k, v] for k, v in value.items())
    elif isinstance(value, list):
        pairs = value
    else:
        return None
    out: list[list[Any]] = []
    entries = 0
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            return None
        prefix, record = pair
        if type(prefix) is not str or len(prefix) > MAX_STRING_LEN or not isinstance(record, Mapping):
            return None
        entries += 1 + len(record)
        if entries > MAX_METADATA_ENTRIES:
            return None
        kept: dict[str, Any] = {}
        for key, v in record.items():
            if type(key) is not str or len(key) > 200 or type(v) not in _METADATA_SCALARS:
                return None
            if (
                (type(v) is float and not math.isfinite(v))
                or (type(v) is str and len(v) > 10_000)
                or (type(v) is int and not -(2**63) <= v < 2**63)
            ):
                return None
            kept[key] = v
        out.append([prefix, kept])
    return out


#: torch's typed storage classes of plain (not quantized) dtypes, by class name: the dtype of
#: their elements (torch/storage.py ``_dtype_to_storage_type_map``)
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}

# Tensor dtypes the protocol knows, by torch name. "storage" is how the bytes are stored in
# the safetensors file: a safetensors dtype of the same name, or raw bytes (U8) viewed back.
TORCH_DTYPES: dict[str, tuple[str, int]] = {
    # name: (safetensors dtype, element size)
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint64": ("U64", 8),
    "uint32": ("U32", 4),
    "uint16": ("U16", 2),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "float8_e4m3fnuz": ("U8", 1),
    "float8_e5m2fnuz": ("U8", 1),
    "float8_e8m0fnu": ("U8", 1),
    "complex64": ("C64", 8),
    "complex128": ("U8", 16),
    "complex32": ("U8", 4),
}


# -- naming, shared by the worker and the host's independent reconstruction --------------------


def dense_strides(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether ``stride`` lays ``shape`` out densely, every element once with no gap: row-major
    order of some permutation of the dimensions (channels_last, a transpose). A dimension of
    size 1 may have any stride; an empty tensor has no layout to keep."""
    if len(shape) != len(stride) or any(s < 0 for s in stride):
        return False
    if any(d == 0 for d in shape):
        return False
    expected = 1
    for d, s in sorted(((d, s) for d, s in zip(shape, stride, strict=True) if d > 1), key=lambda x: x[1]):
        if s != expected:
            return False
        expected *= d
    return True


def path_component(key: object) -> str:
    """How one dict key or list index appears in a tensor name."""
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, int)) or key is None:
        return str(key)
    return repr(key)[:80]


def tensor_name(path: tuple[str, ...], taken: set[str]) -> str:
    """A unique tensor name for ``path`` (components joined with "."), added to ``taken``.

    Unprintable characters become "?", very long names are shortened with a hash, and a name
    already taken gets "#1", "#2"... (``__metadata__`` is reserved by SafeTensors)."""
    base = ".".join(path) if path else "tensor"
    base = "".join(ch if ch.isprintable() else "?" for ch in base)
    if len(base) > MAX_NAME_LEN - 20:
        base = base[: MAX_NAME_LEN - 40] + "~" + hashlib.sha256(base.encode()).hexdigest()[:16]
    name, n = base, 1
    while name in taken or name == "__metadata__":
        name = f"{base}#{n}"
        n += 1
    taken.add(name)
    return name


class TensorNames:
    """The naming state of one walk over a loaded structure, the same in the worker's walkers
    and the host's reconstruction (their names must agree byte for byte): the names taken, the
    name each object got (by ``id``: an object met again keeps the name of its first path),
    the nodes visited so far and the containers being walked (to find reference cycles)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.by_id: dict[int, str] = {}
        self.nodes = 0
        self.active: set[int] = set()

    def name_of(self, obj: object, path: tuple[str, ...]) -> tuple[str, bool]:
        """``obj``'s name, and whether it is new: the first time, :func:`tensor_name` of ``path``."""
        name = self.by_id.get(id(obj))
        if name is not None:
            return name, False
        name = self.by_id[id(obj)] = tensor_name(path, self.names)
        return name, True


# -- what a refused kernel event is, for policies that stop the load at the first one -----------

FATAL_CATEGORIES = ("exec", "network", "credential", "privilege", "process", "file")
#: calls that change a path without opening it: truncate(2) empties a file, mkdir and rmdir
#: create or remove one, chown and the utime family change its metadata (a payload's way to
#: hide a change); the loader's filter reports them like unlink(2)
PATH_CHANGES = tuple(
    "truncate mkdir rmdir mkdirat chown lchown fchownat utime utimes futimesat utimensat".split()
)
#: calls that change a file's metadata through a descriptor (a read-only one will do for the
#: file's owner: no open for writing precedes them) or its extended attributes; the loader's
#: filter reports them like chmod(2), with the descriptor's file as their path
METADATA_CHANGES = tuple(
    "fchmod fchown setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr".split()
)
_CATEGORY_OF_KIND = {
    "execve": "exec",
    "execveat": "exec",
    "connect": "network",
    "sendto": "network",
    "sendmsg": "network",
    "sendmmsg": "network",
    "bind": "network",
    "listen": "network",
    "accept": "network",
    "accept4": "network",
    "clone": "process",
    "fork": "process",
    "vfork": "process",
    "open": "file",
    "openat": "file",
    "openat2": "file",
    "creat": "file",
    "unlink": "file",
    "unlinkat": "file",
    "rename": "file",
    "renameat": "file",
    "renameat2": "file",
    "link": "file",
    "linkat": "file",
    "symlink": "file",
    "symlinkat": "file",
    "chmod": "file",
    "fchmodat": "file",
    "fchmodat2": "file",
    **dict.fromkeys(PATH_CHANGES + METADATA_CHANGES, "file"),
}


def event_category(kind: str, detail: dict[str, object]) -> str:
    """The category of a *refused* kernel event: what a policy's ``events.fatal`` names."""
    if detail.get("class") == "canary" or detail.get("canaries"):
        return "credential"
    return _CATEGORY_OF_KIND.get(kind, "privilege")


#: bytes read per pread when hashing a file: one reused buffer that stays in the CPU's cache
#: while the hash reads it (a fresh 1 MiB ``bytes`` per read measured 5-7% slower)
HASH_CHUNK = 128 << 10


def sha256_file(path: str) -> tuple[str, int]:
    """(hex sha256, size) of a file: how both sides identify the input."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def sha256_fd(fd: int) -> tuple[str, int]:
    """(hex sha256, size) of an open file, read with pread from offset 0 into one buffer."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    pos = 0
    with memoryview(buf) as view:
        while got := os.preadv(fd, [buf], pos):
            h.update(view[:got])
            pos += got
    return h.hexdigest(), pos


# -- SafeTensors, written by both sides without a second copy of the weights -----------------

#: torch dtypes the protocol carries as raw bytes that newer safetensors releases read natively;
#: the host writes their codes only where its safetensors does
NEWER_ST_CODES = {
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}
#: torch dtype -> (safetensors code, element size) for every dtype a SafeTensors file may name
ST_DTYPES = {
    name: (code, size) for name, (code, size) in TORCH_DTYPES.items() if code != "U8" or name == "uint8"
} | {name: (code, TORCH_DTYPES[name][1]) for name, code in NEWER_ST_CODES.items()}


def safetensors_header(
    entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str]
) -> tuple[bytes, list[str]]:
    """The 8-byte length and the JSON header (sorted keys, space-padded to 8 bytes) for
    ``entries`` of (name, torch dtype name, shape, nbytes); returns it and the order in which
    the tensors' bytes must follow: widest elements first, then by name, so that every tensor
    starts at a multiple of its element size and the same tensors always give the same bytes."""
    by_name = {e[0]: e for e in entries}
    order = sorted(by_name, key=lambda n: (-ST_DTYPES[by_name[n][1]][1], n))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        _, dtype, shape, nbytes = by_name[name]
        header[name] = {
            "dtype": ST_DTYPES[dtype][0],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, order


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[: 1 << 24])
        view = view[n:]


# -- classic BPF (seccomp) -------------------------------------------------------------------------
# Shared by the loader's notifying filter (``_seccomp.build_filter``) and the host's compile of
# the container profile for the bwrap runner (``sandbox._bwrap.compile_profile``).

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_ALLOW = 0x7FFF0000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K, BPF_AND_K = 0x20, 0x15, 0x35, 0x45, 0x06, 0x54


def bpf_arg_lo(i: int) -> int:
    """Offset of the low word of system call argument ``i`` in ``struct seccomp_data``."""
    return 16 + 8 * i


def bpf_arg_hi(i: int) -> int:
    return 20 + 8 * i


class BpfAsm:
    """A tiny assembler with forward labels (classic BPF jumps only go forward, by <= 255)."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def ld(self, off: int) -> None:
        self.ins.append((BPF_LD_W_ABS, 0, 0, off))

    def jmp(self, op: int, k: int, jt: int | str, jf: int | str) -> None:
        self.ins.append((op, jt, jf, k))

    def ret(self, k: int) -> None:
        self.ins.append((BPF_RET_K, 0, 0, k))

    def and_k(self, k: int) -> None:
        """A &= k (BPF_ALU | BPF_AND | BPF_K)."""
        self.ins.append((BPF_AND_K, 0, 0, k))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.ins):
            offs = []
            for j in (jt, jf):
                off = self.labels[j] - pc - 1 if isinstance(j, str) else j
                if not 0 <= off <= 255:
                    raise ValueError(f"BPF jump out of range at {pc}")
                offs.append(off)
            out += struct.pack("<HBBI", code, offs[0], offs[1], k & 0xFFFFFFFF)
        return bytes(out)
