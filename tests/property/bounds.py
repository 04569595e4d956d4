"""What the property tests of the host's readers of untrusted input hold every call to: only
the documented errors escape, and the memory it traces stays small."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

from sandbox.errors import MalformedInput, UnsupportedFormat

ALLOWED_ERRORS = (MalformedInput, UnsupportedFormat)
PEAK_LIMIT = 48 * 1024 * 1024  # bytes traced while one small input is scanned or read


def bounded(fn: Callable[[], Any]) -> None:
    """Run ``fn``; only the allowed errors may escape, and its traced peak stays small."""
    tracemalloc.start()
    try:
        fn()
    except ALLOWED_ERRORS:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, peak
