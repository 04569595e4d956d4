"""Zip archives as torch, numpy and zip tools read them: the central directory found from the
end (zip64 included, data prepended to the archive accounted for), every local header, and
member bytes inflated within a cap."""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

from sandbox.errors import MalformedInput

from .buffer import Buf, u16, u32, u64

LOCAL_MAGIC = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
SUSPICIOUS_FLAGS = 0x0001 | 0x0020 | 0x0040 | 0x2000  # encrypted, patch, strong, masked
MAX_ENTRIES = 1_000_000
BOMB_MIN_BYTES = 256 << 20  # a compressed member this large when inflated, and
BOMB_RATIO = 200  # compressed more than this, is a decompression bomb
INFLATE_STEP = 1 << 20  # the most one inflate call may produce


@dataclass(slots=True)
class ZipEntry:
    index: int
    name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    header: int  # local header offset (already shifted)
    local_name: bytes = b""
    local_flags: int = 0
    local_method: int = 0
    data_start: int = 0

    @property
    def text(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")

    @property
    def bomb(self) -> bool:
        """Declares far more bytes than it stores (see :data:`BOMB_MIN_BYTES`)."""
        return (
            self.method != 0 and self.usize >= BOMB_MIN_BYTES and self.usize > BOMB_RATIO * max(self.csize, 1)
        )


@dataclass
class Zip:
    entries: list[ZipEntry]
    shift: int  # bytes before the archive that the central directory does not account for
    disagreement: str | None = None  # why zip readers would find another directory, if they would


class OutOfTime(Exception):
    """The deadline passed while a member was being inflated."""


class UnsupportedCompression(Exception):
    """A member compressed with a method other than stored (0) or deflate (8)."""

    def __init__(self, method: int) -> None:
        super().__init__(f"compression method {method}")
        self.method = method


def find_zip(buf: Buf) -> Zip | None:
    """Parse the central directory the way readers that start from the end do.

    Returns ``None`` when there is no end-of-central-directory record; raises
    ``MalformedInput`` when there is one but the directory it points to is unreadable.
    """
    size = len(buf)
    if size < 22:
        return None
    lo = max(0, size - 22 - 0xFFFF)
    eocd = buf.rfind(_EOCD, lo, size)
    while eocd >= 0 and eocd + 22 > size:
        eocd = buf.rfind(_EOCD, lo, eocd)
    if eocd < 0:
        return None
    total = u16(buf, eocd + 10)
    cd_size = u32(buf, eocd + 12)
    cd_off = u32(buf, eocd + 16)
    cd_end = eocd
    disagreement = None
    loc = eocd - 20
    if loc >= 56 and buf[loc : loc + 4] == _ZIP64_LOCATOR:
        # torch's miniz reads the zip64 end record at the offset its locator gives; Python's
        # zipfile (and a reader of an archive with data prepended, whose recorded offset is
        # off by its length) reads the one right before the locator
        adjacent = loc - 56
        pointed = u64(buf, loc + 8)
        at_pointer = pointed <= size - 56 and buf[pointed : pointed + 4] == _ZIP64_EOCD
        rec = pointed if at_pointer else adjacent if buf[adjacent : adjacent + 4] == _ZIP64_EOCD else -1
        if rec >= 0:
            plain = (total, cd_size, cd_off)
            wide = (u64(buf, rec + 32), u64(buf, rec + 40), u64(buf, rec + 48))
            if at_pointer and rec != adjacent:
                disagreement = (
                    f"the zip64 end record its locator points to (at {pointed}) is not the one "
                    f"right before the locator (at {adjacent}): zip readers disagree on which "
                    "central directory the archive has"
                )
            elif not at_pointer and pointed <= size - 56 and plain != wide:
                disagreement = (
                    f"the zip64 locator points to no zip64 end record (at {pointed}): torch's "
                    "reader uses the end record's own directory, other readers the zip64 "
                    "record's, and the two differ"
                )
            if at_pointer or disagreement is None or not zip_like_start(buf):
                (total, cd_size, cd_off), cd_end = wide, rec
            # else: an archive torch reads as a zip (it starts with a local header): its
            # reader ignores the zip64 record, and so does this one
    shift = cd_end - cd_size - cd_off
    if cd_off + cd_size <= size and buf[cd_off : cd_off + 4] == _CENTRAL:
        base, shift = cd_off, 0
    elif shift > 0 and buf[cd_off + shift : cd_off + shift + 4] == _CENTRAL:
        base = cd_off + shift
    elif total == 0 and cd_size == 0:
        return Zip([], 0, disagreement)
    else:
        if eocd < 4 or not zip_like_start(buf):
            return None  # stray signature inside other data
        raise MalformedInput("zip central directory not found where the end record points", offset=cd_off)
    if total > MAX_ENTRIES or total * 46 > cd_size:
        raise MalformedInput(f"zip claims {total} entries, more than the file can hold", offset=eocd)
    entries: list[ZipEntry] = []
    p = base
    stop = min(size, base + cd_size)
    for index in range(total):
        if p + 46 > stop or buf[p : p + 4] != _CENTRAL:
            raise MalformedInput(f"zip central directory entry {index} is truncated", offset=p)
        flags, method = u16(buf, p + 8), u16(buf, p + 10)
        crc, csize, usize = u32(buf, p + 16), u32(buf, p + 20), u32(buf, p + 24)
        nlen, elen, clen = u16(buf, p + 28), u16(buf, p + 30), u16(buf, p + 32)
        header = u32(buf, p + 42)
        if p + 46 + nlen + elen + clen > stop:
            raise MalformedInput(f"zip central directory entry {index} is truncated", offset=p)
        name = bytes(buf[p + 46 : p + 46 + nlen])
        extra = bytes(buf[p + 46 + nlen : p + 46 + nlen + elen])
        usize, csize, header = _zip64_fields(extra, usize, csize, header)
        entries.append(ZipEntry(index, name, flags, method, crc, csize, usize, header + shift))
        p += 46 + nlen + elen + clen
    for e in entries:
        h = e.header
        if h < 0 or h + 30 > size or buf[h : h + 4] != LOCAL_MAGIC:
            raise MalformedInput(f"zip local header of {e.text!r} is missing or truncated", offset=h)
        e.local_flags, e.local_method = u16(buf, h + 6), u16(buf, h + 8)
        lnlen, lelen = u16(buf, h + 26), u16(buf, h + 28)
        e.local_name = bytes(buf[h + 30 : h + 30 + lnlen])
        e.data_start = h + 30 + lnlen + lelen
        if e.data_start + e.csize > size:
            raise MalformedInput(f"zip member {e.text!r} runs past the end of the file", offset=e.data_start)
    return Zip(entries, shift, disagreement)


def zip_like_start(buf: Buf) -> bool:
    return bytes(buf[:4]) == LOCAL_MAGIC


def _zip64_fields(extra: bytes, usize: int, csize: int, header: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, n = int.from_bytes(extra[i : i + 2], "little"), int.from_bytes(extra[i + 2 : i + 4], "little")
        body = extra[i + 4 : i + 4 + n]
        if tag == 1:
            j = 0
            if usize == 0xFFFFFFFF and j + 8 <= len(body):
                usize = int.from_bytes(body[j : j + 8], "little")
                j += 8
            if csize == 0xFFFFFFFF and j + 8 <= len(body):
                csize = int.from_bytes(body[j : j + 8], "little")
                j += 8
            if header == 0xFFFFFFFF and j + 8 <= len(body):
                header = int.from_bytes(body[j : j + 8], "little")
        i += 4 + n
    return usize, csize, header


def read_member(
    buf: Buf, e: ZipEntry, cap: int, label: str, *, deadline: float = math.inf
) -> tuple[bytes | bytearray, bool]:
    """The member's uncompressed bytes, at most ``cap`` of them, and whether there were more.

    Memory: about ``cap`` bytes at the peak, never a multiple of it (inflated in bounded steps,
    trimmed in place: a 1 MB zip bomb once cost 3 GB of resident memory at the default cap).
    Raises ``UnsupportedCompression`` for a method other than stored or deflate,
    ``MalformedInput`` when deflated data does not inflate, and ``OutOfTime`` once
    ``time.monotonic()`` passes ``deadline`` (checked between steps: a GiB takes a second or
    two, and a hundred directory entries may share one bomb's data).
    """
    raw_end = e.data_start + e.csize
    if e.method == 0:
        return bytes(buf[e.data_start : min(raw_end, e.data_start + cap)]), e.csize > cap
    if e.method != 8:
        raise UnsupportedCompression(e.method)
    d = zlib.decompressobj(-15)
    out = bytearray()
    p = e.data_start
    try:
        while len(out) <= cap and not d.eof:
            if d.unconsumed_tail:
                data = d.unconsumed_tail
            elif p < raw_end:
                data = bytes(buf[p : min(raw_end, p + (1 << 20))])
                p += len(data)
            else:
                data = b""  # input all read: drain what the last bounded call held back
            if time.monotonic() > deadline:
                raise OutOfTime(label)
            got = d.decompress(data, min(INFLATE_STEP, cap + 1 - len(out)))
            if not got and not data:
                break
            out += got
    except zlib.error as exc:
        raise MalformedInput(f"zip member {label} does not inflate: {exc}", offset=e.data_start) from None
    over = len(out) > cap
    del out[cap:]
    return out, over


def torch_target(entries: list[ZipEntry]) -> tuple[str | None, list[ZipEntry], bytes | None]:
    """What torch's zip reader would unpickle: ``<first component of entry 0>/data.pkl``.

    miniz looks names up case-insensitively. Returns (member name, all matches, prefix).
    """
    if not entries:
        return None, [], None
    first = entries[0].name
    slash = first.find(b"/")
    if slash < 0:
        return None, [], None
    prefix = first[:slash]
    want = (prefix + b"/data.pkl").lower()
    matches = [e for e in entries if e.name.lower() == want]
    return (matches[0].text if matches else None), matches, prefix


def zip_format(z: Zip) -> tuple[str, str | None]:
    target, _, prefix = torch_target(z.entries)
    lower = [e.name.lower() for e in z.entries]
    if target is not None and prefix is not None:
        p = prefix.lower() + b"/"
        if any(n == p + b"constants.pkl" or n.startswith(p + b"code/") for n in lower):
            return "torchscript", target
        return "torch-zip", target
    if lower and all(n.endswith(b".npy") or n.endswith(b"/") for n in lower):
        return "numpy-npz", None
    if any(n.endswith(b".pkl") for n in lower):
        return "torch-zip", None
    return "unknown", None
