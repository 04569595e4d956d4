"""The host's end of the channel across the sandbox boundary (see ``_worker/_protocol``).

One :class:`Channel` per sandbox: a ``SOCK_SEQPACKET`` unix socket in a private directory that
the container sees read-only. The host accepts exactly one connection -- the supervisor's, which
must come from the container's PID 1 -- and then removes the socket file, so nothing else in the
sandbox can ever connect. The input goes in as a read-only descriptor; outputs come back as
sealed memfds and bounded frames. Everything received is untrusted: frame sizes, descriptor
counts, seals and sizes are checked as it is read, and any breach of the protocol ends the
conversation (a :attr:`Received.violations` entry, never an exception that loses the evidence
received so far).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import time
from dataclasses import dataclass, field

from ._worker import _protocol as P
from .errors import EngineError

WORK_PREFIX = "model-sandbox-work-"
_OUTPUT_CAPS = {"manifest": P.MAX_JSON_BYTES}


@dataclass
class Received:
    """What the supervisor sent for one job, checked frame by frame."""

    status: bytes | None = None
    # appended to in place: ``bytes +=`` copied all kept events on every frame (16 MiB of 1 KiB
    # frames: 128 GB of copying, the host's CPU spent until the deadline)
    events: bytearray = field(default_factory=bytearray)
    events_dropped: int = 0
    outputs: dict[str, int] = field(default_factory=dict)  # name -> sealed memfd (owned here)
    completed: bool = False  # the supervisor's DONE frame arrived
    closed: bool = False  # the supervisor's end closed (it exited)
    violations: list[str] = field(default_factory=list)
    # an inline output being received (gVisor): (name, the host's own memfd, bytes still due)
    pending: tuple[str, int, int] | None = None

    def close(self) -> None:
        for fd in self.outputs.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.outputs.clear()
        if self.pending is not None:
            with contextlib.suppress(OSError):
                os.close(self.pending[1])
            self.pending = None


def _inline(got: Received, out: P.Output, cap: int) -> str | None:
    """An inline output announced (gVisor): its bytes follow as CHUNK frames, written into a
    memfd the host creates; its size is checked against the cap before any byte is taken."""
    if out.size > cap:
        return f"the {out.name} output is larger than its cap ({out.size:,} > {cap:,} bytes)"
    fd = P.memfd_create(f"inline-{out.name}")
    got.pending = (out.name, fd, out.size)
    return _chunk(got, b"") if out.size == 0 else None


def _chunk(got: Received, data: bytes) -> str | None:
    """Bytes of the pending inline output; sealed and kept once complete."""
    if got.pending is None:
        return "a CHUNK frame without an inline output"
    name, fd, due = got.pending
    if len(data) > due:
        return f"the inline {name} output is longer than announced"
    try:
        if data:
            os.write(fd, data)
    except OSError as exc:
        return f"the inline {name} output could not be kept: {exc.strerror}"
    due -= len(data)
    got.pending = (name, fd, due)
    if due:
        return None
    got.pending = None
    try:
        fcntl.fcntl(fd, P.F_ADD_SEALS, P.OUTPUT_SEALS)
    except OSError as exc:
        os.close(fd)
        return f"the inline {name} output could not be sealed: {exc.strerror}"
    got.outputs[name] = fd
    return None


def check_memfd(fd: int, declared: int, cap: int) -> str | None:
    """Why ``fd`` is not an acceptable output (None when it is): a memfd, regular, with all
    four seals, of the declared size, within the cap."""
    try:
        st = os.fstat(fd)
        seals = P.memfd_seals(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "not a sealable memfd"
    if not stat.S_ISREG(st.st_mode) or not target.startswith("/memfd:"):
        return "not a memfd"
    if seals & P.OUTPUT_SEALS != P.OUTPUT_SEALS:
        return f"not sealed (seals 0x{seals:x})"
    if st.st_size != declared:
        return f"size {st.st_size} differs from the declared {declared}"
    if st.st_size > cap:
        return f"{st.st_size} bytes, over the {cap} byte cap"
    return None


class Channel:
    """The socket one sandbox's supervisor connects to. Make it before the container starts;
    :attr:`directory` is what the container mounts read-only at ``P.CHANNEL_DIR``."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-ch-")
        # the sandbox's uid must reach the socket: search on the directory, write on the socket
        os.chmod(self.directory, 0o711)  # noqa: S103 - search only; the socket is the one entry
        self.path = os.path.join(self.directory, P.SOCKET_NAME)
        self.listener: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        self.listener.bind(self.path)
        os.chmod(self.path, 0o666)  # noqa: S103 - the only way in is through the 0711 directory
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.peer_pid: int | None = None

    def accept(self, timeout_s: float, expected_pid: int | frozenset[int] | None = None) -> P.Hello:
        """The supervisor's connection and HELLO. Refuses a peer that is not ``expected_pid``
        (the container's PID 1 as the engine reports it, where this host can see it; under
        gVisor, whose gofer makes the connection for the sandbox, a set of both)."""
        assert self.listener is not None
        ready, _, _ = select.select([self.listener], [], [], timeout_s)
        if not ready:
            raise EngineError(f"the sandbox's supervisor did not connect within {timeout_s:g} s")
        conn, _ = self.listener.accept()
        self._stop_listening()
        pid, _uid, _gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        self.peer_pid = pid
        allowed = (
            expected_pid
            if isinstance(expected_pid, frozenset)
            else frozenset({expected_pid} if expected_pid else ())
        )
        if allowed and pid and pid not in allowed and any(os.path.exists(f"/proc/{p}") for p in allowed):
            conn.close()
            raise EngineError(
                f"the channel was reached by process {pid}, not the sandbox's "
                f"supervisor ({', '.join(map(str, sorted(allowed)))}): refused"
            )
        self.conn = conn
        data, fds = self._recv(timeout_s)
        for fd in fds:
            os.close(fd)
        if fds or not data or data[:1] != P.HELLO:
            raise EngineError("the sandbox's supervisor did not say hello")
        try:
            return P.Hello.from_json(data[1:])
        except P.ProtocolError as exc:
            raise EngineError(f"the sandbox's supervisor speaks another protocol: {exc}") from None

    def _stop_listening(self) -> None:
        """No second connection, ever: the listener closes and the socket file goes."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _recv(self, timeout_s: float) -> tuple[bytes, list[int]]:
        """One frame (b"" at the end of the stream). Oversize frames and extra descriptors are
        reported as such by the caller's checks: a truncated frame reads as oversize."""
        assert self.conn is not None
        ready, _, _ = select.select([self.conn], [], [], max(0.0, timeout_s))
        if not ready:
            raise TimeoutError
        try:
            data, fds, flags, _ = socket.recv_fds(self.conn, P.MAX_FRAME + 2, 4, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return b"", []
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            data = data + b"\0" * (P.MAX_FRAME + 2)  # marks it oversize for the caller
        return data, list(fds)

    def send_job(self, job: P.JobConfig, input_fd: int) -> None:
        assert self.conn is not None
        try:
            socket.send_fds(self.conn, [P.frame(P.JOB, job.to_json())], [input_fd])
        except OSError as exc:
            raise EngineError(f"the sandbox went away before it took the job: {exc}") from None

    def collect(self, deadline: float, output_cap: int, *, inline: bool = False) -> Received:
        """Read frames until DONE and the supervisor's close, a violation, or ``deadline``.
        ``inline``: outputs may come as CHUNK frames (under gVisor, which cannot pass
        descriptors); elsewhere an inline output is refused, since its bytes would land in the
        host's memory rather than count against the container's memory limit as a memfd does."""
        got = Received()
        while True:
            try:
                data, fds = self._recv(min(1.0, deadline - time.monotonic()))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    return got
                continue
            if not data:
                got.closed = True
                return got
            problem = self._take(got, data, fds, output_cap, inline)
            if problem:
                got.violations.append(problem)
                got.completed = False  # whatever came before, this conversation is not a result
                self.close()  # the supervisor, seeing the close, ends the load
                return got

    def _take(
        self, got: Received, data: bytes, fds: list[int], output_cap: int, inline_ok: bool = False
    ) -> str | None:
        kind, payload = data[:1], data[1:]
        expected = P.FDS_OF.get(kind, 0)

        def refuse(why: str) -> str:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return why

        if len(payload) > P.MAX_FRAME:
            return refuse("an oversize frame")
        if kind not in (P.EVENTS, P.OUTPUT, P.STATUS, P.DONE, P.CHUNK):
            return refuse(f"an unexpected frame type {kind!r}")
        inline = kind == P.OUTPUT and not fds and b'"inline":true' in payload
        if len(fds) != (0 if inline else expected):
            return refuse(f"{len(fds)} file descriptors with a frame that carries {expected}")
        if got.completed:
            return refuse("a frame after DONE")
        if got.pending is not None and kind != P.CHUNK:
            return refuse(f"the inline {got.pending[0]} output ended early")
        if kind == P.CHUNK:
            return _chunk(got, payload)
        if kind == P.EVENTS:
            room = P.MAX_EVENTS_BYTES - len(got.events)
            if len(payload) <= room:
                got.events += payload
            else:
                got.events_dropped += payload.count(b"\n")
        elif kind == P.STATUS:
            if got.status is not None:
                return refuse("a second status")
            got.status = payload
        elif kind == P.OUTPUT:
            try:
                out = P.Output.from_json(payload)
            except P.ProtocolError as exc:
                return refuse(str(exc))
            if out.name in got.outputs:
                return refuse(f"a second {out.name} output")
            if out.inline != inline:
                return refuse(f"the {out.name} output's document and descriptor disagree")
            if out.inline:
                if not inline_ok:
                    return refuse(f"an inline {out.name} output where descriptors pass")
                return _inline(got, out, _OUTPUT_CAPS.get(out.name, output_cap))
            why = check_memfd(fds[0], out.size, _OUTPUT_CAPS.get(out.name, output_cap))
            if why:
                return refuse(f"the {out.name} output is {why}")
            got.outputs[out.name] = fds[0]
        elif kind == P.DONE:
            if got.status is None:
                return refuse("DONE before any status")
            got.completed = True
        return None

    def close(self) -> None:
        self._stop_listening()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
