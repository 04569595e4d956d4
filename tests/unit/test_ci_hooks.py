"""The pre-commit hooks the repository ships: each entry is a working command line that fails
on an unsafe staged file and passes a benign one, and the file pattern takes model files
only. (Parsed without a YAML library: the file is a flat list of string-valued keys.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests import checkpoints as ck

ROOT = Path(__file__).resolve().parents[2]


def hooks() -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for line in (ROOT / ".pre-commit-hooks.yaml").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^(-\s+|\s+)(\w+):\s*(.*)$", line)
        assert m, line
        if m.group(1).startswith("-"):
            out.append({})
        value = m.group(3).strip()
        out[-1][m.group(2)] = value[1:-1] if value[:1] in "'\"" else value
    return out


def test_hooks_are_the_cli_on_model_files(tmp_path: Path) -> None:
    found = {h["id"]: h for h in hooks()}
    assert set(found) == {"model-sandbox-scan", "model-sandbox-scan-dynamic"}
    for h in found.values():
        assert h["language"] == "python" and h["entry"].startswith("model-sandbox scan")
        pattern = re.compile(h["files"])
        assert all(pattern.search(n) for n in ("model.pt", "w.bin", "a/b.ckpt", "x.pkl"))
        assert not any(pattern.search(n) for n in ("README.md", "w.safetensors", "config.json"))
    static = found["model-sandbox-scan"]["entry"]
    good = ck.save(ck.state_dict(), tmp_path / "good.pt")
    evil = ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, "true")), tmp_path / "evil.pt")
    cli = [str(Path(sys.executable).with_name("model-sandbox"))]

    def run(*files: Path) -> int:
        argv = cli + shlex.split(static)[1:] + [str(f) for f in files]
        return subprocess.run(argv, capture_output=True, timeout=120).returncode

    assert run(good) == 0
    assert run(good, evil) == 1
