"""The worker's extraction and the host's rebuild, in-process (benign objects only): every
structure and dtype survives, sharing is preserved, and hostile skeletons are refused."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch

from sandbox._convert import Unrepresentable, rebuild
from sandbox._worker._extract import extract
from sandbox.errors import OutputRejected, UnrepresentableObject
from tests import checkpoints as ck


def round_trip(obj: Any, *, weights_only: bool = False) -> Any:
    ex = extract(obj)
    tensors: dict[str, torch.Tensor] = {}
    for e in ex.entries:
        tensors[e["name"]] = ex.stored[e["name"]]
    for e in ex.entries:
        if e["stored_as"] == "U8" and e["dtype"] != "uint8":
            tensors[e["name"]] = tensors[e["name"]].view(getattr(torch, e["dtype"])).reshape(e["shape"])
    for v in ex.views:
        base = tensors[v["base"]]
        tensors[v["name"]] = base.as_strided(v["shape"], v["stride"], base.storage_offset() + v["offset"])
    return rebuild(ex.skeleton, tensors, weights_only=weights_only)


def test_nested_structure() -> None:
    obj = ck.nested_checkpoint()
    got = round_trip(obj)
    assert list(got) == list(obj)
    assert isinstance(got["state_dict"], collections.OrderedDict)
    assert got["flags"] == (True, False, None) and got["blob"] == b"\x00\x01bytes"
    assert got["int_keys"] == {0: "a", 1: "b", (2, 3): "tuple-key"}
    assert got["dtype"] is torch.bfloat16 and got["z"] == complex(1, -2)
    assert got["set"] == {1, 2, 3}


@pytest.mark.parametrize("dtype", ck.ALL_DTYPES, ids=str)
def test_every_dtype(dtype: torch.dtype) -> None:
    t = ck.dtype_tensor(dtype)
    got = round_trip({"t": t, "nc": t.t(), "scalar": t[0, 0].clone()})
    for key, ref in (("t", t), ("nc", t.t()), ("scalar", t[0, 0])):
        assert got[key].dtype == dtype and got[key].shape == ref.shape
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


def test_same_tensor_object_twice_is_one_object() -> None:
    t = torch.randn(3)
    got = round_trip({"a": t, "b": t, "list": [t]})
    assert got["a"] is got["b"] is got["list"][0]


def test_parameters_and_requires_grad() -> None:
    p = torch.nn.Parameter(torch.randn(2, 2))
    got = round_trip({"p": p, "g": torch.ones(2, requires_grad=True)})
    assert isinstance(got["p"], torch.nn.Parameter) and got["p"].requires_grad
    assert got["g"].requires_grad


def test_cycles_and_depth_are_bounded() -> None:
    a: list[Any] = [1]
    a.append(a)
    got = round_trip(a)
    assert isinstance(got[1], Unrepresentable)
    deep: Any = 0
    for _ in range(500):
        deep = [deep]
    got = round_trip(deep)  # does not blow the stack; the deep part becomes a placeholder


def test_weights_only_refuses_placeholders() -> None:
    with pytest.raises(UnrepresentableObject) as info:
        round_trip({"f": object()}, weights_only=True)
    assert info.value.types == ["builtins.object"]


@pytest.mark.parametrize(
    "node",
    [
        {"$": "exec", "v": "x"},
        {"$": "dtype", "v": "load"},  # torch.load is not a dtype
        {"$": "dtype", "v": "__class__"},
        {"$": "device", "v": "cuda; rm -rf /"},
        {"$": "tensor", "ref": "missing"},
        {"$": "dict", "kind": "dict", "items": [[[1], 2]]},  # unhashable key
        {"$": "dict", "kind": "Counter", "items": []},
        {"$": "float", "v": "1e999"},
        {"$": "bytes", "b64": "!!"},
        {"$": "namespace", "items": [[1, 2]]},
        {"$": "size", "v": ["1"]},
        [1, 2],  # bare JSON arrays are never a node
        {"plain": "object"},
    ],
)
def test_hostile_skeletons_are_refused(node: Any) -> None:
    with pytest.raises(OutputRejected):
        rebuild(node, {}, weights_only=False)


def test_skeleton_depth_bomb_is_refused() -> None:
    node: Any = 1
    for _ in range(5000):
        node = {"$": "list", "items": [node]}
    with pytest.raises(OutputRejected):
        rebuild(node, {}, weights_only=False)


def test_standard_library_values() -> None:
    import datetime
    import decimal
    import fractions
    import pathlib
    import uuid

    obj = {
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.UTC),
        "day": datetime.date(2020, 1, 2),
        "at": datetime.time(3, 4, 5),
        "took": datetime.timedelta(days=1, seconds=2, microseconds=3),
        "dir": pathlib.PosixPath("/data/run 1"),
        "pure": pathlib.PurePosixPath("a/b"),
        "win": pathlib.PureWindowsPath("C:/x"),
        "d": decimal.Decimal("1.10"),
        "f": fractions.Fraction(1, 3),
        "id": uuid.UUID(int=7),
        "r": range(1, 10, 2),
        "s": slice(None, 5, None),
    }
    got = round_trip(obj)
    assert got == obj
    assert all(type(got[k]) is type(obj[k]) for k in obj)


@pytest.mark.parametrize(
    "node",
    [
        {"$": "value", "type": "os.system", "v": "id"},
        {"$": "value", "type": "datetime.datetime", "v": "yesterday"},
        {"$": "value", "type": "builtins.range", "v": [1, "2", None]},
        {"$": "value", "type": "uuid.UUID", "v": 5},
    ],
)
def test_bad_values_are_refused(node: Any) -> None:
    with pytest.raises(OutputRejected):
        rebuild(node, {}, weights_only=False)


@pytest.mark.parametrize(
    "node",
    [
        {"$": "ndarray", "ref": "bf16"},  # numpy has no bfloat16: TypeError
        {"$": "npscalar", "ref": "bf16", "dtype": "float32"},
        {"$": "tensor", "ref": "int", "parameter": True, "requires_grad": True},  # RuntimeError
        {"$": "namespace", "items": [["__class__", 1]]},  # TypeError
    ],
    ids=["ndarray-bf16", "npscalar-bf16", "int-parameter-grad", "namespace-class"],
)
def test_skeleton_nodes_torch_or_numpy_refuse_are_refused(node: Any) -> None:
    """Nodes the host's builders raise for (no worker sends them for an honest load) are
    ``OutputRejected``, not a TypeError or RuntimeError out of ``safe_load``."""
    tensors = {"bf16": torch.zeros(2, dtype=torch.bfloat16), "int": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(OutputRejected, match="skeleton"):
        rebuild(node, tensors, weights_only=False)


def test_an_array_of_a_tensor_that_requires_grad_is_its_values() -> None:
    """One tensor the skeleton both marks as requiring grad and returns as a numpy array:
    the array holds its values (numpy() refused a tensor that requires grad)."""
    t = torch.arange(3.0)
    node = {
        "$": "list",
        "items": [{"$": "tensor", "ref": "t", "requires_grad": True}, {"$": "ndarray", "ref": "t"}],
    }
    got = rebuild(node, {"t": t}, weights_only=False)
    assert got[0].requires_grad and got[1].tolist() == [0.0, 1.0, 2.0]


def test_a_lone_tensors_own_layout_and_a_state_dicts_versions_survive() -> None:
    """torch.load keeps a channels_last or transposed tensor's strides and a state dict's
    ``_metadata`` (which ``load_state_dict`` hands each module): both came back lost (row-major
    and a bare OrderedDict)."""
    from sandbox._convert import place
    from tests.fakes import manifest_of

    sd = ck.state_dict()
    obj = {
        "sd": sd,
        "conv": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "t": torch.randn(3, 4).t(),
    }
    ex = extract(obj)
    manifest = manifest_of(ex)
    strides = {e.name: e.stride for e in manifest.tensors}
    assert (
        strides["conv"] == (60, 1, 15, 3) and strides["t"] == (1, 4) and strides["sd.encoder.weight"] is None
    )
    tensors = {}
    for e in ex.entries:  # what crossed: row-major bytes
        tensors[e["name"]] = ex.stored[e["name"]].reshape(e["shape"])
    got = rebuild(manifest.skeleton, place(tensors, manifest, None), weights_only=True)
    ck.assert_same(got, obj)
    assert got["conv"].is_contiguous(memory_format=torch.channels_last)
    assert got["sd"]._metadata == sd._metadata  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "meta",
    [
        [["", {"version": [1]}]],
        {"": {"version": 1}},
        "x",
    ],
)
def test_a_dicts_metadata_must_be_module_versions_on_an_ordered_dict(meta: Any) -> None:
    with pytest.raises(OutputRejected):
        rebuild({"$": "dict", "kind": "OrderedDict", "items": [], "metadata": meta}, {}, weights_only=True)
    with pytest.raises(OutputRejected):  # a plain dict holds no attributes
        rebuild(
            {"$": "dict", "kind": "dict", "items": [], "metadata": [["", {"version": 1}]]},
            {},
            weights_only=True,
        )


def test_a_lazy_modules_uninitialized_parameters_are_placeholders() -> None:
    """A state dict saved before a lazy module's first call holds UninitializedParameters
    (torch.load returns them; they have no data): each is a placeholder, where every use of
    its data ended the load in the sandbox (LoadFailed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls lazy modules experimental
        sd = torch.nn.LazyLinear(4).state_dict()
    got = round_trip(sd)
    assert list(got) == ["weight", "bias"]
    assert all(isinstance(v, Unrepresentable) for v in got.values())
    with pytest.raises(UnrepresentableObject):
        round_trip(sd, weights_only=True)


def test_map_layout_uses_prefetched_records_only_where_their_spans_are_its_own(tmp_path: Any) -> None:
    """Bytes read ahead (``_input.Prefetch``) stand in for the file's only where they are exactly
    the spans ``map_layout`` would read: anything else, and the file is read here."""
    from sandbox import _convert
    from sandbox._verify import reconstruct as _reconstruct

    sd = ck.state_dict()
    path = ck.save(sd, tmp_path / "plain.pt")
    placed = _reconstruct.try_place(path)
    assert isinstance(placed, list)
    spans = _convert.layout_spans(placed)
    data = path.read_bytes()
    ahead = {
        k: (lo, torch.frombuffer(bytearray(data[lo:hi]), dtype=torch.uint8)) for k, (lo, hi) in spans.items()
    }
    got = _convert.map_layout(str(path), placed, copy=True, prefetched=ahead)
    first = next(iter(spans))
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    shared = [t for t in got.values() if t.untyped_storage().data_ptr() == ahead[first][1].data_ptr()]
    assert shared, "the prefetched bytes are the tensors' storage"
    # spans that are not its own (one record cut short): read from the file instead
    lo, buf = ahead[first]
    wrong = {**ahead, first: (lo, buf[:-1])}
    again = _convert.map_layout(str(path), placed, copy=True, prefetched=wrong)
    assert set(again) == set(sd) and all(torch.equal(again[k], v) for k, v in sd.items())
    assert not any(t.untyped_storage().data_ptr() == buf.data_ptr() for t in again.values())
