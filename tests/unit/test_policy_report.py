from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import Finding, LoadReport, Policy, PolicyError, Severity, Verdict
from sandbox.policy import builtin_names


def test_builtin_policies_load_and_differ() -> None:
    assert {"default", "strict", "audit"} <= set(builtin_names())
    d, s, a = Policy.default(), Policy.strict(), Policy.audit()
    assert d.fail_on == "malicious" and s.fail_on == "suspicious"
    assert s.limits.wall_clock_s < d.limits.wall_clock_s
    assert len({d.digest, s.digest, a.digest}) == 3
    assert d.digest == Policy.default().digest


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'description = ""\nfail_on = "sometimes"\nextra = 1\n'
        '[limits]\nmemory_mb = 1\npids = "many"\nwall_clok_s = 3\n'
    )
    with pytest.raises(PolicyError) as info:
        Policy.from_file(bad)
    problems = "\n".join(info.value.problems)
    for expected in (
        "'name' is required",
        "'description' is required",
        "fail_on",
        "unknown key 'extra'",
        "limits.memory_mb",
        "limits.pids",
        "unknown key 'limits.wall_clok_s'",
    ):
        assert expected in problems


def test_policy_cli_check_and_show(tmp_path: Path) -> None:
    good = tmp_path / "p.toml"
    good.write_text('name = "mine"\ndescription = "for tests"\n[limits]\nwall_clock_s = 10\n')
    run = [sys.executable, "-m", "sandbox", "policy"]
    out = subprocess.run([*run, "check", str(good)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "valid policy 'mine'" in out.stdout
    (tmp_path / "bad.toml").write_text("name = 3\n")
    out = subprocess.run(
        [*run, "check", str(tmp_path / "bad.toml")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "'name' is required" in out.stderr
    out = subprocess.run([*run, "show", "strict"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["fail_on"] == "suspicious"


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


def test_static_only_scan_needs_no_engine(tmp_path: Path) -> None:
    import pickle

    import torch

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (eval, ("1 + 1",))

    torch.save({"w": torch.ones(2)}, tmp_path / "good.pt")
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"x": Payload()}))
    env = {**__import__("os").environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    run = [sys.executable, "-m", "sandbox", "scan", "--static-only", "--format", "json"]
    good = subprocess.run(
        [*run, str(tmp_path / "good.pt")], capture_output=True, text=True, env=env, check=False
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["static"]["format"] == "torch-zip"
    bad = subprocess.run(
        [*run, str(tmp_path / "bad.pkl")], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["verdict"] == "malicious" and "builtins.eval" in report["static"]["dangerous"]


def test_event_rules_are_validated() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_toml(
            'name = "x"\ndescription = "y"\n[events]\nfatal = ["exec", "dns"]\n'
            'errno = "EINTR"\nallow_read = ["relative/", "/a/../b"]\nloud = 1\n'
            '[events.severity]\n"exec-attempt" = "scary"\n'
        )
    problems = "\n".join(info.value.problems)
    for expected in (
        "events.fatal",
        "events.errno",
        "events.allow_read",
        "unknown key 'events.loud'",
        "events.severity",
    ):
        assert expected in problems
    p = Policy.from_toml(
        'name = "x"\ndescription = "y"\n[events]\nfatal = []\nerrno = "EACCES"\n'
        'allow_read = ["/data/"]\n[events.severity]\n"network-socket" = "ignore"\n'
    )
    assert p.events.fatal == () and p.events.errno_number == 13
    assert p.events.allow_read == ("/data/",) and dict(p.events.severity) == {"network-socket": "ignore"}


def test_builtin_policies_fatal_events() -> None:
    assert set(Policy.default().events.fatal) == {"exec", "network", "credential", "privilege"}
    assert Policy.audit().events.fatal == ()
    assert set(Policy.strict().events.fatal) >= set(Policy.default().events.fatal)


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
