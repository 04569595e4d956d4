"""The wire format between the container-side worker and the host.

Stdlib only: the host imports this module (and only this one) from the worker package.
Everything here is a name or a number; what crosses the boundary is files in the output
directory, which the host treats as untrusted data and validates against these limits.

Output directory after a load::

    tensors.safetensors   every stored tensor (written by the loader)
    manifest.json         tensors (name, dtype, shape, sha256), views, skeleton, unrepresentable
    status.json           written by the supervisor: how the loader ended, resource figures
    events.jsonl          (monitoring) one event per line
"""

from __future__ import annotations

import hashlib

PROTOCOL_VERSION = 1

# Paths inside the container.
INPUT_PATH = "/input/model"
OUTPUT_DIR = "/out"

TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
OUTPUT_FILES = frozenset({TENSORS_FILE, MANIFEST_FILE, STATUS_FILE, EVENTS_FILE})

# The canary home: a small tmpfs the supervisor fills with fake credentials for the loader.
CANARY_HOME = "/home/sandbox"

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
