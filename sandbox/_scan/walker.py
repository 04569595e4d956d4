"""The static walker: one pickle stream run symbolically, to see what it would import and call
(static stage, host side).

It drives the shared opcode decoder (:mod:`sandbox._formats.pickle_ops`) and emulates the C
unpickler's stack, mark stack and memo with inert stand-ins: a global is an index into the
import records, a call an :class:`Obj`, containers keep their first :data:`_MAX_KEEP` items.
Nothing the stream names is imported or called.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox._formats import npy
from sandbox._formats.buffer import Buf
from sandbox._formats.pickle_ops import BIG_INT as BIG
from sandbox._formats.pickle_ops import (
    HIGHEST_PROTOCOL,
    OP_PROTO,
    STACK_OPS,
    Fault,
    Invalid,
    Span,
    Truncated,
    at,
    check_text,
    resolve_name,
    stack_op,
    step,
    text,
)
from sandbox.report import Finding, Severity

from .globals import CALLS_FIRST_ARGUMENT, JOBLIB_WRAPPERS, STORAGE_TYPES, classify_global
from .results import GlobalRef, JoblibArray, StaticScan, StorageRecord

_MAX_NESTING = 4  # pickles inside pickles inside ...
_MAX_STACK = 5_000_000  # symbolic stack entries in one stream
# Symbolic containers (dicts, lists, tuples, call results) built over the whole file: each one
# can stay alive (kept in a tuple, a memo slot, a container's first items), so this bounds the
# walk's memory (~125 bytes each) the way _MAX_STACK bounds the stack alone. 12 million empty
# dicts gathered into tuples once cost 1.5 GB; at the opcode limit, 6 GB.
_MAX_VALUES = 4_000_000
# Import records, storage records, findings, joblib arrays and streams over the whole file: a
# stream of 3 million GLOBAL/POP pairs (36 MB) once held 3 million records (1.7 GB) and put
# every one of them in the report. Legitimate checkpoints hold a few per tensor.
MAX_RECORDS = 500_000
_MAX_KEEP = 64  # container items kept for symbolic evaluation
_MAX_STR = 1 << 16  # longer strings are kept only as their length
_SEVERITY_OF = {"dangerous": Severity.CRITICAL, "unknown": Severity.MEDIUM}
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_TEXT = _ZIP_MAGIC.decode("latin-1")

__all__ = ["BIG_INT", "Ctx", "Invalid", "LimitExceeded", "Truncated", "WalkOut", "new_ctx", "result", "walk"]


class LimitExceeded(Exception):
    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


@dataclass
class RefRec:
    """One import as the walk records it. ``ref`` is the public record, kept up to date (its
    ``called``) as the walk goes; its ``classification`` is the global's own, before the
    context rule of :func:`classification`. ``category`` is the danger category of a dangerous
    global, ``unresolved`` marks an import the scanner could not name."""

    ref: GlobalRef
    category: str | None
    unresolved: bool = False
    # functools.partial only: True while every partial it made binds a global that is not
    # dangerous to literal arguments and none of them is called in the stream; False once one
    # is not; None when it made none
    inert_partial: bool | None = None


@dataclass
class Ctx:
    max_pickle_bytes: int
    max_ops: int
    max_memo: int
    max_depth: int
    deadline: float
    ops: int = 0
    refs: list[RefRec] = field(default_factory=list)
    storages: list[StorageRecord] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    joblib_arrays: list[JoblibArray] = field(default_factory=list)
    protocol_max: int | None = None
    format: str = "unknown"  # as far as known; reported in MalformedStream.partial
    target: str | None = None
    zip_nest: int = 0  # zip archives inside bytes constants being scanned, one in another
    values: int = 0  # symbolic containers built so far (see walker._MAX_VALUES)

    def records(self) -> int:
        """Records kept for the result so far (see walker.MAX_RECORDS)."""
        return (
            len(self.refs)
            + len(self.storages)
            + len(self.findings)
            + len(self.pickles)
            + len(self.joblib_arrays)
        )

    def over_records(self) -> bool:
        return self.records() > MAX_RECORDS

    def add(self, rule: str, severity: Severity, category: str, message: str, **evidence: object) -> None:
        self.findings.append(
            Finding(rule=rule, severity=severity, category=category, message=message, evidence=dict(evidence))
        )

    def mark(self) -> tuple[int, int, int, int]:
        return len(self.refs), len(self.storages), len(self.findings), len(self.pickles)

    def rollback(self, mark: tuple[int, int, int, int]) -> None:
        del self.refs[mark[0] :]
        del self.storages[mark[1] :]
        del self.findings[mark[2] :]
        del self.pickles[mark[3] :]

    def limit(self, member: str, exc: LimitExceeded) -> None:
        self.add(
            "scan-limit-exceeded",
            Severity.HIGH,
            "resource",
            f"scan of {member} stopped: {exc.message}; the scan is incomplete",
            member=member,
            offset=exc.offset,
        )


def new_ctx(max_pickle_bytes: int, max_ops: int, max_memo: int, max_depth: int, time_budget_s: float) -> Ctx:
    return Ctx(
        max_pickle_bytes=max(1, int(max_pickle_bytes)),
        max_ops=max(1, int(max_ops)),
        max_memo=max(1, int(max_memo)),
        max_depth=max(1, int(max_depth)),
        deadline=time.monotonic() + float(time_budget_s),
    )


# --------------------------------------------------------------------------------------------
# Symbolic values
# --------------------------------------------------------------------------------------------


class Global:
    __slots__ = ("idx",)

    def __init__(self, idx: int) -> None:
        self.idx = idx


class Obj:
    """Result of a call (REDUCE, NEWOBJ, INST, OBJ) or of persistent_load."""

    __slots__ = ("args", "callee", "kind", "state")

    def __init__(self, kind: str, callee: object, args: object) -> None:
        self.kind = kind
        self.callee = callee
        self.args = args
        self.state: object = None


class List:
    __slots__ = ("count", "items")

    def __init__(self, items: list[object]) -> None:
        self.items = items[:_MAX_KEEP]
        self.count = len(items)

    def extend(self, items: list[object]) -> None:
        room = _MAX_KEEP - len(self.items)
        if room > 0:
            self.items.extend(items[:room])
        self.count += len(items)


class Dict:
    __slots__ = ("count", "items")

    def __init__(self) -> None:
        self.items: list[tuple[object, object]] = []
        self.count = 0

    def add(self, key: object, value: object) -> None:
        if len(self.items) < _MAX_KEEP:
            self.items.append((key, value))
        self.count += 1

    def get(self, key: str) -> object:
        for k, v in self.items:
            if k == key:
                return v
        return MISSING


class Bytes:
    """A bytes constant, kept as a region of the stream's buffer."""

    __slots__ = ("buf", "end", "start")

    def __init__(self, buf: Buf, start: int, end: int) -> None:
        self.buf = buf
        self.start = start
        self.end = end


class Opaque:
    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


class LongStr(Opaque):
    """A str constant longer than :data:`_MAX_STR`: kept as a way to read it again, not as text."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], str]) -> None:
        super().__init__("long str")
        self.read = read


MISSING = Opaque("missing")
OPAQUE = Opaque("value")
BIG_INT = Opaque("big int")


@dataclass
class WalkOut:
    value: object
    end: int
    protocol: int


def walk(
    ctx: Ctx, buf: Buf, start: int, end: int, member: str, *, nest: int = 0, joblib: bool = False
) -> WalkOut:
    """Walk one pickle stream in ``buf[start:end]`` up to its STOP opcode.

    Emulates the C unpickler's stack, mark stack and memo symbolically over the shared opcode
    decoder. Raises ``Truncated``, ``Invalid`` or ``LimitExceeded``; globals, storages and
    findings seen before the fault stay in ``ctx``. With ``joblib`` the raw array bytes joblib
    writes after each ``NumpyArrayWrapper`` BUILD are skipped as ``joblib.load`` does.
    """
    ctx.pickles.append(member)
    pos = start
    op_off = start
    proto = 0
    max_proto = 0
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    frame_end = -1
    straddle_reported = False
    max_ops = ctx.max_ops
    deadline = ctx.deadline
    fence = 0
    built = 0  # symbolic containers this walk made (added to ctx.values when it ends)

    def pop() -> object:
        if len(stack) <= fence:
            raise Invalid(-1, "unpickling stack underflow")
        return stack.pop()

    def top() -> object:
        if len(stack) <= fence:
            raise Invalid(-1, "unpickling stack underflow")
        return stack[-1]

    def pop_mark() -> list[object]:
        nonlocal fence
        if not marks:
            raise Invalid(-1, "could not find MARK")
        k = marks.pop()
        fence = marks[-1] if marks else 0
        items = stack[k:]
        del stack[k:]
        return items

    def called(value: object) -> None:
        if isinstance(value, Global):
            rec = ctx.refs[value.idx]
            if not rec.ref.called:
                rec.ref = replace(rec.ref, called=True)
        elif isinstance(value, Obj) and _partial_ref(ctx, value.callee) is not None:
            _partial_ref(ctx, value.callee).inert_partial = False  # type: ignore[union-attr]

    def call(func: object, args: object, opcode: str) -> None:
        """``func(*args)``: ``func`` is called, and so is the callable an allowlisted
        trampoline calls on its behalf (``_rebuild_from_type(func, type, args, state)`` runs
        ``func(*args)``: an unknown function handed to it is called, not merely named)."""
        called(func)
        computed_callee(func, opcode)
        if (
            isinstance(func, Global)
            and ctx.refs[func.idx].ref.qualname in CALLS_FIRST_ARGUMENT
            and isinstance(args, tuple)
            and args
        ):
            called(args[0])
            computed_callee(args[0], opcode)

    def computed_callee(func: object, opcode: str) -> None:
        # pickle calls only what it imported; calling what a call returned (a name resolved by
        # torch._utils._import_dotted_name("os.system"), any importer or getattr helper) runs
        # a callable no import names, whatever the allowlist says of the helper
        # (torch's legacy format returns a module's class from persistent_load: NEWOBJ of it;
        # what a dangerous global returns, getattr's attribute, is that global's finding)
        if (
            isinstance(func, Obj)
            and func.kind != "persid"
            and _partial_ref(ctx, func.callee) is None
            and not (
                isinstance(func.callee, Global)
                and ctx.refs[func.callee.idx].ref.classification == "dangerous"
            )
        ):
            ctx.add(
                "computed-call",
                Severity.HIGH,
                "evasion",
                f"{opcode} in {member} calls a value the load computes (what "
                f"{_callee_name(ctx, func) or 'another call'} returns): a callable no import names",
                member=member,
                offset=op_off - start,
                opcode=opcode,
            )

    def add_global(module: str, name: str, opcode: str) -> Global:
        module, name = resolve_name(module, name, proto)
        classification, category = classify_global(module, name)  # on the whole names
        ctx.refs.append(
            RefRec(
                GlobalRef(
                    _kept_name(module),
                    _kept_name(name),
                    member,
                    opcode,
                    op_off - start,
                    classification,
                    called=False,
                ),
                category,
            )
        )
        return Global(len(ctx.refs) - 1)

    def add_unresolved(opcode: str, why: str) -> Global:
        ctx.refs.append(
            RefRec(
                GlobalRef(
                    "<unresolved>", "<unresolved>", member, opcode, op_off - start, "unknown", called=False
                ),
                None,
                unresolved=True,
            )
        )
        ctx.add(
            "unresolved-global",
            Severity.HIGH,
            "evasion",
            f"{opcode} in {member} imports a global that cannot be resolved statically ({why})",
            member=member,
            offset=op_off - start,
            opcode=opcode,
        )
        return Global(len(ctx.refs) - 1)

    def mutated(target: object, opcode: str) -> None:
        # pickle never emits BUILD or an item opcode on a bare global: on a module, class or
        # function it sets attributes (or calls its append/extend/add), so a later import of
        # an allowlisted name can resolve to whatever the stream planted there
        if isinstance(target, Global):
            ref = ctx.refs[target.idx].ref
            ctx.add(
                "global-mutation",
                Severity.HIGH,
                "evasion",
                f"{opcode} in {member} changes the imported global {ref.qualname} itself",
                member=member,
                offset=op_off - start,
                opcode=opcode,
                target=ref.qualname,
            )

    def push_text(span: Span) -> None:
        if span[1] - span[0] > _MAX_STR:
            check_text(buf, span)  # still checked: the unpickler fails on invalid UTF-8
            stack.append(LongStr(lambda: text(buf, span)))
            # decoded whole only where it may be a pickle or a zip (see str_content)
            head = codecs.getincrementaldecoder("utf-8")("surrogatepass").decode(buf[span[0] : span[0] + 64])
            if head[:1] == "\x80" or head[:4] == _ZIP_TEXT:
                str_content(text(buf, span), span[0] - start)
            return
        s = text(buf, span)
        push_str(s, span[0])

    def push_str(s: str, a: int) -> None:
        stack.append(s)
        str_content(s, a - start)

    def str_content(s: str, rel: int) -> None:
        # a str that, as latin-1 bytes (how protocol 2 writes bytes), is a pickle or a zip
        if len(s) >= 4 and (
            (s[0] == "\x80" and ord(s[1]) <= HIGHEST_PROTOCOL) or (len(s) >= 22 and s[:4] == _ZIP_TEXT)
        ):
            try:
                data = s.encode("latin-1")
            except UnicodeEncodeError:
                return
            content(data, 0, len(data), rel, is_str=True)

    def content(data: Buf, a: int, b: int, rel: int, *, is_str: bool) -> None:
        """A bytes-like region that torch.load or pickle would read: a pickle or a zip."""
        if b - a >= 4 and data[a] == 0x80 and data[a + 1] <= HIGHEST_PROTOCOL:
            nested(data, a, b, rel, is_str=is_str)
        elif b - a >= 22 and bytes(data[a : a + 4]) == _ZIP_MAGIC:
            nested_zip(bytes(data[a:b]), rel)

    def push_bytes(a: int, b: int) -> None:
        stack.append(Bytes(buf, a, b))
        content(buf, a, b, a - start, is_str=False)

    def computed(func: object, args: object) -> object:
        """The value of a call the scan can compute without running anything of the file's:
        ``codecs.encode`` with a standard codec, ``bytes``/``bytearray`` of literals. A payload
        built that way (a zip as UTF-16 text, a pickle as a list of ints) is then scanned as
        the bytes it becomes. None: not computed."""
        if not isinstance(func, Global) or not isinstance(args, tuple):
            return None
        name = ctx.refs[func.idx].ref.qualname
        if name not in _COMPUTED:
            return None
        value = _compute(name, args, ctx.max_pickle_bytes)
        if value is _TOO_LONG:
            ctx.add(
                "scan-limit-exceeded",
                Severity.HIGH,
                "resource",
                f"{name} in {member} builds a value the scan kept only in part; what it builds "
                "is not scanned",
                member=member,
                offset=op_off - start,
            )
            return None
        if isinstance(value, str):
            str_content(value, op_off - start)
            return value
        if isinstance(value, bytes):
            if not (isinstance(args[0], str) and _latin1_of(args[0]) == value):  # else seen as text
                content(value, 0, len(value), op_off - start, is_str=False)
            return Bytes(value, 0, len(value))
        return None

    def nested_zip(data: bytes, rel: int) -> None:
        # a torch zip as a bytes constant: what torch.storage._load_from_bytes (every tensor
        # that plain pickle.dump wrote) and torch.load(io.BytesIO(...)) read, from the
        # constant's own end, whatever follows it in this stream
        from sandbox._formats.zip_archive import find_zip, zip_format
        from sandbox.errors import MalformedInput

        from .containers import Fatal, parse_error, scan_zip

        name = f"{member}#zip@{rel}"
        if nest + ctx.zip_nest + 1 > _MAX_NESTING:
            ctx.add(
                "scan-limit-exceeded",
                Severity.HIGH,
                "resource",
                f"archives nested more than {_MAX_NESTING} deep in {member}; not scanned",
                member=name,
                offset=rel,
            )
            return
        try:
            z = find_zip(data)
        except MalformedInput:
            return
        if z is None or not z.entries:
            return  # no zip reader (torch's either) finds an archive there
        saved = ctx.mark()
        ctx.zip_nest += 1
        try:
            scan_zip(ctx, data, z, zip_format(z)[0], prefix=f"{name}:")
        except Fatal as exc:
            parse_error(ctx, exc.member, exc.offset, exc.message)
        except MalformedInput:
            pass
        finally:
            ctx.zip_nest -= 1
        del ctx.storages[saved[1] :]  # its tensors are not the file's own records
        hidden = [rec for rec in ctx.refs[saved[0] :] if rec.ref.classification != "allowed"]
        ctx.add(
            "nested-pickle",
            Severity.HIGH if hidden else Severity.INFO,
            "evasion",
            f"{member} holds a bytes value that is a zip archive ({name}); its pickles scanned too",
            member=name,
            offset=rel,
        )

    def nested(data: Buf, a: int, b: int, rel: int, *, is_str: bool) -> None:
        name = f"{member}#nested@{rel}"
        if nest + 1 > _MAX_NESTING:
            ctx.add(
                "scan-limit-exceeded",
                Severity.HIGH,
                "resource",
                f"pickle nested more than {_MAX_NESTING} deep in {member}; not scanned",
                member=name,
                offset=rel,
            )
            return
        saved = ctx.mark()
        if walk_quietly(ctx, data, a, b, name, nest=nest + 1) is None and len(ctx.pickles) == saved[3]:
            return  # not a pickle after all: rolled back
        # Hiding a pickle inside a pickle is evasion when what it hides is not plain data; a
        # nested stream of allowlisted globals is how torch pickles storages (legacy bytes
        # handed to torch.storage._load_from_bytes), so that is only noted.
        hidden = [rec for rec in ctx.refs[saved[0] :] if rec.ref.classification != "allowed"]
        ctx.add(
            "nested-pickle",
            Severity.HIGH if hidden else Severity.INFO,
            "evasion",
            f"{member} holds a {'str' if is_str else 'bytes'} constant that is itself a "
            f"pickle ({name}); scanned too",
            member=name,
            offset=rel,
        )

    def record_persistent(pid: object) -> None:
        if not isinstance(pid, tuple) or not pid:
            return
        tag = pid[0]
        if isinstance(tag, Bytes):  # only its 7 bytes are copied: a tag may be a GiB constant
            tag = _small_text(tag, len("storage"))
        if tag != "storage":
            return
        rec = _storage_record(ctx, pid, member)
        if rec is None:
            ctx.add(
                "malformed-storage-record",
                Severity.MEDIUM,
                "format",
                f"persistent id in {member} names a storage but is not a valid storage record",
                member=member,
                offset=op_off - start,
            )
        else:
            ctx.storages.append(rec)

    def joblib_array(state: object) -> None:
        nonlocal frame_end, pos
        if frame_end > pos:  # joblib ends the frame before writing the array bytes
            ctx.add(
                "pickle-frame-mismatch",
                Severity.MEDIUM,
                "evasion",
                f"joblib array data in {member} starts inside a FRAME",
                member=member,
                offset=pos - start,
            )
        frame_end = -1
        info = _joblib_layout(state)
        if info is None:
            raise Invalid(-1, "joblib NumpyArrayWrapper state cannot be followed")
        nbytes, has_object, aligned = info
        if has_object:
            name = f"{member}#joblib-array@{pos - start}"
            pos = walk(ctx, buf, pos, end, name, nest=nest + 1).end
            return
        if aligned:
            if pos >= end:
                raise Truncated(-1, "joblib array padding runs past the end of the data")
            pos += 1 + buf[pos]
        if nbytes < 0 or pos + nbytes > end:
            raise Truncated(-1, f"length claim of {nbytes} bytes runs past the end of the data")
        if isinstance(state, Dict):  # the host's own reading of the array, for _verify
            h = hashlib.sha256()
            for lo in range(pos, pos + nbytes, 1 << 24):  # in slices: no copy of a large array
                h.update(buf[lo : min(lo + (1 << 24), pos + nbytes)])
            ctx.joblib_arrays.append(_joblib_digest(state, h.hexdigest()))
        pos += nbytes

    try:
        while True:
            ctx.ops += 1
            if ctx.ops > max_ops:
                raise LimitExceeded(pos - start, f"more than {max_ops} opcodes")
            if not ctx.ops & 0xFFF:
                if time.monotonic() > deadline:
                    raise LimitExceeded(pos - start, "time budget exhausted")
                if len(stack) > _MAX_STACK:
                    raise LimitExceeded(pos - start, f"more than {_MAX_STACK} values on the stack")
                if ctx.values + built > _MAX_VALUES:
                    raise LimitExceeded(pos - start, f"more than {_MAX_VALUES} containers built")
                if ctx.over_records():
                    raise LimitExceeded(
                        pos - start, f"more than {MAX_RECORDS} records (imports, findings...)"
                    )
            op_off = pos
            op, arg, pos = step(buf, pos, end)
            op_proto = OP_PROTO[op]
            if op_proto > max_proto:
                max_proto = op_proto

            if op == 0x71 or op == 0x72 or op == 0x70:  # BINPUT / LONG_BINPUT / PUT
                if arg < 0:
                    raise Invalid(-1, "negative PUT argument")
                if arg not in memo and len(memo) >= ctx.max_memo:
                    raise LimitExceeded(op_off - start, f"more than {ctx.max_memo} memo entries")
                memo[arg] = top()
            elif op == 0x68 or op == 0x6A or op == 0x67:  # BINGET / LONG_BINGET / GET
                if arg not in memo:
                    raise Invalid(-1, f"memo value not found at index {arg}")
                stack.append(memo[arg])
            elif op == 0x94:  # MEMOIZE
                if len(memo) >= ctx.max_memo:
                    raise LimitExceeded(op_off - start, f"more than {ctx.max_memo} memo entries")
                memo[len(memo)] = top()
            elif op == 0x58 or op == 0x8C or op == 0x8D:  # BINUNICODE / SHORT_BINUNICODE / 8
                push_text(arg)
            elif op == 0x28:  # MARK
                marks.append(len(stack))
                fence = len(stack)
                if len(marks) > ctx.max_depth:
                    raise LimitExceeded(op_off - start, f"more than {ctx.max_depth} nested MARKs")
            elif op == 0x4B or op == 0x4D or op == 0x4A or op == 0x47 or op == 0x46:
                stack.append(arg)  # BININT1 / BININT2 / BININT / BINFLOAT / FLOAT
            elif op == 0x74:  # TUPLE
                items = pop_mark()
                stack.append(tuple(items))
                built += 1 + len(items) // 8  # a long tuple keeps every item alive
            elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1/2/3
                n = op - 0x84
                if len(stack) - fence < n:
                    raise Invalid(-1, "unpickling stack underflow")
                items = stack[len(stack) - n :]
                del stack[len(stack) - n :]
                stack.append(tuple(items))
                built += 1
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x52:  # REDUCE
                args = pop()
                func = pop()
                call(func, args, "REDUCE")
                value = computed(func, args)
                _note_partial(
                    ctx,
                    func,
                    isinstance(args, tuple)
                    and len(args) >= 1
                    and _inert_target(ctx, args[0])
                    and _literal(args[1:]),
                )
                stack.append(Obj("reduce", func, args) if value is None else value)
                built += 1
            elif op == 0x62:  # BUILD
                state = pop()
                inst = top()
                mutated(inst, "BUILD")
                if isinstance(inst, Obj) and _partial_ref(ctx, inst.callee) is not None:
                    # partial.__setstate__((func, args, keywords, __dict__)): still not a call
                    _note_partial(
                        ctx,
                        inst.callee,
                        isinstance(state, tuple)
                        and len(state) == 4
                        and _inert_target(ctx, state[0])
                        and _literal(state[1:]),
                    )
                else:
                    called(inst)
                if isinstance(inst, Obj):
                    inst.state = state
                    if joblib and _callee_name(ctx, inst) in JOBLIB_WRAPPERS:
                        joblib_array(state)
            elif op == 0x81 or op == 0x92:  # NEWOBJ / NEWOBJ_EX
                if op == 0x92:
                    pop()
                args = pop()
                cls = pop()
                called(cls)
                computed_callee(cls, "NEWOBJ")
                stack.append(Obj("newobj", cls, args))
                built += 1
            elif op == 0x63 or op == 0x69:  # GLOBAL / INST
                module, name = arg
                g = add_global(module, name, "GLOBAL" if op == 0x63 else "INST")
                if op == 0x63:
                    stack.append(g)
                else:
                    items = pop_mark()
                    call(g, tuple(items), "INST")
                    value = computed(g, tuple(items))
                    stack.append(Obj("inst", g, tuple(items)) if value is None else value)
                    built += 1
            elif op == 0x93:  # STACK_GLOBAL
                name_v = pop()
                module_v = pop()
                if isinstance(module_v, str) and isinstance(name_v, str):
                    stack.append(add_global(module_v, name_v, "STACK_GLOBAL"))
                elif isinstance(module_v, _NOT_A_NAME) or isinstance(name_v, _NOT_A_NAME):
                    raise Invalid(-1, "STACK_GLOBAL requires str operands")
                else:
                    stack.append(add_unresolved("STACK_GLOBAL", "operands are not constant strings"))
            elif op == 0x6F:  # OBJ
                items = pop_mark()
                if not items:
                    raise Invalid(-1, "unpickling stack underflow")
                call(items[0], tuple(items[1:]), "OBJ")
                value = computed(items[0], tuple(items[1:]))
                stack.append(Obj("obj", items[0], tuple(items[1:])) if value is None else value)
                built += 1
            elif op == 0x7D:  # EMPTY_DICT
                stack.append(Dict())
                built += 1
            elif op == 0x5D:  # EMPTY_LIST
                stack.append(List([]))
                built += 1
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                if len(items) % 2:
                    raise Invalid(-1, "odd number of items for SETITEMS")
                target = top()
                mutated(target, "SETITEMS")
                if isinstance(target, Dict):
                    for i in range(0, min(len(items), 2 * _MAX_KEEP), 2):
                        target.add(items[i], items[i + 1])
                    target.count += max(0, len(items) // 2 - _MAX_KEEP)
            elif op == 0x73:  # SETITEM
                value = pop()
                key = pop()
                target = top()
                mutated(target, "SETITEM")
                if isinstance(target, Dict):
                    target.add(key, value)
            elif op == 0x61:  # APPEND
                value = pop()
                target = top()
                mutated(target, "APPEND")
                if isinstance(target, List):
                    target.extend([value])
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                target = top()
                mutated(target, "APPENDS")
                if isinstance(target, List):
                    target.extend(items)
            elif op == 0x51:  # BINPERSID
                pid = pop()
                record_persistent(pid)
                stack.append(Obj("persid", None, pid))
                built += 1
            elif op == 0x50:  # PERSID
                stack.append(Obj("persid", None, arg))
                built += 1
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x88:
                stack.append(True)
            elif op == 0x89:
                stack.append(False)
            elif op == 0x8A or op == 0x8B:  # LONG1 / LONG4
                stack.append(BIG_INT if arg is BIG else arg)
            elif op == 0x42 or op == 0x43 or op == 0x8E:  # BINBYTES / SHORT_BINBYTES / BINBYTES8
                push_bytes(arg[0], arg[1])
            elif op == 0x96:  # BYTEARRAY8
                stack.append(OPAQUE)
                content(buf, arg[0], arg[1], arg[0] - start, is_str=False)
            elif op == 0x54 or op == 0x55:  # BINSTRING / SHORT_BINSTRING
                if arg[1] - arg[0] > _MAX_STR:
                    lo, hi = arg
                    stack.append(LongStr(functools.partial(_latin1, buf, lo, hi)))
                    content(buf, lo, hi, lo - start, is_str=True)
                else:
                    push_str(bytes(buf[arg[0] : arg[1]]).decode("latin-1"), arg[0])
            elif op == 0x53:  # STRING
                if len(arg) > _MAX_STR:
                    raw = arg
                    stack.append(LongStr(functools.partial(_latin1, raw, 0, len(raw))))
                    content(raw, 0, len(raw), op_off + 1 - start, is_str=True)
                else:
                    push_str(arg.decode("latin-1"), op_off + 1)
            elif op == 0x56:  # UNICODE
                if len(arg) > _MAX_STR:
                    long_text = arg
                    stack.append(LongStr(functools.partial(str, long_text)))
                    str_content(arg, op_off + 1 - start)
                else:
                    push_str(arg, op_off + 1)
            elif op == 0x49 or op == 0x4C:  # INT / LONG
                stack.append(BIG_INT if arg is BIG else arg)
            elif op == 0x80:  # PROTO
                proto = arg
                if proto > max_proto:
                    max_proto = proto
            elif op == 0x95:  # FRAME
                if pos + arg > end:
                    # the C unpickler reads on regardless of a lying FRAME length: so do we, or a
                    # scanner goes blind while the loader runs every opcode that follows
                    ctx.add(
                        "pickle-frame-mismatch",
                        Severity.MEDIUM,
                        "evasion",
                        f"a FRAME in {member} claims {arg} bytes but only {end - pos} follow; "
                        "the opcodes after it are read anyway",
                        member=member,
                        offset=op_off - start,
                    )
                    frame_end = -1
                else:
                    frame_end = pos + arg
            elif op == 0x2E:  # STOP
                value = pop()
                ctx.protocol_max = max_proto if ctx.protocol_max is None else max(ctx.protocol_max, max_proto)
                return WalkOut(value, pos, max_proto)
            elif op in STACK_OPS:  # POP / POP_MARK / DUP
                stack_op(op, stack, marks, pop, pop_mark, top)
            elif op == 0x6C:  # LIST
                stack.append(List(pop_mark()))
                built += 1
            elif op == 0x64:  # DICT
                items = pop_mark()
                if len(items) % 2:
                    raise Invalid(-1, "odd number of items for DICT")
                d = Dict()
                for i in range(0, min(len(items), 2 * _MAX_KEEP), 2):
                    d.add(items[i], items[i + 1])
                d.count += max(0, len(items) // 2 - _MAX_KEEP)
                stack.append(d)
                built += 1
            elif op == 0x8F:  # EMPTY_SET
                stack.append(OPAQUE)
            elif op == 0x90:  # ADDITEMS
                pop_mark()
                mutated(top(), "ADDITEMS")
            elif op == 0x91:  # FROZENSET
                pop_mark()
                stack.append(OPAQUE)
            elif op == 0x82 or op == 0x83 or op == 0x84:  # EXT1 / EXT2 / EXT4
                width = 4 if op == 0x84 else op - 0x81
                stack.append(add_unresolved(f"EXT{width}", f"extension code {arg}"))
            elif op == 0x97:  # NEXT_BUFFER
                raise Invalid(-1, "out-of-band buffer (NEXT_BUFFER) without buffers")
            elif op == 0x98:  # READONLY_BUFFER
                top()
            else:  # pragma: no cover - the decoder refuses every other opcode
                raise Invalid(-1, f"unhandled opcode 0x{op:02x}")

            if frame_end >= 0:
                if pos > frame_end and op_off < frame_end and not straddle_reported:
                    straddle_reported = True
                    ctx.add(
                        "pickle-frame-mismatch",
                        Severity.MEDIUM,
                        "evasion",
                        f"an opcode in {member} runs past the end of its FRAME; framed readers "
                        "and the C unpickler disagree on such streams",
                        member=member,
                        offset=op_off - start,
                    )
                if pos >= frame_end:
                    frame_end = -1
    except Fault as exc:
        at(exc, op_off - start)
        raise
    finally:
        ctx.values += built


def walk_quietly(ctx: Ctx, buf: Buf, start: int, end: int, label: str, *, nest: int = 0) -> WalkOut | None:
    """:func:`walk` over bytes that may not be a pickle at all (a constant that starts like
    one, data after a stream): a fault that found no global leaves no trace (rolled back), one
    that did keeps what it found; a limit is a finding. ``None`` unless it reached STOP."""
    saved = ctx.mark()
    try:
        return walk(ctx, buf, start, end, label, nest=nest)
    except (Truncated, Invalid):
        if len(ctx.refs) == saved[0]:
            ctx.rollback(saved)
    except LimitExceeded as exc:
        ctx.limit(label, exc)
    return None


_MAX_NAME = 512  # characters of a global's module or name kept for the report


def _kept_name(s: str) -> str:
    """A module or attribute name as the record keeps it: a GLOBAL line has no length limit,
    and a 20 MB one was copied into the report three times (63 MB of JSON)."""
    return s if len(s) <= _MAX_NAME else f"{s[:_MAX_NAME]}…[{len(s)} characters]"


# operands that make STACK_GLOBAL fail in the unpickler (anything else may be a str at run time)
_NOT_A_NAME = (Bytes, int, float, tuple, List, Dict, type(None))


_COMPUTED = frozenset(
    {"_codecs.encode", "codecs.encode", "builtins.bytes", "builtins.bytearray", "builtins.str"}
)
_TOO_LONG = Opaque("too long")
# codecs whose encoder is the standard library's own (the codec search can find others that a
# module of this process registered: those are not run)
_STDLIB_CODEC_MODULES = ("_codecs", "encodings.", "_codecs_", "_multibytecodec")


def _latin1(data: Buf, lo: int, hi: int) -> str:
    return bytes(data[lo:hi]).decode("latin-1")


def _plain_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, LongStr):
        return value.read()
    return None


def _latin1_of(text_value: str) -> bytes | None:
    try:
        return text_value.encode("latin-1")
    except UnicodeEncodeError:
        return None


def _plain_bytes(value: object) -> bytes | None:
    if isinstance(value, Bytes):
        return bytes(value.buf[value.start : value.end])
    return None


def _stdlib_codec(encoding: object) -> codecs.CodecInfo | None:
    if not isinstance(encoding, str) or len(encoding) > 100:
        return None
    try:
        info = codecs.lookup(encoding)
    except (LookupError, ValueError, TypeError):
        return None
    module = str(getattr(info.encode, "__module__", "") or "")
    return info if module == "_codecs" or module.startswith(_STDLIB_CODEC_MODULES) else None


def _compute(name: str, args: tuple[object, ...], limit: int) -> object:
    """``name(*args)`` for the calls of :data:`_COMPUTED` on literal arguments: str, bytes,
    :data:`_TOO_LONG` (a list the walk kept only in part) or None (not computed)."""
    if name == "builtins.str":  # str(bytes, encoding[, errors]): a decode
        raw = _plain_bytes(args[0]) if args else None
        info = _stdlib_codec(args[1]) if len(args) in (2, 3) else None
        if (
            raw is None
            or info is None
            or not info._is_text_encoding
            or not all(isinstance(a, str) for a in args[1:])
        ):
            return None
        try:
            return raw.decode(info.name, *(a for a in args[2:] if isinstance(a, str)))
        except (UnicodeError, LookupError, ValueError, TypeError):
            return None
    if name in ("builtins.bytes", "builtins.bytearray"):
        if len(args) == 1 and isinstance(args[0], List):
            items = args[0]
            if items.count != len(items.items):
                return _TOO_LONG
            ints = [v for v in items.items if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256]
            return bytes(ints) if len(ints) == len(items.items) else None
        if len(args) in (2, 3) and all(isinstance(a, str) for a in args[1:]):
            text_arg = _plain_text(args[0])
            info = _stdlib_codec(args[1])
            if text_arg is None or info is None or not info._is_text_encoding:
                return None
            try:
                out = text_arg.encode(info.name, *(a for a in args[2:] if isinstance(a, str)))
            except (UnicodeError, LookupError, ValueError, TypeError):
                return None
            return out if len(out) <= limit else None
        return None
    if len(args) not in (2, 3) or not all(isinstance(a, str) for a in args[1:]):
        return None
    info = _stdlib_codec(args[1])
    if info is None:
        return None
    value: object = _plain_text(args[0])
    if value is None:
        value = _plain_bytes(args[0])
    if value is None:
        return None
    if info.name == "iso8859-1" and isinstance(args[0], LongStr):
        return None  # protocol 2's bytes: the same characters, already looked at as text
    encode: Any = info.encode
    try:
        out = encode(value, *(a for a in args[2:] if isinstance(a, str)))[0]
    except Exception:  # a codec's own complaint about its input: not computed
        return None
    if isinstance(out, (str, bytes)) and len(out) <= limit:
        return out
    return None


_PARTIAL = ("functools", "partial")


def _partial_ref(ctx: Ctx, value: object) -> RefRec | None:
    """The import record of ``functools.partial`` when ``value`` is that global."""
    if isinstance(value, Global):
        rec = ctx.refs[value.idx]
        if (rec.ref.module, rec.ref.name) == _PARTIAL:
            return rec
    return None


def _note_partial(ctx: Ctx, func: object, inert: bool) -> None:
    ref = _partial_ref(ctx, func)
    if ref is not None and ref.inert_partial is not False:
        ref.inert_partial = inert


def _inert_target(ctx: Ctx, value: object) -> bool:
    """A global a partial may bind without risk at load time: one that is not dangerous (an
    optimizer or scheduler class, an activation function); binding never calls it."""
    return (
        isinstance(value, Global)
        and ctx.refs[value.idx].ref.classification != "dangerous"
        and not ctx.refs[value.idx].unresolved
    )


def _literal(value: object, depth: int = 0) -> bool:
    """Plain data the static reading kept whole: no global, call or truncated container."""
    if value is None or isinstance(value, (bool, int, float, str, Bytes)):
        return True
    if depth > 16:
        return False
    if isinstance(value, tuple):
        return all(_literal(v, depth + 1) for v in value)
    if isinstance(value, List):
        return value.count == len(value.items) and all(_literal(v, depth + 1) for v in value.items)
    if isinstance(value, Dict):
        return value.count == len(value.items) and all(
            _literal(k, depth + 1) and _literal(v, depth + 1) for k, v in value.items
        )
    return False


def classification(r: RefRec) -> str:
    """A ref's classification, with the one context rule: ``functools.partial`` binding a
    global that is not dangerous to literal arguments, and never called, only stores a
    callable (as configs do with optimizer classes) and counts as allowed."""
    if (r.ref.module, r.ref.name) == _PARTIAL and r.inert_partial:
        return "allowed"
    return r.ref.classification


def _callee_name(ctx: Ctx, obj: Obj) -> str | None:
    if isinstance(obj.callee, Global):
        return ctx.refs[obj.callee.idx].ref.qualname
    return None


def _storage_record(ctx: Ctx, pid: tuple[object, ...], member: str) -> StorageRecord | None:
    """Decode ``('storage', StorageType, key, location, numel[, view_metadata])``."""
    if len(pid) not in (5, 6):
        return None
    stype, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if not isinstance(stype, Global):
        return None
    ref = ctx.refs[stype.idx].ref
    entry = STORAGE_TYPES.get(ref.name)
    if entry is None or not ref.module.startswith("torch"):
        return None
    if isinstance(location, Bytes):
        location = _small_text(location, _MAX_STR)
    if not isinstance(key, (str, int)) or isinstance(key, bool) or not isinstance(location, str):
        return None
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        return None
    return StorageRecord(key=str(key), dtype=entry[0], numel=numel, location=location, member=member)


def _small_text(b: Bytes, limit: int) -> str | None:
    """A bytes constant as latin-1 text when it holds at most ``limit`` bytes, else ``None``
    (never a copy of a large constant: the stream's buffer is the file, mapped)."""
    if b.end - b.start > limit:
        return None
    return bytes(b.buf[b.start : b.end]).decode("latin-1")


def _joblib_digest(state: Dict, sha256: str) -> JoblibArray:
    """dtype code, byte order, shape, memory order and sha256 of one inline joblib array."""
    dtype = state.get("dtype")
    code = (
        dtype.args[0]
        if isinstance(dtype, Obj)
        and isinstance(dtype.args, tuple)
        and dtype.args
        and isinstance(dtype.args[0], str)
        else "?"
    )
    dstate = dtype.state if isinstance(dtype, Obj) else None
    order = dstate[1] if isinstance(dstate, tuple) and len(dstate) > 1 and isinstance(dstate[1], str) else "|"
    shape = state.get("shape")
    memory = state.get("order")
    return JoblibArray(code, order, shape if isinstance(shape, tuple) else (), memory == "F", sha256)


def _joblib_layout(state: object) -> tuple[int, bool, bool] | None:
    """(array bytes, holds objects, has alignment padding) from a NumpyArrayWrapper state."""
    if not isinstance(state, Dict):
        return None
    shape = state.get("shape")
    dtype = state.get("dtype")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if not isinstance(dtype, Obj) or not isinstance(dtype.args, tuple) or not dtype.args:
        return None
    code = dtype.args[0]
    if not isinstance(code, str):
        return None
    has_object = code.lstrip("<>|=").startswith("O")
    itemsize = npy.itemsize(code) if not has_object else 8
    dstate = dtype.state
    if isinstance(dstate, tuple) and len(dstate) >= 8:
        if isinstance(dstate[5], int) and dstate[5] > 0:
            itemsize = dstate[5]
        if isinstance(dstate[7], int) and dstate[7] & 1:
            has_object = True
    if itemsize is None:
        return None
    count = 1
    for d in shape:
        count *= d
        if count > 1 << 62:
            return None
    alignment = state.get("numpy_array_alignment_bytes")
    aligned = alignment is not MISSING and alignment is not None
    return count * itemsize, has_object, aligned


# --------------------------------------------------------------------------------------------
# Building results
# --------------------------------------------------------------------------------------------


def _global_refs(ctx: Ctx) -> tuple[GlobalRef, ...]:
    return tuple(replace(r.ref, classification=classification(r)) for r in ctx.refs)


def _global_findings(ctx: Ctx) -> list[Finding]:
    """One finding per (member, global) that is not allowed."""
    groups: dict[tuple[str, str, str], list[RefRec]] = {}
    for r in ctx.refs:
        if classification(r) == "allowed" or r.unresolved:
            continue
        groups.setdefault((r.ref.member, r.ref.module, r.ref.name), []).append(r)
    out = []
    for (member, module, name), refs in groups.items():
        first = next((r for r in refs if classification(r) == "dangerous"), refs[0])
        dangerous = classification(first) == "dangerous"
        out.append(
            Finding(
                rule="dangerous-global" if dangerous else "unknown-global",
                severity=_SEVERITY_OF[classification(first)],
                category=(first.category or "exec") if dangerous else "exec",
                message=(
                    f"{member} imports {'dangerous' if dangerous else 'non-allowlisted'} "
                    f"global {module}.{name}" + (" and calls it" if any(r.ref.called for r in refs) else "")
                ),
                evidence={
                    "global": f"{module}.{name}",
                    "member": member,
                    "offset": first.ref.offset,
                    "opcode": first.ref.opcode,
                    "count": len(refs),
                    "called": any(r.ref.called for r in refs),
                },
            )
        )
    return out


def result(ctx: Ctx, fmt: str, torch_would_load: str | None) -> StaticScan:
    return StaticScan(
        format=fmt,
        pickles=tuple(ctx.pickles),
        globals=_global_refs(ctx),
        storages=tuple(ctx.storages),
        findings=tuple(ctx.findings) + tuple(_global_findings(ctx)),
        protocol_max=ctx.protocol_max,
        torch_would_load=torch_would_load,
        joblib_arrays=tuple(ctx.joblib_arrays),
    )
