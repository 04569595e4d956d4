"""The Docker Engine API over the engine's local unix socket, on the standard library.

The Docker runner needs a dozen calls of the API, on a socket of this machine only (the channel
is a socket in a host directory, so a remote engine is refused: :func:`socket_path`). The
Docker SDK cost every process about 0.2 s of imports (``docker``, ``requests``, ``urllib3``)
before its first container -- a quarter of a cold ``model-sandbox convert`` -- and three more
packages in the host's dependencies. This is HTTP/1.1 on :mod:`http.client`, one connection
per call (a unix socket connects in microseconds; calls from several threads never share one).

The engine is the host's own daemon, but what it returns is still read with bounds: a JSON
answer past :data:`JSON_LIMIT` is an error, logs stop at the caller's limit.
Transport failures raise :class:`Gone` (:class:`Timeout` past a call's time); the engine's
refusals raise :class:`ApiError` (:class:`NotFound` for 404).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import EngineUnavailable

__all__ = ["ApiError", "Engine", "Gone", "NotFound", "Timeout", "socket_path"]

DEFAULT_SOCKET = "/var/run/docker.sock"
API_VERSION = (1, 41)  # Docker 20.10; newer engines serve it too, an older one gets its own
MIN_API_VERSION = (1, 25)  # Mounts, NanoCpus, Init: the oldest the container's options need
JSON_LIMIT = 16 * 2**20
_FRAME = struct.Struct(">BxxxI")  # a log frame of a container without a terminal: stream, size


class Gone(Exception):
    """The engine could not be reached, or stopped answering (timeout, connection reset)."""


class Timeout(Gone):
    """The engine did not answer a call within its time."""


class ApiError(Exception):
    """The engine answered a call with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class NotFound(ApiError):
    """404: no such container or image."""


def socket_path(env: Mapping[str, str] | None = None) -> str:
    """The engine's socket, from ``DOCKER_HOST`` (``unix:///path``; unset: the system's).
    Any other address is refused: the sandbox's channel is a socket in a host directory, which
    only an engine on this machine can mount."""
    host = (os.environ if env is None else env).get("DOCKER_HOST", "").strip()
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host[len("unix://") :] or DEFAULT_SOCKET
    raise EngineUnavailable(
        f"the Docker engine at {host} is not a local socket: model-sandbox hands files to the "
        "sandbox through a local socket, so it needs an engine on this machine (a local or "
        "rootless dockerd, DOCKER_HOST=unix:///path/to/docker.sock)"
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout, blocksize=2**20)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _version(text: object) -> tuple[int, int]:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def _error(status: int, body: bytes) -> ApiError:
    message = ""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            message = str(parsed.get("message", ""))
    except ValueError:
        pass
    text = message or body.decode("utf-8", "replace").strip() or http.client.responses.get(status, "")
    message = text[:500]
    return (NotFound if status == 404 else ApiError)(status, message)


class Engine:
    """A client of the engine at ``path`` (default: :func:`socket_path`). ``timeout``: seconds
    any one call may take, unless the call says otherwise."""

    def __init__(self, path: str | None = None, *, timeout: float = 120.0) -> None:
        self.path = path or socket_path()
        self.timeout = timeout
        self.api = "/v{}.{}".format(*API_VERSION)

    # -- transport ----------------------------------------------------------------------------
    def _failed(self, exc: BaseException, method: str, url: str, timeout: float | None) -> Gone:
        """The :class:`Gone` (or :class:`Timeout`) for a transport error of one call."""
        if isinstance(exc, TimeoutError):
            waited = self.timeout if timeout is None else timeout
            return Timeout(f"the Docker engine at {self.path} did not answer {method} {url} in {waited:g} s")
        return Gone(f"the Docker engine at {self.path}: {exc}")

    def _send(
        self,
        method: str,
        url: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        versioned: bool = True,
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        """Send one request; the open connection and the response, its headers read."""
        target = (self.api if versioned else "") + url
        if query:
            target += "?" + urllib.parse.urlencode(query, doseq=True)
        conn = _UnixConnection(self.path, self.timeout if timeout is None else timeout)
        try:
            conn.request(method, target, body=body, headers=dict(headers or {}))
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._failed(exc, method, url, timeout) from None

    def _exchange(
        self,
        method: str,
        url: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        versioned: bool = True,
    ) -> tuple[int, bytes]:
        """One call: its status and its whole answer, at most :data:`JSON_LIMIT` bytes.
        Raises :class:`ApiError` for an error status or a longer answer, :class:`Gone`
        (:class:`Timeout`) when the engine is unreachable or too slow."""
        conn, resp = self._send(
            method, url, query=query, body=body, headers=headers, timeout=timeout, versioned=versioned
        )
        try:
            data = resp.read(JSON_LIMIT + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise self._failed(exc, method, url, timeout) from None
        finally:
            conn.close()
        if len(data) > JSON_LIMIT:
            raise ApiError(resp.status, f"an answer over {JSON_LIMIT} bytes to {method} {url}")
        if resp.status >= 400:
            raise _error(resp.status, data)
        return resp.status, data

    def _call(
        self,
        method: str,
        url: str,
        *,
        query: Mapping[str, Any] | None = None,
        payload: Any = None,
        timeout: float | None = None,
        versioned: bool = True,
    ) -> Any:
        """One call with a JSON ``payload`` (if any); its JSON answer (None when empty)."""
        body, headers = None, {}
        if payload is not None:
            body, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
        status, data = self._exchange(
            method, url, query=query, body=body, headers=headers, timeout=timeout, versioned=versioned
        )
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise ApiError(status, f"an answer to {method} {url} that is not JSON") from None

    # -- the engine ---------------------------------------------------------------------------
    def negotiate(self) -> dict[str, Any]:
        """Ask the engine its version (a ping) and speak the newer of its API and ours that
        both know. Raises :class:`Gone` or ``EngineUnavailable`` (an engine too old)."""
        found = self._call("GET", "/version", versioned=False)
        if not isinstance(found, dict):
            raise Gone(f"the Docker engine at {self.path} answered /version with no object")
        theirs = _version(found.get("ApiVersion"))
        if theirs < MIN_API_VERSION:
            raise EngineUnavailable(
                f"the Docker engine at {self.path} speaks API {found.get('ApiVersion')!s:.20}: "
                "model-sandbox needs {}.{} or newer".format(*MIN_API_VERSION)
            )
        self.api = "/v{}.{}".format(*min(theirs, API_VERSION))
        return found

    def info(self) -> dict[str, Any]:
        found = self._call("GET", "/info")
        return found if isinstance(found, dict) else {}

    # -- images -------------------------------------------------------------------------------
    def image(self, name: str) -> dict[str, Any]:
        """The image's inspection (``Config.Labels``, ``Size``); :class:`NotFound` if absent."""
        found = self._call("GET", f"/images/{urllib.parse.quote(name, safe=':')}/json")
        return found if isinstance(found, dict) else {}

    def import_image(self, tar_path: str, *, repository: str, tag: str, changes: Sequence[str]) -> None:
        """``docker import``: a root filesystem tarball as image ``repository:tag`` with
        Dockerfile ``changes``. The engine streams its progress as JSON objects, an error among
        them with a success status."""
        size = os.path.getsize(tar_path)
        query = {"fromSrc": "-", "repo": repository, "tag": tag, "changes": list(changes)}
        headers = {"Content-Type": "application/x-tar", "Content-Length": str(size)}
        with open(tar_path, "rb") as f:
            status, data = self._exchange(
                "POST", "/images/create", query=query, body=f, headers=headers, timeout=3600
            )
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("error"):
                raise ApiError(status, str(item["error"])[:500])

    # -- containers ---------------------------------------------------------------------------
    def create(self, config: Mapping[str, Any]) -> str:
        """Create a container from ``config`` (the API's body); its id."""
        found = self._call("POST", "/containers/create", payload=config)
        cid = found.get("Id") if isinstance(found, dict) else None
        if not isinstance(cid, str) or not cid:
            raise ApiError(201, "the engine created a container but named no id")
        return cid

    def start(self, cid: str) -> None:
        self._call("POST", f"/containers/{cid}/start")

    def inspect(self, cid: str) -> dict[str, Any]:
        found = self._call("GET", f"/containers/{cid}/json")
        return found if isinstance(found, dict) else {}

    def wait(self, cid: str, timeout_s: float) -> int | None:
        """The container's exit code once it has exited, or None if it still runs after
        ``timeout_s`` (or vanished: -1)."""
        try:
            found = self._call("POST", f"/containers/{cid}/wait", timeout=timeout_s)
        except Timeout:
            return None
        code = found.get("StatusCode") if isinstance(found, dict) else None
        return code if isinstance(code, int) else -1

    def kill(self, cid: str) -> None:
        """SIGKILL; a container that is not running (409) or gone (404) is no error."""
        try:
            self._call("POST", f"/containers/{cid}/kill")
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def remove(self, cid: str) -> None:
        """Kill and remove the container and its anonymous volumes; gone already is no error."""
        try:
            self._call("DELETE", f"/containers/{cid}", query={"force": "1", "v": "1"})
        except NotFound:
            pass

    def logs(self, cid: str, limit: int) -> bytes:
        """The container's stdout and stderr, interleaved as written, at most ``limit`` bytes."""
        url = f"/containers/{cid}/logs"
        conn, resp = self._send("GET", url, query={"stdout": "1", "stderr": "1"})
        out = bytearray()
        try:
            if resp.status >= 400:
                raise _error(resp.status, resp.read(JSON_LIMIT))
            while len(out) < limit:
                head = resp.read(_FRAME.size)
                if len(head) < _FRAME.size:
                    break
                stream, size = _FRAME.unpack(head)
                if stream > 2:  # not the multiplexed framing: a raw stream
                    out += head + resp.read(max(0, limit - len(out) - len(head)))
                    break
                out += resp.read(min(size, limit - len(out)))
        except (OSError, http.client.HTTPException) as exc:
            raise self._failed(exc, "GET", url, None) from None
        finally:
            conn.close()
        return bytes(out[:limit])

    def containers(self, labels: Sequence[str] = (), *, running: bool = False) -> list[dict[str, Any]]:
        """The containers (``running``: only those running) that carry all ``labels``
        (``key=value``), as the engine lists them (``Id``, ``Names``, ``Labels``, ``State``)."""
        query = {"all": "0" if running else "1"}
        if labels:
            query["filters"] = json.dumps({"label": list(labels)})
        found = self._call("GET", "/containers/json", query=query)
        return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []
