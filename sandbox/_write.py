"""Stage 8, host: the SafeTensors file ``convert`` writes, atomically.

From the checked tensors (the memfd hand-off), or straight from the input's own byte ranges
(the layout hand-off: ``copy_file_range`` for contiguous tensors, a numpy gather for strided
ones; torch is not imported). The metadata holds the skeleton, the views and the dtypes stored
as raw bytes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

from . import _files
from ._version import VERSION
from ._worker import _protocol as P
from .errors import OutputRejected
from .report import LoadReport

if TYPE_CHECKING:
    import torch

    from ._reconstruct import Placement

__all__ = ["write_placed", "write_safetensors"]


def write_safetensors(dst: Path, tensors: dict[str, torch.Tensor], manifest: P.Manifest,
                       report: LoadReport) -> None:
    """Re-serialise the checked tensors on the host (the worker's file is never copied),
    streaming each tensor's bytes to a temporary file, then renaming it into place. Tensors
    that share memory (ties, views) are each written whole: every name is a tensor."""
    import torch

    stored: dict[str, torch.Tensor] = {}
    entries = []
    for e in manifest.tensors:
        t = tensors[e.name]
        t = t.contiguous().reshape(-1).view(torch.uint8) \
            if e.stored_as == "U8" and e.dtype != "uint8" else t.contiguous()
        stored[e.name] = t
        entries.append((e.name, str(t.dtype).removeprefix("torch."), list(t.shape),
                        t.numel() * t.element_size()))
    head, order = P.safetensors_header(entries, _st_metadata(manifest, report))

    def body(fd: int) -> None:
        for name in order:
            t = stored[name]
            if t.numel():
                P.write_all(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy().data))

    _files.atomic_stream(dst, head, body)


def _st_metadata(manifest: P.Manifest, report: LoadReport) -> dict[str, str]:
    return {
        "format": "pt",
        "model_sandbox.version": VERSION,
        "model_sandbox.source_sha256": report.input_sha256 or "",
        "model_sandbox.skeleton": json.dumps(manifest.skeleton, separators=(",", ":")),
        "model_sandbox.views": json.dumps([dataclasses.asdict(v) for v in manifest.views],
                                          separators=(",", ":")),
        "model_sandbox.dtypes": json.dumps({e.name: e.dtype for e in manifest.tensors
                                            if e.stored_as == "U8"}),
    }


def write_placed(dst: Path, source: str, placements: list[Placement], manifest: P.Manifest,
                  report: LoadReport) -> None:
    """The layout hand-off's SafeTensors file, copied from the input's own byte ranges (checked
    placements): contiguous tensors with ``copy_file_range``, strided ones gathered by numpy.
    torch is not imported."""
    entries = []
    for p, e in zip(placements, manifest.tensors, strict=True):
        raw = e.stored_as == "U8" and p.dtype != "uint8"
        entries.append((p.name, "uint8" if raw else p.dtype, [e.nbytes] if raw else list(p.shape),
                        e.nbytes))
    head, order = P.safetensors_header(entries, _st_metadata(manifest, report))
    by_name = {p.name: p for p in placements}

    def body(fd: int) -> None:
        with open(source, "rb", buffering=0) as src:
            for name in order:
                _copy_placed(src, fd, by_name[name])

    _files.atomic_stream(dst, head, body)


def _copy_placed(src: IO[bytes], fd: int, p: Placement) -> None:
    size = P.TORCH_DTYPES[p.dtype][1]
    numel = 1
    for d in p.shape:
        numel *= d
    if not numel:
        return
    row_major: list[int] = []
    step = 1
    for d in reversed(p.shape):
        row_major.insert(0, step)
        step *= d
    if all(d == 1 or s == r for d, s, r in zip(p.shape, p.stride, row_major, strict=True)):
        offset, left = p.file_offset, numel * size
        while left:
            n = os.copy_file_range(src.fileno(), fd, left, offset)
            if not n:
                raise OutputRejected("the input file shrank while it was copied")
            offset, left = offset + n, left - n
        return
    import numpy as np

    region = np.memmap(src, dtype=np.uint8, mode="r", offset=p.file_offset, shape=(p.extent,))
    elements = np.lib.stride_tricks.as_strided(
        region.view(np.dtype(f"V{size}")), shape=p.shape, strides=[s * size for s in p.stride],
        writeable=False)
    P.write_all(fd, memoryview(np.ascontiguousarray(elements).data).cast("B"))
