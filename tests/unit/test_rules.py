"""The rule table (sandbox/_rules.py, read from sandbox/rules.toml): docs/rules.md is current and
every rule id the code can emit is in the table."""

from __future__ import annotations

import re
from pathlib import Path

from sandbox._rules import RULES, render_markdown

ROOT = Path(__file__).resolve().parents[2]


def emitted_rules() -> set[str]:
    """Rule ids and error references the code can produce, read from its source."""
    found: set[str] = set()
    for path in (ROOT / "sandbox").rglob("*.py"):
        src = path.read_text("utf-8")
        found |= set(re.findall(r'\brule="([a-z0-9-]+)"', src))
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
