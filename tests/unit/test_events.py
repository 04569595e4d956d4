"""events.jsonl is untrusted data: bounded parsing, and the mapping from kernel events to findings."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from sandbox import _events
from sandbox._worker import _protocol as P
from sandbox._worker import _seccomp
from sandbox.report import Severity
from tests.fakes import run_bpf

CANARIES = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3tCanaryValue0123456789abcdefABCDEF+/",
    "HF_TOKEN": "hf_CanaryTokenValueXYZabcdefghijklmnop",
}
STATUS: dict[str, Any] = {
    "canaries": {"values": CANARIES, "files": ["/home/user/.aws/credentials"]},
    "monitor": {"kernel": True, "truncated": False, "counts": {}},
    "result": {"ok": True},
}


def line(i: int, kind: str, detail: dict[str, Any], action: str = "denied", source: str = "kernel") -> bytes:
    return (
        json.dumps(
            {"id": i, "t": 0.5, "source": source, "kind": kind, "detail": detail, "action": action}
        ).encode()
        + b"\n"
    )


def doc(status: dict[str, Any]) -> P.Status:
    """The typed status document the host reads from the supervisor's JSON."""
    return P.Status.from_obj({"protocol": P.PROTOCOL_VERSION, **status})


def judge(*lines: bytes, status: dict[str, Any] | None = None) -> _events.Monitoring:
    events, rejected = _events.parse_events(b"".join(lines))
    assert rejected == 0
    return _events.analyse(events, doc(status or STATUS))


def rules(mon: _events.Monitoring) -> dict[str, Any]:
    return {f.rule: f for f in mon.findings}


def test_malformed_lines_are_rejected_one_by_one() -> None:
    good = line(1, "socket", {"family": "AF_INET"}, "allowed")
    bad = [
        b"not json\n",
        b"[1, 2]\n",
        b'{"id": 2}\n',
        line(3, "socket", {}, action="exploded"),
        line(4, "socket", {}, source="host"),
        line(0, "socket", {}),
        line(5, "bad kind!", {}),
        b'{"id": 6, "t": NaN, "source": "kernel", "kind": "x", "detail": {}, "action": "denied"}\n',
        line(1, "socket", {}),  # duplicate id
        b'{"id": 7, "t": 1, "source": "kernel", "kind": "x", "detail": [], "action": "denied"}\n',
        # a time no float holds: math.isfinite raised OverflowError out of the host's reading
        b'{"id": 8, "t": 1'
        + b"0" * 400
        + b', "source": "kernel", "kind": "x", "detail": {}, "action": "denied"}\n',
        b"x" * (P.MAX_EVENT_LINE + 1) + b"\n",
    ]
    events, rejected = _events.parse_events(good + b"".join(bad))
    assert [e.id for e in events] == [1]
    assert rejected == len(bad)


def test_strings_are_bounded_and_printable() -> None:
    deep: Any = {"a": {"b": {"c": {"d": {"e": 1}}}}}
    events, _ = _events.parse_events(
        line(1, "openat", {"path": "\x1b[31m/x" + "y" * 10_000, "deep": deep, "many": list(range(500))})
    )
    d = events[0].detail
    assert d["path"].startswith("\\x1b[31m/x") and len(d["path"]) <= 2048 + 8
    assert d["deep"]["a"]["b"]["c"] is None or d["deep"]["a"]["b"]["c"] == {"d": None}
    assert len(d["many"]) == 64


def test_line_count_is_bounded() -> None:
    data = b"".join(line(i, "socket", {}, "allowed") for i in range(1, 8000))
    events, _ = _events.parse_events(data)
    assert len(events) <= P.MAX_KERNEL_EVENTS + P.MAX_SELF_REPORTED_EVENTS + 16


def test_exec_connect_socket_mapping() -> None:
    mon = judge(
        line(1, "execve", {"path": "/bin/sh", "argv": ["sh", "-c", "touch /tmp/x"]}),
        line(
            2,
            "connect",
            {"family": "AF_INET", "address": "127.0.0.1", "port": 4444, "target": "AF_INET 127.0.0.1:4444"},
        ),
        line(3, "socket", {"family": "AF_INET", "type": "SOCK_STREAM"}, "allowed"),
        line(4, "socket", {"family": "AF_INET", "type": "SOCK_STREAM"}, "allowed"),
    )
    r = rules(mon)
    assert r["exec-attempt"].severity is Severity.CRITICAL
    assert r["exec-attempt"].evidence["argv"] == ["sh", "-c", "touch /tmp/x"]
    assert r["exec-attempt"].events == (1,)
    assert r["network-connect"].severity is Severity.CRITICAL
    assert r["network-connect"].evidence["event"] == "connect AF_INET 127.0.0.1:4444 — denied"
    assert r["network-socket"].severity is Severity.MEDIUM
    assert r["network-socket"].events == (3, 4) and r["network-socket"].evidence["occurrences"] == 2


def test_credentials_and_exfiltration() -> None:
    mon = judge(
        line(
            1,
            "openat",
            {"path": "/home/user/.aws/credentials", "flags": "O_RDONLY", "class": "canary"},
            "allowed",
        ),
        line(
            2,
            "sendto",
            {"family": "AF_INET", "address": "10.0.0.1", "port": 53, "preview": "x" + CANARIES["HF_TOKEN"]},
        ),
    )
    r = rules(mon)
    assert r["canary-file-read"].severity is Severity.HIGH
    assert r["canary-exfiltration"].severity is Severity.CRITICAL
    assert r["canary-exfiltration"].evidence["canaries"] == ["HF_TOKEN"]
    assert r["canary-exfiltration"].events == (2,)


def test_privilege_and_files() -> None:
    mon = judge(
        line(1, "kill", {"target": 1, "signal": 9, "supervisor": True}),
        line(2, "mount", {}),
        line(3, "openat", {"path": "/etc/shadow", "flags": "O_RDONLY", "class": "sensitive"}, "allowed"),
        line(
            4,
            "openat",
            {"path": "/opt/python/x", "flags": "O_WRONLY|O_CREAT", "write": True, "class": "quiet"},
        ),
        line(5, "memfd_create", {"name": "x"}, "allowed"),
        line(6, "openat", {"path": "/etc/hostname", "flags": "O_RDONLY", "class": "other"}, "allowed"),
    )
    r = rules(mon)
    assert r["attack-supervisor"].severity is Severity.CRITICAL
    assert r["privileged-call"].severity is Severity.HIGH
    assert r["sensitive-file-read"].severity is Severity.HIGH
    assert r["file-write-outside"].severity is Severity.HIGH
    assert r["executable-memory"].severity is Severity.MEDIUM
    assert len(mon.findings) == 5  # an ordinary read elsewhere is an event, not a finding


def test_self_reported_events_are_evidence_labelled_as_such() -> None:
    """The audit hook writes each event before the audited action runs: the first one a payload
    triggers is evidence; what follows it may be forged and says so. A kernel-only kind that
    arrives as self-reported (forged) makes no finding."""
    mon = judge(
        line(
            1,
            "compile",
            {"source": "import os; os.system('x')", "caller": "<x>"},
            "recorded",
            source="self_reported",
        ),
        line(2, "os.system", {"args": ["rm -rf /"]}, "recorded", source="self_reported"),
        line(3, "execve", {"path": "/bin/sh"}, "denied", source="self_reported"),
        line(4, "open", {"path": "/tmp/x", "mode": "w"}, "recorded", source="self_reported"),
    )
    r = rules(mon)
    assert set(r) == {"code-execution", "process-attempt", "file-write"}
    assert r["code-execution"].severity is Severity.HIGH
    assert r["code-execution"].evidence["source"] == "self_reported"
    assert "possibly_forged" not in r["code-execution"].evidence
    assert r["process-attempt"].evidence["possibly_forged"] is True
    assert r["file-write"].severity is Severity.MEDIUM and len(mon.events) == 4


def test_truncation_reports_exact_counts() -> None:
    status = {
        **STATUS,
        "monitor": {"kernel": True, "truncated": True, "counts": {"kernel:socket:allowed": 20000}},
    }
    mon = judge(line(1, "socket", {}, "allowed"), status=status)
    f = rules(mon)["event-log-truncated"]
    assert f.evidence["counts"] == {"kernel:socket:allowed": 20000}
    assert any("20000" in n for n in mon.notes)


def test_read_scans_outputs_for_canaries() -> None:
    fd = P.memfd_create("manifest")
    os.write(fd, json.dumps({"notes": [CANARIES["AWS_SECRET_ACCESS_KEY"]]}).encode())
    try:
        mon = _events.read(b"", doc(STATUS), {"manifest": fd}, dropped=3)
    finally:
        os.close(fd)
    r = rules(mon)
    assert r["canary-exfiltration"].evidence == {"file": "manifest", "canaries": ["AWS_SECRET_ACCESS_KEY"]}
    assert mon.events == [] and any("3 events past" in n for n in mon.notes)


@pytest.mark.parametrize(
    "at",
    [
        0,
        _events._SEARCH_CHUNK - 5,  # across the first chunk's end
        _events._SEARCH_CHUNK,
        3 * _events._SEARCH_CHUNK - 1,
        -1,  # the very end
    ],
)
def test_canaries_are_found_anywhere_in_a_large_output(at: int) -> None:
    """The one-pass search sees a canary wherever it lies, across chunk boundaries too."""
    needle = CANARIES["HF_TOKEN"].encode()
    data = bytearray(4 * _events._SEARCH_CHUNK + 7)
    start = len(data) - len(needle) if at == -1 else at
    data[start : start + len(needle)] = needle
    data[100:108] = CANARIES["HF_TOKEN"][:8].encode()  # a prefix alone is no sighting
    fd = P.memfd_create("tensors")
    os.write(fd, bytes(data))
    try:
        found = _events._scan_outputs({"tensors": fd}, CANARIES)
    finally:
        os.close(fd)
    assert [f.evidence for f in found] == [{"file": "tensors", "canaries": ["HF_TOKEN"]}]


def test_a_canary_past_any_padding_of_the_output_is_found() -> None:
    """A payload that pads its output (here 600 MiB of holes) before the credential it copied
    is still caught: the whole output is searched."""
    needle = CANARIES["HF_TOKEN"].encode()
    fd = P.memfd_create("tensors")
    try:
        os.ftruncate(fd, 600 * 2**20)
        os.pwrite(fd, needle, 600 * 2**20 - len(needle) - 3)
        found = _events._scan_outputs({"tensors": fd}, CANARIES)
    finally:
        os.close(fd)
    assert [f.evidence for f in found] == [{"file": "tensors", "canaries": ["HF_TOKEN"]}]


def test_every_canary_in_an_output_is_named() -> None:
    fd = P.memfd_create("tensors")
    os.write(fd, bytes(2 * _events._SEARCH_CHUNK) + b"".join(v.encode() + b"\0" for v in CANARIES.values()))
    try:
        found = _events._scan_outputs({"tensors": fd}, CANARIES)
    finally:
        os.close(fd)
    assert found[0].evidence["canaries"] == sorted(CANARIES)


def test_a_canary_value_that_is_not_text_is_ignored() -> None:
    """A canary value with a lone surrogate (valid JSON: ``"\\ud800..."``) has no bytes to search
    the outputs for: ``str.encode`` raised UnicodeEncodeError out of safe_load."""
    values = {"HF_TOKEN": "\ud800" + "x" * 20, "OTHER": "tab\tseparated value", **CANARIES}
    status = doc({"canaries": {"values": values, "files": []}})
    assert dict(status.canaries) == CANARIES
    fd = P.memfd_create("tensors")
    os.write(fd, CANARIES["HF_TOKEN"].encode())
    try:
        mon = _events.read(b"", status, {"tensors": fd})
    finally:
        os.close(fd)
    assert rules(mon)["canary-exfiltration"].evidence["canaries"] == ["HF_TOKEN"]


def test_garbage_status_fields_are_ignored() -> None:
    status = {
        "canaries": {"values": {"A": 5, "B": "short"}, "files": "x"},
        "monitor": {"counts": {"k": "v", "j": -1}},
    }
    mon = judge(line(1, "socket", {}, "allowed"), status=status)
    assert mon.counts == {}


# -- the worker's filter and decoders (stdlib only, no kernel needed) -----------------------------------


def test_filter_assembles_and_checks_the_architecture_first() -> None:
    prog = _seccomp.build_filter(1234)
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096
    code, _, _, k = struct.unpack_from("<HBBI", prog, 0)
    assert (code, k) == (0x20, 4)  # load the arch field
    code, _, _, k = struct.unpack_from("<HBBI", prog, 8)
    assert k == _seccomp.AUDIT_ARCH_X86_64


def test_prlimit_of_another_process_is_reported_and_refused_as_an_attack_on_the_supervisor() -> None:
    """prlimit64 needs only the same uid, not a dumpable target: the loader could lower the
    supervisor's RLIMIT_NOFILE or RLIMIT_CPU and blind or kill it with no event at all. Its own
    limits (pid 0, as glibc's setrlimit asks, or its pid) stay the kernel's business."""
    prog = _seccomp.build_filter(1234)
    nr = _seccomp.NR_PRLIMIT64
    assert run_bpf(prog, nr, (0, 7, 0, 0)) == P.SECCOMP_RET_ALLOW
    assert run_bpf(prog, nr, (1234, 7, 0, 0)) == P.SECCOMP_RET_ALLOW
    for target in (1, 1235, 0xFFFFFFFF):
        assert run_bpf(prog, nr, (target, 7, 0, 0)) == P.SECCOMP_RET_USER_NOTIF, target
    decoder = _seccomp.Decoder(_seccomp.Memory(), 1234, frozenset())
    d = decoder.decide(_seccomp.Notification(1, 1234, nr, _seccomp.AUDIT_ARCH_X86_64, (1, 7, 0, 0, 0, 0)))
    assert d.kind == "prlimit64" and d.deny is not None and d.record
    assert d.detail == {"target": 1, "supervisor": True}
    found = rules(judge(line(1, "prlimit64", d.detail, "denied")))
    assert found["attack-supervisor"].severity is Severity.CRITICAL
    other = rules(judge(line(1, "prlimit64", {"target": 5, "supervisor": False}, "denied")))
    assert other["other-process"].severity is Severity.HIGH
    # under gVisor the plain filter refuses it in the kernel
    plain = _seccomp.build_plain_filter(1234, 1)
    assert run_bpf(plain, nr, (1, 7, 0, 0)) == P.SECCOMP_RET_ERRNO | 1
    assert run_bpf(plain, nr, (0, 7, 0, 0)) == P.SECCOMP_RET_ALLOW


def test_metadata_changes_by_descriptor_or_xattr_notify_and_name_the_descriptors_file(tmp_path: Path) -> None:
    """fchown and the xattr calls reached the kernel with no notification (the container
    profile refused the xattr ones silently), fchmod was refused everywhere with no path, and
    futimesat(fd, NULL) named no file: each is now decided like chmod, on the descriptor's file."""
    prog = _seccomp.build_filter(1234)
    for name in P.METADATA_CHANGES:
        assert run_bpf(prog, _seccomp.SYSCALLS[name]) == P.SECCOMP_RET_USER_NOTIF, name
    for name in ("fchmodat2", "setxattrat", "removexattrat"):  # the container refuses them: killed
        assert run_bpf(prog, _seccomp.SYSCALLS[name]) == _seccomp.RET_KILL_PROCESS, name
    assert run_bpf(prog, 226, arch=0x40000003) == P.SECCOMP_RET_USER_NOTIF  # i386 setxattr: foreign ABI
    decoder = _seccomp.Decoder(_seccomp.Memory(), os.getpid(), frozenset())
    scratch = tmp_path / "victim"
    scratch.write_text("x")
    attribute = ctypes.create_string_buffer(b"user.tag")
    attribute_p = ctypes.addressof(attribute)

    def decide(name: str, *args: int) -> _seccomp.Decision:
        nr = _seccomp.SYSCALLS[name]
        return decoder.decide(
            _seccomp.Notification(1, os.getpid(), nr, _seccomp.AUDIT_ARCH_X86_64, (*args, 0, 0, 0, 0, 0)[:6])
        )

    mine, system = os.open(scratch, os.O_RDONLY), os.open("/etc/hostname", os.O_RDONLY)
    try:
        for name in ("fchmod", "fchown", "fsetxattr", "fremovexattr", "futimesat"):
            d = decide(name, mine, attribute_p if "xattr" in name else 0)
            assert d.kind == name and d.deny is None and d.record, (name, d)
            assert d.detail["paths"] == [str(scratch)] and d.detail["class"] == "scratch", (name, d)
            if "xattr" in name:
                assert d.detail["attribute"] == "user.tag"
            d = decide(name, system, attribute_p if "xattr" in name else 0)
            assert d.deny is not None and d.detail["paths"] == ["/etc/hostname"], (name, d)
    finally:
        os.close(mine)
        os.close(system)
    path = ctypes.create_string_buffer(str(scratch).encode())
    d = decide("lsetxattr", ctypes.addressof(path), attribute_p)
    assert d.deny is None and d.detail["paths"] == [str(scratch)]
    found = rules(judge(line(1, "fchown", d.detail, "allowed")))
    assert "file-write" in found and str(scratch) in str(found["file-write"].evidence)
    outside = rules(judge(line(1, "fsetxattr", {"paths": ["/etc/hostname"], "class": "outside"}, "denied")))
    assert "file-change-outside" in outside


def test_scheduling_the_supervisor_is_refused_as_an_attack_and_the_loaders_own_is_its_business() -> None:
    """setpriority, ioprio_set and the sched_set* calls need only the same uid: the loader could
    renice the supervisor, pin it to a busy core or demote it to SCHED_IDLE, and so delay every
    answer it owes. Its own process and threads (pid 0, its pid) stay the kernel's business."""
    prog = _seccomp.build_filter(1234)
    affinity, setprio, ioprio = 203, _seccomp.NR_SETPRIORITY, _seccomp.NR_IOPRIO_SET
    for nr in (*_seccomp.SCHED_CALLS, setprio, ioprio):
        process = _seccomp.IOPRIO_WHO_PROCESS if nr == ioprio else _seccomp.PRIO_PROCESS
        for target in (0, 1234, 1, 1240, 0xFFFFFFFF):
            args = (process, target, 0, 0) if nr in (setprio, ioprio) else (target, 8, 0, 0)
            want = P.SECCOMP_RET_ALLOW if target in (0, 1234) else P.SECCOMP_RET_USER_NOTIF
            assert run_bpf(prog, nr, args) == want, (nr, target)
    for which in (_seccomp.PRIO_PGRP, 2):  # a process group, a user: always the supervisor's to judge
        assert run_bpf(prog, setprio, (which, 0, 0, 0)) == P.SECCOMP_RET_USER_NOTIF
    decoder = _seccomp.Decoder(_seccomp.Memory(), 1234, frozenset())

    def decide(nr: int, *args: int) -> _seccomp.Decision:
        return decoder.decide(
            _seccomp.Notification(1, os.getpid(), nr, _seccomp.AUDIT_ARCH_X86_64, (*args, 0, 0, 0, 0)[:6])
        )

    d = decide(setprio, _seccomp.PRIO_PROCESS, 1, 19)
    assert d.kind == "setpriority" and d.deny is not None and d.detail["supervisor"] is True
    d = decide(setprio, 2, 0, 19)  # every process of the uid: the supervisor's too
    assert d.deny is not None and d.detail == {"which": "user", "target": 0, "supervisor": True}
    d = decide(affinity, 1, 8, 0)
    assert d.kind == "sched_setaffinity" and d.deny is not None and d.detail["supervisor"] is True
    done = threading.Event()
    worker = threading.Thread(target=done.wait)
    worker.start()
    try:  # a thread of the caller's own process (not its main one): counted only
        assert worker.native_id is not None
        d = decide(affinity, worker.native_id, 8, 0)
    finally:
        done.set()
        worker.join()
    assert d.deny is None and not d.record
    found = rules(judge(line(1, "sched_setaffinity", {"target": 1, "supervisor": True}, "denied")))
    assert found["attack-supervisor"].severity is Severity.CRITICAL
    # under gVisor the plain filter refuses it in the kernel
    plain = _seccomp.build_plain_filter(1234, 1)
    assert run_bpf(plain, affinity, (1, 8, 0, 0)) == P.SECCOMP_RET_ERRNO | 1
    assert run_bpf(plain, affinity, (0, 8, 0, 0)) == P.SECCOMP_RET_ALLOW
    assert run_bpf(plain, setprio, (_seccomp.PRIO_PROCESS, 1, 19, 0)) == P.SECCOMP_RET_ERRNO | 1
    assert run_bpf(plain, setprio, (_seccomp.PRIO_PROCESS, 0, 19, 0)) == P.SECCOMP_RET_ALLOW
    assert run_bpf(plain, setprio, (2, 0, 19, 0)) == P.SECCOMP_RET_ERRNO | 1
    assert run_bpf(plain, ioprio, (_seccomp.IOPRIO_WHO_PGRP, 1, 0, 0)) == P.SECCOMP_RET_ERRNO | 1


def test_calls_the_container_refuses_silently_kill_the_loader_and_the_kill_is_a_finding() -> None:
    """io_uring, userfaultfd and new namespaces: the container profile answers them with an
    errno, which outranks the loader's notification, so the supervisor never saw them. The
    loader's filter kills the loader instead (outranks the errno, cannot be caught), and the
    supervisor's ``seccomp_kill`` event is a finding."""
    prog = _seccomp.build_filter(1234)
    for name in ("io_uring_setup", "userfaultfd", "unshare", "setns", "chroot", "pivot_root"):
        assert run_bpf(prog, _seccomp.SYSCALLS[name]) == _seccomp.RET_KILL_PROCESS, name
    for nr in (_seccomp.NR_IO_URING_ENTER, _seccomp.NR_IO_URING_REGISTER):
        assert run_bpf(prog, nr) == _seccomp.RET_KILL_PROCESS
    for name in ("mount", "bpf", "perf_event_open", "execve", "openat"):  # still reported
        assert run_bpf(prog, _seccomp.SYSCALLS[name]) == P.SECCOMP_RET_USER_NOTIF, name
    assert run_bpf(prog, 0) == P.SECCOMP_RET_ALLOW  # read
    f = rules(judge(line(1, "seccomp_kill", {"signal": "SIGSYS", "calls": sorted(_seccomp.KILLED)})))
    assert f["privileged-call"].severity is Severity.HIGH and f["privileged-call"].events == (1,)


def test_paths_are_walked_as_the_kernel_walks_them_for_the_caller() -> None:
    """Links before "..", and /proc/self as the caller's: a lexical normal form or the
    supervisor's own realpath (its /proc/self is PID 1) named scratch files where the kernel
    opened a canary or the input's descriptor."""
    links = {
        "/tmp/l": "/home/user/.aws/",
        "/tmp/p": "/proc/self/fd",
        "/tmp/r": "sub/x",
        "/tmp/sub/x": "../../home/user/.aws/credentials",
        "/tmp/loop": "/tmp/loop",
    }

    def readlink(path: str) -> str:
        if path in links:
            return links[path]
        raise OSError(22, "not a link")

    def resolve(path: str) -> str:
        return _seccomp.resolve(path, 77, readlink)

    assert resolve("/tmp/l/../.aws/credentials") == "/home/user/.aws/credentials"
    assert resolve("/tmp/p/1000") == "/proc/77/fd/1000"
    assert resolve("/tmp/../proc/self/fd/3") == "/proc/77/fd/3"
    assert resolve("/tmp/r") == "/home/user/.aws/credentials"
    assert resolve("/tmp/x/../y") == "/tmp/y"
    assert resolve("/proc/thread-self") == "/proc/77"
    assert resolve("/tmp/loop/a").startswith("/tmp/loop")  # a loop ends the walk
    assert resolve("/") == "/"


def test_sockaddr_decoding() -> None:
    v4 = struct.pack("<H", 2) + struct.pack(">H", 4444) + bytes([127, 0, 0, 1]) + bytes(8)
    assert _seccomp.describe_addr(_seccomp.sockaddr(v4)) == "AF_INET 127.0.0.1:4444"
    v6 = struct.pack("<H", 10) + struct.pack(">H", 80) + bytes(4) + bytes(15) + b"\x01" + bytes(4)
    assert _seccomp.describe_addr(_seccomp.sockaddr(v6)) == "AF_INET6 [::1]:80"
    unix = struct.pack("<H", 1) + b"/var/run/docker.sock\0"
    assert _seccomp.sockaddr(unix)["path"] == "/var/run/docker.sock"
    assert _seccomp.open_flags(0o1101) == "O_WRONLY|O_CREAT|O_TRUNC"


def test_what_follows_a_sandbox_probe_is_one_level_more_severe() -> None:
    probe = line(1, "openat", {"path": "/proc/self/mountinfo", "class": "probe"}, "allowed")
    write = line(
        2,
        "openat",
        {"path": "/tmp/x", "class": "scratch", "write": True, "flags": "O_WRONLY|O_CREAT"},
        "allowed",
    )
    sock = line(3, "socket", {"family": "AF_UNIX"}, "allowed")
    alone = rules(judge(write, sock))
    assert alone["file-write"].severity is Severity.MEDIUM
    assert alone["network-socket"].severity is Severity.MEDIUM
    after = rules(judge(probe, write, sock))
    assert after["environment-probe"].severity is Severity.LOW
    assert after["file-write"].severity is Severity.HIGH
    assert after["file-write"].evidence["after_probe_event"] == 1
    assert after["network-socket"].severity is Severity.HIGH
    # what came before the probe keeps its severity
    before = rules(
        judge(
            line(1, "socket", {"family": "AF_UNIX"}, "allowed"),
            line(2, "openat", {"path": "/proc/self/mountinfo", "class": "probe"}, "allowed"),
        )
    )
    assert before["network-socket"].severity is Severity.MEDIUM
    assert rules(judge(probe))["environment-probe"].severity is Severity.LOW


def test_every_event_the_judge_can_see_yields_rules_of_the_table() -> None:
    """Rule ids built at run time (``network-<call>``, the self-reported table) are in the rule
    table: every system call name, every self-reported kind, each action and the details that
    steer the judge (path classes, writes, the supervisor, an address, a fork) end in findings
    whose rules ``docs/rules.md`` and the SARIF log describe, and never in an error."""
    from sandbox._rules import RULES
    from sandbox._syscalls import X86_64

    details: list[dict[str, Any]] = [
        {},
        {"path": "/home/user/.aws/credentials", "class": "canary", "write": True},
        {"path": "/etc/x", "class": "outside", "write": True, "flags": "O_WRONLY"},
        {"path": "/tmp/x", "class": "scratch", "write": True},
        {"path": "/etc/shadow", "class": "sensitive"},
        {"path": "/.dockerenv", "class": "probe"},
        {"paths": ["/tmp/a", "/etc/b"], "class": "outside", "target": "/etc/c"},
        {"supervisor": True},
        {"family": "AF_INET", "address": "127.0.0.1", "port": 9, "target": "AF_INET 127.0.0.1:9"},
        {"style": "fork"},
        {"mode": "w", "path": "/tmp/x", "args": "['/bin/sh']", "source": "print(1)"},
    ]
    kinds = [*X86_64, "decode_error", "open", *_events._SELF_EVIDENCE]
    seen: set[str] = set()
    i = 0
    for kind in kinds:
        for action in ("denied", "allowed", "recorded"):
            for source in ("kernel", "self_reported"):
                events = []
                for d in details:
                    i += 1
                    events.append(line(i, kind, d, action, source))
                mon = judge(*events)
                seen |= {f.rule for f in mon.findings}
    assert seen - set(RULES) == set()
    assert {"network-bind", "network-sendto", "exec-attempt", "file-link", "native-code"} <= seen


def test_an_event_stream_of_tiny_lines_is_cut_lazily() -> None:
    # 16 MiB of "ab\n": splitting it whole made 5.6 million objects (~500 MB) to keep the
    # first few thousand lines
    data = bytearray(b"ab\n" * (P.MAX_EVENTS_BYTES // 3))
    tracemalloc.start()
    try:
        events, rejected = _events.parse_events(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not events and rejected > 0
    assert peak < 16 << 20, peak


def test_the_kernels_record_of_a_canary_file_is_a_credential_read() -> None:
    """An inotify event (the supervisor's watch) names the canary file whatever path the call
    used; a self-reported one of the same shape is not the kernel's and proves nothing."""
    canary = "/home/user/.aws/credentials"
    event = {"path": canary, "class": "canary", "event": "open"}
    found = rules(judge(line(1, "openat", {"path": "/tmp/x", "class": "scratch"}, "allowed"),
                        line(2, "inotify", event, "recorded")))  # fmt: skip
    assert found["canary-file-read"].evidence == {"path": canary, "seen_by": "inotify", "event": "open"}
    assert found["canary-file-read"].severity is Severity.HIGH
    assert "canary-file-read" not in rules(
        judge(line(1, "inotify", event, "recorded", source="self_reported"))
    )


def test_the_canary_watch_sees_every_use_of_a_file_by_any_path(tmp_path: Any) -> None:
    """The watch reports opens, reads, writes and removals of the watched files, through a
    link and ``..`` too, once per kind until cleared, and nothing of other files."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    creds = home / ".aws" / "credentials"
    creds.write_text("[default]\n")
    other = tmp_path / "other"
    other.write_text("x")
    (tmp_path / "link").symlink_to(home / ".aws")
    watch = _seccomp.CanaryWatch([str(creds)])
    try:
        assert watch.take() == []
        other.read_text()
        assert watch.take() == []
        for _ in range(3):
            assert (tmp_path / "link" / ".." / ".aws" / "credentials").read_text() == "[default]\n"
        inner = os.open(creds, os.O_RDONLY)
        os.close(os.open(f"/proc/self/fd/{inner}", os.O_RDONLY))
        os.close(inner)
        assert sorted(watch.take()) == [(str(creds), "open"), (str(creds), "read")]  # once each
        watch.begin()
        with open(creds, "a") as f:
            f.write("more")
        creds.unlink()
        got = {what for path, what in watch.take() if path == str(creds)}
        assert {"open", "write", "delete"} <= got
    finally:
        watch.close()


def test_the_loaders_memfds_are_refused_where_no_control_group_bounds_them() -> None:
    """Under Docker a memfd is charged to the container's memory; under bwrap nothing bounds an
    unmapped one but RLIMIT_FSIZE, per memfd: the supervisor refuses the loader's there."""
    name = ctypes.create_string_buffer(b"stash")
    note = _seccomp.Notification(
        1,
        os.getpid(),
        _seccomp.SYSCALLS["memfd_create"],
        _seccomp.AUDIT_ARCH_X86_64,
        (ctypes.addressof(name), 0, 0, 0, 0, 0),
    )
    bounded = _seccomp.Decoder(_seccomp.Memory(), os.getpid(), frozenset()).decide(note)
    assert bounded.deny is None and bounded.detail["name"] == "stash"
    unbounded = _seccomp.Decoder(_seccomp.Memory(), os.getpid(), frozenset(), memfds=False).decide(note)
    assert (
        unbounded.deny == errno.EPERM and unbounded.detail["reason"] == "no control group bounds its memory"
    )
    found = rules(judge(line(1, "memfd_create", unbounded.detail, "denied")))
    assert "executable-memory" in found
