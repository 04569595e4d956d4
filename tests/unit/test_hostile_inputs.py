"""Hostile inputs to the host's own readers: each test is one attack that once made a reader
hang, crash with a traceback, or compute without bound. Every fixture is built here; nothing
is unpickled or loaded."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import _distribute
from sandbox._formats import compressed, safetensors_header, tar_archive, zip_archive
from sandbox._formats.buffer import open_buffer
from sandbox._scan import StaticScan, identify, scan_file, scan_pickle_bytes, walker
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


def test_a_legacy_stream_nested_deeper_than_the_recursion_limit_is_a_finding(tmp_path: Path) -> None:
    # the second legacy stream (the protocol version) is a tuple nested 200,000 deep: the
    # finding's message once took its repr and the scan died with RecursionError
    magic = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b"."
    deep = b"\x80\x02K\x01" + b"\x85" * 200_000 + b"."
    p = _write(tmp_path, "deep.pt", magic + deep + b"\x80\x02].\x80\x02].\x80\x02].")
    scan = scan_file(p)
    assert scan.format == "torch-legacy"
    assert any("protocol version is a tuple" in f.message for f in scan.findings)


def _safetensors_with_shape(shape: list[int]) -> bytes:
    meta = {"model_sandbox.source_sha256": "0" * 64}
    head = json.dumps({"__metadata__": meta, "a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}})
    return struct.pack("<Q", len(head)) + head.encode() + b"\0" * 4


def test_a_safetensors_shape_of_many_huge_dimensions_is_refused_quickly(tmp_path: Path) -> None:
    # 60,000 dimensions of 2**62: the check multiplied them all out (a 3.7-million-bit
    # product, seconds; a 100 MB header of them, hours) before comparing with the byte range
    p = _write(tmp_path, "x.safetensors", _safetensors_with_shape([2**62] * 60_000))
    start = time.monotonic()
    with pytest.raises(MalformedInput, match="shape and byte range disagree"):
        scan_file(p)
    assert time.monotonic() - start < 2.0


def test_a_remote_workers_safetensors_with_many_huge_dimensions_is_refused_quickly(tmp_path: Path) -> None:
    data = _safetensors_with_shape([2**62] * 60_000)
    p = _write(tmp_path, "out.safetensors", data)
    start = time.monotonic()
    why = _distribute.check_safetensors(p, out_sha=hashlib.sha256(data).hexdigest(), source_sha="0" * 64)
    assert why is not None and "disagree" in why and time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [([], 4, 4), ([3, 0, 2**62], 4, 0), ([2, 3], 2, 12), ([2**62, 2**62], 1, None), ([5], 4, None)],
)
def test_byte_count(shape: list[int], size: int, expected: int | None) -> None:
    assert safetensors_header.byte_count(shape, size, 16) == expected


def _traced_peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_zip_bomb_member_costs_about_the_cap_not_a_multiple_of_it(tmp_path: Path) -> None:
    # 96 MiB of zeros deflate to ~100 KB; inflating to a cap of 32 MiB once held the cap
    # three times over (one unbounded inflate call, the growing buffer, a trimmed copy and
    # its bytes copy): at the default cap of 1 GiB, a 1 MB file cost 3.2 GB resident
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("archive/data.pkl", "w") as f:
        for _ in range(96):
            f.write(bytes(1 << 20))
    cap = 32 << 20
    with open_buffer(path) as buf:
        found = zip_archive.find_zip(buf)
        assert found is not None
        entry = found.entries[0]
        peak = _traced_peak(lambda: zip_archive.read_member(buf, entry, cap, "data.pkl"))
        data, over = zip_archive.read_member(buf, entry, cap, "data.pkl")
    assert over and len(data) == cap and not any(data[:: 1 << 16])
    assert peak < 1.6 * cap, peak


@pytest.mark.parametrize("kind", ["zlib", "gzip"])
def test_a_compressed_bomb_costs_about_the_cap_not_a_multiple_of_it(kind: str) -> None:
    raw = bytes(96 << 20)
    packed = zlib.compress(raw, 9) if kind == "zlib" else gzip.compress(raw, 9)
    del raw
    cap = 32 << 20
    peak = _traced_peak(lambda: compressed.decompress(packed, kind, cap, time.monotonic() + 30))
    data, capped = compressed.decompress(packed, kind, cap, time.monotonic() + 30)
    assert capped and len(data) == cap
    assert peak < 1.6 * cap, peak


@pytest.mark.parametrize("size", [0, 1, 5000, 1 << 20])
def test_bounded_inflation_still_returns_every_byte(tmp_path: Path, size: int) -> None:
    body = os.urandom(size // 2) + bytes(size - size // 2)  # incompressible, then zeros
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", body)
    with open_buffer(path) as buf:
        found = zip_archive.find_zip(buf)
        assert found is not None
        assert zip_archive.read_member(buf, found.entries[0], size + 1, "x") == (body, False)
    data, capped = compressed.decompress(gzip.compress(body) * 2, "gzip", 2 * size + 1, time.monotonic() + 30)
    assert (bytes(data), capped) == (body * 2, False)


@pytest.mark.parametrize("where", ["tag", "location"])
def test_a_huge_bytes_constant_in_a_persistent_id_is_not_copied(tmp_path: Path, where: str) -> None:
    # persistent_load(('storage', ...)) with a 64 MiB bytes constant as the tag or the
    # location: the walk decoded the whole constant (a copy the size of the file: GiBs for a
    # large one) to compare it with 'storage'
    big = b"\x8e" + struct.pack("<Q", 64 << 20) + bytes(64 << 20)  # BINBYTES8
    small = b"\x8c\x07storage"
    storage_type = b"\x8c\x05torch\x8c\x0cFloatStorage\x93"
    key, numel = b"\x8c\x010", b"K\x03"
    parts = [
        big if where == "tag" else small,
        storage_type,
        key,
        big if where == "location" else b"\x8c\x03cpu",
    ]
    stream = b"\x80\x04(" + b"".join(parts) + numel + b"tQ."
    p = _write(tmp_path, "pid.pkl", stream)
    peak = _traced_peak(lambda: scan_file(p))
    assert peak < 16 << 20, peak


def _limit_findings(scan: StaticScan) -> list[str]:
    return [f.message for f in scan.findings if f.rule == "scan-limit-exceeded"]


def test_containers_gathered_into_tuples_end_the_walk_at_the_value_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 12 million empty dicts gathered into three tuples once kept 1.5 GB alive (no stack or
    # memo limit saw them); at the opcode limit, 6 GB from a 50 MB file
    monkeypatch.setattr(walker, "_MAX_VALUES", 20_000)
    p = _write(tmp_path, "dicts.pkl", b"\x80\x04" + (b"(" + b"}" * 100_000 + b"t") * 3 + b".")
    peak = _traced_peak(lambda: scan_file(p))
    assert any("containers built" in m for m in _limit_findings(scan_file(p)))
    assert peak < 8 << 20, peak


def test_a_flood_of_imports_ends_the_walk_at_the_record_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GLOBAL/POP pairs: 3 million of them (36 MB) once made 3 million import records (1.7 GB,
    # all of them in the report); EXT codes and lying FRAMEs add a finding per opcode
    monkeypatch.setattr(walker, "MAX_RECORDS", 5_000)
    for name, stream in (
        ("globals.pkl", b"\x80\x02" + b"cos\nsystem\n0" * 50_000 + b"N."),
        ("ext.pkl", b"\x80\x02" + b"\x82\x01" * 50_000 + b"N."),
        ("frames.pkl", b"\x80\x04" + (b"\x95" + b"\xff" * 8) * 50_000 + b"N."),
    ):
        scan = scan_file(_write(tmp_path, name, stream))
        assert any("records" in m for m in _limit_findings(scan)), name
        assert len(scan.globals) + len(scan.findings) < 20_000, name


def _zip_of_many_members(count: int, last: bytes) -> bytes:
    """``count`` central directory entries ``archive/dNNNNNNN.pkl`` that all point at one
    local header (named otherwise: a header mismatch each), then ``archive/data.pkl``."""
    small = b"\x80\x02N."
    out = bytearray()
    cd = bytearray()

    def local(name: bytes, data: bytes) -> int:
        at = len(out)
        out.extend(
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                20,
                0,
                0,
                0,
                0,
                zlib.crc32(data),
                len(data),
                len(data),
                len(name),
                0,
            )
            + name
            + data
        )
        return at

    def central(name: bytes, data: bytes, at: int) -> None:
        cd.extend(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                *(
                    b"PK\x01\x02",
                    20,
                    20,
                    0,
                    0,
                    0,
                    0,
                    zlib.crc32(data),
                    len(data),
                    len(data),
                    len(name),
                    0,
                    0,
                    0,
                    0,
                    0,
                    at,
                ),
            )
            + name
        )

    shared = local(b"archive/shared", small)
    for i in range(count):
        central(b"archive/d%07d.pkl" % i, small, shared)
    central(b"archive/data.pkl", last, local(b"archive/data.pkl", last))
    n = count + 1
    cd_at = len(out)
    return bytes(out + cd + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), cd_at, 0))


def test_a_zip_of_many_tricky_members_ends_at_the_record_limit_but_still_walks_data_pkl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 300,000 central directory entries, each pointing at one shared local header under
    # another name: one finding per entry and one walk per member (1M entries, ~1.3 GB and
    # half a minute); past the record limit only the member torch unpickles is still walked
    monkeypatch.setattr(walker, "MAX_RECORDS", 2_000)
    evil = b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R."
    scan = scan_file(_write(tmp_path, "many.pt", _zip_of_many_members(10_000, evil)))
    assert len(scan.findings) < 3_000 and len(scan.pickles) < 3_000
    assert any("records; the other members were not scanned" in m for m in _limit_findings(scan))
    assert any(g.qualname == "os.system" and g.member == "archive/data.pkl" for g in scan.globals)


def _overlapping_bombs_then(count: int, megabytes: int, last: bytes) -> bytes:
    """``count`` directory entries ``archive/xNNNNN.pkl`` that share one deflated run of zeros
    (``megabytes`` MiB inflated), then ``archive/data.pkl`` holding ``last``."""
    co = zlib.compressobj(1, zlib.DEFLATED, -15)
    comp = b"".join(co.compress(bytes(1 << 20)) for _ in range(megabytes)) + co.flush()
    size = megabytes << 20
    out = bytearray()
    cd = bytearray()

    def local(name: bytes, method: int, crc: int, data: bytes, usize: int) -> int:
        at = len(out)
        head = struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), usize, len(name), 0
        )
        out.extend(head + name + data)
        return at

    def central(name: bytes, method: int, crc: int, csize: int, usize: int, at: int) -> None:
        fields = (b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, csize, usize, len(name), 0, 0, 0, 0, 0, at)
        cd.extend(struct.pack("<4sHHHHHHIIIHHHHHII", *fields) + name)

    bomb = local(b"archive/x.pkl", 8, 0, comp, size)
    for i in range(count):
        central(b"archive/x%05d.pkl" % i, 8, 0, len(comp), size, bomb)
    evil_at = local(b"archive/data.pkl", 0, zlib.crc32(last), last, len(last))
    central(b"archive/data.pkl", 0, zlib.crc32(last), len(last), len(last), evil_at)
    n, cd_at = count + 1, len(out)
    return bytes(out + cd + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), cd_at, 0))


def test_zip_members_sharing_one_bomb_stop_at_the_time_budget_after_data_pkl(tmp_path: Path) -> None:
    # one deflated run of zeros named by many directory entries: each was inflated in full,
    # whatever the time budget (a 1 MB file of 1,000 entries sharing a 1 GiB bomb: ~20
    # minutes); data.pkl, listed last, was walked only after all of them
    evil = b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R."
    p = _write(tmp_path, "shared.pt", _overlapping_bombs_then(40, 128, evil))
    start = time.monotonic()
    scan = scan_file(p, time_budget_s=0.5)
    assert time.monotonic() - start < 3.0
    assert any("time budget exhausted" in m for m in _limit_findings(scan))
    assert any(g.qualname == "os.system" and g.member == "archive/data.pkl" for g in scan.globals)


def test_a_gnu_sparse_header_whose_extension_block_is_missing_is_malformed(tmp_path: Path) -> None:
    # tarfile reads the extension block past the end and indexes the empty result: an
    # IndexError escaped the reader and the CLI printed a traceback
    info = tarfile.TarInfo("pickle")
    info.size, info.type = 0, tarfile.GNUTYPE_SPARSE
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[482] = 1  # isextended: another block of sparse entries follows (it does not)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    p = _write(tmp_path, "sparse.tar", bytes(block))
    with pytest.raises(MalformedInput, match="unreadable tar archive"):
        scan_file(p)
    assert identify(p) == "unknown"


@pytest.mark.parametrize(
    "literal",
    [
        pytest.param(b"I1\x00junk\n", id="INT-with-a-NUL"),  # strtol stops at the NUL
        pytest.param(b"L1\x00junk\n", id="LONG-with-a-NUL"),
        pytest.param(b"F1.5\x00junk\n", id="FLOAT-with-a-NUL"),
        pytest.param(b"I\x00\n", id="INT-of-an-empty-C-string"),  # strtol: no digits, 0
        pytest.param(b"I" + b"7" * 4100 + b"\n", id="INT-of-4100-digits"),  # the limit is 4300
        pytest.param(b"L" + b"7" * 4300 + b"L\n", id="LONG-of-4300-digits"),
        pytest.param(b"L0x1fL\n", id="hexadecimal-LONG"),  # PyLong_FromString, base 0
        pytest.param(b"N" + b"p1\x00x\n" + b"0" + b"g1\x00y\n", id="PUT-and-GET-with-a-NUL"),
    ],
)
def test_a_literal_the_unpickler_reads_does_not_end_the_scan(literal: bytes) -> None:
    # each made the walk fault ("bad integer literal", "integer literal too long", ...) while
    # pickle reads on: the os.system call after it was invisible to the static scan, which
    # reported a MEDIUM parse error instead of a CRITICAL dangerous global
    stream = literal + b"0cos\nsystem\n(S'true'\ntR."
    scan = scan_pickle_bytes(stream)
    assert [g.qualname for g in scan.globals] == ["os.system"]


def test_a_huge_string_constant_is_checked_without_a_copy(tmp_path: Path) -> None:
    # a BINUNICODE8 of 64 MiB: checking its UTF-8 copied it and built the string (for a
    # file-sized one: the file's size twice over, and up to four times that for the string)
    n = 64 << 20
    p = tmp_path / "str.pkl"
    with open(p, "wb") as f:
        f.write(b"\x80\x04\x8d" + struct.pack("<Q", n))
        f.write("\u00e9".encode() * (n // 2))
        f.write(b".")
    peak = _traced_peak(lambda: scan_file(p))
    assert peak < 16 << 20, peak
    with open(p, "r+b") as g:  # a broken character at the very end is still refused
        g.seek(11 + n - 1)
        g.write(b"\xc3")
    assert any("invalid UTF-8" in f.message for f in scan_file(p).findings)


def test_a_global_with_a_long_attribute_chain_is_classified_in_linear_time() -> None:
    # protocol 0 GLOBAL lines have no length limit: every suffix of the dotted path was joined
    # and tested against every dangerous prefix (80 KB of "a.": 5 s; 1 MB: ~15 minutes)
    start = time.monotonic()
    scan = scan_pickle_bytes(b"cx\n" + b"a." * 40_000 + b"b\n)R.")
    assert time.monotonic() - start < 1.0
    assert [g.classification for g in scan.globals] == ["unknown"]
    # the chain is still followed: a dangerous prefix at any depth is found
    deep = scan_pickle_bytes(b"ctorch\n" + b"nn." * 20_000 + b"os.system\n)R.")
    assert [(g.classification, g.called) for g in deep.globals] == [("dangerous", True)]


def test_a_huge_global_name_is_kept_short_in_the_report(tmp_path: Path) -> None:
    # GLOBAL lines have no length limit: a 2 MB module name went into the report whole, three
    # times over (the import list, the finding's message and its evidence)
    p = _write(tmp_path, "name.pkl", b"c" + b"m" * (2 << 20) + b"\nsystem\n)R.")
    scan = scan_file(p)
    assert [len(g.module) < 600 and g.module.endswith("[2097152 characters]") for g in scan.globals] == [True]
    assert all(len(f.message) < 2000 for f in scan.findings)


def test_a_safetensors_header_of_millions_of_values_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    # a 60 MB header of "{}," built 20 million dicts (1.5 GB) three times over (identify,
    # looks_like, check); a remote worker's output was parsed the same way
    body = b'{"a":[' + b"{}," * 5_000_000 + b"{}]}"
    data = struct.pack("<Q", len(body)) + body
    p = _write(tmp_path, "x.safetensors", data)

    def refused() -> None:
        with pytest.raises(MalformedInput, match="JSON values"):
            scan_file(p)

    peak = _traced_peak(refused)
    assert peak < 64 << 20, peak
    assert identify(p) == "safetensors"
    why = _distribute.check_safetensors(p, out_sha=hashlib.sha256(data).hexdigest(), source_sha="0" * 64)
    assert why is not None and "JSON values" in why


def test_a_gnu_sparse_1_0_map_is_not_read(tmp_path: Path) -> None:
    # tarfile reads a sparse 1.0 map (a count, then that many numbers, one per line) into one
    # list: a map of "1\n" lines costs 8 bytes a line and more, 4 GB for a 1 GB archive
    sparse_map = b"25000\n" + b"1\n" * 50_000  # 25,000 (offset, size) pairs
    pax = b"".join(
        f"{len(rec) + len(str(len(rec) + 3)) + 1} {rec}".encode()
        for rec in ("GNU.sparse.major=1\n", "GNU.sparse.minor=0\n", "GNU.sparse.name=pickle\n")
    )
    data = _tar_with_pax(pax, members=("sparse",))
    cut = data.index(b"\x80\x02K\x01.")  # the member's data: the sparse map instead
    data = data[:cut] + sparse_map + b"\0" * (-len(sparse_map) % 512) + b"\0" * 1024
    with pytest.raises(MalformedInput, match="sparse"):
        tar_archive.members(data)


def test_an_old_gnu_sparse_member_with_extension_blocks_is_not_read(tmp_path: Path) -> None:
    # each extension block adds 21 (offset, size) entries to one list and may chain another:
    # about five times the archive's size in memory
    info = tarfile.TarInfo("pickle")
    info.size, info.type = 0, tarfile.GNUTYPE_SPARSE
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[482] = 1  # isextended
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    entry = b"%011o\0%011o\0" % (1, 1)
    extension = bytearray(entry * 21 + b"\0" * (512 - 24 * 21))
    extension[504] = 1  # and another one follows
    last = bytearray(extension)
    last[504] = 0
    data = bytes(block) + bytes(extension) * 2_000 + bytes(last) + b"\0" * 1024
    with pytest.raises(MalformedInput, match="sparse"):
        tar_archive.members(data)
