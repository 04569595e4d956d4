"""The error tree: every error a caller may catch is a class with its stable reference, and
each also derives from what ``torch.load`` raises in the same case."""

from __future__ import annotations

import pickle

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
