"""Tar archives, torch's oldest checkpoint format (before 0.1.10): member headers only."""

from __future__ import annotations

import io
import mmap
import re
import tarfile
from typing import Any

from sandbox.errors import MalformedInput

from .buffer import Buf

MAX_MEMBERS = 100_000
TORCH_MEMBERS = ("sys_info", "pickle", "tensors", "storages")
#: the largest pax extended header or GNU long name a member may carry (torch writes none; a
#: path is at most a few KiB): tarfile reads each into memory whole and runs regular
#: expressions over it that backtrack quadratically on digit runs (CVE-2024-6232)
MAX_EXTENDED = 1 << 16
_MAX_DIGITS = 32  # the longest run of digits a pax header may hold (sizes, times: 20 or so)
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (_MAX_DIGITS + 1))


class _Hostile(Exception):
    """An extended header this reader refuses to hand to tarfile. Not a ``tarfile.HeaderError``:
    tarfile would take one after the first member for the end of the archive (and so stop
    listing members the loader still reads)."""


def _check_pax(buf: bytes) -> None:
    """Refuse a pax header that is not a sequence of well-formed ``<len> <key>=<value>`` + newline
    records, or that holds a digit run longer than :data:`_MAX_DIGITS`: with both checks,
    every regular expression tarfile applies to it runs in linear time."""
    if _DIGIT_RUN.search(buf):
        raise _Hostile(f"pax header holds a run of more than {_MAX_DIGITS} digits")
    pos = 0
    while pos < len(buf):
        if buf[pos] == 0:
            if buf.count(0, pos) != len(buf) - pos:
                raise _Hostile(f"pax header has data after its records, at {pos}")
            return
        space = buf.find(b" ", pos, pos + _MAX_DIGITS + 1)
        digits = buf[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise _Hostile(f"pax record at {pos} has no length")
        end = pos + int(digits)
        eq = buf.find(b"=", space, end)
        if end > len(buf) or eq <= space + 1 or buf[end - 1 : end] != b"\n":
            raise _Hostile(f"pax record at {pos} is malformed")
        pos = end


class _TarInfo(tarfile.TarInfo):
    """tarfile's member header with its extended headers bounded (see :data:`MAX_EXTENDED`)."""

    def _proc_pax(self, tarfile: Any) -> Any:
        _bounded(self)
        at = tarfile.fileobj.tell()
        buf = tarfile.fileobj.read(self.size)
        tarfile.fileobj.seek(at)
        _check_pax(bytes(buf))
        return super()._proc_pax(tarfile)  # type: ignore[misc]

    def _proc_gnulong(self, tarfile: Any) -> Any:
        _bounded(self)
        return super()._proc_gnulong(tarfile)  # type: ignore[misc]

    def _proc_sparse(self, tarfile: Any) -> Any:
        # an old GNU sparse header may chain extension blocks without end, 21 entries each,
        # all kept in one list (about five times the archive's size in memory)
        if getattr(self, "_sparse_structs", (None, False))[1]:
            raise _Hostile("GNU sparse member with extension blocks")
        return super()._proc_sparse(tarfile)  # type: ignore[misc]

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tarfile: Any) -> None:
        # a GNU sparse 1.0 map is a count and then that many lines of numbers in the member's
        # data, all read into one list (a 1 GB map of "1\n": 500 million entries, 4 GB); torch
        # never writes sparse members
        raise _Hostile("GNU sparse 1.0 member")


def _bounded(info: tarfile.TarInfo) -> None:
    if not 0 <= info.size <= MAX_EXTENDED:
        raise _Hostile(f"extended tar header of {info.size} bytes (at most {MAX_EXTENDED})")


def is_tar(buf: Buf) -> bool:
    """Whether ``tarfile.open(mode="r:")``, torch.load's first try on a file, takes ``buf`` for a
    tar archive: its first header is read by tarfile itself (``nti()`` reads the checksum up
    to its first NUL, or base-256; a field it cannot read makes torch read the file as a
    pickle). An extended first header this module refuses (see :class:`_Hostile`), or a
    failure that is no ``ReadError`` (torch.load would fail with it), counts as a tar:
    :func:`members` then refuses the archive."""
    if len(buf) < 512:
        return False
    fileobj = buf if isinstance(buf, mmap.mmap) else io.BytesIO(bytes(buf))
    fileobj.seek(0)
    try:
        tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_TarInfo).close()
    except tarfile.ReadError:
        return False
    except Exception:  # any other failure: torch.load fails too; members() says why
        return True
    return True


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
        with tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_TarInfo) as tar:
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
    except MalformedInput:
        raise
    except Exception as exc:  # tarfile is not written for hostile archives
        # besides its own errors it raises what its parsing runs into: IndexError for a GNU
        # sparse header whose extension block is missing, ValueError, OverflowError, ...
        raise MalformedInput(f"unreadable tar archive: {exc or type(exc).__name__}") from None
    return members, odd, False
