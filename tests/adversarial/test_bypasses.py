"""Published scanner-bypass techniques, each in a file the test builds, each proven live on the
host in a throw-away subprocess, then loaded through model-sandbox: the kernel sees what the
payload does, the verdict is malicious, and the marker never appears on the host.

Payloads only create a marker file in the test's own temporary directory.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import sandbox
from tests import checkpoints as ck

# every test once per runner (Docker and bubblewrap): the same payloads, the same assertions
pytestmark = pytest.mark.usefixtures("each_runner")


def system_payload(marker: Path) -> ck.Reduce:
    return ck.Reduce(os.system, f"touch {marker}")


def assert_contained(path: Path, marker: Path, *, live: str = "torch") -> sandbox.LoadReport:
    """Prove the file is live on the host, then prove the sandbox ran it without effect."""
    code = {
        "torch": "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
        "numpy": "import sys, numpy; numpy.load(sys.argv[1], allow_pickle=True)",
        "pickle": "import sys, pickle; pickle.load(open(sys.argv[1], 'rb'))",
    }[live]
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120, check=False)
    assert marker.exists(), "the payload is not live"
    marker.unlink()

    report = sandbox.scan(path)
    assert not marker.exists()
    assert report.tool["runner"] == os.environ["MODEL_SANDBOX_RUNNER"]
    assert report.verdict is sandbox.Verdict.MALICIOUS, report.to_text()
    with pytest.raises(sandbox.SandboxViolation):
        sandbox.safe_load(path, weights_only=False)
    assert not marker.exists()
    return report


def execs(report: sandbox.LoadReport, marker: Path) -> list[sandbox.Event]:
    return [
        e
        for e in report.events
        if e.source == "kernel" and e.kind == "execve" and str(marker) in " ".join(e.detail.get("argv", []))
    ]


def test_numpy_object_array(tmp_path: Path) -> None:
    # picklescan/modelscan advisories on .npy object arrays: the pickle sits after the header
    marker = tmp_path / "npy-marker"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = system_payload(marker), 1
    path = tmp_path / "weights.npy"
    np.save(path, arr, allow_pickle=True)
    report = assert_contained(path, marker, live="numpy")
    assert execs(report, marker)


def test_legacy_tar_payload_in_storages_member(tmp_path: Path) -> None:
    # ANCHORS: legacy tar checkpoints are missed by picklescan (exit 0) and skipped by
    # modelscan; torch reads the `storages` member with the full unpickler before the rest
    marker = tmp_path / "tar-marker"
    path = tmp_path / "legacy.tar.pt"
    ck.write_legacy_tar(path, lambda ref: {"w": ref("w")}, {"w": torch.ones(2)})
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    evil = io.BytesIO()
    pickle.dump(system_payload(marker), evil, protocol=2)  # replaces the storage count
    members["storages"] = evil.getvalue()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = assert_contained(path, marker)
    assert execs(report, marker)


def test_zip_with_other_prefix_and_data_pkl_not_first(tmp_path: Path) -> None:
    # scanners that look for "archive/data.pkl" or only at the first member
    marker = tmp_path / "zip-marker"
    plain = tmp_path / "plain.pt"
    torch.save(ck.hostile_checkpoint(system_payload(marker)), plain)
    src = zipfile.ZipFile(plain)
    names = src.namelist()
    prefix = names[0].split("/")[0]
    path = tmp_path / "reordered.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name in sorted(names, key=lambda n: n.endswith("data.pkl")):  # data.pkl last
            out.writestr("innocent_name" + name[len(prefix) :], src.read(name))
    report = assert_contained(path, marker)
    assert execs(report, marker)


def test_payload_in_a_nested_pickle(tmp_path: Path) -> None:
    # fickling/picklescan: a pickle whose REDUCE feeds bytes to pickle.loads
    marker = tmp_path / "nested-marker"
    inner = pickle.dumps(system_payload(marker), protocol=4)
    path = ck.save({"w": torch.ones(2), "payload": ck.Reduce(pickle.loads, inner)}, tmp_path / "nested.pt")
    report = assert_contained(path, marker)
    assert execs(report, marker)


def test_code_object_through_marshal(tmp_path: Path) -> None:
    # marshal.loads of a code object handed to exec: no os/subprocess global appears anywhere
    # in the pickle, the command lives in compiled bytecode
    import marshal

    marker = tmp_path / "marshal-marker"
    code = compile(f"__import__('os').system('touch {marker}')", "<payload>", "exec")
    payload = ck.Reduce(exec, ck.Reduce(marshal.loads, marshal.dumps(code)))
    path = ck.save({"w": torch.ones(2), "payload": payload}, tmp_path / "marshal.pt")
    report = assert_contained(path, marker)
    assert execs(report, marker)


def test_stack_global_through_memo_and_frames(tmp_path: Path) -> None:
    # protocol 4: STACK_GLOBAL operands come from the memo, split across FRAMEs
    marker = tmp_path / "frame-marker"
    body = pickle.dumps({"w": 1, "payload": system_payload(marker)}, protocol=4)
    path = tmp_path / "frames.pkl"
    path.write_bytes(body)
    report = assert_contained(path, marker, live="pickle")
    assert execs(report, marker)


def test_subprocess_through_a_dotted_name(tmp_path: Path) -> None:
    # dangerous callables reached through a submodule or a dotted qualname
    marker = tmp_path / "dotted-marker"
    payload = ck.Reduce(subprocess.run, ["touch", str(marker)])
    path = ck.save(ck.hostile_checkpoint(payload), tmp_path / "dotted.pt", "legacy")
    report = assert_contained(path, marker)
    assert [e for e in report.events if e.source == "kernel" and e.kind == "execve"]


def _nested_zip_pickle(marker: Path, trailing: bytes) -> bytes:
    """A raw pickle whose "storage" is torch.storage._load_from_bytes(<a torch zip>): how plain
    pickle.dump writes tensors, so the loader is not condemned by name; the zip inside carries
    the payload. ``trailing`` data after it decides whether zip readers find the inner zip."""
    inner = io.BytesIO()
    torch.save({"payload": system_payload(marker)}, inner)
    return pickle.dumps(
        {"storage": ck.Reduce(torch.storage._load_from_bytes, inner.getvalue()), "trailing": trailing},
        protocol=4,
    )


def test_payload_in_a_nested_torch_zip_at_the_tail(tmp_path: Path) -> None:
    # the inner zip's directory is near the end of the file: a zip reader finds it, so the
    # static scan reads it as a polyglot and sees the payload; the worker, like torch, reads
    # a zip only from its local header at offset 0 and unpickles the outer stream
    marker = tmp_path / "tail-zip-marker"
    path = tmp_path / "nested-zip.pkl"
    path.write_bytes(_nested_zip_pickle(marker, b""))
    report = assert_contained(path, marker, live="pickle")
    assert execs(report, marker)
    assert "posix.system" in report.static["dangerous"]


def test_payload_in_a_nested_torch_zip_followed_by_padding(tmp_path: Path) -> None:
    # the same, with 128 KiB after the inner zip: no zip reader finds its directory from the
    # end of the file, and the static scan saw nothing dangerous (the verdict rested on the
    # load's behaviour alone). torch.storage._load_from_bytes reads the bytes constant as a zip
    # from the constant's own end: so does the scan now
    marker = tmp_path / "hidden-zip-marker"
    path = tmp_path / "hidden-zip.pkl"
    path.write_bytes(_nested_zip_pickle(marker, b"\0" * (128 * 1024)))
    static = sandbox.scan(path, dynamic=False)
    assert static.verdict is sandbox.Verdict.MALICIOUS, static.to_text()
    assert "posix.system" in static.static["dangerous"]
    report = assert_contained(path, marker, live="pickle")
    assert execs(report, marker)
    assert "posix.system" in report.static["dangerous"]
    assert any(f.rule == "nested-pickle" and f.severity >= sandbox.Severity.HIGH for f in report.findings)
