"""The host pipeline without a daemon: a fake runner plays the container (benign files only,
loaded in-process by the worker's own code), so the host's validation, verdicts and error
mapping can be tested quickly and exhaustively. The real sandbox is tested in tests/container."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import sandbox
from sandbox._channel import check_memfd
from sandbox._launch import ContainerSpec, Job, RunResult
from sandbox._worker import _loader
from sandbox._worker import _protocol as P
from sandbox.errors import OutputRejected
from sandbox.report import Severity
from tests import checkpoints as ck
from tests.fakes import FakeRunner, Played, play, sealed


def test_fake_pipeline_round_trip(tmp_path: Path) -> None:
    path = ck.save(ck.nested_checkpoint(), tmp_path / "n.pt")
    runner = FakeRunner()
    got = sandbox.safe_load(path, weights_only=False, runner=runner)
    assert torch.equal(got["state_dict"]["encoder.weight"], ck.state_dict()["encoder.weight"])
    assert got["config"].hidden == 16 and got["shape"] == torch.Size([2, 3])
    assert got["np_array"].dtype.name == "float32" and got["np_scalar"] == 2.5


def test_tampered_tensor_bytes_are_rejected(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def flip_a_byte(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        manifest["tensors"][0]["sha256"] = "0" * 64
        out.manifest = json.dumps(manifest).encode()

    with pytest.raises(OutputRejected, match="sha256"):
        sandbox.safe_load(path, runner=FakeRunner(flip_a_byte))


def test_outputs_must_be_sealed_memfds_of_the_declared_size(tmp_path: Path) -> None:
    unsealed = P.memfd_create("x")
    os.write(unsealed, b"{}")
    assert "not sealed" in (check_memfd(unsealed, 2, 100) or "")
    fcntl.fcntl(unsealed, P.F_ADD_SEALS, P.OUTPUT_SEALS)
    assert check_memfd(unsealed, 2, 100) is None
    assert "differs from the declared" in (check_memfd(unsealed, 3, 100) or "")
    assert "over the 1 byte cap" in (check_memfd(unsealed, 2, 1) or "")
    regular = tmp_path / "f"
    regular.write_bytes(b"{}")
    fd = os.open(regular, os.O_RDONLY)
    assert "memfd" in (check_memfd(fd, 2, 100) or "")
    r, w = os.pipe()
    assert "memfd" in (check_memfd(r, 0, 100) or "")
    for x in (unsealed, fd, r, w):
        os.close(x)


def test_input_swapped_under_the_sandbox(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def other(out: Played, status: dict[str, Any]) -> None:
        status["input_sha256"] = "f" * 64

    report = sandbox.scan(path, runner=FakeRunner(other))
    assert report.verdict is sandbox.Verdict.MALICIOUS
    assert any(f.rule == "input-changed" for f in report.findings)
    with pytest.raises(sandbox.SandboxViolation) as info:
        sandbox.safe_load(path, runner=FakeRunner(other))
    assert info.value.report.verdict is sandbox.Verdict.MALICIOUS


def test_engine_facts_map_to_limits(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    for result, limit in (
        (RunResult(exit_code=137, oom_killed=True), "memory"),
        (RunResult(exit_code=137, timed_out=True), "wall_clock"),
    ):
        with pytest.raises(sandbox.LimitExceeded) as info:
            sandbox.safe_load(path, runner=FakeRunner(run_result=result))
        assert info.value.limit == limit
        assert info.value.report is not None and info.value.report.exit_code == 2

    def flood(out: Played, status: dict[str, Any]) -> None:
        status["limit"] = "output_bytes"

    with pytest.raises(sandbox.LimitExceeded) as info:
        sandbox.safe_load(path, runner=FakeRunner(flood))
    assert info.value.limit == "output_bytes"


@pytest.mark.parametrize("how", ["no-done", "exit-code", "violation"])
def test_a_lost_monitor_is_an_error_never_clean(tmp_path: Path, how: str) -> None:
    """A status without the supervisor's completion, a non-zero engine exit code or an abused
    channel is never a result: verdict error, HIGH monitor-lost (a forged status cannot help)."""
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    class Lost(FakeRunner):
        def run(self, spec: ContainerSpec, job: Job) -> RunResult:
            result = super().run(spec, job)
            if how == "no-done":
                result.received.completed = False
            elif how == "exit-code":
                result.exit_code = 1
            else:
                result.received.violations.append("an oversize frame")
            return result

    report = sandbox.scan(path, runner=Lost())
    assert report.verdict is sandbox.Verdict.ERROR and report.exit_code == 2
    assert [f.severity for f in report.findings if f.rule == "monitor-lost"] == [Severity.HIGH]
    with pytest.raises(sandbox.LoadFailed):
        sandbox.safe_load(path, runner=Lost())


def test_convert_refuses_to_write_weights_for_unsafe_files(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def other(out: Played, status: dict[str, Any]) -> None:
        status["input_sha256"] = "f" * 64

    with pytest.raises(sandbox.SandboxViolation):
        sandbox.convert(path, tmp_path / "o.safetensors", runner=FakeRunner(other))
    assert not (tmp_path / "o.safetensors").exists()
    saved = json.loads((tmp_path / "o.safetensors.report.json").read_text())
    assert saved["verdict"] == "malicious"


class PoisoningRunner(FakeRunner):
    """Plays a loader that returns other weights than the file holds (Sleepy Pickle)."""

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        result = super().run(spec, job)
        obj, fmt, loc = _loader.load(_loader.Input(job.input_fd))
        obj["encoder.weight"] = obj["encoder.weight"] + 1.0
        manifest, tensors = play(obj, fmt, loc, job.config.write_tensors)
        result.close()
        result.received.outputs["manifest"] = sealed(manifest)
        if tensors:
            result.received.outputs["tensors"] = sealed(tensors)
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


def test_work_directories_of_dead_processes_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import tempfile

    from sandbox import _input
    from sandbox._channel import WORK_PREFIX

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    stale = tmp_path / f"{WORK_PREFIX}{proc.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    alive = tmp_path / f"{WORK_PREFIX}{os.getpid()}-xyz"  # ours: kept
    alive.mkdir()
    monkeypatch.setattr(_input, "_swept", False)
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    sandbox.scan(path, runner=FakeRunner())
    assert not stale.exists() and alive.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(WORK_PREFIX) and p != alive]


# -- the layout hand-off ---------------------------------------------------------------------------


def plain(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    sd = ck.state_dict()
    sd["tied"] = sd["encoder.weight"]
    sd["row"] = sd["encoder.weight"][1]
    return ck.save({"model": sd, "epoch": 3}, tmp_path / "plain.pt"), sd


@pytest.mark.parametrize("mmap", [False, True])
def test_plain_state_dicts_come_back_through_the_layout(tmp_path: Path, mmap: bool) -> None:
    path, sd = plain(tmp_path)
    runner = FakeRunner(layout=True)
    got = sandbox.safe_load(path, runner=runner, mmap=mmap)
    assert got["epoch"] == 3 and set(got["model"]) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got["model"][k], v) and got["model"][k].dtype == v.dtype
    # ties and views share memory, as after torch.load
    assert got["model"]["tied"].data_ptr() == got["model"]["encoder.weight"].data_ptr()
    report = sandbox.scan(path, runner=runner)
    assert report.verdict is sandbox.Verdict.CLEAN and report.resources["handoff"] == "layout"
    out = tmp_path / "plain.safetensors"
    sandbox.convert(path, out, runner=runner)
    from safetensors.torch import load_file

    back = load_file(str(out))
    # complete: every name is a tensor of its own, the tie included (recorded in the metadata)
    assert set(back) == {f"model.{k}" for k in sd}
    assert torch.equal(back["model.row"], sd["row"])
    assert torch.equal(back["model.tied"], sd["encoder.weight"])


@pytest.mark.parametrize("change", ["offset", "shape", "key", "dtype", "extra", "missing", "name"])
def test_a_layout_that_disagrees_with_the_file_is_refused(tmp_path: Path, change: str) -> None:
    path, _ = plain(tmp_path)

    def lie(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        doc = json.loads(out.manifest)
        first = doc["layout"][0]
        if change == "offset":
            first["offset"] += 1 << 20  # outside its record
        elif change == "shape":
            first["shape"] = [s * 2 for s in first["shape"]]
        elif change == "key":
            # overlaps another storage
            first["key"] = next(t["key"] for t in doc["layout"] if t["key"] != first["key"])
        elif change == "dtype":
            first["dtype"] = "float64"
        elif change == "extra":
            doc["layout"].append({**first, "name": "smuggled"})
        elif change == "missing":
            doc["layout"].pop()
        else:
            first["name"] = "renamed"
        out.manifest = json.dumps(doc).encode()

    report = sandbox.scan(path, runner=FakeRunner(lie, layout=True))
    assert report.verdict is sandbox.Verdict.MALICIOUS
    assert any(f.rule == "layout-differential" for f in report.findings), change
    with pytest.raises(sandbox.SandboxViolation):
        sandbox.safe_load(path, runner=FakeRunner(lie, layout=True))


def test_a_layout_the_host_cannot_place_goes_to_the_full_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox._verify import reconstruct as _reconstruct

    path, sd = plain(tmp_path)
    monkeypatch.setattr(
        _reconstruct, "try_place", lambda p, scan=None: _reconstruct.NotReconstructed("test: cannot place")
    )
    runner = FakeRunner(layout=True)
    got = sandbox.safe_load(path, runner=runner)
    assert torch.equal(got["model"]["encoder.weight"], sd["encoder.weight"])
    assert [j.config.layout for j in runner.jobs] == [True, False]  # a second, full load


def test_a_huge_file_of_zeros_is_refused_from_its_first_bytes(tmp_path: Path) -> None:
    """Issue: a 20 GB sparse file given to convert was still being processed minutes later.
    The format is judged from a bounded prefix before anything reads the whole file: no hash,
    no sandbox."""
    path = tmp_path / "zeros.pt"
    with open(path, "wb") as f:
        f.truncate(20 * 2**30)
    runner = FakeRunner()
    report = sandbox.scan(path, runner=runner)
    assert report.error is not None and report.error["reference"] == "unsupported-format"
    assert report.input_sha256 is None and runner.specs == []
    with pytest.raises(sandbox.UnsupportedFormat):
        sandbox.convert(path, tmp_path / "out.safetensors", runner=runner)
    (tmp_path / "text.pt").write_text("hello, I am not a model\n")
    error = sandbox.scan(tmp_path / "text.pt", runner=runner).error
    assert error is not None and error["reference"] == "unsupported-format"


def test_calling_an_unlisted_function_is_at_least_medium(tmp_path: Path) -> None:
    """Issue: a pickle that computes its tensors through ordinary torch functions (an add while
    loading) got only INFO. Rebuilding an object of some class stays INFO; calling a function
    nobody listed is MEDIUM (suspicious)."""
    import datetime

    computed = ck.save({"w": ck.Reduce(torch.nn.functional.relu, -torch.ones(2))}, tmp_path / "computed.pt")
    report = sandbox.scan(computed, dynamic=False)
    calls = [f for f in report.findings if f.evidence.get("kind") == "function"]
    assert calls and calls[0].severity is Severity.MEDIUM and "torch" in calls[0].evidence["global"]
    assert report.verdict is sandbox.Verdict.SUSPICIOUS
    dated = ck.save({"w": torch.ones(2), "when": datetime.datetime(2024, 1, 2)}, tmp_path / "dated.pt")
    assert sandbox.scan(dated, dynamic=False).verdict is sandbox.Verdict.CLEAN


@pytest.mark.parametrize("layout", [True, False])
def test_shared_dedupe_writes_a_tie_once_and_records_it(tmp_path: Path, layout: bool) -> None:
    """Hugging Face's convention on request: the tied name is left out of the tensors and
    recorded in the metadata; views stay tensors of their own."""
    import json as _json

    from safetensors import safe_open

    emb = torch.randn(4, 3)
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"embed.weight": emb, "lm_head.weight": emb, "base": base, "row": base[1]}
    path = ck.save(sd, tmp_path / "tied.pt")
    runner = FakeRunner(layout=layout)
    for mode, keys in (("complete", set(sd)), ("dedupe", set(sd) - {"lm_head.weight"})):
        out = tmp_path / f"{mode}.safetensors"
        sandbox.convert(path, out, runner=runner, shared=mode)
        with safe_open(out, framework="pt") as f:
            assert set(f.keys()) == keys, mode
            meta = f.metadata()
            assert torch.equal(f.get_tensor("row"), base[1])
        assert _json.loads(meta["model_sandbox.ties"]) == {"lm_head.weight": "embed.weight"}
        assert meta["model_sandbox.shared"] == mode
    with pytest.raises(ValueError, match="shared"):
        sandbox.convert(path, tmp_path / "x.safetensors", runner=runner, shared="nope")


class SwappingRunner(FakeRunner):
    """Replaces the file at the input's path while the load runs (an attacker with write access
    to the directory): the host must keep verifying the file it handed over, by descriptor."""

    def __init__(self, replacement: Path) -> None:
        super().__init__()
        self.replacement = replacement

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        target = os.readlink(f"/proc/self/fd/{job.input_fd}")
        os.replace(self.replacement, target)
        return super().run(spec, job)


def test_the_host_verifies_the_file_it_handed_over_not_what_its_path_names_later(tmp_path: Path) -> None:
    sd = ck.state_dict()
    path = ck.save(sd, tmp_path / "sd.pt", "legacy")  # verified after the load, by the host
    other = ck.save({k: v + 1 for k, v in sd.items()}, tmp_path / "other.pt", "legacy")
    report = sandbox.scan(path, runner=SwappingRunner(other))
    rules = [f.rule for f in report.findings]
    # the swap itself is noticed (the handed-over inode lost its name), and the weights are
    # compared with that inode's records: a reading by path would call them tampered
    assert "input-changed" in rules, rules
    assert not any(r.startswith("weights-") for r in rules), rules


def test_the_host_checks_the_tensor_bytes_it_receives_itself(tmp_path: Path) -> None:
    """The sandbox sends no digest for bytes it sends: the verification compares the bytes the
    host received with the file's own records (byte for byte, or by the host's digests)."""
    path = ck.save(ck.nested_checkpoint(), tmp_path / "n.pt")
    sent: list[object] = []

    def look(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        sent.extend(t["sha256"] for t in json.loads(out.manifest)["tensors"])

    got = sandbox.safe_load(path, weights_only=False, runner=FakeRunner(look))
    assert sent and all(s is None for s in sent)
    assert torch.equal(got["state_dict"]["encoder.weight"], ck.state_dict()["encoder.weight"])


def test_a_scan_needs_the_sandboxs_digests(tmp_path: Path) -> None:
    """A scan keeps the bytes in the sandbox, so its manifest must carry each tensor's digest:
    a payload that leaves them out does not skip the comparison with the file's records."""
    path = ck.save(ck.nested_checkpoint(), tmp_path / "n.pt")

    def no_digests(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        assert manifest["tensors"] and all(t["sha256"] for t in manifest["tensors"])
        for t in manifest["tensors"]:
            t["sha256"] = None
        out.manifest = json.dumps(manifest).encode()

    report = sandbox.scan(path, runner=FakeRunner(no_digests))
    assert report.verdict is sandbox.Verdict.ERROR
    assert report.error is not None and report.error["reference"] == "output-rejected"
    assert "neither a sha256 nor a span" in report.error["message"]


def test_a_large_inputs_tensors_are_placed_while_the_host_hashes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox hashes only small inputs; for a larger one, the host's own hash is awaited
    after the tensors are placed and read (both run side by side), and a file changed by then
    is still caught."""
    from sandbox import _convert, _input, _launch

    path, sd = plain(tmp_path)
    order: list[str] = []

    class Hasher(_input.Hasher):
        def result(self) -> str:
            order.append("hash")
            return super().result()

    class Prefetch(_input.Prefetch):
        def result(self) -> str:
            order.append("hash")
            return super().result()

    real = _convert.map_layout

    def map_layout(*args: Any, **kwargs: Any) -> Any:
        order.append("read")
        return real(*args, **kwargs)

    def read_range(*args: Any, **kwargs: Any) -> Any:
        order.append("read again")
        return real_range(*args, **kwargs)

    real_range = _convert._read_range
    monkeypatch.setattr(_input, "Hasher", Hasher)
    monkeypatch.setattr(_input, "Prefetch", Prefetch)
    monkeypatch.setattr(_convert, "map_layout", map_layout)
    monkeypatch.setattr(_convert, "_read_range", read_range)
    monkeypatch.setattr(_launch, "HASH_IN_SANDBOX_BYTES", 0)
    got = sandbox.safe_load(path, runner=FakeRunner(layout=True))
    assert torch.equal(got["model"]["encoder.weight"], sd["encoder.weight"])
    assert got["model"]["tied"].data_ptr() == got["model"]["encoder.weight"].data_ptr()
    # the records were read once, beside the sandbox, while the file was hashed
    assert order[0] == "read" and "hash" in order and "read again" not in order
    monkeypatch.setattr(_launch, "HASH_IN_SANDBOX_BYTES", 1 << 30)  # small: compared first
    order.clear()
    sandbox.safe_load(path, runner=FakeRunner(layout=True))
    assert order[0] == "hash"

    def touch(out: Played, status: dict[str, Any]) -> None:
        os.utime(path, ns=(1, 1))  # the file changes while the sandbox has it

    monkeypatch.setattr(_launch, "HASH_IN_SANDBOX_BYTES", 0)
    report = sandbox.scan(path, runner=FakeRunner(touch, layout=True))
    assert any(f.rule == "input-changed" for f in report.findings)


class _Seeing(FakeRunner):
    """A fake of runner ``name`` that notes the file each job's descriptor is."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.seen: list[os.stat_result] = []

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        self.seen.append(os.fstat(job.input_fd))
        return super().run(spec, job)


@pytest.mark.parametrize(
    ("name", "root", "copied"),
    [("bwrap", False, True), ("bwrap", True, False), ("docker", False, False)],
)
def test_a_loader_running_as_our_own_uid_gets_a_private_copy_of_a_file_we_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, root: bool, copied: bool
) -> None:
    """bubblewrap started by a user other than root runs the loader as that user: a file the
    user may write goes in as a read-only private copy (a reopen through /proc/self/fd cannot
    reach the user's file). Root's bwrap drops to its own uid, and Docker's sandbox is 65534."""
    monkeypatch.setattr("sandbox._bwrap.host_root", lambda: root)
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    path.chmod(0o644)
    runner = _Seeing(name)
    got = sandbox.safe_load(path, runner=runner)
    assert torch.equal(got["encoder.weight"], ck.state_dict()["encoder.weight"])
    (st,) = runner.seen
    original = path.stat()
    assert ((st.st_dev, st.st_ino) != (original.st_dev, original.st_ino)) is copied
    if copied:
        assert st.st_mode & 0o777 == 0o444 and st.st_size == original.st_size and st.st_nlink == 0


@pytest.mark.parametrize("layout", [False, True], ids=["full-loader", "layout-hand-off"])
def test_a_view_is_not_materialised_past_the_output_cap(tmp_path: Path, layout: bool) -> None:
    # a view is written to the converted file as its own copy: base[:1].expand(2**27) in a
    # 1.6 KB checkpoint made the host write 512 MB (and ask the allocator for 4 TiB for a
    # 2**20 x 2**20 one), past the output cap the sandbox itself is held to
    base = torch.ones(4)
    path = tmp_path / "views.pt"
    torch.save({"a": base, "b": base[0:1].expand(2**20)}, path)  # 4 MiB as a copy
    policy = sandbox.Policy.default()
    policy = dataclasses.replace(policy, limits=dataclasses.replace(policy.limits, output_mb=1))
    dst = tmp_path / "views.safetensors"
    with pytest.raises(OutputRejected, match="output cap"):
        sandbox.convert(path, dst, policy=policy, runner=FakeRunner(layout=layout))
    assert not dst.exists()


def test_views_that_would_be_huge_once_made_are_refused(tmp_path: Path) -> None:
    # a view costs nothing to send, but where the file has no plain reading the verification
    # hashes every view's elements (a copy): a manifest's view of one element, shaped
    # 2**20 x 2**20 with strides 0, asked the host's allocator for 4 TiB (RuntimeError out of
    # safe_load; smaller ones were simply allocated)
    path = ck.save(ck.nested_checkpoint(), tmp_path / "n.pt")  # a config object: no plain reading

    def add_view(shape: list[int]) -> Any:
        def tamper(out: Played, status: dict[str, Any]) -> None:
            assert out.manifest is not None
            manifest = json.loads(out.manifest)
            base = manifest["tensors"][0]
            view = {
                "name": "extra",
                "base": base["name"],
                "offset": 0,
                "dtype": base["dtype"],
                "location": "cpu",
            }
            manifest["views"] = [{**view, "shape": shape, "stride": [0] * len(shape)}]
            out.manifest = json.dumps(manifest).encode()

        return tamper

    with pytest.raises(OutputRejected, match="views would hold more than"):
        sandbox.safe_load(path, weights_only=False, runner=FakeRunner(add_view([2**20, 2**20])))
    for shape in ([3, 5], [0, 2**40]):  # small, and empty: past this check
        sandbox.safe_load(path, weights_only=False, runner=FakeRunner(add_view(shape)))


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_static_only_scan_of_a_file_it_cannot_read_is_not_clean(tmp_path: Path, cut: float) -> None:
    """``--static-only`` runs no sandbox: a truncated or corrupt file, which the scan cannot
    read to its end, must not come out clean (a CI gate would pass it)."""
    whole = ck.save(ck.state_dict(), tmp_path / "sd.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(whole[: int(len(whole) * cut)])
    report = sandbox.scan(path, dynamic=False)
    assert report.verdict is not sandbox.Verdict.CLEAN
    (found,) = [f for f in report.findings if f.rule == "static-incomplete"]
    assert found.severity is Severity.MEDIUM and found.evidence["why"]
    assert (
        sandbox.scan(ck.save(ck.state_dict(), tmp_path / "ok.pt"), dynamic=False).verdict
        is sandbox.Verdict.CLEAN
    )


def test_a_file_rewritten_after_the_identity_check_is_still_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load compares the bytes it received with the file's, read again after the sandbox
    ended (no longer hashed while it ran): a writer who puts the payload's bytes into the file
    between the identity check and that comparison must not make them the file's."""
    from sandbox import _verify

    honest, forged = torch.full((64,), 1.5), torch.full((64,), 2.5)
    module = torch.nn.Module()  # not a plain state dict: the file is compared byte for byte
    module.register_buffer("w", honest)
    path = ck.save({"model": module}, tmp_path / "m.pt")
    old, new = honest.numpy().tobytes(), forged.numpy().tobytes()
    assert path.read_bytes().count(old) == 1

    def payload(out: Played, status: dict[str, Any]) -> None:  # what a Sleepy Pickle returns
        assert out.tensors and out.tensors.count(old) == 1
        out.tensors = out.tensors.replace(old, new)

    real = _verify.weights

    def racing(*args: Any, **kwargs: Any) -> Any:  # the writer wins the race
        data = path.read_bytes()
        with open(path, "r+b") as f:
            f.seek(data.index(old))
            f.write(new)
        return real(*args, **kwargs)

    monkeypatch.setattr(_verify, "weights", racing)
    with pytest.raises(sandbox.SandboxViolation) as info:
        sandbox.safe_load(path, weights_only=False, runner=FakeRunner(payload))
    rules = [f.rule for f in info.value.report.findings]
    assert "input-changed" in rules, rules


def test_a_skeleton_that_swaps_the_files_weights_is_refused(tmp_path: Path) -> None:
    """Honest names and bytes, but a skeleton that puts each of two weights where the file
    puts the other: safe_load returned the swapped dict, with no finding."""
    module = torch.nn.Module()  # not a plain state dict: the general reading names sd.a, sd.b
    module.register_buffer("w", torch.ones(2))
    path = ck.save(
        {"model": module, "sd": {"a": torch.full((4,), 1.0), "b": torch.full((4,), 2.0)}}, tmp_path / "m.pt"
    )

    def swap(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        (_, a), (_, b) = next(v for k, v in manifest["skeleton"]["items"] if k == "sd")["items"]
        a["ref"], b["ref"] = b["ref"], a["ref"]
        out.manifest = json.dumps(manifest).encode()

    with pytest.raises(sandbox.SandboxViolation) as info:
        sandbox.safe_load(path, weights_only=True, runner=FakeRunner(swap))
    tampered = [f for f in info.value.report.findings if f.rule == "weights-tampered"]
    assert [t["name"] for t in tampered[0].evidence["tensors"]] == ["sd.a", "sd.b"]


class _ChangingItsCopy(_Seeing):
    """A non-root bwrap sandbox whose loader owns its private copy of the input: it makes the
    copy writable and overwrites the tensor bytes in it, then plays the layout hand-off."""

    def __init__(self, find: bytes) -> None:
        super().__init__("bwrap")
        self.layout = True
        self.find = find

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        os.fchmod(job.input_fd, 0o600)  # the owner may, whatever the mode
        with open(f"/proc/self/fd/{job.input_fd}", "r+b") as f:
            data = f.read()
            at = data.index(self.find)
            f.seek(at)
            f.write(bytes(len(self.find)))
        return super().run(spec, job)


def test_the_host_takes_a_plain_state_dicts_bytes_from_its_own_descriptor_not_the_sandboxs_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy a non-root bwrap loader gets is its own to change; the tensors the host hands
    back come from the host's descriptor of the user's file."""
    from sandbox import _launch

    monkeypatch.setattr("sandbox._bwrap.host_root", lambda: False)
    monkeypatch.setattr(_launch, "HASH_IN_SANDBOX_BYTES", 0)  # a large input: the sandbox hashes none
    sd = {"w": torch.arange(1.0, 65.0)}
    path = ck.save(sd, tmp_path / "sd.pt")
    original = path.read_bytes()
    path.chmod(0o444)  # read-only, but ours: we could make it writable, so the loader gets a copy
    runner = _ChangingItsCopy(sd["w"].numpy().tobytes())
    got = sandbox.safe_load(path, runner=runner)
    assert torch.equal(got["w"], sd["w"])
    assert path.read_bytes() == original
    (seen,) = runner.seen
    assert (seen.st_dev, seen.st_ino) != (path.stat().st_dev, path.stat().st_ino)


@pytest.mark.parametrize("location", ["garbage", "cuda:0", "meta", "", "cpu\x00", "Cpu"])
def test_a_location_the_file_does_not_name_is_refused(tmp_path: Path, location: str) -> None:
    """The manifest's location of a tensor is the sandbox's word: ``"garbage"`` raised
    RuntimeError out of ``torch.device``, ``"cuda:0"`` on a host without CUDA an AssertionError
    out of ``Tensor.to``, and ``"meta"`` handed the user meta tensors (every weight gone),
    verdict clean. A location is a device string, and one no storage of the file names is
    refused."""
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")

    def move(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        manifest["tensors"][0]["location"] = location
        out.manifest = json.dumps(manifest).encode()

    with pytest.raises(OutputRejected):
        sandbox.safe_load(path, runner=FakeRunner(move))
    with pytest.raises(OutputRejected):
        sandbox.safe_load(path, map_location="cpu", runner=FakeRunner(move))


def test_a_location_this_host_lacks_is_load_failed(tmp_path: Path) -> None:
    """A file whose storages are on cuda:0, on a host without CUDA: torch.load raises
    RuntimeError; safe_load raised torch's AssertionError, and now LoadFailed (a
    RuntimeError); ``map_location`` places it."""
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    path = tmp_path / "legacy.tar"
    tensors = {"w": torch.arange(4, dtype=torch.float32)}
    ck.write_legacy_tar(path, lambda ref: {"w": ref("w")}, tensors, location="cuda:0")
    with pytest.raises(sandbox.LoadFailed, match="cuda:0"):
        sandbox.safe_load(path, runner=FakeRunner())
    got = sandbox.safe_load(path, map_location="cpu", runner=FakeRunner())
    assert torch.equal(got["w"], tensors["w"])


def test_a_sparse_tensors_size_is_checked_against_the_file(tmp_path: Path) -> None:
    """Found by tests/property/test_sandbox_result_props.py: a skeleton that says a sparse
    COO tensor of size (3, 4) is (4, 4) gave the user a (4, 4) tensor, verdict clean: its
    indices and values were verified, its size was not (the host's reading of the file did not
    keep ``_rebuild_sparse_tensor``'s size). Now a size the file does not describe leaves the
    tensor unverified, as a quantizer it does not describe does."""
    path = ck.save({"coo": ck.composite_checkpoint()["coo"]}, tmp_path / "coo.pt")

    def grow(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        manifest["skeleton"]["items"][0][1]["shape"] = [4, 4]
        out.manifest = json.dumps(manifest).encode()

    assert sandbox.safe_load(path, runner=FakeRunner())["coo"].shape == (3, 4)
    with pytest.raises(sandbox.UnverifiedWeights) as info:
        sandbox.safe_load(path, runner=FakeRunner(grow))
    assert info.value.names == ["coo"]
    report = sandbox.scan(path, runner=FakeRunner(grow))
    assert [f.evidence["tensors"] for f in report.findings if f.rule == "weights-unverified"] == [["coo"]]


def test_a_name_that_cannot_be_encoded_never_reaches_a_message(tmp_path: Path) -> None:
    """Names were any string: a view named ``"w\\ud800"`` (a lone surrogate, valid JSON) came
    back in UnverifiedWeights' message, which no UTF-8 stream can print (the CLI raised
    UnicodeEncodeError printing it). The worker names every tensor printably; the host now
    holds the sandbox to that."""
    path = ck.save({"w": ck.Reduce(torch.ones, 3)}, tmp_path / "computed.pt")

    def rename(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        view = {"name": "w\ud800", "base": "w", "offset": 0, "shape": [3], "stride": [1]}
        manifest["views"] = [{**view, "dtype": "float32", "location": "cpu"}]
        out.manifest = json.dumps(manifest).encode()

    with pytest.raises(sandbox.SandboxError) as info:
        sandbox.convert(
            path, tmp_path / "o.safetensors", runner=FakeRunner(rename), policy=ck.observe_policy()
        )
    info.value.diagnostics().encode()
    assert isinstance(info.value, OutputRejected)


@pytest.mark.parametrize("key", ["coo", "csr", "nested"])
@pytest.mark.parametrize("instead", ["a tensor", "a value"])
def test_a_skeleton_that_swaps_out_a_sparse_or_nested_tensor_is_refused(
    tmp_path: Path, key: str, instead: str
) -> None:
    """Found by tests/property/test_sandbox_result_props.py: a skeleton that put the tensor
    ``plain`` (or the value 0) where the file has a nested or sparse tensor handed the user
    that, verdict clean: the host's reading of the file knew where its plain and quantized
    tensors lie, not its sparse and nested ones (rebuilt by calls it keeps opaque)."""
    composites = ck.composite_checkpoint()
    path = ck.save({k: composites[k] for k in ("plain", "coo", "csr", "nested")}, tmp_path / "composites.pt")

    def swap(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        for pair in manifest["skeleton"]["items"]:
            if pair[0] == key:
                pair[1] = {"$": "tensor", "ref": "plain"} if instead == "a tensor" else 0
        out.manifest = json.dumps(manifest).encode()

    assert sandbox.scan(path, runner=FakeRunner()).verdict is sandbox.Verdict.CLEAN
    with pytest.raises(sandbox.SandboxViolation, match=key):
        sandbox.safe_load(path, runner=FakeRunner(swap))


_SURROGATE = "\ud800"  # valid JSON ("\\ud800"), no UTF-8


@pytest.mark.parametrize(
    "where",
    ["result", "unrepresentable", "notes", "format", "env_keys", "stopped", "input_error", "counts"],
)
def test_text_the_sandbox_sends_is_text_every_report_format_can_carry(tmp_path: Path, where: str) -> None:
    """A lone surrogate in a string of the status or the manifest reached the report: its
    SARIF rendering (which the CLI prints with ensure_ascii=False) raised UnicodeEncodeError.
    Such a string is now kept as its escape; a count or canary key is dropped."""
    from sandbox._sarif import render_sarif

    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    bad = f"x{_SURROGATE}y"

    def plant(out: Played, status: dict[str, Any]) -> None:
        assert out.manifest is not None
        manifest = json.loads(out.manifest)
        if where == "result":
            status.update(result={"ok": False, "kind": "load", "message": bad, "type": bad}, exit_code=3)
        elif where == "unrepresentable":
            manifest["unrepresentable"] = [{"path": bad, "type": bad, "reason": bad}]
        elif where in ("notes", "format"):
            manifest[where] = [bad] if where == "notes" else bad
        elif where == "env_keys":
            status["env_keys"] = [bad]
        elif where == "stopped":
            status["stopped"] = {"kind": bad, "category": bad, "t": 1.0}
        elif where == "input_error":
            status["input_error"] = bad
        else:
            status["monitor"] = {"kernel": True, "counts": {f"kernel:open{_SURROGATE}:denied": 3}}
        out.manifest = json.dumps(manifest).encode()

    report = sandbox.scan(path, runner=FakeRunner(plant))
    json.dumps(render_sarif([report]), ensure_ascii=False).encode()
    report.to_text().encode()
    assert _SURROGATE not in report.to_json().encode().decode("unicode_escape", "surrogatepass")
