"""A real headless Chromium, driven over the DevTools protocol on a pipe (``--remote-debugging-
pipe``: the browser reads commands from fd 3 and writes replies to fd 4, NUL-terminated JSON).
No port is opened. Used to open the HTML report as people will."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

BROWSERS = ("chromium", "chromium-browser")


def chromium() -> str:
    """The browser's path; skips (fails under CI=true) when none is installed."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    problem = "no chromium on PATH (scripts/ensure-chromium.sh installs Debian's)"
    if IN_CI:
        pytest.fail(f"CI=true but {problem}")
    pytest.skip(problem)


@dataclass
class Page:
    """What the browser saw: console messages and exceptions, the result of a script, and a
    screenshot (PNG bytes)."""

    console: list[dict[str, Any]] = field(default_factory=list)
    value: Any = None
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self.w = to_browser
        self.r = from_browser
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 60,
    ) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        want = self.next_id
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == want:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def _read(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the browser did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise AssertionError(f"the browser closed the pipe (exit {self.proc.poll()})")
                self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        obj: dict[str, Any] = json.loads(raw)
        return obj


def open_page(url: str, script: str, *, width: int = 1100) -> Page:
    """Load ``url`` in a fresh headless Chromium, run ``script`` (an expression whose value is
    JSON) once the page has loaded, take a full-page screenshot, and return what it saw."""
    exe = chromium()
    profile = tempfile.mkdtemp(prefix="model-sandbox-chromium-")
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    args = [
        exe,
        "--headless",
        "--remote-debugging-pipe",
        "--no-first-run",
        "--disable-gpu",
        "--no-default-browser-check",
        "--disable-extensions",
        "--mute-audio",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        "about:blank",
    ]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to run its own sandbox as root

    def child_fds() -> None:
        """The browser reads fd 3 and writes fd 4: the pipe's ends, moved there (through
        high numbers first, as either end may already be 3 or 4)."""
        high_r, high_w = os.dup2(to_r, 200), os.dup2(from_w, 201)
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=child_fds,
        close_fds=False,
    )
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(proc, to_w, from_r)
    page = Page()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired")
        result = pipe.send("Runtime.evaluate", {"expression": script, "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise AssertionError(f"the test's script failed: {result['exceptionDetails']}")
        page.value = result["result"].get("value")
        metrics = pipe.send("Page.getLayoutMetrics", session=session)
        height = int(metrics["cssContentSize"]["height"])
        shot = pipe.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 4000), "scale": 1},
            },
            session=session,
        )
        page.screenshot = base64.b64decode(shot["data"])
        for ev in pipe.events:
            method = ev.get("method")
            if method == "Runtime.consoleAPICalled":
                page.console.append(
                    {"level": ev["params"].get("type"), "text": json.dumps(ev["params"].get("args"))[:500]}
                )
            elif method == "Runtime.exceptionThrown":
                page.console.append({"level": "error", "text": json.dumps(ev["params"])[:500]})
            elif method == "Log.entryAdded":
                entry = ev["params"]["entry"]
                page.console.append(
                    {"level": entry.get("level"), "text": entry.get("text"), "url": entry.get("url")}
                )
        try:
            pipe.send("Browser.close", timeout=10)
        except AssertionError:
            pass
    finally:
        os.close(to_w)
        os.close(from_r)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return page


def save_screenshot(png: bytes, path: Path) -> Path:
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
