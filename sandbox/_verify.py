"""Stage 6, host: cross-checks between what the host knows and what the sandbox reported.

* the input the worker hashed inside the container is the file the host hashed before the
  run (a file swapped under the sandbox is an error, not a load);
* (tensor bytes against the manifest are checked while reading them, in ``_convert``).
"""

from __future__ import annotations

from typing import Any

from .report import Finding, Severity


def input_identity(host_sha256: str, status: dict[str, Any] | None) -> Finding | None:
    """A finding when the sandbox loaded other bytes than the host hashed."""
    if status is None or "input_sha256" not in status:
        return None
    if status["input_sha256"] == host_sha256:
        return None
    return Finding(
        rule="input-changed", severity=Severity.HIGH, category="evasion",
        message="the file inside the sandbox differs from the file the host hashed",
        evidence={"host_sha256": host_sha256, "sandbox_sha256": status["input_sha256"]})
