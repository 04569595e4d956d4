"""Resources: the supervisor samples the loader's process tree (CPU time, RSS, threads, child
processes) with psutil, enforces the CPU-time limit on the whole tree, and the kernel monitor
refuses what would escape its accounting (forks, a second seccomp filter, 32-bit system calls).

Payloads are harmless: they spin, sleep, or make calls that are refused; none reaches any
address or writes anything outside the sandbox.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import sandbox
from sandbox.report import Event, LoadReport, Severity
from tests import checkpoints as ck

pytestmark = pytest.mark.container


def payload_file(tmp_path: Path, code: str, name: str = "payload.pt") -> Path:
    """A realistic checkpoint whose unpickling runs ``code``; its ``payload`` value becomes
    whatever the code leaves in ``result``."""
    return ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / name)


def kernel(report: LoadReport, kind: str) -> list[Event]:
    return [e for e in report.events if e.source == "kernel" and e.kind == kind]


# -- the CPU-time limit ----------------------------------------------------------------------------


def test_cpu_spin_is_stopped_at_the_cpu_limit(tmp_path: Path, each_runner: str) -> None:
    path = payload_file(tmp_path, "while True:\n    pass")
    with pytest.raises(sandbox.LimitExceeded) as info:
        sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy(cpu_s=3, wall_clock_s=60))
    assert info.value.limit == "cpu" and info.value.value == 3
    report = info.value.report
    assert report is not None and report.duration_s is not None and report.duration_s < 20
    (f,) = [f for f in report.findings if f.rule == "limit-cpu"]
    assert f.severity is Severity.MEDIUM and f.category == "resource"
    assert f.evidence["limit"] == "cpu" and f.evidence["enforced_by"] == "supervisor"
    # stopped at the limit (sampled every ~100 ms), not at the wall clock
    assert 3 <= report.resources["cpu_s"] < 6
    assert report.resources["wall_s"] < 15


# -- what the samples say ----------------------------------------------------------------------------


def test_threads_are_counted(tmp_path: Path) -> None:
    path = payload_file(
        tmp_path,
        "import threading, time\n"
        "threads = [threading.Thread(target=time.sleep, args=(0.6,)) for _ in range(20)]\n"
        "for t in threads:\n"
        "    t.start()\n"
        "for t in threads:\n"
        "    t.join()\n"
        "result = len(threads)",
    )
    report = sandbox.scan(path, policy=ck.observe_policy())
    assert report.error is None and report.tensors > 0
    res = report.resources
    assert res["threads_peak"] >= 21  # the 20 and the loader's main thread
    assert res["children_peak"] == 0 and res["samples"] >= 5
    # threads are not processes: nothing about them is a finding
    assert not [f for f in report.findings if f.category in ("process", "resource")]


def test_fork_bomb_is_refused_and_the_pids_limit_holds(tmp_path: Path, each_runner: str) -> None:
    code = """
import os, threading, time
refused = 0
for i in range(64):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
gate = threading.Event()
started = []
for i in range(400):
    t = threading.Thread(target=gate.wait, args=(10,))
    try:
        t.start()
    except RuntimeError:
        break
    started.append(t)
time.sleep(0.3)
gate.set()
for t in started:
    t.join()
result = {"forks_refused": refused, "threads": len(started)}
"""
    path = payload_file(tmp_path, code)
    report = sandbox.scan(path, policy=ck.observe_policy(pids=32))
    # the load went on: every fork was refused by the monitor, and the threads stopped at the
    # container's pids limit (32 tasks: the supervisor, the loader's main thread, 30 more)
    assert report.error is None and report.tensors > 0
    forks = kernel(report, "clone")
    assert len(forks) == 64
    assert all(e.action == "denied" and e.detail["style"] == "fork" for e in forks)
    f = [f for f in report.findings if f.rule == "process-creation"]
    assert f and f[0].severity is Severity.HIGH
    res = report.resources
    assert res["children_peak"] == 0  # no process ever got past the monitor
    assert 20 <= res["threads_peak"] <= 31


# -- calls that would leave the monitor's view -----------------------------------------------------


def test_installing_a_seccomp_filter_is_recorded_and_refused(tmp_path: Path) -> None:
    # A filter of the payload's own (here: allow everything) would stack on the monitor's and
    # could answer its calls with fake results; both ways of installing one are refused.
    code = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
insns = ctypes.create_string_buffer(struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000))  # RET ALLOW
prog = ctypes.create_string_buffer(struct.pack("<HxxxxxxQ", 1, ctypes.addressof(insns)))
libc.prctl(22, 2, ctypes.addressof(prog), 0, 0)      # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
libc.syscall(317, 1, 0, ctypes.addressof(prog))      # seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)
"""
    path = payload_file(tmp_path, code)
    report = sandbox.scan(path, policy=ck.observe_policy())
    assert report.error is None and report.tensors > 0
    (prctl,) = kernel(report, "prctl")
    assert prctl.action == "denied" and prctl.detail["option"] == "PR_SET_SECCOMP"
    (seccomp,) = kernel(report, "seccomp")
    assert seccomp.action == "denied"
    ids = {i for f in report.findings if f.rule == "privileged-call" for i in f.events}
    assert {prctl.id, seccomp.id} <= ids


def test_32_bit_system_call_is_reported_and_refused(tmp_path: Path, each_runner: str) -> None:
    # ``int 0x80`` from a code page of our own: ``mov eax, 20 (i386 getpid); int 0x80; ret``.
    # The container profile lets i386 calls through by name so that the loader's filter sees
    # them; the filter reports every call of a foreign ABI and the supervisor refuses it.
    code = """
import ctypes, mmap, os, threading, time
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(b"\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3")
fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
seen = {}
def call():
    seen["rc"] = fn()
t = threading.Thread(target=call, daemon=True)
t.start()
t.join(5)
result = {"returned": seen.get("rc")}
"""
    path = payload_file(tmp_path, code)
    obj = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
    assert obj["payload"] == {"returned": -1}  # -EPERM, not getpid()
    report = sandbox.scan(path, policy=ck.observe_policy())
    foreign = kernel(report, "foreign_abi")
    assert foreign and foreign[0].action == "denied" and foreign[0].detail["nr"] == 20
    maps = [e for e in kernel(report, "mmap") if "x" in e.detail.get("prot", "")]
    assert maps and maps[0].detail["anonymous"] is True
    assert any(f.rule == "executable-memory" for f in report.findings)
    assert any(
        f.rule == "privileged-call" and set(f.events) & {e.id for e in foreign} for f in report.findings
    )
    assert report.error is None and report.tensors > 0
