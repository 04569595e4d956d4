"""The real CLI's batch output in a pseudo-terminal (rich's bar and tables, colours, NO_COLOR;
and a scan of several files) and through a pipe (the plain per-file lines and summary that
scripts parse, no escapes)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests import checkpoints as ck
from tests.container.conftest import Cli

SGR_COLOUR = re.compile(rb"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;[0-9;]+)m")


def in_pty(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, bytes]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; return what it drew."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the last holder of the terminal closed it
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        code = proc.wait(timeout=60)
    return code, bytes(out)


def test_batch_on_a_terminal_and_through_a_pipe(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        torch.save(ck.state_dict(), src / f"good{i}.pt")
    marker = tmp_path / "marker"
    ck.save(ck.hostile_checkpoint(ck.exec_payload(f"open({str(marker)!r}, 'w')")), src / "evil.pt")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(COLUMNS="200", LINES="40", TERM="xterm-256color")

    code, drawn = in_pty(["convert", str(src), "-o", str(tmp_path / "out"), "-j", "1"], env)
    assert code == 1, drawn[-3000:]
    text = drawn.decode("utf-8", "replace")
    assert re.search(r"\d/3 files", text) and "files/s" in text and "ETA" in text
    assert "3/3 files" in text and "100%" in text
    assert "refused" in text and "evil.pt" in text  # listed above the bar as it finished
    assert "refused as unsafe" in text and "MALICIOUS" in text  # the summary's tables
    assert "┃" in text or "│" in text
    assert SGR_COLOUR.search(drawn)
    assert not marker.exists()

    # NO_COLOR: the same drawing without a colour (a re-run: every file unchanged, reused)
    code, drawn = in_pty(
        ["convert", str(src), "-o", str(tmp_path / "out"), "-j", "1"], {**env, "NO_COLOR": "1"}
    )
    assert code == 1 and b"3 files" in drawn and b"MALICIOUS" in drawn
    assert not SGR_COLOUR.search(drawn), drawn[-2000:]

    # scan of several files on a terminal: a bar while it runs, a table of verdicts at the end
    code, drawn = in_pty(["scan", str(src)], env)
    assert code == 1, drawn[-3000:]
    text = drawn.decode("utf-8", "replace")
    assert re.search(r"[0-3]/3", text) and "ETA" in text
    assert "3 files scanned" in text and "MALICIOUS" in text and "CLEAN" in text
    assert not marker.exists()

    # a pipe: the plain lines, as before
    proc = cli("convert", str(src), "-o", str(tmp_path / "out"), "-j", "1", env=env)
    assert proc.returncode == 1
    assert "\x1b" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(re.fullmatch(r"converted\s+clean\s+good0\.pt \(unchanged\)", ln) for ln in lines), lines
    assert any(ln.startswith("model-sandbox: 3 files:") for ln in lines), lines
    assert not marker.exists()
