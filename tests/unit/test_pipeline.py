"""The host pipeline without a daemon: a fake runner plays the container (benign files only,
loaded in-process by the worker's own code), so the host's validation, verdicts and error
mapping can be tested quickly and exhaustively. The real sandbox is tested in tests/container."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import sandbox
from sandbox._extract import read_outputs, validate_manifest
from sandbox._launch import ContainerSpec, RunResult
from sandbox._worker import _loader
from sandbox._worker import _protocol as P
from sandbox.errors import OutputRejected
from tests import checkpoints as ck


class FakeRunner:
    """Does what the container does, in-process, then lets a test tamper with the output."""

    def __init__(self, tamper: Callable[[str, dict[str, Any]], None] | None = None,
                 run_result: RunResult | None = None) -> None:
        self.tamper = tamper
        self.run_result = run_result
        self.specs: list[ContainerSpec] = []

    def ensure_image(self) -> str:
        return "model-sandbox-worker:fake"

    def run(self, spec: ContainerSpec) -> RunResult:
        self.specs.append(spec)
        cfg = json.loads(spec.command[0])
        data = Path(spec.input_path).read_bytes()
        status: dict[str, Any] = {"protocol": P.PROTOCOL_VERSION, "env_keys": [],
                                  "input_sha256": hashlib.sha256(data).hexdigest(),
                                  "input_size": len(data), "exit_code": 0, "wall_s": 0.1}
        try:
            obj, fmt, loc = _loader.load(spec.input_path)
            _loader.write_outputs(obj, fmt, loc, spec.output_dir, tensors=cfg["write_tensors"])
            status["result"] = {"ok": True, "format": fmt}
        except _loader.LoaderError as exc:
            status["result"] = {"ok": False, "kind": exc.kind, "message": str(exc),
                                "detected": exc.detected}
            status["exit_code"] = 3
        if self.tamper:
            self.tamper(spec.output_dir, status)
        with open(os.path.join(spec.output_dir, P.STATUS_FILE), "w") as f:
            json.dump(status, f)
        return self.run_result or RunResult(exit_code=0)


def test_fake_pipeline_round_trip(tmp_path: Path) -> None:
    path = ck.save(ck.nested_checkpoint(), tmp_path / "n.pt")
    runner = FakeRunner()
    got = sandbox.safe_load(path, weights_only=False, runner=runner)
    assert torch.equal(got["state_dict"]["encoder.weight"], ck.state_dict()["encoder.weight"])
    assert got["config"].hidden == 16 and got["shape"] == torch.Size([2, 3])
    assert got["np_array"].dtype.name == "float32" and got["np_scalar"] == 2.5


def test_tampered_tensor_bytes_are_rejected(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def flip_a_byte(out: str, status: dict[str, Any]) -> None:
        manifest = json.loads(Path(out, P.MANIFEST_FILE).read_text())
        manifest["tensors"][0]["sha256"] = "0" * 64
        Path(out, P.MANIFEST_FILE).write_text(json.dumps(manifest))

    with pytest.raises(OutputRejected, match="sha256"):
        sandbox.safe_load(path, runner=FakeRunner(flip_a_byte))


def test_symlinked_output_is_rejected(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    secret = tmp_path / "host-secret"
    secret.write_text("{}")

    def plant(out: str, status: dict[str, Any]) -> None:
        os.unlink(os.path.join(out, P.MANIFEST_FILE))
        os.symlink(secret, os.path.join(out, P.MANIFEST_FILE))

    with pytest.raises(OutputRejected, match="regular file"):
        sandbox.safe_load(path, runner=FakeRunner(plant))


def test_unexpected_output_is_a_finding(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def extra(out: str, status: dict[str, Any]) -> None:
        Path(out, "loot.txt").write_text("x")

    report = sandbox.scan(path, runner=FakeRunner(extra))
    assert report.verdict is sandbox.Verdict.SUSPICIOUS
    assert any(f.rule == "unexpected-output" and f.evidence["name"] == "loot.txt"
               for f in report.findings)


def test_input_swapped_under_the_sandbox(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def other(out: str, status: dict[str, Any]) -> None:
        status["input_sha256"] = "f" * 64

    report = sandbox.scan(path, runner=FakeRunner(other))
    assert report.verdict is sandbox.Verdict.MALICIOUS
    assert any(f.rule == "input-changed" for f in report.findings)
    with pytest.raises(sandbox.SandboxViolation) as info:
        sandbox.safe_load(path, runner=FakeRunner(other))
    assert info.value.report.verdict is sandbox.Verdict.MALICIOUS


def test_engine_facts_map_to_limits(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    for result, limit in ((RunResult(exit_code=137, oom_killed=True), "memory"),
                          (RunResult(exit_code=137, timed_out=True), "wall_clock"),
                          (RunResult(exit_code=137, output_flood=True), "output_bytes")):
        with pytest.raises(sandbox.LimitExceeded) as info:
            sandbox.safe_load(path, runner=FakeRunner(run_result=result))
        assert info.value.limit == limit
        assert info.value.report is not None and info.value.report.exit_code == 2


def test_convert_refuses_to_write_weights_for_unsafe_files(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def other(out: str, status: dict[str, Any]) -> None:
        status["input_sha256"] = "f" * 64

    with pytest.raises(sandbox.SandboxViolation):
        sandbox.convert(path, tmp_path / "o.safetensors", runner=FakeRunner(other))
    assert not (tmp_path / "o.safetensors").exists()
    saved = json.loads((tmp_path / "o.safetensors.report.json").read_text())
    assert saved["verdict"] == "malicious"


def test_status_json_is_validated(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / P.STATUS_FILE).write_text(json.dumps({"protocol": 1, "exit_code": "zero"}))
    with pytest.raises(OutputRejected, match="exit_code"):
        read_outputs(str(out), tensors_cap=1 << 20)
    (out / P.STATUS_FILE).write_text("NaN")
    with pytest.raises(OutputRejected):
        read_outputs(str(out), tensors_cap=1 << 20)


def _manifest(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "protocol": 1, "format": "torch-zip", "skeleton": None, "notes": [], "unrepresentable": [],
        "tensors": [{"name": "a", "dtype": "float32", "shape": [2, 3], "stored_as": "F32",
                     "nbytes": 24, "sha256": "0" * 64, "location": "cpu"}],
        "views": [],
    }
    m.update(over)
    return m


@pytest.mark.parametrize("bad", [
    {"tensors": [{"name": "a", "dtype": "object", "shape": [1], "stored_as": "F32", "nbytes": 4,
                  "sha256": "0" * 64, "location": "cpu"}]},
    {"tensors": [{"name": "a", "dtype": "float32", "shape": [2, 3], "stored_as": "F32",
                  "nbytes": 25, "sha256": "0" * 64, "location": "cpu"}]},
    {"tensors": [{"name": "", "dtype": "float32", "shape": [], "stored_as": "F32", "nbytes": 4,
                  "sha256": "0" * 64, "location": "cpu"}]},
    {"views": [{"name": "v", "base": "a", "offset": 5, "shape": [2], "stride": [1],
                "dtype": "float32", "location": "cpu"}]},      # reaches past the base
    {"views": [{"name": "a", "base": "a", "offset": 0, "shape": [1], "stride": [1],
                "dtype": "float32", "location": "cpu"}]},      # duplicate name
    {"views": [{"name": "v", "base": "zz", "offset": 0, "shape": [1], "stride": [1],
                "dtype": "float32", "location": "cpu"}]},      # no such base
    {"protocol": 2},
])
def test_manifest_validation_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(OutputRejected):
        validate_manifest(_manifest(**bad))


def test_manifest_validation_accepts_a_view_inside_its_base() -> None:
    validate_manifest(_manifest(views=[{"name": "v", "base": "a", "offset": 4, "shape": [2],
                                        "stride": [1], "dtype": "float32", "location": "cpu"}]))


class PoisoningRunner(FakeRunner):
    """Plays a loader that returns other weights than the file holds (Sleepy Pickle)."""

    def run(self, spec: ContainerSpec) -> RunResult:
        result = super().run(spec)
        obj, fmt, loc = _loader.load(spec.input_path)
        obj["encoder.weight"] = obj["encoder.weight"] + 1.0
        cfg = json.loads(spec.command[0])
        _loader.write_outputs(obj, fmt, loc, spec.output_dir, tensors=cfg["write_tensors"])
        return result


@pytest.mark.parametrize("keep_weights", [True, False])
def test_weights_changed_during_load_are_caught(tmp_path: Path, keep_weights: bool) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    if keep_weights:
        with pytest.raises(sandbox.SandboxViolation) as info:
            sandbox.safe_load(path, runner=PoisoningRunner())
        report = info.value.report
    else:
        report = sandbox.scan(path, runner=PoisoningRunner())
    tampered = [f for f in report.findings if f.rule == "weights-tampered"]
    assert tampered and tampered[0].evidence["tensors"][0]["name"] == "encoder.weight"
    assert report.verdict is sandbox.Verdict.MALICIOUS


def test_work_directories_of_dead_processes_are_swept(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import tempfile

    from sandbox import _api

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    stale = tmp_path / f"{_api._WORK_PREFIX}{proc.pid}-abc"
    (stale / "out").mkdir(parents=True)
    alive = tmp_path / f"{_api._WORK_PREFIX}{os.getpid()}-xyz"  # ours: kept
    alive.mkdir()
    monkeypatch.setattr(_api, "_swept", False)
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    sandbox.scan(path, runner=FakeRunner())
    assert not stale.exists() and alive.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(_api._WORK_PREFIX)
                and p != alive]
