"""Stage 6 (``sandbox._verify``): every tensor the loader returns is checked against an
independent reading of the file, also for checkpoints that are not plain state dicts.

The "returned" side is what the worker's extractor makes of a real ``torch.load`` in this
process (the payloads here only compute with torch: nothing leaves a marker or runs a command).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sandbox import _verify
from sandbox._verify import reconstruct as _reconstruct
from sandbox._worker import _protocol as P
from sandbox._worker._extract import extract
from sandbox.report import Severity
from tests.checkpoints import Reduce, composite_checkpoint, save, state_dict
from tests.fakes import manifest_of


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("steps", torch.tensor([7]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(self.lin(x))
        return out


def returned(path: Path, **load: Any) -> P.Manifest:
    """The manifest the sandbox would send for ``path`` (with the sandbox's digests, as in a scan)."""
    return _extracted(path, **load)[0]


def held(path: Path) -> tuple[dict[str, torch.Tensor], P.Manifest]:
    """What the host holds after a load of ``path``: the tensors read back from the sandbox's
    SafeTensors, and the manifest, which gives no digests for them (as the sandbox sends it)."""
    from safetensors.torch import save_file

    from sandbox._convert import load_tensors

    manifest, stored = _extracted(path, digests=False)
    out = path.with_name(path.name + ".handoff.safetensors")
    save_file(stored, str(out))
    try:
        return load_tensors(str(out), manifest), manifest
    finally:
        out.unlink()


def _extracted(
    path: Path, *, digests: bool = True, **load: Any
) -> tuple[P.Manifest, dict[str, torch.Tensor]]:
    if path.suffix == ".npy":
        obj = np.load(path, allow_pickle=True)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=True) as npz:
            obj = {k: npz[k] for k in npz.files}
    elif path.suffix == ".pkl":
        with open(path, "rb") as f:
            obj = pickle.load(f)
    else:
        obj = torch.load(path, weights_only=False, **load)
    ex = extract(obj, digests=digests)
    return manifest_of(ex), ex.stored


def by_bytes(path: Path, tensors: dict[str, torch.Tensor], manifest: P.Manifest) -> list[Any]:
    """``weights`` as a load runs it: the file's stored tensors located, not hashed, and
    compared byte for byte with the tensors the host holds."""
    return _verify.weights(str(path), manifest, tensors, reading=_verify.Reading(str(path), None, spans=True))


def findings_for(path: Path) -> list[Any]:
    """The findings for what a load of ``path`` returns, the same by every route: the sandbox's
    digests alone (a scan), the host's tensors against the file's digests, and the host's
    tensors against the file's bytes."""
    found = _verify.weights(str(path), returned(path))
    tensors, manifest = held(path)
    hashed = _verify.weights(str(path), manifest, tensors)
    assert by_bytes(path, tensors, manifest) == hashed
    views = {v.name for v in manifest.views}  # checked only where the host holds them
    assert [f for f in hashed if f.rule != "weights-unverified"] == [
        f for f in found if f.rule != "weights-unverified"
    ]
    assert {n for f in hashed if f.rule == "weights-unverified" for n in f.evidence["tensors"]} - views == {
        n for f in found if f.rule == "weights-unverified" for n in f.evidence["tensors"]
    }
    return found


def unverified(path: Path) -> list[str]:
    found = [f for f in findings_for(path) if f.rule == "weights-unverified"]
    assert len(found) <= 1
    return list(found[0].evidence["tensors"]) if found else []


# -- benign structures beyond plain state dicts: everything verified ---------------------------


def test_a_pickled_module_of_a_custom_class_is_verified(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save({"model": Block(), "epoch": 2}, tmp_path / "module.pt")
    assert findings_for(path) == []
    assert len(returned(path).tensors) == 5


def test_a_pickled_optimizer_and_tensor_subclasses_are_verified(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Block()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    param = torch.nn.Parameter(torch.randn(3))
    param.flag = True  # type: ignore[attr-defined]  # a plain attribute: _rebuild_parameter_with_state, values unchanged
    path = save({"model": model, "opt": opt, "p": param}, tmp_path / "opt.pt")
    assert findings_for(path) == []
    path = save({"model": model, "opt": opt, "p": param}, tmp_path / "opt-legacy.pt", "legacy")
    assert findings_for(path) == []


def test_numpy_arrays_in_a_checkpoint_are_verified(tmp_path: Path) -> None:
    arrays = {
        "f64": np.arange(12, dtype=np.float64).reshape(3, 4),
        "big": np.arange(6, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "bool": np.array([True, False, True]),
        "c": np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 3), dtype=np.int16),
        "w": torch.ones(2, 2),
    }
    for fmt in ("zip", "legacy"):
        path = save(arrays, tmp_path / f"np-{fmt}.pt", fmt)
        assert findings_for(path) == [], fmt
        assert len(returned(path).tensors) == 8


def test_npy_and_npz_files_are_verified(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(10, dtype=">f8").reshape(2, 5))
    np.savez(tmp_path / "b.npz", x=np.arange(4), y=np.ones((2, 2), dtype=np.float16))
    np.savez_compressed(tmp_path / "c.npz", x=np.arange(4), y=np.eye(3))
    for name in ("a.npy", "b.npz", "c.npz"):
        assert findings_for(tmp_path / name) == [], name


# -- tensors computed while loading: unverified ---------------------------------------------


def sleepy(tmp_path: Path) -> Path:
    """A module checkpoint (so no plain reading applies) one of whose weights is computed by
    ``torch.add`` while it loads: the Sleepy Pickle pattern."""
    torch.manual_seed(2)
    sd = state_dict()
    delta = torch.zeros_like(sd["encoder.weight"])
    delta[0, 1] = 5.0
    poisoned = collections.OrderedDict(sd)
    poisoned["encoder.weight"] = Reduce(torch.add, sd["encoder.weight"], delta)  # type: ignore[assignment]
    return save({"model": Block(), "state_dict": poisoned}, tmp_path / "sleepy.pt")


def test_a_weight_computed_while_loading_is_unverified_and_named(tmp_path: Path) -> None:
    path = sleepy(tmp_path)
    found = findings_for(path)
    assert [f.rule for f in found] == ["weights-unverified"]
    assert found[0].severity is Severity.MEDIUM
    assert found[0].evidence["tensors"] == ["state_dict.encoder.weight"]
    assert found[0].evidence["returned"] == len(returned(path).tensors)


def test_tensors_unpickled_from_bytes_are_unverified(tmp_path: Path) -> None:
    # pickle.dumps of a tensor nests a whole torch.save archive in the bytes of a call
    # (torch.storage._load_from_bytes): no record of the file describes the tensor
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": torch.arange(5.0), "n": 3}, protocol=2))
    assert unverified(path) == ["w"]


def test_a_file_without_any_reading_leaves_everything_unverified(tmp_path: Path) -> None:
    path = save({"w": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "sd.pt")
    manifest = returned(path)
    path.write_bytes(b"\x00" * 64)  # the file is no longer what the sandbox loaded
    found = _verify.weights(str(path), manifest)
    assert [f.rule for f in found] == ["weights-unverified"]
    assert sorted(found[0].evidence["tensors"]) == ["b", "w"]
    assert "no independent reading" in found[0].evidence["reason"]


def test_swapped_but_stored_tensors_still_count_as_the_files(tmp_path: Path) -> None:
    # membership, not names, for general files: bytes the file holds are the file's (a plain
    # state dict is compared name by name, see test_reconstruct)
    path = save({"model": Block(), "extra": torch.full((3,), 2.0)}, tmp_path / "m.pt")
    manifest = returned(path)
    assert _verify.weights(str(path), manifest) == []
    forged = dataclasses.replace(manifest.tensors[0], sha256="0" * 64)
    manifest = dataclasses.replace(manifest, tensors=(forged, *manifest.tensors[1:]))
    found = _verify.weights(str(path), manifest)
    assert [f.rule for f in found] == ["weights-unverified"]
    assert found[0].evidence["tensors"] == [forged.name]


# -- the general reading itself -------------------------------------------------------------


def test_inventory_of_a_hostile_file_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = Reduce(exec, f"open({str(marker)!r}, 'w').close()")
    path = save({"w": torch.ones(2), "payload": payload}, tmp_path / "evil.pt")
    inv = _reconstruct.try_inventory(path)
    assert isinstance(inv, _reconstruct.Inventory)
    assert (("float32", (2,), _digest(torch.ones(2)))) in inv.digests
    assert not marker.exists()


@pytest.mark.parametrize("cut", [1, 10, 100, 200, 400])
def test_inventory_of_a_truncated_or_corrupt_file_never_raises(tmp_path: Path, cut: int) -> None:
    buf = io.BytesIO()
    torch.save({"model": Block(), "a": np.arange(3)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:-cut])
    assert isinstance(
        _reconstruct.try_inventory(path), (_reconstruct.Inventory, _reconstruct.NotReconstructed)
    )
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert isinstance(
        _reconstruct.try_inventory(path), (_reconstruct.Inventory, _reconstruct.NotReconstructed)
    )


def _digest(t: torch.Tensor) -> str:
    from sandbox._convert import tensor_digest

    return tensor_digest(t)


class _Rearranged(dict):  # type: ignore[type-arg]
    """Pickles as a plain dict, then a call of ``dict.update`` on that same dict (by memo)
    that swaps two same-shape weights while the file loads: every byte returned is a byte the
    file stores, only under other names."""

    def __init__(self, sd: dict[str, torch.Tensor], swap: tuple[str, str]) -> None:
        super().__init__()
        self.sd, self.swap = sd, swap

    def __reduce__(self) -> tuple[Any, ...]:
        a, b = self.swap
        return (dict.update, (self.sd, {a: self.sd[b], b: self.sd[a]}))


def test_a_plain_dict_rearranged_while_loading_is_tampered(tmp_path: Path) -> None:
    torch.manual_seed(4)
    sd = {"layer1.weight": torch.randn(3, 3), "layer2.weight": torch.randn(3, 3), "bias": torch.zeros(3)}
    obj = {"state_dict": sd, "hook": _Rearranged(sd, ("layer1.weight", "layer2.weight"))}
    path = save(obj, tmp_path / "swapped.pt")
    manifest = returned(path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["state_dict"]["layer1.weight"], sd["layer2.weight"])  # swapped
    found = _verify.weights(str(path), manifest)
    tampered = [f for f in found if f.rule == "weights-tampered"]
    assert len(tampered) == 1 and tampered[0].severity is Severity.HIGH
    assert [t["name"] for t in tampered[0].evidence["tensors"]] == [
        "state_dict.layer1.weight",
        "state_dict.layer2.weight",
    ]
    # the same by the file's bytes, the evidence naming the file's digests
    tensors, host = held(path)
    assert by_bytes(path, tensors, host) == _verify.weights(str(path), host, tensors) == tampered
    # the untouched bias, and the benign twin of the file, are verified by name
    benign = save({"state_dict": sd, "epoch": 1, "args": {"lr": 0.1}}, tmp_path / "ok.pt")
    assert _verify.weights(str(benign), returned(benign)) == []
    assert by_bytes(benign, *held(benign)) == []


class _Holder:
    """A class the host's reading does not know: only the general reading lists its tensors."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors


def test_a_reading_nobody_wants_stops_instead_of_hashing_the_whole_file(tmp_path: Path) -> None:
    """The reading runs beside the sandbox; when the load fails or is refused, ``_api`` cancels
    it, and it ends at its next check rather than reading the rest of a large file."""
    from sandbox import _scan

    path = tmp_path / "holder.pt"
    torch.save(_Holder([torch.full((4,), float(i)) for i in range(30_000)]), path)
    scan = _scan.scan_file(path)
    reading = _verify.Reading(str(path), scan)
    reading.cancel()
    got = reading.result()
    assert isinstance(got, _reconstruct.NotReconstructed)
    assert got.reason == _reconstruct.CANCELLED
    whole = _verify.Reading(str(path), scan).result()
    assert isinstance(whole, _reconstruct.Inventory) and len(whole.digests) == 30_000


def test_a_parameter_and_the_tensor_it_wraps_are_hashed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickled module rebuilds each weight twice (the tensor, then the ``Parameter`` around
    it): the reading hashes those bytes once, and a tensor the file names twice once too."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    path = save({"model": model, "again": model[0].weight}, tmp_path / "module.pt")
    hashed: list[int] = []
    from sandbox._formats.buffer import sha256_region as real

    def counting(buf: Any, begin: int, end: int) -> str:
        hashed.append(end - begin)
        return real(buf, begin, end)

    monkeypatch.setattr("sandbox._verify.reconstruct.sha256_region", counting)
    inv = _reconstruct.try_inventory(path)
    assert isinstance(inv, _reconstruct.Inventory) and len(inv.digests) == 4
    assert sorted(hashed) == sorted([64 * 64 * 4] * 2 + [64 * 4] * 2)
    assert findings_for(path) == []


def _module(**buffers: torch.Tensor) -> torch.nn.Module:
    """A module holding ``buffers``: the host's reading finds their tensors, but names none."""
    m = torch.nn.Module()
    for name, t in buffers.items():
        m.register_buffer(name, t)
    return m


def _forged(tensors: dict[str, torch.Tensor], manifest: P.Manifest, name: str, value: torch.Tensor) -> Any:
    """The host's tensors (and the manifest) with ``name`` holding ``value`` instead."""
    return {**tensors, name: value}, manifest


def test_a_load_compares_the_files_bytes_instead_of_hashing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the host holds what the loader returned, the file's stored tensors are located,
    not hashed, and compared byte for byte: one changed byte between equal first and last
    bytes is still found."""
    torch.manual_seed(5)
    other = _module(big=torch.randn(64, 64), huge=torch.randn(600, 600))  # 1.4 MB: over one read
    path = save({"model": Block(), "other": other}, tmp_path / "m.pt")
    tensors, manifest = held(path)
    hashed: list[int] = []
    from sandbox._formats.buffer import sha256_region as real

    def counting(buf: Any, begin: int, end: int) -> str:
        hashed.append(end - begin)
        return real(buf, begin, end)

    monkeypatch.setattr("sandbox._verify.reconstruct.sha256_region", counting)
    assert by_bytes(path, tensors, manifest) == []
    assert hashed == []  # nothing of the file was hashed
    changed = tensors["other.big"].clone()
    changed[32, 7] += 1.0
    found = by_bytes(path, *_forged(tensors, manifest, "other.big", changed))
    assert [f.rule for f in found] == ["weights-unverified"] and found[0].evidence["tensors"] == ["other.big"]
    changed = tensors["other.huge"].clone()
    changed[550, 3] = -changed[550, 3]  # a sign bit past the first MiB
    found = by_bytes(path, *_forged(tensors, manifest, "other.huge", changed))
    assert [f.rule for f in found] == ["weights-unverified"] and found[0].evidence["tensors"] == [
        "other.huge"
    ]


def test_many_tensors_with_the_same_ends_are_matched_by_digest_past_a_few(tmp_path: Path) -> None:
    """Tensors of one shape whose first and last bytes agree are candidates for each other:
    a few are compared in full, the rest by digest (each hashed once), so a file of many such
    tensors costs linear work, and each is still told apart."""
    rows = []
    for i in range(12):
        t = torch.zeros(4096)
        t[2048] = float(i + 1)  # unique, far from either end
        rows.append(t)
    path = save({"rows": _module(**{f"r{i}": t for i, t in enumerate(rows)})}, tmp_path / "rows.pt")
    tensors, manifest = held(path)
    assert len(manifest.tensors) == 12
    assert by_bytes(path, tensors, manifest) == []  # the 5th to 12th: past the full compares
    name = manifest.tensors[-1].name
    forged = torch.zeros(4096)
    forged[2048] = 99.0
    found = by_bytes(path, *_forged(tensors, manifest, name, forged))
    assert [f.rule for f in found] == ["weights-unverified"] and found[0].evidence["tensors"] == [name]
    again = rows[9].clone()  # the file's own bytes, under another tensor's name: the file's
    assert by_bytes(path, *_forged(tensors, manifest, name, again)) == []


def test_a_file_that_shrank_before_the_comparison_is_never_verified(tmp_path: Path) -> None:
    """Bytes that are no longer there match nothing: the tensors in objects are unverified, a
    named one no longer holds the file's tensor."""
    torch.manual_seed(6)
    path = save({"model": _module(big=torch.randn(64, 64)), "named": torch.randn(64, 64)}, tmp_path / "m.pt")
    tensors, manifest = held(path)
    reading = _verify.Reading(str(path), None, spans=True)
    reading.result()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    found = {f.rule: f for f in _verify.weights(str(path), manifest, tensors, reading=reading)}
    assert set(found) == {"weights-unverified", "weights-tampered"}
    assert "model.big" in found["weights-unverified"].evidence["tensors"]
    assert [t["name"] for t in found["weights-tampered"].evidence["tensors"]] == ["named"]


def _skeleton(manifest: P.Manifest, change: Any) -> P.Manifest:
    """``manifest`` with its skeleton as ``change`` leaves it (it edits a JSON copy in place)."""
    skeleton = json.loads(json.dumps(manifest.skeleton))
    change(skeleton)
    return dataclasses.replace(manifest, skeleton=skeleton)


def _items(skeleton: Any, *keys: str) -> list[Any]:
    """The items of the container node at ``keys`` (dict keys from the top)."""
    node = skeleton
    for key in keys:
        node = next(v for k, v in node["items"] if k == key)
        if node["$"] == "module":
            node = node["state"]
    items: list[Any] = node["items"]
    return items


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch calls quantized tensors deprecated
def test_a_skeleton_that_moves_the_files_tensors_is_tampered(tmp_path: Path) -> None:
    """The host rebuilds the returned structure from the sandbox's skeleton, which names each
    tensor it places: a payload that sends honest names and bytes but a skeleton putting one
    weight where the file puts another swaps them as surely as rearranging the dict while
    loading (safe_load returned the swapped dict, clean)."""
    torch.manual_seed(8)
    a, b, c = torch.randn(4), torch.randn(4), torch.randn(4)
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8)
    q2 = torch.quantize_per_tensor(torch.randn(4), 0.2, 1, torch.qint8)
    sd = {"a": a, "b": b, "again": [a, c], (1, "x"): c, "q": q, "q2": q2, "n": np.arange(3.0)}
    top = {"model": _module(w=torch.randn(2)), "sd": sd, 7: [b], "composites": composite_checkpoint()}
    path = save(top, tmp_path / "m.pt")
    tensors, manifest = held(path)
    inv = _reconstruct.read(str(path), spans=True)
    assert isinstance(inv, _reconstruct.Inventory) and {"sd.a", "sd.b", "sd.again.1"} <= set(inv.paths)
    assert by_bytes(path, tensors, manifest) == []  # the honest skeleton: every tensor in place

    def moved(change: Any) -> list[str]:
        forged = _skeleton(manifest, change)
        found = by_bytes(path, tensors, forged)
        assert found == _verify.weights(str(path), forged, tensors)  # also by digests
        assert [f.rule for f in found] == ["weights-tampered"], found
        return sorted(t["name"] for t in found[0].evidence["tensors"])

    def swap(items: list[Any], i: int, j: int, part: str = "") -> None:
        x, y = (
            (items[i][1]["parts"][part] if part else items[i][1]),
            (items[j][1]["parts"][part] if part else items[j][1]),
        )
        x["ref"], y["ref"] = y["ref"], x["ref"]

    assert moved(lambda s: swap(_items(s, "sd"), 0, 1)) == ["sd.a", "sd.b"]
    # the second place of a tensor the file puts twice
    assert moved(lambda s: _items(s, "sd", "again").__setitem__(0, _items(s, "sd")[1][1])) == ["sd.a"]
    # a key given twice: the host's dict keeps the last
    assert moved(lambda s: _items(s, "sd").append(["a", _items(s, "sd")[1][1]])) == ["sd.a"]
    # under an integer key (b again, so named where the file first puts it), and as a
    # module's state (rebuilt as that dict)
    assert moved(lambda s: _items(s)[2][1]["items"].__setitem__(0, _items(s, "sd")[0][1])) == ["sd.b"]

    def as_module(s: Any) -> None:
        sd_node = next(v for k, v in s["items"] if k == "sd")
        swap(sd_node["items"], 0, 1)
        s["items"][1][1] = {"$": "module", "type": "x.Y", "state": sd_node}

    assert moved(as_module) == ["sd.a", "sd.b"]
    odd = _skeleton(manifest, lambda s: s["items"].append([{"$": "size", "v": [2**70]}, 1]))
    assert by_bytes(path, tensors, odd) == []  # a key nobody can rebuild: nothing placed, no error
    # a quantized tensor's integer values from another one's
    assert moved(lambda s: swap(_items(s, "sd"), 4, 5, "int_repr")) == ["sd.q", "sd.q2"]


def test_a_weight_the_skeleton_drops_or_blanks_is_tampered(tmp_path: Path) -> None:
    """A payload that takes a weight out of a plain container while loading, or puts a value
    or a meta tensor (no data) in its place, leaves the host's structure without the file's
    weight: the model then runs on whatever fills the gap. Every path at which the file puts
    a tensor must hold it; keys that share a path component (1 and "1") and a tensor used as
    a key are not gaps."""
    torch.manual_seed(9)
    a, b, c, k = (torch.randn(3) for _ in range(4))
    top = {"model": _module(w=torch.randn(2)), "sd": {"a": a, "b": b, "pair": [c, a]}, 1: a, "1": b, k: "k"}
    path = save(top, tmp_path / "m.pt")
    tensors, manifest = held(path)
    assert by_bytes(path, tensors, manifest) == []  # nothing is missing from the honest skeleton

    def gone(change: Any) -> list[tuple[str, Any]]:
        forged = _skeleton(manifest, change)
        found = by_bytes(path, tensors, forged)
        assert found == _verify.weights(str(path), forged, tensors)  # also by digests
        assert [f.rule for f in found] == ["weights-tampered"], found
        return sorted((t["name"], t.get("actual")) for t in found[0].evidence["tensors"])

    def put(value: Any, *keys: str, index: int = 1) -> Any:
        return lambda s: _items(s, *keys).__setitem__(index, ["b", value] if keys == ("sd",) else value)

    assert gone(lambda s: _items(s, "sd").pop(1)) == [("sd.b", "nothing")]
    assert gone(put(None, "sd")) == [("sd.b", "NoneType")]
    meta = {"$": "opaque", "type": "torch.Tensor", "path": "root['sd']['b']"}
    assert gone(put(meta, "sd")) == [("sd.b", "opaque torch.Tensor")]
    assert gone(put(None, "sd", "pair", index=0)) == [("sd.pair.0", "NoneType")]
    # the whole container: each of its weights (a and b are still at 1 and "1")
    assert gone(lambda s: next(p for p in s["items"] if p[0] == "sd").__setitem__(1, "x")) == [
        ("sd.a", "nothing"),
        ("sd.b", "nothing"),
        ("sd.pair.0", "nothing"),
    ]


def test_a_plain_state_dicts_skeleton_must_put_each_weight_where_the_file_does(tmp_path: Path) -> None:
    """A plain state dict is compared name by name with the file's records, but the host builds
    the structure from the skeleton: one that swaps two refs, or leaves a weight out, returned
    the swapped (or gapped) dict clean, with every name and byte honest."""
    torch.manual_seed(10)
    sd = collections.OrderedDict(a=torch.randn(4), b=torch.randn(4), blocks=[torch.randn(2), torch.randn(2)])
    path = save(sd, tmp_path / "sd.pt")
    assert isinstance(_reconstruct.read(str(path)), _reconstruct.Reconstruction)
    tensors, manifest = held(path)
    assert _verify.weights(str(path), manifest, tensors) == []

    def tampered(change: Any) -> list[tuple[str, Any]]:
        forged = _skeleton(manifest, change)
        for found in (_verify.weights(str(path), forged, tensors), _verify.weights(str(path), forged)):
            assert [f.rule for f in found] == ["weights-tampered"], found
        return sorted((t["name"], t["actual_tensor"]) for t in found[0].evidence["tensors"])

    def swap(s: Any) -> None:
        a, b = _items(s)[0][1], _items(s)[1][1]
        a["ref"], b["ref"] = b["ref"], a["ref"]

    assert tampered(swap) == [("a", "b"), ("b", "a")]
    assert tampered(lambda s: _items(s, "blocks").reverse()) == [
        ("blocks.0", "blocks.1"),
        ("blocks.1", "blocks.0"),
    ]
    assert tampered(lambda s: _items(s).pop(1)) == [("b", None)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch calls quantized tensors deprecated
def test_a_quantized_tensors_parameters_must_be_the_files(tmp_path: Path) -> None:
    """The host rebuilds a quantized tensor from its integer values (compared with the file)
    and the skeleton's scale and zero point (or axis): a payload that keeps the values but
    sends another scale changes every weight it dequantizes to (safe_load returned it)."""
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8)
    top = {"model": _module(w=torch.randn(2)), "q": q, "more": composite_checkpoint()}
    path = save(top, tmp_path / "m.pt")
    tensors, manifest = held(path)
    inv = _reconstruct.read(str(path), spans=True)
    assert isinstance(inv, _reconstruct.Inventory) and ("quantized_per_tensor", "int8", (4,), 0.1, 3) in (
        inv.quantizers
    )
    assert by_bytes(path, tensors, manifest) == []

    def unverified_by(change: Any) -> list[str]:
        forged = _skeleton(manifest, change)
        found = by_bytes(path, tensors, forged)
        assert found == _verify.weights(str(path), forged, tensors)
        assert [f.rule for f in found] == ["weights-unverified"], found
        names: list[str] = found[0].evidence["tensors"]
        return names

    def params(s: Any, *keys: str) -> dict[str, Any]:
        node = s
        for key in keys:
            node = next(v for k, v in node["items"] if k == key)
        out: dict[str, Any] = node["params"]
        return out

    assert unverified_by(lambda s: params(s, "q").update(scale=100.0)) == ["q"]
    assert unverified_by(lambda s: params(s, "q").update(zero_point=-5)) == ["q"]
    assert unverified_by(lambda s: params(s, "more", "q_channel").update(axis=1)) == ["more.q_channel"]
    assert unverified_by(lambda s: params(s, "q").update(scale=[0.1])) == ["q"]  # never raises
