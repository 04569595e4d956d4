"""Static pre-flight scanner: what a checkpoint *would* import, without loading it.

Nothing here unpickles, executes or imports anything the file names. The scanner reads
bytes, walks pickle opcodes with its own reader and a symbolic stack, and reports:

* the format, identified by content (:func:`identify`), never by file name;
* every global a pickle stream would import (:class:`GlobalRef`), classified against an
  allowlist of what legitimate checkpoints use (anything else is ``unknown``) and a table of
  known-dangerous callables (``dangerous``);
* the tensor storages named by ``persistent_load`` records (:class:`StorageRecord`);
* container tricks that make other readers disagree with torch's reader (findings).

Only the standard library is used. Tensor data is never read. The file is memory-mapped, so
pages the scanner does not touch are never read. In a zip archive it reads the central
directory, every local header, the pickle members (``*.pkl``, the member torch would load as
``data.pkl``, and members outside ``<prefix>/data/`` whose first two bytes are a pickle
protocol header) and the headers of ``.npy`` members (a whole ``.npy`` member only when it is
an object array). Legacy stacked pickles are walked up to the storage-keys list; legacy tar
storages and joblib's inline array bytes are skipped by the sizes their records give.

Errors. Every public function raises only :class:`~sandbox.errors.MalformedInput` (or its
subclass :class:`MalformedStream`); content that is not recognised is format ``unknown``, and
deciding what to refuse (``UnsupportedFormat``) is left to the caller:

* a stream that ends before its STOP opcode, or a length claim beyond the end of the data, is
  *truncated*: :func:`scan_file` raises :class:`MalformedStream` (``offset`` and ``member``
  set, ``partial`` holds everything found before the fault, so dangerous globals seen before
  the truncation are still visible);
* a stream that is structurally invalid (unknown opcode, stack underflow, missing memo
  entry, ...) is a finding ``pickle-parse-error`` (MEDIUM, evasion) in :func:`scan_file`,
  because the real unpickler runs every opcode before the fault; :func:`scan_pickle_bytes`
  raises :class:`MalformedStream` for both kinds;
* a corrupt container (zip without a readable central directory, bad ``.npy`` or
  safetensors header, unreadable tar) raises :class:`~sandbox.errors.MalformedInput`;
* a scan limit (ops, memo size, nesting, time, bytes) that is reached ends that stream's walk
  with a finding ``scan-limit-exceeded`` (HIGH, resource): the scan is then incomplete.

An I/O error while reading the file is reported as ``MalformedInput`` too (the caller checks
that the path exists before scanning).
"""

from __future__ import annotations

import os
import re
import time

from sandbox._formats import compressed, safetensors_header, tar_archive
from sandbox._formats.buffer import Buf, open_buffer
from sandbox._formats.pickle_ops import LEGACY_MAGIC, OP_PROTO, pickle_like
from sandbox._formats.zip_archive import LOCAL_MAGIC, find_zip, zip_format
from sandbox.errors import MalformedInput, MalformedStream
from sandbox.report import Severity

from .containers import (
    Fatal,
    has_joblib_wrapper,
    parse_error,
    scan_npy,
    scan_pickle_file,
    scan_tar,
    scan_zip,
)
from .results import PickleScan, StaticScan
from .walker import Ctx, Invalid, LimitExceeded, Truncated, new_ctx, result, walk

FORMATS: tuple[str, ...] = (
    "torch-zip",
    "torch-legacy",
    "torch-tar",
    "pickle",
    "numpy-npy",
    "numpy-npz",
    "joblib",
    "torchscript",
    "safetensors",
    "unknown",
)

DEFAULT_MAX_PICKLE_BYTES = 1 << 30  # one materialised stream (zip member, decompressed data)
DEFAULT_MAX_OPS = 50_000_000  # opcodes over the whole file
DEFAULT_MAX_MEMO = 2_000_000  # memo entries in one stream
DEFAULT_MAX_DEPTH = 10_000  # open MARKs in one stream
DEFAULT_TIME_BUDGET_S = 120.0

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _first_pickle_kind(buf: Buf) -> str | None:
    """``pickle``/``torch-legacy``/``joblib`` when offset 0 starts a pickle stream, else None."""
    ctx = new_ctx(DEFAULT_MAX_PICKLE_BYTES, 2_000_000, DEFAULT_MAX_MEMO, DEFAULT_MAX_DEPTH, 10.0)
    head = bytes(buf[:2])
    if not head or head[0] not in OP_PROTO:
        return None
    try:
        out = walk(ctx, buf, 0, len(buf), "<raw>")
    except (Truncated, Invalid, LimitExceeded):
        if has_joblib_wrapper(ctx, 0):
            return "joblib"
        # a broken stream is still a pickle when it names a global Python could import; text
        # that merely starts with an opcode letter ("chat_template: ..." reads as GLOBAL) is not
        return (
            "pickle"
            if pickle_like(head)
            or any(_DOTTED.fullmatch(r.ref.module) and _DOTTED.fullmatch(r.ref.name) for r in ctx.refs)
            else None
        )
    if has_joblib_wrapper(ctx, 0):
        return "joblib"
    return "torch-legacy" if out.value == LEGACY_MAGIC else "pickle"


def _identify_buf(buf: Buf) -> str:
    head = bytes(buf[:8])
    if head[:4] == LOCAL_MAGIC:
        try:
            z = find_zip(buf)
        except MalformedInput:
            return "unknown"
        return zip_format(z)[0] if z is not None else "unknown"
    if head[:6] == b"\x93NUMPY":
        return "numpy-npy"
    if safetensors_header.looks_like(buf):
        return "safetensors"
    if tar_archive.is_tar(buf):
        try:
            members, _, _ = tar_archive.members(buf)
        except MalformedInput:
            return "unknown"
        return "torch-tar" if "storages" in members or "pickle" in members else "unknown"
    kind = _first_pickle_kind(buf)
    if kind is not None:
        return kind
    comp = compressed.detect(buf)
    if comp is not None:
        first: Buf = buf[: 1 << 16] if len(buf) > 1 << 16 else buf
        try:
            data, _ = compressed.decompress(first, comp, 1 << 16, time.monotonic() + 10.0)
        except MalformedInput:
            return "unknown"
        return "joblib" if pickle_like(data[:2]) else "unknown"
    return "unknown"


def identify(path: str | os.PathLike[str]) -> str:
    """The format of the file at ``path``, by content (one of :data:`FORMATS`).

    Zip archives are told apart by their central directory (torch zip, TorchScript, npz);
    a pickle at offset 0 is walked to tell legacy torch files (magic number first) and joblib
    pickles from plain pickles; compressed files are recognised when their first decompressed
    bytes start a pickle. Never raises for unrecognised content (``unknown``); raises
    ``MalformedInput`` only when the file cannot be read.
    """
    with open_buffer(path) as buf:
        return _identify_buf(buf)


def scan_file(
    path: str | os.PathLike[str],
    *,
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
    max_ops: int = DEFAULT_MAX_OPS,
    max_memo: int = DEFAULT_MAX_MEMO,
    max_depth: int = DEFAULT_MAX_DEPTH,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> StaticScan:
    """Statically scan the file at ``path``; see the module docstring for what is reported.

    ``max_pickle_bytes`` bounds each stream the scanner has to materialise (a zip member, a
    decompressed file); ``max_ops`` bounds opcodes over the whole file, ``max_memo`` memo
    entries and ``max_depth`` open MARKs per stream; ``time_budget_s`` bounds the whole scan.
    Raises ``MalformedInput`` (``MalformedStream`` for pickle streams) for truncated or
    corrupt files; an unrecognised file gives format ``unknown``, not an exception.
    """
    ctx = new_ctx(max_pickle_bytes, max_ops, max_memo, max_depth, time_budget_s)
    with open_buffer(path) as buf:
        try:
            fmt, target = _dispatch(ctx, buf)
        except Fatal as exc:
            raise MalformedStream(
                f"{exc.member}: {exc.message} at offset {exc.offset}",
                path=os.fspath(path),
                offset=exc.offset,
                member=exc.member,
                partial=result(ctx, ctx.format, ctx.target),
            ) from None
        except MalformedStream:
            raise
        except MalformedInput as exc:
            if exc.path is None:
                raise MalformedInput(exc.message, path=os.fspath(path), offset=exc.offset) from None
            raise
    return result(ctx, fmt, target)


def _dispatch(ctx: Ctx, buf: Buf) -> tuple[str, str | None]:
    size = len(buf)
    head = bytes(buf[:8])
    if head[:4] == LOCAL_MAGIC:
        z = find_zip(buf)
        if z is None:
            raise MalformedInput(
                "file starts like a zip archive but has no end-of-central-directory record (truncated?)",
                offset=size,
            )
        fmt, target = zip_format(z)
        ctx.format, ctx.target = fmt, target
        if z.shift:
            ctx.add(
                "zip-polyglot",
                Severity.HIGH,
                "evasion",
                f"{z.shift} bytes precede the zip archive that its directory does not "
                "account for; readers disagree on member offsets",
                shift=z.shift,
            )
        scan_zip(ctx, buf, z, fmt)
        return fmt, target
    if head[:6] == b"\x93NUMPY":
        ctx.format = "numpy-npy"
        scan_npy(ctx, buf, size, "<npy>")
        _polyglot(ctx, buf)
        return "numpy-npy", None
    if safetensors_header.looks_like(buf):
        safetensors_header.check(buf)
        _polyglot(ctx, buf)
        return "safetensors", None
    if tar_archive.is_tar(buf):
        ctx.format = "torch-tar"
        fmt = scan_tar(ctx, buf)
        return fmt, ("tar:pickle" if fmt == "torch-tar" else None)
    if head and head[0] in OP_PROTO:
        ctx.format, ctx.target = "pickle", "<raw>"
        found = scan_pickle_file(ctx, buf, "<raw>")
        if found is not None:
            _polyglot(ctx, buf)
            return found
        ctx.format, ctx.target = "unknown", None
    comp = compressed.detect(buf)
    if comp is not None:
        data, capped = compressed.decompress(buf, comp, ctx.max_pickle_bytes, ctx.deadline)
        if pickle_like(data[:2]):
            member = f"<{comp}>"
            ctx.format, ctx.target = "joblib", None
            if capped:
                ctx.add(
                    "scan-limit-exceeded",
                    Severity.HIGH,
                    "resource",
                    f"{comp} stream decompresses past {ctx.max_pickle_bytes} bytes; only the "
                    "start was scanned",
                    member=member,
                )
            try:
                if scan_pickle_file(ctx, data, member) is None:
                    parse_error(ctx, member, 0, "decompressed data is not a pickle stream")
            except Fatal:
                if not capped:
                    raise
            return "joblib", None
    _polyglot(ctx, buf)
    return "unknown", None


def _polyglot(ctx: Ctx, buf: Buf) -> None:
    """A zip archive inside a file that torch does not read as a zip (no PK at offset 0)."""
    try:
        z = find_zip(buf)
    except MalformedInput:
        return
    if z is None or not z.entries:
        return
    ctx.add(
        "zip-polyglot",
        Severity.HIGH,
        "evasion",
        "the file is also a zip archive (zip readers find it from the end) but torch reads "
        "it from offset 0; its members are scanned too",
        entries=len(z.entries),
    )
    try:
        scan_zip(ctx, buf, z, zip_format(z)[0], prefix="zip:")
    except Fatal as exc:
        parse_error(ctx, exc.member, exc.offset, exc.message)
    except MalformedInput:
        return


def scan_pickle_bytes(
    data: bytes,
    *,
    member: str = "<raw>",
    max_ops: int = DEFAULT_MAX_OPS,
    max_memo: int = DEFAULT_MAX_MEMO,
    max_depth: int = DEFAULT_MAX_DEPTH,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> PickleScan:
    """Walk the first pickle stream in ``data`` (and any pickles nested in its constants).

    Trailing bytes after STOP are ignored (``end`` says where the stream stopped). Raises
    :class:`MalformedStream` when the stream is truncated or invalid; its ``partial`` holds
    what was found before the fault. A scan limit ends the walk with a
    ``scan-limit-exceeded`` finding instead.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedInput(f"expected bytes, got {type(data).__name__}")
    ctx = new_ctx(len(data), max_ops, max_memo, max_depth, time_budget_s)
    end = 0
    proto = 0
    try:
        out = walk(ctx, bytes(data), 0, len(data), member)
        end, proto = out.end, out.protocol
    except (Truncated, Invalid) as exc:
        raise MalformedStream(
            f"{member}: {exc.message} at offset {exc.offset}",
            offset=exc.offset,
            member=member,
            partial=result(ctx, "pickle", None),
        ) from None
    except LimitExceeded as exc:
        ctx.limit(member, exc)
    scan = result(ctx, "pickle", None)
    return PickleScan(
        member=member,
        pickles=scan.pickles,
        globals=scan.globals,
        storages=scan.storages,
        findings=scan.findings,
        protocol=proto,
        end=end,
    )
