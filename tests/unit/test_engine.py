"""The Docker Engine API client (:mod:`sandbox._engine`) against a fake engine on a unix socket:
the address it accepts, the API version it speaks, how it reads answers (bounded), and how it
reports the engine's refusals and absence. The real engine is used by every container test."""

from __future__ import annotations

import http.server
import json
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import _engine, _launch
from sandbox.errors import EngineUnavailable

Reply = tuple[int, bytes]
Route = Callable[[str, str, bytes], Reply]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the wait test's timeout): nothing to report


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Route], str]]:
    """Serve ``route(method, path, body) -> (status, body)`` on a unix socket; its path."""
    servers: list[_Server] = []

    def serve(route: Route) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, data = route(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any  # noqa: N815 - http.server's names

            def log_message(self, *args: object) -> None:
                pass

        path = str(tmp_path / f"engine{len(servers)}.sock")
        server = _Server(path, Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return path

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def engine_answering(fake: Callable[[Route], str], route: Route) -> _engine.Engine:
    return _engine.Engine(fake(route), timeout=5)


def test_only_a_local_socket_is_an_engine() -> None:
    assert _engine.socket_path({}) == _engine.DEFAULT_SOCKET
    assert _engine.socket_path({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}) == (
        "/run/user/1000/docker.sock"
    )
    for remote in ("tcp://10.0.0.2:2376", "tcp://localhost:2375", "ssh://me@host", "npipe:////./pipe/x"):
        with pytest.raises(EngineUnavailable, match="not a local socket"):
            _engine.socket_path({"DOCKER_HOST": remote})


def test_a_missing_socket_is_an_engine_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(_engine.Gone):
        _engine.Engine(str(tmp_path / "none.sock")).info()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'none.sock'}")
    with pytest.raises(EngineUnavailable, match="no Docker engine is reachable"):
        _launch.connect()


@pytest.mark.parametrize(("theirs", "spoken"), [("1.47", "/v1.41"), ("1.41", "/v1.41"), ("1.30", "/v1.30")])
def test_the_api_version_is_the_older_of_both(fake: Callable[[Route], str], theirs: str, spoken: str) -> None:
    seen: list[str] = []

    def route(method: str, path: str, body: bytes) -> Reply:
        seen.append(path)
        if path == "/version":
            return 200, json.dumps({"ApiVersion": theirs}).encode()
        return 200, b"{}"

    engine = engine_answering(fake, route)
    engine.negotiate()
    engine.info()
    assert seen == ["/version", f"{spoken}/info"]


def test_an_engine_too_old_is_refused(fake: Callable[[Route], str]) -> None:
    engine = engine_answering(fake, lambda m, p, b: (200, b'{"ApiVersion": "1.19"}'))
    with pytest.raises(EngineUnavailable, match=r"needs 1\.25"):
        engine.negotiate()


def test_refusals_carry_the_engines_message(fake: Callable[[Route], str]) -> None:
    def route(method: str, path: str, body: bytes) -> Reply:
        if "/images/" in path:
            return 404, b'{"message": "No such image: x:y"}'
        if path.endswith("/start"):
            return 500, b"not json at all"
        if path.endswith("/kill"):
            return 409, b'{"message": "is not running"}'
        return 404, b'{"message": "No such container"}'

    engine = engine_answering(fake, route)
    with pytest.raises(_engine.NotFound, match="No such image"):
        engine.image("x:y")
    with pytest.raises(_engine.ApiError, match="not json at all") as err:
        engine.start("c1")
    assert err.value.status == 500 and not isinstance(err.value, _engine.NotFound)
    engine.kill("c1")  # not running: no error
    engine.remove("c1")  # gone already: no error


def test_an_answer_is_read_within_a_bound(
    fake: Callable[[Route], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_engine, "JSON_LIMIT", 1000)
    engine = engine_answering(fake, lambda m, p, b: (200, b"[" + b"1," * 5000 + b"1]"))
    with pytest.raises(_engine.ApiError, match="over 1000 bytes"):
        engine.containers()
    engine = engine_answering(fake, lambda m, p, b: (200, b"<html>"))
    with pytest.raises(_engine.ApiError, match="not JSON"):
        engine.info()


def test_create_sends_the_configuration_and_needs_an_id(fake: Callable[[Route], str]) -> None:
    got: list[object] = []

    def route(method: str, path: str, body: bytes) -> Reply:
        got.append((method, path, json.loads(body)))
        return 201, b'{"Id": "abc123", "Warnings": []}'

    engine = engine_answering(fake, route)
    assert engine.create({"Image": "i", "HostConfig": {"NetworkMode": "none"}}) == "abc123"
    assert got == [
        ("POST", "/v1.41/containers/create", {"Image": "i", "HostConfig": {"NetworkMode": "none"}})
    ]
    engine = engine_answering(fake, lambda m, p, b: (201, b'{"Warnings": []}'))
    with pytest.raises(_engine.ApiError, match="no id"):
        engine.create({})


def test_logs_are_demultiplexed_and_bounded(fake: Callable[[Route], str]) -> None:
    frames = b"".join(
        struct.pack(">BxxxI", stream, len(data)) + data for stream, data in [(1, b"out "), (2, b"err ")]
    )
    engine = engine_answering(fake, lambda m, p, b: (200, frames * 100))
    assert engine.logs("c", 12) == b"out err out "
    assert engine.logs("c", 10_000) == b"out err " * 100


def test_listing_filters_by_label_and_state(fake: Callable[[Route], str]) -> None:
    paths: list[str] = []

    def route(method: str, path: str, body: bytes) -> Reply:
        paths.append(path)
        return 200, b'[{"Id": "a", "Labels": {}}, "junk"]'

    engine = engine_answering(fake, route)
    assert engine.containers(["k=v"]) == [{"Id": "a", "Labels": {}}]
    engine.containers(running=True)
    assert "all=1" in paths[0] and "label" in paths[0] and "k%3Dv" in paths[0]
    assert "all=0" in paths[1] and "filters" not in paths[1]


def test_wait_gives_up_after_its_timeout(fake: Callable[[Route], str]) -> None:
    def route(method: str, path: str, body: bytes) -> Reply:
        if path.endswith("/wait") and "slow" in path:
            time.sleep(3)
        return 200, b'{"StatusCode": 3}'

    engine = engine_answering(fake, route)
    assert engine.wait("fast", 2) == 3
    start = time.monotonic()
    assert engine.wait("slow", 0.3) is None
    assert time.monotonic() - start < 2.5


def test_an_import_that_fails_in_its_stream_is_an_error(fake: Callable[[Route], str], tmp_path: Path) -> None:
    tar = tmp_path / "rootfs.tar"
    tar.write_bytes(b"\0" * 4096)
    sizes: list[int] = []

    def route(method: str, path: str, body: bytes) -> Reply:
        sizes.append(len(body))
        return 200, b'{"status": "importing"}\r\n{"error": "archive/tar: invalid tar header"}\r\n'

    engine = engine_answering(fake, route)
    with pytest.raises(_engine.ApiError, match="invalid tar header"):
        engine.import_image(str(tar), repository="r", tag="t", changes=["USER 1:1"])
    assert sizes == [4096]


def test_an_engine_that_hangs_up_is_gone_and_the_runner_says_so(tmp_path: Path) -> None:
    """A daemon that dies mid-call (here: accepts, then closes without answering) is
    :class:`_engine.Gone`, which the runner reports as an unavailable engine (a batch retries
    those, then stops resumably)."""
    import socket

    path = str(tmp_path / "hangup.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)

    def hang_up() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        engine = _engine.Engine(path, timeout=5)
        with pytest.raises(_engine.Gone) as gone:
            engine.create({"Image": "x"})
        err = _launch._engine_error("create the sandbox container", gone.value)
        assert isinstance(err, EngineUnavailable) and "lost the Docker engine" in err.message
        with pytest.raises(_engine.Gone):
            engine.logs("c", 100)
    finally:
        server.close()


def test_an_engine_that_stops_answering_is_a_timeout_of_the_call_not_a_hang(
    fake: Callable[[Route], str],
) -> None:
    """Any call, not only ``wait``, gives up after the engine's time: :class:`_engine.Timeout`,
    a kind of :class:`_engine.Gone`, which the runner reports as an unavailable engine."""

    def route(method: str, path: str, body: bytes) -> Reply:
        time.sleep(3)
        return 201, b'{"Id": "late"}'

    engine = _engine.Engine(fake(route), timeout=0.3)
    with pytest.raises(_engine.Timeout, match=r"did not answer POST /containers/create in 0\.3 s") as late:
        engine.create({"Image": "x"})
    err = _launch._engine_error("create the sandbox container", late.value)
    assert isinstance(err, EngineUnavailable)
