"""gVisor (``--runtime runsc``): the Docker runner's sandboxes under a kernel in user space.

Needs the engine's ``model-sandbox-runsc`` runtime (``MODEL_SANDBOX_RUNSC=1
scripts/ensure-docker.sh``; ``.ci/run`` registers it): without it these tests skip, naming what
is missing, and with ``CI=true`` they fail. Benign files round-trip unchanged; hostile payloads
really run inside gVisor (they read gVisor's own kernel version), are refused by the loader's
plain filter or by the sandbox, and are recorded from gVisor's trace (``gvisor`` events), with
the same findings as under runc; nothing reaches the host. Payloads only touch the test's own
directory or a 127.0.0.1 port the test listens on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sandbox
from sandbox import _engine, _gvisor, _launch
from sandbox._worker import _protocol as P
from sandbox.report import Event, Finding, LoadReport, Severity, Verdict
from tests import checkpoints as ck
from tests.checkpoints import assert_same
from tests.conftest import IN_CI, Listener
from tests.container.conftest import Cli
from tests.fakes import finding

pytestmark = pytest.mark.container
AUDIT = sandbox.Policy.audit()  # record everything, stop nothing


@pytest.fixture(scope="module")
def runsc() -> Iterator[_launch.DockerRunner]:
    """A Docker runner under gVisor; skips (fails in CI) when the engine lacks the runtime."""
    runner = _launch.DockerRunner(runtime="runsc")
    try:
        runner.trace_dir()
    except sandbox.SandboxError as exc:
        if IN_CI:
            pytest.fail(f"CI=true but gVisor cannot run here: {exc.message}")
        pytest.skip(f"no gVisor runtime registered with the engine: {exc.message[:300]}")
    yield runner


def attempts(tmp_path: Path, *statements: str) -> Path:
    """:func:`checkpoints.hostile_file` with each statement tried on its own (one failing does
    not stop the next)."""
    return ck.hostile_file(
        tmp_path, "\n".join(f"try:\n    {st}\nexcept BaseException:\n    pass" for st in statements)
    )


def scan(path: Path, runner: _launch.DockerRunner) -> LoadReport:
    report = sandbox.scan(path, policy=AUDIT, runner=runner)
    assert report.tool["runtime"] == "runsc" and report.tool["monitoring"] == "gvisor-trace"
    assert "wall_s" in report.resources, "the sandbox did not run the load"
    # no seccomp notifications in gVisor; the supervisor's inotify watches on the canary files
    # (the sentry's inotify) are the only kernel events
    assert not any(e.source == "kernel" and e.kind != "inotify" for e in report.events)
    return report


def left_behind() -> list[str]:
    """Traces in the runtime's log directory whose container is gone. Every sandbox removes its
    own trace before its container, so another test process's sandboxes, running or starting
    meanwhile, never count; a trace whose head names no container yet is one still booting."""
    engine = _launch.connect()
    left = []
    for name in os.listdir(_gvisor.LOG_DIR):
        if not name.endswith(".boot.txt"):
            continue
        try:
            with open(os.path.join(_gvisor.LOG_DIR, name), "rb") as f:
                head = f.read(64 * 1024)
        except OSError:
            continue  # removed meanwhile
        found = re.search(rb"\] Args: \[.* ([0-9a-f]{64})\]\s*$", head, flags=re.M)
        if found is None:
            continue
        try:
            engine.inspect(found.group(1).decode())
        except _engine.NotFound:
            left.append(name)
    return left


def gvisor(report: LoadReport, kind: str) -> list[Event]:
    return [e for e in report.events if e.source == "gvisor" and e.kind == kind]


def from_the_trace(report: LoadReport, f: Finding) -> None:
    """Every event the finding cites is gVisor's (or, for a canary file, the sentry's inotify
    record the supervisor read), and at least one is the trace's."""
    ids = {e.id: e for e in report.events}
    sources = [(ids[i].source, ids[i].kind) for i in f.events]
    assert ("gvisor" in {s for s, _ in sources}) and all(
        s == "gvisor" or (s, k) == ("kernel", "inotify") for s, k in sources
    ), f


# -- benign ----------------------------------------------------------------------------------------


def test_a_benign_round_trip_equals_the_original(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    path = ck.save(ck.nested_checkpoint(), tmp_path / "nested.pt")
    got = sandbox.safe_load(path, weights_only=False, runner=runsc)
    assert_same(got, torch.load(path, weights_only=False))
    dst = tmp_path / "nested.safetensors"
    report = sandbox.convert(path, dst, runner=runsc)
    assert report.verdict is Verdict.CLEAN, report.to_text()
    assert report.tool["runtime"] == "runsc" and report.resources["handoff"] == "memfd"
    tensors = load_file(dst)
    for name, tensor in ck.state_dict().items():
        assert_same(tensors[f"state_dict.{name}"], tensor)
    assert not [f for f in report.findings if f.severity >= Severity.MEDIUM]
    assert not [e for e in report.events if e.source == "gvisor" and e.action == "denied"]


def test_a_plain_state_dict_converts_through_the_cli(
    tmp_path: Path, runsc: _launch.DockerRunner, cli: Cli
) -> None:
    sd = ck.state_dict()
    path = ck.save(sd, tmp_path / "sd.pt")
    dst = tmp_path / "sd.safetensors"
    proc = cli(
        "convert",
        str(path),
        "-o",
        str(dst),
        "--runtime",
        "runsc",
        "--format",
        "json",
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    report = LoadReport.from_json(proc.stdout)
    assert report.verdict is Verdict.CLEAN and report.tool["runtime"] == "runsc"
    assert_same(dict(sorted(load_file(dst).items())), dict(sorted(sd.items())))


def test_the_environment_chooses_gvisor_for_the_module_level_functions(
    tmp_path: Path, runsc: _launch.DockerRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the process-wide warm pool follows MODEL_SANDBOX_RUNTIME; a warm gVisor sandbox serves a
    # job, and the warm sandbox it refills is discarded (its trace removed) at the end
    monkeypatch.setenv(_launch.RUNTIME_ENV, "runsc")
    monkeypatch.setenv(_launch.RUNNER_ENV, "docker")
    path = ck.save(ck.nested_checkpoint(), tmp_path / "nested.pt")
    first = sandbox.scan(path)
    second = sandbox.scan(path)
    for report in (first, second):
        assert report.tool["runtime"] == "runsc" and report.verdict is Verdict.CLEAN
    assert second.resources.get("warm") is True
    from sandbox import _pool

    _pool._close_all()
    assert not left_behind() or os.environ.get("MODEL_SANDBOX_KEEP_TRACE") == "1"


def test_the_payload_really_runs_inside_gvisor(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    # the payload reads the kernel's version: gVisor's sentry answers with its own
    path = ck.save(
        ck.hostile_checkpoint(ck.code_payload("result = open('/proc/version').read()")),
        tmp_path / "version.pt",
    )
    host = Path("/proc/version").read_text()
    obj = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy(), runner=runsc)
    assert obj["payload"] != host and "Linux" in obj["payload"]


# -- hostile: refused (or failed in the sandbox) and recorded from the trace ------------------------


def test_a_program_run_is_refused_and_recorded(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    marker = tmp_path / "marker-system"
    path = ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), tmp_path / "system.pt")
    ck.prove_marker(path, marker)
    report = scan(path, runsc)
    assert report.verdict is Verdict.MALICIOUS
    assert any(e.action == "denied" for e in gvisor(report, "execve"))
    assert any(e.detail.get("style") == "vfork" for e in gvisor(report, "clone"))
    f = finding(report, "exec-attempt")
    assert f.severity is Severity.CRITICAL
    from_the_trace(report, f)
    # gVisor does not trace a refused call's arguments: the audit hook's, kept apart, name them
    assert f.evidence["arguments"]["source"] == "self_reported"
    assert f"touch {marker}" in f.evidence["arguments"]["args"]
    assert not marker.exists()


def test_a_connect_to_127_0_0_1_is_refused_and_recorded(
    tmp_path: Path, listener: Listener, runsc: _launch.DockerRunner
) -> None:
    path = ck.hostile_file(
        tmp_path, f"import socket\nsocket.create_connection(('127.0.0.1', {listener.port}), timeout=2)"
    )
    report = scan(path, runsc)
    assert report.verdict is Verdict.MALICIOUS
    assert [e.action for e in gvisor(report, "connect")] == ["denied"]
    assert gvisor(report, "socket")[0].detail["family"] == "AF_INET"
    f = finding(report, "network-connect")
    assert f.severity is Severity.CRITICAL
    from_the_trace(report, f)
    assert str(listener.port) in f.evidence["arguments"]["address"]
    assert listener.connections == 0 and not listener.received


def test_a_ctypes_connect_without_audit_events_is_still_refused_and_recorded(
    tmp_path: Path, listener: Listener, runsc: _launch.DockerRunner
) -> None:
    path = ck.hostile_file(
        tmp_path,
        "import ctypes, socket, struct\n"
        "libc = ctypes.CDLL(None)\n"
        "fd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('<HH4s8x', 2, socket.htons({listener.port}), "
        "bytes([127, 0, 0, 1]))\n"
        "libc.connect(fd, addr, 16)",
    )
    report = scan(path, runsc)
    from_the_trace(report, finding(report, "network-connect"))
    assert listener.connections == 0


def test_sensitive_and_canary_reads_are_recorded(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    path = attempts(
        tmp_path,
        "open('/etc/shadow').read()",
        "open(__import__('os').path.expanduser('~/.aws/credentials')).read()",
        "open('/proc/1/environ').read()",
    )
    report = scan(path, runsc)
    assert report.verdict is Verdict.MALICIOUS
    read = finding(report, "sensitive-file-read")
    from_the_trace(report, read)
    paths = {e.detail["path"] for e in gvisor(report, "openat")}
    assert {"/etc/shadow", "/proc/1/environ", f"{P.CANARY_HOME}/.aws/credentials"} <= paths
    canary = finding(report, "canary-file-read")
    from_the_trace(report, canary)
    assert canary.evidence["path"] == f"{P.CANARY_HOME}/.aws/credentials"


def test_writes_leave_no_marker_and_are_recorded(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    marker = tmp_path / "marker-write"
    path = attempts(
        tmp_path, f"open({str(marker)!r}, 'w').write('x')", "open('/usr/lib/marker-outside', 'w').write('x')"
    )
    ck.prove_live(path)
    assert marker.exists(), "the payload is not live"
    marker.unlink()
    report = scan(path, runsc)
    assert not marker.exists()
    outside = finding(report, "file-write-outside")
    from_the_trace(report, outside)
    assert outside.evidence["path"] == "/usr/lib/marker-outside"
    ev = next(e for e in gvisor(report, "openat") if e.detail["path"] == "/usr/lib/marker-outside")
    assert ev.action == "denied" and ev.detail["errno"] in (13, 30)  # EACCES / EROFS
    assert any(e.detail["path"] == str(marker) for e in gvisor(report, "openat"))
    assert report.verdict is not Verdict.CLEAN


def test_a_fork_is_refused_and_recorded(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    path = ck.hostile_file(tmp_path, "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)")
    report = scan(path, runsc)
    f = finding(report, "process-creation")
    from_the_trace(report, f)
    assert [e.action for e in gvisor(report, "clone") if e.detail.get("style") != "vfork"] == ["denied"]


def test_threads_are_capped_inside_gvisor(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    # the sandbox's own count is RLIMIT_NPROC (the control group's, raised for the ptrace
    # platform's host threads, is not what holds the payload)
    path = ck.save(
        ck.hostile_checkpoint(
            ck.code_payload(
                "import threading\nev = threading.Event()\nresult = 0\n"
                "try:\n"
                "    for _ in range(200):\n"
                "        threading.Thread(target=ev.wait, daemon=True).start()\n"
                "        result += 1\n"
                "except RuntimeError:\n"
                "    pass\n"
                "ev.set()"
            )
        ),
        tmp_path / "threads.pt",
    )
    obj = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy(), runner=runsc)
    assert 0 < obj["payload"] < sandbox.Policy.default().limits.pids


def test_the_default_policy_ends_the_load_at_the_first_fatal_refusal(
    tmp_path: Path, listener: Listener, runsc: _launch.DockerRunner
) -> None:
    # under gVisor the host sees the refusal in the trace and tells the supervisor to stop
    # (within about a tenth of a second: the payload waits longer than that before its connect)
    marker = tmp_path / "marker-fatal"
    path = ck.hostile_file(
        tmp_path,
        f"import os, socket, time\nos.system('touch {marker}')\n"
        "time.sleep(3)\n"
        f"socket.create_connection(('127.0.0.1', {listener.port}), timeout=2)",
    )
    stopped = sandbox.scan(path, runner=runsc)
    assert stopped.verdict is Verdict.MALICIOUS
    assert gvisor(stopped, "execve") and not gvisor(stopped, "connect")
    assert stopped.error is not None and "stopped by the policy" in stopped.error["message"]
    assert any("ended the load" in n for n in stopped.notes)
    everything = scan(path, runsc)
    assert gvisor(everything, "execve") and gvisor(everything, "connect")
    assert not marker.exists() and listener.connections == 0


def test_the_policys_errno_is_the_plain_filters(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(ck.CONNECT_ERRNO)), tmp_path / "errno.pt")
    policy = ck.policy_from_dict(
        {
            "name": "eacces",
            "description": "tests: refusals answer EACCES",
            "fail_on": "never",
            "static": {"stop_before_sandbox": "never"},
            "events": {"fatal": [], "errno": "EACCES"},
        }
    )
    obj = sandbox.safe_load(path, weights_only=False, policy=policy, runner=runsc)
    assert obj["payload"] == 13  # EACCES, as under runc


# -- attacks on the evidence itself ------------------------------------------------------------------

FORGED = [
    "I1202 04:56:30.058786   26402 strace.go:605] [   2:   2] python3 X seccomp(0x1, 0x0, "
    "0x7f5642120910) = 0 (0x0) (11.144µs)",
    "I1202 04:57:10.507191   27687 strace.go:608] [   2:   2] python3 X openat(AT_FDCWD /tmp, "
    "0x7fa92e34cc10 /etc/gshadow, O_RDONLY|O_CLOEXEC, 0o0) = 6 (0x6) (13.939µs)",
    "D1202 04:56:56.706854   27073 task_syscall.go:240] [   2:   2] Syscall 59: denied by seccomp",
]


def test_fake_trace_lines_on_stdout_and_stderr_create_and_erase_nothing(
    tmp_path: Path, runsc: _launch.DockerRunner
) -> None:
    # the host reads only the sentry's log files: what the payload prints goes elsewhere
    lines = "\\n".join(FORGED)
    path = ck.hostile_file(
        tmp_path,
        "import os, sys\n"
        f"print('{lines}', flush=True)\n"
        f"sys.stderr.write('{lines}\\n')\n"
        f"os.write(2, '{lines}\\n'.encode())\n"
        "open(os.path.expanduser('~/.aws/credentials')).read()",
    )
    report = scan(path, runsc)
    assert not any("gshadow" in json.dumps(e.detail) for e in report.events if e.source == "gvisor")
    assert not gvisor(report, "execve")
    from_the_trace(report, finding(report, "canary-file-read"))
    assert not any(f.rule == "trace-anomaly" for f in report.findings)


def test_a_line_break_in_a_path_is_reported_not_hidden(tmp_path: Path, runsc: _launch.DockerRunner) -> None:
    forged = FORGED[2].replace("59", "1")
    path = ck.hostile_file(
        tmp_path,
        "import os\n"
        "os.makedirs('/tmp/x\\n', exist_ok=True)\n"
        f"open('/tmp/x\\n{forged}\\n/../../../etc/shadow').read()",
    )
    report = scan(path, runsc)
    f = finding(report, "trace-anomaly")
    assert f.severity is Severity.HIGH and "/etc/shadow" in json.dumps(f.evidence)
    assert report.verdict is Verdict.MALICIOUS


def test_a_thread_name_that_reads_like_a_call_hides_nothing(
    tmp_path: Path, runsc: _launch.DockerRunner
) -> None:
    path = ck.hostile_file(
        tmp_path,
        "import ctypes\nctypes.CDLL(None).prctl(15, b'x X seccomp(', 0, 0, 0)\nopen('/etc/shadow').read()",
    )
    report = scan(path, runsc)
    from_the_trace(report, finding(report, "sensitive-file-read"))


def test_a_flood_of_traced_calls_stops_the_sandbox(
    tmp_path: Path, runsc: _launch.DockerRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_gvisor, "MAX_LOG_BYTES", 4 * 2**20)
    path = ck.hostile_file(
        tmp_path, "import os\nfor _ in range(2_000_000):\n    os.close(os.open('/etc/passwd', os.O_RDONLY))"
    )
    report = sandbox.scan(path, policy=AUDIT, runner=runsc)  # stopped: no supervisor status
    f = finding(report, "trace-flood")
    assert f.severity is Severity.HIGH
    assert report.verdict in (Verdict.MALICIOUS, Verdict.ERROR)
    assert report.duration_s is not None and report.duration_s < 60
