"""The supervisor's parsing of what the loader sends it is total: any bytes in, a bounded
record or a count of malformed lines out, never an exception (a loader that could crash PID 1
would silence the monitor). Issue: deeply nested JSON and oversized numbers used to raise."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox._worker import _protocol as P
from sandbox._worker.__main__ import _bounded_result, _EventLog, _SelfReports

NASTY = [
    b"[" * 100_000,
    b'{"kind": "x", "detail": {}, "t": 1e999999}',
    b'{"kind": "x", "detail": {}, "t": 123456789012345678901234567890}',
    b'{"kind": "x", "detail": ' + b"[" * 50_000 + b"]" * 50_000 + b', "t": 1}',
    b'{"kind": "x", "detail": {"a": ' + b'{"b": ' * 5000 + b"1" + b"}" * 5000 + b'}, "t": 1}',
    b"\xff\xfe\x00",
    b'{"kind": 1, "detail": [], "t": "x"}',
    b"NaN",
    b"-Infinity",
]


def feed_all(chunks: list[bytes]) -> _EventLog:
    log = _EventLog({"AWS": "AKIAXXXXXXXXXXXXXXXX"})
    reports = _SelfReports(log)
    for c in chunks:
        reports.feed(c)
    log.finish(1.0)
    return log


def test_known_attacks_on_the_supervisor_parser() -> None:
    log = feed_all([line + b"\n" for line in NASTY])
    assert log.counts.get("self_reported:malformed:recorded", 0) >= 5
    for line in log.lines:
        assert len(line) <= P.MAX_EVENT_LINE and json.loads(line)
    for raw in NASTY:
        result = _bounded_result(raw)
        assert result is None or set(result) <= {
            "ok",
            "kind",
            "message",
            "type",
            "format",
            "detected",
            "tensors",
            "handoff",
        }


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=20))
def test_any_bytes_are_parsed_totally(chunks: list[bytes]) -> None:
    log = feed_all(chunks + [b"\n"])
    assert all(len(line) <= P.MAX_EVENT_LINE for line in log.lines)
    assert len(log.counts) <= 256 + 3


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=50,
    )
)
def test_any_json_event_is_bounded(detail: object) -> None:
    doc = {"kind": "k" * 100, "detail": detail, "t": 1.0}
    line = json.dumps(doc).encode() + b"\n"
    log = feed_all([line, json.dumps({"kind": "x", "detail": {"d": detail}, "t": 2}).encode() + b"\n"])
    for out in log.lines:
        ev = json.loads(out)
        assert len(ev["kind"]) <= 64 and len(out) <= P.MAX_EVENT_LINE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_any_result_message_is_bounded(raw: bytes) -> None:
    result = _bounded_result(raw)
    assert result is None or (isinstance(result.get("ok"), bool) and len(json.dumps(result)) < 6000)


def test_the_number_of_counters_is_bounded() -> None:
    lines = [json.dumps({"kind": f"k{i}", "detail": {}, "t": 1}).encode() + b"\n" for i in range(2000)]
    log = feed_all(lines)
    assert len(log.counts) <= 257 and log.counts["self_reported:other:recorded"] > 0


def _records(log: _EventLog) -> list[tuple[object, object, object]]:
    return [(e["source"], e["kind"], e["detail"]) for e in map(json.loads, log.lines)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(
                lambda k, n: json.dumps({"kind": k, "detail": {"n": n}, "t": 0.5}).encode(),
                st.text(max_size=8),
                st.integers(),
            ),
            st.binary(max_size=5000),
        ),
        max_size=30,
    ),
    st.lists(st.integers(min_value=1, max_value=7000), min_size=1, max_size=10),
)
def test_how_the_stream_is_cut_into_chunks_changes_no_record(lines: list[bytes], cuts: list[int]) -> None:
    """The same bytes give the same records, read at once or in chunks of any sizes (a line
    split across reads, a long partial line dropped as it grows past the bound only if it
    never ends within the bound)."""
    stream = b"\n".join(lines) + b"\n"
    chunks, at, i = [], 0, 0
    while at < len(stream):
        n = cuts[i % len(cuts)]
        chunks.append(stream[at : at + n])
        at, i = at + n, i + 1
    whole = feed_all([stream])
    cut = feed_all(chunks)
    if all(len(line) <= 4096 for line in lines):
        assert _records(cut) == _records(whole)
        assert cut.counts == whole.counts
