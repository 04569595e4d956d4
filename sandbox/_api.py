"""The public operations, each a short sequence of pipeline stages:

    scan -> launch -> monitor -> extract -> convert -> verify -> report

:func:`safe_load` is a drop-in for ``torch.load`` whose pickle runs only inside the sandbox;
:func:`convert` writes a checked SafeTensors file; :func:`scan` loads without keeping weights
and returns the report; :func:`patch_torch` routes every ``torch.load`` through
:func:`safe_load`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickletools
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import _convert, _events, _extract, _image, _launch, _monitor, _scan, _verify
from ._channel import WORK_PREFIX
from ._pool import default_runner as _default_runner
from ._worker import _protocol as P
from .errors import (
    HashMismatch,
    InputNotFound,
    MalformedInput,
    OutputRejected,
    SandboxError,
    SandboxViolation,
    UnsupportedFormat,
    UnverifiedWeights,
)
from .policy import Policy
from .report import Finding, LoadReport, Severity, Verdict

if TYPE_CHECKING:
    import torch

    from ._reconstruct import Placement

__all__ = ["convert", "patch_torch", "safe_load", "scan"]

_VERSION = "0.1.0"


# -- the pipeline ------------------------------------------------------------------------------

@dataclass
class _Loaded:
    report: LoadReport
    output: _extract.WorkerOutput | None
    error: SandboxError | None
    stopped_early: bool = False
    tensors: dict[str, torch.Tensor] | None = None  # checked against the manifest
    handoff: str = "memfd"  # or "layout": the tensors were mapped from the input itself
    input_path: str = ""    # /proc/self/fd/N of the host's descriptor of the input
    static: _scan.StaticScan | None = None  # the static stage's scan, reused by the layout check
    placements: list[Placement] = dataclasses.field(default_factory=list)
    reading: _verify.Reading | None = None  # the host's own reading, under way beside the load


def _hash_file(path: str) -> tuple[str, int]:
    return P.sha256_file(path)


def _open_input(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(real path, read-only descriptor) of a regular, readable input. The descriptor is what
    the sandbox gets: no path of the host is mounted, nothing is copied."""
    p = os.path.realpath(os.fspath(path))
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputNotFound(f"cannot open {os.fspath(path)!r}: {exc.strerror}", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputNotFound(f"{os.fspath(path)!r} is not a regular file", path=path)
    os.set_blocking(fd, True)
    if _sandbox_may_write(st):
        fd = _private_copy(fd)
    return p, fd


_PICKLE_OPCODES = frozenset(op.code.encode("latin-1") for op in pickletools.opcodes)
_MAGICS = (b"PK\x03\x04", b"\x93NUMPY")


def _refuse_non_checkpoint(fd: int, path: str | os.PathLike[str]) -> None:
    """Refuse, from the first bytes alone, an input that no loader could take: not a zip, a
    numpy file, a tar archive or a pickle (a file of zeros, a text file, an image). A 20 GB
    file of zeros is refused at once instead of being hashed and loaded."""
    head = os.pread(fd, 512, 0)
    if not head:
        raise MalformedInput(f"{os.fspath(path)!r} is empty", path=path)
    if head.startswith(_MAGICS) or head[257:262] == b"ustar" or head[:1] in _PICKLE_OPCODES:
        return
    if len(head) >= 9 and head[8:9] == b"{":  # SafeTensors: the static stage says so clearly
        return
    raise UnsupportedFormat(f"{os.fspath(path)!r} is not a checkpoint: its first bytes are not "
                            "a zip, numpy, tar or pickle header", path=path, detected="unknown")


def _identity(fd: int) -> tuple[int, int, int, int]:
    """(inode, size, mtime, ctime) of the open input: any write to the file changes it."""
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Hasher:
    """sha256 of the input in a thread (hashlib releases the GIL): the static scan and the
    sandbox run meanwhile. :meth:`result` waits for it and re-raises its error."""

    def __init__(self, fd: int) -> None:
        self._digest: str | None = None
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(fd,), name="model-sandbox-hash",
                                        daemon=True)
        self._thread.start()

    def _run(self, fd: int) -> None:
        try:
            self._digest = P.sha256_fd(fd)[0]
        except OSError as exc:
            self._error = exc

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


def _sandbox_may_write(st: os.stat_result) -> bool:
    """Whether the sandbox's uid could reopen the file for writing through its descriptor
    (``/proc/self/fd``): world-writable, or owned or group-writable by that uid."""
    uid = _image.SANDBOX_UID
    return bool(st.st_mode & stat.S_IWOTH or st.st_uid == uid or
                (st.st_mode & stat.S_IWGRP and st.st_gid == uid))


def _private_copy(fd: int) -> int:
    """A read-only, already unlinked copy of ``fd``'s file (closes ``fd``): what the sandbox
    gets instead of a file it could modify."""
    try:
        tmp = tempfile.TemporaryFile(prefix=f"{_WORK_PREFIX}{os.getpid()}-in-")
        with os.fdopen(fd, "rb") as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.flush()
        os.fchmod(tmp.fileno(), 0o444)
        out = os.dup(tmp.fileno())
        tmp.close()
        return out
    except OSError as exc:
        raise InputNotFound(f"cannot stage a private copy of the input: {exc.strerror}") from None


_WORK_PREFIX = WORK_PREFIX
_swept = False


def _sweep_work_dirs() -> None:
    """Once per process: remove work directories whose process is gone (one killed with
    SIGKILL cannot clean up its channel directories)."""
    global _swept
    if _swept:
        return
    _swept = True
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(_WORK_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_WORK_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def _judge(report: LoadReport) -> Verdict:
    """High-severity evidence decides even when the load then failed: a payload that tried to
    run a program and crashed the load is malicious, not merely an error. A lost monitor alone
    is an error (the load's outcome is unknown), never clean."""
    worst = max((f.severity for f in report.findings if f.rule != "monitor-lost"), default=None)
    if worst is not None and worst >= Severity.HIGH:
        return Verdict.MALICIOUS
    if any(f.rule == "monitor-lost" for f in report.findings):
        return Verdict.ERROR
    if report.error is not None:
        return Verdict.ERROR
    if worst is None or worst <= Severity.LOW:
        return Verdict.CLEAN
    return Verdict.SUSPICIOUS


_SCAN_STOPPED = "static scan stopped"


def _static_stage(path: str, report: LoadReport, policy: Policy, *,
                  source: str | None = None) -> _scan.StaticScan | None:
    """Stage 1: read every pickle without running it. Its findings join the report (marked
    ``source: static``); a file it cannot parse is left to the real loader to judge.
    ``source``: where to read it (the host's descriptor of ``path``), when not ``path``."""
    st: _scan.StaticScan | None
    try:
        st = _scan.scan_file(source or path)
    except _scan.MalformedStream as exc:
        report.notes.append(f"{_SCAN_STOPPED}: {exc.message}")
        st = exc.partial
    except SandboxError as exc:
        report.notes.append(f"static scan failed: {exc.message}")
        return None
    if st is None:
        return None
    if st.format in ("torchscript", "safetensors"):
        what = {"torchscript": "a TorchScript archive (it needs torch.jit.load, which this tool "
                               "does not run)",
                "safetensors": "already SafeTensors: open it with the safetensors library"}
        raise UnsupportedFormat(f"{report.input_path} is {what[st.format]}", path=path,
                                detected=st.format)
    unknown = Severity.parse(policy.static.unknown_globals)
    for f in st.findings:
        severity = unknown if f.rule == "unknown-global" else f.severity
        if f.rule == "unknown-global" and _calls_a_function(f.evidence):
            # rebuilding an object of some class is what checkpoints do; *calling* a function
            # nobody listed while loading is not (timeit, torch ops, ...): at least MEDIUM
            severity = max(severity, Severity.MEDIUM)
            f = dataclasses.replace(f, evidence={**f.evidence, "kind": "function"})
        report.add(dataclasses.replace(f, severity=severity,
                                       evidence={**f.evidence, "source": "static"}))
    dangerous = sorted({f"{g.module}.{g.name}" for g in st.globals if g.classification == "dangerous"})
    unknown_names = sorted({f"{g.module}.{g.name}" for g in st.globals if g.classification == "unknown"})
    report.static = {"format": st.format, "pickles": list(st.pickles)[:50],
                     "globals": len(st.globals), "dangerous": dangerous[:50],
                     "unknown": unknown_names[:50], "storages": len(st.storages),
                     "torch_would_load": st.torch_would_load}
    report.format = st.format
    return st


def _calls_a_function(evidence: dict[str, Any]) -> bool:
    """An unknown global that the pickle calls and that is, by Python's naming convention, a
    function: ``module.lower_case`` (classes are CapWords; the stdlib's lower-case value types
    are data). Private ``_helpers`` of third-party libraries (their rebuild functions) stay
    INFO; a private helper of the standard library does not (checkpoints have no use for one,
    and a module newer than the sandbox's Python cannot be observed running)."""
    name = str(evidence.get("global", ""))
    module, _, last = name.rpartition(".")
    if not evidence.get("called") or name in P.VALUE_TYPES or name in _STDLIB_REBUILDERS:
        return False
    if last[:1].islower():
        return True
    return last[:1] == "_" and _stdlib(module)


# the standard library's own pickle support: how its types rebuild themselves
_STDLIB_REBUILDERS = frozenset({
    "copyreg._reconstructor", "copy_reg._reconstructor", "re._compile",
    "array._array_reconstructor", "zoneinfo.ZoneInfo._unpickle",
})


def _stdlib(module: str) -> bool:
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top in ("_pyrepl", "_colorize", "annotationlib",
                                                     "compression", "_interpreters")


_DYNAMIC_CATEGORIES = ("exec", "network", "credential", "privilege")


def _differential(report: LoadReport, st: _scan.StaticScan | None) -> None:
    """Where the static view and the observed behaviour disagree, the disagreement is itself
    evidence of an attempt to fool scanners."""
    if st is None:
        return
    static_saw = any(f.severity >= Severity.CRITICAL and f.evidence.get("source") == "static"
                     for f in report.findings)
    acted = [f for f in report.findings if f.evidence.get("source") != "static"
             and f.category in _DYNAMIC_CATEGORIES and f.severity >= Severity.HIGH]
    if acted and not static_saw:
        report.add(Finding(
            rule="static-dynamic-mismatch", severity=Severity.HIGH, category="evasion",
            message="the static scan saw no dangerous global, yet the load acted: the file is "
                    "built to evade pickle scanners",
            evidence={"static_globals": len(st.globals), "observed": acted[0].message}))
    loaded_as = report.format
    if st.format in _COMPARABLE_FORMATS + ("unknown",) and loaded_as in _COMPARABLE_FORMATS and \
            st.format != loaded_as:
        report.add(Finding(
            rule="format-differential", severity=Severity.HIGH, category="evasion",
            message="the file reads as one format to a scanner and loads as another",
            evidence={"static": st.format, "loaded_as": loaded_as}))


_GiB = 2**30


def _resource_abuse(report: LoadReport) -> None:
    """Memory or CPU far beyond what the file's size and tensors need (a tiny file that
    allocates gigabytes, one that computes for seconds while loading). The thresholds leave room
    for ``import torch`` and for every copy a real load makes."""
    res = report.resources
    size = max(report.input_size or 0, report.tensor_bytes or 0)
    rss = res.get("rss_peak_bytes")
    if isinstance(rss, int) and rss > _GiB + 4 * size:
        report.add(Finding(
            rule="resource-abuse", severity=Severity.MEDIUM, category="resource",
            message=f"the load used {rss / 2**20:,.0f} MiB of memory for a file of "
                    f"{size / 2**20:,.1f} MiB",
            evidence={"rss_peak_bytes": rss, "file_bytes": report.input_size,
                      "tensor_bytes": report.tensor_bytes}))
    cpu = res.get("cpu_s")
    if isinstance(cpu, (int, float)) and cpu > 30 + 30 * size / _GiB:
        report.add(Finding(
            rule="resource-abuse", severity=Severity.MEDIUM, category="resource",
            message=f"the load used {cpu:,.1f} s of CPU time for a file of {size / 2**20:,.1f} MiB",
            evidence={"cpu_s": cpu, "file_bytes": report.input_size}))


_COMPARABLE_FORMATS = ("torch-zip", "torch-legacy", "torch-tar", "pickle", "numpy-npy", "numpy-npz")


@contextlib.contextmanager
def _sandboxed(path: str | os.PathLike[str], *, policy: Policy, runner: _launch.Runner | None,
               write_tensors: bool, expected_sha256: str | None,
               stop_early: bool = False, dynamic: bool = True,
               mmap: bool = False, materialise: bool = True) -> Iterator[_Loaded]:
    """Run one load in a sandbox; yields the report and the validated outputs. The outputs
    (sealed memfds) are released when the block ends."""
    start = time.monotonic()
    report = LoadReport(input_path=os.fspath(path), tool={"name": "model-sandbox", "version": _VERSION},
                        policy={"name": policy.name, "digest": policy.digest})
    loaded = _Loaded(report=report, output=None, error=None)
    st: _scan.StaticScan | None = None
    run: _launch.RunResult | None = None
    hasher: _Hasher | None = None
    input_fd = -1
    try:
        try:
            real, input_fd = _open_input(path)
            loaded.input_path = f"/proc/self/fd/{input_fd}"
            _sweep_work_dirs()
            _refuse_non_checkpoint(input_fd, path)  # from a bounded prefix, before any full read
            before = _identity(input_fd)
            report.input_size = before[1]
            hasher = _Hasher(input_fd)  # runs beside the static scan and the sandbox
            if expected_sha256 is not None:  # a pin is checked before anything reads the file
                report.input_sha256 = hasher.result()
                if report.input_sha256 != expected_sha256.lower():
                    raise HashMismatch(
                        f"{os.fspath(path)!r} has sha256 {report.input_sha256}, not the pinned "
                        f"{expected_sha256.lower()}", path=path, expected=expected_sha256.lower(),
                        actual=report.input_sha256)
            st = _static_stage(real, report, policy, source=loaded.input_path)
            if not any(n.startswith(_SCAN_STOPPED) for n in report.notes):
                loaded.static = st  # a complete scan: the layout check need not read it again
            if not dynamic or (stop_early and _static_stops(report, policy)):
                loaded.stopped_early = dynamic
                if dynamic:
                    report.notes.append("refused on the static scan: the sandbox did not run")
                raise _StaticOnly
            if loaded.static is not None and any(
                    g.classification != "allowed" for g in loaded.static.globals):
                # not a plain state dict, so no layout hand-off: the host's own reading of the
                # file runs beside the sandbox
                loaded.reading = _verify.Reading(loaded.input_path, loaded.static)
            runner = runner or _default_runner()
            image = runner.ensure_image()
            report.tool["image"] = image
            report.tool["worker_digest"] = _image.worker_digest()
            spec = _launch.make_spec(policy, image=image)
            static_count = len(report.findings)
            job = _launch.make_job(policy, input_fd=input_fd, input_size=before[1],
                                   write_tensors=write_tensors)
            run = runner.run(spec, job)
            report.input_sha256 = hasher.result()
            if _identity(input_fd) != before:
                report.add(Finding(
                    rule="input-changed", severity=Severity.HIGH, category="evasion",
                    message="the input file was modified while it was being loaded",
                    evidence={"before": list(before), "after": list(_identity(input_fd))}))
            try:
                _monitored(report, loaded, run, spec, job, os.fspath(path), write_tensors,
                           mmap, materialise)
            except _LayoutRefused as exc:
                # the sandbox read a plain state dict that the host cannot place in the file:
                # the full loader decides, in a fresh sandbox
                run.close()
                report.notes.append(f"layout hand-off refused ({exc}); loaded in full")
                report.findings, report.events = list(report.findings[:static_count]), []
                job = dataclasses.replace(job, config=dataclasses.replace(job.config,
                                                                          layout=False))
                run = runner.run(spec, job)
                _monitored(report, loaded, run, spec, job, os.fspath(path), write_tensors,
                           mmap, materialise)
            assert loaded.output is not None and loaded.output.manifest is not None
            if loaded.handoff == "layout":
                report.notes.append("the tensors were taken from the file's own records, placed "
                                    "by the host and checked against the sandbox's reading")
            else:
                report.findings += _verify.weights(loaded.input_path, loaded.output.manifest,
                                                   loaded.tensors,
                                                   scan=loaded.static, reading=loaded.reading)
        except _StaticOnly:
            pass
        except SandboxError as exc:
            loaded.error = exc
            report.error = {"reference": exc.reference, "message": exc.message}
        if hasher is not None and report.input_sha256 is None:
            with contextlib.suppress(OSError):
                report.input_sha256 = hasher.result()
        if run is not None:  # also when the load failed or was stopped: what it did still counts
            _differential(report, st)
            _resource_abuse(report)
        _apply_severities(report, policy)
        report.verdict = _judge(report)
        report.duration_s = round(time.monotonic() - start, 3)
        if loaded.error is not None:
            loaded.error.report = report
        yield loaded
    finally:
        if run is not None:
            run.close()
        if input_fd >= 0:
            os.close(input_fd)


def _monitored(report: LoadReport, loaded: _Loaded, run: _launch.RunResult,
               spec: _launch.ContainerSpec, job: _launch.Job, shown: str, write_tensors: bool,
               mmap: bool, materialise: bool = True) -> None:
    """Stages 3-5 over what the sandbox sent: engine facts and the supervisor's status,
    events, then the validated manifest and tensors. Evidence is kept even when the outputs
    are rejected."""
    rejected: SandboxError | None = None
    try:
        output = _extract.read_outputs(run.received)
    except OutputRejected as exc:  # keep the evidence: status and events still count
        rejected = exc
        output = _extract.WorkerOutput()
        with contextlib.suppress(OutputRejected):
            output.status = _extract.read_status(run.received)
    loaded.output = output
    if run.warm:
        report.resources["warm"] = True
    outcome = _monitor.interpret(run, output.status, spec, job, shown)
    report.findings += outcome.findings
    report.resources.update(outcome.resources)
    monitored = _events.read(run.received.events, output.status, run.received.outputs,
                             run.received.events_dropped)
    report.events += monitored.events
    report.findings += monitored.findings
    report.notes += monitored.notes + outcome.notes
    report.format = outcome.format
    changed = _verify.input_identity(report.input_sha256 or "", output.status)
    if changed:
        report.add(changed)
    if outcome.error is not None:
        raise outcome.error
    if rejected is not None:
        raise rejected
    if output.manifest is None or (write_tensors and output.tensors_path is None and
                                   output.manifest.layout is None):
        from .errors import LoadFailed
        raise LoadFailed("the loader reported success but sent no manifest/tensors")
    if output.manifest.layout is not None:
        output.manifest, loaded.placements = _placed(report, output.manifest, job, loaded.static)
        loaded.handoff = report.resources["handoff"] = "layout"
        _summarise(report, output.manifest)
        if write_tensors and materialise:
            loaded.tensors = _convert.map_layout(f"/proc/self/fd/{job.input_fd}",
                                                 loaded.placements, copy=not mmap)
        return
    report.resources["handoff"] = "memfd"
    _summarise(report, output.manifest)
    if output.tensors_path is not None:
        loaded.tensors = _convert.load_tensors(output.tensors_path, output.manifest, mmap=mmap)


class _LayoutRefused(Exception):
    """Internal: the host cannot place the plain state dict the sandbox described."""


def _placed(report: LoadReport, manifest: P.Manifest, job: _launch.Job,
            static: _scan.StaticScan | None) -> tuple[P.Manifest, list[Placement]]:
    """The layout hand-off: the host places every tensor in the input itself and requires the
    sandbox's layout to agree exactly; returns the manifest the later stages use."""
    from . import _reconstruct

    placed = _reconstruct.try_place(f"/proc/self/fd/{job.input_fd}", static)
    if isinstance(placed, _reconstruct.NotReconstructed):
        raise _LayoutRefused(placed.reason)
    theirs = manifest.layout or ()
    mine = [(p.name, p.storage_key, p.dtype, p.shape, p.stride, p.storage_offset, p.parameter)
            for p in placed]
    said = [(t.name, t.key, t.dtype, t.shape, t.stride, t.offset, t.parameter) for t in theirs]
    if mine != said:
        differ = next((i for i, (a, b) in enumerate(zip(mine, said, strict=False)) if a != b),
                      min(len(mine), len(said)))
        report.add(Finding(
            rule="layout-differential", severity=Severity.HIGH, category="evasion",
            message="the sandbox's reading of the pickle and the host's reading of the archive "
                    "describe different tensors: the file reads differently to different parsers",
            evidence={"host_tensors": len(mine), "sandbox_tensors": len(theirs),
                      "first_difference": differ}))
        raise OutputRejected("the sandbox's layout disagrees with the file's records")
    tensors = []
    for p, t in zip(placed, theirs, strict=True):
        stored_as, size = P.TORCH_DTYPES[p.dtype]
        numel = 1
        for d in p.shape:
            numel *= d
        # no digest: the bytes are the file's own, placed by the host
        tensors.append(P.TensorEntry(name=p.name, dtype=p.dtype, shape=p.shape,
                                     stored_as=stored_as, nbytes=numel * size, sha256="",
                                     location=t.location))
    return dataclasses.replace(manifest, tensors=tuple(tensors), views=()), placed


def _apply_severities(report: LoadReport, policy: Policy) -> None:
    """The policy's per-rule severities; ``ignore`` drops the finding (its events stay)."""
    overrides = dict(policy.events.severity)
    if not overrides:
        return
    kept = []
    for f in report.findings:
        level = overrides.get(f.rule)
        if level == "ignore":
            continue
        kept.append(f if level is None else dataclasses.replace(f, severity=Severity.parse(level)))
    report.findings = kept


class _StaticOnly(Exception):
    """Internal: the pipeline ends after the static stage."""


def _static_stops(report: LoadReport, policy: Policy) -> bool:
    if policy.static.stop_before_sandbox == "never":
        return False
    return _judge(report).rank >= Verdict(policy.static.stop_before_sandbox).rank and \
        _judge(report) is not Verdict.ERROR


def _summarise(report: LoadReport, manifest: P.Manifest) -> None:
    report.format = manifest.format
    report.tensors = len(manifest.tensors) + len(manifest.views)
    report.tensor_bytes = sum(t.nbytes for t in manifest.tensors)
    for u in manifest.unrepresentable[:50]:
        report.add(Finding(rule="unrepresentable-object", severity=Severity.INFO, category="format",
                           message="an object that is not data was replaced by a placeholder",
                           evidence={"path": u.path[:300], "type": u.type[:200]}))
    report.notes += [n[:300] for n in manifest.notes[:50]]


def _refuse(report: LoadReport, policy: Policy) -> bool:
    if policy.fail_on == "never":
        return False
    threshold = Verdict(policy.fail_on)
    return report.verdict is not Verdict.ERROR and report.verdict.rank >= threshold.rank


def _raise_if_unsafe(loaded: _Loaded, policy: Policy, *, weights_only: bool = False) -> None:
    """Raise what the caller must not get past: a verdict the policy refuses, a load that
    failed, and (``weights_only``) tensors the host could not verify against the file."""
    report = loaded.report
    if _refuse(report, policy) or loaded.stopped_early:
        top = max(report.findings, key=lambda f: f.severity)
        raise SandboxViolation(
            f"{report.input_path} is {report.verdict.value}: {top.message}", report=report)
    if loaded.error is not None:
        raise loaded.error
    unverified = [f for f in report.findings if f.rule == "weights-unverified"]
    if weights_only and unverified:
        raise UnverifiedWeights(f"{report.input_path}: {unverified[0].message}", report=report,
                                names=list(unverified[0].evidence.get("tensors", [])))


# -- public operations -------------------------------------------------------------------------

@contextlib.contextmanager
def _as_path(f: Any) -> Iterator[str | os.PathLike[str]]:
    """torch.load accepts paths and binary file objects; the sandbox mounts a file."""
    if isinstance(f, (str, os.PathLike)):
        yield f
        return
    if not hasattr(f, "read"):
        raise TypeError(f"expected a path or a binary file object, got {type(f).__name__}")
    with tempfile.TemporaryDirectory(prefix=f"{_WORK_PREFIX}{os.getpid()}-in-") as tmp_dir:
        tmp = os.path.join(tmp_dir, "input")
        with open(tmp, "wb") as out:
            while chunk := f.read(1 << 20):
                if isinstance(chunk, str):
                    raise TypeError("the file object must be opened in binary mode")
                out.write(chunk)
        os.chmod(tmp, 0o644)  # inside a 0700 directory: readable by the sandbox's mount only
        yield tmp


def safe_load(f: str | os.PathLike[str] | IO[bytes], map_location: Any = None,
              pickle_module: Any = None, *, weights_only: bool | None = None,
              mmap: bool | None = None, policy: Policy | None = None,
              expected_sha256: str | None = None, runner: _launch.Runner | None = None,
              **pickle_load_args: Any) -> Any:
    """Load a checkpoint like ``torch.load`` does, except that the pickle runs only inside the
    sandbox and the host receives checked SafeTensors plus a JSON skeleton.

    Accepts what ``torch.load`` accepts: a path, an ``os.PathLike`` or a binary file object;
    ``map_location`` as a string, ``torch.device``, dict or callable. ``weights_only=True`` (the
    default, as in torch >= 2.6) raises :class:`UnrepresentableObject` if the file holds objects
    that cannot be rebuilt as data; with ``weights_only=False`` they come back as
    :class:`Unrepresentable` placeholders. ``nn.Module`` and optimizer objects come back as
    their ``state_dict()``. ``pickle_module`` and ``pickle_load_args`` are accepted for
    compatibility and ignored: nothing is unpickled on the host. ``mmap=True``: the returned
    CPU tensors share a private memory mapping of the checked SafeTensors file instead of being
    copied (as with torch, writes to them never reach a file); the sandbox always maps torch
    zip inputs.

    Raises :class:`SandboxViolation` (with ``.report``) when the policy judges the file unsafe,
    and the other :class:`SandboxError` subclasses for inputs that cannot be loaded.
    """
    del pickle_module, pickle_load_args
    policy = policy or Policy.default()
    _convert.check_map_location(map_location)
    wo = True if weights_only is None else bool(weights_only)
    with _as_path(f) as path, _sandboxed(path, policy=policy, runner=runner, write_tensors=True,
                                         expected_sha256=expected_sha256,
                                         stop_early=True, mmap=bool(mmap)) as loaded:
        _raise_if_unsafe(loaded, policy, weights_only=wo)
        assert loaded.output is not None and loaded.output.manifest is not None
        manifest = loaded.output.manifest
        assert loaded.tensors is not None
        tensors = _convert.place(loaded.tensors, manifest, map_location)
        return _convert.rebuild(manifest.skeleton, tensors, weights_only=wo)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None, *,
            policy: Policy | None = None, expected_sha256: str | None = None,
            runner: _launch.Runner | None = None, write_report: bool = True) -> LoadReport:
    """Load ``src`` in the sandbox and write its tensors to ``dst`` (default: ``src`` with the
    suffix ``.safetensors``), atomically, plus ``<dst>.report.json``. The file's metadata holds
    the JSON skeleton of the original structure and the views (tied weights) it shares.

    Raises :class:`SandboxViolation` and writes no weights when the policy judges the file
    unsafe; raises the matching :class:`SandboxError` when it cannot be loaded.
    """
    policy = policy or Policy.default()
    dst_path = Path(dst) if dst is not None else Path(src).with_suffix(".safetensors")
    with _sandboxed(src, policy=policy, runner=runner, write_tensors=True,
                    expected_sha256=expected_sha256, stop_early=True,
                    materialise=False) as loaded:
        report = loaded.report
        try:
            _raise_if_unsafe(loaded, policy, weights_only=True)
            assert loaded.output is not None and loaded.output.manifest is not None
            manifest = loaded.output.manifest
            if loaded.handoff == "layout":  # byte ranges of the input: no torch on the host
                _write_placed(dst_path, loaded.input_path, loaded.placements, manifest, report)
            else:
                assert loaded.tensors is not None
                _write_safetensors(dst_path, loaded.tensors, manifest, report)
            report.outputs["safetensors"] = str(dst_path)
            report.outputs["safetensors_sha256"] = _hash_file(str(dst_path))[0]
        except SandboxError as exc:
            if exc.report is None:
                exc.report = report
                report.error = {"reference": exc.reference, "message": exc.message}
                report.verdict = Verdict.ERROR
            raise
        finally:
            if write_report:
                rpath = Path(str(dst_path) + ".report.json")
                report.outputs.setdefault("report", str(rpath))
                atomic_write(rpath, report.to_json().encode())
        return report


def _write_safetensors(dst: Path, tensors: dict[str, torch.Tensor], manifest: P.Manifest,
                       report: LoadReport) -> None:
    """Re-serialise the checked tensors on the host (the worker's file is never copied),
    streaming each tensor's bytes to a temporary file, then renaming it into place. Tensors
    that share memory (ties, views) are each written whole: every name is a tensor."""
    import torch

    stored: dict[str, torch.Tensor] = {}
    entries = []
    for e in manifest.tensors:
        t = tensors[e.name]
        t = t.contiguous().reshape(-1).view(torch.uint8) \
            if e.stored_as == "U8" and e.dtype != "uint8" else t.contiguous()
        stored[e.name] = t
        entries.append((e.name, str(t.dtype).removeprefix("torch."), list(t.shape),
                        t.numel() * t.element_size()))
    head, order = P.safetensors_header(entries, _st_metadata(manifest, report))

    def body(fd: int) -> None:
        for name in order:
            t = stored[name]
            if t.numel():
                P.write_all(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy().data))

    _atomic_stream(dst, head, body)


def _st_metadata(manifest: P.Manifest, report: LoadReport) -> dict[str, str]:
    return {
        "format": "pt",
        "model_sandbox.version": _VERSION,
        "model_sandbox.source_sha256": report.input_sha256 or "",
        "model_sandbox.skeleton": json.dumps(manifest.skeleton, separators=(",", ":")),
        "model_sandbox.views": json.dumps([dataclasses.asdict(v) for v in manifest.views],
                                          separators=(",", ":")),
        "model_sandbox.dtypes": json.dumps({e.name: e.dtype for e in manifest.tensors
                                            if e.stored_as == "U8"}),
    }


def _atomic_stream(dst: Path, head: bytes, body: Callable[[int], None]) -> None:
    """``head`` then whatever ``body`` writes, to a temporary file beside ``dst``, fsynced and
    renamed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        try:
            P.write_all(fd, head)
            body(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_placed(dst: Path, source: str, placements: list[Placement], manifest: P.Manifest,
                  report: LoadReport) -> None:
    """The layout hand-off's SafeTensors file, copied from the input's own byte ranges (checked
    placements): contiguous tensors with ``copy_file_range``, strided ones gathered by numpy.
    torch is not imported."""
    entries = []
    for p, e in zip(placements, manifest.tensors, strict=True):
        raw = e.stored_as == "U8" and p.dtype != "uint8"
        entries.append((p.name, "uint8" if raw else p.dtype, [e.nbytes] if raw else list(p.shape),
                        e.nbytes))
    head, order = P.safetensors_header(entries, _st_metadata(manifest, report))
    by_name = {p.name: p for p in placements}

    def body(fd: int) -> None:
        with open(source, "rb", buffering=0) as src:
            for name in order:
                _copy_placed(src, fd, by_name[name])

    _atomic_stream(dst, head, body)


def _copy_placed(src: IO[bytes], fd: int, p: Placement) -> None:
    size = P.TORCH_DTYPES[p.dtype][1]
    numel = 1
    for d in p.shape:
        numel *= d
    if not numel:
        return
    row_major: list[int] = []
    step = 1
    for d in reversed(p.shape):
        row_major.insert(0, step)
        step *= d
    if all(d == 1 or s == r for d, s, r in zip(p.shape, p.stride, row_major, strict=True)):
        offset, left = p.file_offset, numel * size
        while left:
            n = os.copy_file_range(src.fileno(), fd, left, offset)
            if not n:
                raise OutputRejected("the input file shrank while it was copied")
            offset, left = offset + n, left - n
        return
    import numpy as np

    region = np.memmap(src, dtype=np.uint8, mode="r", offset=p.file_offset, shape=(p.extent,))
    elements = np.lib.stride_tricks.as_strided(
        region.view(np.dtype(f"V{size}")), shape=p.shape, strides=[s * size for s in p.stride],
        writeable=False)
    P.write_all(fd, memoryview(np.ascontiguousarray(elements).data).cast("B"))


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync_path(str(path))


def scan(path: str | os.PathLike[str], *, dynamic: bool = True, policy: Policy | None = None,
         expected_sha256: str | None = None, runner: _launch.Runner | None = None) -> LoadReport:
    """Scan ``path`` statically, then load it in the sandbox without keeping its weights, and
    return the report. ``dynamic=False`` stops after the static scan (no Docker needed).
    Never raises for a bad or hostile file: the report's verdict and error say what happened."""
    policy = policy or Policy.default()
    with _sandboxed(path, policy=policy, runner=runner, write_tensors=False,
                    expected_sha256=expected_sha256, dynamic=dynamic) as loaded:
        return loaded.report


# -- routing torch.load ------------------------------------------------------------------------

class patch_torch:  # noqa: N801 - used like a function: sandbox.patch_torch()
    """Route every ``torch.load`` (and ``torch.serialization.load``) through :func:`safe_load`.

    ``sandbox.patch_torch()`` patches until ``.stop()``; ``with sandbox.patch_torch(): ...``
    patches for the block. Code that bound ``torch.load`` to another name before the patch
    keeps the original."""

    def __init__(self, policy: Policy | None = None) -> None:
        import torch
        import torch.serialization

        self.policy = policy
        # named, never called: these are what stop() puts back
        self._originals = (torch.load, torch.serialization.load)  # noqa: TID251
        self.active = False

        def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
            return safe_load(f, map_location, pickle_module, policy=self.policy, **kwargs)

        load.__doc__ = safe_load.__doc__
        self._replacement = load
        self.start()

    def start(self) -> patch_torch:
        import torch
        import torch.serialization

        torch.load = self._replacement  # noqa: TID251 - replacing it is the point
        torch.serialization.load = self._replacement  # noqa: TID251
        self.active = True
        return self

    def stop(self) -> None:
        import torch
        import torch.serialization

        if self.active:
            torch.load, torch.serialization.load = self._originals  # noqa: TID251
            self.active = False

    def __enter__(self) -> patch_torch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
