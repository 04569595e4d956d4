"""Verdicts that cannot be fooled (live payloads, harmless markers; each with a benign
counterpart that must stay clean).

The technique of each test is public: pickles that reach Python code execution through
standard-library callables no scanner lists (``timeit``), and side effects confined to the
sandbox's own scratch space that a plain ``torch.load`` would leave on the user's machine."""

from __future__ import annotations

import argparse
import collections
import functools
import operator
import shutil
import time
import timeit
from pathlib import Path

import pytest
import torch

import sandbox
from tests import checkpoints as ck


def rules(report: sandbox.LoadReport) -> dict[str, sandbox.Finding]:
    return {f.rule: f for f in report.findings}


def test_code_run_through_an_unlisted_stdlib_callable_is_not_clean(tmp_path: Path, each_runner: str) -> None:
    """``timeit.timeit(stmt)`` compiles and runs ``stmt``: arbitrary Python with no refused
    system call. The loader's audit hook reports the compile before it runs."""
    marker = tmp_path / "marker-timeit"
    stmt = f"open({str(marker)!r}, 'w').write('ran')"
    path = ck.save(
        ck.hostile_checkpoint(ck.Reduce(timeit.timeit, stmt, "pass", time.perf_counter, 1)),
        tmp_path / "timeit.pt",
    )
    ck.prove_marker(path, marker)
    report = sandbox.scan(path, policy=ck.observe_policy())
    assert not marker.exists()
    code = [f for f in report.findings if f.rule == "code-execution"]
    assert code, [f.rule for f in report.findings]
    assert all(f.severity >= sandbox.Severity.HIGH for f in code)
    assert all(f.evidence["source"] == "self_reported" for f in code)
    first = code[0] if "possibly_forged" not in code[0].evidence else code[-1]
    assert "possibly_forged" not in first.evidence  # the first one left before the code ran
    assert any(str(marker) in f.evidence.get("code", "") for f in code)
    assert report.verdict is sandbox.Verdict.MALICIOUS and report.exit_code == 1


def test_a_file_written_in_the_sandbox_scratch_space_is_a_finding(tmp_path: Path, each_runner: str) -> None:
    """``shutil.copyfile`` to /tmp succeeds inside the sandbox (its own tmpfs); a plain
    torch.load would have written on the user's machine."""
    target = tmp_path / "marker-copy"
    path = ck.save(
        ck.hostile_checkpoint(ck.Reduce(shutil.copyfile, "/etc/hostname", str(target))), tmp_path / "copy.pt"
    )
    ck.prove_marker(path, target)
    report = sandbox.scan(path, policy=ck.observe_policy())
    assert not target.exists()
    writes = [f for f in report.findings if f.rule == "file-write"]
    assert writes and any(str(target) in str(f.evidence) for f in writes), report.findings
    assert report.verdict is not sandbox.Verdict.CLEAN


def test_benign_configs_stay_clean(tmp_path: Path) -> None:
    """What real checkpoints carry besides tensors: hyper-parameters, argparse namespaces,
    torch dtypes, counters; a pickled module and optimizer (torch imports submodules lazily
    while it loads them, generating code as it goes: not the file's code); plus a legacy tar
    (torch extracts it into a temporary directory of its own); optimizer and scheduler
    classes and an activation bound with ``functools.partial``, as config systems store them."""
    ckpt = {
        "state_dict": ck.state_dict(),
        "hyper_parameters": {"lr": 1e-3, "dtype": torch.float16, "layers": [4, 4], "act": "gelu"},
        "args": argparse.Namespace(epochs=3, name="run"),
        "model": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()),
        "counts": collections.Counter(a=1),
        "epoch": 7,
        "optimizer_cls": functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.99)),
        "scheduler_cls": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5),
        "activation": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
    }
    path = ck.save(ckpt, tmp_path / "benign.pt")
    report = sandbox.scan(path)
    assert report.verdict is sandbox.Verdict.CLEAN, [(f.rule, f.message) for f in report.findings]
    legacy = ck.save(ck.state_dict(), tmp_path / "legacy.pt", fmt="legacy")
    assert sandbox.scan(legacy).verdict is sandbox.Verdict.CLEAN
    tar = tmp_path / "old.tar.pt"
    ck.write_legacy_tar(tar, lambda ref: {"w": ref("w"), "epoch": 9}, {"w": torch.ones(2)})
    report = sandbox.scan(tar)
    assert report.verdict is sandbox.Verdict.CLEAN, [(f.rule, f.message) for f in report.findings]


def test_looking_for_the_sandbox_is_recorded_and_nothing_tells_it_apart(tmp_path: Path) -> None:
    """A payload that stays quiet where it is watched defeats behaviour evidence: nothing cheap
    may tell the sandbox apart (hostname, home, environment), and the probes are findings."""
    code = """
import os, socket
seen = {"hostname": socket.gethostname(), "home": os.environ.get("HOME", "")}
for probe in ("/proc/self/mountinfo", "/proc/1/cgroup", "/.dockerenv"):
    try:
        seen[probe] = len(open(probe).read())
    except OSError:
        seen[probe] = None
result = seen
"""
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(code)), tmp_path / "probe.pt")
    first = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())["payload"]
    second = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())["payload"]
    for seen in (first, second):
        assert "sandbox" not in seen["hostname"] and "sandbox" not in seen["home"]
    assert first["hostname"] != second["hostname"] or first["hostname"] != "sandbox"
    report = sandbox.scan(path, policy=ck.observe_policy())
    probes = [f for f in report.findings if f.rule == "environment-probe"]
    assert probes and all(f.severity is sandbox.Severity.LOW for f in probes)


def test_a_tiny_file_that_allocates_gigabytes_is_a_finding(tmp_path: Path) -> None:
    path = ck.save(
        ck.hostile_checkpoint(ck.code_payload("blob = b'x' * 1_600_000_000\nresult = len(blob)")),
        tmp_path / "hog.pt",
    )
    report = sandbox.scan(path, policy=ck.observe_policy())
    abuse = [f for f in report.findings if f.rule == "resource-abuse"]
    assert abuse and abuse[0].evidence["rss_peak_bytes"] > 1_500_000_000
    assert report.verdict is not sandbox.Verdict.CLEAN
    # a benign file of the same size is not
    benign = ck.save(ck.state_dict(), tmp_path / "benign.pt")
    assert not [f for f in sandbox.scan(benign).findings if f.rule == "resource-abuse"]


def sleepy_module_checkpoint(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A pickled module plus a state dict one of whose weights an ordinary torch function
    computes while it loads (Sleepy Pickle through ``torch.nn.functional.normalize``, a global
    no scanner lists as dangerous); returns the file and the weight a plain load gives."""
    torch.manual_seed(3)
    sd = ck.state_dict()
    stored = sd["encoder.weight"].clone()
    poisoned = collections.OrderedDict(sd)
    poisoned["encoder.weight"] = ck.Reduce(torch.nn.functional.normalize, stored)  # type: ignore[assignment]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    return (
        ck.save({"model": model, "state_dict": poisoned}, tmp_path / "sleepy.pt"),
        torch.nn.functional.normalize(stored),
    )


def test_weights_computed_while_loading_are_refused_under_weights_only(tmp_path: Path) -> None:
    """A module checkpoint has no plain reading; the host's general reading of its pickle
    lists every tensor the file stores, and the computed one is not among them."""
    path, computed = sleepy_module_checkpoint(tmp_path)
    try:
        sandbox.safe_load(path)
    except sandbox.UnverifiedWeights as exc:
        assert exc.names == ["state_dict.encoder.weight"]
        assert rules(exc.report)["weights-unverified"].severity is sandbox.Severity.MEDIUM
        assert exc.report.verdict is sandbox.Verdict.SUSPICIOUS
    else:
        raise AssertionError("safe_load(weights_only=True) returned unverified weights")
    # asked for arbitrary objects, the caller gets what torch.load gives, with the finding
    got = sandbox.safe_load(path, weights_only=False)
    assert torch.equal(got["state_dict"]["encoder.weight"], computed)
    out = tmp_path / "out.safetensors"
    try:
        sandbox.convert(path, out)
    except sandbox.UnverifiedWeights:
        pass
    else:
        raise AssertionError("convert wrote unverified weights")
    assert not out.exists()


def test_module_optimizer_and_numpy_checkpoints_are_verified(tmp_path: Path) -> None:
    """The benign counterpart: every tensor of a pickled module, optimizer, and numpy arrays
    is found in the file's own records, so nothing is unverified and safe_load returns."""
    import numpy as np

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = ck.save(
        {"model": model, "optimizer": opt, "mean": np.arange(4, dtype=">f4"), "step": np.int64(9)},
        tmp_path / "full.pt",
    )
    report = sandbox.scan(path)
    assert "weights-unverified" not in rules(report), report.findings
    got = sandbox.safe_load(path)
    assert torch.equal(got["model"]["0.weight"], model[0].weight.detach())  # type: ignore[operator]
    assert np.array_equal(np.asarray(got["mean"]), np.arange(4, dtype=np.float32))


def test_a_small_zip_whose_record_inflates_far_is_not_clean(tmp_path: Path) -> None:
    """A ~1 MB torch zip whose storage record is deflated from 300 MB of zeros: the static
    scan reports the ratio from the zip headers without inflating anything, and the verdict is
    never clean, whatever the load does."""
    import zipfile

    small = ck.save({"w": torch.zeros(4)}, tmp_path / "small.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(zi, "w", force_zip64=True) as out:
                    for _ in range(300):
                        out.write(bytes(1 << 20))
            else:
                dst.writestr(info, src.read(info.filename))
    assert bomb.stat().st_size < 2 << 20
    report = sandbox.scan(bomb)
    abuse = [f for f in report.findings if f.rule == "resource-abuse"]
    assert abuse and abuse[0].evidence["ratio"] > 200, report.findings
    assert report.verdict is not sandbox.Verdict.CLEAN


class _Rearranged(dict):  # type: ignore[type-arg]
    """Unpickles as ``dict.update(sd, {a: sd[b], b: sd[a]})`` on the state dict itself: the
    loaded weights are all bytes the file stores, under swapped names."""

    def __init__(self, sd: dict[str, torch.Tensor], a: str, b: str) -> None:
        super().__init__()
        self.sd, self.a, self.b = sd, a, b

    def __reduce__(self) -> tuple[object, ...]:
        return (dict.update, (self.sd, {self.a: self.sd[self.b], self.b: self.sd[self.a]}))


def test_weights_rearranged_while_loading_are_tampered(tmp_path: Path) -> None:
    torch.manual_seed(6)
    sd = {"layer1.weight": torch.randn(3, 3), "layer2.weight": torch.randn(3, 3)}
    path = ck.save(
        {"state_dict": sd, "hook": _Rearranged(sd, "layer1.weight", "layer2.weight")},
        tmp_path / "rearranged.pt",
    )
    # the swap runs under plain torch.load (a benign payload: this process may load it)
    assert torch.equal(
        torch.load(path, weights_only=False)["state_dict"]["layer1.weight"], sd["layer2.weight"]
    )
    report = sandbox.scan(path, policy=ck.observe_policy())
    tampered = rules(report).get("weights-tampered")
    assert tampered is not None and tampered.severity is sandbox.Severity.HIGH, report.findings
    assert report.verdict is sandbox.Verdict.MALICIOUS
    out = tmp_path / "out.safetensors"
    with pytest.raises(sandbox.SandboxViolation):
        sandbox.convert(path, out)
    assert not out.exists()


def test_a_payload_that_drops_or_blanks_a_weight_is_tampered(tmp_path: Path) -> None:
    """The load deletes one weight from the state dict and puts a meta tensor (no data) in
    another's place: every byte that crosses is the file's, yet the model would run on
    whatever fills the gaps. Both are weights-tampered, each with what took its place."""
    torch.manual_seed(11)
    sd = {k: torch.randn(8, 8) for k in ("a", "b", "c")}
    obj = {
        "state_dict": sd,
        "model": torch.nn.Linear(2, 2),
        "drop": ck.Reduce(operator.delitem, sd, "b"),
        "blank": ck.Reduce(operator.setitem, sd, "a", torch.empty(8, 8, device="meta")),
    }
    path = ck.save(obj, tmp_path / "gaps.pt")
    got = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
    assert set(got["state_dict"]) == {"a", "c"} and torch.equal(got["state_dict"]["c"], sd["c"])
    out = tmp_path / "out.safetensors"
    with pytest.raises(sandbox.SandboxViolation) as exc:
        sandbox.convert(path, out, policy=ck.observe_policy(fail_on="malicious"))
    assert exc.value.report is not None
    tampered = rules(exc.value.report)["weights-tampered"]
    assert sorted((t["name"], t["actual"]) for t in tampered.evidence["tensors"]) == [
        ("state_dict.a", "opaque torch.Tensor"),
        ("state_dict.b", "nothing"),
    ]
    assert not out.exists()


def test_a_payload_that_forges_the_spans_it_names_gets_the_files_bytes_and_is_tampered(
    tmp_path: Path,
) -> None:
    """The payload controls the loader, so it can name any span of the input for any tensor:
    here it swaps the spans of two weights the file names, and changes a third in place (which
    the kernel's page map shows, so its changed bytes cross). The host returns the file's own
    bytes at each span named, and the verification calls all three tampered."""
    torch.manual_seed(8)
    # (16 KiB each; the spacer keeps b off the pages c shares with its neighbour)
    sd = {k: torch.randn(64, 64) for k in ("a", "b", "spacer", "c")}
    forge = (
        "import sys\n"
        "spans = next(m for k, m in sys.modules.items() if k.endswith('_worker._spans'))\n"
        "real = spans.file_spans\n"
        "def forged(stored, views, fd):\n"
        "    out = real(stored, views, fd)\n"
        "    a, b = 'state_dict.a', 'state_dict.b'\n"
        "    out[a], out[b] = out[b], out[a]\n"
        "    return out\n"
        "spans.file_spans = forged\n"
        "result = 'forged'\n"
    )
    obj = {
        "state_dict": sd,
        "model": torch.nn.Linear(2, 2),
        "payload": ck.code_payload(forge),
        "hook": ck.Reduce(operator.imul, sd["c"], 2.0),
    }
    path = ck.save(obj, tmp_path / "forged.pt")
    got = sandbox.safe_load(path, weights_only=False, policy=ck.observe_policy())
    assert got["payload"] == "forged"  # the payload ran, in the sandbox
    assert torch.equal(got["state_dict"]["a"], sd["b"]) and torch.equal(got["state_dict"]["b"], sd["a"])
    assert torch.equal(got["state_dict"]["c"], sd["c"] * 2.0)  # what the load made of it
    out = tmp_path / "out.safetensors"
    with pytest.raises(sandbox.SandboxViolation) as exc:  # the sandbox runs; the verdict refuses
        sandbox.convert(path, out, policy=ck.observe_policy(fail_on="malicious"))
    assert exc.value.report is not None
    tampered = rules(exc.value.report)["weights-tampered"]
    assert sorted(t["name"] for t in tampered.evidence["tensors"]) == [
        "state_dict.a",
        "state_dict.b",
        "state_dict.c",
    ]
    assert exc.value.report.resources["tensors_from_input"] >= 2
    assert not out.exists()
