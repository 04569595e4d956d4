"""model-sandbox: open untrusted PyTorch checkpoints without trusting them.

The checkpoint is loaded for real, inside a network-less, credential-free, seccomp-confined
container; the host receives only SafeTensors (checked against a manifest) and a report.
``import sandbox`` imports neither torch nor numpy: the stages that need them do.
"""

from . import _version, errors
from ._api import convert, patch_torch, safe_load, scan
from ._batch import BatchOptions
from ._batch import run_batch as batch
from ._convert import Unrepresentable, load_composites
from ._pool import Pool
from .errors import *  # noqa: F403 (the whole error tree, errors.__all__, is public here)
from .policy import Limits, Policy
from .report import Event, Finding, LoadReport, Severity, Verdict

__version__ = _version.VERSION


# the package's own names and every error class (errors.__all__), sorted
__all__ = [
    "BatchOptions",
    "Event",
    "Finding",
    "Limits",
    "LoadReport",
    "Policy",
    "Pool",
    "Severity",
    "Unrepresentable",
    "Verdict",
    "batch",
    "convert",
    "load_composites",
    "patch_torch",
    "safe_load",
    "scan",
]
__all__ += errors.__all__
__all__.sort()
