"""joblib, TorchScript and composite tensors without a container: the static scan of compressed joblib files
(bounded inflation, inline arrays hashed for verification), the worker's identification, the
composite tensors' round trip through the skeleton, and refusals of tampered recipes."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
import torch

import sandbox
from sandbox import _convert, _scan, _verify
from sandbox._worker import _loader
from sandbox._worker._extract import extract
from tests import checkpoints as ck

COMPRESSIONS = [0, ("zlib", 3), ("gzip", 3), ("lz4", 3), ("bz2", 3), ("xz", 3)]


@pytest.mark.parametrize("compress", COMPRESSIONS, ids=lambda c: c[0] if c else "plain")
def test_joblib_files_are_identified_and_their_arrays_read_by_the_host(tmp_path: Path, compress: Any) -> None:
    obj = ck.joblib_pipeline()  # what the subprocess dumps (the arrays are deterministic)
    path = ck.dump_joblib(tmp_path / "p.joblib", compress)
    assert _scan.identify(path) == "joblib"
    assert _loader.identify(str(path)) == "joblib"
    st = _scan.scan_file(path)
    assert st.format == "joblib" and [f.rule for f in st.findings] == ["unknown-global"]  # Estimator
    arrays = ck.joblib_components(obj)
    assert sorted(a.sha256 for a in st.joblib_arrays) == sorted(
        hashlib.sha256(a.tobytes()).hexdigest() for a in arrays.values()
    )
    inv = _verify.joblib_inventory(st)
    for a in arrays.values():
        t = torch.from_numpy(a)
        assert (str(t.dtype).removeprefix("torch."), tuple(t.shape), _convert.tensor_digest(t)) in inv.digests


def test_joblib_inflation_is_bounded(tmp_path: Path) -> None:
    """An lz4 bomb (a few MB that inflate to 600 MB) is read only up to the scan's bound."""
    path = tmp_path / "bomb.joblib"
    path.write_bytes(lz4.frame.compress(b"\x80\x04" + b"\x00" * (600 << 20)))
    st = _scan.scan_file(path, max_pickle_bytes=1 << 20)
    assert st.format == "joblib"
    assert any(f.rule == "scan-limit-exceeded" for f in st.findings)


def test_fortran_ordered_joblib_arrays_stay_unverified(tmp_path: Path) -> None:
    st = _scan.scan_file(ck.dump_joblib(tmp_path / "f.joblib"))
    fortran = [dataclasses.replace(a, fortran=True) for a in st.joblib_arrays]
    assert _verify.joblib_inventory(dataclasses.replace(st, joblib_arrays=tuple(fortran))).digests == {
        ("int64", (3,), fortran[1].sha256)
    }


def test_composites_cross_as_components_and_are_reassembled() -> None:
    original = ck.composite_checkpoint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = extract(original)
    assert sorted(ex.stored) == sorted(ck.composite_components(original))
    assert not ex.unrepresentable
    for name, t in ck.composite_components(original).items():
        assert torch.equal(ex.stored[name], t), name
    rebuilt = _convert.rebuild(ex.skeleton, ex.stored, weights_only=True)
    for name, t in original.items():
        got = rebuilt[name]
        assert got.layout == t.layout and got.dtype == t.dtype, name
        if t.is_nested:
            assert all(torch.equal(a, b) for a, b in zip(got.unbind(), t.unbind(), strict=True))
        elif t.is_quantized:
            assert torch.equal(got.dequantize(), t.dequantize()) and got.qscheme() == t.qscheme()
        else:
            assert torch.equal(got.to_dense(), t.to_dense()), name
    assert set(_convert.composites(ex.skeleton)) == set(original) - {"plain"}


def test_load_composites_reads_a_converted_file_and_checks_its_recipes(tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    original = ck.composite_checkpoint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = extract(original)
    recipes = _convert.composites(ex.skeleton)
    path = tmp_path / "c.safetensors"
    stored = {k: v.contiguous() for k, v in ex.stored.items()}
    save_file(stored, str(path), metadata={"model_sandbox.composites": json.dumps(recipes)})
    got = sandbox.load_composites(path)
    assert sorted(got) == sorted(recipes)
    assert torch.equal(got["csr"].to_dense(), original["csr"].to_dense())
    assert torch.equal(got["q_channel"].int_repr(), original["q_channel"].int_repr())
    recipes["coo"]["parts"]["values"] = "no-such-tensor"
    save_file(stored, str(path), metadata={"model_sandbox.composites": json.dumps(recipes)})
    with pytest.raises(sandbox.OutputRejected):
        sandbox.load_composites(path)
    save_file(stored, str(path), metadata={"model_sandbox.composites": "[1, 2]"})
    with pytest.raises(sandbox.OutputRejected):
        sandbox.load_composites(path)


def test_kinds_without_a_recipe_are_placeholders() -> None:
    q = torch.quantize_per_channel(
        torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0.0, 1.0]), 0, torch.quint8
    )  # float qparams
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        holes = torch.nested.nested_tensor_from_jagged(  # a jagged tensor with lengths
            torch.randn(6, 3), torch.tensor([0, 2, 6]), lengths=torch.tensor([1, 3])
        )
    ex = extract({"q": q, "meta": torch.empty(2, device="meta"), "holes": holes})
    assert sorted(u["path"] for u in ex.unrepresentable) == ["root['holes']", "root['meta']", "root['q']"]
    with pytest.raises(sandbox.UnrepresentableObject):
        _convert.rebuild(ex.skeleton, ex.stored, weights_only=True)


def test_a_tampered_composite_recipe_is_rejected() -> None:
    """The recipe is untrusted: out-of-bounds sparse indices, quantization parameters that do
    not fit the data, nested pieces outside their buffer and unknown kinds are refused."""
    bad: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = [
        (
            {"kind": "sparse_coo", "dtype": "float32", "shape": [3], "params": {"coalesced": False}},
            {"indices": torch.tensor([[0, 9]]), "values": torch.tensor([1.0, 2.0])},
        ),
        (
            {"kind": "sparse_coo", "dtype": "float32", "shape": [3], "params": {"coalesced": True}},
            {"indices": torch.tensor([[2, 0]]), "values": torch.tensor([1.0, 2.0])},
        ),
        (
            {"kind": "sparse_csr", "dtype": "float32", "shape": [2, 2], "params": {}},
            {
                "crow_indices": torch.tensor([0, 5, 1]),
                "col_indices": torch.tensor([0]),
                "values": torch.tensor([1.0]),
            },
        ),
        (
            {"kind": "quantized_per_channel", "dtype": "qint8", "shape": [3, 4], "params": {"axis": 0}},
            {
                "int_repr": torch.zeros(3, 4, dtype=torch.int8),
                "scales": torch.ones(2, dtype=torch.float64),
                "zero_points": torch.zeros(2, dtype=torch.int64),
            },
        ),
        (
            {
                "kind": "quantized_per_tensor",
                "dtype": "qint8",
                "shape": [2],
                "params": {"scale": float("nan"), "zero_point": 0},
            },
            {"int_repr": torch.zeros(2, dtype=torch.int8)},
        ),
        (
            {"kind": "nested", "dtype": "float32", "shape": None, "params": {}},
            {
                "values": torch.zeros(4),
                "sizes": torch.tensor([[2, 3]]),
                "strides": torch.tensor([[3, 1]]),
                "storage_offsets": torch.tensor([0]),
            },
        ),
        (
            {"kind": "nested_jagged", "dtype": "float32", "shape": None, "params": {"ragged_idx": 1}},
            {"values": torch.zeros(2, 3), "offsets": torch.tensor([0, 5])},
        ),
        ({"kind": "no-such-kind", "dtype": "float32", "shape": [1], "params": {}}, {}),
        (
            {"kind": "sparse_coo", "dtype": "float32", "shape": [3], "params": {"coalesced": False}},
            {"indices": torch.tensor([[0]]), "values": torch.tensor([1.0]), "extra": torch.ones(1)},
        ),
    ]
    for recipe, parts in bad:
        with pytest.raises(sandbox.OutputRejected):
            _convert.assemble(dict(recipe), parts)


def test_torchscript_static_stage_lists_the_code_and_reads_its_own_names(tmp_path: Path) -> None:
    path = ck.save_torchscript(ck.TorchScriptNet(), tmp_path / "net.pt")
    report = sandbox.scan(path, dynamic=False)
    assert report.verdict is sandbox.Verdict.CLEAN
    assert {f.severity for f in report.findings} <= {sandbox.Severity.INFO}
    names = [c["name"] for c in report.static["code_files"]]
    assert "net/code/__torch__/tests/checkpoints.py" in names
    assert report.static["code_bytes"] == sum(c["size"] for c in report.static["code_files"])


def test_the_loader_calls_only_an_uncompressed_tar_a_torch_tar(tmp_path: Path) -> None:
    """torch.load tries ``tarfile.open(mode="r:")``: an uncompressed tar only. The loader's
    ``tarfile.is_tarfile`` also took a gzip-compressed one, which torch never reads as a tar."""
    import io
    import tarfile

    def tar(mode: str) -> Path:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:  # type: ignore[call-overload]
            info = tarfile.TarInfo("sys_info")
            info.size = 5
            t.addfile(info, io.BytesIO(b"hello"))
        path = tmp_path / f"t.{mode.replace(':', '')}"
        path.write_bytes(buf.getvalue())
        return path

    assert _loader.identify(str(tar("w"))) == "torch-tar"
    for mode in ("w:gz", "w:bz2", "w:xz"):
        assert _loader.identify(str(tar(mode))) != "torch-tar", mode
