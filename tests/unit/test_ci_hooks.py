"""The pre-commit hooks the repository ships: each entry is a working command line that fails
on an unsafe staged file and passes a benign one, and the file pattern takes model files
only. (Parsed without a YAML library: the file is a flat list of string-valued keys.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import checkpoints as ck
from tests.conftest import IN_CI

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
    # the static hook runs the checkout's stdlib-only code (no environment to build); the
    # dynamic one is the installed CLI
    assert found["model-sandbox-scan"]["language"] == "script"
    assert found["model-sandbox-scan"]["entry"] == "scripts/pre-commit-static-scan"
    dynamic = found["model-sandbox-scan-dynamic"]
    assert dynamic["language"] == "python" and dynamic["entry"] == "model-sandbox scan"
    for h in found.values():
        pattern = re.compile(h["files"])
        assert all(pattern.search(n) for n in ("model.pt", "w.bin", "a/b.ckpt", "x.pkl"))
        assert not any(pattern.search(n) for n in ("README.md", "w.safetensors", "config.json"))
    static = found["model-sandbox-scan"]["entry"]
    good = ck.save(ck.state_dict(), tmp_path / "good.pt")
    evil = ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, "true")), tmp_path / "evil.pt")
    env = {**os.environ, "MODEL_SANDBOX_PYTHON": sys.executable}

    def run(*files: Path) -> int:
        argv = [str(ROOT / static)] + [str(f) for f in files]
        return subprocess.run(argv, capture_output=True, timeout=120, env=env).returncode

    assert run(good) == 0
    assert run(good, evil) == 1


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=60)


def test_pre_commit_try_repo_passes_benign_and_fails_hostile(tmp_path: Path) -> None:
    """`pre-commit try-repo` of this repository (its working tree, uncommitted changes
    included) on a fresh repository: the static hook passes a staged benign model file and
    fails once a hostile one is staged too, whose payload never runs. Offline and fast: the
    hook builds no environment."""
    pre_commit = Path(sys.executable).with_name("pre-commit")
    assert pre_commit.is_file(), "pre-commit is in the dev extra: pip install -e '.[dev]'"
    if not (ROOT / ".git").exists():  # try-repo needs this repository as a git repository
        if IN_CI:
            pytest.fail("CI=true but the checkout is not a git repository")
        pytest.skip("not a git checkout")
    repo = tmp_path / "models"
    repo.mkdir()
    _git(repo, "init", "-q")
    ck.save(ck.state_dict(), repo / "good.pt")
    (repo / "notes.md").write_text("not a model file\n")
    _git(repo, "add", "good.pt", "notes.md")
    marker = tmp_path / "marker"
    ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), repo / "evil.bin")
    env = {
        **os.environ,
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        "MODEL_SANDBOX_PYTHON": sys.executable,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }

    def try_repo() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(pre_commit), "try-repo", str(ROOT), "model-sandbox-scan", "--verbose"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    start = time.monotonic()
    done = try_repo()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"model-sandbox scan \(static\)\.+Passed", done.stdout), done.stdout
    assert "good.pt: CLEAN" in done.stdout and "notes.md" not in done.stdout

    _git(repo, "add", "evil.bin")
    done = try_repo()
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"model-sandbox scan \(static\)\.+Failed", done.stdout), done.stdout
    assert "evil.bin: MALICIOUS" in done.stdout and "dangerous-global" not in done.stderr
    assert "posix.system" in done.stdout or "os.system" in done.stdout
    assert not marker.exists()
    assert time.monotonic() - start < 60, "the static hook must stay fast (no environment)"
