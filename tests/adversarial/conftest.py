from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _needs_sandbox(sandbox_ready: str) -> str:
    """Every test here runs against the real engine and image."""
    return sandbox_ready
