"""Every error model-sandbox raises, in one tree.

::

    SandboxError                      base; .reference (stable kebab-case id), .hint, diagnostics()
    ├── InputError                    the input itself cannot be used
    │   ├── InputNotFound             no such file, or not a regular file
    │   ├── UnsupportedFormat         SafeTensors, unknown bytes, ...
    │   ├── MalformedInput            truncated/corrupt file, or a pickle stream the scanner rejects
    │   │   ├── TruncatedInput        the file ends before its data does
    │   │   └── MalformedStream       a pickle stream the static scan could not read (.partial)
    │   ├── InputUnreadable           the file cannot be read (permissions, I/O error)
    │   ├── NotPinned                 a lock file is in force and does not list the file
    │   └── HashMismatch              the file's sha256 differs from the pinned one
    ├── EngineError                   the container engine could not run the sandbox
    │   ├── EngineUnavailable         no reachable Docker daemon
    │   ├── ImageMissing              the worker image for this version is not built
    │   └── ImageMismatch             an image with our tag exists but was built from other code
    ├── LoadFailed                    the loader ran in the sandbox and failed (torch raised, ...)
    │   ├── UnpicklingFailed          torch's unpickler refused the stream
    │   └── LimitExceeded             a wall-clock, memory, pids or output-size limit ended it
    ├── OutputRejected                what came out of the sandbox is malformed: never trusted
    ├── UnrepresentableObject         weights_only=True but the file holds objects we cannot rebuild
    ├── PolicyError                   a policy file is invalid (exact field and reason)
    ├── SandboxViolation              the verdict reached the policy's threshold; .report has the evidence
    │   └── UnverifiedWeights         weights only, but the loader returned tensors the file does not hold
    ├── BatchError                    the batch as a whole cannot run (arguments, a held OUTDIR)
    ├── ClusterError                  the Dask cluster cannot run the batch, or lost a file's task
    │   └── WorkerNotReady            a Dask worker cannot run our sandbox (runner, image digest)
    ├── LockFileError                 a lock file cannot be used
    ├── ReportInvalid                 a saved report is not one (not JSON, a field of the wrong type)
    └── InternalError                 model-sandbox failed on this input (a bug)

Every class carries a message that says what happened and what to do, and structured details
(``.path``, ``.offset``, ``.report``, ...). A class declares its details as annotations, a class
default making one optional, and ``SandboxError``'s one constructor sets them from keywords: a
keyword the class does not declare, or a required detail left out, is a ``TypeError``. Every
error pickles with its details (a Dask worker's errors reach the client whole).

The classes also derive from what ``torch.load`` raises in the same case, so code written for
torch keeps catching them: ``SandboxViolation``, ``UnrepresentableObject`` and
``UnsupportedFormat`` are ``pickle.UnpicklingError``; ``MalformedInput`` and ``LoadFailed`` are
``RuntimeError``; ``TruncatedInput`` is also ``EOFError`` and ``UnpicklingError``, and
``UnpicklingFailed`` (torch's unpickler refused the stream) is also ``UnpicklingError``.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

if TYPE_CHECKING:
    from ._scan import StaticScan
    from .report import LoadReport

__all__ = [
    "BatchError",
    "ClusterError",
    "EngineError",
    "EngineUnavailable",
    "HashMismatch",
    "ImageMismatch",
    "ImageMissing",
    "InputError",
    "InputNotFound",
    "InputUnreadable",
    "InternalError",
    "LimitExceeded",
    "LoadFailed",
    "LockFileError",
    "MalformedInput",
    "MalformedStream",
    "NotPinned",
    "OutputRejected",
    "PolicyError",
    "ReportInvalid",
    "SandboxError",
    "SandboxViolation",
    "TruncatedInput",
    "UnpicklingFailed",
    "UnrepresentableObject",
    "UnsupportedFormat",
    "UnverifiedWeights",
    "WorkerNotReady",
]

_T = TypeVar("_T")


class SandboxError(Exception):
    """Base class. ``reference`` is stable and documented; ``hint`` says what to do.

    A subclass declares its structured details as annotations (a class default makes one
    optional; :func:`_detail` one that goes through a conversion), and this constructor sets
    them from keywords: an undeclared keyword, or a missing required one, is a ``TypeError``."""

    reference = "sandbox-error"
    hint = ""
    #: the report of the load that raised this, when there was one
    report: LoadReport | None = None
    #: every detail the class and its bases declare, in declaration order (set per subclass)
    _details: ClassVar[Mapping[str, _Detail]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        details: dict[str, _Detail] = {}
        for base in reversed(cls.__mro__[1:]):
            details.update(vars(base).get("_details", {}))
        for name in inspect.get_annotations(cls):
            if name in _NOT_DETAILS:
                continue
            declared = vars(cls).get(name, _REQUIRED)
            if isinstance(declared, _Detail):
                delattr(cls, name)  # its default is made per instance (a fresh list), never shared
                details[name] = declared
            else:
                details[name] = _Detail(declared)
        cls._details = MappingProxyType(details)

    def __init__(self, message: str, *, hint: str | None = None, **details: object) -> None:
        name = type(self).__name__
        declared = type(self)._details
        for key in details:
            if key not in declared:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
        values: dict[str, object] = {}
        for key, detail in declared.items():
            value = details.get(key, detail.default)
            if value is _REQUIRED:
                raise TypeError(f"{name}() missing required keyword argument {key!r}")
            values[key] = value if detail.convert is None else detail.convert(value)
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint
        for key, value in values.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[object, ...]:
        # pickled as its attributes, never by calling the constructor again (which wants the
        # details as keywords): an error crosses Dask's wire with its fields. _rebuild keeps the
        # arguments ClusterError's pickles had, so a worker of another version is still understood
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))

    def diagnostics(self) -> str:
        """Human text: what happened, then what to do."""
        text = f"error[{self.reference}]: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


_REQUIRED: Any = object()  # the default of a detail that a keyword must give
_NOT_DETAILS = frozenset({"reference", "hint", "message"})  # set otherwise, never as details


@dataclass(frozen=True)
class _Detail:
    """How the constructor sets one detail: from its keyword, else from ``default``
    (``_REQUIRED``: no default); through ``convert`` when there is one."""

    default: object
    convert: Callable[[Any], object] | None = None


def _detail(convert: Callable[[Any], _T], *, required: bool = False) -> _T:
    """Declares a detail whose value goes through ``convert``; when optional and not given,
    ``convert(None)`` makes its default for each instance."""
    return cast(_T, _Detail(_REQUIRED if required else None, convert))


def _fspath(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


def _fresh_list(items: Iterable[str] | None) -> list[str]:
    return list(items or [])


def _rebuild(cls: type[SandboxError], message: str, state: dict[str, object]) -> SandboxError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class InputError(SandboxError):
    reference = "input-error"

    path: str | None = _detail(_fspath)


class InputNotFound(InputError):
    reference = "input-not-found"
    hint = "check the path; only regular files (or symlinks to them) can be loaded"


class UnsupportedFormat(InputError, pickle.UnpicklingError):
    """Not a checkpoint format the tool loads (``torch.load`` raises ``UnpicklingError`` for
    such bytes: code that catches it keeps working)."""

    reference = "unsupported-format"
    hint = (
        "model-sandbox loads torch zip and legacy checkpoints, raw pickles, numpy .npy/.npz, "
        "joblib and TorchScript archives; SafeTensors files need no sandbox"
    )

    detected: str = "unknown"


class MalformedInput(InputError, RuntimeError):
    """A truncated or corrupt file (``torch.load`` raises ``RuntimeError`` for a corrupt zip)."""

    reference = "malformed-input"
    hint = "the file is truncated or corrupt; re-download it and compare its sha256"

    offset: int | None = None


class TruncatedInput(MalformedInput, EOFError, pickle.UnpicklingError):
    """The file ends before its data does. ``torch.load`` raises ``EOFError`` ("Ran out of
    input") or ``UnpicklingError`` ("pickle data was truncated") for one: this is both."""


class MalformedStream(MalformedInput):
    """A pickle stream (or the file holding it) is truncated or invalid, as the static scan
    read it. ``member`` names the stream, ``offset`` is the position in it; ``partial`` is the
    scan of everything read before the fault (``None`` when nothing was)."""

    member: str | None = None
    partial: StaticScan | None = None


class InputUnreadable(InputError):
    reference = "input-unreadable"
    hint = "check the file's permissions and the disk; nothing was loaded"


class NotPinned(InputError):
    reference = "not-pinned"
    hint = "add it with `model-sandbox lock` after checking it"


class HashMismatch(InputError):
    reference = "hash-mismatch"
    hint = "the file is not the one that was pinned: do not load it; re-download from a trusted source"

    path: str | None = _detail(_fspath, required=True)
    expected: str
    actual: str


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

    tag: str


class ImageMismatch(EngineError):
    reference = "image-mismatch"
    hint = "rebuild it with `model-sandbox image build --force`"

    tag: str
    expected: str
    found: str


class LoadFailed(SandboxError, RuntimeError):
    """The loader ran inside the sandbox and did not produce a result (what ``torch.load``
    would raise is in the message; the class is a ``RuntimeError`` as torch's errors are)."""

    reference = "load-failed"
    hint = "the checkpoint could not be loaded even by torch in the sandbox; see the report"

    report: LoadReport | None = None


class UnpicklingFailed(LoadFailed, pickle.UnpicklingError):
    """torch's unpickler refused the stream inside the sandbox (``torch.load`` raises
    ``UnpicklingError`` there too)."""


class LimitExceeded(LoadFailed):
    reference = "limit-exceeded"
    hint = "if the file is legitimate and large, raise the limit with a policy (see `policy show`)"

    limit: str
    value: float | int | None = None


class OutputRejected(SandboxError):
    reference = "output-rejected"
    hint = "the sandbox produced output that fails validation; treat the checkpoint as hostile and report it"

    item: str | None = None


class UnrepresentableObject(SandboxError, pickle.UnpicklingError):
    """``weights_only=True`` and the file holds objects that are not data (``torch.load`` raises
    ``UnpicklingError`` for them too)."""

    reference = "unrepresentable-object"
    hint = (
        "the checkpoint holds Python objects that cannot be rebuilt safely; pass "
        "weights_only=False to get named placeholders in their place"
    )

    types: list[str]


class PolicyError(SandboxError):
    reference = "policy-error"
    hint = "fix the policy file; `model-sandbox policy check FILE` lists every problem"

    source: str | None = None
    problems: list[str] = _detail(_fresh_list)


class SandboxViolation(SandboxError, pickle.UnpicklingError):
    """The policy judged the checkpoint unsafe. ``report`` holds the verdict and evidence.

    Also a ``pickle.UnpicklingError``, as ``torch.load(weights_only=True)`` raises for a file
    that imports what it will not load: loaders that catch it (to retry, skip or report) keep
    working when every load goes through the sandbox."""

    reference = "sandbox-violation"
    hint = "do not use this file; the report lists what it tried to do"

    report: LoadReport  # always set: the verdict and its evidence


class UnverifiedWeights(SandboxViolation):
    """The loader returned tensors that are not among those the file's records describe
    (computed or changed while loading), and the caller asked for weights only
    (``safe_load(weights_only=True)``, ``convert``). ``names`` lists them."""

    reference = "weights-unverified"
    hint = (
        "the file computes tensors while it loads; if you trust it, load it with "
        "safe_load(weights_only=False) and check the report's weights-unverified finding"
    )

    names: list[str] = _detail(_fresh_list)


class BatchError(SandboxError):
    """The batch as a whole cannot run (bad arguments, an OUTDIR another batch holds, ...)."""

    reference = "batch-error"
    hint = "check the SRC and OUTDIR arguments"


class ClusterError(SandboxError):
    """The Dask cluster of a distributed batch cannot run it (scheduler unreachable, no worker
    ready), or lost one file's task (its workers kept dying while running it)."""

    reference = "cluster-error"
    hint = "check the scheduler address and the workers' logs (docs/dask.md)"


class WorkerNotReady(ClusterError):
    """A Dask worker cannot run our sandbox: no working runner, or its model-sandbox (worker
    image digest) differs from the client's. It refuses every task with this error."""

    reference = "worker-not-ready"
    hint = (
        "install the client's model-sandbox version on the worker and build its image "
        "there (`model-sandbox image build`), then restart the worker"
    )

    worker: str = ""
    expected: str = ""  # the client's worker digest
    found: str = ""  # the worker's, when it was the digest that differed


class LockFileError(SandboxError):
    """A lock file (pins of sha256 per model file) cannot be used."""

    reference = "lock-file-invalid"
    hint = "regenerate it with `model-sandbox lock PATH... > FILE` after checking the files"


class ReportInvalid(SandboxError):
    """A saved JSON report cannot be read: too large, not strict JSON, another schema, or a
    field of the wrong type (``.problem`` says which)."""

    reference = "report-invalid"
    hint = "give a report written by model-sandbox (`--format json` or FILE.report.json)"

    path: str | None = None
    problem: str = ""


class InternalError(SandboxError):
    """model-sandbox itself failed on this input (a bug): in a batch, this file fails and the
    batch goes on."""

    reference = "internal-error"
    hint = "please report it with the report's details"
