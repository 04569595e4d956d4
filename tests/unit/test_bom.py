"""CycloneDX 1.6 output (sandbox/_bom.py) of a batch's output directory, checked with
cyclonedx-python-lib's own strict JSON validator."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from sandbox import _batch
from sandbox._bom import build_bom
from tests import checkpoints as ck
from tests.fakes import Fake, batch


def test_bom_is_valid_cyclonedx_with_pedigree(tmp_path: Path) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    ck.save(ck.state_dict(), src / "sub" / "good.pt")
    ck.save({"w": torch.ones(2)}, src / "evil.pt")
    (src / "bad.pt").write_bytes(b"\x80\x04garbage")
    out = tmp_path / "out"
    summary = batch(src, out, Fake())
    good = {r.rel: r for r in summary.results}["sub/good.pt"]
    text, problems = build_bom(out, serial=uuid.UUID(int=1))
    assert problems == []
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    assert bom["specVersion"] == "1.6"
    (model,) = bom["components"]  # evil was refused, bad failed: only one converted
    assert model["type"] == "machine-learning-model" and model["name"] == "sub/good.safetensors"
    assert model["hashes"] == [{"alg": "SHA-256", "content": good.output_sha256}]
    (ancestor,) = model["pedigree"]["ancestors"]
    assert ancestor["name"] == "sub/good.pt" and ancestor["hashes"][0]["content"] == good.sha256
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["model-sandbox:verdict"] == "clean"
    assert props["model-sandbox:policy.digest"] == good.policy["digest"]
    assert props["model-sandbox:worker-digest"] == good.tool["worker_digest"]
    assert props["model-sandbox:image"] == "model-sandbox-worker:fake"
    tools = [t["name"] for t in bom["metadata"]["tools"]["components"]]
    assert tools == ["model-sandbox", "model-sandbox-worker"]

    (out / "sub" / "good.safetensors").write_bytes(b"changed")  # the BOM must not attest it
    text, problems = build_bom(out)
    assert problems and "differs" in problems[0] and not json.loads(text).get("components")


def test_bom_needs_a_batch_outdir(tmp_path: Path) -> None:
    text, problems = build_bom(tmp_path)
    assert text == "" and _batch.MANIFEST_NAME in problems[0]
