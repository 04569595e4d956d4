"""SARIF 2.1.0 for load reports: one result per finding, one per error.

``ruleId`` is the finding's ``rule`` (or, for a load that ended in an error, the error's stable
``reference``); every id is in the rule table (:mod:`._rules`, from which ``docs/rules.md`` is
generated). Levels: critical/high -> ``error``, medium ->
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

from ._rules import RULES, sarif_level
from ._version import VERSION
from .report import LoadReport, Severity

__all__ = ["render_sarif"]

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"

_SCORE = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
    Severity.INFO: "0.0",
}


def _rule(rule_id: str) -> dict[str, Any]:
    known = RULES.get(rule_id)
    text = known.summary if known else "a model-sandbox finding (see the result's message)"
    severity = known.severity if known else Severity.MEDIUM
    return {
        "id": rule_id,
        "name": "".join(p.title() for p in rule_id.split("-")),
        "shortDescription": {"text": text},
        "defaultConfiguration": {"level": sarif_level(severity)},
        "properties": {"security-severity": _SCORE[severity], "tags": ["security"]},
    }


def _location(path: str, base: str | None) -> dict[str, Any]:
    ab = os.path.abspath(path)
    if base is not None and ab.startswith(base.rstrip(os.sep) + os.sep):
        rel = os.path.relpath(ab, base).replace(os.sep, "/")
        return {"uri": urllib.parse.quote(rel, safe="/", errors="surrogateescape"), "uriBaseId": "SRCROOT"}
    if _encodable(ab):
        return {"uri": Path(ab).as_uri()}
    return {"uri": "file://" + urllib.parse.quote(ab, errors="surrogateescape")}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def render_sarif(
    reports: Sequence[LoadReport],
    *,
    base: str | os.PathLike[str] | None = None,
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
        common = {
            "verdict": report.verdict.value,
            "input-sha256": report.input_sha256 or "",
            "format": report.format or "",
        }
        if report.error:
            ref = report.error.get("reference", "sandbox-error")
            known = RULES.get(ref)
            sev = known.severity if known else Severity.HIGH
            results.append(
                {
                    "ruleId": ref,
                    "ruleIndex": index_of(ref),
                    "level": sarif_level(sev),
                    "kind": "fail",
                    "message": {"text": report.error.get("message", ref) or ref},
                    "locations": where,
                    "properties": {**common, "severity": str(sev), "security-severity": _SCORE[sev]},
                }
            )
        for f in report.findings:
            results.append(
                {
                    "ruleId": f.rule,
                    "ruleIndex": index_of(f.rule),
                    "level": sarif_level(f.severity),
                    "kind": "fail",
                    "message": {"text": f.message},
                    "locations": where,
                    "properties": {
                        **common,
                        "severity": str(f.severity),
                        "category": f.category,
                        "security-severity": _SCORE[f.severity],
                        "evidence": f.evidence,
                        "events": list(f.events),
                    },
                }
            )
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "model-sandbox",
                        "version": VERSION,
                        "semanticVersion": VERSION,
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"SRCROOT": {"uri": Path(root).as_uri() + "/"}},
                "artifacts": artifacts,
                "results": results,
                "columnKind": "unicodeCodePoints",
            }
        ],
    }
