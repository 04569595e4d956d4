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
    supervisor -> host   STATUS   how the loader ended, resource figures, canary values
    supervisor -> host   DONE     {} -- the supervisor completed; nothing follows

Outputs are memfds the supervisor created before it forked the loader, sealed by the supervisor
(:data:`OUTPUT_SEALS`) once every loader process is dead; their pages are charged to the
container's memory cgroup, so the memory limit bounds them. The host checks the seals and the
size before it maps anything, and reads every frame with the caps below. When the host end
closes, the supervisor kills the load and the container exits.

Outputs::

    tensors    a SafeTensors file of every stored tensor (written by the loader)
    manifest   JSON: tensors (name, dtype, shape, sha256), views, skeleton, unrepresentable
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

PROTOCOL_VERSION = 2

# -- the channel --------------------------------------------------------------------------------

CHANNEL_DIR = "/run/sandbox"        # inside the container: the host's socket directory, read-only
SOCKET_NAME = "channel"
SOCKET_PATH = f"{CHANNEL_DIR}/{SOCKET_NAME}"
COLD = "--cold"                     # the supervisor's argument: do not import torch ahead of a job

LOADER_SCRATCH = "/tmp/.loader/"    # torch's own temporary files (legacy tar extraction)
INPUT_FD = 1000                     # where the loader keeps the input descriptor (nofile is 1024)
INPUT_ALIAS = "<input>"             # how events name an open of the input through /proc/self/fd

HELLO, JOB, EVENTS, OUTPUT, STATUS, DONE = b"H", b"J", b"E", b"O", b"S", b"D"
FRAME_TYPES = frozenset({HELLO, JOB, EVENTS, OUTPUT, STATUS, DONE})
FDS_OF = {JOB: 1, OUTPUT: 1}         # frames that carry descriptors, and how many; others none
MAX_FRAME = 64 * 1024               # payload bytes; a larger frame is a protocol violation
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
    return frame(kind, json.dumps(doc, separators=(",", ":"), allow_nan=False,
                                  default=str).encode())


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

def _num(v: object, lo: float, hi: float, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            not lo <= v <= hi:
        raise ProtocolError(f"{what} is not a number in [{lo:g}, {hi:g}]")
    return float(v)


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
        if not isinstance(allow, list) or len(allow) > 64 or \
                not all(isinstance(a, str) and 0 < len(a) <= 4096 for a in allow):
            raise ProtocolError("job: allow_read malformed")
        for flag in ("write_tensors", "layout", "hash_input"):
            if not isinstance(d.get(flag, True), bool):
                raise ProtocolError(f"job: {flag} is not a boolean")
        return cls(wall_clock_s=_num(d.get("wall_clock_s", 120.0), 0.001, 1e7, "wall_clock_s"),
                   cpu_s=_num(d.get("cpu_s", 0.0), 0, 1e7, "cpu_s"),
                   max_output_bytes=_int(d.get("max_output_bytes", 0), 0, 2**62, "max_output_bytes"),
                   write_tensors=d.get("write_tensors", True), fatal=tuple(fatal),
                   errno=_int(d.get("errno", _errno.EPERM), 1, 4095, "errno"),
                   allow_read=tuple(allow), layout=d.get("layout", True),
                   hash_input=d.get("hash_input", True))


@dataclass(frozen=True)
class Output:
    """An OUTPUT frame's document: which output the attached memfd holds, and its size."""

    name: str
    size: int

    @classmethod
    def from_json(cls, data: bytes) -> Output:
        d = parse_json(data, "output")
        if not isinstance(d, dict) or d.get("name") not in OUTPUT_NAMES:
            raise ProtocolError("output: unknown name")
        return cls(name=str(d["name"]), size=_int(d.get("size"), 0, 2**62, "output size"))


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
        return cls(protocol=PROTOCOL_VERSION, pid=_int(d.get("pid"), 1, 2**31, "pid"),
                   warm=d.get("warm") is True)


def memfd_seals(fd: int) -> int:
    """The seals of ``fd`` (raises OSError for a descriptor that is not a memfd)."""
    import fcntl

    return fcntl.fcntl(fd, F_GET_SEALS)


def memfd_create(name: str) -> int:
    """A sealable, close-on-exec memfd."""
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)

# The canary home: a small tmpfs the supervisor fills with fake credentials for the loader.
CANARY_HOME = "/home/user"  # an ordinary name: nothing here says "sandbox"

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
NODE_KINDS = frozenset({
    "float",       # {"v": "nan" | "inf" | "-inf"}
    "bytes",       # {"b64": str}
    "list", "tuple", "set", "frozenset",   # {"items": [node...]}
    "dict",        # {"kind": "dict"|"OrderedDict"|"defaultdict", "items": [[key, value]...]}
    "tensor",      # {"ref": name, "parameter": bool, "requires_grad": bool}
    "ndarray",     # {"ref": name}
    "npscalar",    # {"dtype": str, "ref": name}
    "dtype",       # {"v": "float32"}
    "device",      # {"v": "cpu"}
    "size",        # {"v": [int...]}
    "complex",     # {"re": float-node, "im": float-node}
    "namespace",   # {"items": [[str, node]...]}  argparse.Namespace
    "module",      # {"type": "pkg.Class", "state": dict-node}  nn.Module / optimizer -> state_dict
    "opaque",      # {"type": "pkg.Class", "path": str}  an object we will not rebuild
    "value",       # {"type": one of VALUE_TYPES, "v": JSON}  a stdlib value type
})
# Standard-library value types the host rebuilds from plain data (no code runs to make them):
# "v" is an ISO string (dates, times), [days, seconds, microseconds] (timedelta), the str()
# of the value (paths, Decimal, Fraction, UUID), or [start, stop, step] (range, slice).
VALUE_TYPES = frozenset({
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta",
    "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "builtins.range", "builtins.slice",
})
DICT_KINDS = frozenset({"dict", "OrderedDict", "defaultdict"})

# Tensor dtypes the protocol knows, by torch name. "storage" is how the bytes are stored in
# the safetensors file: a safetensors dtype of the same name, or raw bytes (U8) viewed back.
TORCH_DTYPES: dict[str, tuple[str, int]] = {
    # name: (safetensors dtype, element size)
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint64": ("U64", 8), "uint32": ("U32", 4), "uint16": ("U16", 2), "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
    "float8_e4m3fnuz": ("U8", 1), "float8_e5m2fnuz": ("U8", 1), "float8_e8m0fnu": ("U8", 1),
    "complex64": ("C64", 8), "complex128": ("U8", 16), "complex32": ("U8", 4),
}


# -- naming, shared by the worker and the host's independent reconstruction --------------------

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


# -- what a refused kernel event is, for policies that stop the load at the first one -----------

FATAL_CATEGORIES = ("exec", "network", "credential", "privilege", "process", "file")
_CATEGORY_OF_KIND = {
    "execve": "exec", "execveat": "exec",
    "connect": "network", "sendto": "network", "sendmsg": "network", "sendmmsg": "network",
    "bind": "network", "listen": "network", "accept": "network", "accept4": "network",
    "clone": "process", "fork": "process", "vfork": "process",
    "open": "file", "openat": "file", "openat2": "file", "creat": "file", "unlink": "file",
    "unlinkat": "file", "rename": "file", "renameat": "file", "renameat2": "file", "link": "file",
    "linkat": "file", "symlink": "file", "symlinkat": "file", "chmod": "file", "fchmod": "file",
    "fchmodat": "file", "fchmodat2": "file",
}


def event_category(kind: str, detail: dict[str, object]) -> str:
    """The category of a *refused* kernel event: what a policy's ``events.fatal`` names."""
    if detail.get("class") == "canary" or detail.get("canaries"):
        return "credential"
    return _CATEGORY_OF_KIND.get(kind, "privilege")


def sha256_file(path: str) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in 1 MiB chunks: how both sides identify the input."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_fd(fd: int) -> tuple[str, int]:
    """(hex sha256, size) of an open file, read with pread from offset 0."""
    h = hashlib.sha256()
    pos = 0
    while chunk := os.pread(fd, 1 << 20, pos):
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest(), pos


# -- SafeTensors, written by both sides without a second copy of the weights -----------------

ST_DTYPES = {"float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2),
             "bfloat16": ("BF16", 2), "int64": ("I64", 8), "int32": ("I32", 4),
             "int16": ("I16", 2), "int8": ("I8", 1), "uint64": ("U64", 8), "uint32": ("U32", 4),
             "uint16": ("U16", 2), "uint8": ("U8", 1), "bool": ("BOOL", 1),
             "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
             "complex64": ("C64", 8)}


def safetensors_header(entries: list[tuple[str, str, list[int], int]],
                       metadata: dict[str, str]) -> tuple[bytes, list[str]]:
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
        header[name] = {"dtype": ST_DTYPES[dtype][0], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, order


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[: 1 << 24])
        view = view[n:]
