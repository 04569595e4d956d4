"""``MODEL_SANDBOX_PATCH=1`` covers unmodified scripts: a plain ``torch.load`` in a script that
knows nothing of the sandbox loads a benign file's weights through it and raises on a hostile
file, whose payload never runs on the host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from sandbox import _autopatch, _cli
from tests import checkpoints as ck

SCRIPT = """
import sys, torch
try:
    obj = torch.load(sys.argv[1])
    print("loaded", float(obj["state_dict"]["encoder.weight"].sum()) if "state_dict" in obj
          else float(obj["encoder.weight"].sum()))
except Exception as exc:
    import pickle
    print("refused", isinstance(exc, pickle.UnpicklingError), type(exc).__name__)
"""


def test_an_unmodified_script_loads_through_the_sandbox(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    _cli.main(["patch", "install", "--target", str(site_dir)])
    script = tmp_path / "train.py"
    script.write_text("import site; site.addsitedir(" + repr(str(site_dir)) + ")\n" + SCRIPT)
    sd = ck.state_dict()
    benign = ck.save(sd, tmp_path / "good.pt")
    marker = tmp_path / "marker"
    hostile = ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), tmp_path / "evil.pt")
    env = {**os.environ, _autopatch.ENV: "1"}

    def run(path: Path) -> str:
        return subprocess.run(
            [sys.executable, str(script), str(path)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout.strip()

    assert run(benign) == f"loaded {float(sd['encoder.weight'].sum())}"
    assert run(hostile) == "refused True SandboxViolation"
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"  # this process was never patched
