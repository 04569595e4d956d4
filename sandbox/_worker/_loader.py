"""Container side: identify the input, load it for real, write tensors + manifest.

This is the only code anywhere in model-sandbox that unpickles, and it runs only inside the
sandbox, in the loader process the supervisor forked, with an empty environment.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import tarfile
import zipfile
from typing import Any

from . import _ghosts
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


def identify(path: str) -> str:
    """Format by content: torch-zip, torchscript, numpy-npz, torch-tar, numpy-npy,
    torch-legacy, pickle, safetensors or unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise LoaderError("malformed-input", "the file is empty")
    # torch and numpy recognise a zip by the local header at offset 0, not by the central
    # directory that zipfile finds from the end (a pickle can carry a zip at its tail)
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
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
    if _is_tar(path):
        return "torch-tar"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and not (len(head) > 1 and 2 <= head[1] <= 5):
        return "unknown"
    if head[:1].decode("latin-1") not in _PICKLE_OPCODES:
        return "unknown"
    with open(path, "rb") as f:
        try:
            first = _NoGlobals(f).load()
        except _Unresolved:
            return "pickle"  # needs globals: a real pickle, judged when it is loaded
        except Exception as exc:
            if head[:1] == b"\x80":
                raise LoaderError("malformed-input", f"a corrupt or truncated pickle ({exc})") from None
            return "unknown"
    return "torch-legacy" if first == LEGACY_MAGIC else "pickle"


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def load(path: str) -> tuple[Any, str, dict[int, str]]:
    """Load ``path`` with the real loader. Returns (object, format, storage locations)."""
    fmt = identify(path)
    if fmt in ("torchscript", "safetensors", "unknown"):
        what = {"torchscript": "a TorchScript archive", "safetensors": "already SafeTensors",
                "unknown": "not a format model-sandbox loads"}[fmt]
        raise LoaderError("unsupported-format", f"the file is {what}", detected=fmt)
    import numpy as np
    import torch

    locations: dict[int, str] = {}

    def record_location(storage: Any, location: str) -> Any:
        locations[storage.data_ptr()] = location
        return storage

    if fmt == "numpy-npy":
        return np.load(path, allow_pickle=True), fmt, locations
    if fmt == "numpy-npz":
        with np.load(path, allow_pickle=True) as npz:
            return {k: npz[k] for k in npz.files}, fmt, locations
    if fmt == "pickle":
        with open(path, "rb") as f:
            return _ghosts.Unpickler(f).load(), fmt, locations
    obj = torch.load(path, map_location=record_location, weights_only=False,
                     mmap=(fmt == "torch-zip"), pickle_module=_ghosts.pickle_module)
    return obj, fmt, locations


def write_outputs(obj: Any, fmt: str, locations: dict[int, str], out_dir: str, *,
                  tensors: bool = True) -> dict[str, Any]:
    """Extract tensors from ``obj`` and write the manifest and (unless ``tensors`` is false)
    the safetensors file."""
    from safetensors.torch import save_file

    from ._extract import extract

    ex = extract(obj, locations)
    skeleton_json = json.dumps(ex.skeleton, allow_nan=False, separators=(",", ":"))
    metadata = {"format": "pt", "model_sandbox.skeleton": skeleton_json,
                "model_sandbox.views": json.dumps(ex.views, separators=(",", ":"))}
    if len(skeleton_json) > P.MAX_JSON_BYTES // 2:
        metadata.pop("model_sandbox.skeleton")
    if tensors:
        save_file(ex.stored, os.path.join(out_dir, P.TENSORS_FILE), metadata=metadata)
    manifest = {
        "protocol": P.PROTOCOL_VERSION,
        "format": fmt,
        "tensors": ex.entries,
        "views": ex.views,
        "skeleton": ex.skeleton,
        "unrepresentable": ex.unrepresentable,
        "notes": ex.notes[:1000],
    }
    buf = io.StringIO()
    json.dump(manifest, buf, allow_nan=False, separators=(",", ":"))
    with open(os.path.join(out_dir, P.MANIFEST_FILE), "w", encoding="utf-8") as f:
        f.write(buf.getvalue())
    return manifest
