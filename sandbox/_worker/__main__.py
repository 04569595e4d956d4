"""Container side entry point: the supervisor.

Started by the engine as the container's PID 1 (``python -I -m sandbox_worker CONFIG``), it

1. re-executes itself with an **empty environment** (the engine always injects PATH,
   HOSTNAME and HOME, and nothing of ours is to be visible to the payload);
2. hashes the input, then forks the *loader* in a new session with resource limits;
3. waits for it under the wall-clock limit, collecting its bounded result message;
4. kills every other process left in the container (PID 1 can; the payload cannot kill PID 1:
   the kernel drops signals to a namespace's init that it has no handler for);
5. writes ``status.json`` to the output directory.

The supervisor never imports torch and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import sys
import time
from typing import Any

from . import _protocol as P

STAGE2 = "--stage2"
_RESULT_LIMIT = 64 * 1024


def _config(argv: list[str]) -> dict[str, Any]:
    args = [a for a in argv if a != STAGE2]
    cfg: dict[str, Any] = json.loads(args[0]) if args else {}
    return cfg


def _sha256(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _loader_main(cfg: dict[str, Any], wfd: int) -> None:
    """Runs in the forked child; never returns."""
    code = 4
    message: dict[str, Any] = {"ok": False, "kind": "load-failed", "message": "no result"}
    try:
        os.setsid()
        max_out = int(cfg.get("max_output_bytes", 0))
        if max_out > 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_out, max_out))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.chdir("/tmp")
        from ._loader import LoaderError, load, write_outputs

        try:
            obj, fmt, locations = load(P.INPUT_PATH)
            manifest = write_outputs(obj, fmt, locations, P.OUTPUT_DIR,
                                     tensors=bool(cfg.get("write_tensors", True)))
            message = {"ok": True, "format": fmt, "tensors": len(manifest["tensors"])}
            code = 0
        except LoaderError as exc:
            message = {"ok": False, "kind": exc.kind, "message": str(exc)[:4000],
                       "detected": exc.detected}
            code = 3
        except BaseException as exc:  # whatever torch (or the payload) raised
            message = {"ok": False, "kind": "load-failed", "type": type(exc).__name__,
                       "message": str(exc)[:4000]}
            code = 4
    finally:
        try:
            os.write(wfd, json.dumps(message).encode()[:_RESULT_LIMIT])
        except BaseException:
            pass
        os._exit(code)


def _supervise(cfg: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = {"protocol": P.PROTOCOL_VERSION, "env_keys": sorted(os.environ)}
    try:
        status["input_sha256"], status["input_size"] = _sha256(P.INPUT_PATH)
    except OSError as exc:
        status["result"] = {"ok": False, "kind": "input-error", "message": str(exc)}
        return status
    wall = float(cfg.get("wall_clock_s", 120))
    rfd, wfd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _loader_main(cfg, wfd)
    os.close(wfd)
    os.set_blocking(rfd, False)
    chunks: list[bytes] = []
    received = 0
    wait_status: int | None = None
    timed_out = False
    while wait_status is None:
        try:
            data = os.read(rfd, 65536)
            if data and received < _RESULT_LIMIT:
                chunks.append(data)
                received += len(data)
        except BlockingIOError:
            pass
        done, st = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            wait_status = st
            break
        _reap_others(pid)
        if time.monotonic() - start > wall:
            timed_out = True
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, wait_status = os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    try:
        while received < _RESULT_LIMIT and (data := os.read(rfd, 65536)):
            chunks.append(data)
            received += len(data)
    except (BlockingIOError, OSError):
        pass
    os.close(rfd)
    _kill_all()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    status.update({
        "wall_s": round(elapsed, 4),
        "timed_out": timed_out,
        "exit_code": os.waitstatus_to_exitcode(wait_status),
        "cpu_user_s": round(usage.ru_utime, 3),
        "cpu_system_s": round(usage.ru_stime, 3),
        "max_rss_kb": usage.ru_maxrss,
    })
    try:
        status["result"] = json.loads(b"".join(chunks)[:_RESULT_LIMIT].decode("utf-8", "replace"))
    except ValueError:
        status["result"] = None
    return status


def _reap_others(loader: int) -> None:
    """As PID 1, collect orphans that the loader left behind (not the loader itself)."""
    try:
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0 or pid == loader:
                return
    except ChildProcessError:
        return


def _kill_all() -> None:
    """SIGKILL every other process in the container, then reap them."""
    try:
        os.kill(-1, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def _write_status(status: dict[str, Any]) -> None:
    path = os.path.join(P.OUTPUT_DIR, P.STATUS_FILE)
    try:  # the loader may have planted something under our name
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(status, f, default=str)


def main(argv: list[str]) -> int:
    if STAGE2 not in argv:
        os.execve(sys.executable, [sys.executable, "-I", "-m", "sandbox_worker", STAGE2, *argv], {})
    cfg = _config(argv)
    status = _supervise(cfg)
    _write_status(status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
