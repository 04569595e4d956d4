"""Whole-file compressions a pickle comes wrapped in (joblib's zlib, gzip, bz2, xz, lzma, lz4),
recognised by their magic and inflated with the standard library within a cap and a deadline."""

from __future__ import annotations

import bz2
import lzma
import time
import zlib
from typing import Any

from sandbox.errors import MalformedInput

from .buffer import Buf


def detect(buf: Buf) -> str | None:
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


def decompress(buf: Buf, kind: str, cap: int, deadline: float) -> tuple[bytes | bytearray, bool]:
    """Decompress ``buf`` with the stdlib, at most ``cap`` bytes. Returns (data, capped).
    Each call's output is bounded, so the peak is about ``cap``, never a multiple of it."""
    out = bytearray()
    p = 0
    size = len(buf)
    chunk = 1 << 20
    try:
        if kind in ("zlib", "gzip"):
            wbits = 15 if kind == "zlib" else 31
            z = zlib.decompressobj(wbits)
            while len(out) <= cap:
                if time.monotonic() > deadline:
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
                    data = bytes(buf[p : p + chunk])
                    p += len(data)
                else:
                    data = b""  # input all read: drain what the last bounded call held back
                got = z.decompress(data, min(chunk, cap + 1 - len(out)))
                if not got and not data:
                    break
                out += got
        else:

            def fresh() -> Any:  # bz2, lzma and lz4 decompressors share one interface
                if kind == "lz4":
                    import lz4.frame

                    return lz4.frame.LZ4FrameDecompressor()
                return bz2.BZ2Decompressor() if kind == "bz2" else lzma.LZMADecompressor()

            d = fresh()
            pending = b""
            while len(out) <= cap:
                if time.monotonic() > deadline:
                    break
                if d.eof:
                    rest = (d.unused_data or b"") + pending  # lz4: None when empty
                    if not rest or kind not in ("bz2", "xz", "lz4"):
                        break
                    d, pending = fresh(), b""
                    out += d.decompress(rest, min(chunk, cap + 1 - len(out)))
                    continue
                if d.needs_input:
                    if pending:
                        data, pending = pending, b""
                    elif p < size:
                        data = bytes(buf[p : p + chunk])
                        p += len(data)
                    else:
                        break
                else:
                    data = b""  # output held back by the last call's bound
                # bounded per call: lz4 allocates its whole max_length before it inflates a byte
                out += d.decompress(data, min(chunk, cap + 1 - len(out)))
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError, RuntimeError) as exc:
        raise MalformedInput(f"{kind} data does not decompress: {exc}") from None
    over = len(out) > cap
    del out[cap:]  # in place: a copy would double the peak (``cap`` is a GiB by default)
    return out, over
