"""Stage 3, host half: what the engine and the supervisor say about how the load ended.

Engine facts (exit code, OOM kill, the host-side timeout) are trustworthy. The supervisor's
status came over the channel after every loader process was killed, from the container's PID 1:
no file the loader could write. A result counts only when the engine's exit code is 0 *and* the
supervisor completed (its DONE frame); anything else is an error with a ``monitor-lost`` finding,
never a clean load -- a supervisor that died may have lost evidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._launch import ContainerSpec, Job, RunResult
from ._rules import finding
from ._worker import _protocol as P
from .errors import (
    LimitExceeded,
    LoadFailed,
    MalformedInput,
    SandboxError,
    TruncatedInput,
    UnpicklingFailed,
    UnsupportedFormat,
)
from .report import Event, Finding


@dataclass
class Outcome:
    """How the sandboxed load ended, as the report needs it."""

    ok: bool
    format: str | None = None
    error: SandboxError | None = None
    findings: list[Finding] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _limit(
    out: Outcome, limit: str, value: float | int, message: str, *, by: str = "engine", **evidence: Any
) -> Outcome:
    """``out`` as a load that a limit ended: its finding and its error. ``by``: who enforced
    it (the engine, the supervisor inside the container, or the loader's own rlimit)."""
    evidence = {"limit": limit, "value": value, "enforced_by": by, **evidence}
    out.findings.append(finding(f"limit-{limit.replace('_', '-')}", "resource", message, evidence))
    out.error = LimitExceeded(message, limit=limit, value=value)
    return out


def _cpu_limit(job: Job) -> float:
    """The CPU-time limit the job passed to the supervisor."""
    return job.config.cpu_s or job.config.wall_clock_s


_SIGXCPU = 24  # the loader's RLIMIT_CPU backstop


def interpret(
    run: RunResult, status: P.Status | None, spec: ContainerSpec, job: Job, input_path: str
) -> Outcome:
    out = Outcome(ok=False)
    wall = job.config.wall_clock_s
    lost = _monitor_lost(run, status)
    if lost is not None:
        out.findings.append(lost)
    out.resources = {"container_s": round(run.duration_s, 3)}
    if status is not None:
        if status.usage is not None:
            out.resources.update(asdict(status.usage))
        # the supervisor's samples of the loader's process tree
        for key, value in status.resources:
            out.resources["sampling_error" if key == "error" else key] = value
        if status.series:
            out.resources["series"] = [list(p) for p in status.series]
        if status.env_keys:
            out.findings.append(
                finding("environment-not-empty", "credential", evidence={"keys": list(status.env_keys[:20])})
            )
    result = (status.result if status is not None else None) or P.LoadResult()

    # Engine-level limits first: they are facts.
    if run.oom_killed:
        return _limit(
            out,
            "memory",
            spec.memory_bytes,
            f"the load exceeded the memory limit of {spec.memory_bytes // 2**20} MiB and was killed",
        )
    if run.timed_out:
        return _limit(out, "wall_clock", wall, f"the load did not finish within {wall:g} s and was stopped")
    # Limits the supervisor enforced: it names them (older statuses only say "timed_out").
    acted = None if status is None else status.limit or ("wall_clock" if status.timed_out else None)
    if acted == "wall_clock":
        return _limit(
            out,
            "wall_clock",
            wall,
            f"the load did not finish within {wall:g} s and was stopped",
            by="supervisor",
        )
    if acted == "output_bytes":
        return _limit(
            out,
            "output_bytes",
            job.output_bytes,
            f"the load wrote more than {job.output_bytes:,} bytes of output",
            by="supervisor",
        )
    if acted == "cpu":
        cpu = _cpu_limit(job)
        used = out.resources.get("cpu_s")
        return _limit(
            out,
            "cpu",
            cpu,
            f"the load used more than {cpu:g} s of CPU time and was stopped",
            by="supervisor",
            **({"used_s": used} if used is not None else {}),
        )
    if run.runner == "bwrap" and not result.ok and result.type == "MemoryError":
        # without a control group the memory limit is RLIMIT_AS: an allocation past it fails
        # (MemoryError) instead of the kernel killing the container. (The type is the loader's
        # word: a payload raising MemoryError itself only ends its own load as over the limit.)
        return _limit(
            out,
            "memory",
            spec.memory_bytes,
            f"the load exceeded the memory limit of {spec.memory_bytes // 2**20} MiB "
            "(an allocation failed at the address-space limit)",
            by="rlimit",
        )
    if lost is not None:
        out.error = LoadFailed(lost.message)
        return out
    if status is None:
        tail = "".join(
            ch if ch.isprintable() or ch == "\n" else "?" for ch in run.logs[-600:].decode("utf-8", "replace")
        ).strip()
        out.error = LoadFailed(
            "the sandbox ended without a status (exit code "
            f"{run.exit_code}); the supervisor did not run to completion"
            + (f"; its output ended with: {tail}" if tail else "")
        )
        return out

    stopped = status.stopped
    if stopped is not None:
        out.notes.append(
            f"the policy ended the load at the first refused {stopped.category} "
            f"call ({stopped.kind}, {stopped.t:.3f} s after the start)"
        )
        out.error = LoadFailed(
            f"the load was stopped by the policy: it attempted {stopped.category} ({stopped.kind})"
        )
        return out
    exit_code = status.exit_code
    if result.ok and exit_code == 0:
        out.ok = True
        out.format = result.format
        return out
    kind = result.kind
    message = result.message or "the loader ended without a result"
    if kind == "unsupported-format":
        out.error = UnsupportedFormat(f"{message}", path=input_path, detected=result.detected or "unknown")
    elif kind == "malformed-input":
        out.error = (TruncatedInput if _truncated(result) else MalformedInput)(message, path=input_path)
    elif isinstance(exit_code, int) and exit_code < 0:
        signal_no = -exit_code
        if signal_no == 9:  # SIGKILL from the kernel: the cgroup's memory limit (or pids)
            _limit(
                out,
                "memory",
                spec.memory_bytes,
                "the loader was killed by SIGKILL, most likely at the memory limit "
                f"of {spec.memory_bytes // 2**20} MiB",
            )
        elif signal_no == _SIGXCPU:
            cpu = _cpu_limit(job)
            _limit(
                out,
                "cpu",
                cpu,
                f"the loader used more than {cpu:g} s of CPU time and was stopped by its own CPU rlimit",
                by="rlimit",
            )
        else:
            out.error = LoadFailed(f"the loader was killed by signal {signal_no}")
    else:
        typ = result.type
        detail = f"{typ}: {message}" if typ else message
        if "RLIMIT_FSIZE" in detail or "File too large" in detail:
            _limit(
                out,
                "output_bytes",
                job.output_bytes,
                f"the load tried to write a file larger than {job.output_bytes:,} bytes",
            )
        elif _truncated(result):
            out.error = TruncatedInput(f"the file is truncated: {detail}", path=input_path)
        elif typ == "UnpicklingError":
            # torch.load, joblib.load or torch.jit.load
            out.error = UnpicklingFailed(f"the loader could not load the file in the sandbox: {detail}")
        else:
            out.error = LoadFailed(f"the loader could not load the file in the sandbox: {detail}")
    return out


def _truncated(result: P.LoadResult) -> bool:
    """The loader's error says the file ends early (the words torch and pickle use for it)."""
    text = f"{result.type or ''}: {result.message or ''}".lower()
    return (
        result.type == "EOFError"
        or "truncated" in text
        or "ran out of input" in text
        or "unexpected end" in text
    )


def _monitor_lost(run: RunResult, status: P.Status | None) -> Finding | None:
    """HIGH ``monitor-lost`` when the supervisor did not complete, the channel was abused, or
    the engine reports a failure: then the evidence may be incomplete, and nothing that came
    over the channel is a result."""
    got = run.received
    why = None
    if got.violations:
        why = f"the channel was abused: {got.violations[0]}"
    elif run.oom_killed or run.timed_out:
        return None  # an engine-enforced limit: reported as that limit
    elif not got.completed:
        why = "the supervisor never completed (it died, or was killed, before its DONE)"
    elif run.exit_code != 0:
        why = f"the sandbox exited with code {run.exit_code} after its supervisor completed"
    if why is None:
        return None
    return finding(
        "monitor-lost",
        "evasion",
        f"the monitor was lost: {why}; evidence may be missing",
        {
            "exit_code": run.exit_code,
            "completed": got.completed,
            "violations": got.violations[:5],
            "status": status is not None,
        },
    )
