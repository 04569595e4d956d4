"""The one atomic replace: a reader sees the old file or the new one, never a part; a failure
half-way leaves the old file and no temporary file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sandbox import _files


def test_atomic_write_replaces_and_leaves_nothing_beside(tmp_path: Path) -> None:
    dst = tmp_path / "sub" / "out.bin"
    _files.atomic_write(dst, b"first")
    _files.atomic_write(dst, b"second")
    assert dst.read_bytes() == b"second"
    assert sorted(os.listdir(dst.parent)) == ["out.bin"]


def test_a_failing_body_keeps_the_old_file(tmp_path: Path) -> None:
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")

    def body(fd: int) -> None:
        os.write(fd, b"part of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        _files.atomic_stream(dst, b"head", body)
    assert dst.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C half-way: the same
        _files.atomic_stream(dst, b"head", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt))
    assert os.listdir(tmp_path) == ["out.bin"] and dst.read_bytes() == b"old"


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert _files.sha256_file(str(tmp_path / "f")) == (hashlib.sha256(data).hexdigest(), len(data))


def test_atomic_stream_returns_the_sha256_of_what_it_wrote(tmp_path: Path) -> None:
    """The digest is read back from the file while the fsync runs: it is the file's own."""
    dst = tmp_path / "out.bin"
    chunks = [os.urandom(1 << 20) for _ in range(5)]

    def body(fd: int) -> None:
        for c in chunks:
            os.write(fd, c)

    digest = _files.atomic_stream(dst, b"head", body, sha256=True)
    assert digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(b"head" + b"".join(chunks)).hexdigest()
