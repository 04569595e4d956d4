"""The rule table (sandbox/_rules.py, read from sandbox/rules.toml): docs/rules.md is current,
every rule id the code can emit is in the table, and a table that is not well-formed (groups
missing or out of order, an id in two groups, an unknown severity, an empty summary) is refused
with the reason, as the import would be."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from sandbox._rules import GROUPS, RULES, Rule, _read_table, finding, render_markdown, sarif_level
from sandbox.report import Severity

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
[dynamic]
exec-attempt = ["critical", "ran a program"]
[integrity]
[static]
odd-global = ["info", "a global"]
[error]
malformed-input = ["high", "bad input"]
"""


def emitted_rules() -> set[str]:
    """Rule ids and error references the code can produce, read from its source."""
    found: set[str] = set()
    for path in (ROOT / "sandbox").rglob("*.py"):
        src = path.read_text("utf-8")
        found |= set(re.findall(r'\brule="([a-z0-9-]+)"', src))
        found |= set(re.findall(r'\brule="[a-z0-9-]+" if .+? else "([a-z0-9-]+)"', src))
        found |= set(re.findall(r'\.add\(\s*(?:ev,\s*)?"([a-z]+(?:-[a-z0-9]+)+)"', src))
        found |= set(re.findall(r'^\s+"([a-z]+(?:-[a-z0-9]+)+)", Severity\.', src, flags=re.M))
        found |= set(re.findall(r'reference = "([a-z0-9-]+)"', src))
        found |= set(re.findall(r'\bfinding\(\s*"([a-z0-9-]+)"', src))
        found |= {f"limit-{m.replace('_', '-')}" for m in re.findall(r'_limit\(\s*out,\s*"([a-z_]+)"', src)}
    return found - {
        "batch-error",
        "lock-file-invalid",
        "report-invalid",
        "policy-error",
        "sandbox-violation",
        "input-error",
        "unrepresentable-object",
    } | {"unrepresentable-object"}


def test_rule_ids_are_documented() -> None:
    doc = (ROOT / "docs" / "rules.md").read_text("utf-8")
    assert doc == render_markdown(), "docs/rules.md is out of date: python -m sandbox._rules > docs/rules.md"
    missing = emitted_rules() - set(RULES)
    assert not missing, f"rules the code emits but the rule table lacks: {missing}"
    assert all(r.id == key for key, r in RULES.items())


def test_the_table_is_rules_toml_read_group_by_group() -> None:
    text = (ROOT / "sandbox" / "rules.toml").read_text("utf-8")
    assert _read_table(text) == RULES  # what the import read, through the checks below
    groups = [r.group for r in RULES.values()]
    assert sorted(groups, key=list(GROUPS).index) == groups  # in the order of GROUPS
    assert set(groups) == set(GROUPS)  # no group is empty
    assert all(isinstance(r.severity, Severity) and r.summary.strip() for r in RULES.values())


def test_a_well_formed_table_keeps_its_groups_severities_and_summaries() -> None:
    rules = _read_table(GOOD)
    assert rules == {
        "exec-attempt": Rule("exec-attempt", Severity.CRITICAL, "dynamic", "ran a program"),
        "odd-global": Rule("odd-global", Severity.INFO, "static", "a global"),
        "malformed-input": Rule("malformed-input", Severity.HIGH, "error", "bad input"),
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[dynamic]\n[integrity]\n[static]\n", "the groups must be"),  # one missing
        ("[integrity]\n[dynamic]\n[static]\n[error]\n", "the groups must be"),  # out of order
        ("[dynamic]\n[integrity]\n[static]\n[error]\n[extra]\n", "the groups must be"),
        ("", "the groups must be"),
        ("dynamic = 1\n[integrity]\n[static]\n[error]\n", "'dynamic' must be a table of rules"),
        (
            '[dynamic]\nx = ["high", "a"]\n[integrity]\n[static]\n[error]\nx = ["high", "b"]\n',
            "'x' is in 'dynamic' and 'error'",
        ),
        ('[dynamic]\nx = ["scary", "a"]\n[integrity]\n[static]\n[error]\n', "[dynamic] x: expected"),
        ('[dynamic]\nx = ["High", "a"]\n[integrity]\n[static]\n[error]\n', "[dynamic] x: expected"),
        ('[dynamic]\n[integrity]\n[static]\nx = ["low", ""]\n[error]\n', "[static] x: expected"),
        ('[dynamic]\n[integrity]\n[static]\nx = ["low", "  "]\n[error]\n', "[static] x: expected"),
        ('[dynamic]\n[integrity]\nx = "low"\n[static]\n[error]\n', "[integrity] x: expected"),
        ('[dynamic]\n[integrity]\nx = ["low"]\n[static]\n[error]\n', "[integrity] x: expected"),
        ('[dynamic]\n[integrity]\nx = ["low", "a", "b"]\n[static]\n[error]\n', "[integrity] x: expected"),
        ('[dynamic]\n[integrity]\nx = ["low", 1]\n[static]\n[error]\n', "[integrity] x: expected"),
        ("[dynamic]\n[integrity]\n[static]\n[error]\nx = { severity = 'low' }\n", "[error] x: expected"),
    ],
    ids=[
        "group-missing",
        "groups-out-of-order",
        "extra-group",
        "empty",
        "group-not-a-table",
        "id-in-two-groups",
        "unknown-severity",
        "capitalised-severity",
        "empty-summary",
        "blank-summary",
        "not-a-list",
        "no-summary",
        "three-items",
        "summary-not-a-string",
        "inline-table",
    ],
)
def test_a_table_that_is_not_well_formed_is_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        _read_table(text)


def test_a_table_that_is_not_toml_is_refused() -> None:
    with pytest.raises(tomllib.TOMLDecodeError):
        _read_table("[dynamic\n")


def test_finding_of_a_rule_has_its_defaults_unless_given() -> None:
    rule = RULES["exec-attempt"]
    f = finding("exec-attempt", "process")
    assert (f.rule, f.severity, f.category, f.message, f.evidence) == (
        "exec-attempt",
        rule.severity,
        "process",
        rule.summary,
        {},
    )
    f = finding("exec-attempt", "process", "ran /bin/sh", {"path": "/bin/sh"}, Severity.LOW)
    assert (f.severity, f.message, f.evidence) == (Severity.LOW, "ran /bin/sh", {"path": "/bin/sh"})


def test_finding_of_an_unknown_rule_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        finding("no-such-rule", "x")


def test_every_severity_has_its_sarif_level() -> None:
    assert {s: sarif_level(s) for s in Severity} == {
        Severity.CRITICAL: "error",
        Severity.HIGH: "error",
        Severity.MEDIUM: "warning",
        Severity.LOW: "note",
        Severity.INFO: "note",
    }
