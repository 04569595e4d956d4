"""model-sandbox: open untrusted PyTorch checkpoints without trusting them.

The checkpoint is loaded for real, inside a network-less, credential-free, seccomp-confined
container; the host receives only SafeTensors (checked against a manifest) and a report.
``import sandbox`` imports neither torch nor docker: the stages that need them do.
"""

from ._api import convert, patch_torch, safe_load, scan
from ._convert import Unrepresentable
from ._pool import Pool
from .errors import (
    EngineError,
    EngineUnavailable,
    HashMismatch,
    ImageMismatch,
    ImageMissing,
    InputError,
    InputNotFound,
    LimitExceeded,
    LoadFailed,
    MalformedInput,
    OutputRejected,
    PolicyError,
    SandboxError,
    SandboxViolation,
    UnrepresentableObject,
    UnsupportedFormat,
    UnverifiedWeights,
)
from .policy import Limits, Policy
from .report import Event, Finding, LoadReport, Severity, Verdict

__version__ = "0.1.0"

__all__ = [
    "EngineError",
    "EngineUnavailable",
    "Event",
    "Finding",
    "HashMismatch",
    "ImageMismatch",
    "ImageMissing",
    "InputError",
    "InputNotFound",
    "LimitExceeded",
    "Limits",
    "LoadFailed",
    "LoadReport",
    "MalformedInput",
    "OutputRejected",
    "Policy",
    "PolicyError",
    "Pool",
    "SandboxError",
    "SandboxViolation",
    "Severity",
    "Unrepresentable",
    "UnrepresentableObject",
    "UnsupportedFormat",
    "UnverifiedWeights",
    "Verdict",
    "convert",
    "patch_torch",
    "safe_load",
    "scan",
]
