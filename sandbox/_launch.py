"""Stage 2, host: Policy -> ContainerSpec + Job (pure) -> Runner -> DockerRunner.

The Docker engine is spoken to through :mod:`._engine` (the API on its local socket).
:class:`ContainerSpec` is a frozen, typed description of one disposable container (everything
fixed when it starts: image, limits, profile); a :class:`Job` is what one load asks of it (its
config and the input descriptor), sent over the channel (:mod:`._channel`), so a container can
be started before its job exists. :meth:`ContainerSpec.engine_config` is the one place that
turns a spec into the engine's container configuration, so unit tests can assert every
hardening option without a daemon. :class:`DockerRunner` starts
:class:`Sandbox` es; a sandbox runs exactly one job and is always removed (success, error,
timeout, Ctrl-C, or discarded unused).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import _engine, _image
from ._channel import Channel, Received
from ._worker import _protocol as P
from .errors import EngineError, EngineUnavailable, ImageMismatch, ImageMissing
from .policy import Policy, seccomp_profile

if TYPE_CHECKING:
    from . import _gvisor

LABEL = "org.model-sandbox"
OWNER_LABEL = "org.model-sandbox.owner"  # "<host>:<pid>" of the process that created it
_LOG_LIMIT = 64 * 1024
# Up to this size the supervisor also hashes the input it was given (defence in depth); a
# larger input's identity is the host's check (inode, size, mtime and ctime before and after)
HASH_IN_SANDBOX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ContainerSpec:
    """Everything fixed when a sandbox starts. Hashable: a warm sandbox serves a job whose
    spec equals the one it was started with."""

    image: str
    memory_bytes: int
    pids: int
    nano_cpus: int
    tmp_bytes: int
    seccomp: str
    user: str = f"{_image.SANDBOX_UID}:{_image.SANDBOX_UID}"
    labels: tuple[tuple[str, str], ...] = ((LABEL, "worker"),)
    # per-process backstops of the bwrap runner (rlimits); the Docker runner does not use them
    cpu_s: float = 0.0
    file_bytes: int = 0

    def engine_config(self, channel_dir: str) -> dict[str, Any]:
        """The body of the engine's ``POST /containers/create``. Every isolation choice is
        made here. The only host path the container sees is ``channel_dir``, read-only: no
        directory of the host is writable from inside."""
        return {
            "Image": self.image,
            "Cmd": [],
            "Env": [],
            "User": self.user,
            "WorkingDir": "/tmp",
            "Hostname": ordinary_hostname(),
            "Labels": dict(self.labels),
            "StopSignal": "SIGKILL",
            "HostConfig": {
                "NetworkMode": "none",
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges:true", f"seccomp={self.seccomp}"],
                "ReadonlyRootfs": True,
                "IpcMode": "none",
                "Privileged": False,
                "Init": False,
                "Tmpfs": {
                    "/tmp": f"rw,noexec,nosuid,nodev,size={self.tmp_bytes}",
                    # the canary home: fake credentials the supervisor plants for the loader
                    P.CANARY_HOME: f"rw,noexec,nosuid,nodev,size=1m,uid={_image.SANDBOX_UID},"
                    f"gid={_image.SANDBOX_UID}",
                },
                "Mounts": [
                    {"Type": "bind", "Source": channel_dir, "Target": P.CHANNEL_DIR, "ReadOnly": True}
                ],
                "Memory": self.memory_bytes,
                "MemorySwap": self.memory_bytes,
                "PidsLimit": self.pids,
                "NanoCpus": self.nano_cpus,
                "Ulimits": [
                    {"Name": "core", "Soft": 0, "Hard": 0},
                    {"Name": "nofile", "Soft": 1024, "Hard": 1024},
                ],
                "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
            },
        }


def ordinary_hostname() -> str:
    """A hostname like a workstation's, different every time: no tell-tale fixed name."""
    import secrets

    return (
        f"{secrets.choice(('dev', 'ws', 'gpu', 'ml', 'lab', 'train'))}-"
        f"{secrets.choice(('box', 'node', 'host', 'srv', 'pc'))}{secrets.randbelow(90) + 10}"
    )


def make_spec(policy: Policy, *, image: str) -> ContainerSpec:
    lim = policy.limits
    return ContainerSpec(
        image=image,
        memory_bytes=lim.memory_mb * 2**20,
        pids=lim.pids,
        nano_cpus=int(lim.cpus * 1e9),
        tmp_bytes=lim.tmp_mb * 2**20,
        seccomp=seccomp_profile(),
        cpu_s=lim.cpu_s,
        file_bytes=lim.output_mb * 2**20,
    )


@dataclass(frozen=True)
class Job:
    """One load: its config (sent in the JOB frame) and the input, a read-only descriptor the
    host opened (sent with it; the container never sees a path of the host)."""

    config: P.JobConfig
    input_fd: int
    input_size: int = 0  # the host's own figure (not sent): a pool holds its refill for big ones

    @property
    def output_bytes(self) -> int:
        return self.config.max_output_bytes


def make_job(
    policy: Policy, *, input_fd: int, input_size: int, write_tensors: bool = True, layout: bool = True
) -> Job:
    """The job for one input. ``layout=False``: the host's scan found a pickle that is not a
    plain state dict, so the sandbox goes straight to the full loader (and imports torch before
    its monitoring starts, where a sandbox started cold has not yet)."""
    lim, ev = policy.limits, policy.events
    return Job(
        P.JobConfig(
            wall_clock_s=lim.wall_clock_s,
            cpu_s=lim.cpu_s,
            max_output_bytes=lim.output_bytes(input_size),
            write_tensors=write_tensors,
            fatal=tuple(ev.fatal),
            errno=ev.errno_number,
            allow_read=tuple(ev.allow_read),
            hash_input=input_size <= HASH_IN_SANDBOX_BYTES,
            layout=layout,
        ),
        input_fd,
        input_size,
    )


@dataclass
class RunResult:
    """How one sandboxed job ended. Engine facts (exit code, OOM kill, the host's own timeout)
    are trusted; ``received`` is what came over the channel, checked as it was read but still
    untrusted data."""

    exit_code: int | None
    oom_killed: bool = False
    timed_out: bool = False
    duration_s: float = 0.0
    logs: bytes = b""
    notes: list[str] = field(default_factory=list)
    received: Received = field(default_factory=Received)
    warm: bool = False  # the job went to a sandbox that was started before it
    runner: str = "docker"  # which runner ran it
    limits: dict[str, str] = field(default_factory=dict)  # limit -> what enforced it
    runtime: str = "runc"  # the engine's runtime: runc, or runsc (gVisor)
    trace: _gvisor.Trace | None = None  # under gVisor: what the host read of the sentry's trace
    on_close: Callable[[], None] | None = None  # called once, by the first close

    def close(self) -> None:
        self.received.close()
        done, self.on_close = self.on_close, None
        if done is not None:
            done()


class Runner(Protocol):
    def run(self, spec: ContainerSpec, job: Job) -> RunResult: ...

    def ensure_image(self) -> str: ...


class Box(Protocol):
    """A started sandbox waiting for one job (a :class:`WarmSandbox`: :class:`Sandbox`,
    :class:`~sandbox._bwrap.BwrapSandbox`; or a test's fake)."""

    hello: P.Hello | None

    def alive(self) -> bool: ...

    def run(self, job: Job) -> RunResult: ...

    def discard(self, *, keep_logs: bool = False, background: bool = False) -> None: ...


class StartingRunner(Runner, Protocol):
    """A runner that can start a sandbox ahead of its job (what :class:`~sandbox.Pool` needs)."""

    name: str

    def start(self, spec: ContainerSpec, *, connect_s: float = 120.0, prepare: bool = True) -> Box: ...


RUNNER_ENV = "MODEL_SANDBOX_RUNNER"
RUNNERS = ("auto", "docker", "bwrap")
RUNTIME_ENV = "MODEL_SANDBOX_RUNTIME"
#: the Docker runner's runtimes: runc (the engine's default) or runsc (gVisor, opt-in)
RUNTIMES = ("runc", "runsc")
DOCKER_LIMITS = {
    "memory": "control group (Docker)",
    "pids": "control group (Docker)",
    "cpus": "control group (Docker)",
    "cpu_time": "supervisor (whole tree) and rlimit RLIMIT_CPU (loader)",
    "file_size": "rlimit RLIMIT_FSIZE (loader)",
    "open_files": "rlimit (Docker)",
    "tmp": "tmpfs size",
    "wall_clock": "supervisor and host",
}
# under gVisor the control group holds the whole sandbox (the sentry and the gofer); the
# loader's processes are the sentry's tasks
GVISOR_LIMITS = {
    **DOCKER_LIMITS,
    "memory": "control group (Docker), around the gVisor sandbox",
    "pids": "rlimit RLIMIT_NPROC inside gVisor (set by the supervisor); the "
    "control group around the sandbox counts its host threads",
    "cpus": "control group (Docker), around the gVisor sandbox",
    "trace_log": "host (the sentry's log of the sandbox, at most 256 MiB)",
}


def runner_kind(kind: str | None = None) -> str:
    """``kind``, else ``$MODEL_SANDBOX_RUNNER``, else ``auto``; validated."""
    value = (kind or os.environ.get(RUNNER_ENV, "") or "auto").strip().lower()
    if value not in RUNNERS:
        from .errors import PolicyError

        raise PolicyError(f"unknown runner {value!r}: expected one of {', '.join(RUNNERS)}")
    return value


def runtime_kind(runtime: str | None = None) -> str:
    """``runtime``, else ``$MODEL_SANDBOX_RUNTIME``, else ``runc``; validated."""
    value = (runtime or os.environ.get(RUNTIME_ENV, "") or "runc").strip().lower()
    if value not in RUNTIMES:
        from .errors import PolicyError

        err = PolicyError(f"unknown runtime {value!r}: expected one of {', '.join(RUNTIMES)}")
        err.hint = f"--runtime runc or --runtime runsc (or unset ${RUNTIME_ENV})"
        raise err
    return value


def make_runner(kind: str | None = None, *, runtime: str | None = None) -> StartingRunner:
    """The runner ``kind`` names (see :func:`runner_kind`). ``auto``: Docker when an engine
    answers, else bubblewrap. ``runtime`` (see :func:`runtime_kind`): ``runsc`` runs the Docker
    runner's sandboxes under gVisor (``auto`` then means Docker; bwrap has no runtimes)."""
    value = runner_kind(kind)
    if runtime_kind(runtime) == "runsc":
        if value == "bwrap":
            from .errors import PolicyError

            err = PolicyError(
                "--runtime runsc (gVisor) is a runtime of the Docker engine: it "
                "needs the Docker runner (--runner docker or auto), not bwrap"
            )
            err.hint = "drop --runner bwrap (or $MODEL_SANDBOX_RUNNER=bwrap), or --runtime runsc"
            raise err
        return DockerRunner(runtime="runsc")
    if value == "auto":
        try:
            engine = connect()
        except EngineUnavailable:
            value = "bwrap"
        else:
            sweep_orphans(engine)
            return DockerRunner(engine)
    if value == "bwrap":
        from ._bwrap import BwrapRunner

        return BwrapRunner()
    return DockerRunner()


class DockerRunner:
    """Runs specs on the local Docker engine (its API, :mod:`._engine`)."""

    name = "docker"

    def __init__(
        self, engine: _engine.Engine | None = None, *, poll_s: float = 0.1, runtime: str = "runc"
    ) -> None:
        self._engine = engine
        self.poll_s = poll_s
        self.runtime = runtime_kind(runtime)
        self._trace_dir: str | None = None

    def trace_dir(self) -> str:
        """Under gVisor: the directory where the engine's runtime logs its trace (checked once:
        the runtime must be registered with the flags the evidence needs)."""
        if self._trace_dir is None:
            from . import _gvisor

            try:
                runtimes = self.engine.info().get("Runtimes") or {}
            except Exception as exc:
                raise _engine_error("ask the engine for its runtimes", exc) from None
            self._trace_dir = _gvisor.check_runtime(runtimes)
        return self._trace_dir

    @property
    def engine(self) -> _engine.Engine:
        if self._engine is None:
            self._engine = connect()
            sweep_orphans(self._engine)
        return self._engine

    # -- images -------------------------------------------------------------------------------
    def ensure_image(self) -> str:
        """The tag of the worker image matching this code; raises if missing or stale."""
        digest = _image.worker_digest()
        tag = _image.image_tag(digest)
        try:
            img = self.engine.image(tag)
        except _engine.NotFound:
            raise ImageMissing(f"the worker image {tag} is not built", tag=tag) from None
        except (_engine.ApiError, _engine.Gone) as exc:
            raise _engine_error("query the engine's images", exc) from None
        found = str(_image_labels(img).get(_image.DIGEST_LABEL, ""))
        if found != digest:
            raise ImageMismatch(
                f"the image {tag} was built from other worker code (digest {found[:16] or 'none'}, "
                f"expected {digest[:16]})",
                tag=tag,
                expected=digest,
                found=found,
            )
        return tag

    def build_image(
        self, *, force: bool = False, progress: Callable[[str], None] | None = None
    ) -> tuple[str, float, int]:
        """Build the worker image offline. Returns (tag, seconds, size in bytes)."""
        import tempfile

        digest = _image.worker_digest()
        tag = _image.image_tag(digest)
        if not force:
            try:
                img = self.engine.image(tag)
                if _image_labels(img).get(_image.DIGEST_LABEL) == digest:
                    return tag, 0.0, _image_size(img)
            except _engine.NotFound:
                pass
            except (_engine.ApiError, _engine.Gone) as exc:
                raise _engine_error("query the engine's images", exc) from None
        start = time.monotonic()
        changes = [
            f"USER {_image.SANDBOX_UID}:{_image.SANDBOX_UID}",
            "WORKDIR /tmp",
            f"ENTRYPOINT {json.dumps(list(_image.ENTRYPOINT))}",
            f'LABEL {_image.DIGEST_LABEL}="{digest}"',
            f'LABEL {LABEL}="worker-image"',
        ]
        with tempfile.TemporaryDirectory(prefix="model-sandbox-image-") as tmp:
            tar_path = Path(tmp) / "rootfs.tar"
            if progress:
                progress("assembling the root filesystem")
            with tar_path.open("wb") as f:
                count = _image.write_rootfs(f)
            if progress:
                progress(f"importing {count} files ({tar_path.stat().st_size / 2**20:.0f} MiB)")
            repo, _, version = tag.partition(":")
            try:
                self.engine.import_image(str(tar_path), repository=repo, tag=version, changes=changes)
                img = self.engine.image(tag)
            except (_engine.ApiError, _engine.Gone) as exc:
                raise EngineError(f"docker import failed: {exc}") from None
        return tag, time.monotonic() - start, _image_size(img)

    # -- containers ---------------------------------------------------------------------------
    def start(self, spec: ContainerSpec, *, connect_s: float = 120.0, prepare: bool = True) -> Sandbox:
        """Create and start one container for ``spec`` and wait until its supervisor connected
        and said hello: a sandbox ready for exactly one job. ``prepare=True`` (a warm sandbox
        for later) imports torch before the hello; ``False`` (the job is waiting now) leaves
        that to the job, which a plain state dict's layout hand-off does not need."""
        engine = self.engine
        trace_dir = self.trace_dir() if self.runtime == "runsc" else None
        channel = Channel()
        config = spec.engine_config(channel.directory)
        host = config["HostConfig"]
        if not prepare:
            config["Cmd"] = [P.COLD]
        if trace_dir is not None:  # gVisor: the loader's filter refuses; the trace is evidence
            from . import _gvisor

            host["Runtime"] = _gvisor.ENGINE_RUNTIME
            config["Cmd"] = [*config["Cmd"], P.PLAIN_FILTER]
            host["SecurityOpt"] = [
                f"seccomp={_gvisor.profile(spec.seccomp)}" if o.startswith("seccomp=") else o
                for o in host["SecurityOpt"]
            ]
            # the ptrace platform backs every task of the sandbox with host threads, which the
            # control group counts: the sandbox's own count is RLIMIT_NPROC, set inside it
            host["PidsLimit"] = _gvisor.host_pids(spec.pids)
            config["Cmd"] = [*config["Cmd"], f"{P.NPROC}{spec.pids}"]
        config["Labels"] = {**config["Labels"], OWNER_LABEL: _owner()}
        created = time.time()
        try:
            cid = engine.create(config)
        except _engine.NotFound:
            channel.remove()
            raise ImageMissing(f"the worker image {spec.image} is not built", tag=spec.image) from None
        except (_engine.ApiError, _engine.Gone) as exc:
            channel.remove()
            raise _engine_error("create the sandbox container", exc) from None
        box = Sandbox(self, spec, cid, channel)
        if trace_dir is not None:
            from . import _gvisor

            box.watch = _gvisor.Watch(trace_dir, cid, created, lambda: _kill(engine, cid))
        try:
            engine.start(cid)
            pid = int(engine.inspect(cid).get("State", {}).get("Pid") or 0)
            expected: int | frozenset[int] | None = pid or None
            if trace_dir is not None and pid:
                from . import _gvisor

                expected = frozenset({pid, *_gvisor.gofers(pid, cid)})
            box.hello = channel.accept(connect_s, expected_pid=expected)
        except BaseException as exc:
            box.discard(keep_logs=True)
            if isinstance(exc, _engine.ApiError | _engine.Gone):
                raise _engine_error("start the sandbox", exc) from None
            if isinstance(exc, EngineError) and box.logs:
                raise EngineError(f"{exc.message}; its output: {printable_output(box.logs[-400:])}") from None
            raise
        return box

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        """A fresh sandbox for ``job`` (no warm one): start, run, remove."""
        return self.start(spec, prepare=False).run(job)


class WarmSandbox:
    """One started sandbox whose supervisor is connected and waiting (warm), of either runner.
    Runs exactly one job (:meth:`run`) or is discarded unused (:meth:`discard`); either way its
    processes and its channel are gone afterwards. A runner's subclass says how to wait for,
    kill and discard its sandbox, and what it learns once the sandbox has exited."""

    def __init__(self, spec: ContainerSpec, channel: Channel) -> None:
        self.spec = spec
        self.channel = channel
        self.hello: P.Hello | None = None
        self.started = time.monotonic()
        self.used = False

    def alive(self) -> bool:
        """The supervisor still holds its end (a warm sandbox that died is not handed out)."""
        return channel_alive(self.channel)

    def run(self, job: Job) -> RunResult:
        assert not self.used, "a sandbox runs one job"
        self.used = True
        result = self._result(job)
        start = time.monotonic()
        try:
            self.channel.send_job(job.config, job.input_fd)
            # Backstop: the supervisor enforces the wall clock itself; this is for a supervisor
            # that cannot (a frozen sandbox, a host under load).
            deadline = start + job.config.wall_clock_s + 15
            result.received = self.channel.collect(
                deadline, job.output_bytes, inline=result.runtime == "runsc"
            )
            if not result.received.closed:
                if not result.received.violations:
                    result.timed_out = True
                self._kill()
            self.channel.close()  # the supervisor, if alive, ends at once
            result.exit_code = self._wait(15)
            if result.exit_code is None:
                self._kill()
                result.exit_code = self._wait(15)
            self._ended(result, logs=result.exit_code != 0 or not result.received.completed)
        except BaseException as exc:
            result.close()
            failure = self._engine_failure(exc)
            if failure is not None:
                raise failure from None
            raise
        finally:
            result.duration_s = time.monotonic() - start
            self.discard(background=True)
        return result

    def _result(self, job: Job) -> RunResult:
        """The result this sandbox's run fills in (runner, limits); starts what watches it."""
        raise NotImplementedError

    def _kill(self) -> None:
        raise NotImplementedError

    def _wait(self, timeout_s: float) -> int | None:
        """The exit code, or None when the sandbox is still running after ``timeout_s``."""
        raise NotImplementedError

    def _ended(self, result: RunResult, *, logs: bool) -> None:
        """What the runner knows once the sandbox has exited; ``logs``: keep its output (the
        load failed or the supervisor did not complete)."""
        raise NotImplementedError

    def _engine_failure(self, exc: BaseException) -> BaseException | None:
        """The error to raise for an exception of the runner's own machinery, or None."""
        return None

    def discard(self, *, keep_logs: bool = False, background: bool = False) -> None:
        raise NotImplementedError


class Sandbox(WarmSandbox):
    """A warm Docker container (under runc, or under gVisor with ``watch`` on the sentry's trace);
    :meth:`discard` removes the container."""

    def __init__(self, runner: DockerRunner, spec: ContainerSpec, cid: str, channel: Channel) -> None:
        super().__init__(spec, channel)
        self.runner = runner
        self.engine = runner.engine
        self.cid = cid  # the container's id
        self.logs = b""
        self.watch: _gvisor.Watch | None = None  # under gVisor: the sentry's log of this sandbox

    def _result(self, job: Job) -> RunResult:
        result = RunResult(
            exit_code=None, runner="docker", limits=dict(DOCKER_LIMITS), runtime=self.runner.runtime
        )
        if self.watch is not None:
            result.limits = dict(GVISOR_LIMITS)
            self.watch.fatal = frozenset(job.config.fatal)
            self.watch.on_fatal = self._stop_load
            self.watch.start()
        return result

    def _kill(self) -> None:
        _kill(self.engine, self.cid)

    def _wait(self, timeout_s: float) -> int | None:
        return self.engine.wait(self.cid, timeout_s)

    def _ended(self, result: RunResult, *, logs: bool) -> None:
        state = self.engine.inspect(self.cid).get("State", {})
        result.oom_killed = bool(state.get("OOMKilled"))
        if logs:
            result.logs = _bounded_logs(self.engine, self.cid)
        if self.watch is not None:
            result.trace = self._trace()

    def _engine_failure(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, _engine.ApiError | _engine.Gone):
            return _engine_error("run the sandbox", exc)
        return None

    def _stop_load(self, stopped: dict[str, Any]) -> None:
        """Under gVisor: the policy ends the load at a refusal the host saw in the trace."""
        conn = self.channel.conn
        if conn is not None:
            try:
                conn.send(P.json_frame(P.STOP, stopped))
            except OSError:
                pass  # the supervisor is gone already: its status says how the load ended

    def _trace(self) -> _gvisor.Trace:
        """The sentry's trace of this sandbox, read once the container has exited (every line
        is written by then), then removed from the host."""
        from . import _gvisor

        assert self.watch is not None
        self.watch.stop()
        trace = _gvisor.read_trace(self.watch.locate())
        trace.flooded = self.watch.flooded
        if os.environ.get("MODEL_SANDBOX_KEEP_TRACE", "") != "1":  # kept to debug, or to study
            _gvisor.remove(trace.path)
        return trace

    def discard(self, *, keep_logs: bool = False, background: bool = False) -> None:
        """Close the channel (the supervisor exits when it sees that) and remove the container.
        ``background``: the removal runs in a (non-daemon) thread, so the caller does not wait
        for the engine, yet the interpreter does not exit before it is done."""
        unused = not self.used
        self.used = True
        self.channel.remove()
        if self.watch is not None:
            self.watch.stop()
            if unused:  # a warm sandbox never used: its trace is of no load
                from . import _gvisor

                _gvisor.remove(self.watch.locate())
        if keep_logs:
            self.logs = _bounded_logs(self.engine, self.cid)
        if background:
            threading.Thread(
                target=_remove, args=(self.engine, self.cid), name="model-sandbox-remove"
            ).start()
        else:
            _remove(self.engine, self.cid)


def channel_alive(channel: Channel) -> bool:
    """The supervisor still holds its end of ``channel``."""
    conn = channel.conn
    if conn is None:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def printable_output(data: bytes) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in data.decode("utf-8", "replace"))


def _image_labels(img: dict[str, Any]) -> dict[str, Any]:
    labels = (img.get("Config") or {}).get("Labels") or {}
    return labels if isinstance(labels, dict) else {}


def _image_size(img: dict[str, Any]) -> int:
    size = img.get("Size", 0)
    return size if isinstance(size, int) else 0


def _kill(engine: _engine.Engine, cid: str) -> None:
    with contextlib.suppress(_engine.ApiError, _engine.Gone):
        engine.kill(cid)


def _remove(engine: _engine.Engine, cid: str) -> None:
    for attempt in range(3):
        try:
            engine.remove(cid)
            return
        except _engine.ApiError:  # e.g. 409, a removal already under way
            time.sleep(0.2 * (attempt + 1))
        except Exception:
            break  # the engine is gone; nothing more we can do here


def _bounded_logs(engine: _engine.Engine, cid: str) -> bytes:
    try:
        return engine.logs(cid, _LOG_LIMIT)
    except Exception:  # logs are a diagnostic nicety; the engine may be gone
        return b""


def _engine_error(doing: str, exc: Exception) -> EngineError:
    text = str(exc)
    if isinstance(exc, _engine.Gone):
        return EngineUnavailable(f"lost the Docker engine while trying to {doing}: {text[:300]}")
    return EngineError(f"could not {doing}: {text[:500]}")


def connect() -> _engine.Engine:
    """A client of the engine named by ``DOCKER_HOST`` (default: the local socket), which
    answered; raises :class:`EngineUnavailable` (none answers, or a remote one is named)."""
    engine = _engine.Engine(_engine.socket_path(), timeout=120)
    try:
        engine.negotiate()
    except (_engine.ApiError, _engine.Gone) as exc:
        raise EngineUnavailable(f"no Docker engine is reachable: {str(exc)[:300]}") from None
    return engine


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def sweep_orphans(engine: _engine.Engine) -> int:
    """Remove worker containers whose creating process on this host is gone (a CLI killed
    with SIGKILL cannot remove its own). Returns how many were removed."""
    host = socket.gethostname()
    removed = 0
    try:
        containers = engine.containers([f"{LABEL}=worker"])
    except Exception:
        return 0
    for c in containers:
        owner = str((c.get("Labels") or {}).get(OWNER_LABEL, ""))
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its owner is alive and will remove it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        _remove(engine, str(c.get("Id", "")))
        removed += 1
    return removed
