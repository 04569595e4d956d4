"""What a Dask worker sends back is untrusted: the client's checks (no cluster, no daemon)."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sandbox import ClusterError, WorkerNotReady, _batch, _distribute
from sandbox._worker import _protocol as P
from sandbox.policy import Policy
from sandbox.report import LoadReport, Verdict

SRC_SHA = "ab" * 32


def converted_bytes(tmp: Path, source_sha: str = SRC_SHA) -> bytes:
    path = tmp / "made.safetensors"
    save_file(
        {"w": np.arange(6, dtype=np.float32), "b": np.zeros((2, 0), dtype=np.int64)},
        str(path),
        metadata={"format": "pt", "model_sandbox.source_sha256": source_sha},
    )
    return path.read_bytes()


def write(tmp: Path, data: bytes) -> Path:
    path = tmp / "got.safetensors"
    path.write_bytes(data)
    return path


def test_a_genuine_conversion_passes(tmp_path: Path) -> None:
    data = converted_bytes(tmp_path)
    out_sha = hashlib.sha256(data).hexdigest()
    assert _distribute.check_safetensors(write(tmp_path, data), out_sha=out_sha, source_sha=SRC_SHA) is None


def test_bytes_other_than_the_reported_ones_are_rejected(tmp_path: Path) -> None:
    data = bytearray(converted_bytes(tmp_path))
    out_sha = hashlib.sha256(data).hexdigest()
    data[-1] ^= 1
    why = _distribute.check_safetensors(write(tmp_path, bytes(data)), out_sha=out_sha, source_sha=SRC_SHA)
    assert why is not None and "do not hash" in why


def test_a_conversion_of_another_input_is_rejected(tmp_path: Path) -> None:
    data = converted_bytes(tmp_path, source_sha="cd" * 32)
    why = _distribute.check_safetensors(
        write(tmp_path, data), out_sha=hashlib.sha256(data).hexdigest(), source_sha=SRC_SHA
    )
    assert why is not None and "another input" in why


def _raw(header: dict[str, object], body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + body


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "data region"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "disagree"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed"),
        ({"a": [1, 2]}, b"", "malformed"),
    ],
)
def test_malformed_headers_are_rejected(
    tmp_path: Path, header: dict[str, object], body: bytes, expected: str
) -> None:
    header["__metadata__"] = {"model_sandbox.source_sha256": SRC_SHA}
    data = _raw(header, body)
    why = _distribute.check_safetensors(
        write(tmp_path, data), out_sha=hashlib.sha256(data).hexdigest(), source_sha=SRC_SHA
    )
    assert why is not None and expected in why


@pytest.mark.parametrize("torch_dtype", sorted(P.ST_DTYPES))
def test_every_dtype_the_host_writes_passes_the_header_check(tmp_path: Path, torch_dtype: str) -> None:
    """The client accepts every dtype code a converted file may carry (the protocol's one
    table; a copy of its own once refused the fnuz float8 codes)."""
    code, size = P.ST_DTYPES[torch_dtype]
    header: dict[str, object] = {
        "__metadata__": {"model_sandbox.source_sha256": SRC_SHA},
        "a": {"dtype": code, "shape": [3], "data_offsets": [0, 3 * size]},
    }
    data = _raw(header, b"\0" * (3 * size))
    why = _distribute.check_safetensors(
        write(tmp_path, data), out_sha=hashlib.sha256(data).hexdigest(), source_sha=SRC_SHA
    )
    assert why is None, why


def test_not_safetensors_at_all(tmp_path: Path) -> None:
    for data in (
        b"",
        b"\xff" * 8 + b"{}",
        (2).to_bytes(8, "little") + b"[]",
        (5).to_bytes(8, "little") + b"{nope",
    ):
        why = _distribute.check_safetensors(
            write(tmp_path, data), out_sha=hashlib.sha256(data).hexdigest(), source_sha=SRC_SHA
        )
        assert why is not None and why.startswith("not SafeTensors"), data


# -- the client's handling of one answer --------------------------------------------------------


def setup(
    tmp_path: Path, output: str = "stream"
) -> tuple[_distribute.Remote, _batch.BatchContext, _batch.Item, Path]:
    """A client, and an item as ``_process`` hands it over: identified, hashed and placed at
    the returned destination."""
    remote = _distribute.Remote.__new__(_distribute.Remote)  # no cluster: only _accept is used
    remote.output = output
    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "m.pt"
    src.write_bytes(b"x" * 100)
    entry = _batch.Entry(rel="m.pt", source=str(src), real=str(src), size=100)
    ctx = _batch.BatchContext(
        outdir=out,
        report_root=out,
        options=_batch.BatchOptions(),
        runner=None,  # type: ignore[arg-type]
        previous={},
        out_rels={"m.pt": "m.safetensors"},
        tool={"name": "model-sandbox", "version": "0", "worker_digest": "d", "shared": "complete"},
        cancel=threading.Event(),
    )
    dst = out / "m.safetensors"
    item = _batch.Item(entry, started=0.0, started_wall=0.0, fmt="torch-zip", sha=SRC_SHA, dst=dst)
    return remote, ctx, item, dst


def report_json(
    entry: _batch.Entry, *, sha: str = SRC_SHA, out_sha: str | None = None, verdict: Verdict = Verdict.CLEAN
) -> str:
    rep = LoadReport(
        input_path=entry.source, input_sha256=sha, input_size=entry.size, format="torch-zip", verdict=verdict
    )
    if out_sha is not None:
        rep.outputs["safetensors_sha256"] = out_sha
        rep.outputs["safetensors"] = "/worker/tmp/out.safetensors"
    return rep.to_json()


def test_streamed_bytes_are_checked_then_written(tmp_path: Path) -> None:
    remote, ctx, item, dst = setup(tmp_path)
    data = converted_bytes(tmp_path)
    answer = {
        "kind": "converted",
        "data": data,
        "report": report_json(item.entry, out_sha=hashlib.sha256(data).hexdigest()),
    }
    result = remote._accept(answer, item, ctx, None)
    assert result.status is _batch.Status.CONVERTED and result.output == "m.safetensors"
    assert dst.read_bytes() == data
    assert result.load_report is not None and result.load_report.outputs["safetensors"] == str(dst)
    assert not list(dst.parent.glob(".*.tmp"))


@pytest.mark.parametrize(
    "tamper", ["other-input", "bytes", "too-big", "no-sha", "not-a-dict", "bad-report", "error-verdict"]
)
def test_tampered_answers_fail_the_file_and_write_nothing(tmp_path: Path, tamper: str) -> None:
    remote, ctx, item, dst = setup(tmp_path)
    data = converted_bytes(tmp_path)
    out_sha = hashlib.sha256(data).hexdigest()
    answer: object = {"kind": "converted", "data": data, "report": report_json(item.entry, out_sha=out_sha)}
    assert isinstance(answer, dict)
    if tamper == "other-input":
        answer["report"] = report_json(item.entry, sha="ef" * 32, out_sha=out_sha)
    elif tamper == "bytes":
        answer["data"] = data[:-1] + bytes([data[-1] ^ 1])
    elif tamper == "too-big":
        answer["data"] = data + b"\0" * ctx.options.policy.limits.output_bytes(item.entry.size)
    elif tamper == "no-sha":
        answer["report"] = report_json(item.entry)
    elif tamper == "not-a-dict":
        answer = [data]
    elif tamper == "bad-report":
        answer["report"] = "{" * 100
    elif tamper == "error-verdict":
        answer["report"] = report_json(item.entry, out_sha=out_sha, verdict=Verdict.ERROR)
    result = remote._accept(answer, item, ctx, None)
    assert result.status is _batch.Status.FAILED and result.reference == "output-rejected"
    assert result.output is None and not dst.exists()
    assert not list(dst.parent.glob(".*.tmp"))
    report = json.loads((dst.parent / "m.pt.report.json").read_text())
    assert report["verdict"] == "error" and "safetensors" not in report["outputs"]


def test_a_staged_file_is_checked_and_renamed(tmp_path: Path) -> None:
    remote, ctx, item, dst = setup(tmp_path, "shared")
    data = converted_bytes(tmp_path)
    staged = dst.parent / ".m.safetensors.0123abcd.tmp"
    answer = {
        "kind": "converted",
        "report": report_json(item.entry, out_sha=hashlib.sha256(data).hexdigest()),
    }
    missing = remote._accept(answer, item, ctx, staged)
    assert missing.status is _batch.Status.FAILED and "same path" in (missing.reason or "")
    staged.symlink_to(tmp_path / "made.safetensors")  # a link is not the worker's file
    linked = remote._accept(answer, item, ctx, staged)
    assert linked.status is _batch.Status.FAILED and not dst.exists()
    staged.unlink()
    staged.write_bytes(data)
    result = remote._accept(answer, item, ctx, staged)
    assert result.status is _batch.Status.CONVERTED and dst.read_bytes() == data
    assert not staged.exists()


def test_a_refusal_and_an_error_keep_their_meaning(tmp_path: Path) -> None:
    remote, ctx, item, _ = setup(tmp_path)
    refused = remote._accept(
        {
            "kind": "error",
            "report": report_json(item.entry, verdict=Verdict.MALICIOUS),
            "message": "unsafe",
            "reference": "sandbox-violation",
        },
        item,
        ctx,
        None,
    )
    assert refused.status is _batch.Status.REFUSED and refused.verdict is Verdict.MALICIOUS
    internal = remote._accept({"kind": "internal", "message": "boom"}, item, ctx, None)
    assert internal.status is _batch.Status.FAILED and internal.reference == "internal-error"
    with pytest.raises(_batch.EngineGone):
        remote._accept({"kind": "engine", "message": "no engine"}, item, ctx, None)


def test_cluster_errors_cross_the_wire_with_their_fields() -> None:
    exc = WorkerNotReady("refused", worker="tcp://w:1", expected="a" * 64, found="b" * 64)
    back = pickle.loads(pickle.dumps(exc))
    assert isinstance(back, WorkerNotReady) and isinstance(back, ClusterError)
    assert (back.message, back.worker, back.expected, back.found) == (
        "refused",
        "tcp://w:1",
        "a" * 64,
        "b" * 64,
    )
    assert back.diagnostics().startswith("error[worker-not-ready]: refused")


def test_readiness_plugin_travels_as_its_parameters() -> None:
    plugin = _distribute.Readiness("c" * 64, slots=3)
    plugin.state = {"ready": True, "slots": 3}
    back = pickle.loads(pickle.dumps(plugin))
    assert (back.expected, back.slots, back.state["ready"]) == ("c" * 64, 3, False)
    assert _distribute.resource_name("c" * 64) == "model-sandbox-" + "c" * 16
    assert Policy.default().digest  # the policy object is what convert_task receives


def test_cluster_output_without_a_cluster_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox._cli import main

    (tmp_path / "m.pt").write_bytes(b"x")
    code = main(
        ["convert", str(tmp_path / "m.pt"), "-o", str(tmp_path / "out"), "--cluster-output", "shared"]
    )
    assert code == 2 and "error[batch-error]: --cluster-output" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _Scheduler:
    def __init__(self, workers: dict[str, dict[str, object]] | None) -> None:
        self.workers = workers

    def scheduler_info(self) -> dict[str, object]:
        if self.workers is None:
            raise OSError("scheduler gone")
        return {"workers": self.workers}


@pytest.mark.parametrize(
    ("workers", "gone"),
    [
        ({"tcp://a:1": {"resources": {"model-sandbox-" + "d" * 16: 2.0}}}, False),
        ({"tcp://a:1": {"resources": {"model-sandbox-" + "e" * 16: 2.0}}}, True),  # another version
        ({}, True),
        (None, True),  # the scheduler does not answer
    ],
)
def test_a_cluster_without_a_ready_worker_stops_the_batch(
    workers: dict[str, dict[str, object]] | None, gone: bool
) -> None:
    remote = _distribute.Remote.__new__(_distribute.Remote)
    remote.client = _Scheduler(workers)  # type: ignore[assignment]
    remote.resource = _distribute.resource_name("d" * 64)
    remote.wait_s = 0.0
    remote._watch = threading.Lock()
    remote._none_since = None
    remote._checked = float("-inf")
    first = remote._gone()
    assert (first is not None) is gone
    if gone:
        assert first is not None and "no Dask worker ready" in first
    remote._checked = float("-inf")
    assert (remote._gone() is not None) is gone


def _full_report() -> LoadReport:
    from sandbox.report import Event, Finding, Severity

    rep = LoadReport(
        input_path="/in/m.pt",
        input_sha256=SRC_SHA,
        input_size=10,
        format="torch-zip",
        verdict=Verdict.MALICIOUS,
        tensors=2,
        tensor_bytes=8,
        duration_s=1.5,
        tool={"name": "model-sandbox"},
        policy={"name": "default", "digest": "x"},
        notes=["n"],
        error=None,
        static={"globals": ["os.system"]},
        resources={"peak_rss": 1},
    )
    rep.add(
        Finding(
            rule="exec",
            severity=Severity.CRITICAL,
            category="process",
            message="execve",
            evidence={"argv": ["sh"]},
            events=(1,),
        )
    )
    rep.events.append(
        Event(id=1, t=0.5, source="seccomp", kind="exec", detail={"path": "/bin/sh"}, action="denied")
    )
    return rep


def test_a_real_report_parses_back_equal() -> None:
    rep = _full_report()
    back = _distribute.parse_report(rep.to_json())
    assert isinstance(back, LoadReport) and back.to_json() == rep.to_json()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_path", 5),
        ("verdict", "nope"),
        ("findings", [1]),
        ("outputs", [1]),
        ("notes", 5),
        ("tensors", "x"),
        ("tensors", True),
        ("input_sha256", 5),
        ("events", {}),
        ("error", 5),
        ("tool", 3),
        ("policy", [1]),
        ("duration_s", "x"),
        ("unknown", None),
        ("schema", "other/1"),
        ("outputs", {"safetensors_sha256": 5}),
        ("findings", [{"rule": "r"}]),
    ],
)
def test_reports_of_the_wrong_shape_are_refused(field: str, value: object) -> None:
    data = json.loads(_full_report().to_json())
    data[field] = value
    assert isinstance(_distribute.parse_report(json.dumps(data)), str)


def test_non_json_numbers_and_non_objects_are_refused() -> None:
    text = _full_report().to_json().replace('"duration_s": 1.5', '"duration_s": NaN')
    assert "NaN" in text and isinstance(_distribute.parse_report(text), str)
    for bad in ("[]", "5", "{", "[" * 100000):
        assert isinstance(_distribute.parse_report(bad), str)
