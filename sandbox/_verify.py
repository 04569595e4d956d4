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
    actual: dict[str, _reconstruct.Actual] = {}
    for e in manifest["tensors"]:
        actual[e["name"]] = (e["dtype"], tuple(e["shape"]), e["sha256"])
    for v in manifest["views"]:
        digest = None  # without the host's tensors a view's base stands for it
        if tensors is not None and v["name"] in tensors and v["name"] in rec.tensors:
            from ._convert import tensor_digest

            digest = tensor_digest(tensors[v["name"]])
        actual[v["name"]] = (v["dtype"], tuple(v["shape"]), digest)
    return list(rec.findings) + _reconstruct.compare_digests(rec, actual)
