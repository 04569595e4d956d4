"""Batch conversion without a daemon: the fake runner of tests/fakes.py plays the container."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sandbox import _api, _batch, _cli, _lock, _scan
from sandbox._batch import BatchOptions, Status, read_manifest, run_batch
from sandbox.errors import EngineUnavailable
from sandbox.report import Verdict
from tests import checkpoints as ck
from tests.fakes import Fake, FakeRunner, batch, by_rel, st_content, strip_times, tree


def test_tree_is_mirrored_with_odd_names_and_symlink_rules(tmp_path: Path) -> None:
    src, out = tree(tmp_path), tmp_path / "out"
    summary = batch(src, out)
    r = by_rel(summary)
    converted = {k for k, v in r.items() if v.status is Status.CONVERTED}
    assert converted == {
        "a/b/x.pt",
        "a/b/x.bin",
        "sp ace ü/modèle 1.ckpt",
        "legacy.pth",
        "no_extension",
        "inside-link.pt",
    }
    assert r["a/b/x.pt"].output == "a/b/x.pt.safetensors"  # colliding stems keep names
    assert r["a/b/x.bin"].output == "a/b/x.bin.safetensors"
    assert r["sp ace ü/modèle 1.ckpt"].output == "sp ace ü/modèle 1.safetensors"
    assert r["no_extension"].output == "no_extension.safetensors"
    got = load_file(str(out / "sp ace ü" / "modèle 1.safetensors"))
    assert torch.equal(got["w"], torch.zeros(3))
    assert torch.equal(
        load_file(str(out / "inside-link.safetensors"))["encoder.weight"], ck.state_dict()["encoder.weight"]
    )
    reasons = {k: v.reason for k, v in r.items() if v.status is Status.SKIPPED}
    assert reasons == {
        "notes.txt": "not a model file (content not recognised)",
        "empty.pt": "empty file",
        "done.safetensors": "already SafeTensors",
        "outside-link.pt": "symlink points outside its SRC directory (not followed)",
        "dir-link": "symlinked directory (not followed)",
        "broken-link.pt": "broken symlink",
    }
    assert not (out / "outside-link.safetensors").exists()
    assert summary.exit_code == 0 and summary.counts["clean"] == 6
    for v in r.values():
        if v.status is Status.CONVERTED:
            assert v.report is not None and (out / v.report).is_file()
            assert json.loads((out / v.report).read_text())["verdict"] == "clean"


def test_several_sources_and_globs(tmp_path: Path) -> None:
    src = tree(tmp_path)
    out = tmp_path / "out"
    single = tmp_path / "single.pt"
    ck.save(ck.state_dict(), single)
    summary = batch([src / "a", single], out, include=("*.pt",))
    assert {r.rel for r in summary.results} == {"a/b/x.pt", "single.pt"}
    assert summary.excluded == 1  # x.bin
    assert (out / "a" / "b" / "x.safetensors").is_file() and (out / "single.safetensors").is_file()
    summary = batch(src, tmp_path / "out2", exclude=("sp ace ü/*", "*.txt"))
    assert "notes.txt" not in by_rel(summary) and "sp ace ü/modèle 1.ckpt" not in by_rel(summary)


def test_duplicate_relative_paths_and_traversal_are_refused(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    ck.save(ck.state_dict(), tmp_path / "p" / "m.pt")
    ck.save(ck.state_dict(), tmp_path / "q" / "m.pt")
    with pytest.raises(_batch.BatchError, match="same relative path"):
        _batch.discover([tmp_path / "p" / "m.pt", tmp_path / "q" / "m.pt"])
    for bad in ("../x", "a/../../x", "/etc/x", "a//b", ""):
        with pytest.raises(_batch.BatchError, match="unsafe relative path"):
            _batch._safe_join(tmp_path, bad)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path / "q", out / "p")  # a planted symlink in OUTDIR is not written through
    with pytest.raises(_batch.BatchError, match="not a plain directory"):
        _batch._safe_join(out, "p/m.safetensors")


def test_resume_skips_done_and_redoes_changed_missing_corrupt(tmp_path: Path) -> None:
    src, out = tree(tmp_path), tmp_path / "out"
    first = batch(src, out)
    runner = Fake()
    second = batch(src, out, runner)
    assert runner.inputs == []  # nothing loaded again
    assert all(r.reused for r in second.results if r.status is not Status.SKIPPED)
    assert second.exit_code == 0 and second.counts["reused"] == 6

    ck.save({"w": torch.ones(5)}, src / "a" / "b" / "x.bin")  # changed input
    (out / "legacy.safetensors").unlink()  # deleted output
    with open(out / "no_extension.safetensors", "r+b") as f:  # corrupted output
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")
    (out / "sp ace ü" / "modèle 1.ckpt.report.json").unlink()  # deleted report
    runner = Fake()
    third = batch(src, out, runner)
    assert sorted(r.rel for r in third.results if not r.reused and r.status is Status.CONVERTED) == [
        "a/b/x.bin",
        "legacy.pth",
        "no_extension",
        "sp ace ü/modèle 1.ckpt",
    ]
    assert torch.equal(load_file(str(out / "a/b/x.bin.safetensors"))["w"], torch.ones(5))
    assert len(runner.inputs) == 4

    runner = Fake()
    forced = batch(src, out, runner, force=True)
    assert len(runner.inputs) == 6 and not any(r.reused for r in forced.results)
    assert set(read_manifest(out)) == {r.rel for r in first.results}


def test_changed_policy_redoes_everything(tmp_path: Path) -> None:
    src, out = tree(tmp_path), tmp_path / "out"
    batch(src, out)
    runner = Fake()
    batch(src, out, runner, policy=_cli._policy("strict"))
    assert len(runner.inputs) == 6


# Not compared: times, and the hashes of files that hold times (reports) or whose header order
# the safetensors library does not fix (outputs: their content is compared instead).


def test_manifest_survives_a_torn_last_line(tmp_path: Path) -> None:
    src, out = tree(tmp_path), tmp_path / "out"
    batch(src, out)
    complete = read_manifest(out)
    path = out / _batch.MANIFEST_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    torn = json.loads(lines[-1])["rel"]
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # SIGKILL mid-write
    assert torn not in read_manifest(out) and len(read_manifest(out)) == len(complete) - 1
    runner = Fake()
    again = batch(src, out, runner)
    redone = [r.rel for r in again.results if not r.reused and r.status is not Status.SKIPPED]
    assert redone == ([torn] if complete[torn].status is not Status.SKIPPED else [])
    assert strip_times(read_manifest(out)) == strip_times(complete)
    assert path.read_bytes().endswith(b"\n")
    assert all(json.loads(line) for line in path.read_bytes().splitlines())


def test_failure_isolation_and_exit_codes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ck.save(ck.state_dict(), src / "good.pt")
    summary = batch(src, tmp_path / "o1")
    assert summary.exit_code == 0

    ck.save(ck.state_dict(), src / "evil.pt")
    summary = batch(src, tmp_path / "o2")
    r = by_rel(summary)
    assert r["evil.pt"].status is Status.REFUSED and r["evil.pt"].verdict is Verdict.MALICIOUS
    assert r["evil.pt"].top_finding is not None and "input-changed" in r["evil.pt"].top_finding
    assert not (tmp_path / "o2" / "evil.safetensors").exists()
    assert summary.exit_code == 1

    (src / "corrupt.pt").write_bytes(b"\x80\x04garbage")  # pickle, broken
    data = (src / "good.pt").read_bytes()
    (src / "truncated.pt").write_bytes(data[: len(data) // 2])  # zip without directory
    runner = Fake()
    summary = batch(src, tmp_path / "o3", runner)
    r = by_rel(summary)
    assert r["good.pt"].status is Status.CONVERTED
    assert r["corrupt.pt"].status is Status.FAILED and r["corrupt.pt"].verdict is Verdict.ERROR
    assert r["truncated.pt"].reference == "malformed-input"
    assert "truncated.pt" not in runner.inputs  # refused statically
    assert summary.exit_code == 2
    assert [p.rel for p in summary.problems] == ["corrupt.pt", "truncated.pt", "evil.pt"]
    report = json.loads((tmp_path / "o3" / "truncated.pt.report.json").read_text())
    assert report["error"]["reference"] == "malformed-input" and report["verdict"] == "error"


def test_unreadable_and_unexpected_errors_stay_with_their_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ck.save(ck.state_dict(), src / "good.pt")
    ck.save(ck.state_dict(), src / "unreadable.pt")
    ck.save(ck.state_dict(), src / "buggy.pt")
    real_identify = _scan.identify

    def identify(path: str | os.PathLike[str]) -> str:
        if os.fspath(path).endswith("unreadable.pt"):
            raise PermissionError(13, "Permission denied")
        return real_identify(path)

    real_convert = _api.convert

    def convert(src_: Any, dst: Any, **kw: Any) -> Any:
        if os.fspath(src_).endswith("buggy.pt"):
            raise RuntimeError("boom")
        return real_convert(src_, dst, **kw)

    monkeypatch.setattr(_scan, "identify", identify)
    monkeypatch.setattr(_api, "convert", convert)
    summary = batch(src, tmp_path / "out")
    r = by_rel(summary)
    assert r["good.pt"].status is Status.CONVERTED
    assert r["unreadable.pt"].reference == "input-unreadable"
    assert r["buggy.pt"].reference == "internal-error" and "boom" in (r["buggy.pt"].reason or "")
    assert summary.exit_code == 2


class GoneRunner(FakeRunner):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def ensure_image(self) -> str:
        self.calls += 1
        raise EngineUnavailable("no Docker engine is reachable: connection refused")


def test_engine_gone_is_retried_then_stops_resumably(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        ck.save({"w": torch.full((2,), float(i))}, src / f"m{i}.pt")
    out = tmp_path / "out"
    gone = GoneRunner()
    summary = run_batch([src], out, BatchOptions(jobs=1, retries=2, backoff_s=0.01), runner=gone)
    assert summary.stopped is not None and "engine-unavailable" in summary.stopped
    assert summary.exit_code == 2
    # the first file: 1 try + 2 retries, then stop; the next file may have started meanwhile
    assert gone.calls in (3, 4)
    assert sorted(summary.not_done) == [f"m{i}.pt" for i in range(4)]
    assert read_manifest(out) == {}  # nothing recorded for an engine problem
    summary = batch(src, out)
    assert summary.exit_code == 0 and summary.counts["clean"] == 4


def test_interrupt_keeps_finished_work_and_resume_matches_a_clean_run(tmp_path: Path) -> None:
    src = tree(tmp_path)
    reference_out = tmp_path / "ref"
    batch(src, reference_out)
    out = tmp_path / "out"

    def interrupt(p: _batch.BatchProgress) -> None:
        if p.done >= 2:
            raise KeyboardInterrupt

    summary = run_batch([src], out, BatchOptions(jobs=1), runner=Fake(), progress=interrupt)
    assert summary.interrupted and summary.not_done
    assert 2 <= len(read_manifest(out)) < len(read_manifest(reference_out))
    # a stale temporary file as a SIGKILL during an atomic write leaves it
    (out / ".legacy.safetensors.abcd1234.tmp").write_bytes(b"half")
    batch(src, out)
    assert strip_times(read_manifest(out)) == strip_times(read_manifest(reference_out))
    files = {p.relative_to(out) for p in out.rglob("*")}
    assert files == {p.relative_to(reference_out) for p in reference_out.rglob("*")}
    for rel in files:
        if rel.suffix == ".safetensors":
            assert st_content(out / rel) == st_content(reference_out / rel)


def test_pins_and_lock_refuse_before_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ck.save(ck.state_dict(), src / "good.pt")
    ck.save({"w": torch.ones(2)}, src / "swapped.pt")
    (src / "odd\nname.pt").write_bytes((src / "good.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    lock_text = _lock.render_lock(_lock.lock_entries(["src"]))
    assert "\\" in lock_text.splitlines()[-1] or "\\" in lock_text  # the newline is escaped
    pins = _lock.parse_lock(lock_text)
    ck.save({"w": torch.zeros(2)}, src / "swapped.pt")  # changed after locking
    ck.save(ck.state_dict(), src / "new.pt")  # not in the lock
    opened: list[str] = []
    real_identify = _scan.identify

    def identify(path: str | os.PathLike[str]) -> str:
        opened.append(os.path.basename(os.fspath(path)))
        return real_identify(path)

    monkeypatch.setattr(_scan, "identify", identify)
    runner = Fake()
    summary = batch(Path("src"), tmp_path / "out", runner, pins=pins, require_pins=True)
    r = by_rel(summary)
    assert r["good.pt"].status is Status.CONVERTED and r["odd\nname.pt"].status is Status.CONVERTED
    assert r["swapped.pt"].reference == "hash-mismatch" and r["new.pt"].reference == "not-pinned"
    assert sorted(runner.inputs) == ["good.pt", "odd\nname.pt"]  # the sandbox never saw the others
    assert summary.exit_code == 2

    # --expect-sha256 FILE:HEX on its own (no lock): only pinned files are checked
    good_sha = pins[str(src / "good.pt")]
    runner = Fake()
    summary = batch(
        src, tmp_path / "out2", runner, pins={str(src / "good.pt"): good_sha, str(src / "new.pt"): "0" * 64}
    )
    r = by_rel(summary)
    assert r["good.pt"].status is Status.CONVERTED and r["swapped.pt"].status is Status.CONVERTED
    assert r["new.pt"].reference == "hash-mismatch" and "new.pt" not in runner.inputs


class SweepingFake(Fake):
    def sweep(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_a_batch_pool_starts_no_more_sandboxes_than_files() -> None:
    small = _batch._LabelledRunner("b", jobs=4, files=1)
    assert (small.pool.size, small.pool.limit) == (1, 1)
    big = _batch._LabelledRunner("b", jobs=2, files=10)
    assert (big.pool.size, big.pool.limit) == (2, 10)


def test_cli_batch_formats_and_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made: list[tuple[int, int | None]] = []

    def labelled(
        batch_id: str, jobs: int, policy: object, runner: object = None, files: int | None = None
    ) -> Fake:
        made.append((jobs, files))
        return SweepingFake()

    monkeypatch.setattr(_batch, "_LabelledRunner", labelled)
    src = tmp_path / "src"
    src.mkdir()
    ck.save(ck.state_dict(), src / "good.pt")
    (src / "readme.md").write_text("hi")
    out = tmp_path / "out"
    assert _cli.main(["convert", str(src), "-o", str(out), "--format", "json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert isinstance(reports, list) and [r["verdict"] for r in reports] == ["clean"]
    # the batch's pool starts no more sandboxes ahead than the files it found (the readme is
    # one until its content is read)
    assert made[-1][1] == 2

    ck.save(ck.state_dict(), src / "evil.pt")
    code = _cli.main(["convert", str(src), "-o", str(out), "--report-dir", str(tmp_path / "rep")])
    text = capsys.readouterr().out
    assert code == 1
    assert "MALICIOUS  evil.pt" in text and "readme.md: not a model file" in text
    assert "1 unchanged since the last run" not in text  # --report-dir moved the reports: redone
    assert (tmp_path / "rep" / "evil.pt.report.json").is_file()

    assert _cli.main(["convert", str(src), "-o", str(out), "--format", "sarif", "-q"]) == 1
    sarif = json.loads(capsys.readouterr().out)
    assert sarif["version"] == "2.1.0"
    assert any(r["ruleId"] == "input-changed" for r in sarif["runs"][0]["results"])

    sha = _batch.hash_input(str(src / "good.pt"), threading.Event())[0]
    code = _cli.main(
        [
            "convert",
            str(src),
            "-o",
            str(tmp_path / "o2"),
            "--quiet",
            "--expect-sha256",
            f"{src / 'good.pt'}:{'0' * 64}",
            "--expect-sha256",
            f"{src / 'evil.pt'}:{sha}",
        ]
    )
    text = capsys.readouterr().out
    assert code == 2 and "hash-mismatch" in text

    monkeypatch.chdir(tmp_path)
    assert _cli.main(["lock", "src"]) == 0
    lock = capsys.readouterr().out
    assert f"{sha}  src/good.pt" in lock and "readme" not in lock
    (tmp_path / "models.lock").write_text(lock)
    assert _cli.main(["convert", "src", "-o", "o3", "--lock", "models.lock", "-q"]) == 1
    capsys.readouterr()
    assert _cli.main(["bom", "o3", "-o", "bom.json"]) == 0
    bom = json.loads((tmp_path / "bom.json").read_text())
    assert [c["name"] for c in bom["components"]] == ["good.safetensors"]


def sharded_model(src: Path) -> dict[str, torch.Tensor]:
    """A transformers-style sharded .bin checkpoint: two shards, their index, a config."""
    torch.manual_seed(7)
    weights = {f"layer.{i}.weight": torch.randn(3, 4) for i in range(4)}
    weights["embed.weight"] = torch.randn(5, 4)
    names = sorted(weights)
    shards = {"pytorch_model-00001-of-00002.bin": names[:3], "pytorch_model-00002-of-00002.bin": names[3:]}
    src.mkdir(parents=True)
    for shard, keys in shards.items():
        torch.save({k: weights[k] for k in keys}, src / shard)
    (src / "pytorch_model.bin.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 0},
                "weight_map": {k: shard for shard, keys in shards.items() for k in keys},
            }
        )
    )
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 4}))
    return weights


def test_a_sharded_checkpoint_converts_to_a_sharded_safetensors_model(tmp_path: Path) -> None:
    weights = sharded_model(tmp_path / "src" / "toy")
    out = tmp_path / "out"
    summary = batch(tmp_path / "src", out)
    assert summary.exit_code == 0 and summary.index_problems == []
    assert summary.indexes == ["toy/model.safetensors.index.json"]
    model = out / "toy"
    assert sorted(p.name for p in model.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in weights.values())
    # what from_pretrained does with the index: every name from the shard the map names
    for name, t in weights.items():
        shard = load_file(model / index["weight_map"][name])
        assert torch.equal(shard[name], t), name
    assert json.loads((model / "config.json").read_text())["model_type"] == "toy"
    # a rerun reuses every shard and writes the same index
    again = batch(tmp_path / "src", out)
    assert all(r.reused for r in again.results if r.status is Status.CONVERTED)
    assert json.loads((model / "model.safetensors.index.json").read_text()) == index


def test_an_index_that_names_tensors_its_shards_lack_is_reported(tmp_path: Path) -> None:
    sharded_model(tmp_path / "src")
    index = tmp_path / "src" / "pytorch_model.bin.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = "pytorch_model-00001-of-00002.bin"
    index.write_text(json.dumps(doc))
    summary = batch(tmp_path / "src", tmp_path / "out")
    assert summary.indexes == [] and summary.exit_code == 2
    assert "ghost.weight" in summary.index_problems[0]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
