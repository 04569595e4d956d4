"""The static scan of each container a checkpoint comes in: zip archives (torch zip, npz,
TorchScript, a zip hidden in another file), ``.npy`` object arrays, torch's legacy tar and
stacked-pickle formats, joblib pickles with inline arrays (static stage, host side).

The readers of :mod:`sandbox._formats` find the streams; :func:`~sandbox._scan.walker.walk`
walks each one; what the container itself does to fool other readers (duplicate names,
headers that disagree, CRC, flag bits, trailing data) becomes a finding here.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import replace

from sandbox._formats import npy, tar_archive
from sandbox._formats.buffer import Buf, u16, u32
from sandbox._formats.pickle_ops import LEGACY_MAGIC, LEGACY_PROTOCOL_VERSION, pickle_like
from sandbox._formats.zip_archive import (
    SUSPICIOUS_FLAGS,
    OutOfTime,
    UnsupportedCompression,
    Zip,
    ZipEntry,
    read_member,
    torch_target,
)
from sandbox.report import Severity

from . import walker
from .globals import JOBLIB_WRAPPERS, STORAGE_TYPES
from .results import StorageRecord
from .walker import Ctx, Global, Invalid, LimitExceeded, Truncated, WalkOut, walk, walk_quietly

_MAX_TRAILING_STREAMS = 16

# one record of a legacy tar member, read after its pickle: returns where the next one starts
_TarRecord = Callable[[Ctx, Buf, int, int, WalkOut], int]


def _member_bytes(
    ctx: Ctx, buf: Buf, e: ZipEntry, label: str, *, limit: int | None = None
) -> bytes | bytearray | None:
    """Uncompressed bytes of a zip member: its first ``limit`` bytes, or (without ``limit``)
    all of them within the scan limit; ``None`` with a finding when it cannot be scanned."""
    cap = ctx.max_pickle_bytes if limit is None else limit
    try:
        data, over = read_member(buf, e, cap, label, deadline=ctx.deadline)
    except OutOfTime:
        ctx.limit(label, LimitExceeded(0, "time budget exhausted while inflating it"))
        return None
    except UnsupportedCompression:
        ctx.add(
            "zip-unsupported-compression",
            Severity.HIGH,
            "evasion",
            f"zip member {label} uses compression method {e.method}; it cannot be scanned",
            member=label,
            method=e.method,
        )
        return None
    if over and limit is None:
        ctx.add(
            "scan-limit-exceeded",
            Severity.HIGH,
            "resource",
            f"zip member {label} is {e.csize} bytes, over the scan limit; not scanned"
            if e.method == 0
            else f"zip member {label} inflates past the scan limit; not scanned",
            member=label,
        )
        return None
    return data


def _check_zip(ctx: Ctx, buf: Buf, z: Zip, prefix: str) -> None:
    """Findings for container tricks: flag bits, header mismatches, duplicates, CRC."""
    seen: dict[bytes, int] = {}
    # an archive without a pickle or an array in it is no checkpoint: the loader refuses it, so
    # its flag bits (an encrypted text file, say) are no evasion
    loadable = any(e.name.lower().endswith((b".pkl", b".npy")) for e in z.entries)
    if z.disagreement is not None:
        ctx.add("zip-header-mismatch", Severity.HIGH, "evasion", z.disagreement, member=prefix + "zip")
    for e in z.entries:
        if ctx.over_records():
            _too_many(ctx, prefix, "checked for container tricks")
            return
        label = prefix + e.text
        key = e.name.lower()
        if key in seen:
            ctx.add(
                "zip-duplicate-name",
                Severity.HIGH,
                "evasion",
                f"zip holds more than one member named {e.text!r} (case-insensitively); "
                "readers disagree on which one they use",
                member=label,
                entries=[seen[key], e.index],
            )
        else:
            seen[key] = e.index
        if e.local_name != e.name:
            ctx.add(
                "zip-header-mismatch",
                Severity.HIGH,
                "evasion",
                f"zip local header names {e.local_name.decode('utf-8', 'backslashreplace')!r} "
                f"but the central directory names {e.text!r}",
                member=label,
            )
        if e.local_method != e.method:
            ctx.add(
                "zip-header-mismatch",
                Severity.HIGH,
                "evasion",
                f"zip member {e.text!r}: local header says compression {e.local_method}, "
                f"central directory {e.method}",
                member=label,
            )
        if (e.flags | e.local_flags) & SUSPICIOUS_FLAGS or e.flags != e.local_flags:
            ctx.add(
                "zip-flag-bits",
                Severity.HIGH if loadable else Severity.INFO,
                "evasion",
                f"zip member {e.text!r} has flag bits central=0x{e.flags:04x} "
                f"local=0x{e.local_flags:04x} (encryption/patch bits, or headers disagree)",
                member=label,
                central=e.flags,
                local=e.local_flags,
            )


def _too_many(ctx: Ctx, prefix: str, what: str) -> None:
    why = (
        "time budget exhausted"
        if time.monotonic() > ctx.deadline
        else f"more than {walker.MAX_RECORDS} records"
    )
    ctx.limit(prefix + "zip", LimitExceeded(0, f"{why}; the other members were not {what}"))


def _check_crc(ctx: Ctx, e: ZipEntry, data: bytes | bytearray, label: str) -> None:
    if len(data) != e.usize:
        ctx.add(
            "zip-header-mismatch",
            Severity.HIGH,
            "evasion",
            f"zip member {e.text!r} holds {len(data)} bytes but the directory says {e.usize}",
            member=label,
        )
    if zlib.crc32(data) != e.crc:
        ctx.add(
            "zip-bad-crc",
            Severity.HIGH,
            "evasion",
            f"zip member {e.text!r} fails its CRC-32 check; torch's reader does not check it, "
            "other readers refuse the file",
            member=label,
        )


def scan_zip(ctx: Ctx, buf: Buf, z: Zip, fmt: str, prefix: str = "") -> None:
    """Walk every member that could be unpickled; read no tensor data."""
    _check_zip(ctx, buf, z, prefix)
    target, matches, arch = torch_target(z.entries)
    data_dir = (arch.lower() + b"/data/") if arch is not None else None
    wanted_first = {id(e) for e in matches}
    over = False
    # what torch unpickles first: members ahead of it (a million of them, or bombs that use up
    # the time budget) must not keep it from being walked
    for e in matches + [e for e in z.entries if id(e) not in wanted_first]:
        if id(e) not in wanted_first and (ctx.over_records() or time.monotonic() > ctx.deadline):
            over = True
            break
        label = prefix + e.text
        lname = e.name.lower()
        if lname.endswith(b"/") and e.usize == 0:
            continue
        if e.bomb:
            ctx.add(
                "resource-abuse",
                Severity.MEDIUM,
                "resource",
                f"zip member {label} declares {e.usize} bytes from {e.csize} compressed "
                f"({e.usize // max(e.csize, 1)}:1): a decompression bomb for the loader; "
                "the scan does not inflate it",
                member=label,
                declared_bytes=e.usize,
                compressed_bytes=e.csize,
                ratio=e.usize // max(e.csize, 1),
            )
        if lname.endswith(b".npy"):
            _scan_npz_member(ctx, buf, e, label)
            continue
        if data_dir is not None and lname.startswith(data_dir) and e not in matches:
            continue  # raw tensor bytes: torch never unpickles them
        wanted = e in matches or lname.endswith(b".pkl")
        if not wanted:
            head = _member_bytes(ctx, buf, e, label, limit=2)
            wanted = head is not None and pickle_like(head)
        if not wanted:
            continue
        data = _member_bytes(ctx, buf, e, label)
        if data is None:
            continue
        _check_crc(ctx, e, data, label)
        _walk_member(ctx, data, label, truncation_fatal=(e in matches))
    if over:
        _too_many(ctx, prefix, "scanned")

    if fmt in ("torch-zip", "torchscript") and target is None:
        ctx.add(
            "zip-no-data-pkl",
            Severity.MEDIUM,
            "format",
            "zip holds pickles but no <prefix>/data.pkl that torch's reader would load",
        )


def _walk_member(ctx: Ctx, data: Buf, label: str, *, truncation_fatal: bool) -> None:
    try:
        walk(ctx, data, 0, len(data), label)
    except Truncated as exc:
        if truncation_fatal:
            raise Fatal(label, exc.offset, exc.message) from None
        parse_error(ctx, label, exc.offset, exc.message)
    except Invalid as exc:
        parse_error(ctx, label, exc.offset, exc.message)
    except LimitExceeded as exc:
        ctx.limit(label, exc)


class Fatal(Exception):
    def __init__(self, member: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.member = member
        self.offset = offset
        self.message = message


def parse_error(ctx: Ctx, member: str, offset: int, message: str) -> None:
    ctx.add(
        "pickle-parse-error",
        Severity.MEDIUM,
        "evasion",
        f"{member} is not a valid pickle stream ({message}); the unpickler runs every "
        "opcode before the fault",
        member=member,
        offset=offset,
    )


def scan_npy(ctx: Ctx, data: Buf, end: int, label: str) -> None:
    header, start = npy.header(data, 0, end, label)
    if npy.descr_has_object(header.get("descr")):
        member = f"{label}#pickle@{start}"
        plain = True
        try:
            walk(ctx, data, start, end, member)
        except (Truncated, Invalid) as exc:
            plain = False
            parse_error(ctx, member, exc.offset, exc.message)
        except LimitExceeded as exc:
            plain = False
            ctx.limit(label, exc)
        # an object array of plain values (numbers, strings, nested lists) imports nothing a
        # checkpoint does not: numpy still unpickles it, but there is nothing to run
        plain = plain and all(r.ref.classification == "allowed" for r in ctx.refs if r.ref.member == member)
        ctx.add(
            "numpy-object-array",
            Severity.INFO if plain else Severity.MEDIUM,
            "exec",
            f"{label} is an object array: numpy.load(allow_pickle=True) unpickles its data"
            + (" (plain values only)" if plain else ""),
            member=label,
            offset=start,
        )


def _scan_npz_member(ctx: Ctx, buf: Buf, e: ZipEntry, label: str) -> None:
    head = _member_bytes(ctx, buf, e, label, limit=12)  # magic, version, header length
    if head is None:
        return
    if len(head) >= 12 and head[:6] == b"\x93NUMPY" and head[6] in (1, 2, 3):
        hlen = u16(head, 8) + 10 if head[6] == 1 else u32(head, 8) + 12
        head = _member_bytes(ctx, buf, e, label, limit=min(hlen, npy.MAX_HEADER + 12))
        if head is None:
            return
    header, _ = npy.header(head, 0, len(head), label)
    if not npy.descr_has_object(header.get("descr")):
        return
    data = _member_bytes(ctx, buf, e, label)
    if data is None:
        return
    _check_crc(ctx, e, data, label)
    scan_npy(ctx, data, len(data), label)


def scan_tar(ctx: Ctx, buf: Buf) -> str:
    members, odd, capped = tar_archive.members(buf)
    if capped:
        ctx.limit("tar", LimitExceeded(0, f"more than {tar_archive.MAX_MEMBERS} tar members"))
    for name in odd:
        ctx.add(
            "legacy-tar-unparsed",
            Severity.HIGH,
            "evasion",
            f"tar member {name!r} is not a plain file",
            member=f"tar:{name}",
        )
    if "storages" not in members and "pickle" not in members:
        return "unknown"
    for name, copies in members.items():
        if len(copies) > 1:
            ctx.add(
                "zip-duplicate-name",
                Severity.HIGH,
                "evasion",
                f"tar holds {len(copies)} members named {name!r}; torch uses the last",
                member=f"tar:{name}",
            )
    for missing in ("storages", "tensors", "pickle"):
        if missing not in members:
            ctx.add(
                "legacy-tar-incomplete",
                Severity.MEDIUM,
                "format",
                f"legacy tar checkpoint has no {missing!r} member",
                member=f"tar:{missing}",
            )
    for start, size in members.get("storages", []):  # the trailer: the storage views
        _tar_records(ctx, buf, start, start + size, "storages", _tar_storage, trailer=True)
    for start, size in members.get("tensors", []):
        _tar_records(ctx, buf, start, start + size, "tensors", _tar_tensor)
    for start, size in members.get("pickle", []):
        _walk_member_region(ctx, buf, start, start + size, "tar:pickle")
    return "torch-tar"


def _walk_member_region(ctx: Ctx, buf: Buf, start: int, end: int, label: str) -> None:
    try:
        walk(ctx, buf, start, end, label)
    except Truncated as exc:
        raise Fatal(label, exc.offset, exc.message) from None
    except Invalid as exc:
        parse_error(ctx, label, exc.offset, exc.message)
    except LimitExceeded as exc:
        ctx.limit(label, exc)


def _tar_walk(ctx: Ctx, buf: Buf, p: int, end: int, base: int, what: str) -> WalkOut:
    label = f"tar:{what}@{p - base}"
    try:
        return walk(ctx, buf, p, end, label)
    except Truncated as exc:
        raise Fatal(label, exc.offset, exc.message) from None


def _tar_count(value: object, p: int, end: int, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > end - p:
        raise Invalid(0, f"{label} does not start with a record count")
    return value


def _tar_records(
    ctx: Ctx, buf: Buf, start: int, end: int, what: str, record: _TarRecord, *, trailer: bool = False
) -> None:
    """A legacy tar member of counted records (``storages``, ``tensors``): a pickled count,
    then per record a pickle and the binary data ``record`` checks (it returns where the next
    record starts), then (``trailer``) one more pickle. A part that cannot be followed ends
    the member's scan with a ``legacy-tar-unparsed`` finding; truncated data is fatal."""
    label = f"tar:{what}"
    try:
        out = _tar_walk(ctx, buf, start, end, start, what)
        p = out.end
        for _ in range(_tar_count(out.value, p, end, label)):
            out = _tar_walk(ctx, buf, p, end, start, what)
            p = record(ctx, buf, start, end, out)
        if trailer:
            _tar_walk(ctx, buf, p, end, start, what)
    except Invalid as exc:
        ctx.add(
            "legacy-tar-unparsed",
            Severity.HIGH,
            "evasion",
            f"tar member '{what}' cannot be followed ({exc.message}); the rest of it was not scanned",
            member=label,
            offset=exc.offset,
        )
    except LimitExceeded as exc:
        ctx.limit(label, exc)


def _tar_storage(ctx: Ctx, buf: Buf, start: int, end: int, out: WalkOut) -> int:
    """One ``storages`` record: (key, location, storage type), then int64 numel and the data."""
    p, rec = out.end, out.value
    if not (isinstance(rec, tuple) and len(rec) == 3 and isinstance(rec[2], Global)):
        raise Invalid(p - start, "storage entry is not (key, location, storage type)")
    key, location, stype = rec
    ref = ctx.refs[stype.idx].ref
    entry = STORAGE_TYPES.get(ref.name)
    if entry is None or not isinstance(location, str) or not isinstance(key, (str, int)):
        raise Invalid(p - start, f"storage type {ref.module}.{ref.name} is not known")
    if p + 8 > end:
        raise Fatal("tar:storages", p - start, "storage size header is truncated")
    numel = int.from_bytes(buf[p : p + 8], "little", signed=True)
    nbytes = numel * entry[1]
    if numel < 0 or p + 8 + nbytes > end:
        raise Fatal("tar:storages", p - start, "storage data is truncated")
    ctx.storages.append(
        StorageRecord(key=str(key), dtype=entry[0], numel=numel, location=location, member="tar:storages")
    )
    return p + 8 + nbytes


def _tar_tensor(ctx: Ctx, buf: Buf, start: int, end: int, out: WalkOut) -> int:
    """One ``tensors`` record: (key, storage id, type), then ndim, sizes and strides."""
    p = out.end
    if p + 8 > end:
        raise Fatal("tar:tensors", p - start, "tensor header is truncated")
    ndim = int.from_bytes(buf[p : p + 4], "little", signed=True)
    skip = 8 + 16 * ndim + 8
    if ndim < 0 or p + skip > end:
        raise Fatal("tar:tensors", p - start, "tensor header is truncated")
    return p + skip


# ---- stacked pickles ------------------------------------------------------------------------


def has_joblib_wrapper(ctx: Ctx, first_ref: int) -> bool:
    return any(r.ref.qualname in JOBLIB_WRAPPERS for r in ctx.refs[first_ref:])


def scan_pickle_file(ctx: Ctx, buf: Buf, member: str) -> tuple[str, str | None] | None:
    """Raw pickle, legacy stacked torch pickles, or a joblib pickle with inline arrays.

    Returns ``None`` (and records nothing) when offset 0 does not start a pickle: the walk
    failed, imported nothing, and the data does not begin with a PROTO opcode.
    """
    size = len(buf)
    saved = ctx.mark()
    joblib = False
    try:
        out = walk(ctx, buf, 0, size, member)
        joblib = has_joblib_wrapper(ctx, saved[0])
    except (Truncated, Invalid) as exc:
        if has_joblib_wrapper(ctx, saved[0]):
            joblib = True
        elif not pickle_like(bytes(buf[:2])) and len(ctx.refs) == saved[0]:
            ctx.rollback(saved)
            return None
        elif isinstance(exc, Truncated):
            raise Fatal(member, exc.offset, exc.message) from None
        else:
            parse_error(ctx, member, exc.offset, exc.message)
            return "pickle", member
    except LimitExceeded as exc:
        ctx.limit(member, exc)
        return "pickle", member
    if joblib:
        ctx.format = "joblib"
        # Walk again the way joblib.load reads it; the plain walk above (kept) is what
        # pickle.load / torch.load would run on the same bytes.
        plain_refs = {(r.ref.module, r.ref.name, r.ref.offset) for r in ctx.refs[saved[0] :]}
        plain_findings = len(ctx.findings)
        del ctx.findings[saved[2] : plain_findings]
        mark = len(ctx.refs)
        label = f"{member}#joblib"
        try:
            out = walk(ctx, buf, 0, size, label, joblib=True)
        except Truncated as exc:
            raise Fatal(label, exc.offset, exc.message) from None
        except Invalid as exc:
            parse_error(ctx, label, exc.offset, exc.message)
            return "joblib", member
        except LimitExceeded as exc:
            ctx.limit(label, exc)
            return "joblib", member
        # drop duplicates of what the plain walk already recorded at the same offsets
        ctx.refs[mark:] = [
            r for r in ctx.refs[mark:] if (r.ref.module, r.ref.name, r.ref.offset) not in plain_refs
        ]
        _trailing(ctx, buf, out.end, member)
        return "joblib", member
    if out.value == LEGACY_MAGIC:
        ctx.format, ctx.target = "torch-legacy", "<legacy:3>"
        names = ["<legacy:1>", "<legacy:2>", "<legacy:3>", "<legacy:4>"]
        ctx.pickles[saved[3]] = "<legacy:0>"
        for rec in ctx.refs[saved[0] :]:
            rec.ref = replace(rec.ref, member="<legacy:0>")
        p = out.end
        for i, name in enumerate(names):
            try:
                step = walk(ctx, buf, p, size, name)
            except (Truncated, Invalid) as exc:
                raise Fatal(name, exc.offset, exc.message) from None
            except LimitExceeded as exc:
                ctx.limit(name, exc)
                return "torch-legacy", "<legacy:3>"
            if i == 0 and step.value != LEGACY_PROTOCOL_VERSION:
                ctx.add(
                    "pickle-parse-error",
                    Severity.MEDIUM,
                    "format",
                    f"legacy torch protocol version is {_shown(step.value)}, not 1001; torch "
                    "refuses the file after unpickling the first two streams",
                    member=name,
                )
            p = step.end
        return "torch-legacy", "<legacy:3>"
    _trailing(ctx, buf, out.end, member)
    return "pickle", member


def _shown(value: object) -> str:
    """A value a stream built, for a message: a small number or short string as written,
    anything else by its kind (the repr of a tuple the stream nested 200,000 deep raises
    ``RecursionError``)."""
    if (
        value is None
        or isinstance(value, (bool, float))
        or (isinstance(value, int) and value.bit_length() <= 128)
        or (isinstance(value, str) and len(value) <= 40)
    ):
        return repr(value)
    return f"a {type(value).__name__}"


def _trailing(ctx: Ctx, buf: Buf, p: int, member: str) -> None:
    size = len(buf)
    if p >= size:
        return
    ctx.add(
        "pickle-trailing-data",
        Severity.LOW,
        "format",
        f"{size - p} bytes follow the first pickle stream; pickle.load ignores them",
        member=member,
        offset=p,
        length=size - p,
    )
    for _ in range(_MAX_TRAILING_STREAMS):
        if p >= size or not pickle_like(bytes(buf[p : p + 2])):
            return
        out = walk_quietly(ctx, buf, p, size, f"{member}@{p}")
        if out is None:
            return
        p = out.end
