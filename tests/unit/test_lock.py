"""Lock files: sha256sum lines with an escape for odd names, read back to pins keyed by
absolute and resolved path; what `model-sandbox lock` lists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import _files, _lock
from tests import checkpoints as ck


def test_lock_file_format(tmp_path: Path) -> None:
    entries = [("a" * 64, "dir/x.pt"), ("b" * 64, "back\\slash\nnew.pt")]
    text = _lock.render_lock(entries)
    assert text.splitlines()[1] == f"{'a' * 64}  dir/x.pt"
    assert text.splitlines()[2].startswith("\\")
    pins = _lock.parse_lock(text, base=tmp_path)
    assert pins[str(tmp_path / "dir" / "x.pt")] == "a" * 64
    assert pins[str(tmp_path / "back\\slash\nnew.pt")] == "b" * 64
    with pytest.raises(_lock.LockFileError, match="line 2"):
        _lock.parse_lock("# c\nnot a line\n")
    with pytest.raises(_lock.LockFileError, match="two different hashes"):
        _lock.parse_lock(f"{'a' * 64}  x.pt\n{'b' * 64}  x.pt\n", base=tmp_path)


def test_every_odd_name_round_trips(tmp_path: Path) -> None:
    names = [
        "plain.pt",
        "sp ace.pt",
        "tab\t.pt",
        "back\\slash.pt",
        "new\nline.pt",
        "cr\r.pt",
        "\\n-literal.pt",
        "uni-\u00e9\u4e2d.pt",
        "trailing\\",
    ]
    entries = [(f"{i:064x}", n) for i, n in enumerate(names)]
    pins = _lock.parse_lock(_lock.render_lock(entries), base=tmp_path)
    for sha, name in entries:
        assert pins[str(tmp_path / name)] == sha, name


def test_a_lock_lists_model_files_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ck.save(ck.state_dict(), tmp_path / "weights.bin")  # no telling suffix needed
    (tmp_path / "model.pt").write_text("a text file named like a model")
    os.symlink(model, tmp_path / "link.bin")
    monkeypatch.chdir(tmp_path)
    entries = _lock.lock_entries(["."])
    sha = _files.sha256_file(str(model))[0]
    assert ("weights.bin" in [p for _, p in entries]) and all(s == sha for s, _ in entries)
    assert "model.pt" not in [p for _, p in entries]
    pins = _lock.read_lock(_write(tmp_path / "lock", _lock.render_lock(entries)))
    assert pins[str(model)] == sha


def test_an_unreadable_lock_file_is_a_lock_file_error(tmp_path: Path) -> None:
    with pytest.raises(_lock.LockFileError, match="cannot read"):
        _lock.read_lock(tmp_path / "absent")
    with pytest.raises(_lock.LockFileError, match="cannot read"):
        _lock.read_lock(_write(tmp_path / "binary", b"\xff\xfe"))


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path
