"""The static stage: what a checkpoint *would* import, read from its bytes without loading it
(host side; standard library only).

* :mod:`.scan`: :func:`identify` and :func:`scan_file` (by content, never by name) and
  :func:`scan_pickle_bytes`; the errors they raise are described there;
* :mod:`.containers`: the scan of each container (zip, npz, npy, tar, legacy, joblib);
* :mod:`.walker`: one pickle stream run symbolically over the shared opcode decoder;
* :mod:`.globals`: the allowlist, the dangerous-globals table and :func:`classify_global`;
* :mod:`.results`: the records a scan returns (:class:`StaticScan` and its parts).

The containers themselves are read by :mod:`sandbox._formats`, which the host's verification
shares.
"""

from sandbox.errors import MalformedStream

from .globals import ALLOWED_GLOBALS, DANGEROUS_GLOBALS, STORAGE_TYPES, classify_global
from .results import GlobalRef, PickleScan, StaticScan, StorageRecord
from .scan import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MEMO,
    DEFAULT_MAX_OPS,
    DEFAULT_MAX_PICKLE_BYTES,
    DEFAULT_TIME_BUDGET_S,
    FORMATS,
    identify,
    scan_file,
    scan_pickle_bytes,
)

__all__ = [
    "ALLOWED_GLOBALS",
    "DANGEROUS_GLOBALS",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_MEMO",
    "DEFAULT_MAX_OPS",
    "DEFAULT_MAX_PICKLE_BYTES",
    "DEFAULT_TIME_BUDGET_S",
    "FORMATS",
    "STORAGE_TYPES",
    "GlobalRef",
    "MalformedStream",
    "PickleScan",
    "StaticScan",
    "StorageRecord",
    "classify_global",
    "identify",
    "scan_file",
    "scan_pickle_bytes",
]
