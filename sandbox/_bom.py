"""A CycloneDX 1.6 ML-BOM for a batch's OUTDIR, from its manifest.

One ``machine-learning-model`` component per converted model (the SafeTensors file, with its
sha256), whose ``pedigree.ancestors`` holds the legacy file it came from (a ``file`` component
with the input's relative path and sha256): the link legacy file -> SafeTensors descendant.
Provenance that CycloneDX has no field for is carried as ``properties`` in the
``model-sandbox:`` namespace:

==================================  =============================================================
``model-sandbox:input.name``        the input's path relative to the batch's SRC
``model-sandbox:input.sha256``      the input's sha256 (also the ancestor's hash)
``model-sandbox:input.format``      the format identified by content (``torch-zip``, ...)
``model-sandbox:output.sha256``     the SafeTensors file's sha256 (also the component's hash)
``model-sandbox:verdict``           clean / suspicious (converted below the policy threshold)
``model-sandbox:findings``          count of findings by severity, e.g. ``info=1``
``model-sandbox:top-finding``       the most severe finding, when there is one
``model-sandbox:report``            the per-file JSON report, relative to OUTDIR
``model-sandbox:tool.version``      model-sandbox's version
``model-sandbox:image``             the worker image tag that loaded it
``model-sandbox:worker-digest``     the digest of everything in that image
``model-sandbox:policy.name``       the load policy
``model-sandbox:policy.digest``     its digest
==================================  =============================================================

The CycloneDX ``modelCard`` is not supported by cyclonedx-python-lib, so it is not emitted.
Only outputs whose current sha256 still matches the manifest are listed; the others are
returned as problems (the BOM must not attest to a file that changed).
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
from collections import Counter
from pathlib import Path

from . import _batch, _files
from ._version import VERSION
from .report import LoadReport

__all__ = ["build_bom"]

_NS = "model-sandbox:"


def _findings_summary(outdir: Path, rec: _batch.ItemResult) -> str:
    if rec.report is None:
        return ""
    try:
        report = LoadReport.from_json((outdir / rec.report).read_text("utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return "unavailable"
    counts = Counter(str(f.severity) for f in report.findings)
    return ",".join(f"{k}={counts[k]}" for k in sorted(counts)) or "none"


def build_bom(
    outdir: str | os.PathLike[str],
    *,
    serial: uuid.UUID | None = None,
    timestamp: datetime.datetime | None = None,
) -> tuple[str, list[str]]:
    """(CycloneDX 1.6 JSON, problems) for the converted models recorded in ``outdir``."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from cyclonedx.output.json import JsonV1Dot6

    out = Path(outdir)
    records = _batch.read_manifest(out)
    if not (out / _batch.MANIFEST_NAME).exists():
        return "", [f"{os.fspath(outdir)!r} has no {_batch.MANIFEST_NAME}: not a batch OUTDIR"]
    bom = Bom(serial_number=serial or uuid.uuid4())
    bom.metadata.timestamp = timestamp or datetime.datetime.now(tz=datetime.UTC)
    bom.metadata.tools.components.add(
        Component(
            name="model-sandbox",
            version=VERSION,
            type=ComponentType.APPLICATION,
            description="loads untrusted PyTorch checkpoints in a hardened container and "
            "converts them to SafeTensors",
        )
    )
    images: set[str] = set()
    problems: list[str] = []
    for rel in sorted(records):
        rec = records[rel]
        if rec.status is not _batch.Status.CONVERTED or rec.output is None:
            continue
        try:
            actual = _files.sha256_file(str(out / rec.output))[0]
        except OSError:
            problems.append(f"{rec.output}: missing (recorded for {rel})")
            continue
        if actual != rec.output_sha256:
            problems.append(f"{rec.output}: sha256 {actual} differs from the manifest's {rec.output_sha256}")
            continue
        props = {
            "input.name": rel,
            "input.sha256": rec.sha256 or "",
            "input.format": rec.format or "",
            "output.sha256": actual,
            "verdict": rec.verdict.value if rec.verdict else "",
            "findings": _findings_summary(out, rec),
            "top-finding": rec.top_finding or "",
            "report": rec.report or "",
            "tool.version": rec.tool.get("version", ""),
            "image": rec.tool.get("image", ""),
            "worker-digest": rec.tool.get("worker_digest", ""),
            "policy.name": rec.policy.get("name", ""),
            "policy.digest": rec.policy.get("digest", ""),
        }
        if rec.tool.get("image"):
            images.add(rec.tool["image"])
        ancestor = Component(
            name=rel,
            type=ComponentType.FILE,
            bom_ref=f"input:{rel}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=rec.sha256 or "")] if rec.sha256 else [],
            properties=[Property(name=f"{_NS}input.format", value=rec.format or "unknown")],
        )
        bom.components.add(
            Component(
                name=rec.output,
                type=ComponentType.MACHINE_LEARNING_MODEL,
                bom_ref=f"model:{rec.output}",
                description=f"SafeTensors converted by model-sandbox from {rel}",
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=actual)],
                properties=[Property(name=_NS + k, value=v) for k, v in props.items() if v],
                pedigree=Pedigree(
                    ancestors=[ancestor],
                    notes=f"loaded in the model-sandbox worker container; verdict {props['verdict']}",
                ),
            )
        )
    for image in sorted(images):
        bom.metadata.tools.components.add(
            Component(
                name=image.partition(":")[0],
                version=image.partition(":")[2],
                type=ComponentType.CONTAINER,
                description="the model-sandbox worker image",
            )
        )
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    json.loads(text)  # the library's output is JSON; fail here rather than hand back garbage
    return text, problems
