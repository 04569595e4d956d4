"""Stage 6, host: cross-checks between what the host knows and what the sandbox reported.

* the input the worker hashed inside the container is the file the host hashed before the
  run (a file swapped under the sandbox is an error, not a load);
* the weights the loader returned are the weights the file holds. For plain state_dicts the
  tensors are rebuilt from the archive's records without any unpickler
  (:func:`.reconstruct.try_reconstruct`) and compared name by name, so a pickle that changes
  weights while it loads (Sleepy Pickle) is caught (``weights-tampered``). For everything else
  (objects of any class, optimizer states, numpy arrays) the general reading
  (:func:`.reconstruct.try_inventory`) lists every tensor the file describes, and each tensor
  the loader returned must be one of them; one that is not was computed while loading and is
  ``weights-unverified`` (which ``safe_load(weights_only=True)`` and ``convert`` refuse);
* (tensor bytes against the manifest are checked while reading them, in ``_convert``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from sandbox import _scan
from sandbox._verify import reconstruct as _reconstruct
from sandbox._worker import _protocol as P
from sandbox.report import Finding, Severity

if TYPE_CHECKING:
    import torch

_MAX_NAMED = 20  # tensors named in one finding


def input_identity(host_sha256: str, status: P.Status | None) -> Finding | None:
    """A finding when the sandbox loaded other bytes than the host hashed."""
    if status is None or status.input_sha256 is None or status.input_sha256 == host_sha256:
        return None
    return Finding(
        rule="input-changed",
        severity=Severity.HIGH,
        category="evasion",
        message="the file inside the sandbox differs from the file the host hashed",
        evidence={"host_sha256": host_sha256, "sandbox_sha256": status.input_sha256},
    )


def _returned(
    manifest: P.Manifest, tensors: Mapping[str, torch.Tensor] | None, want_view: Mapping[str, Any] | None
) -> dict[str, _reconstruct.Actual]:
    """What the sandbox returned per tensor name: stored tensors by the manifest's sha256
    (computed by the host from the bytes it received; in a scan, where no bytes cross, the
    sandbox's own, which the host cannot check); a view by the
    digest of what the caller will see when the host holds the ``tensors`` (and, with
    ``want_view``, only for names in it), else ``None``: its base stands for it."""
    actual: dict[str, _reconstruct.Actual] = {}
    for e in manifest.tensors:
        actual[e.name] = (e.dtype, e.shape, e.sha256)
    for v in manifest.views:
        digest = None
        if tensors is not None and v.name in tensors and (want_view is None or v.name in want_view):
            from sandbox._convert import tensor_digest

            digest = tensor_digest(tensors[v.name])
        actual[v.name] = (v.dtype, v.shape, digest)
    return actual


_Reading: TypeAlias = "_reconstruct.Reconstruction | _reconstruct.Inventory | _reconstruct.NotReconstructed"


class Reading:
    """:func:`.reconstruct.read` in a background thread, started while the sandbox loads the same file
    (hashing the file's tensors then costs no wall-clock time); :meth:`result` waits."""

    def __init__(self, path: str, scan: _scan.StaticScan | None) -> None:
        self._result: _Reading | BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path, scan), daemon=True, name="model-sandbox-verify"
        )
        self._thread.start()

    def _run(self, path: str, scan: _scan.StaticScan | None) -> None:
        try:
            self._result = _reconstruct.read(path, scan, cancel=self._cancel)
        except BaseException as exc:  # handed to the caller by result()
            self._result = exc

    def cancel(self) -> None:
        """The result is no longer wanted (the load failed or was refused): the thread stops
        at its next check instead of hashing the rest of the file. Does not wait."""
        self._cancel.set()

    def result(self) -> _Reading:
        self._thread.join()
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result


# numpy dtype codes (native or no byte order) -> the torch dtype the sandbox returns them as
_NP_TORCH = {
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "i1": "int8",
    "i2": "int16",
    "i4": "int32",
    "i8": "int64",
    "u1": "uint8",
    "u2": "uint16",
    "u4": "uint32",
    "u8": "uint64",
    "b1": "bool",
    "c8": "complex64",
    "c16": "complex128",
}


def joblib_inventory(scan: _scan.StaticScan) -> _reconstruct.Inventory:
    """The host's reading of a joblib file: every inline numeric array the static scan walked
    past (joblib's own layout, inflated within the scan's bound), by dtype, shape and sha256.
    Only C-ordered arrays in this machine's byte order are listed: the sandbox returns arrays
    as native, row-major tensors, so others (and object arrays) stay unverified."""
    import sys

    native = "<" if sys.byteorder == "little" else ">"
    digests = set()
    for a in scan.joblib_arrays:
        dtype = _NP_TORCH.get(a.code.lstrip("<>|="))
        if dtype is None or (a.fortran and len(a.shape) > 1) or a.byteorder not in ("|", "=", native):
            continue
        digests.add((dtype, a.shape, a.sha256))
    return _reconstruct.Inventory(format="joblib", digests=frozenset(digests), findings=(), named={})


def weights(
    path: str,
    manifest: P.Manifest,
    tensors: Mapping[str, torch.Tensor] | None = None,
    scan: _scan.StaticScan | None = None,
    reading: Reading | None = None,
) -> list[Finding]:
    """Compare what the sandbox returned with an independent reading of the file.

    ``scan``: the static stage's complete scan of the same file, when there is one (the file
    is not scanned again); ``reading``: that reading, already under way."""
    got = reading.result() if reading is not None else _reconstruct.read(path, scan)
    if isinstance(got, _reconstruct.NotReconstructed) and scan is not None and scan.format == "joblib":
        got = joblib_inventory(scan)
    if isinstance(got, _reconstruct.Reconstruction):
        return list(got.findings) + _reconstruct.compare_digests(
            got, _returned(manifest, tensors, got.tensors)
        )
    actual = _returned(manifest, tensors, None)
    if not actual:
        return []  # nothing handed over, nothing to verify
    inv = got
    if isinstance(inv, _reconstruct.NotReconstructed):
        unverified = sorted(actual)
        reason = f"the file has no independent reading: {inv.reason}"
        found: list[Finding] = []
    else:
        # a name both readings give (plain containers from the top) must hold the same tensor
        differ = [
            n
            for n, got in sorted(actual.items())
            if n in inv.named and got[2] is not None and got != inv.named[n]
        ]
        changed: list[dict[str, Any]] = [
            {
                "name": n,
                "expected_sha256": inv.named[n][2],
                "actual_sha256": actual[n][2],
                "expected_shape": list(inv.named[n][1]),
                "actual_shape": list(actual[n][1]),
            }
            for n in differ
        ]
        unverified = sorted(
            n
            for n, (dtype, shape, digest) in actual.items()
            if digest is not None and (dtype, shape, digest) not in inv.digests and n not in differ
        )
        reason = "not among the tensors the file's records describe: computed or changed while loading"
        found = list(inv.findings)
        if changed:
            found.append(
                Finding(
                    rule="weights-tampered",
                    severity=Severity.HIGH,
                    category="evasion",
                    message=(
                        "the loader returned other weights than the file holds under these "
                        "names: "
                        + ", ".join(differ[:5])
                        + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                    ),
                    evidence={"tensors": changed[:_MAX_NAMED], "count": len(changed), "format": inv.format},
                )
            )
    if unverified:
        found.append(
            Finding(
                rule="weights-unverified",
                severity=Severity.MEDIUM,
                category="integrity",
                message=(
                    f"{len(unverified)} of the {len(actual)} tensors the loader returned could "
                    f"not be verified against the file ({reason}): "
                    + ", ".join(unverified[:5])
                    + (f" and {len(unverified) - 5} more" if len(unverified) > 5 else "")
                ),
                evidence={
                    "tensors": unverified[:_MAX_NAMED],
                    "count": len(unverified),
                    "returned": len(actual),
                    "reason": reason,
                    "format": inv.format,
                },
            )
        )
    return found
