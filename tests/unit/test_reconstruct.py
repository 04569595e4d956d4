"""Static reconstruction of plain state_dicts (sandbox._verify.reconstruct) and the weight-tamper check.

Every benign fixture is written with ``torch.save`` (or by hand for the legacy tar format) and
the reconstruction is held against ``torch.load`` of the same file, bit for bit, and against
what the host would read back from the sandbox (the worker's extractor + ``load_tensors``,
run here in-process on our own harmless files). Hostile fixtures carry only harmless payloads
(``torch.add``, a tensor's sign bit); they are loaded in-process only to play the sandbox.
"""

from __future__ import annotations

import collections
import hashlib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sandbox import _convert
from sandbox._verify.reconstruct import (
    NotReconstructed,
    Reconstruction,
    StaticTensor,
    compare,
    reconstruct,
    try_reconstruct,
)
from sandbox._worker import _protocol as P
from sandbox._worker._extract import extract
from sandbox.report import Severity
from tests.checkpoints import (
    ALL_DTYPES,
    Reduce,
    TiedModel,
    dtype_tensor,
    eval_payload,
    hostile_checkpoint,
    save,
    state_dict,
    views_checkpoint,
    write_legacy_tar,
)

# dtypes torch's legacy writer stores as UntypedStorage, which its legacy reader cannot load
UNTYPED_DTYPES = {
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def sandbox_tensors(obj: Any, tmp_path: Path) -> dict[str, torch.Tensor]:
    """What the host reads back from the sandbox for a loaded ``obj``: the worker's extractor,
    its safetensors file and the host's checked read-back."""
    ex = extract(obj)
    path = tmp_path / "handoff.safetensors"
    save_file(ex.stored, str(path))
    manifest = P.Manifest.from_obj(
        {"protocol": P.PROTOCOL_VERSION, "format": "torch-zip", "tensors": ex.entries, "views": ex.views}
    )
    return _convert.load_tensors(str(path), manifest)


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def loaded_by_name(obj: Any) -> dict[str, torch.Tensor]:
    """The torch.load result's tensors under the names the worker gives them (no copies)."""
    names: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: tuple[str, ...], seen: dict[int, str]) -> None:
        if isinstance(o, torch.Tensor):
            if id(o) not in seen:
                name = ".".join(path) if path else "tensor"
                seen[id(o)] = name
                names[name] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + (str(k),), seen)
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, path + (str(i),), seen)

    walk(obj, (), {})
    return names


def must_rebuild(path: Path, *, keep_data: bool = True) -> Reconstruction:
    result = try_reconstruct(path, keep_data=keep_data)
    assert isinstance(result, Reconstruction), result
    return result


def assert_matches_torch_load(path: Path, tmp_path: Path, *, weights_only: bool = True) -> Reconstruction:
    rec = must_rebuild(path)
    obj = torch.load(path, weights_only=weights_only)
    loaded = loaded_by_name(obj)
    assert list(rec.tensors) == list(loaded)
    for name, st in rec.tensors.items():
        t = loaded[name]
        assert st.dtype == str(t.dtype).removeprefix("torch."), name
        assert st.shape == tuple(t.shape), name
        assert st.stride == tuple(t.stride()), name
        assert st.offset == t.storage_offset(), name
        assert st.data == raw(t), name
        assert st.sha256 == hashlib.sha256(raw(t)).hexdigest(), name
        assert raw(st.to_torch()) == raw(t), name
    assert rec.findings == ()
    # and the sandbox's hand-off of the same object matches: no findings
    assert compare(rec, sandbox_tensors(obj, tmp_path)) == []
    return rec


def all_dtypes_dict(dtypes: list[torch.dtype]) -> collections.OrderedDict[str, torch.Tensor]:
    return collections.OrderedDict(
        (f"layer{i}.{str(d).removeprefix('torch.')}", dtype_tensor(d, (3, 5), seed=i))
        for i, d in enumerate(dtypes)
    )


def rewrite_zip(src: Path, dst: Path, change: dict[str, bytes]) -> None:
    """Copy a torch zip member by member (same order, stored), replacing some members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change.get(info.filename, zin.read(info.filename))
            zout.writestr(zipfile.ZipInfo(info.filename), data)


# ---------------------------------------------------------------------------------------------
# benign files: reconstruction == torch.load, bit for bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_every_dtype_is_rebuilt_bit_for_bit(fmt: str, tmp_path: Path) -> None:
    dtypes = ALL_DTYPES if fmt == "zip" else [d for d in ALL_DTYPES if d not in UNTYPED_DTYPES]
    path = save(all_dtypes_dict(dtypes), tmp_path / f"all.{fmt}.pt", fmt)
    rec = assert_matches_torch_load(path, tmp_path)
    assert rec.format == {"zip": "torch-zip", "legacy": "torch-legacy"}[fmt]
    assert len(rec.tensors) == len(dtypes)


def test_legacy_untyped_storage_is_not_compared(tmp_path: Path) -> None:
    # torch's own legacy reader fails on these files, so there is nothing to compare with
    path = save({"w": dtype_tensor(torch.float8_e4m3fn)}, tmp_path / "f8.pt", "legacy")
    with pytest.raises(AttributeError):
        torch.load(path, weights_only=False)
    result = try_reconstruct(path)
    assert isinstance(result, NotReconstructed)
    assert "UntypedStorage" in result.reason


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_views_slices_and_non_contiguous_tensors(fmt: str, tmp_path: Path) -> None:
    path = save(views_checkpoint(), tmp_path / "views.pt", fmt)
    rec = assert_matches_torch_load(path, tmp_path)
    assert rec.tensors["row_slice"].offset == 6
    assert rec.tensors["column"].stride == (6,)
    assert rec.tensors["transposed"].stride == (1, 6)
    assert rec.tensors["base"].key == rec.tensors["alias"].key


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_tied_weights_and_parameters(fmt: str, tmp_path: Path) -> None:
    model = TiedModel()
    obj = {"model": model.state_dict(), "params": dict(model.named_parameters())}
    path = save(obj, tmp_path / "tied.pt", fmt)
    rec = assert_matches_torch_load(path, tmp_path)
    assert rec.tensors["model.embed.weight"].key == rec.tensors["model.head.weight"].key


def test_one_tensor_object_twice_gets_one_name(tmp_path: Path) -> None:
    t = torch.randn(4)
    path = save({"a": t, "b": t, "c": [t, torch.ones(2)]}, tmp_path / "memo.pt")
    rec = assert_matches_torch_load(path, tmp_path)
    assert list(rec.tensors) == ["a", "c.1"]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_nested_checkpoint(fmt: str, tmp_path: Path) -> None:
    obj = {
        "state_dict": state_dict(),
        "epoch": 3,
        "lr": 1e-3,
        "best": float("nan"),
        "name": "run-ü",
        "blob": b"\x00\x01",
        "flags": (True, None),
        "history": [1.5, {"nested": [torch.arange(4), "x"]}],
        "int_keys": {0: "a", (2, 3): "b"},
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
    }
    path = save(obj, tmp_path / "nested.pt", fmt)
    rec = assert_matches_torch_load(path, tmp_path)
    assert "state_dict.encoder.weight" in rec.tensors
    assert "history.1.nested.0" in rec.tensors
    assert rec.tensors["empty"].sha256 == hashlib.sha256(b"").hexdigest()


def test_pickle_protocol_5(tmp_path: Path) -> None:
    path = tmp_path / "p5.pt"
    torch.save({"sd": state_dict(), "note": b"bytes"}, path, pickle_protocol=5)
    assert_matches_torch_load(path, tmp_path, weights_only=False)  # our own benign file


def test_legacy_tar(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 4),
        "b": torch.randn(4).double(),
        "steps": torch.tensor([7]),
        "h": torch.randn(2, 2).half(),
        "mask": torch.tensor([1, 0, 255], dtype=torch.uint8),
    }
    path = tmp_path / "old.tar"
    write_legacy_tar(path, lambda ref: {"state_dict": {k: ref(k) for k in tensors}, "epoch": 3}, tensors)
    rec = assert_matches_torch_load(path, tmp_path, weights_only=False)  # our own benign file
    assert rec.format == "torch-tar"
    assert list(rec.tensors) == [f"state_dict.{k}" for k in tensors]


def test_big_endian_zip_is_byte_swapped_like_torch(tmp_path: Path) -> None:
    sd = {
        "f": torch.randn(3, 2),
        "c": torch.randn(3, dtype=torch.complex64),
        "i": torch.arange(5, dtype=torch.int16),
        "u": torch.arange(4, dtype=torch.uint8),
    }
    little = save(sd, tmp_path / "little.pt")
    with zipfile.ZipFile(little) as z:
        prefix = z.namelist()[0].split("/")[0]
    rec_little = must_rebuild(little)
    change = {f"{prefix}/byteorder": b"big"}
    # swap each storage by its record's dtype, as a big-endian writer would have written it
    for name, t in sd.items():
        key = rec_little.tensors[name].key  # checked against torch.load below
        unit = t.element_size() // (2 if t.is_complex() else 1)
        data = t.contiguous().view(torch.uint8).reshape(-1, unit).flip(1).reshape(-1)
        change[f"{prefix}/data/{key}"] = data.numpy().tobytes()
    big = tmp_path / "big.pt"
    rewrite_zip(little, big, change)
    rec = assert_matches_torch_load(big, tmp_path)
    assert {n: t.sha256 for n, t in rec.tensors.items()} == {
        n: t.sha256 for n, t in rec_little.tensors.items()
    }


def test_data_is_kept_only_on_request(tmp_path: Path) -> None:
    path = save(state_dict(), tmp_path / "sd.pt")
    light = must_rebuild(path, keep_data=False)
    full = must_rebuild(path, keep_data=True)
    assert all(t.data is None for t in light.tensors.values())
    assert {n: t.sha256 for n, t in light.tensors.items()} == {n: t.sha256 for n, t in full.tensors.items()}
    with pytest.raises(ValueError, match="keep_data"):
        next(iter(light.tensors.values())).to_torch()
    assert reconstruct(path) is not None


# ---------------------------------------------------------------------------------------------
# tampering
# ---------------------------------------------------------------------------------------------


def sleepy_checkpoint() -> tuple[dict[str, Any], dict[str, Any]]:
    """(benign, poisoned): the poisoned file stores the same weights but its pickle returns
    ``torch.add(weight, delta)`` for ``encoder.weight`` (Sleepy Pickle: the backdoor is
    applied at load time, so the stored weights look clean)."""
    sd = state_dict()
    delta = torch.zeros_like(sd["encoder.weight"])
    delta[3, 5] = 8.0  # a one-weight backdoor
    poisoned = collections.OrderedDict(sd)
    poisoned["encoder.weight"] = Reduce(torch.add, sd["encoder.weight"], delta)  # type: ignore[assignment]
    return {"state_dict": sd, "epoch": 3}, {"state_dict": poisoned, "epoch": 3}


def test_sleepy_pickle_is_not_reconstructed_and_compare_names_the_tensor(tmp_path: Path) -> None:
    benign, poisoned = sleepy_checkpoint()
    clean_path = save(benign, tmp_path / "clean.pt")
    evil_path = save(poisoned, tmp_path / "evil.pt")

    result = try_reconstruct(evil_path)
    assert isinstance(result, NotReconstructed)
    # torch.add pickles as getattr(torch._C._VariableFunctionsClass, "add")
    assert "builtins.getattr" in result.reason
    assert reconstruct(evil_path) is None  # the general reading takes over (test_verify)

    # what the sandbox hands back for the poisoned file (our own harmless torch.add payload)
    returned = sandbox_tensors(torch.load(evil_path, weights_only=False), tmp_path)
    findings = compare(must_rebuild(clean_path), returned)
    assert [f.rule for f in findings] == ["weights-tampered"]
    tampered = findings[0]
    assert tampered.severity is Severity.HIGH and tampered.category == "evasion"
    assert [t["name"] for t in tampered.evidence["tensors"]] == ["state_dict.encoder.weight"]
    entry = tampered.evidence["tensors"][0]
    assert entry["expected_sha256"] == _convert.tensor_digest(benign["state_dict"]["encoder.weight"])
    assert entry["actual_sha256"] == _convert.tensor_digest(returned["state_dict.encoder.weight"])
    assert entry["expected_sha256"] != entry["actual_sha256"]


def test_sign_bit_set_through_allowlisted_metadata_is_reported(tmp_path: Path) -> None:
    # Only torch._utils._rebuild_tensor_v2 and a literal {"neg": True}: every global is on the
    # allowlist, yet torch.load returns the negated weight.
    w = torch.randn(4, 3)
    path = save({"w": w._neg_view(), "b": torch.ones(3)}, tmp_path / "neg.pt")
    rec = must_rebuild(path)
    assert [f.rule for f in rec.findings] == ["tensor-metadata-bits"]
    assert rec.findings[0].evidence == {"tensor": "w", "bits": ["neg"]}
    loaded = torch.load(path, weights_only=True)
    assert loaded["w"].is_neg()
    assert rec.tensors["w"].data == raw(loaded["w"]) == raw(-w)
    assert rec.tensors["w"].metadata == (("neg", True),)


def test_metadata_bits_torch_cannot_apply_are_not_compared(tmp_path: Path) -> None:
    path = save({"w": torch.randn(3)._neg_view()}, tmp_path / "neg.pt")
    with zipfile.ZipFile(path) as z:
        prefix = z.namelist()[0].split("/")[0]
        pkl = z.read(f"{prefix}/data.pkl")
    assert pkl.count(b"neg") == 1
    conj = tmp_path / "conj.pt"  # a conj bit on a float tensor: torch's load fails
    rewrite_zip(
        path, conj, {f"{prefix}/data.pkl": pkl.replace(b"\x03\x00\x00\x00neg", b"\x04\x00\x00\x00conj")}
    )
    with pytest.raises(RuntimeError):
        torch.load(conj, weights_only=True)
    result = try_reconstruct(conj)
    assert isinstance(result, NotReconstructed) and "conj" in result.reason


def test_compare_reports_changed_dtype_shape_and_names(tmp_path: Path) -> None:
    path = save(state_dict(), tmp_path / "sd.pt")
    rec = must_rebuild(path)
    good = sandbox_tensors(torch.load(path, weights_only=True), tmp_path)
    assert compare(rec, good) == []

    bad = dict(good)
    bad["encoder.bias"] = good["encoder.bias"].double()
    bad["decoder.weight"] = good["decoder.weight"].reshape(16, 8)
    del bad["steps"]
    bad["smuggled"] = torch.zeros(1)
    findings = {f.rule: f for f in compare(rec, bad)}
    assert set(findings) == {"weights-tampered", "weights-mismatch"}
    changed = {t["name"]: t for t in findings["weights-tampered"].evidence["tensors"]}
    assert set(changed) == {"encoder.bias", "decoder.weight"}
    assert changed["encoder.bias"]["actual_dtype"] == "float64"
    assert changed["decoder.weight"]["actual_shape"] == [16, 8]
    assert findings["weights-mismatch"].evidence["missing"] == ["steps"]
    assert findings["weights-mismatch"].evidence["extra"] == ["smuggled"]
    assert all(f.severity is Severity.HIGH for f in findings.values())


def test_one_changed_byte_is_found(tmp_path: Path) -> None:
    path = save({"w": torch.zeros(1000, dtype=torch.bfloat16)}, tmp_path / "w.pt")
    rec = must_rebuild(path, keep_data=False)
    w = torch.zeros(1000, dtype=torch.bfloat16)
    w.view(torch.uint8)[1999] = 1
    assert [f.rule for f in compare(rec, {"w": w})] == ["weights-tampered"]


# ---------------------------------------------------------------------------------------------
# files that are not plain state_dicts, and malformed records
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (hostile_checkpoint(eval_payload("1")), "builtins.eval"),
        ({"sd": state_dict(), "config": __import__("argparse").Namespace(a=1)}, "argparse.Namespace"),
        ({"sd": state_dict(), "classes": {1, 2}}, "builtins.set"),
    ],
)
def test_not_a_plain_state_dict(obj: Any, why: str, tmp_path: Path) -> None:
    path = save(obj, tmp_path / "x.pt")
    result = try_reconstruct(path)
    assert isinstance(result, NotReconstructed)
    assert why in result.reason
    assert result.format == "torch-zip"


def test_other_formats_are_not_compared(tmp_path: Path) -> None:
    path = save(state_dict(), tmp_path / "raw.pkl", "pickle")
    result = try_reconstruct(path)
    assert isinstance(result, NotReconstructed) and "pickle" in result.reason
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    assert isinstance(try_reconstruct(junk), NotReconstructed)


def test_short_storage_record_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    path = save({"a": torch.arange(10, dtype=torch.int64), "b": torch.ones(3)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(path) as z:
        prefix = z.namelist()[0].split("/")[0]
        data0 = z.read(f"{prefix}/data/0")
    short = tmp_path / "short.pt"
    rewrite_zip(path, short, {f"{prefix}/data/0": data0[:40]})  # 5 of 10 int64 elements
    rec = must_rebuild(short)
    assert rec.unreadable == frozenset({"a"})
    assert list(rec.tensors) == ["b"]
    assert sorted(f.rule for f in rec.findings) == ["storage-size-mismatch", "storage-too-short"]
    # the unreadable tensor is left out of the comparison rather than reported as tampered
    assert compare(rec, {"a": torch.arange(10), "b": torch.ones(3)}) == []


def test_legacy_storage_count_mismatch_is_not_compared(tmp_path: Path) -> None:
    path = save({"a": torch.arange(6, dtype=torch.int32)}, tmp_path / "l.pt", "legacy")
    data = bytearray(path.read_bytes())
    at = len(data) - 6 * 4 - 8
    assert int.from_bytes(data[at : at + 8], "little") == 6
    data[at : at + 8] = (5).to_bytes(8, "little")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data[:-4]))
    result = try_reconstruct(bad)
    assert isinstance(result, NotReconstructed) and "refuses" in result.reason


def test_hand_built_stream_with_unsupported_opcode(tmp_path: Path) -> None:
    # a protocol-0 INT opcode (strtol vs int() differ on '010'): refused, not guessed
    path = save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(path) as z:
        prefix = z.namelist()[0].split("/")[0]
        pkl = z.read(f"{prefix}/data.pkl")
    assert pkl.endswith(b"s.")
    patched = pkl[:-1] + b"X\x01\x00\x00\x00nI010\ns."  # d["n"] = 010 (protocol-0 INT)
    evil = tmp_path / "int.pt"
    rewrite_zip(path, evil, {f"{prefix}/data.pkl": patched})
    result = try_reconstruct(evil)
    assert isinstance(result, NotReconstructed)
    assert "opcode 0x49" in result.reason


def test_static_tensor_to_torch_for_empty_tensor() -> None:
    st = StaticTensor(
        name="e",
        dtype="float32",
        shape=(0, 4),
        stride=(4, 1),
        key="0",
        offset=0,
        sha256=hashlib.sha256(b"").hexdigest(),
        data=b"",
    )
    assert st.to_torch().shape == (0, 4)
