"""Batch conversion: many legacy checkpoints -> a mirrored tree of SafeTensors, resumable.

Library code: it returns data (:class:`BatchSummary`, :class:`ItemResult`) and reports
progress through a callback; only ``_cli`` prints.

What a batch does
-----------------
1. **discover** (:func:`discover`): walk each SRC (files or directories, recursively, sorted),
   apply ``--include``/``--exclude`` globs (matched against the relative path), and plan one
   output per input: ``SRC/a/b/x.pt`` -> ``OUTDIR/a/b/x.safetensors`` (with one directory
   SRC the tree is relative to it; with several SRCs each contributes under its own name).
   Names are kept as they are (spaces, unicode); a relative path is only ever built from
   directory entries, and every destination is checked to stay inside OUTDIR with no symlinked
   directory on the way. Two inputs whose stems collide (``x.pt`` and ``x.bin``) both keep
   their full name (``x.pt.safetensors``, ``x.bin.safetensors``).
   *Symlinks*: a symlink to a regular file is followed only when its target stays inside the
   SRC it was found in; symlinked directories are never followed (no loops, no duplicates); a
   file named on the command line is taken as named. Everything else (FIFOs, devices, broken
   links) is skipped with its reason and never opened.
2. **identify** by content (:func:`sandbox._scan.identify`), not by name: model formats go on;
   SafeTensors, empty and unrecognised files are *skipped* with the reason; a file that starts
   like a zip archive but has no readable central directory is *failed* (truncated) without a
   container.
3. **pin**: the input is hashed on the host; a file whose sha256 differs from its pin
   (``--expect-sha256 FILE:HEX`` or a lock file, see ``_lock``) -- or, with a lock file, one
   that the lock does not list -- is refused with a report before any sandbox opens it. The
   sandbox is then always given the hash just computed (``expected_sha256``), so the file it
   loads is the file the manifest describes.
4. **convert** with :func:`sandbox._api.convert` (one container per file, ``jobs`` threads;
   with ``client=``, a Dask task per file runs it on a cluster worker: :mod:`sandbox._distribute`);
   each file's report is written atomically to ``<report root>/<rel>.report.json`` (the report
   root is ``--report-dir`` or OUTDIR).
5. **record** one manifest line per finished input (see below), then a summary.
6. **sharded checkpoints**: a ``*.index.json`` whose ``weight_map`` names shard files beside it
   (``pytorch_model-00001-of-00002.bin``...) makes its shards convert to
   ``model-0000N-of-0000M.safetensors``; once every shard is converted, the batch writes
   ``model.safetensors.index.json`` (the weight map checked against each converted file's own
   keys) and copies the JSON files beside the index (``config.json``, tokenizer files: data),
   so the output directory loads with ``from_pretrained``. An index that cannot be written is
   named in the summary (exit code 2).

Failure isolation: anything wrong with one file (corrupt, hostile, oversized, unreadable,
unsupported, even an unexpected exception) becomes that file's result and the batch goes on.
A container engine that goes away (:class:`~sandbox.errors.EngineUnavailable`) is retried with
bounded exponential backoff; if it stays away, or the image is missing/stale, the batch stops
cleanly (``BatchSummary.stopped``) and a re-run continues where it stopped.

The manifest: JSON Lines, not SQLite
------------------------------------
``OUTDIR/model-sandbox-manifest.jsonl`` holds one JSON object per input (relative path, size,
sha256, format, status, verdict, output path and sha256, report path and sha256, tool, image
and policy digests, timestamps). We chose JSON Lines because:

* durability is simple and visible: one writer (the main thread, under an exclusive ``flock``
  on ``OUTDIR/.model-sandbox.lock``), each record one ``write`` of a whole line followed by
  ``fsync``; a SIGKILL can at worst leave a torn *last* line, which the reader detects (no
  trailing newline or invalid JSON) and drops -- the file it described is simply redone;
* it is readable and diffable with ordinary tools (``jq``, ``grep``), which matters for an
  audit trail of untrusted files, and a later record for the same path wins;
* SQLite would give transactions too, but adds a binary file whose journal must sit next to
  it, is opaque to review, and buys nothing for an append-mostly log of a few thousand rows.

At the start and at the end of each run the manifest is compacted (one record per path,
sorted) by writing a temporary file, fsync and rename, so a finished run's manifest is the
same whether or not earlier runs were interrupted.

Resume: an input is not redone (``reused``) when its size and sha256, the policy digest, the
worker digest and the tool version are unchanged, its report still exists with the recorded
sha256, and -- for a converted file -- the output still exists with the recorded sha256.
``force=True`` redoes everything. Interrupting (Ctrl-C/SIGTERM via :class:`KeyboardInterrupt`
in the thread that called :func:`run_batch`) stops new work, kills this batch's containers
(each carries the label ``org.model-sandbox.batch=<id of OUTDIR>``) and records only results
that are not errors; outputs and reports are written atomically (temp + fsync + rename), so
nothing half-written remains. After a SIGKILL of the CLI, the next run removes this batch's
leftover containers and stale temporary files before it starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _api, _files, _image, _scan
from ._formats import safetensors_header
from ._launch import LABEL, ContainerSpec, Job, Runner, RunResult
from ._version import VERSION
from .errors import (
    BatchError,
    EngineError,
    EngineUnavailable,
    HashMismatch,
    InputUnreadable,
    InternalError,
    MalformedInput,
    NotPinned,
    SandboxError,
)
from .policy import Policy
from .report import LoadReport, Verdict

__all__ = [
    "MANIFEST_NAME",
    "BatchError",
    "BatchOptions",
    "BatchProgress",
    "BatchSummary",
    "Entry",
    "ItemResult",
    "Status",
    "discover",
    "read_manifest",
    "run_batch",
]

MANIFEST_NAME = "model-sandbox-manifest.jsonl"
LOCK_NAME = ".model-sandbox.lock"
MANIFEST_SCHEMA = "model-sandbox/batch-manifest/1"
BATCH_LABEL = f"{LABEL}.batch"
MODEL_FORMATS = frozenset(
    {"torch-zip", "torch-legacy", "torch-tar", "pickle", "numpy-npy", "numpy-npz", "joblib", "torchscript"}
)
_ZIP_MAGIC = b"PK\x03\x04"
_STALE_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what _files.atomic_write leaves on SIGKILL


class Status(enum.Enum):
    CONVERTED = "converted"  # SafeTensors written (verdict clean, or below the policy's fail_on)
    REFUSED = "refused"  # judged unsafe by the policy: report only, no weights
    FAILED = "failed"  # could not be loaded (corrupt, unsupported, limits, pin mismatch...)
    SKIPPED = "skipped"  # not a model file (by content), or not a regular file

    def __str__(self) -> str:
        return self.value


# -- discovery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One input file the batch will look at."""

    rel: str  # relative POSIX path: the manifest key and the shape of the output tree
    source: str  # the path as found (may be a symlink)
    real: str  # the resolved regular file
    size: int


@dataclass
class ItemResult:
    """What happened to one input. Serialised as one manifest record."""

    rel: str
    status: Status
    size: int = 0
    verdict: Verdict | None = None
    reason: str | None = None  # skip reason, or the error's message
    reference: str | None = None  # the error's stable reference
    sha256: str | None = None
    format: str | None = None
    output: str | None = None  # relative to OUTDIR
    output_sha256: str | None = None
    report: str | None = None  # relative to OUTDIR (may start with ../ for --report-dir)
    report_sha256: str | None = None
    top_finding: str | None = None  # "severity rule: message"
    tool: dict[str, str] = field(default_factory=dict)
    policy: dict[str, str] = field(default_factory=dict)
    started: float | None = None  # unix time
    finished: float | None = None
    duration_s: float = 0.0
    reused: bool = False  # taken from the manifest, not redone (not serialised)
    load_report: LoadReport | None = field(default=None, repr=False)  # not serialised

    @property
    def exit_code(self) -> int:
        if self.verdict is None:
            return 0
        if self.verdict is Verdict.ERROR:
            return 2
        return 0 if self.verdict is Verdict.CLEAN else 1

    def to_record(self) -> dict[str, Any]:
        data = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("reused", "load_report")
        }
        data["status"] = self.status.value
        data["verdict"] = None if self.verdict is None else self.verdict.value
        data["schema"] = MANIFEST_SCHEMA
        return data

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> ItemResult:
        if data.get("schema") != MANIFEST_SCHEMA or not isinstance(data.get("rel"), str):
            raise ValueError("not a manifest record")
        names = {f.name for f in dataclasses.fields(cls)} - {"reused", "load_report"}
        kw = {k: v for k, v in data.items() if k in names}
        kw["status"] = Status(kw["status"])
        kw["verdict"] = None if kw.get("verdict") is None else Verdict(kw["verdict"])
        kw["tool"] = {str(k): str(v) for k, v in dict(kw.get("tool") or {}).items()}
        kw["policy"] = {str(k): str(v) for k, v in dict(kw.get("policy") or {}).items()}
        return cls(**kw)


def _matches(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]

    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)

    return (not include or hit(include)) and not hit(exclude)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def discover(
    sources: Sequence[str | os.PathLike[str]],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    ignore: Sequence[str | os.PathLike[str]] = (),
) -> tuple[list[Entry], list[ItemResult], int]:
    """Walk ``sources``; returns (entries to look at, skipped non-files, count excluded by globs).

    ``ignore`` lists directories never entered (the output and report directories). Raises
    :class:`BatchError` for a missing SRC or two inputs with the same relative path."""
    if not sources:
        raise BatchError("no input given")
    ignored = {os.path.realpath(os.fspath(p)) for p in ignore}
    entries: list[Entry] = []
    skipped: list[ItemResult] = []
    excluded = 0
    single_dir = len(sources) == 1 and os.path.isdir(os.fspath(sources[0]))

    def skip(rel: str, reason: str) -> None:
        skipped.append(ItemResult(rel=rel, status=Status.SKIPPED, reason=reason))

    for src in sources:
        src_s = os.fspath(src)
        if not os.path.lexists(src_s):
            raise BatchError(f"{src_s!r} does not exist")
        base = "" if single_dir else (os.path.basename(os.path.normpath(src_s)) or "root")
        if not os.path.isdir(src_s):
            rel = base
            if not _matches(rel, include, exclude):
                excluded += 1
                continue
            _add_file(src_s, rel, None, entries, skip)
            continue
        root_real = os.path.realpath(src_s)
        for dirpath, rel_dir in _walk_dirs(src_s, base, ignored, skip):
            with os.scandir(dirpath) as it:
                items = sorted(it, key=lambda e: e.name)
            for de in items:
                rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
                if de.is_dir(follow_symlinks=False):
                    continue  # walked by _walk_dirs
                if not _matches(rel, include, exclude):
                    excluded += 1
                    continue
                _add_file(de.path, rel, root_real, entries, skip)
    seen: dict[str, str] = {}
    for e in entries:
        if e.rel in seen:
            raise BatchError(
                f"two inputs map to the same relative path {e.rel!r}: "
                f"{seen[e.rel]!r} and {e.source!r}; convert them separately"
            )
        seen[e.rel] = e.source
    return entries, skipped, excluded


def _walk_dirs(
    top: str, base: str, ignored: set[str], skip: Callable[[str, str], None]
) -> Iterator[tuple[str, str]]:
    """(directory path, relative path) depth-first, sorted; symlinked directories are skipped."""
    stack = [(top, base)]
    while stack:
        path, rel = stack.pop()
        if os.path.realpath(path) in ignored:
            continue
        yield path, rel
        try:
            with os.scandir(path) as it:
                subdirs = sorted(
                    (de for de in it if de.is_dir(follow_symlinks=True)), key=lambda d: d.name, reverse=True
                )
        except OSError as exc:
            skip(rel or ".", f"directory cannot be read: {exc.strerror}")
            continue
        for de in subdirs:
            sub_rel = f"{rel}/{de.name}" if rel else de.name
            if de.is_symlink():
                skip(sub_rel, "symlinked directory (not followed)")
                continue
            stack.append((de.path, sub_rel))


def _add_file(
    path: str, rel: str, root_real: str | None, entries: list[Entry], skip: Callable[[str, str], None]
) -> None:
    try:
        lst = os.lstat(path)
    except OSError as exc:
        skip(rel, f"cannot stat: {exc.strerror}")
        return
    real = os.path.realpath(path)
    if stat.S_ISLNK(lst.st_mode) and root_real is not None and not _inside(real, root_real):
        skip(rel, "symlink points outside its SRC directory (not followed)")
        return
    try:
        st = os.stat(path)
    except OSError:
        skip(rel, "broken symlink")
        return
    if not stat.S_ISREG(st.st_mode):
        skip(rel, "not a regular file")
        return
    entries.append(Entry(rel=rel, source=os.path.abspath(path), real=real, size=st.st_size))


def _output_rels(entries: Sequence[Entry]) -> dict[str, str]:
    """Input rel -> output rel; colliding stems keep their full names."""

    def stem_out(rel: str) -> str:
        head, _, name = rel.rpartition("/")
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
        return f"{head}/{stem}.safetensors" if head else f"{stem}.safetensors"

    first = {e.rel: stem_out(e.rel) for e in entries}
    counts: dict[str, int] = {}
    for out in first.values():
        counts[out] = counts.get(out, 0) + 1
    return {rel: (out if counts[out] == 1 else f"{rel}.safetensors") for rel, out in first.items()}


def _safe_join(root: Path, rel: str) -> Path:
    """``root/rel`` for a relative path made of plain names; creates the parent directories
    and refuses traversal and symlinked directories on the way."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or "\0" in p or os.sep in p for p in parts):
        raise BatchError(f"refusing the unsafe relative path {rel!r}")
    cur = root
    for part in parts[:-1]:
        cur = cur / part
        try:
            os.mkdir(cur)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(cur).st_mode):
            raise BatchError(
                f"{str(cur)!r} is not a plain directory (a symlink?); refusing to write through it"
            )
    return cur / parts[-1]


# -- the manifest ------------------------------------------------------------------------------


def read_manifest(outdir: str | os.PathLike[str]) -> dict[str, ItemResult]:
    """The latest record per input in OUTDIR's manifest. Torn or invalid lines are dropped."""
    path = Path(outdir) / MANIFEST_NAME
    records: dict[str, ItemResult] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return records
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = ItemResult.from_record(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line (SIGKILL mid-write) or garbage: that input is redone
        records[rec.rel] = rec
    return records


class _Manifest:
    """Single writer of OUTDIR's manifest, holding an exclusive lock on OUTDIR."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.path = outdir / MANIFEST_NAME
        self._lock_fd = os.open(outdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise BatchError(
                f"another batch is writing to {str(outdir)!r}",
                hint="wait for it to finish, or use another OUTDIR",
            ) from None
        self.records = read_manifest(outdir)
        self.compact()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def compact(self) -> None:
        lines = [
            json.dumps(self.records[k].to_record(), sort_keys=True, allow_nan=False) + "\n"
            for k in sorted(self.records)
        ]
        _files.atomic_write(self.path, "".join(lines).encode())

    def append(self, item: ItemResult) -> None:
        self.records[item.rel] = item
        line = json.dumps(item.to_record(), sort_keys=True, allow_nan=False) + "\n"
        os.write(self._fd, line.encode())
        os.fsync(self._fd)

    def close(self, *, compact: bool) -> None:
        os.close(self._fd)
        if compact:
            self.compact()
        os.close(self._lock_fd)  # releases the flock


# -- containers of this batch ------------------------------------------------------------------


class _LabelledRunner:
    """Runs this batch's loads in a :class:`~sandbox.Pool` of ``jobs`` warm sandboxes, each
    container labelled ``org.model-sandbox.batch=<id>`` so that an interrupted run can kill its
    own containers, and a later run remove what a SIGKILLed one left -- never anyone else's."""

    def __init__(
        self,
        batch_id: str,
        jobs: int = 1,
        policy: Policy | None = None,
        runner: str | None = None,
        files: int | None = None,
    ) -> None:
        from ._pool import Pool

        self.batch_id = batch_id
        # no more sandboxes ahead than files: a one-file batch starts one, not ``jobs`` + refills
        self.pool = Pool(
            size=jobs,
            policy=policy,
            labels=((BATCH_LABEL, batch_id),),
            runner=runner,
            limit=files,
        )

    @property
    def name(self) -> str:
        return self.pool.name

    def ensure_image(self) -> str:
        return self.pool.ensure_image()

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        return self.pool.run(spec, job)

    def close(self) -> None:
        self.pool.close()

    def sweep(self) -> int:
        """Kill and remove this batch's containers. Never raises (the engine may be gone)."""
        try:
            from ._launch import connect

            engine = connect()
            count = 0
            for c in engine.containers([f"{BATCH_LABEL}={self.batch_id}"]):
                with contextlib.suppress(Exception):
                    engine.remove(str(c.get("Id", "")))
                    count += 1
            return count
        except Exception:
            return 0


# -- the batch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOptions:
    policy: Policy = field(default_factory=Policy.default)
    jobs: int | None = None  # default: os.cpu_count()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    force: bool = False
    report_dir: Path | None = None  # default: reports go to OUTDIR
    pins: Mapping[str, str] = field(default_factory=dict)  # realpath -> sha256 hex
    require_pins: bool = False  # a lock file: every model input must be pinned
    retries: int = 4  # engine-unavailable retries per file
    backoff_s: float = 1.0  # first retry delay; doubles, capped at 30 s
    shared: str = "complete"  # or "dedupe": tied tensors under one name (HF)
    allow_unverified: bool = False  # write tensors the host could not verify (MEDIUM)
    runner: str | None = None  # docker, bwrap or auto (None: $MODEL_SANDBOX_RUNNER)


@dataclass(frozen=True)
class BatchProgress:
    """A snapshot for the progress callback (called from the thread that runs the batch)."""

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float
    counts: Mapping[str, int]
    last: ItemResult | None
    running: tuple[str, ...] = ()  # inputs being loaded now (relative paths, sorted)

    @property
    def rate_bytes_s(self) -> float:
        return self.bytes_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.done == 0 or self.elapsed_s <= 0:
            return None
        return (self.total - self.done) * self.elapsed_s / self.done


@dataclass
class BatchSummary:
    outdir: Path
    results: list[ItemResult]
    excluded: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    stopped: str | None = None  # why the batch stopped early (engine gone)
    not_done: list[str] = field(default_factory=list)
    # sharded checkpoints: the model.safetensors.index.json written (output rels), and why an
    # index was not
    indexes: list[str] = field(default_factory=list)
    index_problems: list[str] = field(default_factory=list)
    # facts about where the batch ran worth a line (a Dask worker that refused its tasks)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return _counts(self.results)

    @property
    def exit_code(self) -> int:
        if self.stopped is not None or self.index_problems:
            return 2
        return max((r.exit_code for r in self.results), default=0)

    @property
    def bytes_in(self) -> int:
        return sum(r.size for r in self.results if r.status is not Status.SKIPPED)

    @property
    def bytes_out(self) -> int:
        total = 0
        for r in self.results:
            if r.output:
                with contextlib.suppress(OSError):
                    total += os.stat(self.outdir / r.output).st_size
        return total

    @property
    def problems(self) -> list[ItemResult]:
        """Every input that is not clean (unsafe or failed), worst first."""
        bad = [r for r in self.results if r.verdict not in (None, Verdict.CLEAN)]
        return sorted(bad, key=lambda r: (-_rank(r.verdict), r.rel))

    def slowest(self, n: int = 5) -> list[ItemResult]:
        done = [r for r in self.results if not r.reused and r.status is not Status.SKIPPED]
        return sorted(done, key=lambda r: -r.duration_s)[:n]

    def reports(self) -> list[LoadReport]:
        """The load report of every input that has one (reused ones are read back)."""
        out = []
        for r in self.results:
            rep = r.load_report
            if rep is None and r.report:
                with contextlib.suppress(OSError, ValueError):
                    rep = LoadReport.from_json((self.outdir / r.report).read_text("utf-8"))
            if rep is not None:
                out.append(rep)
        return out


def _rank(v: Verdict | None) -> int:
    return -1 if v is None else v.rank


def _counts(results: Sequence[ItemResult]) -> dict[str, int]:
    counts = {"clean": 0, "suspicious": 0, "malicious": 0, "error": 0, "skipped": 0, "reused": 0}
    for r in results:
        counts["skipped" if r.verdict is None else r.verdict.value] += 1
        counts["reused"] += r.reused
    return counts


class EngineGone(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Item:
    """One input on its way through the batch (:func:`_process`): its entry, when it started,
    and what is learned about it as it goes, refined with :func:`dataclasses.replace`."""

    entry: Entry
    started: float  # time.monotonic(): the report's duration
    started_wall: float  # time.time(): the manifest's "started"
    fmt: str | None = None  # the format identified by content
    sha: str | None = None  # the sha256 hashed on this host (``entry.size`` then is what was hashed)
    dst: Path | None = None  # where the converted file goes


@dataclass
class BatchContext:
    outdir: Path
    report_root: Path
    options: BatchOptions
    runner: Runner
    previous: Mapping[str, ItemResult]
    out_rels: Mapping[str, str]
    tool: dict[str, str]
    cancel: threading.Event
    # where a file's sandbox runs when it is not this host: (item, ctx) -> the file's result,
    # given an item with its sha and dst (``_distribute.Remote``: a Dask cluster)
    remote: Callable[[Item, BatchContext], ItemResult] | None = None


def hash_input(path: str, cancel: threading.Event) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if cancel.is_set():
                raise Cancelled
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class Cancelled(Exception):
    pass


def _sha_of(path: Path) -> str | None:
    try:
        return _files.sha256_file(str(path))[0]
    except OSError:
        return None


def _reusable(prev: ItemResult | None, sha: str, size: int, ctx: BatchContext) -> bool:
    if prev is None or ctx.options.force or prev.status is Status.SKIPPED:
        return False
    policy = ctx.options.policy
    if (prev.sha256, prev.size) != (sha, size) or prev.policy.get("digest") != policy.digest:
        return False
    if (
        prev.tool.get("worker_digest") != ctx.tool["worker_digest"]
        or prev.tool.get("version") != ctx.tool["version"]
        or prev.tool.get("shared", "complete") != ctx.tool["shared"]
    ):
        return False
    if (
        prev.report is None
        or prev.report_sha256 is None
        or prev.report != _rel_to(ctx.outdir, ctx.report_root / f"{prev.rel}.report.json")
        or _sha_of(ctx.outdir / prev.report) != prev.report_sha256
    ):
        return False
    if prev.status is Status.CONVERTED:
        if prev.output is None or prev.output != ctx.out_rels.get(prev.rel) or prev.output_sha256 is None:
            return False
        return _sha_of(ctx.outdir / prev.output) == prev.output_sha256
    return True


def _rel_to(outdir: Path, path: Path) -> str:
    return os.path.relpath(path, outdir).replace(os.sep, "/")


def _top(report: LoadReport) -> str | None:
    if not report.findings:
        return None
    f = max(report.findings, key=lambda f: f.severity)
    return f"{f.severity} {f.rule}: {f.message}"


def static_failure(item: Item, ctx: BatchContext, exc: SandboxError) -> ItemResult:
    """A report for a file refused or failed before any container ran (or whose worker's
    answer is not one): what the item knows so far, and the error."""
    report = LoadReport(
        input_path=item.entry.source,
        input_sha256=item.sha,
        input_size=item.entry.size,
        format=item.fmt,
        verdict=Verdict.ERROR,
        error={"reference": exc.reference, "message": exc.message},
        tool=dict(ctx.tool),
        policy={"name": ctx.options.policy.name, "digest": ctx.options.policy.digest},
        duration_s=round(time.monotonic() - item.started, 3),
    )
    return finish(item, ctx, report, Status.FAILED, reason=exc.message, reference=exc.reference)


def finish(
    item: Item,
    ctx: BatchContext,
    report: LoadReport,
    status: Status,
    *,
    reason: str | None = None,
    reference: str | None = None,
) -> ItemResult:
    """Write the item's report and make its result (the manifest record)."""
    entry = item.entry
    rpath = _safe_join(ctx.report_root, f"{entry.rel}.report.json")
    report.outputs["report"] = str(rpath)
    data = report.to_json().encode()
    _files.atomic_write(rpath, data)
    out_rel = ctx.out_rels[entry.rel] if status is Status.CONVERTED else None
    return ItemResult(
        rel=entry.rel,
        status=status,
        size=entry.size,
        verdict=report.verdict,
        reason=reason,
        reference=reference,
        sha256=report.input_sha256,
        format=report.format,
        output=out_rel,
        output_sha256=report.outputs.get("safetensors_sha256") if out_rel else None,
        report=_rel_to(ctx.outdir, rpath),
        report_sha256=hashlib.sha256(data).hexdigest(),
        top_finding=_top(report),
        tool={**ctx.tool, **report.tool},
        policy=dict(report.policy),
        started=item.started_wall,
        finished=time.time(),
        duration_s=report.duration_s or 0.0,
        load_report=report,
    )


def not_converted(
    item: Item, ctx: BatchContext, report: LoadReport, *, reason: str, reference: str
) -> ItemResult:
    """The result of a load that raised: refused (judged unsafe) or failed (an error)."""
    if report.error is None and report.verdict is not Verdict.ERROR:
        return finish(item, ctx, report, Status.REFUSED)
    return finish(item, ctx, report, Status.FAILED, reason=reason, reference=reference)


def _process(entry: Entry, ctx: BatchContext) -> ItemResult:
    """One input, start to end. Never raises for a problem with the file itself."""
    item = Item(entry, started=time.monotonic(), started_wall=time.time())
    if ctx.cancel.is_set():
        raise Cancelled
    try:
        fmt = _scan.identify(entry.real)
        with open(entry.real, "rb") as f:
            head = f.read(4)
    except (MalformedInput, OSError) as exc:
        msg = exc.message if isinstance(exc, SandboxError) else f"cannot read: {exc.strerror}"
        return static_failure(
            item, ctx, InputUnreadable(f"{entry.rel!r} cannot be read: {msg}", path=entry.source)
        )
    item = dataclasses.replace(item, fmt=fmt)
    if fmt not in MODEL_FORMATS:
        if fmt == "unknown" and head == _ZIP_MAGIC:
            return static_failure(
                item,
                ctx,
                MalformedInput(
                    f"{entry.rel!r} starts like a zip archive but has no readable central directory "
                    "(truncated?)",
                    path=entry.source,
                ),
            )
        reason = (
            "empty file"
            if entry.size == 0
            else "already SafeTensors"
            if fmt == "safetensors"
            else "not a model file (content not recognised)"
        )
        return ItemResult(rel=entry.rel, status=Status.SKIPPED, size=entry.size, format=fmt, reason=reason)
    try:
        sha, size = hash_input(entry.real, ctx.cancel)
    except OSError as exc:
        return static_failure(
            item, ctx, InputUnreadable(f"{entry.rel!r} cannot be read: {exc.strerror}", path=entry.source)
        )
    entry = dataclasses.replace(entry, size=size)
    item = dataclasses.replace(item, entry=entry, sha=sha)
    pin = ctx.options.pins.get(entry.real) or ctx.options.pins.get(entry.source)
    if pin is None and ctx.options.require_pins:
        return static_failure(
            item,
            ctx,
            NotPinned(
                f"{entry.rel!r} is not listed in the lock file; refusing to open it", path=entry.source
            ),
        )
    if pin is not None and pin.lower() != sha:
        return static_failure(
            item,
            ctx,
            HashMismatch(
                f"{entry.rel!r} has sha256 {sha}, not the pinned {pin.lower()}",
                path=entry.source,
                expected=pin.lower(),
                actual=sha,
            ),
        )
    prev = ctx.previous.get(entry.rel)  # pins are checked first: a changed pin is never reused
    if prev is not None and _reusable(prev, sha, size, ctx):
        return dataclasses.replace(prev, reused=True, load_report=None)
    dst = _safe_join(ctx.outdir, ctx.out_rels[entry.rel])
    item = dataclasses.replace(item, dst=dst)
    if ctx.remote is not None:
        return ctx.remote(item, ctx)
    delay = ctx.options.backoff_s
    for attempt in range(ctx.options.retries + 1):
        try:
            report = _api.convert(
                entry.source,
                dst,
                policy=ctx.options.policy,
                expected_sha256=sha,
                shared=ctx.options.shared,
                allow_unverified=ctx.options.allow_unverified,
                runner=ctx.runner,
                write_report=False,
            )
            return finish(item, ctx, report, Status.CONVERTED)
        except EngineUnavailable as exc:
            if attempt == ctx.options.retries or ctx.cancel.wait(min(delay, 30.0)):
                raise EngineGone(exc.diagnostics()) from None
            delay *= 2
        except EngineError as exc:
            raise EngineGone(exc.diagnostics()) from None
        except SandboxError as exc:
            report = exc.report or LoadReport(input_path=entry.source, verdict=Verdict.ERROR)
            return not_converted(item, ctx, report, reason=exc.message, reference=exc.reference)
        except Exception as exc:  # a bug or a host I/O error: this file fails, the batch goes on
            bug = InternalError(f"internal error while converting {entry.rel!r}: {type(exc).__name__}: {exc}")
            return static_failure(item, ctx, bug)
    raise AssertionError("unreachable")


def _sweep_stale(*roots: Path) -> None:
    """Remove temporary files an atomic write left behind when a run was SIGKILLed."""
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                p = os.path.join(dirpath, name)
                if _STALE_TMP.match(name) and stat.S_ISREG(os.lstat(p).st_mode):
                    with contextlib.suppress(OSError):
                        os.unlink(p)


def batch_id(outdir: str | os.PathLike[str]) -> str:
    return hashlib.sha256(os.path.realpath(os.fspath(outdir)).encode()).hexdigest()[:16]


# -- sharded checkpoints ------------------------------------------------------------------------

_MAX_INDEX_BYTES = 64 << 20
_SIDECARS = (".json",)  # what from_pretrained reads beside the weights (config, tokenizer...)
_MAX_SIDECAR_BYTES = 16 << 20


@dataclass(frozen=True)
class _Sharded:
    """A ``*.index.json`` whose weight map names shard files beside it (``transformers``'
    sharded ``.bin`` layout): each shard converts to ``model-0000N-of-0000M.safetensors``."""

    index_rel: str
    directory: str  # rel of the directory ("" for a SRC root)
    weight_map: dict[str, str]  # tensor name -> shard file name
    renamed: dict[str, str]  # shard rel -> output rel


def _shard_plans(entries: Sequence[Entry]) -> list[_Sharded]:
    """The sharded checkpoints among ``entries``: an index file (bounded, strict JSON) whose
    ``weight_map`` maps names to files that are all entries in its own directory."""
    by_rel = {e.rel: e for e in entries}
    plans = []
    for e in entries:
        if (
            not e.rel.endswith(".index.json")
            or e.rel.endswith("model.safetensors.index.json")
            or e.size > _MAX_INDEX_BYTES
        ):
            continue
        try:
            with open(e.real, "rb") as f:
                doc = json.loads(f.read(_MAX_INDEX_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if (
            not isinstance(wmap, dict)
            or not wmap
            or not all(
                isinstance(k, str) and isinstance(v, str) and v and "/" not in v and v not in (".", "..")
                for k, v in wmap.items()
            )
        ):
            continue
        head = e.rel.rpartition("/")[0]
        shards = sorted(set(wmap.values()))
        rels = [f"{head}/{name}" if head else name for name in shards]
        if not all(r in by_rel for r in rels):
            continue
        n = len(rels)
        renamed = {
            r: (f"{head}/" if head else "") + f"model-{i:05d}-of-{n:05d}.safetensors"
            for i, r in enumerate(rels, 1)
        }
        plans.append(_Sharded(index_rel=e.rel, directory=head, weight_map=dict(wmap), renamed=renamed))
    return plans


def _write_index(plan: _Sharded, results: dict[str, ItemResult], out: Path, sources: dict[str, Entry]) -> str:
    """``model.safetensors.index.json`` for a converted sharded checkpoint (its weight map
    checked against the converted files' own keys) and the JSON files beside the index.
    Returns the index's output rel; raises ``BatchError`` with the reason it is not written."""
    from safetensors import SafetensorError, safe_open

    head = plan.directory
    shard_of_rel = {r.rpartition("/")[2]: r for r in plan.renamed}
    new_map: dict[str, str] = {}
    total = 0
    for shard_name, rel in sorted(shard_of_rel.items()):
        item = results.get(rel)
        if item is None or item.status is not Status.CONVERTED or item.output is None:
            raise BatchError(f"{plan.index_rel}: shard {rel!r} was not converted")
        try:
            with safe_open(str(_safe_join(out, item.output)), framework="numpy") as f:
                keys = set(f.keys())
                wanted = [k for k, v in plan.weight_map.items() if v == shard_name]
                missing = sorted(k for k in wanted if k not in keys)
                if missing:
                    raise BatchError(
                        f"{plan.index_rel}: {rel!r} converted without "
                        f"{len(missing)} tensor(s) its index names, e.g. "
                        f"{missing[0][:200]!r}"
                    )
                for k in wanted:
                    sl = f.get_slice(k)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    total += numel * safetensors_header.DTYPES.get(sl.get_dtype(), 1)
        except (SafetensorError, OSError) as exc:
            raise BatchError(f"{plan.index_rel}: cannot read {item.output!r}: {exc}") from None
        new_name = item.output.rpartition("/")[2]
        new_map.update({k: new_name for k in wanted})
    doc = {
        "metadata": {"total_size": total, "format": "pt", "converted_by": f"model-sandbox {VERSION}"},
        "weight_map": dict(sorted(new_map.items())),
    }
    rel = f"{head}/model.safetensors.index.json" if head else "model.safetensors.index.json"
    _files.atomic_write(_safe_join(out, rel), json.dumps(doc, indent=2).encode())
    for src_rel, e in sources.items():  # config.json, tokenizer files...: data, copied as is
        if (
            src_rel.rpartition("/")[0] == head
            and src_rel.endswith(_SIDECARS)
            and src_rel != plan.index_rel
            and not src_rel.endswith(".index.json")
            and e.size <= _MAX_SIDECAR_BYTES
        ):
            with contextlib.suppress(OSError):
                with open(e.real, "rb") as f:
                    data = f.read(_MAX_SIDECAR_BYTES + 1)
                if len(data) <= _MAX_SIDECAR_BYTES:
                    _files.atomic_write(_safe_join(out, src_rel), data)
    return rel


def run_batch(
    sources: Sequence[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    options: BatchOptions | None = None,
    *,
    progress: Callable[[BatchProgress], None] | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    runner: Runner | None = None,
    client: Any = None,
    cluster_output: str = "stream",
) -> BatchSummary:
    """Convert every model file under ``sources`` into ``outdir`` (see the module docstring).

    ``progress`` receives snapshots (after each file and a few times a second); ``on_result``
    each finished input. Both are called from the calling thread. ``runner`` replaces the
    Docker engine (tests). A :class:`KeyboardInterrupt` in the calling thread ends the batch
    cleanly and returns the summary with ``interrupted=True``.

    ``client`` (a ``distributed.Client``) runs each file's sandbox on the Dask cluster's
    workers instead of this host (see :mod:`sandbox._distribute`); everything else -- discovery,
    hashes, pins, resume, the manifest, reports and outputs -- stays here. ``cluster_output``:
    ``"stream"`` (the worker sends the converted bytes back) or ``"shared"`` (the worker writes
    them beside their destination, on storage both reach; the client checks and renames them).
    Raises :class:`~sandbox.errors.WorkerNotReady` when no worker can run our sandbox."""
    options = options or BatchOptions()
    start = time.monotonic()
    remote = None
    if client is not None:
        from ._distribute import Remote

        remote = Remote(client, output=cluster_output)
    out = Path(outdir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    report_root = (options.report_dir or out).absolute()
    report_root.mkdir(parents=True, exist_ok=True)
    entries, skipped, excluded = discover(
        sources, include=options.include, exclude=options.exclude, ignore=(out, report_root)
    )
    manifest = _Manifest(out)
    jobs = max(1, options.jobs or (remote.slots if remote else os.cpu_count()) or 1)
    labelled = (
        _LabelledRunner(batch_id(out), jobs, options.policy, options.runner, files=len(entries))
        if runner is None and remote is None
        else None
    )
    completed_ok = False
    try:
        if labelled is not None:
            labelled.sweep()  # what a SIGKILLed run of this batch left behind
        _sweep_stale(out, report_root)
        plans = _shard_plans(entries)
        out_rels = _output_rels(entries)
        for plan in plans:
            out_rels.update(plan.renamed)
        ctx = BatchContext(
            outdir=out,
            report_root=report_root,
            options=options,
            runner=labelled or runner,  # type: ignore[arg-type]
            previous=dict(manifest.records),
            out_rels=out_rels,
            tool={
                "name": "model-sandbox",
                "version": VERSION,
                "worker_digest": _image.worker_digest(),
                "shared": options.shared,
            },
            cancel=threading.Event(),
            remote=remote,
        )
        summary = BatchSummary(
            outdir=out, results=list(skipped), excluded=excluded, notes=list(remote.notes) if remote else []
        )
        for r in skipped:
            manifest.append(r)
        total_bytes = sum(e.size for e in entries)
        done_bytes = 0

        def snapshot(last: ItemResult | None) -> None:
            if progress is not None:
                progress(
                    BatchProgress(
                        done=len(summary.results) - len(skipped),
                        total=len(entries),
                        bytes_done=done_bytes,
                        bytes_total=total_bytes,
                        elapsed_s=time.monotonic() - start,
                        counts=_counts(summary.results),
                        last=last,
                        running=tuple(sorted(e.rel for f, e in pending.items() if f.running())),
                    )
                )

        pending: dict[Future[ItemResult], Entry] = {}
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="model-sandbox-batch")
        pending.update({pool.submit(_process, e, ctx): e for e in entries})
        try:
            snapshot(None)
            while pending:
                finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for fut in finished:
                    entry = pending.pop(fut)
                    if fut.cancelled():
                        summary.not_done.append(entry.rel)
                        continue
                    try:
                        item = fut.result()
                    except EngineGone as exc:
                        if summary.stopped is None:
                            summary.stopped = exc.message
                            ctx.cancel.set()
                            for f in pending:
                                f.cancel()
                        summary.not_done.append(entry.rel)
                        continue
                    except Cancelled:
                        summary.not_done.append(entry.rel)
                        continue
                    done_bytes += entry.size
                    manifest.append(item)
                    summary.results.append(item)
                    if on_result is not None:
                        on_result(item)
                    snapshot(item)
                if not finished:
                    snapshot(None)
        except KeyboardInterrupt:
            summary.interrupted = True
            ctx.cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            if labelled is not None:
                labelled.pool.close()
                labelled.sweep()  # ends the in-flight loads now
            for fut, entry in pending.items():
                late: ItemResult | None = None
                with contextlib.suppress(BaseException):
                    late = fut.result() if not fut.cancelled() else None
                # a load cut short reads as an error: only trustworthy results are recorded
                if late is not None and late.verdict is not Verdict.ERROR:
                    manifest.append(late)
                    summary.results.append(late)
                else:
                    summary.not_done.append(entry.rel)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        summary.not_done.sort()
        summary.results.sort(key=lambda r: r.rel)
        if not summary.interrupted and summary.stopped is None:
            by_rel = {r.rel: r for r in summary.results}
            sources_by_rel = {e.rel: e for e in entries}
            for plan in plans:
                try:
                    summary.indexes.append(_write_index(plan, by_rel, out, sources_by_rel))
                except BatchError as exc:
                    summary.index_problems.append(exc.message)
        summary.elapsed_s = time.monotonic() - start
        completed_ok = True
        return summary
    finally:
        if labelled is not None:
            labelled.close()
            labelled.sweep()
        manifest.close(compact=completed_ok)
