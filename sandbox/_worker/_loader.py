"""Container side: identify the input, load it for real, write tensors + manifest.

This is the only code anywhere in model-sandbox that unpickles, and it runs only inside the
sandbox, in the loader process the supervisor forked, with an empty environment.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import tarfile
import zipfile
from typing import IO, Any

from . import _ghosts, _spans
from . import _protocol as P

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_PICKLE_OPCODES = frozenset(op.code for op in pickletools.opcodes)


class LoaderError(Exception):
    """An expected failure with a stable kind (``unsupported-format``, ``malformed-input``...)."""

    def __init__(self, kind: str, message: str, detected: str = "unknown") -> None:
        super().__init__(message)
        self.kind = kind
        self.detected = detected


class _Unresolved(Exception):
    """Raised while identifying: the stream needs a global or a persistent id."""


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise _Unresolved(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _Unresolved(pid)


def prepare() -> None:
    """Import what a load needs before any input exists (a warm sandbox waits after this)."""
    import numpy  # noqa: F401
    import safetensors  # noqa: F401
    import torch  # noqa: F401

    from . import _extract  # noqa: F401


class Input:
    """The input, known only by a descriptor the host opened. ``path`` names it for the APIs
    that need a name (``torch.load(mmap=True)``): ``/proc/self/fd/N`` when this uid may reopen
    the file, else None, and every reader gets its own file object over a duplicate."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.path: str | None = f"/proc/self/fd/{fd}"
        try:
            os.close(os.open(self.path, os.O_RDONLY))
        except OSError:
            self.path = None

    def open(self) -> IO[bytes]:
        if self.path is not None:
            return open(self.path, "rb")
        f = os.fdopen(os.dup(self.fd), "rb")
        f.seek(0)
        return f


# joblib.dump(compress=...) writes one compressed stream: these are the magic numbers joblib's
# own reader recognises (zlib's is checked further, as the host's scan does)
_COMPRESSED_MAGIC = (b"\x1f\x8b\x08", b"\x04\x22\x4d\x18", b"BZh", b"\xfd7zXZ\x00", b"\x5d\x00\x00")
# joblib >= 0.10 (older files keep arrays in companion files, which a sandbox does not have)
_JOBLIB_WRAPPERS = ("NumpyArrayWrapper",)
_IDENTIFY_OPS = 200_000


def _zlib_head(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x78 and ((head[0] << 8) | head[1]) % 31 == 0


def _has_joblib_arrays(inp: Input) -> bool:
    """Whether the pickle names joblib's array wrapper before its first array's raw bytes
    (which end what a plain pickle reader can follow): then only joblib.load reads it."""
    with inp.open() as f:
        try:
            for n, (op, arg, _) in enumerate(pickletools.genops(f)):
                if n > _IDENTIFY_OPS:
                    break
                if op.name == "GLOBAL" and isinstance(arg, str) and arg.split(" ")[-1] in _JOBLIB_WRAPPERS:
                    return True
                if isinstance(arg, str) and arg in _JOBLIB_WRAPPERS and "UNICODE" in op.name:
                    return True
        except Exception:  # the raw bytes after a wrapper, or a corrupt stream
            return False
    return False


def identify(source: str | Input) -> str:
    """Format by content: torch-zip, torchscript, numpy-npz, torch-tar, numpy-npy,
    torch-legacy, joblib (a pickle with joblib's inline arrays, or a compressed stream),
    pickle, safetensors or unknown."""
    inp = source if isinstance(source, Input) else _PathInput(source)
    with inp.open() as f:
        head = f.read(16)
    if not head:
        raise LoaderError("malformed-input", "the file is empty")
    # torch and numpy recognise a zip by the local header at offset 0, not by the central
    # directory that zipfile finds from the end (a pickle can carry a zip at its tail)
    if head.startswith(b"PK\x03\x04") and _is_zip(inp):
        try:
            with inp.open() as raw, zipfile.ZipFile(raw) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise LoaderError("malformed-input", f"corrupt zip archive: {exc}") from None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "numpy-npz"
        return "unknown"
    if head.startswith(b"PK\x03\x04"):
        raise LoaderError("malformed-input", "a truncated or corrupt zip archive (no central directory)")
    if head.startswith(b"\x93NUMPY"):
        return "numpy-npy"
    if _is_tar(inp):
        return "torch-tar"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        return "safetensors"
    if _zlib_head(head) or head.startswith(_COMPRESSED_MAGIC):
        return "joblib"
    if head[:1] == b"\x80" and not (len(head) > 1 and 2 <= head[1] <= 5):
        return "unknown"
    if head[:1].decode("latin-1") not in _PICKLE_OPCODES:
        return "unknown"
    with inp.open() as f:
        try:
            first = _NoGlobals(f).load()
        except _Unresolved:
            # needs globals: a real pickle, judged when it is loaded
            return "joblib" if _has_joblib_arrays(inp) else "pickle"
        except Exception as exc:
            if head[:1] == b"\x80":
                raise LoaderError("malformed-input", f"a corrupt or truncated pickle ({exc})") from None
            return "unknown"
    return "torch-legacy" if first == LEGACY_MAGIC else "pickle"


class _PathInput(Input):
    def __init__(self, path: str) -> None:
        self.fd = -1
        self.path = path


def _is_zip(inp: Input) -> bool:
    with inp.open() as f:
        return zipfile.is_zipfile(f)


def _is_tar(inp: Input) -> bool:
    """An uncompressed tar, as torch.load's first try reads one (``tarfile.open(mode="r:")``);
    ``tarfile.is_tarfile`` also takes compressed ones, which torch does not."""
    try:
        with inp.open() as f, tarfile.open(fileobj=f, mode="r:"):
            return True
    except (OSError, tarfile.TarError, EOFError, ValueError):
        return False


def load(source: str | Input) -> tuple[Any, str, dict[int, str]]:
    """Load the input with the real loader. Returns (object, format, storage locations)."""
    inp = source if isinstance(source, Input) else _PathInput(source)
    fmt = identify(inp)
    if fmt in ("safetensors", "unknown"):
        what = {"safetensors": "already SafeTensors", "unknown": "not a format model-sandbox loads"}[fmt]
        raise LoaderError("unsupported-format", f"the file is {what}", detected=fmt)
    import numpy as np
    import torch

    locations: dict[int, str] = {}

    def record_location(storage: Any, location: str) -> Any:
        locations[storage.data_ptr()] = location
        return storage

    if fmt == "numpy-npy":
        with inp.open() as f:
            return np.load(f, allow_pickle=True), fmt, locations
    if fmt == "numpy-npz":
        with inp.open() as f, np.load(f, allow_pickle=True) as npz:
            return {k: npz[k] for k in npz.files}, fmt, locations
    if fmt == "pickle":
        with inp.open() as f:
            return _ghosts.Unpickler(f).load(), fmt, locations
    if fmt == "joblib":
        return _load_joblib(inp), fmt, locations
    if fmt == "torchscript":  # the archive's code runs here, under the same monitoring
        with inp.open() as f:
            return torch.jit.load(f, map_location="cpu"), fmt, locations  # type: ignore[no-untyped-call]
    if fmt == "torch-tar":  # torch extracts a legacy tar's storages into a temporary directory
        import tempfile

        os.makedirs(P.LOADER_SCRATCH, mode=0o700, exist_ok=True)
        tempfile.tempdir = P.LOADER_SCRATCH.rstrip("/")
    if inp.path is not None:
        obj = torch.load(
            inp.path,
            map_location=record_location,
            weights_only=False,
            mmap=(fmt == "torch-zip"),
            pickle_module=_ghosts.pickle_module,
        )
        return obj, fmt, locations
    with inp.open() as f:
        obj = torch.load(
            f, map_location=record_location, weights_only=False, pickle_module=_ghosts.pickle_module
        )
    return obj, fmt, locations


def _load_joblib(inp: Input) -> Any:
    """``joblib.load`` from a file object (never by name: joblib's pre-0.10 format would open
    companion files), with joblib's own unpickler, except that a class the sandbox does not
    have (a scikit-learn estimator) becomes a ghost, as in every other load."""
    # joblib's import probes multiprocessing by creating a semaphore (a file in /dev/shm):
    # nothing a load needs, and a write the monitoring would rightly report
    os.environ["JOBLIB_MULTIPROCESSING"] = "0"
    import joblib
    from joblib import numpy_pickle

    class Unpickler(numpy_pickle.NumpyUnpickler):  # type: ignore[misc]
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return _ghosts.ghost_class(f"{module}.{name}")

    numpy_pickle.NumpyUnpickler = Unpickler
    with inp.open() as f:
        return joblib.load(f)  # type: ignore[no-untyped-call]


def try_layout(source: Input) -> dict[str, Any] | None:
    """The layout document of a plain torch-zip state dict (torch-free, see ``_layout``), or
    None when the file needs the full loader."""
    from . import _layout

    try:
        if identify(source) != "torch-zip":
            return None
        return _layout.read(source.open)
    except (_layout.NotPlain, LoaderError):
        return None


def write_layout(layout: dict[str, Any], *, manifest_fd: int) -> None:
    """The manifest of the layout hand-off: no stored tensors, the layout and the skeleton."""
    manifest = {
        "protocol": P.PROTOCOL_VERSION,
        "format": layout["format"],
        "tensors": [],
        "views": [],
        "layout": layout["layout"],
        "skeleton": layout["skeleton"],
        "unrepresentable": [],
        "notes": [],
    }
    # the host's own definition of the document checks it before it is sent
    _write_all(manifest_fd, P.Manifest.from_obj(manifest).to_json())


def write_outputs(
    obj: Any,
    fmt: str,
    locations: dict[int, str],
    *,
    tensors_fd: int,
    manifest_fd: int,
    tensors: bool = True,
    views: _spans.SelfViews | None = None,
) -> dict[str, Any]:
    """Extract tensors from ``obj`` and write the manifest and (unless ``tensors`` is false)
    the SafeTensors bytes to the two output descriptors (memfds the supervisor seals). With
    ``views`` (this process's memory map), a tensor that is still the input's own bytes is
    named by its span in the input instead of being copied or hashed (see ``_spans``). The
    manifest carries the sha256 of every other tensor only when the bytes stay here (a scan):
    the host compares the bytes it receives itself, and trusts no digest of ours for them."""
    from ._extract import extract, tensor_sha256

    ex = extract(obj, locations, digests=False)
    spans = _spans.file_spans(ex.stored, views, P.INPUT_FD) if views is not None else {}
    for entry in ex.entries:
        if entry["name"] in spans:
            entry["span"] = list(spans[entry["name"]])
        elif not tensors:
            entry["sha256"] = tensor_sha256(ex.stored[entry["name"]])
    skeleton_json = json.dumps(ex.skeleton, allow_nan=False, separators=(",", ":"))
    metadata = {
        "format": "pt",
        "model_sandbox.skeleton": skeleton_json,
        "model_sandbox.views": json.dumps(ex.views, separators=(",", ":")),
    }
    if len(skeleton_json) > P.MAX_JSON_BYTES // 2:
        metadata.pop("model_sandbox.skeleton")
    if tensors:
        write_safetensors(tensors_fd, {k: t for k, t in ex.stored.items() if k not in spans}, metadata)
    manifest = {
        "protocol": P.PROTOCOL_VERSION,
        "format": fmt,
        "tensors": ex.entries,
        "views": ex.views,
        "skeleton": ex.skeleton,
        "unrepresentable": ex.unrepresentable,
        "notes": ex.notes[:1000],
    }
    # the host's own definition of the document checks it before it is sent
    _write_all(manifest_fd, P.Manifest.from_obj(manifest).to_json())
    return manifest


def write_safetensors(fd: int, stored: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write ``stored`` (CPU tensors) as a SafeTensors file to ``fd``, streaming each tensor's
    bytes: no second copy of the weights in memory. The host reads it back with the
    safetensors library, whose parser validates the header."""
    import torch

    tensors = {name: t.detach().cpu().contiguous() for name, t in stored.items()}
    head, order = P.safetensors_header(
        [
            (name, str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size())
            for name, t in tensors.items()
        ],
        metadata,
    )
    _write_all(fd, head)
    for name in order:
        t = tensors[name]
        if t.numel():
            _write_all(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy().data))


_write_all = P.write_all
