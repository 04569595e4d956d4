"""``model-sandbox scan`` of directories and Hugging Face caches (static scan only here: no
daemon; the dynamic path is the same ``scan`` per file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from sandbox import _api, _cli, _hfcache
from tests import checkpoints as ck


def hub(root: Path, outside: Path) -> Path:
    """A cache with one model and two revisions sharing a weights blob; the second revision
    adds a hostile file and a link that leaves the cache."""
    model = root / "models--org--tiny"
    blobs = model / "blobs"
    blobs.mkdir(parents=True)
    ck.save(ck.state_dict(), blobs / "aaa")
    ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, "true")), blobs / "bbb")
    (blobs / "ccc").write_text(json.dumps({"model_type": "tiny"}))
    ck.save({"w": torch.ones(1)}, outside)
    for rev, files in (
        ("1111aaaa", {"pytorch_model.bin": "aaa", "config.json": "ccc"}),
        ("2222bbbb", {"pytorch_model.bin": "aaa", "extra/evil.bin": "bbb"}),
    ):
        for name, blob in files.items():
            link = model / "snapshots" / rev / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blobs / blob, link.parent))
    (model / "snapshots" / "2222bbbb" / "escape.bin").symlink_to(outside)
    return root


def test_a_hub_cache_is_read_as_models_and_revisions(tmp_path: Path) -> None:
    root = hub(tmp_path / "hub", tmp_path / "outside.pt")
    targets = _hfcache.expand(str(root))
    assert [(t.repo, t.revision, t.label.split(": ")[1]) for t in targets] == [
        ("org/tiny", "1111aaaa", "pytorch_model.bin"),
        ("org/tiny", "2222bbbb", "pytorch_model.bin"),
        ("org/tiny", "2222bbbb", "extra/evil.bin"),
    ]  # no config.json, no escaping link
    assert targets[0].real == targets[1].real  # one blob
    # one model directory of the cache reads the same
    assert _hfcache.expand(str(root / "models--org--tiny")) == targets


def test_scan_of_a_cache_scans_each_blob_once_and_groups_by_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = hub(tmp_path / "hub", tmp_path / "outside.pt")
    scanned: list[str] = []
    real_scan = _api.scan

    def counting(path: Any, **kw: Any) -> Any:
        scanned.append(os.path.realpath(path))
        return real_scan(path, **kw)

    monkeypatch.setattr(_api, "scan", counting)
    code = _cli.main(["scan", "--static-only", str(root)])
    out = capsys.readouterr().out
    assert code == 1  # the hostile file
    assert len(scanned) == 2 and len(set(scanned)) == 2
    assert "org/tiny @ 1111aaaa" in out and "org/tiny @ 2222bbbb" in out
    assert "MALICIOUS  extra/evil.bin" in out and out.count("CLEAN      pytorch_model.bin") == 2
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    assert _cli.main(["scan", "--static-only", "--hf-cache", "--format", "json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [Path(r["input_path"]).name for r in reports] == [
        "pytorch_model.bin",
        "pytorch_model.bin",
        "evil.bin",
    ]


def test_a_plain_directory_is_walked_for_checkpoints_by_content(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    ck.save(ck.state_dict(), d / "sub" / "weights.data")  # the name does not matter
    (d / "notes.txt").write_text("not a model")
    (d / "link.pt").symlink_to(tmp_path / "elsewhere.pt")
    ck.save(ck.state_dict(), tmp_path / "elsewhere.pt")
    assert [Path(t.path).name for t in _hfcache.expand(str(d))] == ["weights.data"]
