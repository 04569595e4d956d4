"""Benign checkpoints of every supported format, through the real sandbox: bit-exact round
trips through ``safe_load`` and ``convert``, and the same structure ``torch.load`` returns."""

from __future__ import annotations

import argparse
import collections
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sandbox
from tests import checkpoints as ck
from tests.checkpoints import assert_same


def reference_load(path: Path) -> Any:
    """What plain torch.load returns for a benign file (allowed in tests: the file is ours)."""
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_nested_structure_matches_torch_load(tmp_path: Path, fmt: str, each_runner: str) -> None:
    path = ck.save(ck.nested_checkpoint(), tmp_path / f"nested.{fmt}.pt", fmt)
    got = sandbox.safe_load(path, weights_only=False)
    expected = reference_load(path) if fmt != "pickle" else ck.nested_checkpoint()
    assert_same(got, expected)


def test_every_dtype_bit_exact(tmp_path: Path) -> None:
    data = {str(dt): ck.dtype_tensor(dt, seed=i) for i, dt in enumerate(ck.ALL_DTYPES)}
    data["scalar_bf16"] = torch.tensor(1.5, dtype=torch.bfloat16)
    data["zero_size"] = torch.empty(0, 3, dtype=torch.float16)
    path = ck.save(data, tmp_path / "dtypes.pt")
    got = sandbox.safe_load(path)
    assert_same(got, data)

    dst = tmp_path / "dtypes.safetensors"
    report = sandbox.convert(path, dst)
    assert report.verdict is sandbox.Verdict.CLEAN
    # the converted file reads back with the plain safetensors library; dtypes safetensors
    # lacks are stored as raw bytes and named in the metadata
    raw = load_file(dst)
    with safe_open(dst, framework="pt") as f:
        meta = f.metadata()
    raw_dtypes = json.loads(meta["model_sandbox.dtypes"])
    for name, t in data.items():
        if name in raw_dtypes:
            back = raw[name].view(getattr(torch, raw_dtypes[name])).reshape(t.shape)
        else:
            back = raw[name]
        assert_same(back, t, name)


def test_tied_weights_share_storage_on_the_host(tmp_path: Path) -> None:
    model = ck.TiedModel()
    path = ck.save(model.state_dict(), tmp_path / "tied.pt")
    got = sandbox.safe_load(path)
    assert_same(got, model.state_dict())
    assert got["embed.weight"].data_ptr() == got["head.weight"].data_ptr()
    got["embed.weight"][0, 0] = 42.0
    assert got["head.weight"][0, 0] == 42.0


def test_views_offsets_and_non_contiguous(tmp_path: Path) -> None:
    data = ck.views_checkpoint()
    path = ck.save(data, tmp_path / "views.pt")
    got = sandbox.safe_load(path)
    assert_same(got, data)
    base_ptr = got["base"].untyped_storage().data_ptr()
    for name in ("row_slice", "column", "transposed", "alias"):
        assert got[name].untyped_storage().data_ptr() == base_ptr, name
    assert got["column"].stride() == data["column"].stride()
    assert got["transposed"].stride() == data["transposed"].stride()

    # a plain state dict: taken through the layout hand-off, every view is a tensor of its own
    # in the converted file, readable by any SafeTensors reader
    dst = tmp_path / "views.safetensors"
    report = sandbox.convert(path, dst)
    assert report.resources["handoff"] == "layout"
    with safe_open(dst, framework="pt") as f:
        assert set(f.keys()) == set(data)
        for name, want in data.items():
            assert torch.equal(f.get_tensor(name), want), name
        assert json.loads(f.metadata()["model_sandbox.views"]) == []


def test_full_module_and_optimizer_come_back_as_state_dicts(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    path = ck.save({"model": model, "optimizer": opt.state_dict(), "opt_obj": opt}, tmp_path / "module.pt")
    got = sandbox.safe_load(path, weights_only=False)
    assert_same(got["model"], model.state_dict())
    assert_same(got["optimizer"], opt.state_dict())
    assert_same(got["opt_obj"], opt.state_dict())


def test_legacy_tar_format(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    path = tmp_path / "legacy.tar.pt"
    ck.write_legacy_tar(path, lambda ref: {"w": ref("w"), "b": ref("b"), "epoch": 9}, tensors)
    expected = reference_load(path)  # torch still reads the format: the fixture is faithful
    got = sandbox.safe_load(path, weights_only=False)
    assert_same(got, expected)
    assert sandbox.scan(path).format == "torch-tar"


def test_numpy_npy_and_npz(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.save(tmp_path / "a.npy", arr)
    assert_same(sandbox.safe_load(tmp_path / "a.npy"), arr)
    np.savez(tmp_path / "b.npz", x=arr, y=np.linspace(0, 1, 5))
    got = sandbox.safe_load(tmp_path / "b.npz")
    assert_same(got, {"x": arr, "y": np.linspace(0, 1, 5)})


def test_file_object_input(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(ck.state_dict(), buf)
    buf.seek(0)
    assert_same(sandbox.safe_load(buf), ck.state_dict())


def test_map_location_forms(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(2, 2)}
    path = tmp_path / "cuda.tar.pt"
    # a checkpoint saved on a GPU: its storages say "cuda:0"
    ck.write_legacy_tar(path, lambda ref: {"w": ref("w")}, tensors, location="cuda:0")
    for ml in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}, lambda storage, loc: storage):
        got = sandbox.safe_load(path, map_location=ml, weights_only=False)
        assert got["w"].device.type == "cpu"
        assert torch.equal(got["w"], tensors["w"])
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            sandbox.safe_load(path, weights_only=False)  # torch.load would try cuda:0 too


def test_convert_writes_atomically_with_report(tmp_path: Path, each_runner: str) -> None:
    path = ck.save(ck.nested_checkpoint(), tmp_path / "ckpt.pt")
    report = sandbox.convert(path)
    dst = tmp_path / "ckpt.safetensors"
    assert report.outputs["safetensors"] == str(dst)
    saved = json.loads(Path(str(dst) + ".report.json").read_text())
    assert saved["verdict"] == "clean" and saved["input_sha256"] == report.input_sha256
    # the report names the runner and what enforced each limit
    assert saved["tool"]["runner"] == report.tool["runner"] == each_runner
    enforced = saved["resources"]["limits_enforced_by"]
    assert ("rlimit RLIMIT_AS" if each_runner == "bwrap" else "control group") in enforced["memory"]
    flat = load_file(dst)
    assert torch.equal(flat["state_dict.encoder.weight"], ck.state_dict()["encoder.weight"])
    with safe_open(dst, framework="pt") as f:
        skeleton = json.loads(f.metadata()["model_sandbox.skeleton"])
    assert skeleton["$"] == "dict"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_weights_only_refuses_arbitrary_objects_but_named_placeholders_otherwise(tmp_path: Path) -> None:
    path = ck.save({"w": torch.ones(2), "obj": collections.Counter("abc")}, tmp_path / "obj.pt")
    got = sandbox.safe_load(path, weights_only=False)
    # Counter is a dict subclass: returned as a dict, with a note
    assert got["obj"] == {"a": 1, "b": 1, "c": 1}
    path2 = ck.save(
        {"w": torch.ones(2), "obj": ck.TiedModel().embed.__class__.__mro__[0]}, tmp_path / "cls.pt"
    )
    with pytest.raises(sandbox.UnrepresentableObject):
        sandbox.safe_load(path2)
    placeholder = sandbox.safe_load(path2, weights_only=False)["obj"]
    assert isinstance(placeholder, sandbox.Unrepresentable)
    assert placeholder.type_name == "builtins.type"


def test_patch_torch_routes_torch_load(tmp_path: Path) -> None:
    path = ck.save(ck.state_dict(), tmp_path / "sd.pt")
    original = torch.load
    with sandbox.patch_torch():
        assert torch.load is not original
        got = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.load is original
    assert_same(got, ck.state_dict())


def test_classes_missing_from_the_sandbox_still_yield_their_tensors(tmp_path: Path) -> None:
    """A full-module pickle of a project's own class, and a dict subclass from a package the
    sandbox lacks: torch.load would fail on the first missing global; we recover the data."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, types, collections, torch
        mod = types.ModuleType("myproject.models"); sys.modules["myproject"] = types.ModuleType("myproject")
        sys.modules["myproject.models"] = mod
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(3, 2)
                self.register_buffer("scale", torch.full((2,), 0.5))
        class AttributeDict(dict):
            pass
        Net.__module__ = AttributeDict.__module__ = "myproject.models"
        mod.Net, mod.AttributeDict = Net, AttributeDict
        torch.manual_seed(0)
        net = Net()
        hp = AttributeDict(lr=0.1, layers=[3, 2])
        torch.save({{"model": net, "hparams": hp, "ref": net.state_dict()}}, {str(tmp_path / "missing.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    got = sandbox.safe_load(tmp_path / "missing.pt", weights_only=False)
    assert list(got["model"]) == list(got["ref"]) == ["scale", "fc.weight", "fc.bias"]
    for k in got["model"]:
        assert torch.equal(got["model"][k], got["ref"][k])
    assert got["hparams"] == {"lr": 0.1, "layers": [3, 2]}
    report = sandbox.scan(tmp_path / "missing.pt")
    assert report.verdict is sandbox.Verdict.CLEAN
    assert any("myproject.models.Net" in n for n in report.notes)


def test_conversion_is_deterministic(tmp_path: Path) -> None:
    path = ck.save(ck.nested_checkpoint(), tmp_path / "ckpt.pt")
    a = sandbox.convert(path, tmp_path / "a.safetensors")
    b = sandbox.convert(path, tmp_path / "b.safetensors")
    assert a.outputs["safetensors_sha256"] == b.outputs["safetensors_sha256"]
    assert load_file(tmp_path / "a.safetensors").keys() == load_file(tmp_path / "b.safetensors").keys()


def test_mmap_returns_tensors_backed_by_a_private_mapping(tmp_path: Path) -> None:
    data = {str(dt): ck.dtype_tensor(dt, seed=i) for i, dt in enumerate(ck.ALL_DTYPES)}
    data["views"] = ck.views_checkpoint()  # type: ignore[assignment]
    path = ck.save(data, tmp_path / "mm.pt")
    before = path.read_bytes()
    got = sandbox.safe_load(path, mmap=True)
    assert_same(got, data)
    # the file's own tensors are mapped from the host's input, not copied (a tensor laid out
    # otherwise than row-major, views.lonely_t, crosses row-major and is laid out again)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps
    got["torch.float32"][0, 0] = 123.0  # private: writable, and it never reaches a file
    assert got["torch.float32"][0, 0] == 123.0
    assert path.read_bytes() == before


def _bits(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


@pytest.mark.parametrize("handoff", ["layout", "memfd"])
def test_converted_files_are_complete_for_plain_readers(tmp_path: Path, handoff: str) -> None:
    """Every key of the original state dict is a tensor of its own in the converted file, with
    its shape, dtype and bytes: tied weights (one tensor under two names), views of one
    storage, a non-contiguous column, float8 variants safetensors reads natively. Read back
    with safetensors' torch and numpy readers, compared with torch.load of the same file."""
    from safetensors.numpy import load_file as load_numpy

    torch.manual_seed(5)
    embed = torch.randn(6, 4)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd: dict[str, Any] = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: one tensor
        "base": base,
        "rows": base[1:3],
        "column": base[:, 2],  # views of one storage
    }
    if handoff == "memfd":  # (the torch-free layout reader takes the common dtypes only)
        sd["f8a"] = torch.randn(5).to(torch.float8_e4m3fnuz)
        sd["f8b"] = torch.randn(5).to(torch.float8_e5m2fnuz)
    obj: Any = sd if handoff == "layout" else {"sd": sd, "args": argparse.Namespace(lr=0.1)}
    path = ck.save(obj, tmp_path / "ckpt.pt")
    dst = tmp_path / "ckpt.safetensors"
    report = sandbox.convert(path, dst)
    assert report.resources["handoff"] == handoff
    original = torch.load(path, weights_only=False)  # our own benign fixture
    want = original if handoff == "layout" else {f"sd.{k}": v for k, v in original["sd"].items()}
    got = load_file(dst)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert _bits(got[name]) == _bits(t), name
    with safe_open(dst, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model_sandbox.dtypes"]) == {}  # both float8 variants are native
    ties = json.loads(meta["model_sandbox.ties"])
    prefix = "" if handoff == "layout" else "sd."
    assert ties == {f"{prefix}lm_head.weight": f"{prefix}embed.weight"}
    plain = {k: v for k, v in want.items() if not k.endswith(("f8a", "f8b"))}
    dst_np = tmp_path / "plain.safetensors"
    sandbox.convert(
        ck.save(
            plain
            if handoff == "layout"
            else {"sd": {k.removeprefix("sd."): v for k, v in plain.items()}, "args": argparse.Namespace()},
            tmp_path / "plain.pt",
        ),
        dst_np,
    )
    arrays = load_numpy(dst_np)
    assert set(arrays) == set(plain)
    for name, t in plain.items():
        assert arrays[name].tobytes() == _bits(t), name


def test_a_full_loads_untouched_tensors_come_from_the_hosts_own_input(
    tmp_path: Path, each_runner: str
) -> None:
    """A checkpoint that needs the full loader: the tensors its load leaves as the file's own
    bytes are named by their span in the input, and the host reads them from its own
    descriptor (none of their bytes crosses); every dtype comes back bit-exact, in memory of
    the host's own (not the file's pages), and converts to the same tensors."""
    data = {str(dt): ck.dtype_tensor(dt, seed=i) for i, dt in enumerate(ck.ALL_DTYPES)}
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    path = ck.save({"model": model, "data": data}, tmp_path / "full.pt")
    before = path.read_bytes()
    got = sandbox.safe_load(path, weights_only=False)
    assert_same(got, {"model": model.state_dict(), "data": data})
    for t in got["data"].values():
        t.zero_()
    assert path.read_bytes() == before
    dst = tmp_path / "full.safetensors"
    report = sandbox.convert(path, dst)
    assert report.resources["handoff"] == "memfd" and report.tool["runner"] == each_runner
    assert report.resources["tensors_from_input"] == len(data) + 4, report.resources
    written = load_file(dst)
    for name, t in {
        **{f"data.{k}": v for k, v in data.items()},
        "model.0.weight": model.state_dict()["0.weight"],
    }.items():
        assert _bits(written[name]) == _bits(t), name
