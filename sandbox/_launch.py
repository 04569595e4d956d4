"""Stage 2, host: Policy -> ContainerSpec (pure) -> Runner -> DockerRunner.

This is the only module that imports ``docker``. :class:`ContainerSpec` is a frozen, typed
description of one disposable container; :meth:`ContainerSpec.docker_kwargs` is the one place
that turns it into engine arguments, so unit tests can assert every hardening option without
a daemon. :class:`DockerRunner` runs a spec and always removes the container (success, error,
timeout, Ctrl-C).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import _image
from ._worker import _protocol as P
from .errors import EngineError, EngineUnavailable, ImageMismatch, ImageMissing
from .policy import Policy, seccomp_profile

if TYPE_CHECKING:
    import docker

LABEL = "org.model-sandbox"
OWNER_LABEL = "org.model-sandbox.owner"  # "<host>:<pid>" of the process that created it
_LOG_LIMIT = 64 * 1024
MAX_OUTPUT_ENTRIES = 1000


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    input_path: str
    output_dir: str
    command: tuple[str, ...]
    wall_clock_s: float
    memory_bytes: int
    pids: int
    nano_cpus: int
    tmp_bytes: int
    output_bytes: int
    seccomp: str
    user: str = f"{_image.SANDBOX_UID}:{_image.SANDBOX_UID}"
    labels: tuple[tuple[str, str], ...] = ((LABEL, "worker"),)

    def docker_kwargs(self) -> dict[str, Any]:
        """Arguments for ``containers.create``. Every isolation choice is made here."""
        from docker.types import LogConfig, Mount, Ulimit

        return {
            "image": self.image,
            "command": list(self.command),
            "detach": True,
            "network_mode": "none",
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true", f"seccomp={self.seccomp}"],
            "read_only": True,
            "user": self.user,
            "environment": {},
            "working_dir": "/tmp",
            "hostname": "sandbox",
            "ipc_mode": "none",
            "privileged": False,
            "init": False,
            "tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={self.tmp_bytes}",
                      # the canary home: fake credentials the supervisor plants for the loader
                      P.CANARY_HOME: f"rw,noexec,nosuid,nodev,size=1m,uid={_image.SANDBOX_UID},"
                                     f"gid={_image.SANDBOX_UID}"},
            "mounts": [
                Mount(P.INPUT_PATH, self.input_path, type="bind", read_only=True),
                Mount(P.OUTPUT_DIR, self.output_dir, type="bind", read_only=False),
            ],
            "mem_limit": self.memory_bytes,
            "memswap_limit": self.memory_bytes,
            "pids_limit": self.pids,
            "nano_cpus": self.nano_cpus,
            "ulimits": [Ulimit(name="core", soft=0, hard=0),
                        Ulimit(name="nofile", soft=1024, hard=1024)],
            "log_config": LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            "labels": dict(self.labels),
            "stop_signal": "SIGKILL",
        }


def make_spec(policy: Policy, *, image: str, input_path: str, output_dir: str, input_size: int,
              write_tensors: bool = True) -> ContainerSpec:
    lim = policy.limits
    out_bytes = lim.output_bytes(input_size)
    ev = policy.events
    cfg = {"wall_clock_s": lim.wall_clock_s, "cpu_s": lim.cpu_s, "max_output_bytes": out_bytes,
           "write_tensors": write_tensors, "fatal": list(ev.fatal), "errno": ev.errno_number,
           "allow_read": list(ev.allow_read)}
    return ContainerSpec(
        image=image,
        input_path=input_path,
        output_dir=output_dir,
        command=(json.dumps(cfg, sort_keys=True),),
        wall_clock_s=lim.wall_clock_s,
        memory_bytes=lim.memory_mb * 2**20,
        pids=lim.pids,
        nano_cpus=int(lim.cpus * 1e9),
        tmp_bytes=lim.tmp_mb * 2**20,
        output_bytes=out_bytes,
        seccomp=seccomp_profile(),
    )


@dataclass
class RunResult:
    """What the engine knows about a finished container (trusted: it comes from the engine)."""

    exit_code: int | None
    oom_killed: bool = False
    timed_out: bool = False
    output_flood: bool = False
    duration_s: float = 0.0
    logs: bytes = b""
    notes: list[str] = field(default_factory=list)


class Runner(Protocol):
    def run(self, spec: ContainerSpec) -> RunResult: ...

    def ensure_image(self) -> str: ...


def dir_usage(path: str, limit_entries: int = 10_000) -> tuple[int, int]:
    """(bytes, entries) under ``path``, not following links, counting at most a bound."""
    total = entries = 0
    stack = [path]
    while stack and entries <= limit_entries:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    entries += 1
                    st = e.stat(follow_symlinks=False)
                    total += st.st_blocks * 512 if st.st_blocks else st.st_size
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return total, entries


class DockerRunner:
    """Runs specs on a Docker engine through the docker SDK."""

    def __init__(self, client: docker.DockerClient | None = None, *,
                 poll_s: float = 0.1) -> None:
        self._client = client
        self.poll_s = poll_s

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = connect()
            sweep_orphans(self._client)
        return self._client

    # -- images -------------------------------------------------------------------------------
    def ensure_image(self) -> str:
        """The tag of the worker image matching this code; raises if missing or stale."""
        import docker.errors

        digest = _image.worker_digest()
        tag = _image.image_tag(digest)
        try:
            img = self.client.images.get(tag)
        except docker.errors.ImageNotFound:
            raise ImageMissing(f"the worker image {tag} is not built", tag=tag) from None
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot query images: {exc}") from None
        found = (img.labels or {}).get(_image.DIGEST_LABEL, "")
        if found != digest:
            raise ImageMismatch(
                f"the image {tag} was built from other worker code (digest {found[:16] or 'none'}, "
                f"expected {digest[:16]})", tag=tag, expected=digest, found=found)
        return tag

    def build_image(self, *, force: bool = False,
                    progress: Callable[[str], None] | None = None) -> tuple[str, float, int]:
        """Build the worker image offline. Returns (tag, seconds, size in bytes)."""
        import tempfile

        import docker.errors

        digest = _image.worker_digest()
        tag = _image.image_tag(digest)
        if not force:
            try:
                img = self.client.images.get(tag)
                if (img.labels or {}).get(_image.DIGEST_LABEL) == digest:
                    return tag, 0.0, int(img.attrs.get("Size", 0))
            except docker.errors.ImageNotFound:
                pass
        start = time.monotonic()
        changes = [
            f"USER {_image.SANDBOX_UID}:{_image.SANDBOX_UID}",
            "WORKDIR /tmp",
            f'ENTRYPOINT ["{_image.PY}/bin/python3", "-I", "-m", "sandbox_worker"]',
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
                self.client.api.import_image_from_file(str(tar_path), repository=repo,
                                                       tag=version, changes=changes)
            except docker.errors.DockerException as exc:
                raise EngineError(f"docker import failed: {exc}") from None
        img = self.client.images.get(tag)
        return tag, time.monotonic() - start, int(img.attrs.get("Size", 0))

    # -- containers ---------------------------------------------------------------------------
    def run(self, spec: ContainerSpec) -> RunResult:
        import docker.errors
        import requests.exceptions

        kwargs = spec.docker_kwargs()
        kwargs["labels"] = {**kwargs["labels"], OWNER_LABEL: _owner()}
        try:
            container = self.client.containers.create(**kwargs)
        except docker.errors.ImageNotFound:
            raise ImageMissing(f"the worker image {spec.image} is not built", tag=spec.image) from None
        except docker.errors.DockerException as exc:
            raise _engine_error("create the sandbox container", exc) from None
        result = RunResult(exit_code=None)
        start = time.monotonic()
        try:
            container.start()
            # Backstop: the supervisor enforces the wall clock itself; the engine kill is for a
            # supervisor that cannot (a frozen container, a host under load).
            deadline = start + spec.wall_clock_s + 15
            while True:
                try:
                    res = self.client.api.wait(container.id, timeout=self.poll_s)
                    result.exit_code = int(res.get("StatusCode", -1))
                    break
                except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
                    if isinstance(exc, requests.exceptions.ConnectionError) and \
                            "timed out" not in str(exc).lower():
                        raise _engine_error("wait for the sandbox", exc) from None
                used, entries = dir_usage(spec.output_dir)
                if used > spec.output_bytes or entries > MAX_OUTPUT_ENTRIES:
                    result.output_flood = True
                    result.notes.append(f"output directory reached {used} bytes / {entries} entries")
                    _kill(container)
                elif time.monotonic() > deadline:
                    result.timed_out = True
                    _kill(container)
            container.reload()
            state = container.attrs.get("State", {})
            result.oom_killed = bool(state.get("OOMKilled"))
            result.logs = _bounded_logs(container)
        except docker.errors.DockerException as exc:
            raise _engine_error("run the sandbox", exc) from None
        finally:
            result.duration_s = time.monotonic() - start
            _remove(container)
        return result


def _kill(container: Any) -> None:
    import docker.errors

    try:
        container.kill()
    except docker.errors.APIError:
        pass  # already stopped


def _remove(container: Any) -> None:
    import docker.errors

    for attempt in range(3):
        try:
            container.remove(force=True, v=True)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            time.sleep(0.2 * (attempt + 1))
        except Exception:
            break  # the engine is gone; nothing more we can do here


def _bounded_logs(container: Any) -> bytes:
    out = bytearray()
    try:
        for chunk in container.logs(stdout=True, stderr=True, stream=True):
            out += chunk
            if len(out) >= _LOG_LIMIT:
                break
    except Exception:  # noqa: S110 - logs are a diagnostic nicety; the engine may be gone
        pass
    return bytes(out[:_LOG_LIMIT])


def _engine_error(doing: str, exc: Exception) -> EngineError:
    text = str(exc)
    if "Connection" in type(exc).__name__ or "connection" in text.lower() or \
            "No such file" in text:
        return EngineUnavailable(f"lost the Docker engine while trying to {doing}: {text[:300]}")
    return EngineError(f"could not {doing}: {text[:500]}")


def connect() -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (default: the local socket)."""
    try:
        import docker
    except ImportError:  # pragma: no cover - a runtime dependency
        raise EngineUnavailable("the docker SDK is not installed (pip install docker)") from None
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as exc:
        raise EngineUnavailable(f"no Docker engine is reachable: {str(exc)[:300]}") from None
    return client


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def sweep_orphans(client: docker.DockerClient) -> int:
    """Remove worker containers whose creating process on this host is gone (a CLI killed
    with SIGKILL cannot remove its own). Returns how many were removed."""
    host = socket.gethostname()
    removed = 0
    try:
        containers = client.containers.list(all=True, filters={"label": f"{LABEL}=worker"})
    except Exception:
        return 0
    for c in containers:
        owner = (c.labels or {}).get(OWNER_LABEL, "")
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
        _remove(c)
        removed += 1
    return removed


def cleanup_leftovers(client: docker.DockerClient | None = None) -> int:
    """Remove any worker container of ours still present (a crashed host process). Returns count."""
    client = client or connect()
    count = 0
    for c in client.containers.list(all=True, filters={"label": f"{LABEL}=worker"}):
        _remove(c)
        count += 1
    return count
