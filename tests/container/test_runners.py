"""The daemon-less path: the whole pipeline through the bubblewrap runner as an unprivileged
user with no Docker socket, and ``auto`` choosing bwrap when no engine answers.

Payloads only create a marker file in a directory the test owns.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandbox
from sandbox import _bwrap, _image
from tests import checkpoints as ck
from tests.conftest import IN_CI

NO_ENGINE = "unix:///nonexistent/model-sandbox-no-engine.sock"
# what follows it runs as uid 65534 (nobody)
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user may use (pytest's own tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="model-sandbox-unpriv-"))
    path.chmod(0o777)  # the test's own scratch directory, for uid 65534
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_auto_converts_with_the_engine_unreachable(
    tmp_path: Path, bwrap_ready: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    monkeypatch.delenv("MODEL_SANDBOX_RUNNER", raising=False)
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    report = sandbox.convert(path, runner="auto")
    assert report.verdict is sandbox.Verdict.CLEAN and report.tool["runner"] == "bwrap"
    assert (tmp_path / "sd.safetensors").exists()
    # the docker runner, asked for by name, says that no engine answers
    failed = sandbox.scan(path, runner="docker")
    assert failed.error is not None and failed.error["reference"] == "engine-unavailable"


def test_the_whole_pipeline_as_an_unprivileged_user_without_docker(
    shared_dir: Path, bwrap_ready: str
) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        if IN_CI:
            pytest.fail("CI runs as root with setpriv: this test must run there")
        pytest.skip("needs root (to become uid 65534) and setpriv")
    python, env = _python_for_nobody(shared_dir)
    nobody = pwd.getpwuid(65534).pw_name
    benign = ck.save(ck.state_dict(), shared_dir / "benign.pt")
    marker = shared_dir / "marker-unprivileged"
    hostile = ck.save(
        ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), shared_dir / "hostile.pt"
    )
    ck.prove_live(hostile)
    assert marker.exists(), "the payload is not live"
    marker.unlink()
    home = shared_dir / "home"
    home.mkdir()
    for p in (benign, hostile):
        p.chmod(0o644)
    os.chown(home, 65534, 65534)
    env.update(
        {"HOME": str(home), "DOCKER_HOST": NO_ENGINE, "PATH": "/usr/bin:/bin", "MODEL_SANDBOX_WARM": "0"}
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AS_NOBODY, python, "-m", "sandbox", *args],
            env=env,
            cwd=shared_dir,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    who = subprocess.run(
        [*AS_NOBODY, "id", "-un"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert who.stdout.strip() == nobody
    # the root filesystem root made (bwrap_ready), read-only, when that user's Python would
    # make the same one (same digest); else its own, in its own cache under HOME
    version, digest = subprocess.run(
        [
            *AS_NOBODY,
            python,
            "-c",
            "import sys; from sandbox import _image; print(sys.version); print(_image.worker_digest())",
        ],
        env=env,
        cwd=shared_dir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    if version != sys.version:  # e.g. a shared libpython it cannot reach, replaced by another
        if IN_CI:
            pytest.fail(f"uid 65534 runs Python {version}, not {sys.version}")
        pytest.skip(f"uid 65534 runs Python {version}, not {sys.version}")
    cache = _bwrap.cache_root()
    if digest == _image.worker_digest() and _bwrap._traversable(cache):
        env["XDG_CACHE_HOME"] = str(cache.parent.parent)
    out = shared_dir / "benign.safetensors"
    done = cli("convert", str(benign), "-o", str(out), "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "clean" and report["tool"]["runner"] == "bwrap"
    assert out.exists() and out.stat().st_uid == 65534

    refused = cli("convert", str(hostile), "--format", "json")
    assert refused.returncode == 1, refused.stderr
    assert json.loads(refused.stdout)["verdict"] == "malicious"  # refused, nothing written
    assert not marker.exists()
    assert not (shared_dir / "hostile.safetensors").exists()
    # scan always runs the load: the payload really ran in the bwrap sandbox, to no effect
    scanned = cli("scan", str(hostile), "--format", "json")
    assert scanned.returncode == 1, scanned.stderr
    report = json.loads(scanned.stdout)
    assert report["verdict"] == "malicious" and report["tool"]["runner"] == "bwrap"
    assert any(
        e["source"] == "kernel"
        and e["kind"] == "execve"
        and e["action"] == "denied"
        and str(marker) in " ".join(e["detail"].get("argv", []))
        for e in report["events"]
    )
    assert not marker.exists()


def _python_for_nobody(shared_dir: Path) -> tuple[str, dict[str, str]]:
    """An interpreter uid 65534 can run, with this environment's packages, and the variables
    it needs: this one where that user can reach it; else (an interpreter under root's 0700
    home, as pyenv's is) a copy of its base installation (binary, libpython, standard library)
    in the test's directory, whose site directory adds this environment's."""
    python = Path(os.path.realpath(sys.executable))
    base = Path(sys.base_prefix)
    libdir = base / "lib"
    env = {"LD_LIBRARY_PATH": os.environ["LD_LIBRARY_PATH"]} if "LD_LIBRARY_PATH" in os.environ else {}
    if _bwrap._traversable(python.parent) and os.stat(python).st_mode & 0o005 and _bwrap._traversable(libdir):
        return str(python), env
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    copy = shared_dir / "python"
    (copy / "bin").mkdir(parents=True)
    shutil.copy2(python, copy / "bin" / version)
    shutil.copytree(
        libdir / version,
        copy / "lib" / version,
        symlinks=True,
        ignore=shutil.ignore_patterns("site-packages", "test", "__pycache__"),
    )
    for lib in libdir.glob("libpython*.so*"):
        shutil.copy2(lib, copy / "lib" / lib.name, follow_symlinks=True)
    site = copy / "lib" / version / "site-packages"
    site.mkdir()
    packages = sysconfig.get_paths()["purelib"]
    (site / "this-environment.pth").write_text(f"import site; site.addsitedir({packages!r})\n")
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    env["LD_LIBRARY_PATH"] = str(copy / "lib")  # before the binary's runpath under /root
    if not _bwrap._traversable(Path(packages)):
        if IN_CI:
            pytest.fail(f"uid 65534 cannot reach this environment's packages ({packages})")
        pytest.skip(f"uid 65534 cannot reach this environment's packages ({packages})")
    return str(copy / "bin" / version), env


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (the runner starts bwrap from a thread of its own)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def _started(pid: int) -> tuple[int, str] | None:
    """``pid`` with its start time (a pid alone may name another process once it is reused:
    pid_max is 32768 on these machines), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return pid, stat[stat.rindex(")") + 2 :].split()[19]


def _alive(proc: tuple[int, str] | None) -> bool:
    """Whether that process (a pid with its start time, from :func:`_started`) still runs (not
    a zombie)."""
    if proc is None:
        return False
    try:
        stat = Path(f"/proc/{proc[0]}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and fields[19] == proc[1]


def _outliving(procs: list[tuple[int, str] | None], within_s: float) -> list[tuple[int, str]]:
    """Those of ``procs`` still running after at most ``within_s`` seconds of waiting."""
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in procs if p is not None and _alive(p)]


def test_a_bwrap_pool_is_warm_single_use_and_leaves_nothing(tmp_path: Path, bwrap_ready: str) -> None:
    plant, probe = ck.plant_and_probe(tmp_path)

    def bwraps() -> set[int]:
        return {p for p in _children(os.getpid()) if Path(f"/proc/{p}/comm").read_text().strip() == "bwrap"}

    others = bwraps()  # e.g. the process-wide pool's warm sandbox, left by an earlier test
    with sandbox.Pool(size=2, policy=ck.observe_policy(), runner="bwrap") as pool:
        pool.warm(wait=True)
        assert pool.ready == 2 and pool.name == "bwrap"
        started = [_started(p) for p in bwraps() - others]
        assert len(started) >= 2
        assert pool.safe_load(plant, weights_only=False)["payload"] == 1
        # the next file gets another sandbox: nothing the last payload left is there
        assert pool.safe_load(probe, weights_only=False)["payload"] is False
        assert pool.served_warm >= 2
    assert not _outliving(started, 5.0), "a sandbox outlived its pool"


def test_a_sigkilled_cli_leaves_no_bwrap_sandbox(tmp_path: Path, bwrap_ready: str) -> None:
    """--die-with-parent: the sandbox (and the payload in it) ends with its owner."""
    slow = ck.save(
        ck.hostile_checkpoint(ck.code_payload("import time\ntime.sleep(60)")), tmp_path / "slow.pt"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "scan", str(slow), "--runner", "bwrap"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        tree: list[int] = []
        while time.monotonic() < deadline:
            bwraps = [
                p for p in _children(proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "bwrap"
            ]
            tree = [q for p in bwraps for q in (p, *_children(p))]
            if len(tree) >= 2:  # bwrap and the supervisor in the sandbox
                break
            time.sleep(0.2)
        assert len(tree) >= 2, "the sandbox never started"
        sandboxed = [_started(p) for p in tree]
        time.sleep(2.0)  # the payload is sleeping inside the load now
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert not _outliving(sandboxed, 5.0), "the sandbox outlived its owner"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_user_namespaces_the_error_names_the_sysctls(tmp_path: Path, bwrap_ready: str) -> None:
    """A user namespace whose own ``user.max_user_namespaces`` is 0 is a host where the kernel
    refuses user namespaces: the CLI says so, naming the sysctls and their values."""
    if shutil.which("unshare") is None:
        if IN_CI:
            pytest.fail("unshare (util-linux) is missing")
        pytest.skip("unshare (util-linux) is missing")
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    cli = f"exec {sys.executable} -m sandbox scan {path} --runner bwrap --format json"
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-ec",
            f"echo 0 > /proc/sys/user/max_user_namespaces; {cli}",
        ],
        env={**os.environ, "XDG_CACHE_HOME": str(_bwrap.cache_root().parent.parent)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["verdict"] == "error" and report["error"]["reference"] == "engine-unavailable"
    message = report["error"]["message"]
    assert "cannot create the sandbox's user namespace" in message
    assert "user.max_user_namespaces=0" in message
    assert "kernel.unprivileged_userns_clone=" in message
    assert "kernel.apparmor_restrict_unprivileged_userns=" in message
