"""The error tree: every error a caller may catch is a class with its stable reference, and
each also derives from what ``torch.load`` raises in the same case."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest

import sandbox
from sandbox import errors


def test_every_error_has_its_own_reference_on_the_class() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SandboxError)]
    refs = {c: c.reference for c in classes}
    assert all(r and r == r.lower() and " " not in r for r in refs.values())
    assert all(c.__name__ in sandbox.__all__ for c in classes)


@pytest.mark.parametrize(
    "cls,torch_base",
    [
        (errors.SandboxViolation, pickle.UnpicklingError),
        (errors.UnverifiedWeights, pickle.UnpicklingError),
        (errors.UnrepresentableObject, pickle.UnpicklingError),
        (errors.UnsupportedFormat, pickle.UnpicklingError),
        (errors.UnpicklingFailed, pickle.UnpicklingError),
        (errors.MalformedInput, RuntimeError),
        (errors.TruncatedInput, EOFError),
        (errors.TruncatedInput, pickle.UnpicklingError),
        (errors.LoadFailed, RuntimeError),
        (errors.LimitExceeded, RuntimeError),
    ],
)
def test_errors_are_what_torch_raises_too(cls: type, torch_base: type) -> None:
    assert issubclass(cls, torch_base) and issubclass(cls, errors.SandboxError)


def test_a_statically_refused_file_is_caught_as_an_unpickling_error(tmp_path: object) -> None:
    """No engine needed: the static scan refuses it before any sandbox starts."""
    import os
    from pathlib import Path

    from tests import checkpoints as ck

    tmp = Path(str(tmp_path))
    path = ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, "true")), tmp / "evil.pt")

    class NoRunner:
        def __getattr__(self, name: str) -> object:
            raise AssertionError("the sandbox must not be needed")

    with pytest.raises(pickle.UnpicklingError) as info:
        sandbox.safe_load(path, runner=NoRunner())  # type: ignore[arg-type]
    assert info.value.report.verdict is sandbox.Verdict.MALICIOUS  # type: ignore[attr-defined]


def test_an_empty_file_is_an_eof_error(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(EOFError):
        sandbox.safe_load(path)


# One construction of every error class with each of its details given (a test below checks
# that the table covers the whole tree).
_REPORT = sandbox.LoadReport(input_path="x.pt", verdict=sandbox.Verdict.MALICIOUS)
_EVERY_ERROR: list[tuple[type[errors.SandboxError], dict[str, object]]] = [
    (errors.SandboxError, {}),
    (errors.InputError, {"path": "x.pt"}),
    (errors.InputNotFound, {"path": "x.pt"}),
    (errors.UnsupportedFormat, {"path": "x.pt", "detected": "safetensors"}),
    (errors.MalformedInput, {"path": "x.pt", "offset": 8}),
    (errors.TruncatedInput, {"path": "x.pt", "offset": 0}),
    (errors.MalformedStream, {"path": "x.pt", "offset": 3, "member": "data.pkl", "partial": None}),
    (errors.InputUnreadable, {"path": "x.pt"}),
    (errors.NotPinned, {"path": "x.pt"}),
    (errors.HashMismatch, {"path": "x.pt", "expected": "a" * 64, "actual": "b" * 64}),
    (errors.EngineError, {}),
    (errors.EngineUnavailable, {}),
    (errors.ImageMissing, {"tag": "model-sandbox-worker:1"}),
    (errors.ImageMismatch, {"tag": "model-sandbox-worker:1", "expected": "sha256:a", "found": "sha256:b"}),
    (errors.LoadFailed, {"report": _REPORT}),
    (errors.UnpicklingFailed, {"report": _REPORT}),
    (errors.LimitExceeded, {"limit": "memory", "value": 1 << 30, "report": _REPORT}),
    (errors.OutputRejected, {"item": "manifest.json"}),
    (errors.UnrepresentableObject, {"types": ["collections.OrderedDict", "argparse.Namespace"]}),
    (errors.PolicyError, {"source": "p.toml", "problems": ["threshold: unknown verdict"]}),
    (errors.SandboxViolation, {"report": _REPORT}),
    (errors.UnverifiedWeights, {"report": _REPORT, "names": ["w", "b"]}),
    (errors.BatchError, {}),
    (errors.ClusterError, {}),
    (errors.WorkerNotReady, {"worker": "tcp://w:1", "expected": "a" * 64, "found": "b" * 64}),
    (errors.LockFileError, {}),
    (errors.ReportInvalid, {"path": "r.json", "problem": "verdict"}),
    (errors.InternalError, {}),
]


def test_the_table_of_constructions_covers_every_error() -> None:
    assert sorted(cls.__name__ for cls, _ in _EVERY_ERROR) == sorted(errors.__all__)


@pytest.mark.parametrize("cls,details", _EVERY_ERROR, ids=lambda v: getattr(v, "__name__", ""))
def test_every_error_pickles_with_its_message_details_and_class(
    cls: type[errors.SandboxError], details: dict[str, object]
) -> None:
    """Errors cross Dask's wire (and process pools) by pickle: a constructor that wants its
    details as keywords must not be called again with the message alone."""
    exc = cls("what happened", hint="what to do", **details)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (back.message, back.args, back.hint) == ("what happened", ("what happened",), "what to do")
    assert {name: getattr(back, name) for name in details} == details
    assert vars(back) == vars(exc)
    assert back.diagnostics() == exc.diagnostics()


@pytest.mark.parametrize(
    "make",
    [
        lambda: errors.MalformedInput("m", ofset=8),  # a typo
        lambda: errors.InputError("m", report=_REPORT),  # only a load's errors take its report
        lambda: errors.SandboxError("m", path="x.pt"),
        lambda: errors.ReportInvalid("m", problems=["x"]),
        lambda: errors.WorkerNotReady("m", reference="other"),  # not a detail: set by the class
    ],
)
def test_an_undeclared_detail_is_a_type_error(make: Callable[[], object]) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        make()


@pytest.mark.parametrize(
    "make,missing",
    [
        (lambda: errors.HashMismatch("m", expected="a", actual="b"), "path"),
        (lambda: errors.HashMismatch("m", path=None, expected="a"), "actual"),
        (lambda: errors.ImageMissing("m"), "tag"),
        (lambda: errors.ImageMismatch("m", tag="t", found="f"), "expected"),
        (lambda: errors.LimitExceeded("m", value=3), "limit"),
        (lambda: errors.UnrepresentableObject("m"), "types"),
        (lambda: errors.SandboxViolation("m"), "report"),
        (lambda: errors.UnverifiedWeights("m", names=["w"]), "report"),
    ],
)
def test_a_missing_required_detail_is_a_type_error(make: Callable[[], object], missing: str) -> None:
    with pytest.raises(TypeError, match=f"missing required keyword argument '{missing}'"):
        make()


def test_details_left_out_take_their_defaults() -> None:
    assert errors.InputError("m").path is None
    assert errors.UnsupportedFormat("m").detected == "unknown"
    stream = errors.MalformedStream("m")
    assert (stream.path, stream.offset, stream.member, stream.partial) == (None, None, None, None)
    assert errors.LoadFailed("m").report is None
    limit = errors.LimitExceeded("m", limit="pids")
    assert (limit.limit, limit.value, limit.report) == ("pids", None, None)
    assert errors.OutputRejected("m").item is None
    policy = errors.PolicyError("m")
    assert (policy.source, policy.problems) == (None, [])
    assert errors.UnverifiedWeights("m", report=_REPORT).names == []
    worker = errors.WorkerNotReady("m")
    assert (worker.worker, worker.expected, worker.found) == ("", "", "")
    invalid = errors.ReportInvalid("m")
    assert (invalid.path, invalid.problem) == (None, "")
    # every detail is the instance's own attribute, as a hand-written constructor set it
    assert vars(errors.MalformedInput("m")) == {"message": "m", "path": None, "offset": None}
    # the class's hint unless the raiser gives one
    assert errors.BatchError("m").hint == errors.BatchError.hint
    assert errors.BatchError("m", hint="use another OUTDIR").hint == "use another OUTDIR"


def test_details_keep_their_conversions() -> None:
    from pathlib import Path

    assert errors.InputNotFound("m", path=Path("/models/x.pt")).path == "/models/x.pt"
    assert errors.HashMismatch("m", path=Path("x.pt"), expected="a", actual="b").path == "x.pt"
    assert errors.PolicyError("m", problems=None).problems == []
    assert errors.PolicyError("m", problems=("a", "b")).problems == ["a", "b"]


def test_list_details_are_never_shared() -> None:
    first, second = errors.PolicyError("m"), errors.PolicyError("m")
    first.problems.append("x")
    assert second.problems == [] and errors.PolicyError("m").problems == []
    given = ["w"]
    weights = errors.UnverifiedWeights("m", report=_REPORT, names=given)
    weights.names.append("b")
    assert given == ["w"]  # copied, not kept
    assert errors.UnverifiedWeights("m", report=_REPORT).names == []
