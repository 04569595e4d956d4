"""Stage 6, host: cross-checks between what the host knows and what the sandbox reported.

* the input the worker hashed inside the container is the file the host hashed before the
  run (a file swapped under the sandbox is an error, not a load);
* the weights the loader returned are the weights the file holds: for plain state_dicts the
  tensors are rebuilt from the archive's records without any unpickler
  (:mod:`._reconstruct`) and compared, so a pickle that changes weights while it loads
  (Sleepy Pickle) is caught;
* (tensor bytes against the manifest are checked while reading them, in ``_convert``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _reconstruct
from .report import Finding, Severity

if TYPE_CHECKING:
    import torch


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


def weights(path: str, manifest: dict[str, Any],
            tensors: Mapping[str, torch.Tensor] | None = None) -> list[Finding]:
    """Compare what the sandbox returned with an independent reading of the file.

    Stored tensors are compared through the manifest's sha256 (the host has already checked
    every stored tensor's bytes against it); views, when the host holds the ``tensors``, are
    hashed as the caller will see them. Without tensors (a scan keeps no weights) a view is
    covered by its base."""
    rec = _reconstruct.try_reconstruct(path)
    if isinstance(rec, _reconstruct.NotReconstructed):
        return [rec.finding()]
    findings = list(rec.findings)
    stored = {e["name"]: e for e in manifest["tensors"]}
    views = {v["name"]: v for v in manifest["views"]}
    expected = dict(rec.tensors)
    missing = sorted(n for n in expected if n not in stored and n not in views)
    extra = sorted(n for n in [*stored, *views] if n not in expected and n not in rec.unreadable)
    changed: list[dict[str, Any]] = []
    for name, want in expected.items():
        entry = stored.get(name) or views.get(name)
        if entry is None:
            continue
        if name in stored:
            digest: str | None = entry["sha256"]
        elif tensors is not None and name in tensors:
            from ._convert import tensor_digest

            digest = tensor_digest(tensors[name])
        else:
            digest = None  # a view without the host's tensors: its base is compared
        if entry["dtype"] != want.dtype or tuple(entry["shape"]) != tuple(want.shape) or \
                (digest is not None and digest != want.sha256):
            changed.append({"name": name, "expected_sha256": want.sha256, "actual_sha256": digest})
    if changed:
        findings.append(Finding(
            rule="weights-tampered", severity=Severity.HIGH, category="evasion",
            message="the loader returned weights that are not in the file: "
                    + ", ".join(str(c["name"]) for c in changed[:5])
                    + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""),
            evidence={"tensors": changed[:20], "count": len(changed), "format": rec.format}))
    if missing or extra:
        findings.append(Finding(
            rule="weights-mismatch", severity=Severity.HIGH, category="evasion",
            message=f"the loader returned {len(extra)} tensor(s) the file does not describe and "
                    f"left out {len(missing)} it does",
            evidence={"missing": missing[:20], "extra": extra[:20]}))
    return findings
