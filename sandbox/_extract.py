"""Stage 4, host: the worker's outputs, taken from what came over the channel.

Everything read here came from a sandbox that ran attacker-controlled code. The channel
(:mod:`._channel`) already checked frame sizes and that each output is a sealed memfd within its
cap; here the status and manifest are parsed (strict JSON) and validated field by field, and the
tensors stay in their sealed memfd for the convert stage to open with the safetensors library.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ._channel import Received
from ._worker import _protocol as P
from .errors import OutputRejected

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class WorkerOutput:
    status: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    tensors_path: str | None = None  # /proc/self/fd/N of the sealed tensors memfd


#: JSON values (counted from the separators and openers before parsing) the host will build
#: from one document: parsing allocates ~70 bytes of Python objects per value, so this keeps a
#: document of any shape under ~600 MB of host memory (the bytes cap alone does not: 64 MB of
#: ``[],`` is 21 million lists, 1.4 GB)
MAX_JSON_VALUES = 8_000_000


def _parse_json(data: bytes, item: str) -> Any:
    values = data.count(b",") + data.count(b":") + data.count(b"[") + data.count(b"{")
    if values > MAX_JSON_VALUES:
        raise OutputRejected(f"{item} holds about {values} JSON values, over the "
                             f"{MAX_JSON_VALUES} the host builds from one document", item=item)
    try:
        return P.parse_json(data, item)
    except P.ProtocolError as exc:
        raise OutputRejected(str(exc), item=item) from None


def _read_memfd(fd: int, cap: int, item: str) -> bytes:
    size = os.fstat(fd).st_size
    if size > cap:
        raise OutputRejected(f"{item} is {size} bytes, over the {cap} byte cap", item=item)
    return os.pread(fd, size, 0) if size else b""


def read_status(received: Received) -> dict[str, Any] | None:
    """Only the supervisor's status (validated), or None when it sent none."""
    if received.status is None:
        return None
    return validate_status(_parse_json(received.status, P.STATUS_FILE))


def read_outputs(received: Received) -> WorkerOutput:
    """The status and the manifest (validated) and where the tensors are."""
    out = WorkerOutput(status=read_status(received))
    fd = received.outputs.get("manifest")
    if fd is not None:
        out.manifest = validate_manifest(_parse_json(_read_memfd(fd, P.MAX_JSON_BYTES,
                                                                 P.MANIFEST_FILE), P.MANIFEST_FILE))
    fd = received.outputs.get("tensors")
    if fd is not None:
        out.tensors_path = f"/proc/self/fd/{fd}"
    return out


def _require(cond: bool, item: str, what: str) -> None:
    if not cond:
        raise OutputRejected(f"{item}: {what}", item=item)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_status(data: Any) -> dict[str, Any]:
    item = P.STATUS_FILE
    _require(isinstance(data, dict), item, "not an object")
    _require(data.get("protocol") == P.PROTOCOL_VERSION, item, "wrong protocol version")
    for key in ("input_sha256",):
        if key in data:
            _require(isinstance(data[key], str) and bool(_SHA256.match(data[key])), item,
                     f"{key} is not a sha256")
    for key in ("wall_s", "cpu_user_s", "cpu_system_s"):
        if key in data:
            _require(isinstance(data[key], (int, float)) and not isinstance(data[key], bool),
                     item, f"{key} is not a number")
    for key in ("exit_code", "max_rss_kb", "input_size"):
        if key in data:
            _require(_is_int(data[key]), item, f"{key} is not an integer")
    if "env_keys" in data:
        _require(isinstance(data["env_keys"], list) and
                 all(isinstance(k, str) for k in data["env_keys"]), item, "env_keys malformed")
    if "limit" in data:
        _require(data["limit"] is None or data["limit"] in _SUPERVISOR_LIMITS, item,
                 "limit is not one the supervisor enforces")
    if "resources" in data:
        data["resources"] = _validate_resources(data["resources"], item)
    stopped = data.get("stopped")
    if stopped is not None:
        _require(isinstance(stopped, dict) and isinstance(stopped.get("kind"), str) and
                 isinstance(stopped.get("category"), str) and
                 isinstance(stopped.get("t"), (int, float)) and not isinstance(stopped["t"], bool),
                 item, "stopped malformed")
        data["stopped"] = {"kind": stopped["kind"][:40], "category": stopped["category"][:40],
                           "t": float(stopped["t"])}
    result = data.get("result")
    _require(result is None or isinstance(result, dict), item, "result is not an object")
    if isinstance(result, dict):
        for key in ("kind", "message", "type", "format", "detected"):
            if key in result:
                _require(isinstance(result[key], str), item, f"result.{key} is not a string")
                result[key] = result[key][:4000]
    status: dict[str, Any] = data
    return status


_LAYOUT_KEYS = frozenset({"name", "key", "dtype", "shape", "stride", "offset", "parameter",
                          "location"})
_SUPERVISOR_LIMITS = ("wall_clock", "cpu", "output_bytes")
_RESOURCE_SECONDS = ("cpu_s", "sample_s")
_RESOURCE_COUNTS = ("rss_peak_bytes", "threads_peak", "children_peak", "samples")


def _validate_resources(res: Any, item: str) -> dict[str, Any]:
    """The supervisor's samples of the loader's tree: known keys only, finite and non-negative."""
    _require(isinstance(res, dict), item, "resources is not an object")
    clean: dict[str, Any] = {}
    for key in _RESOURCE_SECONDS:
        if key in res:
            v = res[key]
            _require(isinstance(v, (int, float)) and not isinstance(v, bool) and
                     math.isfinite(v) and 0 <= v <= 1e9, item, f"resources.{key} is not a duration")
            clean[key] = float(v)
    for key in _RESOURCE_COUNTS:
        if key in res:
            v = res[key]
            _require(_is_int(v) and 0 <= v < 2**63, item, f"resources.{key} is not a count")
            clean[key] = v
    if "error" in res:
        _require(isinstance(res["error"], str), item, "resources.error is not a string")
        clean["error"] = res["error"][:200]
    return clean


def validate_manifest(data: Any) -> dict[str, Any]:
    item = P.MANIFEST_FILE
    _require(isinstance(data, dict), item, "not an object")
    _require(data.get("protocol") == P.PROTOCOL_VERSION, item, "wrong protocol version")
    tensors = data.get("tensors")
    views = data.get("views")
    _require(isinstance(tensors, list) and len(tensors) <= P.MAX_TENSORS, item, "tensors malformed")
    _require(isinstance(views, list) and len(views) <= P.MAX_TENSORS, item, "views malformed")
    names: set[str] = set()
    for t in tensors:
        _require(isinstance(t, dict), item, "tensor entry is not an object")
        _check_name(t.get("name"), names, item)
        _require(isinstance(t.get("dtype"), str) and t["dtype"] in P.TORCH_DTYPES, item,
                 f"unknown dtype {str(t.get('dtype'))[:40]}")
        stored_as, size = P.TORCH_DTYPES[t["dtype"]]
        _require(t.get("stored_as") == stored_as, item, f"{t['name']}: wrong storage dtype")
        shape = _check_shape(t.get("shape"), item)
        numel = 1
        for s in shape:
            numel *= s
        _require(t.get("nbytes") == numel * size, item, f"{t['name']}: nbytes does not match shape")
        _require(isinstance(t.get("sha256"), str) and bool(_SHA256.match(t["sha256"])), item,
                 f"{t['name']}: sha256 malformed")
        _check_location(t.get("location"), item)
    stored = {t["name"]: t for t in tensors}
    for v in views:
        _require(isinstance(v, dict), item, "view entry is not an object")
        _check_name(v.get("name"), names, item)
        base = stored.get(v.get("base"))  # type: ignore[arg-type]
        _require(base is not None, item, f"view {v['name']} names no stored base")
        assert base is not None
        _require(v.get("dtype") == base["dtype"], item, f"view {v['name']}: dtype differs from base")
        shape = _check_shape(v.get("shape"), item)
        stride = _check_shape(v.get("stride"), item)
        _require(len(stride) == len(shape), item, f"view {v['name']}: stride rank")
        offset = v.get("offset")
        _require(_is_int(offset) and offset >= 0, item, f"view {v['name']}: offset")
        base_numel = base["nbytes"] // P.TORCH_DTYPES[base["dtype"]][1]
        last = offset + sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) \
            if all(s > 0 for s in shape) else offset
        _require(last < base_numel or (base_numel == 0 and 0 in shape), item,
                 f"view {v['name']}: reaches past its base")
        _check_location(v.get("location"), item)
    layout = data.get("layout")
    if layout is not None:
        _require(isinstance(layout, list) and 0 < len(layout) <= P.MAX_TENSORS and not tensors
                 and not views, item, "layout malformed")
        for t in layout:
            _require(isinstance(t, dict) and set(t) == _LAYOUT_KEYS, item, "layout entry malformed")
            _check_name(t["name"], names, item)
            _require(isinstance(t["key"], str) and 0 < len(t["key"]) <= 64 and
                     t["key"].isprintable(), item, "layout key malformed")
            _require(isinstance(t["dtype"], str) and t["dtype"] in P.TORCH_DTYPES, item,
                     "layout dtype unknown")
            _require(len(_check_shape(t["shape"], item)) == len(_check_shape(t["stride"], item)),
                     item, "layout stride rank")
            _require(_is_int(t["offset"]) and 0 <= t["offset"] < 2**62, item, "layout offset")
            _require(isinstance(t["parameter"], bool), item, "layout parameter flag")
            _check_location(t["location"], item)
    _require(isinstance(data.get("unrepresentable", []), list), item, "unrepresentable malformed")
    for u in data.get("unrepresentable", []):
        _require(isinstance(u, dict) and all(isinstance(u.get(k), str) for k in ("path", "type")),
                 item, "unrepresentable entry malformed")
    _require(isinstance(data.get("notes", []), list) and
             all(isinstance(n, str) for n in data.get("notes", [])), item, "notes malformed")
    _require(isinstance(data.get("format"), str), item, "format missing")
    manifest: dict[str, Any] = data
    return manifest


def _check_name(name: Any, names: set[str], item: str) -> None:
    _require(isinstance(name, str) and 0 < len(name) <= P.MAX_NAME_LEN and name != "__metadata__",
             item, "tensor name malformed")
    _require(name not in names, item, f"duplicate tensor name {name[:80]!r}")
    names.add(name)


def _check_shape(shape: Any, item: str) -> list[int]:
    _require(isinstance(shape, list) and len(shape) <= P.MAX_NDIM and
             all(_is_int(s) and 0 <= s < 2**62 for s in shape), item, "shape malformed")
    return list(shape)


def _check_location(loc: Any, item: str) -> None:
    _require(isinstance(loc, str) and len(loc) <= 64 and loc.isprintable(), item, "location malformed")
