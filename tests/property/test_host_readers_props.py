"""Everything the host reads from a sandbox is untrusted: any manifest, skeleton, status or
event stream gives validated data or a typed SandboxError, quickly and in bounded memory --
never a traceback, a hang, or an exit code 1 without a report. (Issue: a Fraction exponent that
computed for minutes, a dtype of the wrong JSON type, a node kind that was a list.)"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import _convert, _events, _extract
from sandbox._channel import Received
from sandbox._worker import _protocol as P
from sandbox.errors import SandboxError

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40,
)
KINDS = sorted(P.NODE_KINDS) + ["nope"]
NODE = st.recursive(
    JSON,
    lambda inner: st.fixed_dictionaries(
        {"$": st.sampled_from(KINDS) | JSON},
        optional={
            "items": st.lists(inner | st.lists(inner, max_size=2), max_size=4),
            "v": inner,
            "type": st.sampled_from(sorted(P.VALUE_TYPES)) | JSON,
            "ref": JSON,
            "kind": JSON,
            "re": inner,
            "im": inner,
            "b64": JSON,
            "state": inner,
            "dtype": JSON,
        },
    ),
    max_leaves=30,
)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bounded(fn: Any, *args: Any, **kwargs: Any) -> None:
    start = time.monotonic()
    try:
        fn(*args, **kwargs)
    except SandboxError:
        pass
    assert time.monotonic() - start < 2.0


@SETTINGS
@given(NODE, st.booleans())
def test_any_skeleton_rebuilds_or_is_refused(node: Any, weights_only: bool) -> None:
    import torch

    bounded(_convert.rebuild, node, {"t": torch.zeros(2)}, weights_only=weights_only)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(
            ["protocol", "format", "tensors", "views", "layout", "skeleton", "notes", "unrepresentable"]
        ),
        JSON,
    ),
    st.lists(
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "dtype",
                    "shape",
                    "stride",
                    "stored_as",
                    "nbytes",
                    "sha256",
                    "location",
                    "base",
                    "offset",
                    "key",
                    "parameter",
                ]
            ),
            JSON,
        ),
        max_size=3,
    ),
)
def test_any_manifest_validates_or_is_refused(doc: dict[str, Any], entries: list[Any]) -> None:
    doc = {"protocol": P.PROTOCOL_VERSION, **doc}
    for key in ("tensors", "views", "layout"):
        if key in doc:
            doc[key] = entries
    bounded(_extract.validate_manifest, doc)


@SETTINGS
@given(st.dictionaries(st.text(max_size=12), JSON, max_size=8))
def test_any_status_validates_or_is_refused(doc: dict[str, Any]) -> None:
    doc = {"protocol": P.PROTOCOL_VERSION, **doc}
    bounded(_extract.read_status, Received(status=json.dumps(doc).encode()))


@SETTINGS
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["id", "t", "source", "kind", "detail", "action"]), JSON), max_size=5
    ),
    JSON,
)
def test_any_event_stream_is_parsed_or_skipped(lines: list[Any], status: Any) -> None:
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    try:
        doc = (
            P.Status.from_obj({**status, "protocol": P.PROTOCOL_VERSION})
            if isinstance(status, dict)
            else None
        )
    except P.ProtocolError:
        doc = None  # the host refuses such a status before monitoring reads it
    bounded(_events.read, data, doc, {})


@pytest.mark.parametrize(
    "node",
    [
        {"$": "value", "type": "fractions.Fraction", "v": "1e999999999"},
        {"$": "value", "type": "decimal.Decimal", "v": "1e999999999"},
        {"$": "value", "type": "builtins.range", "v": [0, 10**30, 1]},
        {"$": "value", "type": "datetime.timedelta", "v": [10**20, 0, 0]},
        {"$": ["list"], "items": []},
        {"$": "tensor", "ref": ["t"]},
        {"$": "dict", "kind": "dict", "items": [[[1], 2]]},
    ],
)
def test_reported_attacks_on_the_skeleton(node: Any) -> None:
    import torch

    bounded(_convert.rebuild, node, {"t": torch.zeros(2)}, weights_only=False)


@pytest.mark.parametrize("unit", [b"[],", b"{},", b"0,", b'"":0,'])
def test_a_manifest_of_tiny_values_is_refused_before_it_is_parsed(unit: bytes) -> None:
    """64 MB of ``[],`` would be 21 million Python lists (1.4 GB) if parsed: refused from a
    count of its separators, in well under a second, without building anything."""
    data = b"[" + unit * ((P.MAX_JSON_BYTES - 3) // len(unit)) + b"0]"
    assert len(data) <= P.MAX_JSON_BYTES
    started = time.monotonic()
    with pytest.raises(SandboxError, match="JSON values"):
        _extract._parse_json(data, "manifest")
    assert time.monotonic() - started < 5
    if unit != b'"":0,':  # the same shape, small, is parsed
        assert len(_extract._parse_json(b"[" + unit * 1000 + b"0]", "manifest")) == 1001
