"""Stage 8, host: the SafeTensors file ``convert`` writes, atomically.

From the checked tensors (the memfd hand-off), or straight from the input's own byte ranges
(the layout hand-off: ``copy_file_range`` for contiguous tensors, a numpy gather for strided
ones; torch is not imported). The metadata holds the skeleton, the views, the recipes of
sparse / quantized / nested tensors (stored as their component tensors) and the dtypes stored
as raw bytes."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from . import _files
from ._convert import composites
from ._verify.reconstruct import row_major
from ._version import VERSION
from ._worker import _protocol as P
from .errors import OutputRejected
from .report import LoadReport

if TYPE_CHECKING:
    import torch

    from ._verify.reconstruct import Placement

__all__ = ["write_placed", "write_safetensors"]


def write_safetensors(
    dst: Path,
    tensors: dict[str, torch.Tensor],
    manifest: P.Manifest,
    report: LoadReport,
    *,
    dedupe: bool = False,
    max_bytes: int | None = None,
) -> str:
    """Re-serialise the checked tensors on the host (the worker's file is never copied),
    streaming each tensor's bytes to a temporary file, then renaming it into place.

    Complete: every tensor name is a tensor in the file, as plain readers expect (a view is
    written as its own contiguous copy, a tie once per name it has in the structure).
    ``dedupe``: Hugging Face's convention instead: a tied tensor under one name only (the
    others are in ``model_sandbox.ties``; ``from_pretrained`` re-ties them from the config).
    ``max_bytes``: refuse (``OutputRejected``) before anything is copied when the file would
    be larger. Returns the file's sha256."""
    import torch

    stored: dict[str, torch.Tensor] = {}
    entries = []
    out = _outputs(manifest, dedupe=dedupe)
    _check_size(
        (
            (name, tensors[source].numel() * tensors[source].element_size())
            for name, (source, _) in out.items()
        ),
        max_bytes,
    )
    for name, (source, dtype) in out.items():
        t = tensors[source].contiguous()
        code = _code(dtype)
        if code is None:  # no native safetensors dtype here: raw bytes, the dtype in metadata
            t = t.reshape(-1).view(torch.uint8)
        stored[name] = t
        entries.append(
            (name, "uint8" if code is None else dtype, list(t.shape), t.numel() * t.element_size())
        )
    head, order = P.safetensors_header(entries, _st_metadata(manifest, report, out, dedupe))

    def body(fd: int) -> None:
        for name in order:
            t = stored[name]
            if t.numel():
                P.write_all(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy().data))

    return _files.atomic_stream(dst, head, body, sha256=True)


def _check_size(sizes: Iterable[tuple[str, int]], max_bytes: int | None) -> None:
    """Refuse an output over ``max_bytes`` before any of it is made: a view is written as its
    own copy, and a view the sandbox returns cheaply (``base[:1].expand(2**27)``: a 1.6 KB
    checkpoint) would otherwise be materialised on the host, whatever its size (512 MB written
    for that one; 4 TiB asked of the allocator for a 2**20 x 2**20 one). The sandbox's own output
    cap bounds what it writes; this bounds what the host writes for it."""
    if max_bytes is None:
        return
    total = 0
    for name, nbytes in sizes:
        total += nbytes
        if total > max_bytes:
            raise OutputRejected(
                f"the converted file would hold more than {max_bytes:,} bytes (the output cap) by "
                f"{name[:100]!r}: views are written as copies",
                item=name[:200],
            )


def _code(dtype: str) -> str | None:
    """The safetensors dtype code the output uses for ``dtype``, or None for raw bytes."""
    stored_as = P.TORCH_DTYPES[dtype][0]
    if stored_as != "U8" or dtype == "uint8":
        return stored_as
    return P.NEWER_ST_CODES[dtype] if dtype in P.NEWER_ST_CODES and _reads_natively(dtype) else None


@functools.cache
def _reads_natively(dtype: str) -> bool:
    """Whether the installed safetensors reads ``dtype`` back into torch natively (checked once,
    with a one-element file)."""
    try:
        from safetensors.torch import load

        head, _ = P.safetensors_header([("x", dtype, [1], 1)], {})
        got = load(head + b"\x00")["x"]
        return str(got.dtype) == f"torch.{dtype}"
    except Exception:  # an older safetensors or torch: raw bytes it is
        return False


def _outputs(manifest: P.Manifest, *, dedupe: bool = False) -> dict[str, tuple[str, str]]:
    """Every name the output holds -> (the tensor it is written from, dtype): the stored
    tensors, the views, and (unless ``dedupe``) each further name a tied tensor has in the
    skeleton."""
    out = {e.name: (e.name, e.dtype) for e in manifest.tensors}
    out.update({v.name: (v.name, v.dtype) for v in manifest.views})
    if not dedupe:
        for alias, ref in _aliases(manifest.skeleton, set(out)).items():
            out[alias] = (ref, out[ref][1])
    return out


def _aliases(skeleton: object, names: set[str]) -> dict[str, str]:
    """Names the structure gives a tensor besides its own (``lm_head.weight`` for a weight tied
    to ``embed.weight``), named as the worker names tensors, from the (untrusted, bounded)
    skeleton: walked iteratively, with a node budget; anything unexpected is skipped."""
    taken = set(names)
    aliases: dict[str, str] = {}
    stack: list[tuple[object, tuple[str, ...] | None, int]] = [(skeleton, (), 0)]
    budget = P.MAX_SKELETON_NODES
    while stack and budget > 0:
        node, path, depth = stack.pop()
        budget -= 1
        if not isinstance(node, dict) or depth > P.MAX_SKELETON_DEPTH:
            continue
        kind = node.get("$")
        if kind in ("tensor", "ndarray", "npscalar"):
            ref = node.get("ref")
            if path is not None and isinstance(ref, str) and ref in names:
                name = P.tensor_name(path, set())
                if name not in taken:
                    aliases[name] = ref
                    taken.add(name)
            continue
        children: list[tuple[object, tuple[str, ...] | None]] = []
        items = node.get("items")
        if kind in ("dict", "namespace") and isinstance(items, list):
            for pair in items:
                if isinstance(pair, list) and len(pair) == 2:
                    comp = _component(pair[0])
                    children.append((pair[1], None if path is None or comp is None else path + (comp,)))
        elif kind in ("list", "tuple", "set", "frozenset") and isinstance(items, list):
            children = [(v, None if path is None else path + (str(i),)) for i, v in enumerate(items)]
        elif kind in ("module", "opaque"):
            children = [(node.get("state"), path)]
        stack.extend((child, p, depth + 1) for child, p in reversed(children))
    return aliases


def _component(key: object) -> str | None:
    """How the worker names a dict key in a path (``P.path_component``), from its skeleton
    node; None where the node does not say (the key was an object)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int)):
        return str(key)
    if isinstance(key, float):
        return repr(key)
    return None


def _st_metadata(
    manifest: P.Manifest, report: LoadReport, out: dict[str, tuple[str, str]], dedupe: bool = False
) -> dict[str, str]:
    ties = (
        _aliases(manifest.skeleton, set(out))
        if dedupe
        else {n: src for n, (src, _) in out.items() if n != src}
    )
    return {
        "format": "pt",
        "model_sandbox.version": VERSION,
        "model_sandbox.source_sha256": report.input_sha256 or "",
        "model_sandbox.skeleton": json.dumps(manifest.skeleton, separators=(",", ":")),
        # how the tensors shared storage in the original: views of a base, ties of a name
        "model_sandbox.views": json.dumps(
            [dataclasses.asdict(v) for v in manifest.views], separators=(",", ":")
        ),
        "model_sandbox.ties": json.dumps(ties, separators=(",", ":")),
        "model_sandbox.shared": "dedupe" if dedupe else "complete",
        # sparse / quantized / nested tensors: name -> kind, dtype, shape, parameters and the
        # names of the ordinary tensors it is made of (``_convert.assemble`` rebuilds it)
        "model_sandbox.composites": json.dumps(composites(manifest.skeleton), separators=(",", ":")),
        "model_sandbox.dtypes": json.dumps({n: d for n, (_, d) in out.items() if _code(d) is None}),
    }


def write_placed(
    dst: Path,
    source: str,
    placements: list[Placement],
    manifest: P.Manifest,
    report: LoadReport,
    *,
    dedupe: bool = False,
    max_bytes: int | None = None,
) -> str:
    """The layout hand-off's SafeTensors file, copied from the input's own byte ranges (checked
    placements): contiguous tensors with ``copy_file_range``, strided ones gathered by numpy.
    torch is not imported. Returns the file's sha256."""
    by_name = {p.name: p for p in placements}
    out = _outputs(manifest, dedupe=dedupe)
    entries = []
    for name, (origin, dtype) in out.items():
        p = by_name[origin]
        nbytes = P.TORCH_DTYPES[dtype][1]
        for d in p.shape:
            nbytes *= d
        raw = _code(dtype) is None
        entries.append((name, "uint8" if raw else dtype, [nbytes] if raw else list(p.shape), nbytes))
    _check_size(((e[0], e[3]) for e in entries), max_bytes)
    head, order = P.safetensors_header(entries, _st_metadata(manifest, report, out, dedupe))
    by_name = {name: by_name[origin] for name, (origin, _) in out.items()}

    def body(fd: int) -> None:
        with open(source, "rb", buffering=0) as src:
            for name in order:
                _copy_placed(src, fd, by_name[name])

    return _files.atomic_stream(dst, head, body, sha256=True)


def _copy_placed(src: IO[bytes], fd: int, p: Placement) -> None:
    size = P.TORCH_DTYPES[p.dtype][1]
    numel = 1
    for d in p.shape:
        numel *= d
    if not numel:
        return
    if row_major(p.shape, p.stride):
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
        region.view(np.dtype(f"V{size}")),
        shape=p.shape,
        strides=[s * size for s in p.stride],
        writeable=False,
    )
    P.write_all(fd, memoryview(np.ascontiguousarray(elements).data).cast("B"))
