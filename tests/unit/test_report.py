"""Load reports (sandbox/report.py): the JSON round trip, exit codes, severities and the text
output's escaping."""

from __future__ import annotations

import json

import pytest

from sandbox import Finding, LoadReport, Severity, Verdict


def test_report_json_round_trip_and_exit_codes() -> None:
    r = LoadReport(input_path="x.pt", input_sha256="a" * 64, format="torch-zip")
    assert r.exit_code == 0
    r.add(
        Finding(
            rule="exec",
            severity=Severity.CRITICAL,
            category="exec",
            message="tried to run a program",
            evidence={"argv": ["/bin/sh", "-c", "id"]},
            events=(1, 2),
        )
    )
    r.verdict = Verdict.MALICIOUS
    assert r.exit_code == 1
    back = LoadReport.from_json(r.to_json())
    assert back.to_dict() == r.to_dict()
    assert back.findings[0].severity is Severity.CRITICAL
    text = r.to_text()
    assert "MALICIOUS" in text and "/bin/sh" in text
    r.verdict = Verdict.ERROR
    assert r.exit_code == 2


def test_report_rejects_foreign_json() -> None:
    with pytest.raises(ValueError):
        LoadReport.from_json('{"schema": "something-else"}')


def test_severity_order() -> None:
    assert Severity.INFO < Severity.LOW < Severity.MEDIUM < Severity.HIGH < Severity.CRITICAL
    assert Severity.parse("High") is Severity.HIGH


def test_text_output_escapes_what_the_file_controls() -> None:
    """Issue: escape sequences in a file name, a global or a message could clear the screen
    and draw a fake CLEAN header. Text output shows them escaped; JSON keeps them exact."""
    from sandbox.report import Finding, LoadReport, Severity, clean_text

    evil = "x\x1b[2J\x1b[H\rmodel.pt: CLEAN\u202e\x08"
    r = LoadReport(input_path=evil, format=evil, notes=[evil])
    r.add(
        Finding(
            rule="unknown-global",
            severity=Severity.HIGH,
            category="code",
            message=evil,
            evidence={"global": evil, evil: 1},
        )
    )
    r.error = {"reference": evil, "message": evil}
    text = r.to_text()
    assert not any(ch in text for ch in "\x1b\r\x08\u202e")
    assert "\\x1b[2J" in text and "\\u202e" in text
    assert json.loads(r.to_json())["input_path"] == evil
    assert len(clean_text("a" * 10_000, 300)) == 300
