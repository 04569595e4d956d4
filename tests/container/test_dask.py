"""Batch conversion on a real Dask cluster: a ``dask scheduler`` and ``dask worker`` processes
on this machine (TCP on 127.0.0.1, random free ports, one thread each), each worker running our
real sandbox on the real engine.

1. ``convert --cluster`` of a small tree (a dozen tiny checkpoints and one hostile one), with one
   worker SIGKILLed while it runs a file, ends with the same output tree and manifest as a local
   run: its task is rescheduled on the other worker, and every file is recorded exactly once;
   a second run through the cluster redoes nothing.
2. A worker whose model-sandbox differs from the client's (another worker image digest: a copy of
   the package with one worker file changed) refuses tasks with :class:`WorkerNotReady`, which
   reaches the client and the CLI.
3. Ctrl-C of ``convert --cluster`` mid-run keeps what finished, leaves the workers idle, and a
   rerun ends with the local run's tree."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from distributed import Client

from sandbox import WorkerNotReady, _batch, _distribute, _image
from sandbox._launch import LABEL, OWNER_LABEL, connect
from sandbox.policy import Policy
from tests import checkpoints as ck
from tests.container.conftest import Cli
from tests.fakes import snapshot, st_content

# Alone on the engine: a SIGKILLed worker's sandboxes are orphans until the test removes them, and
# another test process's end-of-session check would count them as its own leftovers meanwhile.
pytestmark = pytest.mark.serial
DASK = Path(sys.executable).with_name("dask")
BENIGN = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A scheduler and workers as separate processes; everything is stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler = self._start(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1], "--no-dashboard"],
        )

    def _start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [str(DASK), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.procs.append(proc)
        return proc

    def worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self._start(
            name,
            [
                "worker",
                self.address,
                "--name",
                name,
                "--nthreads",
                "1",
                "--no-nanny",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--resources",
                "model-sandbox=1",
                "--death-timeout",
                "60",
            ],
            env,
        )

    def client(self, workers: int) -> Client:
        client = Client(self.address, timeout=60, set_as_default=False)  # type: ignore[no-untyped-call]
        client.wait_for_workers(workers, timeout=90)
        return client

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """The workers first (they say goodbye to the scheduler), then the scheduler."""
        workers = [p for p in self.procs if p is not self.scheduler]
        for group in (workers, [self.scheduler]):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        _remove_containers_of(c.procs)


def _remove_containers_of(procs: list[subprocess.Popen[bytes]]) -> None:
    """A SIGKILLed worker cannot remove its warm sandboxes: remove those it created."""
    from sandbox import _engine

    pids = {str(p.pid) for p in procs}
    engine = connect()
    for c in engine.containers([f"{LABEL}=worker"]):
        if (c.get("Labels") or {}).get(OWNER_LABEL, "").rpartition(":")[2] in pids:
            # another process's orphan sweep may be removing it at the same moment
            with contextlib.suppress(_engine.ApiError):
                engine.remove(c["Id"])


def make_tree(root: Path, marker: Path) -> Path:
    src = root / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    for i in range(BENIGN):
        ck.save(
            {"w": torch.full((4,), float(i)), "step": i},
            src / "ab"[i % 2] / f"m{i:02d}.pt",
            fmt="legacy" if i % 3 == 0 else "zip",
        )
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    ck.save(ck.hostile_checkpoint(ck.code_payload(code)), src / "b" / "evil.pt")
    (src / "a" / "notes.txt").write_text("not a model\n")
    return src


def start_convert(cluster: Cluster, cwd: Path) -> subprocess.Popen[str]:
    """``convert src -o out --cluster`` in ``cwd``, started and left running, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "sandbox", "convert", "src", "-o", "out", "--cluster", cluster.address],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cluster_batch_with_a_killed_worker_equals_a_local_run(
    tmp_path: Path, cluster: Cluster, cli: Cli
) -> None:
    marker = tmp_path / "marker" / "pwned"
    marker.parent.mkdir()
    make_tree(tmp_path, marker)
    w1 = cluster.worker("w1")
    cluster.worker("w2")
    client = cluster.client(2)
    try:
        t0 = time.monotonic()
        local = cli("convert", "src", "-o", "ref", "--jobs", "2", "-q", cwd=tmp_path)
        local_s = time.monotonic() - t0
        t0 = time.monotonic()
        assert local.returncode == 1, local.stdout + local.stderr  # the hostile file: unsafe
        out = tmp_path / "out"
        proc = start_convert(cluster, tmp_path)
        names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        w1_address, w2_address = names["w1"], names["w2"]
        deadline = time.monotonic() + 120
        killed = False
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(_batch.read_manifest(out)) if (out / _batch.MANIFEST_NAME).exists() else 0
            busy = client.processing()  # type: ignore[no-untyped-call]
            # back-pressure: a worker started with model-sandbox=1 runs one sandbox at a time
            assert all(len(keys) <= 1 for keys in busy.values()), busy
            if done >= 3 and busy.get(w1_address):
                w1.send_signal(signal.SIGKILL)  # in the middle of one file's task
                (lost_key,) = busy[w1_address]
                killed = True
                break
            time.sleep(0.05)
        assert killed, "the batch ended before a worker could be killed mid-task"
        stdout, stderr = proc.communicate(timeout=240)
        cluster_s = time.monotonic() - t0
        assert w1.wait(timeout=10) == -signal.SIGKILL
    finally:
        client.close()  # type: ignore[no-untyped-call]
    assert proc.returncode == 1, stdout + stderr + cluster.log("w2") + cluster.log("scheduler")
    rels = [
        m.group(1)
        for m in re.finditer(r"^(?:converted|refused|failed|skipped) +\S+ +(\S+)", stdout, flags=re.M)
    ]
    assert len(rels) == len(set(rels)) == BENIGN + 2, stdout  # each file reported once
    assert snapshot(out) == snapshot(tmp_path / "ref")
    records = _batch.read_manifest(out)
    assert records["b/evil.pt"].status is _batch.Status.REFUSED
    assert sum(r.status is _batch.Status.CONVERTED for r in records.values()) == BENIGN
    assert not (out / "b" / "evil.safetensors").exists()
    assert not list(out.rglob("*.tmp"))
    assert not marker.exists(), "the payload reached the host"
    # the task w1 was running when it died ran again on w2, and its file was recorded once
    lost = [
        r
        for r in records.values()
        if r.sha256 and str(lost_key).startswith(f"model-sandbox-{r.sha256[:16]}-")
    ]
    assert len(lost) == 1, (lost_key, records)
    assert (
        f"loaded by Dask worker {w2_address}"
        in json.loads((out / f"{lost[0].rel}.report.json").read_text())["notes"]
    )
    # resume through the cluster: nothing is redone, nothing changes
    again = cli("convert", "src", "-o", "out", "--cluster", cluster.address, "-q", cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr
    assert f"({BENIGN + 1} unchanged since the last run" in again.stdout
    assert snapshot(out) == snapshot(tmp_path / "ref")
    # and its SARIF log says what the local run's says
    sarif = [
        cli("convert", "src", "-o", o, *extra, "--format", "sarif", cwd=tmp_path)
        for o, extra in (("out", ["--cluster", cluster.address]), ("ref", []))
    ]
    assert [r.returncode for r in sarif] == [1, 1], sarif
    results = [
        sorted(
            (r["ruleId"], r["level"], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"])
            for r in json.loads(run.stdout)["runs"][0]["results"]
        )
        for run in sarif
    ]
    assert results[0] == results[1] and any(rule for rule, _, _ in results[0])
    print(f"\nlocal run {local_s:.1f} s, cluster run with a worker killed {cluster_s:.1f} s")


def test_worker_with_another_digest_refuses_tasks(tmp_path: Path, cluster: Cluster, cli: Cli) -> None:
    # another model-sandbox: the same package with one worker file changed, first on sys.path
    other = tmp_path / "other"
    shutil.copytree(
        Path(_image.__file__).parent, other / "sandbox", ignore=shutil.ignore_patterns("__pycache__")
    )
    with open(other / "sandbox" / "_worker" / "_protocol.py", "a") as f:
        f.write("\n# another release\n")
    cluster.worker("stale", env={"PYTHONPATH": str(other)})
    (tmp_path / "src").mkdir()
    ck.save({"w": torch.ones(2)}, tmp_path / "src" / "m.pt")
    ours = _image.worker_digest()

    run = cli("convert", "src", "-o", "out", "--cluster", cluster.address, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "error[worker-not-ready]" in run.stderr
    assert f"the client's is {ours[:16]}" in run.stderr and "runs another model-sandbox" in run.stderr
    assert not (tmp_path / "out" / "m.safetensors").exists()

    client = cluster.client(1)
    try:
        with pytest.raises(WorkerNotReady) as refused:
            _distribute.Remote(client)
        assert refused.value.expected == ours
        (address,) = client.scheduler_info()["workers"]
        # a task sent to that worker regardless is refused there, with the reason
        fut = client.submit(
            _distribute.convert_task,
            str(tmp_path / "src" / "m.pt"),
            "0" * 64,
            Policy.default(),
            "complete",
            ours,
            None,
            0,
            0.0,
            workers=[address],
            pure=False,
        )
        with pytest.raises(WorkerNotReady) as task:
            fut.result(timeout=60)
        assert task.value.worker == address and task.value.found not in ("", ours)
        assert "runs another model-sandbox" in task.value.message

        # with a worker of our version beside it, the batch runs there (written to the shared
        # OUTDIR by the worker, checked and renamed by the client) and names the stale one
        cluster.worker("current")
        client.wait_for_workers(2, timeout=90)
    finally:
        client.close()  # type: ignore[no-untyped-call]
    run = cli(
        "convert",
        "src",
        "-o",
        "out",
        "--cluster",
        cluster.address,
        "--cluster-output",
        "shared",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "note: Dask worker refused its tasks: worker" in run.stdout
    assert "runs another model-sandbox" in run.stdout
    (record,) = _batch.read_manifest(tmp_path / "out").values()
    assert record.status is _batch.Status.CONVERTED and record.output == "m.safetensors"
    assert (
        record.output_sha256 == hashlib.sha256((tmp_path / "out" / "m.safetensors").read_bytes()).hexdigest()
    )
    header, body = st_content(tmp_path / "out" / "m.safetensors")
    assert (header["w"]["dtype"], header["w"]["shape"]) == ("F32", [2])
    assert body == torch.ones(2).numpy().tobytes()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_an_interrupted_cluster_batch_resumes_to_the_local_runs_tree(
    tmp_path: Path, cluster: Cluster, cli: Cli
) -> None:
    """Ctrl-C of ``convert --cluster`` mid-run: exit 130, what finished is kept (manifest, outputs,
    no temporary file), the cluster is left with nothing of ours running, and a rerun does the
    rest and ends with the local run's tree."""
    marker = tmp_path / "marker" / "pwned"
    marker.parent.mkdir()
    make_tree(tmp_path, marker)
    cluster.worker("w1")
    cluster.worker("w2")
    client = cluster.client(2)
    try:
        local = cli("convert", "src", "-o", "ref", "--jobs", "2", "-q", cwd=tmp_path)
        assert local.returncode == 1, local.stdout + local.stderr
        out = tmp_path / "out"
        proc = start_convert(cluster, tmp_path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / _batch.MANIFEST_NAME).exists() and len(_batch.read_manifest(out)) >= 3:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, stdout + stderr
        kept = _batch.read_manifest(out)
        assert 3 <= len(kept) < BENIGN + 1, "the batch ended before it could be interrupted"
        for r in kept.values():  # each record's output is whole, as its hash says
            if r.status is _batch.Status.CONVERTED:
                assert r.output is not None
                assert hashlib.sha256((out / r.output).read_bytes()).hexdigest() == r.output_sha256
        assert not list(out.rglob("*.tmp"))
        # the client cancelled what it had in flight: the workers go idle
        idle_by = time.monotonic() + 60
        while time.monotonic() < idle_by and any(client.processing().values()):  # type: ignore[no-untyped-call]
            time.sleep(0.2)
        assert not any(client.processing().values()), client.processing()  # type: ignore[no-untyped-call]
    finally:
        client.close()  # type: ignore[no-untyped-call]
    again = cli("convert", "src", "-o", "out", "--cluster", cluster.address, "-q", cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr
    assert snapshot(out) == snapshot(tmp_path / "ref")
    assert not marker.exists(), "the payload reached the host"
