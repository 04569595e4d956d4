"""The formats people still have on disk (issue 11, item 3), through the real sandbox:
sparse / quantized / nested tensors as components that ``safe_load`` reassembles, joblib
archives (plain and compressed), TorchScript archives; a hostile joblib file and a TorchScript
archive whose code reads a credential."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

import sandbox
from sandbox._worker import _protocol as P
from tests import checkpoints as ck

pytestmark = [
    pytest.mark.container,
    pytest.mark.usefixtures("sandbox_ready"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def assert_plain_readers_match(out: Path, expected: dict[str, np.ndarray]) -> dict[str, str]:
    """Every key and every byte of ``out`` as plain safetensors (torch and numpy) reads it,
    against the reference; returns the file's metadata."""
    as_torch, as_numpy = load_torch(out), load_numpy(out)
    assert sorted(as_torch) == sorted(expected) == sorted(as_numpy)
    for name, ref in expected.items():
        t, a = as_torch[name], as_numpy[name]
        assert a.dtype == ref.dtype and a.shape == ref.shape, name
        assert a.tobytes() == ref.tobytes(), name
        assert tuple(t.shape) == ref.shape and t.numpy().tobytes() == ref.tobytes(), name
    with safe_open(out, framework="pt") as f:
        meta: dict[str, str] = f.metadata()
    return meta


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.layout != b.layout or a.dtype != b.dtype or a.is_nested != b.is_nested:
        return False
    if b.is_nested:
        return all(torch.equal(x, y) for x, y in zip(a.unbind(), b.unbind(), strict=True))
    if b.is_quantized:
        if a.qscheme() != b.qscheme() or not torch.equal(a.int_repr(), b.int_repr()):
            return False
        if b.qscheme() == torch.per_tensor_affine:
            return a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
        return (
            torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
            and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
            and a.q_per_channel_axis() == b.q_per_channel_axis()
        )
    if b.layout == torch.sparse_coo:
        return (
            a.is_coalesced() == b.is_coalesced()
            and torch.equal(a._indices(), b._indices())
            and torch.equal(a._values(), b._values())
        )
    if b.layout != torch.strided:
        return torch.equal(a.to_dense(), b.to_dense())
    return torch.equal(a, b)


def test_sparse_quantized_nested_convert_to_components_and_safe_load_reassembles(tmp_path: Path) -> None:
    original = ck.composite_checkpoint()
    src = tmp_path / "composite.pt"
    torch.save(original, src)
    expected = ck.reference_components(src, "composite")
    out = tmp_path / "composite.safetensors"
    # every component is verified by the host's own reading of the file
    report = sandbox.convert(src, out)
    assert report.verdict is sandbox.Verdict.CLEAN
    assert not [f for f in report.findings if f.rule == "weights-unverified"]
    meta = assert_plain_readers_match(out, expected)
    recipes: dict[str, Any] = json.loads(meta["model_sandbox.composites"])
    assert sorted(recipes) == sorted(k for k in original if k != "plain")
    assert recipes["csr"]["kind"] == "sparse_csr" and recipes["csr"]["parts"] == {
        "crow_indices": "csr.crow_indices",
        "col_indices": "csr.col_indices",
        "values": "csr.values",
    }
    assert recipes["q_channel"]["params"] == {"axis": 0}
    assert recipes["q_tensor"]["params"] == {
        "scale": original["q_tensor"].q_scale(),
        "zero_point": original["q_tensor"].q_zero_point(),
    }
    # the recipes in the metadata rebuild every tensor from the file's components
    rebuilt = sandbox.load_composites(out)
    assert sorted(rebuilt) == sorted(recipes)
    for name, t in rebuilt.items():
        assert same_tensor(t, original[name]), name
    assert not [f for f in report.findings if f.rule == "unrepresentable-object"]

    loaded = sandbox.safe_load(src, weights_only=False)
    assert sorted(loaded) == sorted(original)
    for name, t in original.items():
        assert same_tensor(loaded[name], t), name


def test_jagged_nested_values_stay_unverified(tmp_path: Path) -> None:
    """A jagged nested tensor's values come through a tensor subclass's state, which the host's
    reading does not follow: unverified (MEDIUM), written only with ``allow_unverified``."""
    original = ck.jagged_checkpoint()["jagged"]
    src = tmp_path / "jagged.pt"
    torch.save({"jagged": original}, src)
    out = tmp_path / "jagged.safetensors"
    policy = ck.observe_policy()  # the static scan judges its torch._dynamo global dangerous
    with pytest.raises(sandbox.UnverifiedWeights) as info:
        sandbox.convert(src, out, policy=policy)
    assert info.value.names == ["jagged.values"] and not out.exists()
    report = sandbox.convert(src, out, policy=policy, allow_unverified=True)
    assert [f.evidence["tensors"] for f in report.findings if f.rule == "weights-unverified"] == [
        ["jagged.values"]
    ]
    plain = load_torch(out)
    assert sorted(plain) == ["jagged.offsets", "jagged.values"]
    assert torch.equal(plain["jagged.values"], original.values())
    assert torch.equal(plain["jagged.offsets"], original.offsets())
    got = sandbox.safe_load(src, weights_only=False, policy=policy)["jagged"]
    assert same_tensor(got, original)


@pytest.mark.parametrize(
    "compress", [0, ("zlib", 3), ("gzip", 3), ("lz4", 3)], ids=["plain", "zlib", "gzip", "lz4"]
)
def test_joblib_archives_convert_exactly(tmp_path: Path, compress: Any) -> None:
    src = ck.dump_joblib(tmp_path / "pipeline.joblib", compress)
    expected = ck.reference_components(src, "joblib")
    out = tmp_path / "pipeline.safetensors"
    report = sandbox.convert(src, out, policy=ck.observe_policy(fail_on="malicious"))
    assert report.format == "joblib" and report.static["format"] == "joblib"
    assert_plain_readers_match(out, expected)
    placeholders = [f for f in report.findings if f.rule == "unrepresentable-object"]
    assert [f.evidence["type"] for f in placeholders] == ["tests.checkpoints.Estimator"]
    assert not [f for f in report.findings if f.rule == "weights-unverified"]


def test_a_hostile_joblib_file_is_refused_and_its_payload_never_reaches_the_host(tmp_path: Path) -> None:
    marker = tmp_path / "marker-joblib"
    src = ck.dump_joblib(
        tmp_path / "hostile.joblib", ("zlib", 3), payload_code=f"open({str(marker)!r}, 'w').write('ran')"
    )
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-c", "import joblib, sys; joblib.load(sys.argv[1])", str(src)],
        check=True,
        timeout=120,
        cwd=Path(__file__).parent.parent.parent,
    )
    assert marker.exists(), "the payload is not live"
    marker.unlink()
    with pytest.raises(sandbox.SandboxViolation) as info:
        sandbox.convert(src, tmp_path / "hostile.safetensors")
    assert info.value.report is not None and info.value.report.verdict is sandbox.Verdict.MALICIOUS
    assert not (tmp_path / "hostile.safetensors").exists()
    # loaded anyway (a policy that always runs the sandbox): the payload runs inside only
    report = sandbox.scan(src, policy=ck.observe_policy())
    assert report.static["format"] == "joblib" and "builtins.eval" in report.static["dangerous"]
    assert report.verdict is sandbox.Verdict.MALICIOUS
    code = [f for f in report.findings if f.rule == "code-execution"]
    assert any(str(marker) in f.evidence.get("code", "") for f in code), report.findings
    assert any(f.rule == "file-write" and f.evidence.get("path") == str(marker) for f in report.findings)
    assert not marker.exists()


def test_torchscript_archives_convert_to_their_state_dict(tmp_path: Path) -> None:
    src = ck.save_torchscript(ck.TorchScriptNet(), tmp_path / "net.pt")
    expected = ck.reference_components(src, "torchscript")
    out = tmp_path / "net.safetensors"
    report = sandbox.convert(src, out)
    assert report.format == "torchscript" and report.verdict is sandbox.Verdict.CLEAN
    assert_plain_readers_match(out, expected)
    code = report.static["code_files"]
    assert code and all(c["name"].split("/")[1] == "code" and c["size"] > 0 for c in code)
    assert report.static["code_bytes"] == sum(c["size"] for c in code)
    assert any(c["name"].endswith(".py") for c in code)


def test_torchscript_code_that_reads_a_credential_is_caught(tmp_path: Path) -> None:
    own = tmp_path / "own-file"
    own.write_bytes(b"x")
    live = ck.save_torchscript(ck.TorchScriptProbe(str(own)), tmp_path / "live.pt")
    own.unlink()  # plain torch.jit.load runs the archive's code, which opens the file
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import torch, sys; torch.jit.load(sys.argv[1])", str(live)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and str(own) in proc.stderr, "the archive's code is not live"
    src = ck.save_torchscript(ck.TorchScriptProbe(P.CANARY_HOME + "/.aws/credentials"), tmp_path / "probe.pt")
    with pytest.raises(sandbox.SandboxViolation) as info:
        sandbox.convert(src, tmp_path / "probe.safetensors")
    report = info.value.report
    assert report is not None and report.verdict is sandbox.Verdict.MALICIOUS
    assert any(f.rule == "canary-file-read" for f in report.findings), [
        (f.rule, f.evidence) for f in report.findings
    ]
    assert not (tmp_path / "probe.safetensors").exists()
