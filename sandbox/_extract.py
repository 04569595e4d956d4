"""Stage 4, host: the worker's outputs, taken from what came over the channel.

Everything read here came from a sandbox that ran attacker-controlled code. The channel
(:mod:`._channel`) already checked frame sizes and that each output is a sealed memfd within its
cap; here the status and manifest are parsed (strict JSON, a bounded number of values) into the
typed documents of the wire format (:class:`~sandbox._worker._protocol.Status`,
:class:`~sandbox._worker._protocol.Manifest`), whose constructors check every field; the tensors
stay in their sealed memfd for the convert stage to open with the safetensors library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ._channel import Received
from ._worker import _protocol as P
from .errors import OutputRejected

__all__ = [
    "MAX_JSON_VALUES",
    "WorkerOutput",
    "read_outputs",
    "read_status",
    "validate_manifest",
    "validate_status",
]


@dataclass
class WorkerOutput:
    status: P.Status | None = None
    manifest: P.Manifest | None = None
    tensors_path: str | None = None  # /proc/self/fd/N of the sealed tensors memfd


#: JSON values (counted from the separators and openers before parsing) the host will build
#: from one document: parsing allocates ~70 bytes of Python objects per value, so this keeps a
#: document of any shape under ~600 MB of host memory (the bytes cap alone does not: 64 MB of
#: ``[],`` is 21 million lists, 1.4 GB)
MAX_JSON_VALUES = 8_000_000


def _parse_json(data: bytes, item: str) -> Any:
    values = data.count(b",") + data.count(b":") + data.count(b"[") + data.count(b"{")
    if values > MAX_JSON_VALUES:
        raise OutputRejected(
            f"{item} holds about {values} JSON values, over the "
            f"{MAX_JSON_VALUES} the host builds from one document",
            item=item,
        )
    try:
        return P.parse_json(data, item)
    except P.ProtocolError as exc:
        raise OutputRejected(str(exc), item=item) from None


def _read_memfd(fd: int, cap: int, item: str) -> bytes:
    size = os.fstat(fd).st_size
    if size > cap:
        raise OutputRejected(f"{item} is {size} bytes, over the {cap} byte cap", item=item)
    return os.pread(fd, size, 0) if size else b""


def validate_status(data: Any) -> P.Status:
    """The supervisor's status document from its parsed JSON (``OutputRejected`` if invalid)."""
    try:
        return P.Status.from_obj(data)
    except P.ProtocolError as exc:
        raise OutputRejected(str(exc), item=P.STATUS_FILE) from None


def validate_manifest(data: Any) -> P.Manifest:
    """The loader's manifest from its parsed JSON (``OutputRejected`` if invalid)."""
    try:
        return P.Manifest.from_obj(data)
    except P.ProtocolError as exc:
        raise OutputRejected(str(exc), item=P.MANIFEST_FILE) from None


def read_status(received: Received) -> P.Status | None:
    """Only the supervisor's status (validated), or None when it sent none."""
    if received.status is None:
        return None
    return validate_status(_parse_json(received.status, P.STATUS_FILE))


def read_outputs(received: Received) -> WorkerOutput:
    """The status and the manifest (validated) and where the tensors are."""
    out = WorkerOutput(status=read_status(received))
    fd = received.outputs.get("manifest")
    if fd is not None:
        out.manifest = validate_manifest(
            _parse_json(_read_memfd(fd, P.MAX_JSON_BYTES, P.MANIFEST_FILE), P.MANIFEST_FILE)
        )
    fd = received.outputs.get("tensors")
    if fd is not None:
        out.tensors_path = f"/proc/self/fd/{fd}"
    return out
