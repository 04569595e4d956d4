"""``model-sandbox scan`` of a Hugging Face cache through the real sandbox: every blob loaded
once, results per model and revision, the hostile file's payload contained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import _cli
from tests import checkpoints as ck


def test_a_hub_cache_scanned_in_the_sandbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "hub" / "models--org--tiny"
    blobs = model / "blobs"
    blobs.mkdir(parents=True)
    ck.save(ck.state_dict(), blobs / "aaa")
    ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), blobs / "bbb")
    for rev, files in (
        ("r1", {"pytorch_model.bin": "aaa"}),
        ("r2", {"pytorch_model.bin": "aaa", "evil.bin": "bbb"}),
    ):
        for name, blob in files.items():
            link = model / "snapshots" / rev / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blobs / blob, link.parent))
    assert _cli.main(["scan", "--policy", "audit", str(tmp_path / "hub")]) == 1
    out = capsys.readouterr().out
    assert "org/tiny @ r1" in out and "org/tiny @ r2" in out
    assert out.count("CLEAN      pytorch_model.bin") == 2
    assert "MALICIOUS  evil.bin" in out
    assert not marker.exists()
