"""Policies (sandbox/policy.py): the built-in ones, and every problem of a bad policy file
reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import Policy, PolicyError
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
