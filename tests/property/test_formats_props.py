"""Property tests for the container readers of ``sandbox._formats``: bounded inflation returns
exactly the bytes (up to the cap) whatever the cap, the step and the stream; the tar reader
takes any pax header to members or ``MalformedInput``, quickly; the SafeTensors byte count
agrees with the plain product wherever that is within the limit."""

from __future__ import annotations

import gzip
import io
import math
import tarfile
import time
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox._formats import compressed, pickle_ops, safetensors_header, tar_archive, zip_archive
from sandbox._formats.zip_archive import ZipEntry
from sandbox.errors import MalformedInput

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# runs of a few bytes repeated: streams that inflate in many bounded steps with output held back
_DATA = st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 40_000)), max_size=6).map(
    lambda parts: b"".join(chunk * n for chunk, n in parts)
)


@SETTINGS
@given(_DATA, st.integers(0, 300_000), st.integers(1, 1 << 16), st.integers(1, 9))
def test_inflating_a_member_gives_exactly_its_first_bytes(
    data: bytes, cap: int, step: int, level: int
) -> None:
    co = zlib.compressobj(level, zlib.DEFLATED, -15)
    raw = co.compress(data) + co.flush()
    entry = ZipEntry(0, b"m", 0, 8, zlib.crc32(data), len(raw), len(data), 0, data_start=0)
    old = zip_archive.INFLATE_STEP
    zip_archive.INFLATE_STEP = step
    try:
        got, over = zip_archive.read_member(raw, entry, cap, "m")
    finally:
        zip_archive.INFLATE_STEP = old
    assert bytes(got) == data[:cap] and over == (len(data) > cap)


@SETTINGS
@given(_DATA, st.integers(0, 300_000), st.sampled_from(["zlib", "gzip"]), st.integers(1, 3))
def test_decompressing_gives_exactly_the_first_bytes(data: bytes, cap: int, kind: str, members: int) -> None:
    packed = zlib.compress(data) if kind == "zlib" else gzip.compress(data) * members
    whole = data if kind == "zlib" else data * members
    got, capped = compressed.decompress(packed, kind, cap, math.inf)
    assert bytes(got) == whole[:cap] and capped == (len(whole) > cap)


_PAX_VALUE = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@st.composite
def _pax_headers(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Well-formed records, possibly damaged (lengths off by some, digits, junk, NULs), and
    whether they were."""
    body = b""
    damaged = False
    for key, value in draw(
        st.lists(
            st.tuples(st.sampled_from(["path", "comment", "mtime", "hdrcharset", "x"]), _PAX_VALUE),
            max_size=4,
        )
    ):
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        off = draw(st.sampled_from([0, 0, 0, -1, 1, -5]))
        damaged |= off != 0
        body += str(n + off).encode() + rec
    if draw(st.booleans()):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"1" * 40, b"\0", b"=", b" ", b"\n", b"9" * 5])) + body[at:]
        damaged = True
    return body, damaged


@SETTINGS
@given(_pax_headers())
def test_any_pax_header_reads_or_is_refused_quickly(case: tuple[bytes, bool]) -> None:
    pax, damaged = case
    out = io.BytesIO()
    head = tarfile.TarInfo("././@PaxHeader")
    head.size, head.type = len(pax), tarfile.XHDTYPE
    out.write(head.tobuf(format=tarfile.USTAR_FORMAT) + pax + b"\0" * (-len(pax) % 512))
    body = b"\x80\x02N."
    info = tarfile.TarInfo("pickle")
    info.size = len(body)
    out.write(info.tobuf(format=tarfile.USTAR_FORMAT) + body + b"\0" * (512 - len(body)) + b"\0" * 1024)
    start = time.monotonic()
    try:
        found = tar_archive.members(out.getvalue())[0]
    except MalformedInput:
        assert damaged  # what tarfile writes is never refused
    else:
        assert damaged or "pickle" in found or b"path=" in pax
    assert time.monotonic() - start < 1.0


@SETTINGS
@given(st.lists(st.integers(0, 2**64), max_size=8), st.integers(1, 16), st.integers(0, 2**70))
def test_byte_count_is_the_product_within_the_limit(shape: list[int], size: int, limit: int) -> None:
    product = size * math.prod(shape)
    expected = product if product <= limit else None
    assert safetensors_header.byte_count(shape, size, limit) == expected


@SETTINGS
@given(
    st.lists(
        st.sampled_from(
            [
                b"a",
                b"\xc3\xa9",
                b"\xe2\x82\xac",
                b"\xf0\x9f\x98\x80",
                b"\xed\xa0\x80",
                b"\xc3",
                b"\xff",
                b"\x80",
            ]
        ),
        max_size=40,
    ),
    st.integers(1, 7),
)
def test_checking_text_in_chunks_agrees_with_decoding_it(parts: list[bytes], chunk: int) -> None:
    data = b"".join(parts)
    try:
        pickle_ops.text(data, (0, len(data)))
        whole = True
    except pickle_ops.Invalid:
        whole = False
    try:
        pickle_ops.check_text(data, (0, len(data)), chunk)
        chunked = True
    except pickle_ops.Invalid:
        chunked = False
    assert chunked == whole
