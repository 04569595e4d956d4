"""The container readers shared by the static scan and the host's verification
(sandbox._formats), and the one opcode decoder both interpreters drive."""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest

from sandbox._formats import compressed, npy, pickle_ops, zip_archive
from sandbox._formats.buffer import open_buffer, sha256_region
from sandbox.errors import MalformedInput

_SAMPLES: list[object] = [
    {"a": 1, "b": [1.5, -2, 2**70, -(2**600)], "c": ("x" * 300, b"\x00\xff" * 200, None)},
    OrderedDict(w=[True, False, "\u00e9\ud800"], z=bytearray(b"ab")),
    [frozenset({1, 2}), {3, 4}, complex(1, 2), 10**100],
]


def _decoded(data: bytes) -> list[tuple[int, object]]:
    """(opcode, argument as pickletools shows it) for every opcode, through the decoder."""
    out: list[tuple[int, object]] = []
    pos = 0
    while True:
        op, arg, pos = pickle_ops.step(data, pos, len(data))
        if (
            isinstance(arg, tuple)
            and len(arg) == 2
            and all(isinstance(x, int) for x in arg)
            and op not in (0x63, 0x69)
        ):
            raw = data[arg[0] : arg[1]]
            arg = (
                pickle_ops.text(data, arg)
                if op in (0x58, 0x8C, 0x8D)
                else (raw.decode("latin-1") if op in (0x54, 0x55) else raw)
            )
        elif op in (0x63, 0x69):
            arg = f"{arg[0]} {arg[1]}"
        out.append((op, arg))
        if op == 0x2E:
            return out


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("sample", range(len(_SAMPLES)))
def test_decoder_reads_every_argument_as_pickletools_does(protocol: int, sample: int) -> None:
    data = pickle.dumps(_SAMPLES[sample], protocol=protocol)
    expected: list[tuple[int, object]] = []
    for opcode, arg, _ in pickletools.genops(data):
        code = opcode.code.encode("latin-1")[0]
        if code in (0x8A, 0x8B) and isinstance(arg, int) and (arg.bit_length() + 8) // 8 > 64:
            arg = pickle_ops.BIG_INT
        if code == 0x96 and isinstance(arg, (bytes, bytearray)):
            arg = bytes(arg)
        expected.append((code, arg))
    assert _decoded(data) == expected


def test_decoder_faults_carry_the_opcode_offset() -> None:
    data = b"\x80\x02X\xff\x00\x00\x00abc"  # BINUNICODE claims 255 bytes
    op, _, pos = pickle_ops.step(data, 0, len(data))
    assert op == 0x80
    with pytest.raises(pickle_ops.Truncated) as info:
        pickle_ops.step(data, pos, len(data))
    assert info.value.offset == -1
    assert pickle_ops.at(info.value, pos).offset == pos == 2
    with pytest.raises(pickle_ops.Invalid, match="invalid opcode 0xff"):
        pickle_ops.step(b"\xff", 0, 1)
    with pytest.raises(pickle_ops.Invalid, match="unsupported pickle protocol"):
        pickle_ops.step(b"\x80\x09", 0, 2)
    with pytest.raises(pickle_ops.Invalid, match="global name is not UTF-8"):
        pickle_ops.step(b"c\xff\nx\n", 0, 5)


def test_zip_reader_caps_what_it_inflates(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("arch/data.pkl", b"x" * 100_000)
        z.writestr("arch/data/0", b"y" * 10)
    with open_buffer(path) as buf:
        found = zip_archive.find_zip(buf)
        assert found is not None
        entries = found.entries
        assert zip_archive.torch_target(entries)[0] == "arch/data.pkl"
        data, over = zip_archive.read_member(buf, entries[0], 1000, "arch/data.pkl")
        assert (data, over) == (b"x" * 1000, True)
        data, over = zip_archive.read_member(buf, entries[0], 1 << 20, "arch/data.pkl")
        assert (len(data), over) == (100_000, False)
        assert not entries[0].bomb


def test_npy_header_and_compression_readers() -> None:
    import numpy as np

    raw = io.BytesIO()
    np.save(raw, np.zeros((2, 3), dtype="<f4"))
    header, start = npy.header(raw.getvalue(), 0, len(raw.getvalue()), "x.npy")
    assert header["shape"] == (2, 3) and start % 16 == 0
    assert not npy.descr_has_object(header["descr"])
    assert npy.descr_has_object([("a", "<f4"), ("b", "|O")])
    assert npy.itemsize("<U5") == 20 and npy.itemsize("?") == 1
    with pytest.raises(MalformedInput):
        npy.header(b"\x93NUMPY\x09\x00", 0, 8, "bad.npy")
    import zlib

    packed = zlib.compress(b"p" * 10_000)
    assert compressed.detect(packed) == "zlib"
    data, capped = compressed.decompress(packed, "zlib", 100, float("inf"))
    assert (data, capped) == (b"p" * 100, True)


@pytest.mark.parametrize("kind", ["lz4", "bz2", "xz"])
def test_inflating_a_stub_of_a_stream_allocates_nothing_near_the_cap(kind: str) -> None:
    """Four bytes of an LZ4 frame once made lz4 allocate the whole cap (a GiB) up front: each
    call's output is bounded, so a stub costs kilobytes whatever the cap."""
    import bz2
    import lzma
    import time
    import tracemalloc

    import lz4.frame

    whole = {"lz4": lz4.frame.compress, "bz2": bz2.compress, "xz": lzma.compress}[kind](b"x" * 4096)
    tracemalloc.start()
    try:
        for stub in (whole[:4], whole[:12], whole):
            with contextlib.suppress(MalformedInput):
                compressed.decompress(stub, kind, 1 << 30, time.monotonic() + 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def _resident_bytes_of(path: Path) -> int:
    """How much of the mappings of ``path`` is resident in this process (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def test_a_region_is_hashed_from_the_file_without_touching_the_map(tmp_path: Path) -> None:
    """``sha256_region`` gives the region's digest at any offset and length (one chunk, many,
    a partial last one) and reads it through the file: the map's pages stay out of the
    resident set. A file that shrank under the map is an error, not a bus error."""
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * (12 << 12) + b"tail"  # 12 MiB and 4 bytes
    path.write_bytes(data)
    with open_buffer(path) as buf:
        for begin, end in [(0, len(data)), (1000, len(data) - 3), (5, 6), (7, 7), (1 << 20, 2 << 20)]:
            want = hashlib.sha256(data[begin:end]).hexdigest()
            assert sha256_region(buf, begin, end) == want
            assert sha256_region(data, begin, end) == want  # bytes: hashed in place
        assert _resident_bytes_of(path) < 1 << 20
        with open(path, "r+b") as f:
            f.truncate(1 << 20)
        with pytest.raises(MalformedInput, match="shrank"):
            sha256_region(buf, 0, len(data))
