"""Fixtures of the container tier, whose tests run the real sandbox on the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Protocol

import pytest


class Cli(Protocol):
    def __call__(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]: ...


def _run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=env,
    )


@pytest.fixture
def cli() -> Cli:
    """Runs ``python -m sandbox ARGS`` with this interpreter (the package under test) to its
    end, in ``cwd`` with ``env`` when given, its output captured as text: the exit code is the
    test's to check. ``timeout`` (seconds) ends a run that hangs."""
    return _run_cli
