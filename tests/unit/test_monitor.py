"""Resources and the CPU-time limit, host side: the policy key, the supervisor's config, the
validation of the (untrusted) ``usage``, ``resources`` and ``limit`` in status.json, and how a
limit the supervisor enforced becomes an error and a finding."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox import _monitor
from sandbox._channel import Received
from sandbox._extract import validate_status
from sandbox._launch import ContainerSpec, Job, RunResult, make_job, make_spec
from sandbox._worker import _protocol as P
from sandbox.errors import LimitExceeded, LoadFailed, OutputRejected, PolicyError
from sandbox.policy import Limits, Policy
from sandbox.report import Severity
from tests import checkpoints as ck

USAGE = {"wall_s": 2.6, "cpu_user_s": 2.1, "cpu_system_s": 0.3, "max_rss_kb": 225_000}
RESOURCES = {
    "cpu_s": 2.5,
    "rss_peak_bytes": 230_000_000,
    "threads_peak": 3,
    "children_peak": 0,
    "samples": 25,
    "sample_s": 0.02,
}


def status(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "protocol": P.PROTOCOL_VERSION,
        "env_keys": [],
        "exit_code": 0,
        "usage": dict(USAGE),
        "result": {"ok": True, "format": "torch-zip"},
        "limit": None,
        "resources": dict(RESOURCES),
    }
    base.update(extra)
    return base


def spec(tmp_path: Path, **limits: float) -> ContainerSpec:
    return make_spec(ck.observe_policy("never", **limits), image="img")


def job(**limits: float) -> Job:
    return make_job(ck.observe_policy("never", **limits), input_fd=-1, input_size=1000)


def done(**kw: Any) -> RunResult:
    """A run whose supervisor completed (its DONE frame arrived)."""
    return RunResult(received=Received(completed=True, closed=True), **kw)


# -- the policy key -------------------------------------------------------------------------------


def test_cpu_limit_defaults_to_the_wall_clock() -> None:
    assert Limits().cpu_s == Limits().wall_clock_s == 300
    assert Limits(wall_clock_s=42).cpu_s == 42
    assert Limits(wall_clock_s=42, cpu_s=7).cpu_s == 7
    assert ck.observe_policy(wall_clock_s=10).limits.cpu_s == 10
    assert ck.observe_policy(cpu_s=3, wall_clock_s=60).limits.cpu_s == 3


def test_builtin_policies_set_a_cpu_limit() -> None:
    for p in (Policy.default(), Policy.strict(), Policy.audit()):
        assert 1 <= p.limits.cpu_s <= p.limits.wall_clock_s * p.limits.cpus
    assert Policy.strict().limits.cpu_s < Policy.default().limits.cpu_s


@pytest.mark.parametrize("value", [0, 0.5, 86401, "10", True])
def test_cpu_limit_is_validated(value: Any) -> None:
    with pytest.raises(PolicyError, match=r"limits\.cpu_s"):
        Policy.from_dict({"name": "x", "description": "y", "limits": {"cpu_s": value}})


def test_the_supervisor_gets_the_cpu_limit() -> None:
    cfg = json.loads(job(cpu_s=3, wall_clock_s=60).config.to_json())
    assert cfg["cpu_s"] == 3 and cfg["wall_clock_s"] == 60


# -- validation of status.json ------------------------------------------------------------------


def test_valid_resources_pass_and_unknown_keys_are_dropped() -> None:
    data = status(limit="cpu", resources={**RESOURCES, "junk": "x" * 10_000, "error": "e" * 500})
    got = validate_status(data)
    assert got.limit == "cpu"
    resources = dict(got.resources)
    assert set(resources) == set(RESOURCES) | {"error"}
    assert len(str(resources["error"])) == 200
    assert isinstance(resources["cpu_s"], float)


@pytest.mark.parametrize(
    "resources",
    [
        [],
        "cpu",
        {"cpu_s": "1"},
        {"cpu_s": True},
        {"cpu_s": -1.0},
        {"cpu_s": float("nan")},
        {"cpu_s": float("inf")},
        {"rss_peak_bytes": 1.5},
        {"threads_peak": -1},
        {"children_peak": False},
        {"samples": 2**64},
        {"error": 3},
    ],
)
def test_malformed_resources_are_rejected(resources: Any) -> None:
    with pytest.raises(OutputRejected, match="resources"):
        validate_status(status(resources=resources))


@pytest.mark.parametrize(
    "usage",
    [
        [],
        {},
        {k: v for k, v in USAGE.items() if k != "wall_s"},
        {**USAGE, "junk": 1},
        {**USAGE, "wall_s": "2.6"},
        {**USAGE, "wall_s": None},
        {**USAGE, "cpu_user_s": -1.0},
        {**USAGE, "cpu_system_s": float("nan")},
        {**USAGE, "max_rss_kb": 1.5},
        {**USAGE, "max_rss_kb": True},
    ],
)
def test_malformed_usage_is_rejected(usage: Any) -> None:
    with pytest.raises(OutputRejected, match="usage"):
        validate_status(status(usage=usage))


@pytest.mark.parametrize(
    "series",
    [
        "x",
        [[0.1, 0.2]],
        [[0.1, 0.2, 1.5]],
        [[0.1, True, 1]],
        [["0", 0, 1]],
        [[-1, 0, 1]],
        [[0.1, 0, -1]],
        [[0.2, 0, 1], [0.1, 0, 1]],
        [[0.1, 0, 1]] * (P.MAX_RESOURCE_POINTS + 1),
    ],
)
def test_malformed_resource_series_are_rejected(series: Any) -> None:
    with pytest.raises(OutputRejected, match="series"):
        validate_status(status(resources={**RESOURCES, "series": series}))


def test_a_resource_series_reaches_the_report_as_samples(tmp_path: Path) -> None:
    points = [[i / 10, i / 20, 1000 + i] for i in range(P.MAX_RESOURCE_POINTS)]
    got = validate_status(status(resources={**RESOURCES, "series": points}))
    assert len(got.series) == P.MAX_RESOURCE_POINTS and got.series[3] == (0.3, 0.15, 1003)
    assert "series" not in dict(got.resources)
    out = _monitor.interpret(done(exit_code=0), got, spec(tmp_path), job(), "in.pt")
    assert out.resources["series"][1] == [0.1, 0.05, 1001]


@pytest.mark.parametrize("limit", ["memory", "CPU", "", 1, ["cpu"]])
def test_unknown_limits_are_rejected(limit: Any) -> None:
    with pytest.raises(OutputRejected, match="limit"):
        validate_status(status(limit=limit))


# -- interpretation --------------------------------------------------------------------------------


def test_resources_are_copied_into_the_outcome(tmp_path: Path) -> None:
    out = _monitor.interpret(done(exit_code=0), validate_status(status()), spec(tmp_path), job(), "in.pt")
    assert out.ok and out.error is None
    assert {k: out.resources[k] for k in RESOURCES} == RESOURCES
    assert {k: out.resources[k] for k in USAGE} == USAGE
    err = status(resources={**RESOURCES, "error": "no psutil"})
    out = _monitor.interpret(done(exit_code=0), validate_status(err), spec(tmp_path), job(), "in.pt")
    assert out.resources["sampling_error"] == "no psutil"


def test_cpu_limit_from_the_supervisor(tmp_path: Path) -> None:
    st = status(
        limit="cpu",
        exit_code=-9,
        resources={**RESOURCES, "cpu_s": 3.1},
        result={"ok": False, "kind": "load-failed", "message": "no result"},
    )
    out = _monitor.interpret(
        done(exit_code=0),
        validate_status(st),
        spec(tmp_path, cpu_s=3, wall_clock_s=60),
        job(cpu_s=3, wall_clock_s=60),
        "in.pt",
    )
    assert isinstance(out.error, LimitExceeded)
    assert out.error.limit == "cpu" and out.error.value == 3
    (f,) = out.findings
    assert (f.rule, f.severity, f.category) == ("limit-cpu", Severity.MEDIUM, "resource")
    assert f.evidence == {"limit": "cpu", "value": 3.0, "enforced_by": "supervisor", "used_s": 3.1}


def test_wall_clock_from_the_supervisor_names_itself(tmp_path: Path) -> None:
    for st in (
        status(limit="wall_clock", timed_out=True, exit_code=-9),
        status(timed_out=True, exit_code=-9),
    ):  # a status without "limit"
        out = _monitor.interpret(
            done(exit_code=0),
            validate_status(st),
            spec(tmp_path, wall_clock_s=5),
            job(wall_clock_s=5),
            "in.pt",
        )
        assert isinstance(out.error, LimitExceeded) and out.error.limit == "wall_clock"
        assert out.findings[0].evidence["enforced_by"] == "supervisor"


def test_engine_limits_come_first(tmp_path: Path) -> None:
    st = validate_status(status(limit="cpu", exit_code=-9))
    for run, limit in (
        (RunResult(exit_code=137, oom_killed=True), "memory"),
        (RunResult(exit_code=137, timed_out=True), "wall_clock"),
    ):
        out = _monitor.interpret(run, st, spec(tmp_path), job(), "in.pt")
        assert isinstance(out.error, LimitExceeded) and out.error.limit == limit
        assert out.findings[0].evidence["enforced_by"] == "engine"


def test_the_rlimit_backstop_is_the_cpu_limit(tmp_path: Path) -> None:
    st = status(exit_code=-24, result={"ok": False, "kind": "load-failed", "message": "no result"})
    out = _monitor.interpret(
        done(exit_code=0), validate_status(st), spec(tmp_path, cpu_s=4), job(cpu_s=4), "in.pt"
    )
    assert isinstance(out.error, LimitExceeded) and out.error.limit == "cpu"
    assert out.findings[0].evidence["enforced_by"] == "rlimit"
    # other signals stay load failures
    st = status(exit_code=-11, result={"ok": False, "kind": "load-failed", "message": "x"})
    out = _monitor.interpret(done(exit_code=0), validate_status(st), spec(tmp_path), job(), "in.pt")
    assert isinstance(out.error, LoadFailed) and not isinstance(out.error, LimitExceeded)


def test_cpu_limit_through_the_pipeline(tmp_path: Path) -> None:
    from tests.fakes import FakeRunner

    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def spun(out: Any, st: dict[str, Any]) -> None:
        st.update(
            limit="cpu",
            exit_code=-9,
            resources={**RESOURCES, "cpu_s": 2.1},
            result={"ok": False, "kind": "load-failed", "message": "no result"},
        )

    with pytest.raises(sandbox.LimitExceeded) as info:
        sandbox.safe_load(path, runner=FakeRunner(spun), policy=ck.observe_policy(cpu_s=2))
    assert info.value.limit == "cpu"
    report = info.value.report
    assert report is not None and report.resources["cpu_s"] == 2.1
    assert any(f.rule == "limit-cpu" for f in report.findings)


# -- the supervisor's series ------------------------------------------------------------------------


def test_the_series_stays_bounded_and_evenly_spread() -> None:
    from sandbox._worker.__main__ import _Resources

    r = _Resources(loader=1, cpu_limit_s=0, start=0.0)
    for i in range(1000):
        r.keep(i / 10, i / 100, 1000 + i)
    kept = [p[2] - 1000 for p in r.series]
    assert len(kept) <= P.MAX_RESOURCE_POINTS and kept[0] == 0 and kept[-1] >= 990
    assert {b - a for a, b in itertools.pairwise(kept)} == {r.stride}
    # and what it reports passes the wire format's own check
    doc = status(resources={**RESOURCES, "series": [list(p) for p in r.series]})
    assert len(validate_status(doc).series) == len(kept)


def test_an_oversize_status_drops_the_series_before_the_counts() -> None:
    from sandbox._worker.__main__ import _Supervisor

    sup = _Supervisor(host=None, prepare=False)  # type: ignore[arg-type]
    series = [[i / 10, i / 100, 10**12 + i] for i in range(P.MAX_RESOURCE_POINTS)]
    counts = {f"kernel:call{i}:denied": i for i in range(200)}
    sup.status.update(
        {
            "exit_code": 0,
            "resources": {**RESOURCES, "series": series},
            "monitor": {"kernel": True, "counts": counts},
            "result": {"ok": True, "format": "torch-zip"},
        }
    )
    small = len(json.dumps({**sup.status, "resources": RESOURCES}))
    padding = P.MAX_FRAME - small - 1000  # fits without the series, not with it
    sup.status["env_keys"] = ["K" * 199] * (padding // 203)
    out = sup._bounded_status()
    assert "series" not in out["resources"] and out["monitor"]["counts"] == counts
    assert len(json.dumps(out)) <= P.MAX_FRAME


def test_proc_stat_reads_past_a_hostile_command_name(tmp_path: Path) -> None:
    """The supervisor samples the tree from /proc/PID/stat; the command name in it is the
    loader's to choose (prctl(PR_SET_NAME)), so it must never shift the fields read after it."""
    import os

    from sandbox._worker.__main__ import proc_stat

    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")

    def stat(pid: int, comm: bytes, state: bytes = b"R") -> None:
        # fields 4..13, then utime stime cutime cstime (14-17), priority nice threads (18-20),
        # itrealvalue starttime vsize (21-23), rss (24), and the rest
        rest = b"1 1 1 0 -1 0 0 0 0 0 " + b"%d %d %d %d " % (tick, 2 * tick, 3 * tick, 4 * tick)
        rest += b"20 0 7 0 100 12345 " + b"%d " % 50 + b"0 " * 20
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_bytes(b"%d (%s) %s %s" % (pid, comm, state, rest))

    stat(2, b"loader")
    stat(3, b"x) Z 1 1 1 0 -1 (")  # reads as a zombie to a parser that splits at the first ')'
    stat(4, b"dead", state=b"Z")
    for pid in (2, 3):
        assert proc_stat(pid, str(tmp_path)) == (10.0, 50 * page, 7)
    assert proc_stat(4, str(tmp_path)) is None  # a zombie: its time is its parent's when reaped
    assert proc_stat(5, str(tmp_path)) is None  # gone
    (tmp_path / "6").mkdir()
    (tmp_path / "6" / "stat").write_bytes(b"6 (short) R 1 2")
    assert proc_stat(6, str(tmp_path)) is None
    # and the real thing: this process
    me = proc_stat(os.getpid())
    assert me is not None and me[1] > 0 and me[2] >= 1 and me[0] >= 0
