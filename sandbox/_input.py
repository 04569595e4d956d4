"""Stage 0, host: the input, before anything reads it whole.

A regular, readable file opened read-only (the descriptor is what the sandbox gets; a file the
sandbox's uid could write is replaced by a private 0444 copy first); refused from its first
bytes when no loader could take it; identified by inode, size and times so a swap under the
sandbox is noticed; hashed in a thread beside the other stages. Also: file objects staged to a
private file, and the sweep of work directories a killed process left behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickletools
import queue
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from . import _image
from ._channel import WORK_PREFIX
from ._worker import _protocol as P
from .errors import InputNotFound, TruncatedInput, UnsupportedFormat

__all__ = ["Hasher", "as_path", "identity", "open_input", "refuse_non_checkpoint", "sweep_work_dirs"]


def open_input(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(real path, read-only descriptor) of a regular, readable input. The descriptor is what
    the sandbox gets: no path of the host is mounted, nothing is copied."""
    p = os.path.realpath(os.fspath(path))
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputNotFound(f"cannot open {os.fspath(path)!r}: {exc.strerror}", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputNotFound(f"{os.fspath(path)!r} is not a regular file", path=path)
    os.set_blocking(fd, True)
    if _sandbox_may_write(st):
        fd = _private_copy(fd)
    return p, fd


_PICKLE_OPCODES = frozenset(op.code.encode("latin-1") for op in pickletools.opcodes)


_MAGICS = (
    b"PK\x03\x04",
    b"\x93NUMPY",
    # a compressed joblib archive: gzip, lz4 frame, bz2, xz (zlib: checked below)
    b"\x1f\x8b\x08",
    b"\x04\x22\x4d\x18",
    b"BZh",
    b"\xfd7zXZ\x00",
)


def refuse_non_checkpoint(fd: int, path: str | os.PathLike[str]) -> None:
    """Refuse, from the first bytes alone, an input that no loader could take: not a zip, a
    numpy file, a tar archive, a pickle or a compressed stream (a file of zeros, a text file,
    an image). A 20 GB file of zeros is refused at once instead of being hashed and loaded."""
    head = os.pread(fd, 512, 0)
    if not head:
        raise TruncatedInput(f"{os.fspath(path)!r} is empty", path=path)
    if head.startswith(_MAGICS) or head[257:262] == b"ustar" or head[:1] in _PICKLE_OPCODES:
        return
    if len(head) >= 2 and head[0] == 0x78 and int.from_bytes(head[:2], "big") % 31 == 0:
        return  # a zlib stream (joblib.dump(compress=...)'s default)
    if len(head) >= 9 and head[8:9] == b"{":  # SafeTensors: the static stage says so clearly
        return
    raise UnsupportedFormat(
        f"{os.fspath(path)!r} is not a checkpoint: its first bytes are not "
        "a zip, numpy, tar, pickle or compressed-stream header",
        path=path,
        detected="unknown",
    )


def identity(fd: int) -> tuple[int, int, int, int]:
    """(inode, size, mtime, ctime) of the open input: any write to the file changes it."""
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Hasher:
    """sha256 of the input in a thread (hashlib releases the GIL): the static scan and the
    sandbox run meanwhile. :meth:`result` waits for it and re-raises its error."""

    def __init__(self, fd: int) -> None:
        self._digest: str | None = None
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(fd,), name="model-sandbox-hash", daemon=True)
        self._thread.start()

    def _run(self, fd: int) -> None:
        try:
            self._digest = P.sha256_fd(fd)[0]
        except OSError as exc:
            self._error = exc

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


class Prefetch:
    """The input read once, in file order, beside the sandbox: the bytes of each storage record
    that a plain state dict's tensors lie in (``spans``: key -> ``[lo, hi)``, from the host's own
    placement of them, see :func:`._convert.layout_spans`) go straight into memory of their own
    (the tensors' storage, if the sandbox's layout then agrees), the bytes between them into
    scratch buffers; a second thread hashes every byte in the same order, each chunk just after
    it was read, while it is still in the cache. One pass over the file instead of two (a hash,
    then a copy once the sandbox has answered), started before the sandbox answers.

    :meth:`result` is the sha256 of the whole file, as :class:`Hasher`'s (to its end, wherever
    that is by then); :meth:`buffers` the records' bytes, or ``None`` where the file ended before
    the last of them (the caller then reads them itself, and finds that the file shrank)."""

    CHUNK = 4 << 20  # read and hashed in pieces this size: a few of them stay in the cache

    def __init__(self, fd: int, spans: dict[str, tuple[int, int]]) -> None:
        import torch

        self._fd = fd
        self._segments = sorted((lo, hi, key) for key, (lo, hi) in spans.items() if hi > lo)
        if any(b[0] < a[1] for a, b in zip(self._segments, self._segments[1:], strict=False)):
            raise ValueError("overlapping records")  # not what try_place accepts: hash only
        self._buffers = {key: torch.empty(hi - lo, dtype=torch.uint8) for lo, hi, key in self._segments}
        self._complete = False
        self._digest: str | None = None
        self._error: OSError | None = None
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=4)
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(6):
            self._free.put(bytearray(self.CHUNK))
        self._reader = threading.Thread(target=self._read, name="model-sandbox-prefetch", daemon=True)
        self._hasher = threading.Thread(target=self._hash, name="model-sandbox-hash", daemon=True)
        self._hasher.start()
        self._reader.start()

    def _read(self) -> None:
        pos = 0
        try:
            for lo, hi, key in self._segments:
                if not self._scratch(pos, lo):
                    return
                view = memoryview(self._buffers[key].numpy().data).cast("B")
                for at in range(lo, hi, self.CHUNK):
                    piece = view[at - lo : min(hi, at + self.CHUNK) - lo]
                    got = pread_full(self._fd, piece, at)
                    if got:
                        self._queue.put(piece[:got])
                    if got < len(piece):
                        return  # the file ends early: what was read is hashed; no buffers
                pos = hi
            self._complete = True
            self._scratch(pos, None)  # the rest, to the end of the file
        except Exception as exc:  # no digest of part of the file may pass for the file's
            self._error = exc if isinstance(exc, OSError) else OSError(f"reading the input: {exc!r}")
            self._complete = False
        finally:
            self._queue.put(None)

    def _scratch(self, pos: int, end: int | None) -> bool:
        """Bytes ``pos`` to ``end`` (``None``: the end of the file) through the scratch buffers,
        to the hash only; False where the file ended before ``end``."""
        while end is None or pos < end:
            buf = self._free.get()
            want = self.CHUNK if end is None else min(self.CHUNK, end - pos)
            got = pread_full(self._fd, memoryview(buf)[:want], pos)
            if got:
                self._queue.put(memoryview(buf)[:got])
            else:
                self._free.put(buf)
            if got < want:
                return end is None
            pos += got
        return True

    def _hash(self) -> None:
        h = hashlib.sha256()
        while (piece := self._queue.get()) is not None:
            h.update(piece)
            if isinstance(piece.obj, bytearray):
                self._free.put(piece.obj)
            piece.release()
        self._digest = h.hexdigest()

    def result(self) -> str:
        self._hasher.join()
        self._reader.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def release(self) -> None:
        """Gives the records' memory back once they are read (the hash goes on)."""
        self._reader.join()
        self._complete = False
        self._buffers = {}

    def buffers(self) -> dict[str, tuple[int, Any]] | None:
        """Each record's first byte and its bytes (a uint8 tensor), once all are read; None
        where the file ended early or a read failed."""
        self._reader.join()
        if not self._complete:
            return None
        return {key: (lo, self._buffers[key]) for lo, _hi, key in self._segments}


def pread_full(fd: int, view: memoryview, pos: int) -> int:
    """Reads into all of ``view`` from ``pos``; fewer bytes only at the end of the file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], pos + got)
        if n <= 0:
            break
        got += n
    return got


def _sandbox_may_write(st: os.stat_result) -> bool:
    """Whether the sandbox's uid could reopen the file for writing through its descriptor
    (``/proc/self/fd``)."""
    return _may_write(st, _image.SANDBOX_UID, {_image.SANDBOX_UID})


def _may_write(st: os.stat_result, uid: int, gids: set[int]) -> bool:
    """Whether ``uid`` (in groups ``gids``) may write the file, now or after a ``fchmod``:
    world-writable, owned by ``uid`` (whatever the mode: its owner may change it), or
    group-writable by one of ``gids``."""
    return bool(
        st.st_mode & stat.S_IWOTH or st.st_uid == uid or (st.st_mode & stat.S_IWGRP and st.st_gid in gids)
    )


def for_sandbox(fd: int, runner_name: str) -> int:
    """The descriptor the sandbox gets for the input ``fd``: ``fd`` itself, or a private,
    read-only copy where the loader would run as this process's own uid (bubblewrap started by
    a user other than root: no uid of its own to drop to) and that uid may write the file. A
    loader that reopened the input through ``/proc/self/fd`` (past the monitor, in a race on
    the path it checks) could otherwise change the user's file."""
    if runner_name != "bwrap":
        return fd
    from ._bwrap import host_root

    if host_root() or not _may_write(os.fstat(fd), os.geteuid(), {os.getegid(), *os.getgroups()}):
        return fd
    return _private_copy(os.dup(fd))


def _private_copy(fd: int) -> int:
    """A read-only, already unlinked copy of ``fd``'s file (closes ``fd``): what the sandbox
    gets instead of a file it could modify."""
    try:
        tmp = tempfile.TemporaryFile(prefix=f"{WORK_PREFIX}{os.getpid()}-in-")
        with os.fdopen(fd, "rb") as src:
            src.seek(0)
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.flush()
        os.fchmod(tmp.fileno(), 0o444)
        out = os.dup(tmp.fileno())
        tmp.close()
        return out
    except OSError as exc:
        raise InputNotFound(f"cannot stage a private copy of the input: {exc.strerror}") from None


_swept = False


def sweep_work_dirs() -> None:
    """Once per process: remove work directories whose process is gone (one killed with
    SIGKILL cannot clean up its channel directories)."""
    global _swept
    if _swept:
        return
    _swept = True
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(WORK_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(WORK_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def as_path(f: Any) -> Iterator[str | os.PathLike[str]]:
    """torch.load accepts paths and binary file objects; the sandbox mounts a file."""
    if isinstance(f, (str, os.PathLike)):
        yield f
        return
    if not hasattr(f, "read"):
        raise TypeError(f"expected a path or a binary file object, got {type(f).__name__}")
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-in-") as tmp_dir:
        tmp = os.path.join(tmp_dir, "input")
        with open(tmp, "wb") as out:
            while chunk := f.read(1 << 20):
                if isinstance(chunk, str):
                    raise TypeError("the file object must be opened in binary mode")
                out.write(chunk)
        os.chmod(tmp, 0o644)  # inside a 0700 directory: readable by the sandbox's mount only
        yield tmp
