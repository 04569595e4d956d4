"""Batch conversion on the real engine: 300+ files, interrupted (SIGINT, then SIGKILL) and
resumed, must end with the same tree and manifest as one uninterrupted run, and leave no
container behind.

Cost: a real sandboxed load takes ~1.5-2 s on this 2-core machine, so 300 real loads would take
4-5 minutes per run. The batch is therefore made of 16 files that really go through a container
(benign files of every format the sandbox converts, odd names, a symlink, a file only root may
read, a hostile pickle, a corrupt pickle) and ~290 that the batch settles before any container
runs: non-model files (skipped), empty files (skipped), truncated torch zips (failed statically)
and valid checkpoints whose hash differs from the lock file (refused before opening)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sandbox import _batch
from sandbox._launch import LABEL, connect
from tests import checkpoints as ck
from tests.container.conftest import Cli
from tests.fakes import snapshot

REAL_LOADS = 16
# Alone on the engine: a SIGKILLed batch's containers are for its own next run to remove (another
# process's orphan sweep would hide whether it did), and the last test looks at every batch's.
pytestmark = pytest.mark.serial


def make_inputs(root: Path) -> Path:
    src = root / "src"
    for d in ("models/zip", "models/legacy", "misc/ünï cödé", "docs", "broken", "pinned"):
        (src / d).mkdir(parents=True, exist_ok=True)
    for i in range(4):
        ck.save({"w": torch.full((3,), float(i)), "step": i}, src / "models/zip" / f"m{i}.pt")
    for i in range(3):
        ck.save(ck.state_dict(), src / "models/legacy" / f"old {i}.pth", fmt="legacy")
    ck.save(ck.nested_checkpoint(), src / "misc/ünï cödé/nested ckpt.bin")
    np.save(src / "misc/array.npy", np.arange(6, dtype=np.float32))
    np.savez(src / "misc/arrays.npz", a=np.ones(2), b=np.zeros(3))
    ck.save(ck.views_checkpoint(), src / "misc/views.pt")
    ck.save({"w": torch.ones(2)}, src / "misc/no extension")
    root_only = ck.save({"w": torch.ones(4)}, src / "misc/root-only.pt")
    os.chmod(root_only, 0o600)  # staged by the host for the sandbox's uid
    os.symlink("../models/zip/m0.pt", src / "misc/link-to-m0.pt")
    ck.save(
        ck.hostile_checkpoint(ck.code_payload("import os\nos.system('touch /tmp/pwned')")),
        src / "misc/evil.pt",
    )
    (src / "broken/corrupt.pt").write_bytes(b"\x80\x04\x95garbage that is not a pickle")
    zip_bytes = (src / "models/zip/m0.pt").read_bytes()
    for i in range(20):
        (src / "broken" / f"truncated {i}.pt").write_bytes(zip_bytes[: 40 + 7 * i])
        (src / "broken" / f"empty {i}.pt").write_bytes(b"")
    for i in range(200):
        (src / "docs" / f"note {i:03d}.txt").write_text(f"not a model {i}\n")
    for i in range(50):
        ck.save({"w": torch.tensor([float(i)])}, src / "pinned" / f"p{i:02d}.pt")
    return src


def ours(outdir: Path) -> list[str]:
    label = f"{_batch.BATCH_LABEL}={_batch.batch_id(outdir)}"
    return [str(c["Names"][0]).lstrip("/") for c in connect().containers([label])]


def converted(outdir: Path) -> int:
    return sum(r.status is _batch.Status.CONVERTED for r in _batch.read_manifest(outdir).values())


def interrupt_after(args: list[str], outdir: Path, sig: int, records: int, cwd: Path) -> int:
    """Start the CLI, send ``sig`` once the manifest holds ``records`` finished loads."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = outdir / _batch.MANIFEST_NAME
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = converted(outdir) if manifest.exists() else 0
            if done >= records:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch finished before it could be interrupted"
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_large_batch_interrupted_and_resumed_matches_one_run(tmp_path: Path, cli: Cli) -> None:
    src = make_inputs(tmp_path)
    lock = cli("lock", "src", cwd=tmp_path, timeout=500)
    assert lock.returncode == 0, lock.stderr
    (tmp_path / "models.lock").write_text(lock.stdout)
    for i in range(50):  # changed after locking: refused before any sandbox
        ck.save({"w": torch.tensor([float(i) + 0.5])}, src / "pinned" / f"p{i:02d}.pt")
    total = sum(1 for p in src.rglob("*") if not p.is_dir())
    assert total >= 300

    common = ["convert", "src", "--lock", "models.lock", "--jobs", "2", "-q"]
    t0 = time.monotonic()
    ref = cli(*common, "-o", "ref", cwd=tmp_path, timeout=500)
    one_run_s = time.monotonic() - t0
    assert ref.returncode == 2, ref.stdout + ref.stderr  # errors present: exit 2
    summary = ref.stdout
    assert "MALICIOUS  misc/evil.pt" in summary or "SUSPICIOUS misc/evil.pt" in summary
    assert "broken/corrupt.pt" in summary and "pinned/p00.pt: hash-mismatch" in summary
    records = _batch.read_manifest(tmp_path / "ref")
    assert len(records) == total
    status = {k: r.status.value for k, r in records.items()}
    assert sum(v == "converted" for v in status.values()) == REAL_LOADS - 2
    assert status["misc/evil.pt"] == "refused" and status["broken/corrupt.pt"] == "failed"
    assert status["docs/note 000.txt"] == "skipped" and status["broken/empty 0.pt"] == "skipped"
    assert records["broken/truncated 3.pt"].reference == "malformed-input"
    assert records["pinned/p07.pt"].reference == "hash-mismatch"
    assert (tmp_path / "ref/misc/ünï cödé/nested ckpt.safetensors").is_file()
    assert (tmp_path / "ref/misc/link-to-m0.safetensors").is_file()
    assert (tmp_path / "ref/misc/root-only.safetensors").is_file()
    assert not (tmp_path / "ref/misc/evil.safetensors").exists()
    assert not ours(tmp_path / "ref")

    # SIGINT part-way, then SIGKILL part-way, then run to the end
    out = tmp_path / "out"
    code = interrupt_after([*common, "-o", "out"], out, signal.SIGINT, 3, tmp_path)
    assert code == 130
    assert not ours(out), "SIGINT left a container of this batch behind"
    after_int = converted(out)
    killed = interrupt_after([*common, "-o", "out"], out, signal.SIGKILL, after_int + 3, tmp_path)
    assert killed == -signal.SIGKILL
    t0 = time.monotonic()
    final = cli(*common, "-o", "out", cwd=tmp_path, timeout=500)
    resume_s = time.monotonic() - t0
    assert final.returncode == 2, final.stdout + final.stderr
    assert "unchanged since the last run" in final.stdout
    assert not ours(out), "a container of this batch remained"
    assert snapshot(out) == snapshot(tmp_path / "ref")
    assert not list(out.rglob("*.tmp"))

    # a second full run redoes nothing; the BOM lists every converted model
    t0 = time.monotonic()
    again = cli(*common, "-o", "out", cwd=tmp_path, timeout=500)
    noop_s = time.monotonic() - t0
    assert f"({REAL_LOADS} unchanged since the last run" in again.stdout  # static ones recomputed
    assert noop_s < one_run_s
    bom = cli("bom", "out", "-o", "bom.json", cwd=tmp_path, timeout=500)
    assert bom.returncode == 0, bom.stderr
    models = json.loads((tmp_path / "bom.json").read_text())["components"]
    assert len(models) == REAL_LOADS - 2
    print(
        f"\nbatch of {total} files: one run {one_run_s:.1f} s, resume after SIGINT+SIGKILL "
        f"{resume_s:.1f} s, no-op re-run {noop_s:.1f} s"
    )


def test_worker_label_filter_shows_nothing_left() -> None:
    """After the batches above, ``docker ps -a --filter label=org.model-sandbox=worker`` lists
    no container of a batch (other sessions' single loads may come and go)."""
    left = connect().containers([f"{LABEL}=worker"])
    assert not [c for c in left if _batch.BATCH_LABEL in (c.get("Labels") or {})]
