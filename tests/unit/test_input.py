"""Stage 0 (sandbox._input): the input is opened read-only as what it is, non-checkpoints are
refused from their first bytes, and a file the sandbox's uid could write is never handed over."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest

from sandbox import _image, _input
from sandbox.errors import InputNotFound, TruncatedInput, UnsupportedFormat


def test_open_input_gives_a_read_only_descriptor_of_the_real_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"\x80\x02N.")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    real, fd = _input.open_input(link)
    try:
        assert real == str(target)
        assert os.fstat(fd).st_ino == target.stat().st_ino
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_open_input_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(InputNotFound):
        _input.open_input(path)


def test_a_file_the_sandbox_could_write_is_replaced_by_a_private_copy(tmp_path: Path) -> None:
    """Through ``/proc/self/fd`` the sandbox's uid could reopen a world-writable input for
    writing and change what the host then verifies: it gets an unlinked read-only copy."""
    path = tmp_path / "shared.pt"
    path.write_bytes(b"\x80\x02N." * 1000)
    path.chmod(0o666)
    _, fd = _input.open_input(path)
    try:
        st = os.fstat(fd)
        assert st.st_ino != path.stat().st_ino and st.st_nlink == 0
        assert not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        assert os.pread(fd, 8000, 0) == path.read_bytes()
    finally:
        os.close(fd)
    owned = tmp_path / "owned.pt"
    owned.write_bytes(b"\x80\x02N.")
    os.chown(owned, _image.SANDBOX_UID, -1) if os.geteuid() == 0 else None
    _, fd = _input.open_input(owned)
    try:
        assert (os.fstat(fd).st_ino != owned.stat().st_ino) == (os.geteuid() == 0)
    finally:
        os.close(fd)


def refuse_non_checkpoint(path: Path) -> None:
    """:func:`_input.refuse_non_checkpoint` on a read-only descriptor of ``path``, closed after."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _input.refuse_non_checkpoint(fd, path)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "head", [b"\x00" * 600, b"\xff\xd8\xff\xe0JFIF", b"#!/bin/sh\n" * 10, b'{"not": "a checkpoint"}']
)
def test_non_checkpoints_are_refused_from_their_first_bytes(tmp_path: Path, head: bytes) -> None:
    """(A first byte that is a pickle opcode passes: the static stage judges those.)"""
    path = tmp_path / "x.bin"
    path.write_bytes(head)
    with pytest.raises(UnsupportedFormat):
        refuse_non_checkpoint(path)


@pytest.mark.parametrize(
    "head",
    [
        b"PK\x03\x04",
        b"\x93NUMPY",
        b"\x80\x02",
        b"(lp0\n",
        b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":1}',
        b"\x00" * 257 + b"ustar",
    ],
)
def test_every_loadable_header_passes(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(head + b"\x00" * 300)
    refuse_non_checkpoint(path)


def test_empty_input_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(TruncatedInput):
        refuse_non_checkpoint(path)


def test_hasher_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        before = _input.identity(fd)
        assert _input.Hasher(fd).result() == hashlib.sha256(data).hexdigest()
        with open(path, "r+b") as f:
            f.write(b"x")
        assert _input.identity(fd) != before
    finally:
        os.close(fd)


def test_file_objects_become_paths_and_text_mode_is_refused() -> None:
    with _input.as_path(io.BytesIO(b"\x80\x02N.")) as p:
        assert Path(p).read_bytes() == b"\x80\x02N."
    gone = Path(p)
    assert not gone.exists()
    with pytest.raises(TypeError), _input.as_path(io.StringIO("x")):
        pass
    with pytest.raises(TypeError), _input.as_path(42):
        pass


def _records(tmp_path: Path) -> tuple[Path, bytes, dict[str, tuple[int, int]]]:
    data = os.urandom(5000)
    path = tmp_path / "records.bin"
    path.write_bytes(data)
    # two records with bytes before, between and after them
    return path, data, {"b": (3000, 4100), "a": (100, 2048)}


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 20])
def test_prefetch_reads_each_record_once_and_hashes_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    path, data, spans = _records(tmp_path)
    monkeypatch.setattr(_input.Prefetch, "CHUNK", chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        pre = _input.Prefetch(fd, spans)
        assert pre.result() == hashlib.sha256(data).hexdigest()
        got = pre.buffers()
        assert got is not None and set(got) == {"a", "b"}
        for key, (lo, hi) in spans.items():
            start, buf = got[key]
            assert start == lo and bytes(buf.numpy()) == data[lo:hi]
        pre.release()
        assert pre.buffers() is None
    finally:
        os.close(fd)


def test_prefetch_of_a_file_shorter_than_its_records_gives_no_buffers(tmp_path: Path) -> None:
    """A file that ends inside a record (it shrank since it was placed): the hash is of what is
    there, and no record's bytes are handed out half read."""
    path, data, spans = _records(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        pre = _input.Prefetch(fd, {**spans, "c": (4900, 6000)})
        assert pre.result() == hashlib.sha256(data).hexdigest()
        assert pre.buffers() is None
        pre = _input.Prefetch(fd, {"far": (9000, 9100)})  # past the end, after a gap
        assert pre.result() == hashlib.sha256(data).hexdigest() and pre.buffers() is None
    finally:
        os.close(fd)


def test_prefetch_refuses_overlapping_records(tmp_path: Path) -> None:
    path, _data, _spans = _records(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="overlapping"):
            _input.Prefetch(fd, {"a": (0, 100), "b": (50, 200)})
    finally:
        os.close(fd)


def test_a_prefetch_that_fails_midway_gives_no_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails part of the way (any error) must not leave the digest of the part that
    was read to pass for the file's."""
    path, _data, spans = _records(tmp_path)
    monkeypatch.setattr(_input.Prefetch, "CHUNK", 1000)
    calls = iter(range(100))
    real = _input.pread_full

    def flaky(fd: int, view: memoryview, pos: int) -> int:
        if next(calls) == 2:
            raise ValueError("a bug, not an OSError")
        return real(fd, view, pos)

    monkeypatch.setattr(_input, "pread_full", flaky)
    fd = os.open(path, os.O_RDONLY)
    try:
        pre = _input.Prefetch(fd, spans)
        with pytest.raises(OSError, match="a bug"):
            pre.result()
        assert pre.buffers() is None
    finally:
        os.close(fd)
