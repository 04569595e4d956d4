"""The channel and warm sandboxes on the real engine: a sandbox whose owner dies stops at once,
a supervisor that is killed is never a clean result, pooled sandboxes are single-use and leave
nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import sandbox
from sandbox import _extract
from sandbox._launch import LABEL, OWNER_LABEL, ContainerSpec, DockerRunner, Job, RunResult, connect
from sandbox._worker import _protocol as P
from tests import checkpoints as ck


def running(label: str) -> list[str]:
    """Ids of running containers of ours carrying ``label`` (``key=value``)."""
    return [c["Id"] for c in connect().containers([f"{LABEL}=worker", label], running=True)]


@pytest.mark.serial  # another process's orphan sweep would remove what this test watches
def test_a_sigkilled_scan_leaves_no_running_container(tmp_path: Path) -> None:
    """The host's end of the channel closes with its process; the supervisor sees it and the
    container exits: nothing keeps working for a minute after its owner is gone."""
    slow = ck.save(
        ck.hostile_checkpoint(ck.code_payload("import time\ntime.sleep(60)")), tmp_path / "slow.pt"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "scan", str(slow)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    owner = f"{OWNER_LABEL}={os.uname().nodename}:{proc.pid}"
    try:
        deadline = time.monotonic() + 60
        while not running(owner) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running(owner), "the sandbox never started"
        time.sleep(2.0)  # the payload is sleeping inside the load now
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        while running(owner) and time.monotonic() < killed_at + 2.0:
            time.sleep(0.1)
        assert not running(owner), "the sandbox kept running after its owner was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _ = DockerRunner().engine  # a new runner sweeps the stopped container of a dead owner


class KillingRunner(DockerRunner):
    """Kills the container (its supervisor with it) while the load runs."""

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        box = self.start(spec)
        threading.Timer(2.0, box.engine.kill, args=(box.cid,)).start()
        return box.run(job)


def test_a_supervisor_killed_mid_load_is_monitor_lost_never_clean(tmp_path: Path) -> None:
    slow = ck.save(
        ck.hostile_checkpoint(ck.code_payload("import time\ntime.sleep(30)")), tmp_path / "slow.pt"
    )
    report = sandbox.scan(slow, policy=ck.observe_policy(), runner=KillingRunner())
    # (the payload's eval makes the file malicious statically; what matters: never clean, an
    # error recorded, and the lost monitor reported)
    assert report.verdict is not sandbox.Verdict.CLEAN and report.exit_code != 0
    assert report.error is not None
    lost = [f for f in report.findings if f.rule == "monitor-lost"]
    assert lost and lost[0].severity is sandbox.Severity.HIGH
    assert lost[0].evidence["completed"] is False


def test_pooled_sandboxes_are_warm_single_use_and_leave_nothing(tmp_path: Path) -> None:
    tag = ("org.model-sandbox.test", uuid.uuid4().hex[:12])
    label = f"{tag[0]}={tag[1]}"
    plant, probe = ck.plant_and_probe(tmp_path)
    sd = ck.state_dict()
    good = ck.save(sd, tmp_path / "sd.pt")
    policy = ck.observe_policy()
    with sandbox.Pool(size=2, policy=policy, labels=(tag,)) as pool:
        pool.warm(wait=True)
        assert pool.ready == 2 and len(running(label)) == 2
        assert pool.safe_load(plant, weights_only=False)["payload"] == 1
        # the next file gets another sandbox: nothing the last payload left is there
        assert pool.safe_load(probe, weights_only=False)["payload"] is False
        got = pool.safe_load(good)
        assert all(torch.equal(got[k], v) for k, v in sd.items())
        report = pool.scan(good)
        assert report.verdict is sandbox.Verdict.CLEAN and report.resources.get("warm") is True
        assert pool.served_warm >= 3
    deadline = time.monotonic() + 10
    while connect().containers([label]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not connect().containers([label])


def test_a_pool_closed_by_an_exception_leaves_nothing() -> None:
    tag = ("org.model-sandbox.test", uuid.uuid4().hex[:12])
    label = f"{tag[0]}={tag[1]}"
    with pytest.raises(RuntimeError), sandbox.Pool(size=1, labels=(tag,)) as pool:
        pool.warm(wait=True)
        assert running(label)
        raise RuntimeError("the caller's own failure")
    deadline = time.monotonic() + 10
    while connect().containers([label]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not connect().containers([label])


@pytest.mark.usefixtures("each_runner")
def test_plain_state_dicts_take_the_layout_the_rest_the_full_loader(tmp_path: Path) -> None:
    """Bit-exact either way; the report names the hand-off."""
    plain = {
        f"layer{i}.{p}": ck.dtype_tensor(dt, seed=i)
        for i, dt in enumerate(ck.ALL_DTYPES)
        for p in ("weight",)
        if str(dt).removeprefix("torch.")
        in ("float32", "float16", "bfloat16", "int64", "int8", "uint8", "bool", "float64", "complex64")
    }
    plain["strided"] = torch.arange(24.0).reshape(4, 6)[:, 1::2]
    lay = ck.save(plain, tmp_path / "plain.pt")
    module = ck.save(torch.nn.Sequential(torch.nn.Linear(4, 3)), tmp_path / "module.pt")
    policy = ck.observe_policy()
    got = sandbox.safe_load(lay, policy=policy)
    for k, v in plain.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert sandbox.scan(lay, policy=policy).resources["handoff"] == "layout"
    whole = sandbox.safe_load(module, weights_only=False, policy=policy)
    assert set(whole) == {"0.weight", "0.bias"}
    assert sandbox.scan(module, policy=policy).resources["handoff"] == "memfd"


class StatusRunner(DockerRunner):
    """Fresh sandboxes (started cold: torch not imported ahead); keeps each job's status."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[P.Status | None] = []

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        result = super().run(spec, job)
        self.statuses.append(_extract.read_status(result.received))
        return result


def test_a_cold_sandbox_imports_torch_before_monitoring_when_the_host_needs_the_full_loader(
    tmp_path: Path,
) -> None:
    """The host's scan says a pickled module needs the full loader: a sandbox started cold
    imports torch as soon as its job arrives, before the filter goes in (trusted code, no byte
    of the input read). Under the filter, that import notified some 1,200 opens, each a round
    trip to the supervisor (about a second); the file's own loading still runs monitored."""
    module = ck.save(torch.nn.Sequential(torch.nn.Linear(4, 3)), tmp_path / "module.pt")
    runner = StatusRunner()
    got = sandbox.safe_load(module, weights_only=False, runner=runner)
    assert set(got) == {"0.weight", "0.bias"}
    (status,) = runner.statuses
    assert status is not None
    counts = dict(status.counts)
    opens = sum(n for key, n in counts.items() if key.startswith("kernel:open"))
    assert 0 < opens < 100, counts
    assert counts.get("self_reported:pickle.find_class:recorded", 0) >= 2  # the load was watched
