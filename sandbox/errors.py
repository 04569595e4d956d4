"""Every error model-sandbox raises, in one tree.

::

    SandboxError                      base; .reference (stable kebab-case id), .hint, diagnostics()
    ├── InputError                    the input itself cannot be used
    │   ├── InputNotFound             no such file, or not a regular file
    │   ├── UnsupportedFormat         TorchScript, unknown bytes, ...
    │   ├── MalformedInput            truncated/corrupt file, or a pickle stream the scanner rejects
    │   └── HashMismatch              the file's sha256 differs from the pinned one
    ├── EngineError                   the container engine could not run the sandbox
    │   ├── EngineUnavailable         no reachable Docker daemon
    │   ├── ImageMissing              the worker image for this version is not built
    │   └── ImageMismatch             an image with our tag exists but was built from other code
    ├── LoadFailed                    the loader ran in the sandbox and failed (torch raised, ...)
    │   └── LimitExceeded             a wall-clock, memory, pids or output-size limit ended it
    ├── OutputRejected                what came out of the sandbox is malformed: never trusted
    ├── UnrepresentableObject         weights_only=True but the file holds objects we cannot rebuild
    ├── PolicyError                   a policy file is invalid (exact field and reason)
    └── SandboxViolation              the verdict reached the policy's threshold; .report has the evidence
        └── UnverifiedWeights         weights only, but the loader returned tensors the file does not hold

Every class carries structured fields and a message that says what happened and what to do.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import LoadReport

__all__ = [
    "EngineError",
    "EngineUnavailable",
    "HashMismatch",
    "ImageMismatch",
    "ImageMissing",
    "InputError",
    "InputNotFound",
    "LimitExceeded",
    "LoadFailed",
    "MalformedInput",
    "OutputRejected",
    "PolicyError",
    "SandboxError",
    "SandboxViolation",
    "UnrepresentableObject",
    "UnsupportedFormat",
]


class SandboxError(Exception):
    """Base class. ``reference`` is stable and documented; ``hint`` says what to do."""

    reference = "sandbox-error"
    hint = ""
    #: the report of the load that raised this, when there was one
    report: LoadReport | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        """Human text: what happened, then what to do."""
        text = f"error[{self.reference}]: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class InputError(SandboxError):
    reference = "input-error"

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.path = None if path is None else os.fspath(path)


class InputNotFound(InputError):
    reference = "input-not-found"
    hint = "check the path; only regular files (or symlinks to them) can be loaded"


class UnsupportedFormat(InputError):
    reference = "unsupported-format"
    hint = (
        "model-sandbox loads torch zip and legacy checkpoints, raw pickles and numpy .npy/.npz; "
        "TorchScript archives need torch.jit.load, which this tool does not run"
    )

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 detected: str = "unknown"):
        super().__init__(message, path=path)
        self.detected = detected


class MalformedInput(InputError):
    reference = "malformed-input"
    hint = "the file is truncated or corrupt; re-download it and compare its sha256"

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 offset: int | None = None):
        super().__init__(message, path=path)
        self.offset = offset


class HashMismatch(InputError):
    reference = "hash-mismatch"
    hint = "the file is not the one that was pinned: do not load it; re-download from a trusted source"

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None, expected: str, actual: str):
        super().__init__(message, path=path)
        self.expected = expected
        self.actual = actual


class EngineError(SandboxError):
    reference = "engine-error"
    hint = "check that a Docker engine is running (`docker info`) and that you may use it"


class EngineUnavailable(EngineError):
    reference = "engine-unavailable"
    hint = (
        "start a Docker engine (e.g. `dockerd &` as root, or `make engine`) or set DOCKER_HOST; "
        "`make demo` installs and starts one on Debian"
    )


class ImageMissing(EngineError):
    reference = "image-missing"
    hint = "build the worker image once with `model-sandbox image build` (about a minute, offline)"

    def __init__(self, message: str, *, tag: str):
        super().__init__(message)
        self.tag = tag


class ImageMismatch(EngineError):
    reference = "image-mismatch"
    hint = "rebuild it with `model-sandbox image build --force`"

    def __init__(self, message: str, *, tag: str, expected: str, found: str):
        super().__init__(message)
        self.tag = tag
        self.expected = expected
        self.found = found


class LoadFailed(SandboxError):
    """The loader ran inside the sandbox and did not produce a result."""

    reference = "load-failed"
    hint = "the checkpoint could not be loaded even by torch in the sandbox; see the report"

    def __init__(self, message: str, *, report: LoadReport | None = None):
        super().__init__(message)
        self.report = report


class LimitExceeded(LoadFailed):
    reference = "limit-exceeded"
    hint = "if the file is legitimate and large, raise the limit with a policy (see `policy show`)"

    def __init__(self, message: str, *, limit: str, value: float | int | None = None,
                 report: LoadReport | None = None):
        super().__init__(message, report=report)
        self.limit = limit
        self.value = value


class OutputRejected(SandboxError):
    reference = "output-rejected"
    hint = (
        "the sandbox produced output that fails validation; treat the checkpoint as hostile "
        "and report it"
    )

    def __init__(self, message: str, *, item: str | None = None):
        super().__init__(message)
        self.item = item


class UnrepresentableObject(SandboxError):
    reference = "unrepresentable-object"
    hint = (
        "the checkpoint holds Python objects that cannot be rebuilt safely; pass "
        "weights_only=False to get named placeholders in their place"
    )

    def __init__(self, message: str, *, types: list[str]):
        super().__init__(message)
        self.types = types


class PolicyError(SandboxError):
    reference = "policy-error"
    hint = "fix the policy file; `model-sandbox policy check FILE` lists every problem"

    def __init__(self, message: str, *, source: str | None = None, problems: list[str] | None = None):
        super().__init__(message)
        self.source = source
        self.problems = list(problems or [])


class SandboxViolation(SandboxError):
    """The policy judged the checkpoint unsafe. ``report`` holds the verdict and evidence."""

    reference = "sandbox-violation"
    hint = "do not use this file; the report lists what it tried to do"

    def __init__(self, message: str, *, report: LoadReport):
        super().__init__(message)
        self.report = report


class UnverifiedWeights(SandboxViolation):
    """The loader returned tensors that are not among those the file's records describe
    (computed or changed while loading), and the caller asked for weights only
    (``safe_load(weights_only=True)``, ``convert``). ``names`` lists them."""

    reference = "weights-unverified"
    hint = ("the file computes tensors while it loads; if you trust it, load it with "
            "safe_load(weights_only=False) and check the report's weights-unverified finding")

    def __init__(self, message: str, *, report: LoadReport, names: list[str] | None = None):
        super().__init__(message, report=report)
        self.names = list(names or [])
