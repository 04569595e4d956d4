"""Stage 4: what came out of the sandbox is parsed and typed before anything else reads it.
Every byte here is untrusted: strict JSON within a count of values, every field of the wire
format checked, outputs taken from sealed memfds within their caps."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sandbox import _extract
from sandbox._channel import Received
from sandbox._extract import read_outputs, validate_manifest
from sandbox._worker import _protocol as P
from sandbox.errors import OutputRejected
from tests.fakes import sealed


def test_status_is_validated() -> None:
    bad = json.dumps({"protocol": P.PROTOCOL_VERSION, "exit_code": "zero"}).encode()
    with pytest.raises(OutputRejected, match="exit_code"):
        read_outputs(Received(status=bad))
    for junk in (b"NaN", b"[" * 100_000, b"\xff\xfe", b'{"protocol": 1e999999}'):
        with pytest.raises(OutputRejected):
            read_outputs(Received(status=junk))


def _manifest(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "protocol": P.PROTOCOL_VERSION,
        "format": "torch-zip",
        "skeleton": None,
        "notes": [],
        "unrepresentable": [],
        "tensors": [
            {
                "name": "a",
                "dtype": "float32",
                "shape": [2, 3],
                "stored_as": "F32",
                "nbytes": 24,
                "sha256": "0" * 64,
                "location": "cpu",
            }
        ],
        "views": [],
    }
    m.update(over)
    return m


@pytest.mark.parametrize(
    "bad",
    [
        {
            "tensors": [
                {
                    "name": "a",
                    "dtype": "object",
                    "shape": [1],
                    "stored_as": "F32",
                    "nbytes": 4,
                    "sha256": "0" * 64,
                    "location": "cpu",
                }
            ]
        },
        {
            "tensors": [
                {
                    "name": "a",
                    "dtype": "float32",
                    "shape": [2, 3],
                    "stored_as": "F32",
                    "nbytes": 25,
                    "sha256": "0" * 64,
                    "location": "cpu",
                }
            ]
        },
        {
            "tensors": [
                {
                    "name": "",
                    "dtype": "float32",
                    "shape": [],
                    "stored_as": "F32",
                    "nbytes": 4,
                    "sha256": "0" * 64,
                    "location": "cpu",
                }
            ]
        },
        {
            "views": [
                {
                    "name": "v",
                    "base": "a",
                    "offset": 5,
                    "shape": [2],
                    "stride": [1],
                    "dtype": "float32",
                    "location": "cpu",
                }
            ]
        },  # reaches past the base
        {
            "views": [
                {
                    "name": "a",
                    "base": "a",
                    "offset": 0,
                    "shape": [1],
                    "stride": [1],
                    "dtype": "float32",
                    "location": "cpu",
                }
            ]
        },  # duplicate name
        {
            "views": [
                {
                    "name": "v",
                    "base": "zz",
                    "offset": 0,
                    "shape": [1],
                    "stride": [1],
                    "dtype": "float32",
                    "location": "cpu",
                }
            ]
        },  # no such base
        {"protocol": 1},
    ],
)
def test_manifest_validation_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(OutputRejected):
        validate_manifest(_manifest(**bad))


def test_manifest_validation_accepts_a_view_inside_its_base() -> None:
    validate_manifest(
        _manifest(
            views=[
                {
                    "name": "v",
                    "base": "a",
                    "offset": 4,
                    "shape": [2],
                    "stride": [1],
                    "dtype": "float32",
                    "location": "cpu",
                }
            ]
        )
    )


def test_a_document_of_too_many_values_is_refused_before_it_is_parsed() -> None:
    doc = b"[" + b"[]," * (_extract.MAX_JSON_VALUES // 2 + 1) + b"[]]"
    t0 = time.perf_counter()
    with pytest.raises(OutputRejected, match="JSON values"):
        read_outputs(Received(status=doc))
    assert time.perf_counter() - t0 < 30  # counted, not built (a generous bound, not a benchmark)


def test_a_manifest_over_its_cap_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps(_manifest()).encode()
    monkeypatch.setattr(P, "MAX_JSON_BYTES", len(body) - 1)
    with pytest.raises(OutputRejected, match="byte cap"):
        read_outputs(Received(outputs={"manifest": sealed(body)}))


def test_outputs_are_read_from_their_memfds() -> None:
    usage = {"wall_s": 0.5, "cpu_user_s": 0.4, "cpu_system_s": 0.1, "max_rss_kb": 90_000}
    status = {"protocol": P.PROTOCOL_VERSION, "exit_code": 0, "usage": usage}
    tensors = sealed(b"\0" * 16)
    out = read_outputs(
        Received(
            status=json.dumps(status).encode(),
            outputs={"manifest": sealed(json.dumps(_manifest()).encode()), "tensors": tensors},
        )
    )
    assert out.status is not None and out.status.exit_code == 0
    assert out.status.usage is not None and out.status.usage.wall_s == 0.5
    assert out.manifest is not None and [t.name for t in out.manifest.tensors] == ["a"]
    assert out.tensors_path == f"/proc/self/fd/{tensors}"
    assert read_outputs(Received()).status is None  # no status: None, for the monitor to judge


@pytest.mark.parametrize("name", ["", "a" * 100_000, 5, None, ["a"], "a\ud800", "a\x00b", "\u202ea", "a\nb"])
def test_hostile_tensor_names_are_refused(name: object) -> None:
    bad = _manifest()
    bad["tensors"][0]["name"] = name
    with pytest.raises(OutputRejected):
        validate_manifest(bad)


def test_an_empty_views_offset_is_bounded(tmp_path: Any) -> None:
    """A view with no elements lies anywhere in an empty base, so its offset was checked only
    for sign: 2**63 passed, and torch's ``as_strided`` raised ValueError (an int64 overflow)
    out of the host's reading of the tensors, not ``OutputRejected``."""
    import torch
    from safetensors.torch import save_file

    from sandbox import _convert

    empty = dict(_manifest()["tensors"][0], name="b", shape=[0], nbytes=0, sha256=None)
    view = {"name": "v", "base": "b", "shape": [0], "stride": [1], "dtype": "float32", "location": "cpu"}
    path = str(tmp_path / "t.safetensors")
    save_file({"b": torch.empty(0)}, path)
    fine = validate_manifest(_manifest(tensors=[empty], views=[dict(view, offset=2**62 - 1)]))
    assert _convert.load_tensors(path, fine)["v"].numel() == 0
    for offset in (2**63, 2**80):
        with pytest.raises(OutputRejected, match="offset"):
            _convert.load_tensors(
                path, validate_manifest(_manifest(tensors=[empty], views=[dict(view, offset=offset)]))
            )


def _strided(stride: object) -> dict[str, Any]:
    """The test manifest with its tensor ``a`` given ``stride``."""
    m = _manifest()
    m["tensors"][0]["stride"] = stride
    return m


@pytest.mark.parametrize("stride", [[3, 1], [1, 2]])
def test_a_stored_tensors_own_dense_layout_is_accepted(stride: list[int]) -> None:
    assert validate_manifest(_strided(stride)).tensors[0].stride == tuple(stride)


@pytest.mark.parametrize(
    "stride",
    [
        [1, 1],  # overlapping
        [6, 1],  # gaps: the bytes would not fill it
        [0, 1],  # an expanded dimension
        [3],  # rank
        [-3, 1],
        [1.5, 2],
        "3,1",
    ],
)
def test_a_stored_tensors_layout_must_be_dense(stride: object) -> None:
    with pytest.raises(OutputRejected):
        validate_manifest(_strided(stride))


def test_a_view_of_a_base_with_its_own_layout_is_refused() -> None:
    """A view's offset and strides count the base's row-major elements: a base laid out
    otherwise would move every view onto other elements."""
    bad = _strided([1, 2])
    bad["views"] = [
        {
            "name": "v",
            "base": "a",
            "offset": 0,
            "shape": [2],
            "stride": [1],
            "dtype": "float32",
            "location": "cpu",
        }
    ]
    with pytest.raises(OutputRejected):
        validate_manifest(bad)


@pytest.mark.parametrize(
    ("shape", "stride", "dense"),
    [
        ((2, 3, 4, 5), (60, 1, 15, 3), True),  # channels_last
        ((4, 3), (1, 4), True),  # a transpose
        ((3, 1, 4), (4, 99, 1), True),  # a size-1 dimension's stride is free
        ((), (), True),
        ((2, 0), (1, 2), False),  # empty: nothing to lay out
        ((4, 3), (1, 3), False),  # overlapping
        ((4, 3), (0, 1), False),  # expanded
        ((4, 3), (6, 2), False),  # gaps
    ],
)
def test_dense_strides(shape: tuple[int, ...], stride: tuple[int, ...], dense: bool) -> None:
    assert P.dense_strides(shape, stride) is dense


@pytest.mark.parametrize(
    "meta",
    [
        [["", {"version": 1}], ["encoder", {"version": 2, "note": "x", "f": 1.5, "b": True, "n": None}]],
        [],
    ],
)
def test_a_state_dicts_module_versions_read_the_same_from_either_side(meta: list[Any]) -> None:
    import collections

    assert P.state_dict_metadata(meta) == meta
    assert P.state_dict_metadata(collections.OrderedDict((k, v) for k, v in meta)) == meta


@pytest.mark.parametrize(
    "meta",
    [
        [["", {"version": [1]}]],  # not a scalar
        [["", {"version": float("nan")}]],
        [["", {"version": 2**70}]],
        [[1, {"version": 1}]],  # not a prefix
        [["", {1: 1}]],
        [["", 1]],
        [["a"]],
        "x",
        {"": {"version": 1}},  # the host's JSON is pairs
        [["", {"version": 1}]] * (P.MAX_METADATA_ENTRIES // 2 + 1),
    ],
)
def test_a_state_dicts_module_versions_that_are_anything_else_are_refused(meta: Any) -> None:
    if isinstance(meta, dict):  # the worker's mapping form is accepted; JSON never has one
        assert P.state_dict_metadata(meta) is not None
        return
    assert P.state_dict_metadata(meta) is None


_HUGE = 10**400  # a JSON integer: any number of digits parses, and no float holds it


@pytest.mark.parametrize(
    "field",
    [
        {"usage": {"wall_s": _HUGE, "cpu_user_s": 0, "cpu_system_s": 0, "max_rss_kb": 0}},
        {"resources": {"cpu_s": _HUGE}},
        {"resources": {"series": [[_HUGE, 0, 0]]}},
        {"resources": {"series": [[0, -_HUGE, 0]]}},
        {"stopped": {"kind": "connect", "category": "network", "t": _HUGE}},
    ],
)
def test_a_status_number_no_float_holds_is_refused(field: dict[str, Any]) -> None:
    """Every number of the status was checked with ``math.isfinite`` or ``float()``, which raise
    OverflowError (not a ProtocolError) for an integer past 2**1024: a status with
    ``"wall_s": 1000...0`` (401 digits) raised OverflowError out of safe_load."""
    doc = json.dumps({"protocol": P.PROTOCOL_VERSION, **field}).encode()
    with pytest.raises(OutputRejected):
        read_outputs(Received(status=doc))


@pytest.mark.parametrize("stored", ["file", "span", "raw"])
def test_an_empty_tensor_whose_strides_overflow_is_refused(tmp_path: Any, stored: str) -> None:
    """Each dim was bounded alone, so an empty tensor of shape [0, 2**61, 2**61] passed (it
    holds no bytes): ``torch.empty`` of it, for a tensor named by its span or stored as raw
    bytes, raised RuntimeError ("Stride calculation overflowed") out of the host's reading."""
    import torch
    from safetensors.torch import save_file

    from sandbox import _convert

    entry = dict(_manifest()["tensors"][0], name="e", shape=[0, 2**61, 2**61], nbytes=0, sha256=None)
    held = {"e": torch.empty(0)}
    if stored == "span":
        entry["span"], held = [0, 0], {}
    elif stored == "raw":
        entry.update(dtype="complex128", stored_as="U8")
        held = {"e": torch.empty(0, dtype=torch.uint8)}
    path, source = str(tmp_path / "t.safetensors"), tmp_path / "input"
    save_file(held, path)
    source.write_bytes(b"\0" * 8)
    with pytest.raises(OutputRejected, match="strides overflow"):
        manifest = validate_manifest(_manifest(tensors=[entry]))
        _convert.load_tensors(path, manifest, source=str(source))
    # torch makes one whose strides fit, however large its dims
    fits = dict(entry, shape=[2**62 - 1, 0, 2])
    assert validate_manifest(_manifest(tensors=[fits])).tensors[0].shape == (2**62 - 1, 0, 2)
