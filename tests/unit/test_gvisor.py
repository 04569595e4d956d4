"""gVisor (``--runtime runsc``) without a daemon: the sentry's trace parser on real captured
lines and on hostile ones, the loader's plain seccomp filter, the engine-runtime check, the
inline outputs of the channel and the set-up script's runtime arguments.

The ``REAL_*`` lines were captured on this project's machine (Debian's runsc 0.0~20221219.0,
``--platform=ptrace``) from loads of the hostile payloads in ``tests/container/test_gvisor.py``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from sandbox import _channel, _events, _gvisor, _launch
from sandbox._worker import _protocol as P
from sandbox._worker import _seccomp as S
from sandbox.errors import EngineUnavailable, PolicyError
from sandbox.report import Event, Severity
from tests.fakes import run_bpf

ROOT = Path(__file__).resolve().parents[2]
CID = "ac2e7fc99e555a5b792b66d166b12e1d62dfe212bfaa7e48deb69040fda975da"

# -- real lines ------------------------------------------------------------------------------------

REAL_ARGS = (
    f"I1202 04:43:19.297848   25113 main.go:217] Args: [runsc-sandbox --root=/var/run/"
    f"docker/runtime-runc/moby --debug=true --strace=true boot --bundle=/run/x "
    f"--stdio-fds=15 {CID}]"
)
# the supervisor (thread group 1) before the job: never evidence
REAL_SUPERVISOR = (
    "I1202 04:56:29.941516   26402 strace.go:608] [   1:   1] python3 X openat("
    "AT_FDCWD /tmp, 0x7f5642247fd0 /home/user/.aws/credentials, O_WRONLY|O_CLOEXEC|"
    "O_CREAT|O_NOFOLLOW|O_TRUNC, 0o600) = 4 (0x4) (17.387µs)"
)
# the loader's own filter going in: monitoring starts here
REAL_START = (
    "I1202 04:56:30.058786   26402 strace.go:605] [   2:   2] python3 X seccomp(0x1, 0x0, "
    "0x7f5642120910) = 0 (0x0) (11.144µs)"
)
REAL_THREAD = (
    "I1202 04:56:52.348626   27073 strace.go:611] [   2:   2] python3 X clone(CLONE_VM|"
    "CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|CLONE_SETTLS|"
    "CLONE_PARENT_SETTID|CLONE_CHILD_CLEARTID, 0x7f38c15fff70, 0x7f38c1600990, "
    "0x7f38c1600990, 0x7f38c16006c0) = 4 (0x4) (98.252µs)"
)
REAL_INPUT = (
    "I1202 04:56:41.569086   26577 strace.go:608] [   2:   2] python3 X openat(AT_FDCWD "
    "/tmp, 0x5588451b9fb0 /proc/self/fd/1000, O_RDONLY|0x0, 0o0) = 6 (0x6) (22.464µs)"
)
REAL_CANARY = (
    "I1202 04:57:10.507191   27687 strace.go:608] [   2:   2] python3 X openat(AT_FDCWD "
    "/tmp, 0x7fa92e34cc10 /home/user/.aws/credentials, O_RDONLY|O_CLOEXEC, 0o0) = 6 "
    "(0x6) (13.939µs)"
)
REAL_SHADOW = (
    "I1202 04:56:34.727964   26402 strace.go:608] [   2:   2] python3 X openat(AT_FDCWD "
    "/tmp, 0x7f5621706c90 /etc/shadow, O_RDONLY|O_CLOEXEC, 0o0) = 0 (0x0) errno=2 (no "
    "such file or directory) (325.607µs)"
)
REAL_SOCKET = (
    "I1202 04:57:02.959402   27466 strace.go:605] [   2:   2] python3 X socket(AF_INET, "
    "SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_TCP) = 6 (0x6) (100.705µs)"
)
REAL_CONNECT_DENIED = (
    "D1202 04:57:02.959637   27466 task_syscall.go:240] [   2:   2] Syscall 42: denied by seccomp"
)
REAL_VFORK = (
    "I1202 04:56:56.682425   27073 strace.go:611] [   2:   2] python3 X clone(CLONE_VM|"
    "CLONE_VFORK|0x11, 0x7f38c8c60ff0, 0x0, 0x0, 0x0) = 5 (0x5) (131.052µs)"
)
REAL_EXEC_DENIED = (
    "D1202 04:56:56.706854   27073 task_syscall.go:240] [   5:   5] Syscall 59: denied by seccomp"
)
REAL_CLONE3_DENIED = (
    "D1202 04:52:14.542544   16147 task_syscall.go:240] [   2:   2] Syscall 435: denied by seccomp"
)
REAL_OPEN_MODE = (
    "I1202 04:52:15.542544   16147 strace.go:608] [   2:   2] python3 X open(0x7fd3bb"
    "776030 /proc/self/environ, O_RDONLY|0x0, S_ISVTX|0o0) = 7 (0x7) (9.1µs)"
)
REAL_WRITE_SCRATCH = (
    "I1202 04:53:01.100000   16147 strace.go:608] [   2:   2] python3 X openat("
    "AT_FDCWD /tmp, 0x7f00 /tmp/gv/marker-write, O_WRONLY|O_CLOEXEC|O_CREAT|"
    "O_TRUNC, 0o666) = 0 (0x0) errno=2 (no such file or directory) (40µs)"
)
REAL_NOISE = (
    "D1202 04:56:41.571774   26577 client.go:400] send [channel 0xc0003f95f0] "
    "WalkReq{DirFD: 6, Path: [shadow, ]}"
)
# a thread name chosen by the payload (prctl PR_SET_NAME) that reads like a call
REAL_COMM_TRICK = (
    "I1202 04:56:34.727964   26402 strace.go:608] [   2:   2] x X seccomp( X openat("
    "AT_FDCWD /tmp, 0x7f5621706c90 /etc/shadow, O_RDONLY|O_CLOEXEC, 0o0) = 0 (0x0) "
    "errno=2 (no such file or directory) (325.607µs)"
)
# a directory named "x\n" under /tmp: the path breaks the line in two
REAL_NEWLINE = (
    "I1202 04:56:41.571852   26577 strace.go:608] [   2:   2] python3 X openat(AT_FDCWD "
    "/tmp, 0x7f33cb341810 /tmp/x\n/../../etc/shadow, O_RDONLY|O_CLOEXEC, 0o0) = 0 "
    "(0x0) errno=2 (no such file or directory) (82.27µs)"
)


def log(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def parsed(data: bytes) -> _gvisor.Trace:
    """The trace of a log that was found (as :func:`_gvisor.read_trace` would have it)."""
    trace = _gvisor.parse(data)
    trace.found = True
    return trace


def events(data: bytes, canary_files: frozenset[str] = frozenset()) -> tuple[_gvisor.Trace, list[Event]]:
    trace = parsed(data)
    return trace, _gvisor.to_events(trace, canary_files=canary_files)


# -- the parser ------------------------------------------------------------------------------------


def test_monitoring_starts_at_the_loaders_filter_and_skips_the_supervisor() -> None:
    trace, evs = events(
        log(
            REAL_ARGS,
            REAL_SUPERVISOR,
            REAL_SHADOW,
            REAL_START,
            REAL_THREAD,
            REAL_INPUT,
            REAL_CLONE3_DENIED,
            REAL_NOISE,
        )
    )
    assert trace.started
    # the shadow read before the filter went in is not the file's doing (nothing of it ran);
    # the supervisor's canary writes, a thread, the input reopened and clone3's ENOSYS are quiet
    assert evs == [] and not trace.anomalies


def test_real_hostile_lines_become_evidence() -> None:
    files = frozenset({f"{P.CANARY_HOME}/.aws/credentials"})
    trace, evs = events(
        log(
            REAL_START,
            REAL_CANARY,
            REAL_SHADOW,
            REAL_SOCKET,
            REAL_CONNECT_DENIED,
            REAL_VFORK,
            REAL_EXEC_DENIED,
            REAL_WRITE_SCRATCH,
            REAL_OPEN_MODE,
        ),
        files,
    )
    by = [(e.kind, e.action, e.detail.get("class") or e.detail.get("style")) for e in evs]
    assert by == [
        ("openat", "allowed", "canary"),
        ("openat", "allowed", "sensitive"),
        ("socket", "allowed", None),
        ("connect", "denied", None),
        ("clone", "allowed", "vfork"),
        ("execve", "denied", None),
        ("openat", "allowed", "scratch"),
    ]
    assert all(e.source == "gvisor" for e in evs)
    assert evs[1].detail["path"] == "/etc/shadow" and evs[1].detail["errno"] == errno.ENOENT
    assert evs[2].detail["family"] == "AF_INET"
    assert evs[5].detail["pid"] == 5  # the vfork child's refused execve
    assert not trace.anomalies and trace.counts["connect:denied"] == 1
    # times count from the filter going in, on the trace's own clock
    assert evs[0].t == pytest.approx(40.448405, abs=1e-3)


def test_findings_rest_on_gvisor_events_and_name_the_audit_hooks_arguments() -> None:
    trace = parsed(log(REAL_START, REAL_CONNECT_DENIED, REAL_VFORK, REAL_EXEC_DENIED, REAL_SHADOW))
    said = json.dumps(
        {
            "id": 1,
            "t": 32.9,
            "source": "self_reported",
            "kind": "socket.connect",
            "detail": {"address": '["127.0.0.1", 4444]'},
            "action": "recorded",
        }
    )
    status = P.Status.from_obj(
        {
            "protocol": P.PROTOCOL_VERSION,
            "result": {"ok": True},
            "monitor": {"kernel": False, "filter": "plain"},
        }
    )
    mon = _events.read(said.encode() + b"\n", status, {}, trace=trace)
    rules = {f.rule: f for f in mon.findings}
    assert rules["network-connect"].severity is Severity.CRITICAL
    assert rules["network-connect"].evidence["arguments"]["source"] == "self_reported"
    assert "127.0.0.1" in rules["network-connect"].evidence["arguments"]["address"]
    assert rules["exec-attempt"].severity is Severity.CRITICAL
    assert rules["sensitive-file-read"].evidence["path"] == "/etc/shadow"
    assert "monitor-lost" not in rules
    ids = {e.id: e for e in mon.events}
    assert sorted(ids) == list(range(1, len(mon.events) + 1))  # numbered afresh, in time order
    for f in (rules["network-connect"], rules["exec-attempt"]):
        assert all(ids[i].source == "gvisor" for i in f.events)
    assert not any("not active" in n for n in mon.notes)


def test_a_missing_or_unstarted_trace_is_a_lost_monitor() -> None:
    status = P.Status.from_obj({"protocol": P.PROTOCOL_VERSION, "result": {"ok": True}})
    for trace in (_gvisor.Trace(), parsed(log(REAL_ARGS, REAL_SUPERVISOR))):
        mon = _events.read(b"", status, {}, trace=trace)
        assert any(f.rule == "monitor-lost" for f in mon.findings)


def test_a_thread_name_that_reads_like_a_call_hides_nothing() -> None:
    _, evs = events(log(REAL_START, REAL_COMM_TRICK))
    assert [(e.kind, e.detail["path"]) for e in evs] == [("openat", "/etc/shadow")]


def test_a_line_break_in_a_path_is_an_anomaly_not_a_silence() -> None:
    trace = parsed(log(REAL_START, REAL_NEWLINE))
    assert trace.anomalies and trace.counts["anomaly"] >= 2
    status = P.Status.from_obj({"protocol": P.PROTOCOL_VERSION, "result": {"ok": True}})
    mon = _events.read(b"", status, {}, trace=trace)
    f = next(f for f in mon.findings if f.rule == "trace-anomaly")
    assert f.severity is Severity.HIGH and "/etc/shadow" in json.dumps(f.evidence)


def test_forged_lines_only_add_and_never_erase() -> None:
    # a path that holds a whole forged line: the forged line is read (it can only add
    # evidence), the real call's broken halves are anomalies, and the next real call is intact
    forged = REAL_EXEC_DENIED.replace("[   5:   5]", "[   2:   2]")
    broken = REAL_SHADOW.replace("/etc/shadow", f"/tmp/a\n{forged}\n/../../etc/shadow")
    trace, evs = events(
        log(REAL_START, broken, REAL_CANARY), frozenset({f"{P.CANARY_HOME}/.aws/credentials"})
    )
    assert trace.anomalies
    assert ("openat", "canary") in [(e.kind, e.detail.get("class")) for e in evs]
    # a forged "monitoring starts" line after the real one moves nothing
    late = REAL_START.replace("04:56:30.058786", "04:56:59.000000")
    _, evs2 = events(log(REAL_START, late, REAL_CANARY))
    assert evs2 and evs2[0].t == pytest.approx(40.448405, abs=1e-3)


def test_hostile_bytes_are_bounded_and_total() -> None:
    oversized = REAL_CANARY.replace(
        "/home/user/.aws/credentials", "/home/user/" + "a" * (_gvisor.MAX_LINE + 10)
    )
    truncated = REAL_SHADOW[: len(REAL_SHADOW) // 2]
    non_utf8 = REAL_SHADOW.encode().replace(b"/etc/shadow", b"/etc/\xff\xfe-shadow")
    junk = bytes(range(256)) * 64
    data = b"\n".join(
        [REAL_START.encode(), oversized.encode(), truncated.encode(), non_utf8, junk, b"\x00" * 100_000, b""]
    )
    trace, evs = events(data)
    assert len(trace.anomalies) >= 2  # the cut line and the truncated one
    assert any(e.detail.get("path", "").startswith("/etc/") for e in evs)  # the non-UTF-8 one
    for e in evs:
        assert len(json.dumps(e.detail)) < 4000
        assert all(ch.isprintable() for ch in e.detail.get("path", ""))


def test_a_path_holding_an_address_is_read_every_way_and_the_worst_kept() -> None:
    line = REAL_SHADOW.replace(
        "AT_FDCWD /tmp, 0x7f5621706c90 /etc/shadow",
        "AT_FDCWD /tmp/d, 0x1 /usr/lib/, 0x7f5621706c90 /etc/shadow",
    )
    _, evs = events(log(REAL_START, line))
    assert evs[0].detail["class"] == "sensitive" and evs[0].detail["ambiguous"] == 2


def test_records_are_capped_with_exact_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gvisor, "MAX_TRACE_EVENTS", 10)
    trace = parsed(log(REAL_START, *([REAL_SHADOW] * 50), REAL_EXEC_DENIED))
    assert len(trace.records) <= 10 and trace.counts["openat:returned"] == 50
    assert trace.counts["execve:denied"] == 1 and trace.dropped > 0
    status = P.Status.from_obj({"protocol": P.PROTOCOL_VERSION, "result": {"ok": True}})
    mon = _events.read(b"", status, {}, trace=trace)
    assert {"event-log-truncated", "exec-attempt"} <= {f.rule for f in mon.findings}


def test_the_log_is_found_by_container_id_and_read_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "runsc.log.20261202-044319.1.boot.txt"
    other.write_text(REAL_ARGS.replace(CID, "f" * 64) + "\n" + REAL_START + "\n")
    mine = tmp_path / "runsc.log.20261202-044319.2.boot.txt"
    mine.write_bytes(log(REAL_ARGS, REAL_START, REAL_SHADOW))
    (tmp_path / "runsc.log.x.gofer.txt").write_text(REAL_ARGS + "\n")
    (tmp_path / "runsc.log.y.boot.txt").symlink_to(mine)  # never followed
    assert _gvisor.find_log(str(tmp_path), CID, since=0) == str(mine)
    assert _gvisor.find_log(str(tmp_path), "not-an-id", since=0) is None
    monkeypatch.setattr(_gvisor, "MAX_READ_BYTES", len(log(REAL_ARGS)) + 10)  # and one line
    trace = _gvisor.read_trace(str(mine))
    assert trace.found and trace.started and trace.truncated


def test_a_huge_line_is_cut_while_read_and_the_next_line_still_counts(tmp_path: Path) -> None:
    huge = REAL_SHADOW.replace("/etc/shadow", "/tmp/" + "y" * 2**20 + "/../../etc/shadow")
    path = tmp_path / "runsc.log.1.boot.txt"
    path.write_bytes(log(REAL_ARGS, REAL_START, huge, REAL_CANARY))
    trace = _gvisor.read_trace(str(path))
    assert trace.anomalies and not trace.truncated
    assert trace.bytes_read == path.stat().st_size
    assert [r.args.split(", ")[1][-10:] for r in trace.records] == ["redentials"]


def test_the_watch_stops_a_flooding_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gvisor, "MAX_LOG_BYTES", 1000)
    path = tmp_path / "runsc.log.1.boot.txt"
    path.write_bytes(log(REAL_ARGS))
    killed: list[bool] = []
    watch = _gvisor.Watch(str(tmp_path), CID, 0, lambda: killed.append(True), poll_s=0.01)
    watch.start()
    with path.open("ab") as f:
        f.write(log(*([REAL_SHADOW] * 20)))
    watch._thread.join(timeout=5)  # type: ignore[union-attr]
    watch.stop()
    assert killed and watch.flooded


def test_the_watch_reports_the_first_fatal_refusal(tmp_path: Path) -> None:
    path = tmp_path / "runsc.log.1.boot.txt"
    path.write_bytes(log(REAL_ARGS, REAL_EXEC_DENIED))  # before the filter went in: not the load's
    seen: list[dict[str, object]] = []
    watch = _gvisor.Watch(str(tmp_path), CID, 0, lambda: None, poll_s=0.01)
    watch.fatal = frozenset({"exec", "network"})
    watch.on_fatal = seen.append
    watch.start()
    with path.open("ab") as f:
        f.write(log(REAL_START, REAL_CLONE3_DENIED, REAL_SHADOW))  # neither is fatal
        f.flush()
        time.sleep(0.2)
        assert not seen
        f.write(log(REAL_CONNECT_DENIED, REAL_EXEC_DENIED))
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    watch.stop()
    assert seen == [{"kind": "connect", "category": "network", "t": pytest.approx(32.9, abs=0.1)}]


# -- the engine's runtime ------------------------------------------------------------------------


def test_the_runtime_check_names_what_to_add() -> None:
    with pytest.raises(EngineUnavailable) as missing:
        _gvisor.check_runtime({"runc": {"path": "runc"}})
    assert "daemon.json" in missing.value.message and _gvisor.ENGINE_RUNTIME in missing.value.message
    assert "--network=none" in missing.value.message and "kill -HUP" in missing.value.message
    bare = {"path": "/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace", "--network=none"]}
    with pytest.raises(EngineUnavailable, match="--strace"):
        _gvisor.check_runtime({_gvisor.ENGINE_RUNTIME: bare})
    ok = {"path": "/usr/bin/runsc", "runtimeArgs": list(_gvisor.RUNTIME_ARGS)}
    assert _gvisor.check_runtime({_gvisor.ENGINE_RUNTIME: ok}) == _gvisor.LOG_DIR


def test_the_setup_script_registers_the_same_arguments() -> None:
    script = (ROOT / "scripts" / "ensure-docker.sh").read_text()
    assert _gvisor.ENGINE_RUNTIME in script and "kill -HUP" in script
    assert "systemctl restart" not in script
    listed = re.findall(r'^\s+"(--[^"]+)",?$', script, flags=re.M)
    assert tuple(listed) == _gvisor.RUNTIME_ARGS


def test_runsc_needs_the_docker_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PolicyError, match="Docker runner"):
        _launch.make_runner("bwrap", runtime="runsc")
    with pytest.raises(PolicyError, match="unknown runtime"):
        _launch.runtime_kind("kata")
    monkeypatch.setenv(_launch.RUNTIME_ENV, "runsc")
    runner = _launch.make_runner("auto")
    assert isinstance(runner, _launch.DockerRunner) and runner.runtime == "runsc"


def test_the_container_profile_under_gvisor_lets_the_sentry_answer_clone3() -> None:
    from sandbox.policy import seccomp_profile

    doc = json.loads(_gvisor.profile(seccomp_profile()))
    rule = next(r for r in doc["syscalls"] if r["names"] == ["clone3"])
    assert rule["action"] == "SCMP_ACT_ALLOW" and "errnoRet" not in rule
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO"


# -- the loader's plain filter -------------------------------------------------------------------


def test_the_plain_filter_refuses_what_the_supervisor_refuses() -> None:
    prog = S.build_plain_filter(self_pid=7, refuse_errno=errno.EPERM)
    deny = P.SECCOMP_RET_ERRNO | errno.EPERM
    allow = P.SECCOMP_RET_ALLOW
    for name in (
        "connect",
        "sendto",
        "sendmsg",
        "bind",
        "listen",
        "execve",
        "execveat",
        "fork",
        "ptrace",
        "mount",
        "unshare",
        "bpf",
        "setuid",
        "pidfd_getfd",
        "seccomp",
        "process_vm_readv",
        "keyctl",
        "io_uring_setup",
    ):
        assert run_bpf(prog, S.SYSCALLS[name]) == deny, name
    for name in (
        "socket",
        "socketpair",
        "openat",
        "open",
        "unlink",
        "rename",
        "memfd_create",
        "vfork",
        "read",
        "write",
    ):
        assert run_bpf(prog, S.SYSCALLS.get(name, {"read": 0, "write": 1}.get(name, 0))) == allow, name
    assert run_bpf(prog, 56, (S.CLONE_THREAD | S.CLONE_VM,)) == allow
    assert run_bpf(prog, 56, (S.CLONE_VM | S.CLONE_VFORK | 17,)) == allow
    assert run_bpf(prog, 56, (17,)) == deny  # fork
    assert run_bpf(prog, 435) == P.SECCOMP_RET_ERRNO | errno.ENOSYS  # clone3
    assert run_bpf(prog, 62, (1, 9)) == deny and run_bpf(prog, 62, (0xFFFFFFFF, 9)) == deny
    assert run_bpf(prog, 62, (2, 9)) == allow and run_bpf(prog, 234, (1, 1, 9)) == deny
    assert run_bpf(prog, 157, (S.PR_SET_DUMPABLE, 1)) == deny
    assert run_bpf(prog, 157, (15, 0)) == allow  # PR_SET_NAME
    assert run_bpf(prog, 59, (), arch=0x40000003) == deny  # i386
    assert run_bpf(prog, 59 | S.X32_SYSCALL_BIT) == deny
    other = S.build_plain_filter(self_pid=7, refuse_errno=errno.EACCES)
    assert run_bpf(other, 42) == P.SECCOMP_RET_ERRNO | errno.EACCES


def test_every_notified_call_has_a_plain_decision() -> None:
    assert S.plain_refused() | S.PLAIN_ALLOWED | S.PLAIN_SIGNAL_CALLS == frozenset(S.SYSCALLS)
    assert not S.plain_refused() & S.PLAIN_ALLOWED


# -- inline outputs (descriptors cannot leave gVisor) ------------------------------------------------


def _pair() -> tuple[socket.socket, _channel.Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = _channel.Channel.__new__(_channel.Channel)
    ch.listener, ch.conn, ch.peer_pid, ch.path = None, b, None, "/nonexistent"
    return a, ch


def test_inline_outputs_land_in_a_sealed_host_memfd() -> None:
    sup, ch = _pair()
    body = os.urandom(150_000)
    sup.send(P.json_frame(P.OUTPUT, {"name": "tensors", "size": len(body), "inline": True}))
    for i in range(0, len(body), P.MAX_FRAME):
        sup.send(P.frame(P.CHUNK, body[i : i + P.MAX_FRAME]))
    sup.send(P.json_frame(P.STATUS, {"protocol": P.PROTOCOL_VERSION}))
    sup.send(P.frame(P.DONE, b"{}"))
    sup.close()
    got = ch.collect(time.monotonic() + 5, 10**6, inline=True)
    assert got.completed and not got.violations
    fd = got.outputs["tensors"]
    assert _channel.check_memfd(fd, len(body), 10**6) is None
    assert os.pread(fd, len(body) + 1, 0) == body
    got.close()


@pytest.mark.parametrize(
    "frames,why",
    [
        (
            [
                P.json_frame(P.OUTPUT, {"name": "tensors", "size": 10, "inline": True}),
                P.frame(P.CHUNK, b"x" * 11),
            ],
            "longer than announced",
        ),
        (
            [
                P.json_frame(P.OUTPUT, {"name": "tensors", "size": 10, "inline": True}),
                P.frame(P.CHUNK, b"x" * 5),
                P.json_frame(P.STATUS, {}),
            ],
            "ended early",
        ),
        ([P.frame(P.CHUNK, b"x")], "without an inline output"),
        ([P.json_frame(P.OUTPUT, {"name": "tensors", "size": 10**7, "inline": True})], "cap"),
    ],
)
def test_inline_outputs_are_checked_frame_by_frame(frames: list[bytes], why: str) -> None:
    sup, ch = _pair()
    for f in frames:
        sup.send(f)
    sup.close()
    got = ch.collect(time.monotonic() + 5, 1000, inline=True)
    assert got.violations and why in got.violations[0] and not got.outputs
    assert got.pending is None or got.pending[1] >= 0
    got.close()
