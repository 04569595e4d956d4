"""The JSON header of a SafeTensors file: recognised, and checked against the data length."""

from __future__ import annotations

import json

from sandbox._worker import _protocol as P
from sandbox.errors import MalformedInput

from .buffer import Buf, u64

MAX_HEADER = 100_000_000
#: JSON values (counted from separators and openers, before parsing) a header may hold: about
#: eleven per tensor. Parsing builds ~70 bytes of objects per value, so a 60 MB header of
#: ``{},`` (20 million dicts) once cost 1.5 GB; this keeps any header under ~300 MB.
MAX_HEADER_VALUES = 4_000_000

#: every dtype code a SafeTensors file may carry -> bytes per element (the protocol's one table)
DTYPES: dict[str, int] = dict(P.ST_DTYPES.values())


def byte_count(shape: list[int] | tuple[int, ...], itemsize: int, limit: int) -> int | None:
    """Bytes a tensor of ``shape`` (naturals) and ``itemsize`` holds, or ``None`` when that is
    more than ``limit``. Stops multiplying once past it: a header of a million dimensions of
    2**62 would otherwise build a 60-million-bit product digit by digit (minutes of CPU)."""
    if 0 in shape:
        return 0
    count = itemsize
    for d in shape:
        if count > limit:
            return None
        count *= d
    return count if count <= limit else None


def load_header(raw: bytes) -> object:
    """A header's JSON, parsed once its number of values is known to be bounded (see
    :data:`MAX_HEADER_VALUES`). Raises ``MalformedInput``."""
    values = raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_HEADER_VALUES:
        raise MalformedInput(
            f"safetensors header holds about {values} JSON values (at most {MAX_HEADER_VALUES})", offset=8
        )
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedInput(f"safetensors header is not JSON: {exc}", offset=8) from None


def looks_like(buf: Buf) -> bool:
    if len(buf) < 10:
        return False
    n = u64(buf, 0)
    if not (2 <= n <= min(MAX_HEADER, len(buf) - 8) and buf[8] == 0x7B):
        return False
    raw = bytes(buf[8 : 8 + n])
    try:
        return isinstance(load_header(raw), dict)
    except MalformedInput as exc:
        return "JSON values" in exc.message  # a header too large to parse: check() says so


def check(buf: Buf) -> None:
    n = u64(buf, 0)
    header = load_header(bytes(buf[8 : 8 + n]))
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
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise MalformedInput(f"safetensors entry {key!r} has unknown dtype {dtype!r}", offset=8)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise MalformedInput(f"safetensors entry {key!r} has an invalid shape", offset=8)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise MalformedInput(f"safetensors entry {key!r} has invalid data_offsets", offset=8)
        if byte_count(shape, DTYPES[dtype], data_len) != offsets[1] - offsets[0]:
            raise MalformedInput(f"safetensors entry {key!r}: shape and byte range disagree", offset=8)
