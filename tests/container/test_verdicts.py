"""Verdicts that cannot be fooled (live payloads, harmless markers; each with a benign
counterpart that must stay clean).

The technique of each test is public: pickles that reach Python code execution through
standard-library callables no scanner lists (``timeit``), and side effects confined to the
sandbox's own scratch space that a plain ``torch.load`` would leave on the user's machine."""

from __future__ import annotations

import argparse
import collections
import shutil
import time
import timeit
from pathlib import Path

import torch

import sandbox
from tests import checkpoints as ck


def rules(report: sandbox.LoadReport) -> dict[str, sandbox.Finding]:
    return {f.rule: f for f in report.findings}


def test_code_run_through_an_unlisted_stdlib_callable_is_not_clean(tmp_path: Path) -> None:
    """``timeit.timeit(stmt)`` compiles and runs ``stmt``: arbitrary Python with no refused
    system call. The loader's audit hook reports the compile before it runs."""
    marker = tmp_path / "marker-timeit"
    stmt = f"open({str(marker)!r}, 'w').write('ran')"
    path = ck.save(ck.hostile_checkpoint(ck.Reduce(timeit.timeit, stmt, "pass", time.perf_counter, 1)),
                   tmp_path / "timeit.pt")
    ck.prove_live(path)
    assert marker.exists(), "the payload is not live"
    marker.unlink()
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


def test_a_file_written_in_the_sandbox_scratch_space_is_a_finding(tmp_path: Path) -> None:
    """``shutil.copyfile`` to /tmp succeeds inside the sandbox (its own tmpfs); a plain
    torch.load would have written on the user's machine."""
    target = tmp_path / "marker-copy"
    path = ck.save(ck.hostile_checkpoint(ck.Reduce(shutil.copyfile, "/etc/hostname", str(target))),
                   tmp_path / "copy.pt")
    ck.prove_live(path)
    assert target.exists(), "the payload is not live"
    target.unlink()
    report = sandbox.scan(path, policy=ck.observe_policy())
    assert not target.exists()
    writes = [f for f in report.findings if f.rule == "file-write"]
    assert writes and any(str(target) in str(f.evidence) for f in writes), report.findings
    assert report.verdict is not sandbox.Verdict.CLEAN


def test_benign_configs_stay_clean(tmp_path: Path) -> None:
    """What real checkpoints carry besides tensors: hyper-parameters, argparse namespaces,
    torch dtypes, counters; a pickled module and optimizer (torch imports submodules lazily
    while it loads them, generating code as it goes: not the file's code); plus a legacy tar
    (torch extracts it into a temporary directory of its own). (``functools.partial`` of an
    optimizer class is still flagged by the static scan: see the verdicts issue.)"""
    ckpt = {
        "state_dict": ck.state_dict(),
        "hyper_parameters": {"lr": 1e-3, "dtype": torch.float16, "layers": [4, 4],
                             "act": "gelu"},
        "args": argparse.Namespace(epochs=3, name="run"),
        "model": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()),
        "counts": collections.Counter(a=1),
        "epoch": 7,
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
    path = ck.save(ck.hostile_checkpoint(ck.code_payload(
        "blob = b'x' * 1_600_000_000\nresult = len(blob)")), tmp_path / "hog.pt")
    report = sandbox.scan(path, policy=ck.observe_policy())
    abuse = [f for f in report.findings if f.rule == "resource-abuse"]
    assert abuse and abuse[0].evidence["rss_peak_bytes"] > 1_500_000_000
    assert report.verdict is not sandbox.Verdict.CLEAN
    # a benign file of the same size is not
    benign = ck.save(ck.state_dict(), tmp_path / "benign.pt")
    assert not [f for f in sandbox.scan(benign).findings if f.rule == "resource-abuse"]
