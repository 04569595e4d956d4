"""Container side: which returned tensors are still the input's own bytes, and where.

``torch.load(mmap=True)`` leaves each storage of a torch zip in a private mapping of the input.
A tensor whose pages the load never wrote is exactly the input's bytes at one offset, so the
loader names that span instead of copying the bytes into the tensors memfd, and the host reads
them from its own descriptor of the input. The kernel says which pages were written: in a
private file mapping a written page becomes an anonymous copy (``/proc/self/pagemap``: present
and not file-backed), while an unwritten one is the file's page or not present at all.

Nothing here is trusted by the host. A payload that runs in this process can name any span; the
host only ever returns the input's bytes for it and verifies them against its own reading of
the file like any other returned tensor. The check exists for fidelity: a load that changed a
tensor in place (a ``__setstate__``, or a payload) sends the changed bytes, which the host then
compares with the file's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61
_MAX_MAPS_BYTES = 64 << 20


class SelfViews:
    """Descriptors of this process's ``/proc/self/maps`` and ``/proc/self/pagemap``, opened
    before the monitoring filter goes in (reading them later opens nothing). Either may be
    missing (a runtime without pagemap): then no span is named and every tensor is copied."""

    def __init__(self) -> None:
        self.maps = self.pagemap = -1
        try:
            self.maps = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass

    @property
    def usable(self) -> bool:
        return self.maps >= 0 and self.pagemap >= 0


def _read_maps(fd: int) -> bytes:
    out = bytearray()
    while len(out) < _MAX_MAPS_BYTES:
        chunk = os.pread(fd, 1 << 16, len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _regions(maps: bytes, st: os.stat_result) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every private, readable mapping of the file ``st``."""
    want_dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    out = []
    for line in maps.decode("ascii", "replace").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or parts[4] != str(st.st_ino) or parts[1][:1] != "r" or parts[1][3:4] != "p":
            continue
        major, _, minor = parts[3].partition(":")
        try:
            if f"{int(major, 16):02x}:{int(minor, 16):02x}" != want_dev:
                continue
            lo, _, hi = parts[0].partition("-")
            out.append((int(lo, 16), int(hi, 16), int(parts[2], 16)))
        except ValueError:
            continue
    return out


def _untouched(pagemap: int, begin: int, end: int) -> bool:
    """Whether no page of ``[begin, end)`` was written: each one is a file page or absent."""
    import numpy as np

    first, last = begin // _PAGE, (end - 1) // _PAGE
    want = (last - first + 1) * 8
    data = os.pread(pagemap, want, first * 8)
    if len(data) != want:
        return False
    entries = np.frombuffer(data, dtype="<u8" if sys.byteorder == "little" else ">u8")
    present = (entries & np.uint64(_PRESENT)) != 0
    absent_ok = ~present & ((entries & np.uint64(_SWAPPED)) == 0)
    file_ok = present & ((entries & np.uint64(_FILE)) != 0)
    return bool(np.all(absent_ok | file_ok))


def file_spans(stored: Mapping[str, Any], views: SelfViews, input_fd: int) -> dict[str, tuple[int, int]]:
    """For each tensor of ``stored`` (contiguous CPU tensors) whose bytes lie, unwritten, in a
    private mapping of the input ``input_fd``: its span in the input. Any failure names none."""
    if not views.usable:
        return {}
    try:
        regions = _regions(_read_maps(views.maps), os.fstat(input_fd))
    except OSError:
        return {}
    out: dict[str, tuple[int, int]] = {}
    if not regions:
        return out
    for name, t in stored.items():
        n = t.numel() * t.element_size()
        if n == 0 or t.device.type != "cpu" or not t.is_contiguous():
            continue
        ptr = t.data_ptr()
        where = next(((lo, off) for lo, hi, off in regions if lo <= ptr and ptr + n <= hi), None)
        if where is None:
            continue
        try:
            if not _untouched(views.pagemap, ptr, ptr + n):
                continue
        except OSError:
            return out
        begin = where[1] + (ptr - where[0])
        out[name] = (begin, begin + n)
    return out
