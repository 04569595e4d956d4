"""model-sandbox: open untrusted PyTorch checkpoints without trusting them.

The checkpoint is loaded for real, inside a network-less, credential-free, seccomp-confined
container; the host receives only SafeTensors (checked against a manifest) and a report.
``import sandbox`` imports neither torch nor docker: the stages that need them do.
"""

from . import _version
from ._api import convert, patch_torch, safe_load, scan
from ._convert import Unrepresentable, load_composites
from ._pool import Pool
from .errors import (
    BatchError,
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
    SandboxError,
    SandboxViolation,
    TruncatedInput,
    UnpicklingFailed,
    UnrepresentableObject,
    UnsupportedFormat,
    UnverifiedWeights,
)
from .policy import Limits, Policy
from .report import Event, Finding, LoadReport, Severity, Verdict

__version__ = _version.VERSION


__all__ = [
    "BatchError",
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
    "convert",
    "load_composites",
    "patch_torch",
    "safe_load",
    "scan",
]
