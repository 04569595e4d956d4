"""Hostile checkpoints really run their payload inside the sandbox; nothing reaches the host.

Each payload is first proven live: plain ``torch.load`` in a throw-away subprocess (what a
victim would run) leaves the marker. Then the same file goes through the sandbox and the test
proves the marker is absent, the listener got nothing, and no secret came back.
Payloads only ever touch a directory the test owns or a 127.0.0.1 port the test listens on.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import sandbox
from sandbox._worker import _protocol as P
from tests import checkpoints as ck
from tests.conftest import Listener

# every test once per runner (Docker and bubblewrap): the same payloads, the same assertions
pytestmark = pytest.mark.usefixtures("each_runner")


def load_in_sandbox(path: Path) -> tuple[Any, sandbox.LoadReport]:
    """What the payload left in the loaded structure (the sandbox always runs, and hands back
    the validated data even of a hostile file), and the report of a second, scanning load."""
    try:
        obj = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
        value = obj.get("payload") if isinstance(obj, dict) else None
    except sandbox.LoadFailed as exc:  # the payload broke the load: an answer too
        assert exc.report is not None
        value = None
    report = sandbox.scan(path)
    assert "wall_s" in report.resources, "the sandbox did not run the load"
    assert report.tool["runner"] == os.environ["MODEL_SANDBOX_RUNNER"]
    return value, report


def kernel_events(report: sandbox.LoadReport, kind: str) -> list[sandbox.Event]:
    return [e for e in report.events if e.source == "kernel" and e.kind == kind]


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_command_execution_never_reaches_the_host(tmp_path: Path, fmt: str) -> None:
    # CWE-502 classic: REDUCE of os.system with a shell command
    marker = tmp_path / "marker-system"
    payload = ck.Reduce(os.system, f"touch {marker}")
    path = ck.save(ck.hostile_checkpoint(payload), tmp_path / f"system.{fmt}", fmt)
    ck.prove_live(path)
    assert marker.exists(), "the payload is not live"
    marker.unlink()

    value, report = load_in_sandbox(path)
    assert not marker.exists()
    assert value != 0  # no shell in the image, and exec is refused: os.system failed
    # ...and the kernel saw the attempt, with the command line
    assert any(
        str(marker) in " ".join(e.detail.get("argv", [])) and e.action == "denied"
        for e in kernel_events(report, "execve")
    )


def test_python_level_file_creation_never_reaches_the_host(tmp_path: Path) -> None:
    marker = tmp_path / "marker-exec"
    payload = ck.exec_payload(f"open({str(marker)!r}, 'w').write('pwned')")
    path = ck.save(ck.hostile_checkpoint(payload), tmp_path / "exec.pt")
    ck.prove_live(path)
    assert marker.read_text() == "pwned"
    marker.unlink()

    _, report = load_in_sandbox(path)
    assert not marker.exists()
    # the payload ran, and found no such place: the host's directories are not there
    assert report.error is not None and "No such file or directory" in report.error["message"]


def test_connection_to_a_host_listener_gets_nothing(tmp_path: Path, listener: Listener) -> None:
    code = f"""
import socket
try:
    s = socket.create_connection(("127.0.0.1", {listener.port}), timeout=3)
    s.sendall(b"pwned")
    s.close()
    result = "connected"
except OSError as exc:
    result = "failed: " + repr(exc)
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "net.pt")
    assert "connected" in ck.prove_live(path)
    deadline = time.monotonic() + 5
    while bytes(listener.received) != b"pwned" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bytes(listener.received) == b"pwned", "the payload is not live"
    listener.received.clear()
    listener.connections = 0

    value, report = load_in_sandbox(path)
    time.sleep(0.5)
    assert listener.connections == 0 and not listener.received
    assert value.startswith("failed")
    assert any(
        e.detail.get("port") == listener.port and e.action == "denied"
        for e in kernel_events(report, "connect")
    )


def test_host_secret_file_is_not_readable(tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    token = f"SECRET-{uuid.uuid4().hex}"
    secret.write_text(token)
    code = f"""
try:
    result = open({str(secret)!r}).read()
except OSError as exc:
    result = "absent: " + repr(exc)
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "file-secret.pt")
    assert token in ck.prove_live(path), "the payload is not live"

    value, report = load_in_sandbox(path)
    assert value.startswith("absent")
    assert token not in report.to_json()


def test_host_environment_is_not_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = f"ENVSECRET-{uuid.uuid4().hex}"
    monkeypatch.setenv("MODEL_SANDBOX_TEST_SECRET", token)
    # os.environ, and the block the kernel keeps from the last exec (/proc/self/environ)
    code = """import os
try:
    with open("/proc/self/environ", "rb") as f:
        block = f.read()
except OSError as exc:
    block = repr(exc).encode()
result = (sorted(os.environ.items()), block)"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "env-secret.pt")
    assert token in ck.prove_live(path, env={"MODEL_SANDBOX_TEST_SECRET": token})

    value, report = load_in_sandbox(path)
    assert token not in repr(value) and token not in report.to_json()
    items, block = value
    # the supervisor's exec had no variables at all (the loader is its fork)
    assert block == b"", block[:200]
    env = dict(items)
    # nothing of the host's, nor what the engine injects (PATH, HOSTNAME, HOME)
    assert not set(env) & {"PATH", "HOSTNAME", "MODEL_SANDBOX_TEST_SECRET"}
    assert env["HOME"] == P.CANARY_HOME
    # what the loader does see is the canaries: fake credentials whose use is evidence
    assert set(env) - {"HOME"} <= CANARY_NAMES


CANARY_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "OPENAI_API_KEY", "GITHUB_TOKEN"}


def test_writes_outside_the_sandbox_scratch_fail(tmp_path: Path) -> None:
    marker = tmp_path / "marker-write"
    targets = [
        str(marker),
        "/etc/passwd",
        "/opt/python/bin/python3",
        "/run/sandbox/x",
        "/new-file-in-root",
        "/usr/lib/evil.so",
        "/proc/1/environ",
    ]
    code = f"""
import os
result = []
# the input arrives as a read-only descriptor: reopening it (or any file the loader opened)
# for writing must fail too; only inside the sandbox (uid 65534), never in the live proof
inputs = [f"/proc/self/fd/{{fd}}" for fd in list(range(3, 64)) + [1000]
          if os.getuid() == 65534 and os.path.exists(f"/proc/self/fd/{{fd}}")
          and os.readlink(f"/proc/self/fd/{{fd}}").startswith("/")
          and not os.readlink(f"/proc/self/fd/{{fd}}").startswith(("/memfd:", "/dev/"))]
for t in {targets!r} + inputs:
    try:
        with open(t, "ab") as f:
            f.write(b"x")
        result.append(t)
    except OSError:
        pass
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "writes.pt")
    path.chmod(0o666)  # even a world-writable input: the sandbox gets a copy it cannot change
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(marker) in ck.prove_live(path)
    assert marker.exists(), "the payload is not live"
    marker.unlink()

    value, _ = load_in_sandbox(path)
    assert not marker.exists()
    assert value == [], f"writes that succeeded in the sandbox: {value}"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # input untouched


def test_tmp_is_writable_but_not_executable(tmp_path: Path) -> None:
    code = """
import os
with open("/tmp/tool", "w") as f:
    f.write("#!/opt/python/bin/python3\\nprint('hi')\\n")
os.chmod("/tmp/tool", 0o755)
try:
    os.execv("/tmp/tool", ["/tmp/tool"])
except OSError as exc:
    result = "refused: " + repr(exc)
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "tmpexec.pt")
    value, _ = load_in_sandbox(path)
    assert value.startswith("refused")


def test_weights_changed_by_tensor_metadata_are_flagged(tmp_path: Path) -> None:
    # Only allowlisted globals (torch._utils._rebuild_tensor_v2 with a {"neg": True} metadata
    # dict), yet torch.load returns weights that are not the bytes in the file. The static
    # reconstruction notices the bit; the sandboxed load returns what torch returns.
    w = torch.arange(6, dtype=torch.float32)
    path = tmp_path / "neg.pt"
    torch.save({"w": w._neg_view(), "b": torch.ones(3)}, path)
    report = sandbox.scan(path)
    assert any(f.rule == "tensor-metadata-bits" and f.evidence["tensor"] == "w" for f in report.findings)
    assert report.verdict is sandbox.Verdict.SUSPICIOUS
    got = sandbox.safe_load(path)  # suspicious is below the default refusal
    assert torch.equal(got["w"], -w)


def test_sandbox_weights_are_compared_with_the_file(tmp_path: Path) -> None:
    # A plain state dict: rebuilt from the archive without any unpickler and compared with
    # what the sandboxed loader returned, byte for byte; nothing to report (a comparison
    # that could not run would say so with a "weights-unverified" finding).
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    report = sandbox.scan(path)
    assert report.verdict is sandbox.Verdict.CLEAN and not report.findings


# The loader imports numpy before its filter goes in, and OpenBLAS starts its worker threads
# then: a filter installed without SECCOMP_FILTER_FLAG_TSYNC binds only the installing thread.
# This payload hands libc's creat() to OpenBLAS's pre-started worker through its exported
# exec_blas (queue item: routine at 0, args at 24, next at 64): that thread's call must
# notify the supervisor like any other.
_BLAS_THREAD = """
import ctypes, glob, os, numpy
libc = ctypes.CDLL(None, use_errno=True)
libs = os.path.join(os.path.dirname(numpy.__file__), '..', 'numpy.libs', '*openblas*')
blas = ctypes.CDLL(sorted(glob.glob(libs))[0])
path = ctypes.create_string_buffer(b'/tmp/blas-thread-marker')
q0, q1 = ctypes.create_string_buffer(1024), ctypes.create_string_buffer(1024)
def put(buf, off, val):
    ctypes.c_void_p.from_buffer(buf, off).value = val
put(q0, 0, ctypes.cast(libc.getpid, ctypes.c_void_p).value)
put(q0, 64, ctypes.addressof(q1))
put(q1, 0, ctypes.cast(libc.creat, ctypes.c_void_p).value)
put(q1, 24, ctypes.addressof(path))
put(q1, 32, 0o644)
blas.exec_blas(ctypes.c_long(2), q0)
filters = [
    open(f'/proc/self/task/{t}/status').read().split('Seccomp_filters:')[1].split()[0]
    for t in os.listdir('/proc/self/task')
]
result = (os.path.exists('/tmp/blas-thread-marker'), filters)
"""


def test_threads_started_before_the_filter_are_monitored(tmp_path: Path) -> None:
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(_BLAS_THREAD)), tmp_path / "blas.pt")
    value, report = load_in_sandbox(path)
    assert value is not None, report.to_text()
    created, filters = value
    assert created  # the worker thread ran creat()
    assert len(filters) > 1 and len(set(filters)) == 1, filters  # every thread: the same filters
    opens = [e for e in report.events if e.source == "kernel" and "blas-thread-marker" in str(e.detail)]
    assert opens, report.to_text()


def test_path_changes_without_an_open_are_recorded(tmp_path: Path) -> None:
    # A file's contents, a directory or a timestamp change without any open(): truncate(2),
    # mkdir(2), rmdir(2), utimensat(2) and chown(2) name a path, like unlink(2) and rename(2)
    # do, and the report must name it; mknod(2), which the container refuses, kills the loader
    # (a refusal the supervisor would never see).
    victim, made, gone, node = (tmp_path / n for n in ("victim", "made-dir", "gone-dir", "node"))
    victim.write_text("precious")
    gone.mkdir()
    code = f"""
import os
for call, args in [(os.truncate, ({str(victim)!r}, 0)), (os.mkdir, ({str(made)!r},)),
                   (os.rmdir, ({str(gone)!r},)), (os.utime, ({str(victim)!r}, (0, 0))),
                   (os.chown, ({str(victim)!r}, os.getuid(), os.getgid())),
                   (os.truncate, ("/opt/python/bin/python3", 0)),
                   (os.mknod, ({str(node)!r},))]:  # last: the container refuses it, the filter kills
    try:
        call(*args)
    except OSError:
        pass
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "paths.pt")
    ck.prove_live(path)
    assert victim.read_text() == "" and made.is_dir() and not gone.exists() and node.exists()
    assert victim.stat().st_mtime == 0, "the payload is not live"

    _, report = load_in_sandbox(path)
    kernel = [e for e in report.events if e.source == "kernel"]
    for kinds, target in [
        ("truncate", victim),
        ("mkdir mkdirat", made),
        ("rmdir unlinkat", gone),
        ("utimensat utimes utime futimesat", victim),
        ("chown lchown fchownat", victim),
    ]:  # whichever of a family libc calls
        assert [e for e in kernel if e.kind in kinds.split() and str(target) in str(e.detail)], kinds
    # the test's directory lies in the sandbox's scratch /tmp: scratch changes; the image's
    # own files are outside it, and the attempt is refused
    assert any(f.rule == "file-write" and str(victim) in str(f.evidence) for f in report.findings)
    outside = [e for e in kernel if e.kind == "truncate" and "/opt/python/bin/python3" in str(e.detail)]
    assert outside and outside[0].action == "denied", report.to_text()
    assert any(f.rule == "file-change-outside" for f in report.findings)
    assert [e for e in kernel if e.kind == "seccomp_kill" and "mknod" in e.detail["calls"]]


# What each call of the payload below does to one file in a directory the test owns (on the
# host: the live proof) or in the sandbox's scratch /tmp (the same path inside it): xattr
# changes by path, link and descriptor, and the descriptor-based metadata calls, on a
# descriptor opened read-only (enough for the file's owner), as libc or a ctypes payload makes
# them: fchmod, fchown, futimens, futimesat(fd, NULL), and fchownat/utimensat(fd, "",
# AT_EMPTY_PATH); then the calls in {last} (one kills the loader). Each result is "ok" or the
# errno's name, so a test can see what reached the kernel.
_METADATA_BY_FD = """
import ctypes, errno, os
d = {directory!r}
os.makedirs(d, exist_ok=True)
f = os.path.join(d, "victim")
with open(f, "w") as out:
    out.write("precious")
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    if libc.syscall(ctypes.c_long(nr), *args) < 0:
        raise OSError(ctypes.get_errno(), "")
L = ctypes.c_long
EMPTY = 0x1000  # AT_EMPTY_PATH
class XattrArgs(ctypes.Structure):  # struct xattr_args (setxattrat)
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]
val = ctypes.create_string_buffer(b"1")
xa = XattrArgs(ctypes.addressof(val), 1, 0)
fd = os.open(f, os.O_RDONLY)
uid, gid = os.getuid(), os.getgid()
calls = [
    ("setxattr", lambda: os.setxattr(f, "user.m", b"1")),
    ("lsetxattr", lambda: os.setxattr(f, "user.l", b"1", follow_symlinks=False)),
    ("fsetxattr", lambda: os.setxattr(fd, "user.f", b"1")),
    ("removexattr", lambda: os.removexattr(f, "user.m")),
    ("lremovexattr", lambda: os.removexattr(f, "user.l", follow_symlinks=False)),
    ("fremovexattr", lambda: os.removexattr(fd, "user.f")),
    ("fchmod", lambda: os.fchmod(fd, 0o640)),
    ("fchown", lambda: os.fchown(fd, uid, gid)),
    ("futimens", lambda: os.utime(fd, (5, 5))),
    ("futimesat", lambda: sc(261, L(fd), None, None)),
    ("fchownat", lambda: sc(260, L(fd), b"", L(uid), L(gid), L(EMPTY))),
    ("utimensat", lambda: sc(280, L(fd), b"", None, L(EMPTY))),
]
newer = {{
    "fchmodat2": lambda: sc(452, L(fd), b"", L(0o600), L(EMPTY)),
    "setxattrat": lambda: sc(463, L(-100), f.encode(), L(0), b"user.a", ctypes.byref(xa), L(16)),
    "removexattrat": lambda: sc(466, L(-100), f.encode(), L(0), b"user.a"),
}}
result = {{}}
for name, call in calls + [(n, newer[n]) for n in {last}]:
    try:
        call()
        result[name] = "ok"
    except OSError as e:
        result[name] = errno.errorcode.get(e.errno, str(e.errno))
os.close(fd)
"""


def test_metadata_changes_by_descriptor_or_xattr_are_recorded(tmp_path: Path) -> None:
    # Extended attributes (setxattr(2) and removexattr(2), by path, by link, by descriptor and
    # the *xattrat calls of Linux 6.13) and the descriptor forms of chmod, chown and utime change
    # a file without an open for writing: a payload's way to tag or re-time a file (or hide
    # that it changed it) with no trace. Each must be named in the report with its file, and
    # decided like chmod(2): in the sandbox's scratch space let through and recorded.
    assert str(tmp_path).startswith("/tmp/"), "the payload's directory must lie in the sandbox's /tmp"
    code = _METADATA_BY_FD.format(directory=str(tmp_path / "meta"), last=[])
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "meta.pt")
    live = ck.prove_live(path)
    assert "'fchmod': 'ok'" in live and "'futimens': 'ok'" in live, live
    victim = str(tmp_path / "meta" / "victim")

    value, report = load_in_sandbox(path)
    assert isinstance(value, dict), report.to_text()
    kernel = [e for e in report.events if e.source == "kernel"]
    unseen = []
    for call, kinds in [
        ("setxattr", "setxattr"),
        ("lsetxattr", "lsetxattr"),
        ("fsetxattr", "fsetxattr"),
        ("removexattr", "removexattr"),
        ("lremovexattr", "lremovexattr"),
        ("fremovexattr", "fremovexattr"),
        ("fchmod", "fchmod"),
        ("fchown", "fchown"),
        ("futimens", "utimensat"),
        ("futimesat", "futimesat"),
        ("fchownat", "fchownat"),
        ("utimensat", "utimensat"),
    ]:
        if not [e for e in kernel if e.kind == kinds and victim in str(e.detail)]:
            unseen.append(f"{call} ({value.get(call)})")
    assert not unseen, f"no kernel event names {victim} for: {unseen}"
    # let through in the scratch space (the kernel answers as it would for the file's owner)
    for call in ("fchmod", "fchown", "futimens", "futimesat", "fchownat", "utimensat"):
        assert value[call] == "ok", (call, value)
    assert value["fsetxattr"] in ("ok", "EOPNOTSUPP"), value  # tmpfs has user.* xattrs since 6.6
    xattr = [e for e in kernel if e.kind == "fsetxattr"]
    assert xattr[0].action == "allowed" and xattr[0].detail["attribute"] == "user.f", xattr
    assert any(
        f.rule == "file-write" and "paths" in f.evidence and victim in str(f.evidence)
        for f in report.findings
    )
    assert not [f for f in report.findings if f.rule == "file-change-outside"], report.to_text()


@pytest.mark.parametrize("call", ["fchmodat2", "setxattrat", "removexattrat"])
def test_metadata_calls_the_container_refuses_kill_the_loader(tmp_path: Path, call: str) -> None:
    # fchmodat2 (Linux 6.6) and setxattrat/removexattrat (6.13) are newer than the engine's
    # libseccomp: the container refuses them (ENOSYS under Docker, EPERM under bwrap), an errno
    # the supervisor never sees. Like mknod, they kill the loader, and the kill is recorded.
    assert str(tmp_path).startswith("/tmp/"), "the payload's directory must lie in the sandbox's /tmp"
    code = _METADATA_BY_FD.format(directory=str(tmp_path / "meta"), last=[call])
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "newer.pt")
    ck.prove_live(path)

    _, report = load_in_sandbox(path)
    kills = kernel_events(report, "seccomp_kill")
    assert kills and call in kills[0].detail["calls"], report.to_text()
    assert any(f.rule == "privileged-call" for f in report.findings)
