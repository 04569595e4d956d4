"""The README's recipes, run as written, in a directory holding the files they name: benign
fixtures, and hostile ones whose payload only leaves a marker in the test's directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import checkpoints as ck

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- recipe: ([a-z-]+) -->\n```(python|sh)\n(.*?)```", re.DOTALL)


def recipes() -> dict[str, tuple[str, str]]:
    text = (ROOT / "README.md").read_text("utf-8")
    return {m.group(1): (m.group(2), m.group(3)) for m in BLOCK.finditer(text)}


def run(name: str, cwd: Path) -> str:
    lang, code = recipes()[name]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-ec", code]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_user_has_a_recipe() -> None:
    assert set(recipes()) == {"safe-load", "transformers", "convert-archive", "evaluate"}


def test_safe_load_recipe(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "linear.pt")
    marker = tmp_path / "marker"
    ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), tmp_path / "untrusted.pt")
    assert run("safe-load", tmp_path).split() == ["malicious", "dangerous-global"]
    assert not marker.exists()


def test_transformers_recipe(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg)
    target = tmp_path / "tiny-gpt2"
    cfg.save_pretrained(target)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    assert run("transformers", tmp_path).strip() == "GPT2LMHeadModel"


def test_convert_archive_recipe(tmp_path: Path) -> None:
    src = tmp_path / "checkpoints"
    (src / "run1").mkdir(parents=True)
    ck.save(ck.state_dict(), src / "run1" / "last.pt")
    ck.save(ck.state_dict(), src / "legacy.bin", "legacy")
    marker = tmp_path / "marker"
    ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), src / "evil.pt")
    out = run("convert-archive", tmp_path).split()
    assert "legacy.safetensors" in out and "run1" in out and "evil.safetensors" not in out
    assert (tmp_path / "converted" / "run1" / "last.safetensors").exists()
    assert not marker.exists()


def test_evaluate_recipe(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    ck.save(ck.hostile_checkpoint(ck.Reduce(os.system, f"touch {marker}")), tmp_path / "suspicious.pt")
    lines = run("evaluate", tmp_path).splitlines()
    assert lines[0] == "malicious"
    rules = {line.split()[1] for line in lines[1:]}
    assert {"dangerous-global", "exec-attempt"} <= rules, lines
    assert not marker.exists()
