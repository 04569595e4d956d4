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
import operator
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import (
    _convert,
    _events,
    _extract,
    _files,
    _image,
    _input,
    _judge,
    _launch,
    _monitor,
    _scan,
    _verify,
    _write,
)
from ._pool import default_runner as _default_runner
from ._rules import finding
from ._worker import _protocol as P
from .errors import (
    HashMismatch,
    OutputRejected,
    SandboxError,
    SandboxViolation,
    UnverifiedWeights,
)
from .policy import Policy
from .report import LoadReport, Severity, Verdict

if TYPE_CHECKING:
    import torch

    from ._verify.reconstruct import Placement

__all__ = ["SHARED_MODES", "convert", "patch_torch", "safe_load", "scan"]

#: how ``convert`` writes tensors that share storage: every name (default), or HF's convention
SHARED_MODES = ("complete", "dedupe")

VERSION = "0.1.0"


# -- the pipeline ------------------------------------------------------------------------------


@dataclass
class _Loaded:
    report: LoadReport
    output: _extract.WorkerOutput | None
    error: SandboxError | None
    stopped_early: bool = False
    tensors: dict[str, torch.Tensor] | None = None  # checked against the manifest
    handoff: str = "memfd"  # or "layout": the tensors were mapped from the input itself
    input_path: str = ""  # /proc/self/fd/N of the host's descriptor of the input
    static: _scan.StaticScan | None = None  # the static stage's scan, reused by the layout check
    placements: list[Placement] = dataclasses.field(default_factory=list)
    reading: _verify.Reading | None = None  # the host's own reading, under way beside the load
    # a plain state dict: the host's placement of its tensors, and their records' bytes being
    # read (and the file hashed) beside the sandbox
    early: list[Placement] | None = None
    prefetch: _input.Prefetch | None = None


@dataclass(frozen=True)
class _Setup:
    """What a public operation hands its sandbox: the policy, the file's pin, and what makes
    the sandbox (a runner, a pool or a name, and the Docker runtime)."""

    policy: Policy
    expected_sha256: str | None
    runner: _launch.Runner | str | None
    runtime: str | None


@contextlib.contextmanager
def _sandboxed(
    path: str | os.PathLike[str],
    setup: _Setup,
    *,
    write_tensors: bool,
    stop_early: bool = False,
    dynamic: bool = True,
    mmap: bool = False,
    materialise: bool = True,
) -> Iterator[_Loaded]:
    """Run one load in a sandbox; yields the report and the validated outputs. The outputs
    (sealed memfds) are released when the block ends."""
    policy, expected_sha256 = setup.policy, setup.expected_sha256
    start = time.monotonic()
    report = LoadReport(
        input_path=os.fspath(path),
        tool={"name": "model-sandbox", "version": VERSION},
        policy={"name": policy.name, "digest": policy.digest},
    )
    loaded = _Loaded(report=report, output=None, error=None)
    st: _scan.StaticScan | None = None
    run: _launch.RunResult | None = None
    hasher: _input.Hasher | _input.Prefetch | None = None
    input_fd = job_fd = -1
    hashed = False
    try:
        try:
            real, input_fd = _input.open_input(path)
            loaded.input_path = f"/proc/self/fd/{input_fd}"
            _input.sweep_work_dirs()
            _input.refuse_non_checkpoint(input_fd, path)  # from a bounded prefix, before any full read
            before = _input.identity(input_fd)
            report.input_size = before[1]
            hashed = True  # from here on the report gets the file's sha256, whatever happens
            if expected_sha256 is not None:  # a pin is checked before anything reads the file
                hasher = _input.Hasher(input_fd)
                report.input_sha256 = hasher.result()
                if report.input_sha256 != expected_sha256.lower():
                    raise HashMismatch(
                        f"{os.fspath(path)!r} has sha256 {report.input_sha256}, not the pinned "
                        f"{expected_sha256.lower()}",
                        path=path,
                        expected=expected_sha256.lower(),
                        actual=report.input_sha256,
                    )
            st = _judge.static_stage(real, report, policy, source=loaded.input_path)
            if not any(n.startswith(_judge.SCAN_STOPPED) for n in report.notes):
                loaded.static = st  # a complete scan: the layout check need not read it again
            plain = loaded.static is None or all(g.classification == "allowed" for g in loaded.static.globals)
            # the layout hand-off reads plain torch zips only: anything else goes to the full loader
            layout = plain and (loaded.static is None or loaded.static.format == "torch-zip")
            stops = stop_early and _judge.static_stops(report, policy)
            if hasher is None:  # runs beside the sandbox
                ahead = layout and dynamic and write_tensors and materialise and not mmap and not stops
                hasher = _hash_or_prefetch(loaded, input_fd, read_ahead=ahead)
            if not dynamic and loaded.static is None:
                # no sandbox will load it either: a file the scan could not read is not clean
                report.add(
                    finding(
                        "static-incomplete",
                        "format",
                        evidence={"why": [n[:300] for n in report.notes if n.startswith("static scan")][:3]},
                    )
                )
            if not dynamic or stops:
                loaded.stopped_early = dynamic
                if dynamic:
                    report.notes.append("refused on the static scan: the sandbox did not run")
                raise _StaticOnly
            if not plain:
                # not a plain state dict, so no layout hand-off: the host's own reading of the
                # file runs beside the sandbox
                # (the file's tensors located, not hashed: the sandbox names most by their span,
                # the host compares the bytes it holds, and hashes a span only where a digest
                # is all it has to compare)
                loaded.reading = _verify.Reading(loaded.input_path, loaded.static, spans=True)
            runner = _runner_for(setup.runner, setup.runtime)
            job_fd = _input.for_sandbox(input_fd, getattr(runner, "name", ""))
            image = runner.ensure_image()
            report.tool["image"] = image
            report.tool["worker_digest"] = _image.worker_digest()
            spec = _launch.make_spec(policy, image=image)
            static_count = len(report.findings)
            job = _launch.make_job(
                policy,
                input_fd=job_fd,
                input_size=before[1],
                write_tensors=write_tensors,
                layout=layout,
            )
            run = runner.run(spec, job)
            host_sha256 = hasher.result

            def monitored(run: _launch.RunResult, job: _launch.Job) -> None:
                _monitored(
                    report,
                    loaded,
                    run,
                    spec,
                    job,
                    shown=os.fspath(path),
                    host_sha256=host_sha256,
                    write_tensors=write_tensors,
                    mmap=mmap,
                    materialise=materialise,
                )

            try:
                try:
                    monitored(run, job)
                except _LayoutRefused as exc:
                    # the sandbox read a plain state dict that the host cannot place in the file:
                    # the full loader decides, in a fresh sandbox
                    run.close()
                    report.notes.append(f"layout hand-off refused ({exc}); loaded in full")
                    if loaded.prefetch is not None:
                        loaded.prefetch.release()  # the full loader's tensors come instead
                    report.findings, report.events = list(report.findings[:static_count]), []
                    job = dataclasses.replace(job, config=dataclasses.replace(job.config, layout=False))
                    run = runner.run(spec, job)
                    monitored(run, job)
            finally:
                # awaited only now: the host placed or read the tensors while the hash ran
                report.input_sha256 = hasher.result()
                modified = _changed(report, input_fd, before)
            assert loaded.output is not None and loaded.output.manifest is not None
            if loaded.handoff == "layout":
                report.notes.append(
                    "the tensors were taken from the file's own records, placed "
                    "by the host and checked against the sandbox's reading"
                )
            else:
                report.findings += _verify.weights(
                    loaded.input_path,
                    loaded.output.manifest,
                    loaded.tensors,
                    scan=loaded.static,
                    reading=loaded.reading,
                )
                # the comparison reads the file again (its bytes, not digests taken while the
                # sandbox ran): a write since the check above would make the payload's bytes
                # the file's
                if not modified:
                    _changed(report, input_fd, before)
        except _StaticOnly:
            pass
        except SandboxError as exc:
            loaded.error = exc
            report.error = {"reference": exc.reference, "message": exc.message}
        if report.input_sha256 is None and hashed:  # also of a file the static stage refused
            with contextlib.suppress(OSError):
                report.input_sha256 = (hasher or _input.Hasher(input_fd)).result()
        if run is not None:  # also when the load failed or was stopped: what it did still counts
            _judge.differential(report, st)
            _judge.resource_abuse(report)
        _judge.apply_severities(report, policy)
        report.verdict = _judge.verdict(report)
        report.duration_s = round(time.monotonic() - start, 3)
        if loaded.error is not None:
            loaded.error.report = report
        yield loaded
    finally:
        if loaded.reading is not None:
            loaded.reading.cancel()  # finished when its result was used; else no longer wanted
        if run is not None:
            run.close()
        for fd in {input_fd, job_fd} - {-1}:
            os.close(fd)


def _hash_or_prefetch(loaded: _Loaded, input_fd: int, *, read_ahead: bool) -> _input.Hasher | _input.Prefetch:
    """What hashes the input beside the sandbox. ``read_ahead`` (a plain torch zip whose tensors
    the host will hold in memory): the host places the tensors in the file now, from its own
    reading, and reads their records once while it hashes (:class:`_input.Prefetch`); the
    sandbox's layout must still agree with that placement before any of it is used."""
    if read_ahead and loaded.static is not None:
        from ._verify import reconstruct as _reconstruct

        placed = _reconstruct.try_place(loaded.input_path, loaded.static)
        if not isinstance(placed, _reconstruct.NotReconstructed):
            loaded.early = placed
            # overlapping records, or no memory for them now: the hash alone, and the records
            # are read (or the error raised) where they are placed
            with contextlib.suppress(ValueError, RuntimeError, MemoryError):
                loaded.prefetch = _input.Prefetch(input_fd, _convert.layout_spans(placed))
                return loaded.prefetch
    return _input.Hasher(input_fd)


def _changed(report: LoadReport, input_fd: int, before: tuple[int, int, int, int]) -> bool:
    """Whether the input is no longer what it was at ``before`` (an ``input-changed`` finding)."""
    after = _input.identity(input_fd)
    if after != before:
        report.add(
            finding(
                "input-changed",
                "evasion",
                "the input file was modified while it was being loaded",
                {"before": list(before), "after": list(after)},
                severity=Severity.HIGH,
            )
        )
    return after != before


def _monitored(
    report: LoadReport,
    loaded: _Loaded,
    run: _launch.RunResult,
    spec: _launch.ContainerSpec,
    job: _launch.Job,
    *,
    shown: str,
    host_sha256: Callable[[], str],
    write_tensors: bool,
    mmap: bool,
    materialise: bool = True,
) -> None:
    """Stages 3-5 over what the sandbox sent: engine facts and the supervisor's status,
    events, then the validated manifest and tensors. Evidence is kept even when the outputs
    are rejected. ``host_sha256`` waits for the host's hash of the input: called only where
    the sandbox hashed the input too (a small one), so a large input's tensors are placed or
    read while its hash is still running."""
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
    report.tool["runner"] = run.runner
    if run.runner == "docker":
        report.tool["runtime"] = run.runtime
    report.tool["monitoring"] = _monitoring(run)
    report.resources["limits_enforced_by"] = dict(run.limits)
    monitored = _events.read(
        run.received.events,
        output.status,
        run.received.outputs,
        run.received.events_dropped,
        trace=run.trace,
        allow_read=job.config.allow_read,
    )
    report.events += monitored.events
    report.findings += monitored.findings
    report.notes += monitored.notes + outcome.notes
    report.format = outcome.format
    if output.status is not None and output.status.input_sha256 is not None:
        report.input_sha256 = host_sha256()
        changed = _verify.input_identity(report.input_sha256, output.status)
        if changed:
            report.add(changed)
    if outcome.error is not None:
        raise outcome.error
    if rejected is not None:
        raise rejected
    if output.manifest is None or (
        write_tensors and output.tensors_path is None and output.manifest.layout is None
    ):
        from .errors import LoadFailed

        raise LoadFailed("the loader reported success but sent no manifest/tensors")
    _check_locations(output.manifest, loaded.static)
    if output.manifest.layout is not None:
        output.manifest, loaded.placements = _placed(
            report, output.manifest, loaded.input_path, loaded.static, loaded.early
        )
        loaded.handoff = report.resources["handoff"] = "layout"
        _summarise(report, output.manifest)
        if write_tensors and materialise:
            loaded.tensors = _convert.map_layout(
                loaded.input_path,
                loaded.placements,
                copy=not mmap,
                prefetched=None if loaded.prefetch is None else loaded.prefetch.buffers(),
            )
        return
    report.resources["handoff"] = "memfd"
    _summarise(report, output.manifest)
    _check_views(output.manifest, job.output_bytes)
    if output.tensors_path is not None:  # checked against the file by _verify.weights
        loaded.tensors = _convert.load_tensors(
            output.tensors_path,
            output.manifest,
            mmap=mmap,
            source=loaded.input_path,  # ours: tensors named by span are the input's bytes
            map_source=not materialise,
        )
        from_input = sum(1 for e in output.manifest.tensors if e.span is not None)
        if from_input:
            report.resources["tensors_from_input"] = from_input
    elif any(e.sha256 is None and e.span is None for e in output.manifest.tensors):
        raise OutputRejected(
            "the manifest gives neither a sha256 nor a span of the input for tensors whose bytes "
            "stayed in the sandbox"
        )


def _check_locations(manifest: P.Manifest, static: _scan.StaticScan | None) -> None:
    """Refuse a tensor the manifest places on a device that no storage record of the file
    names (where the static scan read them all): the loader loads every storage onto the CPU
    and reports the location its record gives, so any other location is the sandbox's
    invention, and ``place`` would move the tensor there (``"meta"``: every weight gone,
    verified bytes and all)."""
    if static is None:
        return
    named = {s.location for s in static.storages} | {"cpu"}
    entries: list[P.TensorEntry | P.ViewEntry | P.LayoutEntry] = [
        *manifest.tensors,
        *manifest.views,
        *(manifest.layout or ()),
    ]
    for e in entries:
        if e.location not in named:
            raise OutputRejected(
                f"the manifest places {e.name[:100]!r} on {e.location!r}, which no storage of the file names",
                item=e.name[:200],
            )


def _check_views(manifest: P.Manifest, cap: int) -> None:
    """Refuse views, and tensors named by their span in the input, that would hold more than
    ``cap`` bytes (the sandbox's output cap) once made: the verification hashes each view's
    elements, which copies them (a view is cheap to return and free to send:
    ``base[:1].expand(2**20, 2**20)`` in a 1.6 KB checkpoint asked the host's allocator for
    4 TiB and raised RuntimeError out of safe_load), and the host reads each span into memory
    of its own (a manifest of 10,000 entries each naming the whole input is as cheap)."""
    total = sum(e.nbytes for e in manifest.tensors if e.span is not None)
    if total > cap:
        raise OutputRejected(f"the tensors named by span in the input would hold more than {cap:,} bytes")
    for v in manifest.views:
        if 0 in v.shape:
            continue
        size = P.TORCH_DTYPES[v.dtype][1]
        for d in v.shape:
            size *= d
            if size > cap:
                break
        total += size
        if total > cap:
            raise OutputRejected(
                f"the views would hold more than {cap:,} bytes (the output cap) once made, "
                f"by {v.name[:100]!r}",
                item=v.name[:200],
            )


def _monitoring(run: _launch.RunResult) -> str:
    """Where the kernel-level evidence came from: ``seccomp-notify`` (the supervisor decoded
    each notified call) or ``gvisor-trace`` (the sentry's strace of the sandbox, read by the
    host; refused calls by number only). Self-reported events are the audit hook's in both."""
    return "gvisor-trace" if run.runtime == "runsc" else "seccomp-notify"


def _runner_for(runner: _launch.Runner | str | None, runtime: str | None) -> _launch.Runner:
    """The runner a call names (a runner, a pool, a kind), under ``runtime`` when given."""
    if runtime is None:
        return _launch.make_runner(runner) if isinstance(runner, str) else runner or _default_runner()
    if runner is None or isinstance(runner, str):
        return _launch.make_runner(runner, runtime=runtime)
    inner = getattr(runner, "runner", runner)  # a Pool's runner
    if getattr(inner, "runtime", "runc") != _launch.runtime_kind(runtime):
        from .errors import PolicyError

        raise PolicyError(
            f"runtime={runtime!r} was asked for, but the given runner runs "
            f"{getattr(inner, 'runtime', 'runc')!r}: pass one or the other"
        )
    return runner


class _LayoutRefused(Exception):
    """Internal: the host cannot place the plain state dict the sandbox described."""


def _placed(
    report: LoadReport,
    manifest: P.Manifest,
    source: str,
    static: _scan.StaticScan | None,
    early: list[Placement] | None = None,
) -> tuple[P.Manifest, list[Placement]]:
    """The layout hand-off: the host places every tensor in the input itself (``source``: its
    own descriptor of the input, never the copy a sandbox may have been given and may have
    changed; ``early``: that placement, made before the sandbox answered) and requires the
    sandbox's layout to agree exactly; returns the manifest the later stages use."""
    from ._verify import reconstruct as _reconstruct

    placed = early if early is not None else _reconstruct.try_place(source, static)
    if isinstance(placed, _reconstruct.NotReconstructed):
        raise _LayoutRefused(placed.reason)
    theirs = manifest.layout or ()
    # what both readings must agree on, under the same names on both sides
    placing = operator.attrgetter("name", "key", "dtype", "shape", "stride", "offset", "parameter")
    mine, said = [placing(p) for p in placed], [placing(t) for t in theirs]
    if mine != said:
        differ = next(
            (i for i, (a, b) in enumerate(zip(mine, said, strict=False)) if a != b), min(len(mine), len(said))
        )
        report.add(
            finding(
                "layout-differential",
                "evasion",
                "the sandbox's reading of the pickle and the host's reading of the archive "
                "describe different tensors: the file reads differently to different parsers",
                evidence={
                    "host_tensors": len(mine),
                    "sandbox_tensors": len(theirs),
                    "first_difference": differ,
                },
            )
        )
        raise OutputRejected("the sandbox's layout disagrees with the file's records")
    tensors = []
    for p, t in zip(placed, theirs, strict=True):
        stored_as, size = P.TORCH_DTYPES[p.dtype]
        numel = 1
        for d in p.shape:
            numel *= d
        # no digest: the bytes are the file's own, placed by the host
        tensors.append(
            P.TensorEntry(
                name=p.name,
                dtype=p.dtype,
                shape=p.shape,
                stored_as=stored_as,
                nbytes=numel * size,
                sha256="",
                location=t.location,
            )
        )
    return dataclasses.replace(manifest, tensors=tuple(tensors), views=()), placed


class _StaticOnly(Exception):
    """Internal: the pipeline ends after the static stage."""


def _summarise(report: LoadReport, manifest: P.Manifest) -> None:
    report.format = manifest.format
    report.tensors = len(manifest.tensors) + len(manifest.views)
    report.tensor_bytes = sum(t.nbytes for t in manifest.tensors)
    for u in manifest.unrepresentable[:50]:
        report.add(
            finding("unrepresentable-object", "format", evidence={"path": u.path[:300], "type": u.type[:200]})
        )
    report.notes += [n[:300] for n in manifest.notes[:50]]


def _raise_if_unsafe(loaded: _Loaded, policy: Policy, *, weights_only: bool = False) -> None:
    """Raise what the caller must not get past: a verdict the policy refuses, a load that
    failed, and (``weights_only``) tensors the host could not verify against the file."""
    report = loaded.report
    if _judge.refuses(report, policy) or loaded.stopped_early:
        top = max(report.findings, key=lambda f: f.severity)
        raise SandboxViolation(f"{report.input_path} is {report.verdict.value}: {top.message}", report=report)
    if loaded.error is not None:
        raise loaded.error
    unverified = [f for f in report.findings if f.rule == "weights-unverified"]
    if weights_only and unverified:
        raise UnverifiedWeights(
            f"{report.input_path}: {unverified[0].message}",
            report=report,
            names=list(unverified[0].evidence.get("tensors", [])),
        )


# -- public operations -------------------------------------------------------------------------


def safe_load(
    f: str | os.PathLike[str] | IO[bytes],
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    policy: Policy | None = None,
    expected_sha256: str | None = None,
    runner: _launch.Runner | str | None = None,
    runtime: str | None = None,
    **pickle_load_args: Any,
) -> Any:
    """Load a checkpoint like ``torch.load`` does, except that the pickle runs only inside the
    sandbox and the host receives checked SafeTensors plus a JSON skeleton.

    Accepts what ``torch.load`` accepts: a path, an ``os.PathLike`` or a binary file object;
    ``map_location`` as a string, ``torch.device``, dict or callable. ``weights_only=True`` (the
    default, as in torch >= 2.6) raises :class:`UnrepresentableObject` if the file holds objects
    that cannot be rebuilt as data; with ``weights_only=False`` they come back as
    :class:`Unrepresentable` placeholders. ``nn.Module`` and optimizer objects come back as
    their ``state_dict()``. ``pickle_module`` and ``pickle_load_args`` are accepted for
    compatibility and ignored: nothing is unpickled on the host. ``mmap=True``: the returned
    CPU tensors share a private memory mapping instead of being copied: of the checked
    SafeTensors file, or, for tensors the load left as the input's own bytes, of the input
    itself (as with torch, writes to them never reach a file, and a later write to the input
    shows in them); the sandbox always maps torch zip inputs.

    ``runner``: what makes the sandbox: a runner or :class:`Pool`, or a name (``"docker"``,
    ``"bwrap"``, ``"auto"``: a fresh sandbox of that kind); by default the process-wide pool,
    whose runner is ``$MODEL_SANDBOX_RUNNER`` or ``auto`` (Docker when an engine answers, else
    bubblewrap). ``runtime``: ``"runsc"`` runs the Docker runner's sandbox under gVisor
    (``"runc"``: the engine's default; by default ``$MODEL_SANDBOX_RUNTIME``, else runc).

    Raises :class:`SandboxViolation` (with ``.report``) when the policy judges the file unsafe,
    and the other :class:`SandboxError` subclasses for inputs that cannot be loaded.
    """
    del pickle_module, pickle_load_args
    setup = _Setup(policy or Policy.default(), expected_sha256, runner, runtime)
    _convert.check_map_location(map_location)
    wo = True if weights_only is None else bool(weights_only)
    with (
        _input.as_path(f) as path,
        _sandboxed(path, setup, write_tensors=True, stop_early=True, mmap=bool(mmap)) as loaded,
    ):
        _raise_if_unsafe(loaded, setup.policy, weights_only=wo)
        assert loaded.output is not None and loaded.output.manifest is not None
        manifest = loaded.output.manifest
        assert loaded.tensors is not None
        tensors = _convert.place(loaded.tensors, manifest, map_location)
        return _convert.rebuild(manifest.skeleton, tensors, weights_only=wo)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    policy: Policy | None = None,
    expected_sha256: str | None = None,
    runner: _launch.Runner | str | None = None,
    write_report: bool = True,
    shared: str = "complete",
    allow_unverified: bool = False,
    runtime: str | None = None,
) -> LoadReport:
    """Load ``src`` in the sandbox and write its tensors to ``dst`` (default: ``src`` with the
    suffix ``.safetensors``), atomically, plus ``<dst>.report.json``. Every name of the
    returned structure is a tensor in the file (``shared="complete"``, the default: views as
    contiguous copies, a tied tensor once per name); ``shared="dedupe"`` writes a tied tensor
    under one name, as Hugging Face's ``save_pretrained`` does. The metadata holds the JSON
    skeleton of the original structure and how its tensors shared storage (views, ties).

    Raises :class:`SandboxViolation` and writes no weights when the policy judges the file
    unsafe; raises the matching :class:`SandboxError` when it cannot be loaded, and
    :class:`UnverifiedWeights` when the host could not verify every returned tensor against
    its own reading of the file (a quantized tensor's integer data, a nested tensor's pieces:
    see the README), unless ``allow_unverified`` (the report keeps the MEDIUM finding).
    ``runner`` and ``runtime`` as for :func:`safe_load`.
    """
    setup = _Setup(policy or Policy.default(), expected_sha256, runner, runtime)
    if shared not in SHARED_MODES:
        raise ValueError(f"shared must be one of {SHARED_MODES}, not {shared!r}")
    dst_path = Path(dst) if dst is not None else Path(src).with_suffix(".safetensors")
    with _sandboxed(src, setup, write_tensors=True, stop_early=True, materialise=False) as loaded:
        report = loaded.report
        try:
            _raise_if_unsafe(loaded, setup.policy, weights_only=not allow_unverified)
            assert loaded.output is not None and loaded.output.manifest is not None
            manifest = loaded.output.manifest
            # what the host writes is held to the sandbox's own output cap (views are copied)
            cap = setup.policy.limits.output_bytes(report.input_size or 0)
            if loaded.handoff == "layout":  # byte ranges of the input: no torch on the host
                written = _write.write_placed(
                    dst_path,
                    loaded.input_path,
                    loaded.placements,
                    manifest,
                    report,
                    dedupe=shared == "dedupe",
                    max_bytes=cap,
                )
            else:
                assert loaded.tensors is not None
                written = _write.write_safetensors(
                    dst_path, loaded.tensors, manifest, report, dedupe=shared == "dedupe", max_bytes=cap
                )
            report.outputs["safetensors"] = str(dst_path)
            report.outputs["safetensors_sha256"] = written
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
                _files.atomic_write(rpath, report.to_json().encode())
        return report


def scan(
    path: str | os.PathLike[str],
    *,
    dynamic: bool = True,
    policy: Policy | None = None,
    expected_sha256: str | None = None,
    runner: _launch.Runner | str | None = None,
    runtime: str | None = None,
) -> LoadReport:
    """Scan ``path`` statically, then load it in the sandbox without keeping its weights, and
    return the report. ``dynamic=False`` stops after the static scan (no Docker needed).
    Never raises for a bad or hostile file: the report's verdict and error say what happened.
    ``runner`` and ``runtime`` as for :func:`safe_load`."""
    setup = _Setup(policy or Policy.default(), expected_sha256, runner, runtime)
    with _sandboxed(path, setup, write_tensors=False, dynamic=dynamic) as loaded:
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
