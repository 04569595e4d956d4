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
