"""Attacks on the supervisor from a payload that controls the loader: whatever the loader does
to its descriptors, its result, its self-reports, the filter's notifications or its own
scheduling, the supervisor finishes and reports truthfully (never ``clean``; the evidence
recorded before the attack is kept; the host waits no longer than the wall clock and its
backstop). Under the Docker runner and under the bwrap runner."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import sandbox
from sandbox.report import LoadReport, Verdict
from tests import checkpoints as ck

pytestmark = [pytest.mark.container, pytest.mark.usefixtures("each_runner")]

# Marks the evidence recorded before each attack: a refused connect the report must keep.
EVIDENCE = "import socket\ntry:\n    socket.socket().connect(('127.0.0.1', 9))\nexcept OSError:\n    pass\n"


def scan(tmp_path: Path, code: str, **limits: float) -> tuple[LoadReport, float]:
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(EVIDENCE + code)), tmp_path / "p.pt")
    t0 = time.monotonic()
    report = sandbox.scan(path, policy=ck.observe_policy("never", **limits))
    return report, time.monotonic() - t0


# The wall clock runs from the job's hand-over, and a sandbox started cold imports torch in it
# (under the loader's filter: a second or two, twice that on a busy machine): the limits below
# leave the payload time to record its evidence first.
WALL_CLOCK_S = 10


def kept_evidence(report: LoadReport) -> None:
    assert report.verdict is not Verdict.CLEAN
    connects = [e for e in report.events if e.source == "kernel" and e.kind == "connect"]
    assert connects and connects[0].detail.get("port") == 9


def test_a_lying_result_over_every_pipe_then_exit(tmp_path: Path) -> None:
    # every pipe the loader holds (result, self-reports, hand-off) gets an "ok" result with no
    # outputs behind it, every other descriptor is replaced by /dev/null, and the loader exits 0
    code = """
import os
lie = b'{"ok": true, "format": "zip", "tensors": 1099511627775, "handoff": "memfd"}'
null = os.open('/dev/null', os.O_RDWR)
for name in os.listdir('/proc/self/fd'):
    fd = int(name)
    try:
        if os.readlink(f'/proc/self/fd/{fd}').startswith('pipe:'):
            os.write(fd, lie + b'\\n' + b'\\0\\xff\\xfe' * 1000 + b'\\n')
        if fd > 2 and fd != null:
            os.dup2(null, fd)
    except OSError:
        pass
os._exit(0)
"""
    report, _ = scan(tmp_path, code)
    kept_evidence(report)
    assert report.error is not None and report.tensors == 0


def test_the_loader_seals_and_truncates_its_outputs(tmp_path: Path) -> None:
    # F_SEAL_SEAL on both output memfds (the supervisor can no longer seal them), after a
    # truncation to a huge sparse size; then the load goes on as if nothing happened
    code = """
import fcntl, os
for name in os.listdir('/proc/self/fd'):
    fd = int(name)
    try:
        if os.readlink(f'/proc/self/fd/{fd}').startswith('/memfd:'):
            os.ftruncate(fd, 1 << 40)
    except OSError:
        pass
    try:
        if os.readlink(f'/proc/self/fd/{fd}').startswith('/memfd:'):
            fcntl.fcntl(fd, 1033, 1)   # F_ADD_SEALS, F_SEAL_SEAL
    except OSError:
        pass
result = 1
"""
    report, _ = scan(tmp_path, code)
    kept_evidence(report)
    assert report.error is not None


def test_the_loader_stops_itself_and_the_wall_clock_still_ends_it(tmp_path: Path) -> None:
    code = "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n"
    report, took = scan(tmp_path, code, wall_clock_s=WALL_CLOCK_S)
    kept_evidence(report)
    assert report.error is not None and report.error["reference"] == "limit-exceeded"
    assert took < 60


def test_endless_garbage_on_the_self_report_pipe(tmp_path: Path) -> None:
    # lines of megabytes, no newline, NUL bytes, invalid UTF-8, from four threads at once, for
    # longer than the wall clock
    code = """
import os, threading
pipes = []
for name in os.listdir('/proc/self/fd'):
    try:
        if os.readlink(f'/proc/self/fd/{name}').startswith('pipe:'):
            pipes.append(int(name))
    except OSError:
        pass
junk = b'{"kind": "\\xff\\0' + b'x' * (1 << 20)
def spam():
    while True:
        for fd in pipes:
            try:
                os.write(fd, junk)
            except OSError:
                pass
for _ in range(4):
    threading.Thread(target=spam, daemon=True).start()
spam()
"""
    report, took = scan(tmp_path, code, wall_clock_s=WALL_CLOCK_S)
    kept_evidence(report)
    assert report.error is not None and took < 60


def test_a_notification_flood_from_many_threads_with_bad_pointers(tmp_path: Path) -> None:
    # openat/connect from 16 threads with NULL, wild, unterminated, huge and concurrently
    # unmapped path pointers, while the main thread finishes the load
    code = """
import ctypes, os, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = libc.mmap.restype = ctypes.c_long
c = ctypes
libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
page = os.sysconf('SC_PAGESIZE')
def raw(n):  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS: memory Python knows nothing of
    return libc.mmap(None, n, 3, 0x22, -1, 0)
base = raw(2 * page)
ctypes.memset(base, ord('/'), 2 * page)
libc.mprotect(ctypes.c_void_p(base + page), page, 0)  # an unterminated path up to a hole
ptrs = [0, 1, 0xdeadbeef000, (1 << 47) - 1, base]
stop = time.monotonic() + 3
def flood():
    while time.monotonic() < stop:
        for p in ptrs:
            libc.syscall(257, -100, ctypes.c_void_p(p), 0, 0)
        a = raw(page)
        ctypes.memmove(a, b'/tmp/x\\0', 7)
        t = threading.Thread(target=libc.munmap, args=(ctypes.c_void_p(a), page))
        t.start()
        libc.syscall(257, -100, ctypes.c_void_p(a), 0, 0)
        t.join()
for i in range(16):
    threading.Thread(target=flood, daemon=True).start()
time.sleep(1)
result = 1
"""
    report, _ = scan(tmp_path, code)
    kept_evidence(report)
    assert report.error is None and report.tensors > 0


def test_the_loader_is_the_oom_killers_first_choice_and_cannot_change_that(tmp_path: Path) -> None:
    # At a memory limit the kernel kills the process with the highest score; memory the
    # payload holds outside its RSS (tmpfs pages, unmapped memfds, pipe buffers) does not count
    # for it, so only oom_score_adj (raised before the filter, never lowered by the payload)
    # keeps the supervisor from being chosen.
    code = """
out = [open('/proc/self/oom_score_adj').read().strip()]
try:
    with open('/proc/self/oom_score_adj', 'wb', buffering=0) as f:
        f.write(b'0')
except OSError as e:
    out.append(e.errno)
out.append(open('/proc/self/oom_score_adj').read().strip())
result = out
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "p.pt")
    obj = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
    assert obj["payload"] == ["1000", 1, "1000"]  # EPERM from the monitor
