"""One rule table: every finding's ``rule`` and every error's ``reference``, with its default
severity, its group and a one-line summary.

The table is data, ``sandbox/rules.toml`` (one TOML table per group, ``id = [severity,
summary]``), read and checked here at import into :data:`RULES`. The SARIF renderer reads it
(``tool.driver.rules``), ``docs/rules.md`` is generated from it (``python -m sandbox._rules >
docs/rules.md``; a test checks the file is current), and a test checks that every rule id the
code can emit is in it."""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
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


def _read_table(text: str) -> dict[str, Rule]:
    """The rules of ``rules.toml``, group by group in the order of :data:`GROUPS`; a table
    that is not well-formed fails the import with the reason."""
    data = tomllib.loads(text)
    if list(data) != list(GROUPS):
        raise ValueError(f"rules.toml: the groups must be {list(GROUPS)}, in order, not {list(data)}")
    severities = {str(s): s for s in Severity}
    rules: dict[str, Rule] = {}
    for group, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"rules.toml: {group!r} must be a table of rules")
        for rule_id, entry in table.items():
            if rule_id in rules:
                raise ValueError(f"rules.toml: {rule_id!r} is in {rules[rule_id].group!r} and {group!r}")
            match entry:
                case [str(severity), str(summary)] if severity in severities and summary.strip():
                    rules[rule_id] = Rule(rule_id, severities[severity], group, summary)
                case _:
                    raise ValueError(
                        f"rules.toml: [{group}] {rule_id}: expected [severity, summary] with a severity "
                        f"of {list(severities)} and a summary, got {entry!r}"
                    )
    return rules


RULES: dict[str, Rule] = _read_table(resources.files("sandbox").joinpath("rules.toml").read_text("utf-8"))

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
in `sandbox/rules.toml` (`python -m sandbox._rules > docs/rules.md`); `tests/unit/test_rules.py`
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
