"""Tar archives, torch's oldest checkpoint format (before 0.1.10): member headers only."""

from __future__ import annotations

import io
import mmap
import tarfile

from sandbox.errors import MalformedInput

from .buffer import Buf

MAX_MEMBERS = 100_000
TORCH_MEMBERS = ("sys_info", "pickle", "tensors", "storages")


def is_tar(buf: Buf) -> bool:
    if len(buf) < 512:
        return False
    block = bytes(buf[:512])
    if block.count(0) == 512:
        return False
    field_ = block[148:156].replace(b"\x00", b" ").strip()
    try:
        claimed = int(field_ or b"x", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 0x20
    return claimed in (unsigned, signed)


def members(buf: Buf) -> tuple[dict[str, list[tuple[int, int]]], list[str], bool]:
    """Headers of a tar archive: ({name: [(data offset, size)]}, odd members, capped).

    Only the four member names torch's legacy loader uses are collected; member data is not
    read. Raises ``MalformedInput`` for an unreadable archive.
    """
    members: dict[str, list[tuple[int, int]]] = {}
    odd: list[str] = []
    fileobj = buf if isinstance(buf, mmap.mmap) else io.BytesIO(bytes(buf))
    fileobj.seek(0)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for count in range(MAX_MEMBERS + 1):
                info = tar.next()
                if info is None:
                    return members, odd, False
                if count == MAX_MEMBERS:
                    return members, odd, True
                if info.name not in TORCH_MEMBERS:
                    continue
                if not info.isreg() or info.issparse():
                    odd.append(info.name)
                    continue
                if info.offset_data + info.size > len(buf):
                    raise MalformedInput(f"tar member {info.name!r} is truncated", offset=info.offset_data)
                members.setdefault(info.name, []).append((info.offset_data, info.size))
    except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError, OverflowError) as exc:
        raise MalformedInput(f"unreadable tar archive: {exc}") from None
    return members, odd, False
