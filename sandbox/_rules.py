"""One rule table: every finding's ``rule`` and every error's ``reference``, with its default
severity, its group and a one-line summary.

The SARIF renderer reads it (``tool.driver.rules``), ``docs/rules.md`` is generated from it
(``python -m sandbox._rules > docs/rules.md``; a test checks the file is current), and a test
checks that every rule id the code can emit is in it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .report import Finding, Severity

__all__ = ["GROUPS", "RULES", "Rule", "finding", "render_markdown"]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: Severity  # the default; a finding's own severity may differ (policy, context)
    group: str  # a key of GROUPS
    summary: str


GROUPS = {
    "dynamic": "Dynamic: what the load did in the sandbox",
    "integrity": "Integrity: the returned weights against the file's own tensor records",
    "static": "Static: what the pre-flight scan found in the file's bytes",
    "error": "Errors: a load that did not complete (the result's ruleId is the error's `reference`)",
}

RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        Rule(
            "canary-exfiltration", Severity.CRITICAL, "dynamic", "planted canary credentials left the loader"
        ),
        Rule("canary-file-read", Severity.HIGH, "dynamic", "the load read a planted canary credentials file"),
        Rule("exec-attempt", Severity.CRITICAL, "dynamic", "the load tried to execute a program"),
        Rule("process-creation", Severity.HIGH, "dynamic", "the load tried to create a process"),
        Rule(
            "process-spawn", Severity.MEDIUM, "dynamic", "the load started a child process to run a program"
        ),
        Rule(
            "network-connect", Severity.CRITICAL, "dynamic", "the load tried to connect to a network address"
        ),
        Rule("network-socket", Severity.MEDIUM, "dynamic", "the load opened a network socket"),
        Rule(
            "file-write",
            Severity.MEDIUM,
            "dynamic",
            "the load created, wrote, renamed or removed a file (in the sandbox's scratch space; a "
            "plain torch.load would do it on your machine)",
        ),
        Rule(
            "code-execution",
            Severity.HIGH,
            "dynamic",
            "the load compiled or executed Python code (self-reported by the loader's audit hook "
            "before it ran)",
        ),
        Rule(
            "process-attempt",
            Severity.HIGH,
            "dynamic",
            "the load asked Python to run a program (self-reported)",
        ),
        Rule(
            "network-attempt",
            Severity.HIGH,
            "dynamic",
            "the load asked Python for the network (self-reported)",
        ),
        Rule(
            "native-code",
            Severity.HIGH,
            "dynamic",
            "the load reached native code through ctypes (self-reported)",
        ),
        Rule(
            "monitor-tamper",
            Severity.HIGH,
            "dynamic",
            "the load tried to install or replace Python's tracing or audit hooks (self-reported)",
        ),
        Rule(
            "environment-probe",
            Severity.LOW,
            "dynamic",
            "the load looked for signs of a container or a sandbox (mount tables, cgroups, "
            "`/.dockerenv`, DMI)",
        ),
        Rule(
            "resource-abuse",
            Severity.MEDIUM,
            "dynamic",
            "the load used memory or CPU time far beyond what the file's size and tensors need",
        ),
        Rule(
            "file-write-outside",
            Severity.HIGH,
            "dynamic",
            "the load tried to write outside the sandbox's scratch space",
        ),
        Rule("sensitive-file-read", Severity.HIGH, "dynamic", "the load tried to read a sensitive file"),
        Rule(
            "file-change-outside",
            Severity.HIGH,
            "dynamic",
            "the load tried to change files or metadata outside its output",
        ),
        Rule("file-link", Severity.MEDIUM, "dynamic", "the load tried to create a link"),
        Rule(
            "attack-supervisor",
            Severity.CRITICAL,
            "dynamic",
            "the load tried to interfere with the sandbox supervisor",
        ),
        Rule("other-process", Severity.HIGH, "dynamic", "the load tried to act on another process"),
        Rule(
            "privileged-call", Severity.HIGH, "dynamic", "the load made a privileged or unusual system call"
        ),
        Rule(
            "executable-memory",
            Severity.MEDIUM,
            "dynamic",
            "the load asked for writable and executable memory",
        ),
        Rule("monitor-decode-error", Severity.MEDIUM, "dynamic", "the monitor could not decode an event"),
        Rule("environment-not-empty", Severity.HIGH, "dynamic", "the loader's environment was not empty"),
        Rule(
            "refusals-not-logged",
            Severity.CRITICAL,
            "dynamic",
            "refused calls beyond what the event log keeps (counts are exact)",
        ),
        Rule(
            "event-log-truncated",
            Severity.LOW,
            "dynamic",
            "the event log hit its cap; later events were dropped",
        ),
        Rule(
            "input-changed",
            Severity.CRITICAL,
            "dynamic",
            "the file the sandbox loaded differs from the file the host hashed",
        ),
        Rule(
            "layout-differential",
            Severity.HIGH,
            "dynamic",
            "the sandbox's reading of a plain state dict's pickle and the host's reading of the "
            "archive describe different tensors",
        ),
        Rule(
            "monitor-lost",
            Severity.HIGH,
            "dynamic",
            "the supervisor did not complete, the engine reported a failure, the channel was "
            "abused, or (gVisor) the sentry's trace is missing: evidence may be missing (verdict "
            "error unless other high evidence)",
        ),
        Rule(
            "trace-anomaly",
            Severity.HIGH,
            "dynamic",
            "under gVisor: the sentry's trace holds lines that do not read as whole system calls "
            "(a line break in a path or a thread name): a call may be hidden",
        ),
        Rule(
            "trace-flood",
            Severity.HIGH,
            "dynamic",
            "under gVisor: the sentry's trace of the load outgrew its cap and the sandbox was stopped",
        ),
        Rule(
            "unrepresentable-object",
            Severity.INFO,
            "dynamic",
            "an object that is not data was replaced by a placeholder",
        ),
        Rule("limit-cpu", Severity.MEDIUM, "dynamic", "the load reached the CPU-time limit"),
        Rule("limit-memory", Severity.MEDIUM, "dynamic", "the load reached the memory limit"),
        Rule("limit-wall-clock", Severity.MEDIUM, "dynamic", "the load reached the wall-clock limit"),
        Rule("limit-output-bytes", Severity.MEDIUM, "dynamic", "the load reached the output-size limit"),
        Rule(
            "weights-tampered",
            Severity.HIGH,
            "integrity",
            "the load returned weights that are not the file's stored bytes",
        ),
        Rule(
            "weights-mismatch",
            Severity.HIGH,
            "integrity",
            "the load returned tensors the file does not describe, or lacks some",
        ),
        Rule(
            "weights-unverified",
            Severity.MEDIUM,
            "integrity",
            "the load returned tensors the host could not verify against the file",
        ),
        Rule(
            "storage-size-mismatch",
            Severity.MEDIUM,
            "integrity",
            "a zip storage record's size differs from the storage's claim",
        ),
        Rule(
            "storage-data-missing", Severity.MEDIUM, "integrity", "a tensor's storage has no data in the file"
        ),
        Rule(
            "storage-too-short",
            Severity.MEDIUM,
            "integrity",
            "a tensor view needs bytes its storage record does not hold",
        ),
        Rule(
            "tensor-metadata-bits",
            Severity.MEDIUM,
            "integrity",
            "the pickle sets neg/conj bits: loaded values differ from stored bytes",
        ),
        Rule(
            "static-dynamic-mismatch",
            Severity.HIGH,
            "integrity",
            "the static scan saw no dangerous global, yet the load acted",
        ),
        Rule(
            "format-differential",
            Severity.HIGH,
            "integrity",
            "the file reads as one format to a scanner and loads as another",
        ),
        Rule(
            "dangerous-global", Severity.CRITICAL, "static", "the pickle imports a known-dangerous callable"
        ),
        Rule(
            "unresolved-global",
            Severity.MEDIUM,
            "static",
            "the pickle imports a global the scanner could not resolve",
        ),
        Rule("nested-pickle", Severity.MEDIUM, "static", "a pickle hidden inside another pickle"),
        Rule("numpy-object-array", Severity.MEDIUM, "static", "a numpy object array (unpickled on load)"),
        Rule("malformed-storage-record", Severity.MEDIUM, "static", "a tensor storage record is malformed"),
        Rule(
            "pickle-frame-mismatch",
            Severity.MEDIUM,
            "static",
            "pickle FRAME lengths disagree with the stream",
        ),
        Rule("pickle-parse-error", Severity.MEDIUM, "static", "a pickle stream is structurally invalid"),
        Rule("pickle-trailing-data", Severity.MEDIUM, "static", "bytes follow a pickle's STOP opcode"),
        Rule("scan-limit-exceeded", Severity.HIGH, "static", "the static scan hit a limit: it is incomplete"),
        Rule("legacy-tar-incomplete", Severity.MEDIUM, "static", "a legacy tar checkpoint lacks a member"),
        Rule(
            "legacy-tar-unparsed",
            Severity.MEDIUM,
            "static",
            "part of a legacy tar checkpoint could not be parsed",
        ),
        Rule("zip-bad-crc", Severity.MEDIUM, "static", "a zip member's CRC does not match its data"),
        Rule("zip-duplicate-name", Severity.HIGH, "static", "a zip archive holds two members with one name"),
        Rule(
            "zip-flag-bits", Severity.MEDIUM, "static", "unusual zip flag bits (encryption, data descriptors)"
        ),
        Rule(
            "zip-header-mismatch",
            Severity.HIGH,
            "static",
            "a zip local header disagrees with the central directory",
        ),
        Rule("zip-no-data-pkl", Severity.MEDIUM, "static", "a torch zip without the data.pkl torch loads"),
        Rule(
            "zip-polyglot",
            Severity.HIGH,
            "static",
            "bytes before the zip archive: readers disagree on offsets",
        ),
        Rule(
            "zip-unsupported-compression",
            Severity.MEDIUM,
            "static",
            "a zip member uses a compression torch cannot read",
        ),
        Rule("input-not-found", Severity.HIGH, "error", "the input is missing or not a regular file"),
        Rule("input-unreadable", Severity.HIGH, "error", "the input could not be read"),
        Rule("unsupported-format", Severity.HIGH, "error", "the format is not one the sandbox loads"),
        Rule("malformed-input", Severity.HIGH, "error", "the file is truncated or corrupt"),
        Rule("hash-mismatch", Severity.HIGH, "error", "the file's sha256 differs from its pin"),
        Rule("not-pinned", Severity.HIGH, "error", "a lock file is in force and does not list the file"),
        Rule("load-failed", Severity.HIGH, "error", "the loader ran in the sandbox and failed"),
        Rule("limit-exceeded", Severity.HIGH, "error", "a resource limit ended the load"),
        Rule("output-rejected", Severity.HIGH, "error", "what came out of the sandbox failed validation"),
        Rule("engine-error", Severity.HIGH, "error", "the container engine could not run the sandbox"),
        Rule("engine-unavailable", Severity.HIGH, "error", "no container engine was reachable"),
        Rule("image-missing", Severity.HIGH, "error", "the worker image is not built"),
        Rule("image-mismatch", Severity.HIGH, "error", "the worker image was built from other code"),
        Rule(
            "cluster-error",
            Severity.HIGH,
            "error",
            "the Dask cluster of a distributed batch lost this file's task",
        ),
        Rule("worker-not-ready", Severity.HIGH, "error", "a Dask worker cannot run this version's sandbox"),
        Rule("internal-error", Severity.HIGH, "error", "model-sandbox failed on this file (a bug)"),
        Rule("sandbox-error", Severity.HIGH, "error", "the sandbox failed for another reason"),
    )
}

_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}

_INTRO = """# Rule ids

Every SARIF result that `model-sandbox` writes (`--format sarif`) has a `ruleId` from this table.
The ids are stable: a finding's `rule` in the JSON report is the same id, and an error's
`reference` is the id of the result that reports it. This file is generated from the rule table
in `sandbox/_rules.py` (`python -m sandbox._rules > docs/rules.md`); `tests/unit/test_sarif_bom.py`
checks that it is current and that every rule the code can emit is listed.

SARIF level: critical and high are `error`, medium is `warning`, low and info are `note`. Each
result also carries `properties.severity` (the finding's own severity, which can differ from the
default below) and `properties.security-severity` (critical 9.5, high 8.0, medium 5.5, low 3.0,
info 0.0) for code-scanning dashboards. Locations are the input files (relative to `SRCROOT`,
the current directory, when inside it); each input is also an artifact with its sha256.
"""


def finding(
    rule: str,
    category: str,
    message: str | None = None,
    evidence: dict[str, Any] | None = None,
    severity: Severity | None = None,
) -> Finding:
    """A finding of ``rule`` (an id of the table: a ``KeyError`` otherwise), at the rule's
    default severity and with its summary as the message unless the caller gives its own."""
    r = RULES[rule]
    return Finding(
        rule=rule,
        severity=r.severity if severity is None else severity,
        category=category,
        message=r.summary if message is None else message,
        evidence={} if evidence is None else evidence,
    )


def sarif_level(severity: Severity) -> str:
    return _LEVEL[severity]


def render_markdown() -> str:
    """``docs/rules.md``: the introduction, then one table per group."""
    parts = [_INTRO]
    for group, title in GROUPS.items():
        parts.append(
            f"\n## {title}\n\n| id | meaning | default severity | SARIF level |\n| --- | --- | --- | --- |\n"
        )
        parts += [
            f"| `{r.id}` | {r.summary} | {r.severity.name.lower()} | {_LEVEL[r.severity]} |\n"
            for r in RULES.values()
            if r.group == group
        ]
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
