"""``model-sandbox patch install`` and ``MODEL_SANDBOX_PATCH=1``: the .pth file patches
``torch.load`` once torch is imported, only when the variable is set (checked in fresh
interpreters; the loads themselves are tested against the real sandbox in tests/container)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sandbox import _autopatch, _cli

PROBE = (
    "import site, sys; site.addsitedir(sys.argv[1]); "
    "print('before', 'torch' in sys.modules); import torch; "
    "print(torch.load.__module__, torch.serialization.load.__module__)"
)


def run_probe(site_dir: Path, value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != _autopatch.ENV}
    if value is not None:
        env[_autopatch.ENV] = value
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(site_dir)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return out.split()


def test_the_pth_patches_torch_load_only_when_asked(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    assert _cli.main(["patch", "install", "--target", str(site_dir)]) == 0
    assert (site_dir / _autopatch.PTH_NAME).read_text() == _autopatch.pth_text()
    # torch is not imported by the patch itself; it is patched once the script imports it
    assert run_probe(site_dir, "1") == ["before", "False", "sandbox._api", "sandbox._api"]
    assert run_probe(site_dir, None)[2:] == ["torch.serialization", "torch.serialization"]
    assert run_probe(site_dir, "0")[2:] == ["torch.serialization", "torch.serialization"]
    assert _cli.main(["patch", "uninstall", "--target", str(site_dir)]) == 0
    assert not (site_dir / _autopatch.PTH_NAME).exists()
    assert run_probe(site_dir, "1")[2:] == ["torch.serialization", "torch.serialization"]
