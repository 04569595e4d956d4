"""Bad input gets a clear, typed error; limits end the load and name themselves; the CLI's
exit codes follow the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import sandbox
from tests import checkpoints as ck
from tests.container.conftest import Cli


def policy(**limits: float) -> sandbox.Policy:
    """Tight limits; the sandbox always runs, and the limit's error is what comes back."""
    policy: sandbox.Policy = ck.observe_policy(**limits)  # type: ignore[arg-type]
    return policy


def over_limit(tmp_path: Path, code: str, name: str, **limits: float) -> sandbox.LimitExceeded:
    """``safe_load`` of a file (``name``) whose payload runs ``code``, under :func:`policy`
    with ``limits``: the LimitExceeded it must raise."""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / name)
    with pytest.raises(sandbox.LimitExceeded) as info:
        sandbox.safe_load(path, weights_only=False, policy=policy(**limits))
    return info.value


def test_truncated_zip_is_malformed(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "full.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(sandbox.MalformedInput) as info:
        sandbox.safe_load(cut)
    assert "zip" in str(info.value)
    assert info.value.report is not None and info.value.report.verdict is sandbox.Verdict.ERROR


def test_corrupt_legacy_file_fails_clearly(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "legacy.pt", "legacy")
    data = bytearray(path.read_bytes())
    cut = tmp_path / "legacy-cut.pt"
    cut.write_bytes(bytes(data[: len(data) - 40]))
    with pytest.raises(sandbox.LoadFailed) as info:
        sandbox.safe_load(cut)
    assert info.value.report is not None


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(sandbox.MalformedInput, match="empty"):
        sandbox.safe_load(tmp_path / "empty.pt")


def test_unknown_bytes_are_unsupported(tmp_path: Path) -> None:
    (tmp_path / "noise.bin").write_bytes(bytes(range(7, 256)) * 10)
    with pytest.raises(sandbox.UnsupportedFormat) as info:
        sandbox.safe_load(tmp_path / "noise.bin")
    assert info.value.detected == "unknown"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated
def test_torchscript_loads_as_its_state_dict(tmp_path: Path) -> None:
    """TorchScript archives were refused; they load in the sandbox now (tests/container/
    test_formats.py has the conversions and a hostile archive)."""
    linear = torch.nn.Linear(2, 2)
    torch.jit.script(linear).save(str(tmp_path / "ts.pt"))  # type: ignore[no-untyped-call]
    got = sandbox.safe_load(tmp_path / "ts.pt")
    assert sorted(got) == ["bias", "weight"]
    assert torch.equal(got["weight"], linear.weight.detach())


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(sandbox.InputNotFound):
        sandbox.safe_load(tmp_path / "nope.pt")
    with pytest.raises(sandbox.InputNotFound):
        sandbox.safe_load(tmp_path)


def test_pinned_hash_mismatch_refuses_before_loading(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(sandbox.HashMismatch):
        sandbox.safe_load(path, expected_sha256="0" * 64)


@pytest.mark.usefixtures("each_runner")
def test_odd_file_names(tmp_path: Path) -> None:
    odd = tmp_path / "we:ird, name ü $(x) 'q'.pt"
    ck.save(ck.state_dict(), odd)
    assert torch.equal(sandbox.safe_load(odd)["encoder.bias"], ck.state_dict()["encoder.bias"])
    link = tmp_path / "link.pt"
    link.symlink_to(odd)
    assert sandbox.scan(link).verdict is sandbox.Verdict.CLEAN


@pytest.mark.usefixtures("each_runner")
def test_unreadable_by_others_is_staged(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "private.pt")
    os.chmod(path, 0o600)
    assert sandbox.scan(path).verdict is sandbox.Verdict.CLEAN


@pytest.mark.usefixtures("each_runner")
def test_wall_clock_limit(tmp_path: Path) -> None:
    exceeded = over_limit(tmp_path, "import time\ntime.sleep(60)", "sleep.pt", wall_clock_s=3)
    assert exceeded.limit == "wall_clock"
    report = exceeded.report
    assert report is not None and report.duration_s is not None and report.duration_s < 30
    assert any(f.category == "resource" for f in report.findings)


def test_memory_limit(tmp_path: Path, each_runner: str) -> None:
    exceeded = over_limit(tmp_path, "blob = b'x' * (2 * 1024 ** 3)", "membomb.pt", memory_mb=768)
    assert exceeded.limit == "memory"
    report = exceeded.report
    assert report is not None and report.tool["runner"] == each_runner
    (f,) = [f for f in report.findings if f.rule == "limit-memory"]
    assert f.evidence["enforced_by"] == ("rlimit" if each_runner == "bwrap" else "engine")


def test_memfds_past_the_memory_limit_are_killed_or_refused(tmp_path: Path, each_runner: str) -> None:
    """A memfd's pages are charged to Docker's control group, but RLIMIT_AS (the bwrap runner's
    only bound) counts them only while mapped: written with write(), 48 memfds of 32 MiB held
    1.5 GiB past a 1 GiB limit, each within the output cap. Docker kills the load at its
    limit; the bwrap runner refuses the loader's own memfds, with kernel evidence."""
    code = """
import os
fds = []
for i in range(48):
    fd = os.memfd_create('m%d' % i)
    fds.append(fd)
    for _ in range(32):
        os.write(fd, b'x' * (1 << 20))
"""
    path = ck.save({"r": ck.code_payload(code)}, tmp_path / "memfds.pt")
    with pytest.raises(sandbox.SandboxError) as info:
        sandbox.safe_load(path, weights_only=False, policy=policy(memory_mb=1024))
    if each_runner == "docker":
        assert isinstance(info.value, sandbox.LimitExceeded) and info.value.limit == "memory"
        return
    assert isinstance(info.value, sandbox.LoadFailed) and "PermissionError" in str(info.value)
    report = info.value.report
    assert report is not None
    (refused,) = [e for e in report.events if e.kind == "memfd_create"]
    assert refused.source == "kernel" and refused.action == "denied" and refused.detail["name"] == "m0"


@pytest.mark.parametrize("how", ["tensor", "descriptors"])
@pytest.mark.usefixtures("each_runner")
def test_output_flood(tmp_path: Path, how: str) -> None:
    """Outputs live in memfds charged to the container; the output cap is the loader's file-size
    limit: a 40 MB tensor from a tiny file, or raw writes into the inherited output descriptors,
    end at the cap."""
    code = {
        "tensor": "import torch\nresult = torch.ones(10_000_000)",
        "descriptors": """
import os
for fd in range(3, 64):
    try:
        if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
            for _ in range(40):
                os.write(fd, b"x" * (1024 * 1024))
    except OSError as exc:
        if exc.errno == 27:  # EFBIG: the cap
            raise
""",
    }[how]
    assert over_limit(tmp_path, code, "flood.pt", output_mb=16).limit == "output_bytes"


def test_nothing_can_be_planted_where_the_host_looks(tmp_path: Path) -> None:
    """The only host path inside is the channel's directory, read-only; the host reads nothing
    from it but the socket. Planting a forged status, a link or a second socket there fails,
    and the kernel saw the attempts."""
    code = """
import os, socket
result = []
for attempt in (lambda: os.symlink("/etc/passwd", "/run/sandbox/manifest"),
                lambda: open("/run/sandbox/status", "w").write("{}"),
                lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).bind("/run/sandbox/c2"),
                lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect("/run/sandbox/channel")):
    try:
        attempt()
        result.append("succeeded")
    except OSError as exc:
        result.append(exc.errno)
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "plant.pt")
    got = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
    assert "succeeded" not in got["payload"], got["payload"]
    report = sandbox.scan(path, policy=ck.observe_policy())
    assert report.error is None and report.verdict is sandbox.Verdict.MALICIOUS
    kinds = {e.kind for e in report.events if e.source == "kernel" and e.action == "denied"}
    assert {"symlink", "connect"} <= kinds, kinds


def test_cli_exit_codes_and_formats(tmp_path: Path, cli: Cli) -> None:
    good = ck.save(ck.state_dict(), tmp_path / "good.pt")
    proc = cli("scan", str(good), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "clean"

    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    proc = cli("scan", str(good), str(tmp_path / "bad.pt"))
    assert proc.returncode == 2
    assert "ERROR" in proc.stdout and "CLEAN" in proc.stdout

    proc = cli("convert", str(good), "-o", str(tmp_path / "out" / "good.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "good.safetensors").exists()
    assert (tmp_path / "out" / "good.safetensors.report.json").exists()

    proc = cli("report", "render", str(tmp_path / "out" / "good.safetensors.report.json"))
    assert proc.returncode == 0 and "CLEAN" in proc.stdout

    proc = cli("scan", str(tmp_path / "missing.pt"))
    assert proc.returncode == 2 and "input-not-found" in proc.stdout + proc.stderr


def scan_a_sleeper(
    tmp_path: Path, client: Any, output: int = subprocess.DEVNULL
) -> tuple[subprocess.Popen[str], list[str]]:
    """Start the CLI's scan of a file whose payload sleeps for two minutes (its stdout and
    stderr to ``output``) and wait, 60 s at most, for its sandbox: the process, and the ids of
    the worker containers it started (none: the sandbox never started)."""
    import time

    from sandbox._launch import LABEL, OWNER_LABEL

    before = {c["Id"] for c in client.containers([f"{LABEL}=worker"])}
    payload = ck.code_payload("import time\ntime.sleep(120)")
    path = ck.save(ck.hostile_checkpoint(payload), tmp_path / "slow.pt")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "scan", str(path)], stdout=output, stderr=output, text=True
    )
    owner = f"{os.uname().nodename}:{proc.pid}"  # its containers, not another test process's
    try:
        deadline = time.monotonic() + 60
        ours: list[str] = []
        while not ours and time.monotonic() < deadline:
            running = client.containers([f"{LABEL}=worker", f"{OWNER_LABEL}={owner}"], running=True)
            ours = [c["Id"] for c in running if c["Id"] not in before]
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, ours


@pytest.mark.serial  # another process's orphan sweep would remove what this test watches
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_cli_leaves_no_container(tmp_path: Path, sig: str) -> None:
    import signal
    import time

    from sandbox._launch import LABEL, connect

    client = connect()
    proc, ours = scan_a_sleeper(tmp_path, client, output=subprocess.PIPE)
    try:
        assert ours, "the sandbox container never started"
        time.sleep(1.0)
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [c["Id"] for c in client.containers([f"{LABEL}=worker"]) if c["Id"] in ours]
    assert not left, f"{sig} left the sandbox container behind"
    assert proc.returncode != 0


@pytest.mark.serial  # another process's orphan sweep would remove what this test watches
def test_sigkilled_cli_container_is_swept_by_the_next_run(tmp_path: Path) -> None:
    import signal

    from sandbox._launch import DockerRunner, connect

    client = connect()
    proc, ours = scan_a_sleeper(tmp_path, client)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert ours, "the sandbox container never started"
    still = [c["Id"] for c in client.containers() if c["Id"] in ours]
    assert still, "nothing to sweep: the container vanished by itself"
    _ = DockerRunner().engine  # a new run sweeps containers whose owner is dead
    left = [c["Id"] for c in client.containers() if c["Id"] in ours]
    assert not left


def _torch_raises(path: Path) -> type[BaseException]:
    """What plain torch.load raises for a (benign but broken) file, run in this process: the
    files here carry no payload."""
    try:
        torch.load(path, weights_only=False)
    except Exception as exc:  # the type is the point
        return type(exc)
    raise AssertionError(f"torch.load accepted {path}")


def test_broken_files_raise_what_torch_raises(tmp_path: Path) -> None:
    """Code written for torch keeps catching what it caught: the typed error of each broken
    file is also an instance of the class torch.load raises for it."""
    full = ck.save(ck.state_dict(), tmp_path / "full.pt")
    cut_zip = tmp_path / "cut.pt"
    cut_zip.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    legacy = ck.save(ck.state_dict(), tmp_path / "legacy.pt", "legacy")
    cut_legacy = tmp_path / "legacy-cut.pt"
    cut_legacy.write_bytes(legacy.read_bytes()[:60])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pt"
    text.write_bytes(b"these are not weights\n" * 10)
    for path in (cut_zip, cut_legacy, empty, text):
        expected = _torch_raises(path)
        with pytest.raises(sandbox.SandboxError) as info:
            sandbox.safe_load(path)
        assert isinstance(info.value, expected), (path.name, type(info.value), expected)


def test_a_refused_file_is_an_unpickling_error_with_its_report(tmp_path: Path) -> None:
    """As torch.load(weights_only=True) raises UnpicklingError for a file that imports what
    it will not load; the report rides along."""
    import pickle

    marker = tmp_path / "marker"
    path = ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError) as info:
        sandbox.safe_load(path)
    assert isinstance(info.value, sandbox.SandboxViolation)
    assert info.value.report.verdict is sandbox.Verdict.MALICIOUS
    assert not marker.exists()
