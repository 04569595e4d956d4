"""Host helpers for the files the tool writes and hashes: one sha256 of a file, one atomic
replace (temporary file beside the target, fsync, rename, fsync of the directory)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, overload

from ._worker import _protocol as P

__all__ = ["atomic_stream", "atomic_write", "fsync_dir", "fsync_path", "sha256_file"]


def sha256_file(path: str) -> tuple[str, int]:
    """(hex sha256, size) of the file at ``path``: the same helper the worker uses."""
    return P.sha256_file(path)


@overload
def atomic_stream(dst: Path, head: bytes, body: Callable[[int], None], *, sha256: Literal[True]) -> str: ...
@overload
def atomic_stream(
    dst: Path, head: bytes, body: Callable[[int], None], *, sha256: Literal[False] = False
) -> None: ...
def atomic_stream(dst: Path, head: bytes, body: Callable[[int], None], *, sha256: bool = False) -> str | None:
    """``head`` then whatever ``body`` writes, to a temporary file beside ``dst``, fsynced and
    renamed into place. ``sha256=True``: returns the sha256 of the file written, read back from
    the temporary file while the fsync waits for the disk (a converted file's digest)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    sha = None
    try:
        try:
            P.write_all(fd, head)
            body(fd)
            if sha256:
                with concurrent.futures.ThreadPoolExecutor(1, "model-sandbox-hash") as hashing:
                    digest = hashing.submit(P.sha256_fd, fd)
                    os.fsync(fd)
                sha = digest.result()[0]
            else:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return sha


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    atomic_stream(path, data, lambda fd: None)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_path(str(path))
