"""The host's end of the channel against a supervisor played by the test, over a real socket
with real memfds: every breach of the protocol is refused as it is read, and what was received
before it is kept. (The real supervisor, in a real container, is tested in tests/container.)"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sandbox._channel import Channel, Received
from sandbox._worker import _protocol as P
from sandbox.errors import EngineError

HELLO = P.json_frame(P.HELLO, {"protocol": P.PROTOCOL_VERSION, "pid": 1})
STATUS = P.json_frame(P.STATUS, {"protocol": P.PROTOCOL_VERSION})


def sealed(data: bytes, seal: bool = True) -> int:
    fd = P.memfd_create("out")
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, P.F_ADD_SEALS, P.OUTPUT_SEALS)
    return fd


Play = Callable[[socket.socket], None]


@pytest.fixture
def channel() -> Iterator[Channel]:
    ch = Channel()
    yield ch
    ch.remove()


def converse(ch: Channel, play: Play, *, deadline_s: float = 5.0) -> Received:
    """Connect as the supervisor, say hello, take the job, then ``play``; returns what the
    host's collect made of it."""
    took: list[bytes] = []

    def supervisor() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(ch.path)
        s.send(HELLO)
        data, fds, _, _ = socket.recv_fds(s, P.MAX_FRAME + 1, 2)
        took.append(data)
        for fd in fds:
            os.close(fd)
        try:
            play(s)
        except OSError:
            pass  # the host hung up on us: what the test is about
        s.close()

    t = threading.Thread(target=supervisor)
    t.start()
    hello = ch.accept(5)
    assert hello.protocol == P.PROTOCOL_VERSION
    r, w = os.pipe()
    try:
        ch.send_job(P.JobConfig(), r)
        got = ch.collect(time.monotonic() + deadline_s, output_cap=1 << 20)
    finally:
        os.close(r)
        os.close(w)
        t.join(10)
    assert took and took[0][:1] == P.JOB and P.JobConfig.from_json(took[0][1:]) == P.JobConfig()
    return got


def test_a_complete_conversation(channel: Channel) -> None:
    def play(s: socket.socket) -> None:
        s.send(P.frame(P.EVENTS, b'{"id":1}\n'))
        socket.send_fds(s, [P.json_frame(P.OUTPUT, {"name": "manifest", "size": 2})], [sealed(b"{}")])
        s.send(STATUS)
        s.send(P.frame(P.DONE, b"{}"))

    got = converse(channel, play)
    assert got.completed and got.closed and not got.violations
    assert got.events == b'{"id":1}\n' and got.status is not None
    assert os.pread(got.outputs["manifest"], 10, 0) == b"{}"
    got.close()


def test_a_second_connection_is_refused(channel: Channel) -> None:
    first = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    first.connect(channel.path)
    first.send(HELLO)
    channel.accept(5)
    assert not os.path.exists(channel.path)  # the socket file is gone: nobody else can connect
    second = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(OSError):
        second.connect(channel.path)
    first.close()
    second.close()


def test_no_hello_no_sandbox(channel: Channel) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(channel.path)
    s.send(P.json_frame(P.STATUS, {"protocol": P.PROTOCOL_VERSION}))
    with pytest.raises(EngineError, match="hello"):
        channel.accept(5)
    s.close()


def test_a_peer_that_is_not_the_containers_pid_1_is_refused(channel: Channel) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(channel.path)
    s.send(HELLO)
    with pytest.raises(EngineError, match="not the sandbox's supervisor"):
        channel.accept(5, expected_pid=1)  # pid 1 exists; we are not it
    s.close()


@pytest.mark.parametrize(
    "name,play,why",
    [
        (
            "descriptor with events",
            lambda s: socket.send_fds(s, [P.frame(P.EVENTS, b"x\n")], [sealed(b"x")]),
            "file descriptors",
        ),
        (
            "output without descriptor",
            lambda s: s.send(P.json_frame(P.OUTPUT, {"name": "manifest", "size": 2})),
            "0 file descriptors",
        ),
        (
            "two descriptors",
            lambda s: socket.send_fds(
                s, [P.json_frame(P.OUTPUT, {"name": "manifest", "size": 2})], [sealed(b"{}"), sealed(b"{}")]
            ),
            "2 file descriptors",
        ),
        (
            "unsealed memfd",
            lambda s: socket.send_fds(
                s, [P.json_frame(P.OUTPUT, {"name": "manifest", "size": 2})], [sealed(b"{}", False)]
            ),
            "not sealed",
        ),
        (
            "a pipe for an output",
            lambda s: socket.send_fds(
                s, [P.json_frame(P.OUTPUT, {"name": "tensors", "size": 0})], [os.pipe()[0]]
            ),
            "memfd",
        ),
        (
            "a lying size",
            lambda s: socket.send_fds(
                s, [P.json_frame(P.OUTPUT, {"name": "manifest", "size": 1})], [sealed(b"{}")]
            ),
            "differs from the declared",
        ),
        (
            "over the cap",
            lambda s: socket.send_fds(
                s,
                [P.json_frame(P.OUTPUT, {"name": "tensors", "size": (1 << 20) + 1})],
                [sealed(b"\0" * ((1 << 20) + 1))],
            ),
            "over the",
        ),
        (
            "unknown output",
            lambda s: socket.send_fds(
                s, [P.json_frame(P.OUTPUT, {"name": "../../x", "size": 2})], [sealed(b"{}")]
            ),
            "unknown name",
        ),
        ("oversize frame", lambda s: s.send(P.EVENTS + b"x" * (P.MAX_FRAME + 100)), "oversize"),
        ("unknown frame type", lambda s: s.send(b"Zhello"), "unexpected frame type"),
        ("a second hello", lambda s: s.send(HELLO), "unexpected frame type"),
        ("done before status", lambda s: s.send(P.frame(P.DONE, b"{}")), "DONE before any status"),
        ("two statuses", lambda s: (s.send(STATUS), s.send(STATUS)), "a second status"),
        (
            "a frame after done",
            lambda s: (s.send(STATUS), s.send(P.frame(P.DONE, b"{}")), s.send(P.frame(P.EVENTS, b"late\n"))),
            "after DONE",
        ),
    ],
)
def test_protocol_breaches_are_refused(channel: Channel, name: str, play: Play, why: str) -> None:
    got = converse(channel, play)
    assert not got.completed, name
    assert got.violations and why in got.violations[0], (name, got.violations)
    assert not got.outputs  # nothing of a refused frame is kept
    assert channel.conn is None  # the host hung up: the real supervisor then ends the load


def test_evidence_before_a_breach_is_kept(channel: Channel) -> None:
    def play(s: socket.socket) -> None:
        s.send(P.frame(P.EVENTS, b'{"id":1}\n'))
        s.send(b"Zjunk")

    got = converse(channel, play)
    assert got.events == b'{"id":1}\n' and got.violations


def test_a_supervisor_that_never_completes_runs_into_the_deadline(channel: Channel) -> None:
    def play(s: socket.socket) -> None:
        s.send(P.frame(P.EVENTS, b'{"id":1}\n'))
        time.sleep(2.5)

    start = time.monotonic()
    got = converse(channel, play, deadline_s=1.0)
    assert time.monotonic() - start < 5
    assert not got.completed and not got.closed and got.events


def test_events_past_the_cap_are_counted_not_kept(channel: Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_EVENTS_BYTES", 100)

    def play(s: socket.socket) -> None:
        for _ in range(5):
            s.send(P.frame(P.EVENTS, b"x" * 39 + b"\n"))
        s.send(STATUS)
        s.send(P.frame(P.DONE, b"{}"))

    got = converse(channel, play)
    assert got.completed and len(got.events) == 80 and got.events_dropped == 3


def test_a_flood_of_small_event_frames_costs_linear_time(channel: Channel) -> None:
    # 16 MiB of events in 400-byte frames: kept as immutable bytes, every frame copied all the
    # events before it (320 GB of copying: the host's CPU spent until the deadline)
    got = Received()
    frame = P.frame(P.EVENTS, b"x" * 399 + b"\n")
    start = time.monotonic()
    for _ in range(P.MAX_EVENTS_BYTES // 400 + 10):
        assert channel._take(got, frame, [], 1 << 20) is None
        assert time.monotonic() - start < 5.0
    assert len(got.events) == P.MAX_EVENTS_BYTES // 400 * 400 and got.events_dropped == 10


def test_an_inline_output_is_refused_where_descriptors_pass(channel: Channel) -> None:
    # inline outputs (CHUNK frames into a memfd the host makes) exist for gVisor only: under
    # runc they let a supervisor put a whole output cap of bytes in the host's memory, outside
    # the container's memory limit that a sealed memfd of its own counts against
    def play(s: socket.socket) -> None:
        s.send(P.json_frame(P.OUTPUT, {"name": "tensors", "size": 1000, "inline": True}))
        s.send(P.frame(P.CHUNK, b"x" * 1000))
        s.send(STATUS)
        s.send(P.frame(P.DONE, b"{}"))

    got = converse(channel, play)
    assert got.violations and "inline tensors output" in got.violations[0]
    assert not got.outputs and not got.completed
