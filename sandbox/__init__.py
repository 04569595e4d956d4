"""model-sandbox: open untrusted PyTorch checkpoints without trusting them.

The checkpoint is loaded for real, inside a network-less, credential-free, seccomp-confined
container; the host receives only SafeTensors (checked against a manifest) and a report.
``import sandbox`` imports neither torch nor docker: the stages that need them do.
"""

from . import _version
from ._api import convert, patch_torch, safe_load, scan
from ._batch import BatchOptions
from ._batch import run_batch as batch
from ._convert import Unrepresentable, load_composites
from ._pool import Pool
from .errors import (
    BatchError,
    ClusterError,
    EngineError,
    EngineUnavailable,
    HashMismatch,
    ImageMismatch,
    ImageMissing,
    InputError,
    InputNotFound,
    InputUnreadable,
    InternalError,
    LimitExceeded,
    LoadFailed,
    LockFileError,
    MalformedInput,
    MalformedStream,
    NotPinned,
    OutputRejected,
    PolicyError,
    ReportInvalid,
    SandboxError,
    SandboxViolation,
    TruncatedInput,
    UnpicklingFailed,
    UnrepresentableObject,
    UnsupportedFormat,
    UnverifiedWeights,
    WorkerNotReady,
)
from .policy import Limits, Policy
from .report import Event, Finding, LoadReport, Severity, Verdict

__version__ = _version.VERSION


__all__ = [
    "BatchError",
    "BatchOptions",
    "ClusterError",
    "EngineError",
    "EngineUnavailable",
    "Event",
    "Finding",
    "HashMismatch",
    "ImageMismatch",
    "ImageMissing",
    "InputError",
    "InputNotFound",
    "InputUnreadable",
    "InternalError",
    "LimitExceeded",
    "Limits",
    "LoadFailed",
    "LoadReport",
    "LockFileError",
    "MalformedInput",
    "MalformedStream",
    "NotPinned",
    "OutputRejected",
    "Policy",
    "PolicyError",
    "Pool",
    "ReportInvalid",
    "SandboxError",
    "SandboxViolation",
    "Severity",
    "TruncatedInput",
    "UnpicklingFailed",
    "Unrepresentable",
    "UnrepresentableObject",
    "UnsupportedFormat",
    "UnverifiedWeights",
    "Verdict",
    "WorkerNotReady",
    "batch",
    "convert",
    "load_composites",
    "patch_torch",
    "safe_load",
    "scan",
]
