"""Stage 7, host: findings to a verdict.

The static scan's findings under the policy (an unknown global that is *called* as a function
is at least MEDIUM), the disagreements between the static view and what the load did, resource
figures far beyond what the file needs, the policy's per-rule severities, and the verdict:
``error`` when the load failed or the monitor was lost, else by the worst finding."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from . import _scan
from ._rules import finding
from ._worker import _protocol as P
from .errors import SandboxError, UnsupportedFormat
from .policy import Policy
from .report import LoadReport, Severity, Verdict

__all__ = [
    "SCAN_STOPPED",
    "apply_severities",
    "calls_a_function",
    "differential",
    "refuses",
    "resource_abuse",
    "static_stage",
    "static_stops",
    "verdict",
]


#: formats the sandbox loads (the static stage's formats but a SafeTensors file and an unknown one)
_COMPARABLE_FORMATS = tuple(f for f in _scan.FORMATS if f not in ("safetensors", "unknown"))


def verdict(report: LoadReport) -> Verdict:
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


SCAN_STOPPED = "static scan stopped"


def static_stage(
    path: str, report: LoadReport, policy: Policy, *, source: str | None = None
) -> _scan.StaticScan | None:
    """Stage 1: read every pickle without running it. Its findings join the report (marked
    ``source: static``); a file it cannot parse is left to the real loader to judge.
    ``source``: where to read it (the host's descriptor of ``path``), when not ``path``."""
    st: _scan.StaticScan | None
    try:
        st = _scan.scan_file(source or path)
    except _scan.MalformedStream as exc:
        report.notes.append(f"{SCAN_STOPPED}: {exc.message}")
        st = exc.partial
    except SandboxError as exc:
        report.notes.append(f"static scan failed: {exc.message}")
        return None
    if st is None:
        return None
    if st.format == "safetensors":
        raise UnsupportedFormat(
            f"{report.input_path} is already SafeTensors: open it with the safetensors library",
            path=path,
            detected=st.format,
        )
    unknown = Severity.parse(policy.static.unknown_globals)
    for f in st.findings:
        if st.format == "torchscript" and _torchscript_global(f.evidence):
            # TorchScript's own (C++) unpickler resolves these names to its compiled classes and
            # list builders; no Python global runs. The archive's code runs in the sandbox only.
            f = dataclasses.replace(f, severity=Severity.INFO, evidence={**f.evidence, "torchscript": True})
            report.add(dataclasses.replace(f, evidence={**f.evidence, "source": "static"}))
            continue
        severity = unknown if f.rule == "unknown-global" else f.severity
        if f.rule == "unknown-global" and calls_a_function(f.evidence):
            # rebuilding an object of some class is what checkpoints do; *calling* a function
            # nobody listed while loading is not (timeit, torch ops, ...): at least MEDIUM
            severity = max(severity, Severity.MEDIUM)
            f = dataclasses.replace(f, evidence={**f.evidence, "kind": "function"})
        report.add(dataclasses.replace(f, severity=severity, evidence={**f.evidence, "source": "static"}))
    dangerous = sorted({f"{g.module}.{g.name}" for g in st.globals if g.classification == "dangerous"})
    unknown_names = sorted({f"{g.module}.{g.name}" for g in st.globals if g.classification == "unknown"})
    report.static = {
        "format": st.format,
        "pickles": list(st.pickles)[:50],
        "globals": len(st.globals),
        "dangerous": dangerous[:50],
        "unknown": unknown_names[:50],
        "storages": len(st.storages),
        "torch_would_load": st.torch_would_load,
    }
    report.format = st.format
    if st.format == "torchscript":
        report.static["code_files"], report.static["code_bytes"] = _torchscript_code(source or path)
        report.notes.append(
            "a TorchScript archive: its code runs (in the sandbox only) when "
            "torch.jit.load reads it; static.code_files lists it"
        )
    return st


_TORCHSCRIPT_NAMES = ("__torch__.", "torch.jit._pickle.")
_MAX_CODE_FILES = 500


def _torchscript_global(evidence: dict[str, Any]) -> bool:
    """A name that TorchScript's unpickler resolves itself: its compiled classes, its list
    builders."""
    name = str(evidence.get("global", ""))
    return name.startswith(_TORCHSCRIPT_NAMES)


def _torchscript_code(path: str) -> tuple[list[dict[str, Any]], int]:
    """The code files of a TorchScript archive (``<prefix>/code/...``) and their sizes, from the
    zip's central directory (nothing is decompressed or run); at most 500 listed, all counted."""
    import zipfile

    files: list[dict[str, Any]] = []
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if len(parts) >= 3 and parts[1] == "code" and not info.is_dir():
                    total += info.file_size
                    if len(files) < _MAX_CODE_FILES:
                        files.append({"name": info.filename[:300], "size": info.file_size})
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return files, total
    return files, total


def calls_a_function(evidence: dict[str, Any]) -> bool:
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
_STDLIB_REBUILDERS = frozenset(
    {
        "copyreg._reconstructor",
        "copy_reg._reconstructor",
        "re._compile",
        "array._array_reconstructor",
        "zoneinfo.ZoneInfo._unpickle",
    }
)


def _stdlib(module: str) -> bool:
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top in (
        "_pyrepl",
        "_colorize",
        "annotationlib",
        "compression",
        "_interpreters",
    )


_DYNAMIC_CATEGORIES = ("exec", "network", "credential", "privilege")


def differential(report: LoadReport, st: _scan.StaticScan | None) -> None:
    """Where the static view and the observed behaviour disagree, the disagreement is itself
    evidence of an attempt to fool scanners."""
    if st is None:
        return
    static_saw = any(
        f.severity >= Severity.CRITICAL and f.evidence.get("source") == "static" for f in report.findings
    )
    acted = [
        f
        for f in report.findings
        if f.evidence.get("source") != "static"
        and f.category in _DYNAMIC_CATEGORIES
        and f.severity >= Severity.HIGH
    ]
    if acted and not static_saw:
        report.add(
            finding(
                "static-dynamic-mismatch",
                "evasion",
                "the static scan saw no dangerous global, yet the load acted: the file is "
                "built to evade pickle scanners",
                {"static_globals": len(st.globals), "observed": acted[0].message},
            )
        )
    loaded_as = report.format
    if (
        st.format in _COMPARABLE_FORMATS + ("unknown",)
        and loaded_as in _COMPARABLE_FORMATS
        and st.format != loaded_as
    ):
        report.add(
            finding("format-differential", "evasion", evidence={"static": st.format, "loaded_as": loaded_as})
        )


_GiB = 2**30


def resource_abuse(report: LoadReport) -> None:
    """Memory or CPU far beyond what the file's size and tensors need (a tiny file that
    allocates gigabytes, one that computes for seconds while loading). The thresholds leave room
    for ``import torch`` and for every copy a real load makes."""
    res = report.resources
    size = max(report.input_size or 0, report.tensor_bytes or 0)
    rss = res.get("rss_peak_bytes")
    if isinstance(rss, int) and rss > _GiB + 4 * size:
        report.add(
            finding(
                "resource-abuse",
                "resource",
                f"the load used {rss / 2**20:,.0f} MiB of memory for a file of {size / 2**20:,.1f} MiB",
                {
                    "rss_peak_bytes": rss,
                    "file_bytes": report.input_size,
                    "tensor_bytes": report.tensor_bytes,
                },
            )
        )
    cpu = res.get("cpu_s")
    if isinstance(cpu, (int, float)) and cpu > 30 + 30 * size / _GiB:
        report.add(
            finding(
                "resource-abuse",
                "resource",
                f"the load used {cpu:,.1f} s of CPU time for a file of {size / 2**20:,.1f} MiB",
                {"cpu_s": cpu, "file_bytes": report.input_size},
            )
        )


def apply_severities(report: LoadReport, policy: Policy) -> None:
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


def static_stops(report: LoadReport, policy: Policy) -> bool:
    if policy.static.stop_before_sandbox == "never":
        return False
    return (
        verdict(report).rank >= Verdict(policy.static.stop_before_sandbox).rank
        and verdict(report) is not Verdict.ERROR
    )


def refuses(report: LoadReport, policy: Policy) -> bool:
    if policy.fail_on == "never":
        return False
    threshold = Verdict(policy.fail_on)
    return report.verdict is not Verdict.ERROR and report.verdict.rank >= threshold.rank
