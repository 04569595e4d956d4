"""``.npy`` headers (versions 1 to 3) and numpy dtype strings."""

from __future__ import annotations

import ast

from sandbox.errors import MalformedInput

from .buffer import Buf, u16, u32

MAX_HEADER = 1 << 20


def header(data: Buf, base: int, end: int, label: str) -> tuple[dict[str, object], int]:
    """Parse a ``.npy`` header at ``base``; returns (header dict, offset of the data)."""
    if end - base < 10 or bytes(data[base : base + 6]) != b"\x93NUMPY":
        raise MalformedInput(f"{label}: not a .npy header", offset=base)
    major = data[base + 6]
    if major == 1:
        hlen, start = u16(data, base + 8), base + 10
    elif major in (2, 3):
        if end - base < 12:
            raise MalformedInput(f"{label}: truncated .npy header", offset=base)
        hlen, start = u32(data, base + 8), base + 12
    else:
        raise MalformedInput(f"{label}: unsupported .npy version {major}", offset=base + 6)
    if hlen > MAX_HEADER or start + hlen > end:
        raise MalformedInput(f"{label}: .npy header length {hlen} is invalid", offset=base + 8)
    raw = bytes(data[start : start + hlen])
    try:
        text = raw.decode("utf-8" if major == 3 else "latin-1")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError, TypeError):
        raise MalformedInput(f"{label}: .npy header is not a Python literal", offset=start) from None
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise MalformedInput(f"{label}: .npy header lacks descr/fortran_order/shape", offset=start)
    return {str(k): v for k, v in header.items()}, start + hlen


def descr_has_object(descr: object, depth: int = 0) -> bool:
    if depth > 32:
        return True
    if isinstance(descr, str):
        return descr.lstrip("<>|=").startswith("O")
    if isinstance(descr, (list, tuple)):
        return any(descr_has_object(d, depth + 1) for d in descr)
    return False


def itemsize(code: str) -> int | None:
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
