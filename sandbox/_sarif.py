"""SARIF 2.1.0 for load reports: one result per finding, one per error.

``ruleId`` is the finding's ``rule`` (or, for a load that ended in an error, the error's stable
``reference``); every id is listed with its meaning in ``docs/rules.md`` and in :data:`RULES`
(a test keeps the three in step with the code). Levels: critical/high -> ``error``, medium ->
``warning``, low/info -> ``note``; each result also carries ``security-severity`` (the number
GitHub code scanning sorts by) and the model-sandbox severity. Locations are the input files:
relative to the ``SRCROOT`` base when they lie under ``base``, absolute ``file://`` URIs
otherwise; each file is also an ``artifact`` with its sha256.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _api
from .report import LoadReport, Severity

__all__ = ["RULES", "render_sarif"]

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"

#: rule id -> (short description, default severity). Mirrored in docs/rules.md.
RULES: dict[str, tuple[str, Severity]] = {
    # dynamic: what the load did in the sandbox (kernel evidence and engine facts)
    "canary-exfiltration": ("planted canary credentials left the loader", Severity.CRITICAL),
    "canary-file-read": ("the load read a planted canary credentials file", Severity.HIGH),
    "exec-attempt": ("the load tried to execute a program", Severity.CRITICAL),
    "process-creation": ("the load tried to create a process", Severity.HIGH),
    "process-spawn": ("the load started a child process to run a program", Severity.MEDIUM),
    "network-connect": ("the load tried to connect to a network address", Severity.CRITICAL),
    "network-socket": ("the load opened a network socket", Severity.MEDIUM),
    "file-write": ("the load created, wrote, renamed or removed a file (in the sandbox's "
                   "scratch space; a plain torch.load would do it on your machine)",
                   Severity.MEDIUM),
    "code-execution": ("the load compiled or executed Python code (self-reported by the "
                       "loader's audit hook before it ran)", Severity.HIGH),
    "process-attempt": ('the load asked Python to run a program (self-reported)',
                       Severity.HIGH),
    "network-attempt": ('the load asked Python for the network (self-reported)',
                       Severity.HIGH),
    "native-code": ('the load reached native code through ctypes (self-reported)',
                   Severity.HIGH),
    "monitor-tamper": ("the load tried to install or replace Python's tracing or audit hooks "
                       "(self-reported)", Severity.HIGH),
    "environment-probe": ("the load looked for signs of a container or a sandbox (mount tables, "
                          "cgroups, /.dockerenv, DMI)", Severity.LOW),
    "resource-abuse": ("the load used memory or CPU time far beyond what the file's size and "
                       "tensors need", Severity.MEDIUM),
    "file-write-outside": ("the load tried to write outside the sandbox's scratch space",
                           Severity.HIGH),
    "sensitive-file-read": ("the load tried to read a sensitive file", Severity.HIGH),
    "file-change-outside": ("the load tried to change files or metadata outside its output",
                            Severity.HIGH),
    "file-link": ("the load tried to create a link", Severity.MEDIUM),
    "attack-supervisor": ("the load tried to interfere with the sandbox supervisor", Severity.CRITICAL),
    "other-process": ("the load tried to act on another process", Severity.HIGH),
    "privileged-call": ("the load made a privileged or unusual system call", Severity.HIGH),
    "executable-memory": ("the load asked for writable and executable memory", Severity.MEDIUM),
    "monitor-decode-error": ("the monitor could not decode an event", Severity.MEDIUM),
    "environment-not-empty": ("the loader's environment was not empty", Severity.HIGH),
    "refusals-not-logged": ("refused calls beyond what the event log keeps (counts are exact)",
                            Severity.CRITICAL),
    "event-log-truncated": ("the event log hit its cap; later events were dropped", Severity.LOW),
    "input-changed": ("the file the sandbox loaded differs from the file the host hashed",
                      Severity.CRITICAL),
    "layout-differential": ("the sandbox's reading of a plain state dict's pickle and the host's "
                            "reading of the archive describe different tensors", Severity.HIGH),
    "monitor-lost": ("the supervisor did not complete, the engine reported a failure, or the "
                     "channel was abused: evidence may be missing (verdict error unless other "
                     "high evidence)", Severity.HIGH),
    "unrepresentable-object": ("an object that is not data was replaced by a placeholder",
                               Severity.INFO),
    "limit-cpu": ("the load reached the CPU-time limit", Severity.MEDIUM),
    "limit-memory": ("the load reached the memory limit", Severity.MEDIUM),
    "limit-wall-clock": ("the load reached the wall-clock limit", Severity.MEDIUM),
    "limit-output-bytes": ("the load reached the output-size limit", Severity.MEDIUM),
    # integrity: the weights the load returned against the file's own tensor records
    "weights-tampered": ("the load returned weights that are not the file's stored bytes",
                         Severity.HIGH),
    "weights-mismatch": ("the load returned tensors the file does not describe, or lacks some",
                         Severity.HIGH),
    "weights-unverified": ("the load returned tensors the host could not verify against the file",
                           Severity.MEDIUM),
    "storage-size-mismatch": ("a zip storage record's size differs from the storage's claim",
                              Severity.MEDIUM),
    "storage-data-missing": ("a tensor's storage has no data in the file", Severity.MEDIUM),
    "storage-too-short": ("a tensor view needs bytes its storage record does not hold",
                          Severity.MEDIUM),
    "tensor-metadata-bits": ("the pickle sets neg/conj bits: loaded values differ from stored bytes",
                             Severity.MEDIUM),
    "static-dynamic-mismatch": ("the static scan saw no dangerous global, yet the load acted",
                                Severity.HIGH),
    "format-differential": ("the file reads as one format to a scanner and loads as another",
                            Severity.HIGH),
    # static: what the pre-flight scan found in the file's bytes
    "dangerous-global": ("the pickle imports a known-dangerous callable", Severity.CRITICAL),
    "unresolved-global": ("the pickle imports a global the scanner could not resolve",
                          Severity.MEDIUM),
    "nested-pickle": ("a pickle hidden inside another pickle", Severity.MEDIUM),
    "numpy-object-array": ("a numpy object array (unpickled on load)", Severity.MEDIUM),
    "malformed-storage-record": ("a tensor storage record is malformed", Severity.MEDIUM),
    "pickle-frame-mismatch": ("pickle FRAME lengths disagree with the stream", Severity.MEDIUM),
    "pickle-parse-error": ("a pickle stream is structurally invalid", Severity.MEDIUM),
    "pickle-trailing-data": ("bytes follow a pickle's STOP opcode", Severity.MEDIUM),
    "scan-limit-exceeded": ("the static scan hit a limit: it is incomplete", Severity.HIGH),
    "legacy-tar-incomplete": ("a legacy tar checkpoint lacks a member", Severity.MEDIUM),
    "legacy-tar-unparsed": ("part of a legacy tar checkpoint could not be parsed", Severity.MEDIUM),
    "zip-bad-crc": ("a zip member's CRC does not match its data", Severity.MEDIUM),
    "zip-duplicate-name": ("a zip archive holds two members with one name", Severity.HIGH),
    "zip-flag-bits": ("unusual zip flag bits (encryption, data descriptors)", Severity.MEDIUM),
    "zip-header-mismatch": ("a zip local header disagrees with the central directory",
                            Severity.HIGH),
    "zip-no-data-pkl": ("a torch zip without the data.pkl torch loads", Severity.MEDIUM),
    "zip-polyglot": ("bytes before the zip archive: readers disagree on offsets", Severity.HIGH),
    "zip-unsupported-compression": ("a zip member uses a compression torch cannot read",
                                    Severity.MEDIUM),
    # errors: a load that did not complete (ruleId = the error's reference)
    "input-not-found": ("the input is missing or not a regular file", Severity.HIGH),
    "input-unreadable": ("the input could not be read", Severity.HIGH),
    "unsupported-format": ("the format is not one the sandbox loads", Severity.HIGH),
    "malformed-input": ("the file is truncated or corrupt", Severity.HIGH),
    "hash-mismatch": ("the file's sha256 differs from its pin", Severity.HIGH),
    "not-pinned": ("a lock file is in force and does not list the file", Severity.HIGH),
    "load-failed": ("the loader ran in the sandbox and failed", Severity.HIGH),
    "limit-exceeded": ("a resource limit ended the load", Severity.HIGH),
    "output-rejected": ("what came out of the sandbox failed validation", Severity.HIGH),
    "engine-error": ("the container engine could not run the sandbox", Severity.HIGH),
    "engine-unavailable": ("no container engine was reachable", Severity.HIGH),
    "image-missing": ("the worker image is not built", Severity.HIGH),
    "image-mismatch": ("the worker image was built from other code", Severity.HIGH),
    "internal-error": ("model-sandbox failed on this file (a bug)", Severity.HIGH),
    "sandbox-error": ("the sandbox failed for another reason", Severity.HIGH),
}

_LEVEL = {Severity.CRITICAL: "error", Severity.HIGH: "error", Severity.MEDIUM: "warning",
          Severity.LOW: "note", Severity.INFO: "note"}
_SCORE = {Severity.CRITICAL: "9.5", Severity.HIGH: "8.0", Severity.MEDIUM: "5.5",
          Severity.LOW: "3.0", Severity.INFO: "0.0"}


def _rule(rule_id: str) -> dict[str, Any]:
    text, severity = RULES.get(rule_id, ("a model-sandbox finding (see the result's message)",
                                         Severity.MEDIUM))
    return {"id": rule_id, "name": "".join(p.title() for p in rule_id.split("-")),
            "shortDescription": {"text": text},
            "defaultConfiguration": {"level": _LEVEL[severity]},
            "properties": {"security-severity": _SCORE[severity], "tags": ["security"]}}


def _location(path: str, base: str | None) -> dict[str, Any]:
    ab = os.path.abspath(path)
    if base is not None and ab.startswith(base.rstrip(os.sep) + os.sep):
        rel = os.path.relpath(ab, base).replace(os.sep, "/")
        return {"uri": urllib.parse.quote(rel, safe="/", errors="surrogateescape"),
                "uriBaseId": "SRCROOT"}
    if _encodable(ab):
        return {"uri": Path(ab).as_uri()}
    return {"uri": "file://" + urllib.parse.quote(ab, errors="surrogateescape")}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def render_sarif(reports: Sequence[LoadReport], *, base: str | os.PathLike[str] | None = None,
                 ) -> dict[str, Any]:
    """A SARIF 2.1.0 log (as a dict) with one run holding every report's findings.

    ``base`` (default: the current directory) becomes ``SRCROOT``; inputs under it get
    relative URIs."""
    root = os.path.abspath(os.fspath(base)) if base is not None else os.getcwd()
    rule_index: dict[str, int] = {}
    rules: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []

    def index_of(rule_id: str) -> int:
        if rule_id not in rule_index:
            rule_index[rule_id] = len(rules)
            rules.append(_rule(rule_id))
        return rule_index[rule_id]

    for report in reports:
        loc = _location(report.input_path, root)
        art: dict[str, Any] = {"location": dict(loc), "roles": ["analysisTarget"]}
        if report.input_sha256:
            art["hashes"] = {"sha-256": report.input_sha256}
        if report.input_size is not None:
            art["length"] = report.input_size
        artifacts.append(art)
        where = [{"physicalLocation": {"artifactLocation": {**loc, "index": len(artifacts) - 1}}}]
        common = {"verdict": report.verdict.value, "input-sha256": report.input_sha256 or "",
                  "format": report.format or ""}
        if report.error:
            ref = report.error.get("reference", "sandbox-error")
            sev = RULES.get(ref, ("", Severity.HIGH))[1]
            results.append({
                "ruleId": ref, "ruleIndex": index_of(ref), "level": _LEVEL[sev],
                "kind": "fail",
                "message": {"text": report.error.get("message", ref) or ref},
                "locations": where,
                "properties": {**common, "severity": str(sev), "security-severity": _SCORE[sev]}})
        for f in report.findings:
            results.append({
                "ruleId": f.rule, "ruleIndex": index_of(f.rule), "level": _LEVEL[f.severity],
                "kind": "fail",
                "message": {"text": f.message},
                "locations": where,
                "properties": {**common, "severity": str(f.severity), "category": f.category,
                               "security-severity": _SCORE[f.severity],
                               "evidence": f.evidence, "events": list(f.events)}})
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "model-sandbox", "version": _api._VERSION, "semanticVersion": _api._VERSION,
                "rules": rules}},
            "originalUriBaseIds": {"SRCROOT": {"uri": Path(root).as_uri() + "/"}},
            "artifacts": artifacts,
            "results": results,
            "columnKind": "unicodeCodePoints",
        }],
    }
