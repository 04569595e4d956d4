"""Stage 7 (sandbox._judge): findings under the policy become a verdict. The attacks here are a
payload that crashes the load to look like an error, one that acts although the scan saw
nothing, and a file that reads as one format to a scanner and loads as another."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import _judge, _scan
from sandbox.policy import Policy
from sandbox.report import Finding, LoadReport, Severity, Verdict
from tests import checkpoints as ck

_NAMED = {"name": "test", "description": "a policy of this test"}


def _finding(rule: str, severity: Severity, category: str = "exec", **evidence: object) -> Finding:
    return Finding(rule=rule, severity=severity, category=category, message=rule, evidence=dict(evidence))


def test_high_evidence_is_malicious_even_when_the_load_failed() -> None:
    report = LoadReport(input_path="x.pt")
    report.error = {"type": "LoadFailed", "message": "crashed"}
    report.add(_finding("exec-attempt", Severity.HIGH))
    assert _judge.verdict(report) is Verdict.MALICIOUS


def test_a_lost_monitor_is_never_clean() -> None:
    report = LoadReport(input_path="x.pt")
    report.add(_finding("monitor-lost", Severity.CRITICAL, "integrity"))
    assert _judge.verdict(report) is Verdict.ERROR
    report.add(_finding("network-attempt", Severity.HIGH, "network"))
    assert _judge.verdict(report) is Verdict.MALICIOUS


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        (None, Verdict.CLEAN),
        (Severity.INFO, Verdict.CLEAN),
        (Severity.LOW, Verdict.CLEAN),
        (Severity.MEDIUM, Verdict.SUSPICIOUS),
        (Severity.HIGH, Verdict.MALICIOUS),
        (Severity.CRITICAL, Verdict.MALICIOUS),
    ],
)
def test_verdict_follows_the_worst_finding(severity: Severity | None, expected: Verdict) -> None:
    report = LoadReport(input_path="x.pt")
    if severity is not None:
        report.add(_finding("some-rule", severity))
    assert _judge.verdict(report) is expected


def test_acting_without_a_static_warning_is_evasion(tmp_path: Path) -> None:
    path = ck.save({"w": 1}, tmp_path / "plain.pt")
    static = _scan.scan_file(path)
    report = LoadReport(input_path=str(path), format=static.format)
    report.add(_finding("exec-attempt", Severity.HIGH, "exec", source="kernel"))
    _judge.differential(report, static)
    assert any(f.rule == "static-dynamic-mismatch" for f in report.findings)
    seen = LoadReport(input_path=str(path), format=static.format)
    seen.add(_finding("dangerous-global", Severity.CRITICAL, "exec", source="static"))
    seen.add(_finding("exec-attempt", Severity.HIGH, "exec", source="kernel"))
    _judge.differential(seen, static)
    assert not any(f.rule == "static-dynamic-mismatch" for f in seen.findings)


def test_a_file_that_loads_as_another_format_is_evasion(tmp_path: Path) -> None:
    path = ck.save({"w": 1}, tmp_path / "plain.pt")
    static = _scan.scan_file(path)
    report = LoadReport(input_path=str(path), format="torch-legacy")
    _judge.differential(report, static)
    assert [f.evidence for f in report.findings if f.rule == "format-differential"] == [
        {"static": "torch-zip", "loaded_as": "torch-legacy"}
    ]


def test_resource_abuse_scales_with_the_file() -> None:
    small = LoadReport(input_path="x.pt", input_size=1000)
    small.resources = {"rss_peak_bytes": 3 << 30, "cpu_s": 45.0}
    _judge.resource_abuse(small)
    assert [f.rule for f in small.findings] == ["resource-abuse", "resource-abuse"]
    big = LoadReport(input_path="x.pt", input_size=2 << 30)
    big.resources = {"rss_peak_bytes": 3 << 30, "cpu_s": 45.0}
    _judge.resource_abuse(big)
    assert not big.findings


def test_policy_severities_and_thresholds() -> None:
    policy = Policy.from_dict(
        {**_NAMED, "events": {"severity": {"file-write": "ignore", "exec-attempt": "low"}}}
    )
    report = LoadReport(input_path="x.pt")
    report.add(_finding("file-write", Severity.MEDIUM, "file"))
    report.add(_finding("exec-attempt", Severity.HIGH))
    _judge.apply_severities(report, policy)
    assert [(f.rule, f.severity) for f in report.findings] == [("exec-attempt", Severity.LOW)]
    report.verdict = Verdict.SUSPICIOUS
    assert not _judge.refuses(report, Policy.from_dict(_NAMED))
    assert _judge.refuses(report, Policy.from_dict({**_NAMED, "fail_on": "suspicious"}))
    report.verdict = Verdict.ERROR
    assert not _judge.refuses(report, Policy.from_dict({**_NAMED, "fail_on": "suspicious"}))


def test_function_calls_of_unknown_globals_are_told_from_classes() -> None:
    assert _judge.calls_a_function({"global": "timeit.timeit", "called": True})
    assert not _judge.calls_a_function({"global": "mylib.models.Net", "called": True})
    assert not _judge.calls_a_function({"global": "mylib.helpers.build", "called": False})
    assert _judge.calls_a_function({"global": "_osx_support._read_output", "called": True})
    assert not _judge.calls_a_function({"global": "mylib._rebuild", "called": True})
