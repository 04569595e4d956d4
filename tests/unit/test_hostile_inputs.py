"""Hostile inputs to the host's own readers: each test is one attack that once made a reader
hang, crash with a traceback, or compute without bound. Every fixture is built here; nothing
is unpickled or loaded."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest

from sandbox._formats import tar_archive
from sandbox._scan import identify, scan_file
from sandbox.errors import MalformedInput


def _tar_with_pax(pax: bytes, *, members: tuple[str, ...] = ("pickle",)) -> bytes:
    """A tar archive whose first member carries the raw pax extended header ``pax``."""
    out = io.BytesIO()

    def header(name: str, size: int, kind: bytes) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, kind
        return info.tobuf(format=tarfile.USTAR_FORMAT)

    body = b"\x80\x02K\x01."
    for i, name in enumerate(members):
        if i == 0:
            out.write(header("././@PaxHeader", len(pax), tarfile.XHDTYPE))
            out.write(pax + b"\0" * (-len(pax) % 512))
        out.write(header(name, len(body), tarfile.REGTYPE))
        out.write(body + b"\0" * (512 - len(body)))
    out.write(b"\0" * 1024)
    return out.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "pax",
    [
        pytest.param(b"1" * 8000, id="digit-run"),  # hdrcharset search: quadratic in the run
        pytest.param(b"4 a\n" * 2000 + b"=", id="records-without-equals"),  # record regex
        pytest.param(b"9 a=b\n" + b"1 hdrcharset=x" * 500, id="junk-after-records"),
        pytest.param(b"1" * 70_000, id="over-the-cap"),
    ],
)
def test_a_pax_header_tarfile_parses_in_quadratic_time_is_refused(tmp_path: Path, pax: bytes) -> None:
    # CVE-2024-6232: tarfile (before 3.11.10/3.12.6) runs backtracking regular expressions
    # over the whole pax header; a 1 MB header of digits took the scan ~15 minutes, past any
    # time budget. The reader now refuses such headers before tarfile sees them.
    p = _write(tmp_path, "evil.tar", _tar_with_pax(pax))
    start = time.monotonic()
    with pytest.raises(MalformedInput, match="unreadable tar archive"):
        scan_file(p)
    assert identify(p) == "unknown"
    assert time.monotonic() - start < 2.0


def test_a_tar_long_name_over_the_cap_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, tar_archive.MAX_EXTENDED + 1
    data = info.tobuf(format=tarfile.GNU_FORMAT) + b"a" * (tar_archive.MAX_EXTENDED + 512) + b"\0" * 1024
    with pytest.raises(MalformedInput, match="extended tar header"):
        tar_archive.members(data)


def test_well_formed_pax_headers_still_read(tmp_path: Path) -> None:
    # what tarfile itself writes (a non-ASCII name, a fractional mtime, a long path) passes
    out = io.BytesIO()
    body = b"\x80\x02K\x01."
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name in ("dir-\u00e9/" + "x" * 300, "pickle"):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(body), 1700000000.123456
            info.pax_headers = {"comment": "\u00e9" * 50}
            tar.addfile(info, io.BytesIO(body))
    found, odd, capped = tar_archive.members(out.getvalue())
    assert list(found) == ["pickle"] and not odd and not capped
