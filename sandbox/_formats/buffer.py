"""The bytes a reader works on: a read-only memory map of the file, and integer helpers."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

from sandbox.errors import MalformedInput

Buf = bytes | bytearray | mmap.mmap


@contextmanager
def open_buffer(path: str | os.PathLike[str]) -> Iterator[Buf]:
    """The file at ``path`` mapped read-only (``b""`` when it is empty); pages nobody touches
    are never read. Raises ``MalformedInput`` when it cannot be opened or mapped."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise MalformedInput(
            f"cannot read {os.fspath(path)!s}: {exc.strerror or exc}", path=os.fspath(path)
        ) from None
    try:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                yield b""
                return
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise MalformedInput(f"cannot map {os.fspath(path)!s}: {exc}", path=os.fspath(path)) from None
        try:
            yield mm
        finally:
            mm.close()
    finally:
        fh.close()


def release(buf: Buf, begin: int, end: int) -> None:
    """Unmap from this process the pages of ``buf[begin:end]`` when ``buf`` is a map (its
    resident size stops counting them; the page cache keeps them, and a later read maps them
    again): a reader that hashes a large file region by region holds one region, not the file."""
    if isinstance(buf, mmap.mmap) and end > begin:
        first = begin - begin % mmap.PAGESIZE
        buf.madvise(mmap.MADV_DONTNEED, first, min(end, len(buf)) - first)


def u16(buf: Buf, at: int) -> int:
    return int.from_bytes(buf[at : at + 2], "little")


def u32(buf: Buf, at: int) -> int:
    return int.from_bytes(buf[at : at + 4], "little")


def u64(buf: Buf, at: int) -> int:
    return int.from_bytes(buf[at : at + 8], "little")
