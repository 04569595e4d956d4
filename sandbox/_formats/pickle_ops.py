"""The one pickle opcode decoder: every opcode's argument read from the bytes, bounds checked.

Two interpreters drive it: the static walker (:mod:`sandbox._scan.walker`), which runs the
stream symbolically to see what it would import and call, and the host's reconstruction
(:mod:`sandbox._verify.reconstruct`), which rebuilds a checkpoint's tensors without running
anything. They differ only in what they do with each opcode; how an opcode's argument is read
(widths, signedness, text lines, string decoding, protocol bookkeeping) is decided here once,
the way CPython's C unpickler reads it.

:func:`step` reads one opcode and returns ``(opcode, argument, offset after it)``. The
argument, by opcode:

* ``None`` for opcodes without one (MARK, STOP, TUPLE, REDUCE, BUILD, STACK_GLOBAL, ...);
* an ``int`` for PROTO, BININT*, EXT1/2/4, FRAME (the frame length), the memo opcodes
  (PUT/BINPUT/LONG_BINPUT, GET/BINGET/LONG_BINGET: the memo index; MEMOIZE has none);
* an ``int`` (or ``bool`` for ``INT 00``/``01``) for INT and LONG, and for LONG1/LONG4 an
  ``int``, or :data:`BIG_INT` when the literal is longer than 64 bytes (INT/LONG: 640
  digits);
* a ``float`` for FLOAT and BINFLOAT;
* a span ``(start, end)`` of the buffer for BINUNICODE*, BINBYTES*, BYTEARRAY8, BINSTRING and
  SHORT_BINSTRING: the interpreter decides whether to copy or decode it (:func:`text`
  decodes as pickle does);
* for STRING the escape-decoded ``bytes``; for UNICODE the decoded ``str``; for PERSID the
  ``str`` line;
* for GLOBAL and INST the ``(module, name)`` pair, decoded as UTF-8.

The decoder is a table of small functions over plain locals (no object per opcode): the
static scan walks tens of millions of opcodes.

Errors: data that ends early (or a length claim past the end) raises :class:`Truncated`;
an invalid opcode or argument raises :class:`Invalid`. Both carry the offset of the opcode
relative to the start of the stream.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import math
import re
import struct
import warnings
from collections.abc import Callable
from typing import Any

from .buffer import Buf

HIGHEST_PROTOCOL = 5
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy format: first stream is this int
LEGACY_PROTOCOL_VERSION = 1001

# opcode -> protocol that introduced it (pickletools' table, written out for our reader)
OP_PROTO: dict[int, int] = {
    **{ord(c): 0 for c in "ILSNVFaltds02(gpcRbi.P"},
    **{ord(c): 1 for c in "JKMTUXG]e)}u1hjqroQ"},
    **{c: 2 for c in (0x8A, 0x8B, 0x88, 0x89, 0x85, 0x86, 0x87, 0x82, 0x83, 0x84, 0x81, 0x80)},
    ord("B"): 3,
    ord("C"): 3,
    **{c: 4 for c in (0x8E, 0x8C, 0x8D, 0x8F, 0x90, 0x91, 0x94, 0x93, 0x92, 0x95)},
    0x96: 5,
    0x97: 5,
    0x98: 5,
}


class Fault(Exception):
    """A stream the unpickler would fail on, at ``offset`` (relative to the stream's start;
    ``-1`` when raised by an argument reader, which does not know where the stream began:
    :func:`at` fills it in)."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class Truncated(Fault):
    """The data ends before the stream does, or a length claim runs past its end."""


class Invalid(Fault):
    """An opcode or argument the unpickler refuses."""


class _Big:
    __slots__ = ()

    def __repr__(self) -> str:
        return "BIG_INT"


BIG_INT = _Big()  # a LONG1/LONG4 literal longer than 64 bytes (its value is not kept)
Span = tuple[int, int]  # a counted argument: buf[start:end]


def pickle_like(head: bytes | bytearray) -> bool:
    """``head`` starts with a PROTO opcode of a protocol pickle knows."""
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= HIGHEST_PROTOCOL


def resolve_name(module: str, name: str, proto: int) -> tuple[str, str]:
    """What the unpickler imports for ``module.name`` in a stream of protocol ``proto``
    (Python 2 names mapped through ``_compat_pickle`` below protocol 3, as pickle does)."""
    if proto < 3:
        mapped = _compat_pickle.NAME_MAPPING.get((module, name))
        if mapped is not None:
            return mapped
        if module in _compat_pickle.IMPORT_MAPPING:
            return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


def at(fault: Fault, offset: int) -> Fault:
    """``fault`` with the offset of the opcode it belongs to, unless it has one."""
    if fault.offset < 0:
        fault.offset = offset
    return fault


def text(buf: Buf, span: Span) -> str:
    """A BINUNICODE argument decoded as pickle does (UTF-8, lone surrogates allowed)."""
    try:
        return codecs.decode(bytes(buf[span[0] : span[1]]), "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise Invalid(-1, "invalid UTF-8 in string") from None


def check_text(buf: Buf, span: Span, chunk: int = 1 << 20) -> None:
    """Raise :class:`Invalid` where :func:`text` would, without building the string: the
    bytes are decoded a chunk at a time and dropped (a 4 GB BINUNICODE8 once cost a 4 GB copy
    and a string of up to 16 GB, only to be checked)."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    try:
        for at in range(span[0], span[1], chunk):
            decoder.decode(buf[at : min(at + chunk, span[1])])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise Invalid(-1, "invalid UTF-8 in string") from None


def _short(n: int) -> Truncated:
    return Truncated(-1, f"length claim of {n} bytes runs past the end of the data")


def _line(buf: Buf, pos: int, end: int) -> tuple[bytes, int]:
    idx = buf.find(b"\n", pos, end)
    if idx < 0:
        raise Truncated(-1, "line argument without newline")
    return bytes(buf[pos:idx]), idx + 1


def _uint_reader(width: int) -> _ArgReader:
    def read(buf: Buf, pos: int, end: int) -> tuple[object, int]:
        if pos + width > end:
            raise _short(width)
        return int.from_bytes(buf[pos : pos + width], "little"), pos + width

    return read


def _sint_reader(width: int) -> _ArgReader:
    def read(buf: Buf, pos: int, end: int) -> tuple[object, int]:
        if pos + width > end:
            raise _short(width)
        return int.from_bytes(buf[pos : pos + width], "little", signed=True), pos + width

    return read


def _counted_reader(width: int, signed: bool, what: str) -> _ArgReader:
    """A length of ``width`` bytes, then that many bytes: their span."""

    def read(buf: Buf, pos: int, end: int) -> tuple[object, int]:
        if pos + width > end:
            raise _short(width)
        n = int.from_bytes(buf[pos : pos + width], "little", signed=signed)
        if n < 0:
            raise Invalid(-1, f"{what} pickle has negative byte count")
        pos += width
        if pos + n > end:
            raise _short(n)
        return (pos, pos + n), pos + n

    return read


def _proto(buf: Buf, pos: int, end: int) -> tuple[object, int]:
    if pos + 1 > end:
        raise _short(1)
    proto = buf[pos]
    if proto > HIGHEST_PROTOCOL:
        raise Invalid(-1, f"unsupported pickle protocol: {proto}")
    return proto, pos + 1


def _binfloat(buf: Buf, pos: int, end: int) -> tuple[object, int]:
    if pos + 8 > end:
        raise _short(8)
    return struct.unpack(">d", buf[pos : pos + 8])[0], pos + 8


def _long_reader(width: int) -> _ArgReader:
    """LONG1/LONG4: a little-endian two's complement integer of a counted length."""

    def read(buf: Buf, pos: int, end: int) -> tuple[object, int]:
        if pos + width > end:
            raise _short(width)
        n = int.from_bytes(buf[pos : pos + width], "little", signed=width == 4)
        if n < 0:
            raise Invalid(-1, "LONG4 byte count < 0")
        pos += width
        if pos + n > end:
            raise _short(n)
        return _long_value(buf, pos, pos + n), pos + n

    return read


def _long_value(buf: Buf, start: int, end: int, chunk: int = 1 << 20) -> object:
    """The LONG1/LONG4 literal ``buf[start:end]``: an ``int`` when its value fits in 64 bytes,
    whatever its length (bytes past the 64th that only extend the sign are read through, a
    chunk at a time, never copied whole), else :data:`BIG_INT`. The unpickler reads a magic
    number padded to 300 bytes as the magic number."""
    head = min(end, start + 64)
    value = int.from_bytes(buf[start:head], "little", signed=True)
    fill = 0xFF if value < 0 else 0x00
    for at in range(head, end, chunk):
        part = bytes(buf[at : min(at + chunk, end)])
        if part.count(fill) != len(part):
            return BIG_INT
    return value


def _c_string(line: bytes) -> bytes:
    """``line`` as the C unpickler's number parsers see it: a C string, which ends at its first
    NUL (``I1\\0junk`` is the int 1 to the unpickler)."""
    nul = line.find(b"\0")
    return line if nul < 0 else line[:nul]


# What CPython's PyLong_FromString accepts with base 0 (Python's int literal syntax, ASCII
# whitespace around it), and C's strtol with base 0 (octal after a leading 0; no underscores).
_PY_INT = re.compile(
    rb"[ \t\n\r\v\f]*[+-]?(?:[1-9](?:_?[0-9])*|0(?:_?0)*|0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+"
    rb"|0[bB](?:_?[01])+)[ \t\n\r\v\f]*"
)
_STRTOL = re.compile(rb"[ \t\n\r\v\f]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")
_C_LONG = 1 << 63
#: CPython's default limit on decimal digits in a str -> int conversion: the loader runs
#: ``python -I`` (no PYTHONINTMAXSTRDIGITS), so the unpickler there refuses only longer ones
MAX_STR_DIGITS = 4300


def _py_int(text: bytes) -> object:
    """``PyLong_FromString(text, NULL, 0)``: an int (:data:`BIG_INT` past 640 digits, the lowest
    digit limit an interpreter can be given: the host's own int() may refuse what the loader's
    reads), or ``None`` where the unpickler fails."""
    if not _PY_INT.fullmatch(text):
        return None
    body = text.strip(b" \t\n\r\v\f").lstrip(b"+-").replace(b"_", b"")
    decimal = body[:2].lower() not in (b"0x", b"0o", b"0b")
    if decimal and len(body) > MAX_STR_DIGITS:
        return None  # ValueError: exceeds the limit for integer string conversion
    # a power-of-two base takes leading zeros without limit: only the digits after them count
    if len(body if decimal else body[2:].lstrip(b"0")) > 640:
        return BIG_INT
    return int(text, 0)


def _strtol(text: bytes) -> int | None:
    """C's ``strtol(text, &end, 0)`` when it consumes all of ``text`` without overflow."""
    m = _STRTOL.fullmatch(text)
    if m is None:
        return None
    sign, hexa, octal, dec = m.groups()
    if len((hexa or octal or dec).lstrip(b"0")) > 22:
        return None  # out of a C long's range (ERANGE): never a long number computed here
    value = int(hexa, 16) if hexa is not None else int(octal, 8) if octal is not None else int(dec)
    value = -value if sign == b"-" else value
    return value if -_C_LONG <= value < _C_LONG else None


def _memo_line(what: str) -> _ArgReader:
    """PUT/GET: ``PyLong_FromString(line, NULL, 10)`` of the line up to its first NUL."""

    def read(buf: Buf, pos: int, end: int) -> tuple[object, int]:
        line, pos = _line(buf, pos, end)
        text = _c_string(line)
        if len(text) > MAX_STR_DIGITS + 64:
            raise Invalid(-1, f"bad {what} argument")
        try:
            index = int(text)
        except ValueError:
            raise Invalid(-1, f"bad {what} argument") from None
        if not -_C_LONG <= index < _C_LONG:  # PyLong_AsSsize_t: OverflowError
            raise Invalid(-1, f"{what} argument out of range")
        return index, pos

    return read


def _names(buf: Buf, pos: int, end: int) -> tuple[object, int]:
    module, pos = _line(buf, pos, end)
    try:
        mod = module.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(-1, "global name is not UTF-8") from None
    name, pos = _line(buf, pos, end)
    try:
        return (mod, name.decode("utf-8")), pos
    except UnicodeDecodeError:
        raise Invalid(-1, "global name is not UTF-8") from None


def _string(buf: Buf, pos: int, end: int) -> tuple[object, int]:
    line, pos = _line(buf, pos, end)
    if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
        try:
            with warnings.catch_warnings():  # pickle decodes it the same way, quietly
                warnings.simplefilter("ignore", DeprecationWarning)
                return codecs.escape_decode(line[1:-1])[0], pos
        except ValueError:
            raise Invalid(-1, "bad STRING escape") from None
    raise Invalid(-1, "the STRING opcode argument must be quoted")


def _unicode(buf: Buf, pos: int, end: int) -> tuple[object, int]:
    line, pos = _line(buf, pos, end)
    try:
        return line.decode("raw-unicode-escape"), pos
    except UnicodeDecodeError:
        raise Invalid(-1, "bad UNICODE argument") from None


def _int_reader(long: bool) -> _ArgReader:
    """INT and LONG as the C unpickler reads them. INT: ``strtol(line, &end, 0)`` when it
    consumes the line (a two-character line of 0 or 1 is a bool), else
    ``PyLong_FromString(line, NULL, 0)``; LONG: a last ``L`` dropped, then
    ``PyLong_FromString``. Either ends at the line's first NUL. Every difference from what the
    unpickler accepts is a scanner blind spot: a 4,100-digit literal, a NUL in the line or a
    hexadecimal LONG once ended the walk while the unpickler read on."""

    def read(buf: Buf, pos: int, end: int) -> tuple[object, int]:
        line, pos = _line(buf, pos, end)
        if not line:
            raise Invalid(-1, "bad integer literal")
        if long and line.endswith(b"L"):
            line = line[:-1]
        text = _c_string(line)
        if not long:
            # strtol of an empty C string (the line starts with a NUL) reads no digit and stops
            # at its end: 0, accepted
            value = _strtol(text) if text else 0
            if value is not None:
                return (bool(value) if len(line) == 2 and value in (0, 1) else value), pos
        parsed = _py_int(text)
        if parsed is None:
            raise Invalid(-1, "bad integer literal")
        return parsed, pos

    return read


def _float(buf: Buf, pos: int, end: int) -> tuple[object, int]:
    """FLOAT as ``PyOS_string_to_double`` reads it: up to the line's first NUL, no whitespace
    or underscores (which Python's float() allows), an overflow an error."""
    line, pos = _line(buf, pos, end)
    text = _c_string(line)
    if _NOT_IN_C_FLOAT.search(text):
        raise Invalid(-1, "bad FLOAT literal")
    try:
        value = float(text)
    except ValueError:
        raise Invalid(-1, "bad FLOAT literal") from None
    if math.isinf(value) and b"inf" not in text.lower():
        raise Invalid(-1, "FLOAT literal out of range")
    return value, pos


_NOT_IN_C_FLOAT = re.compile(rb"[ \t\n\r\v\f_]")


def _persid(buf: Buf, pos: int, end: int) -> tuple[object, int]:
    line, pos = _line(buf, pos, end)
    return line.decode("latin-1"), pos


_ArgReader = Callable[[Buf, int, int], tuple[object, int]]
_NO_ARG = None
_READERS: dict[int, _ArgReader] = {
    0x80: _proto,
    **dict.fromkeys((0x4B, 0x71, 0x68, 0x82), _uint_reader(1)),  # BININT1 BINPUT BINGET EXT1
    **dict.fromkeys((0x4D, 0x83), _uint_reader(2)),  # BININT2 EXT2
    **dict.fromkeys((0x4A, 0x84), _sint_reader(4)),  # BININT EXT4
    **dict.fromkeys((0x72, 0x6A), _uint_reader(4)),  # LONG_BINPUT LONG_BINGET
    0x95: _uint_reader(8),  # FRAME
    0x70: _memo_line("PUT"),
    0x67: _memo_line("GET"),
    0x8A: _long_reader(1),
    0x8B: _long_reader(4),
    0x47: _binfloat,
    0x58: _counted_reader(4, False, "BINUNICODE"),
    0x8C: _counted_reader(1, False, "BINUNICODE"),
    0x8D: _counted_reader(8, False, "BINUNICODE"),
    0x42: _counted_reader(4, False, "BINBYTES"),
    0x43: _counted_reader(1, False, "BINBYTES"),
    0x8E: _counted_reader(8, False, "BINBYTES"),
    0x96: _counted_reader(8, False, "BYTEARRAY8"),
    0x54: _counted_reader(4, True, "BINSTRING"),
    0x55: _counted_reader(1, False, "BINSTRING"),
    0x53: _string,
    0x56: _unicode,
    0x49: _int_reader(False),
    0x4C: _int_reader(True),
    0x46: _float,
    0x63: _names,
    0x69: _names,
    0x50: _persid,
}


def _invalid(op: int) -> _ArgReader:
    def read(buf: Buf, pos: int, end: int) -> tuple[object, int]:
        raise Invalid(-1, f"invalid opcode 0x{op:02x}")

    return read


# opcode -> its argument reader; None for the opcodes that take no argument
_TABLE: list[_ArgReader | None] = [
    _READERS.get(op, _NO_ARG) if op in OP_PROTO else _invalid(op) for op in range(256)
]


def step(buf: Buf, pos: int, end: int) -> tuple[int, Any, int]:
    """The opcode at ``pos``, its argument (see the module docstring) and the offset after it.

    Raises :class:`Truncated` or :class:`Invalid` with ``offset`` -1 (see :func:`at`).
    """
    if pos >= end:
        raise Truncated(-1, "pickle data ended before the STOP opcode")
    op = buf[pos]
    read = _TABLE[op]
    if read is None:
        return op, None, pos + 1
    arg, pos = read(buf, pos + 1, end)
    return op, arg, pos


#: POP, POP_MARK and DUP: opcodes that only move values on the stack (see :func:`stack_op`)
STACK_OPS = frozenset({0x30, 0x31, 0x32})


def stack_op(
    op: int,
    stack: list[object],
    marks: list[int],
    pop: Callable[[], object],
    pop_mark: Callable[[], list[object]],
    top: Callable[[], object],
) -> None:
    """One of :data:`STACK_OPS`, with the C unpickler's rules, over an interpreter's ``stack``,
    ``marks`` and its own checked ``pop``/``pop_mark``/``top`` (which raise its errors and keep
    its fence): POP drops the MARK on top of the stack where there is one (an empty
    ``pop_mark``), else the top value; POP_MARK drops everything down to the last MARK; DUP
    pushes the top value again."""
    if op == 0x30:  # POP
        if marks and marks[-1] == len(stack):
            pop_mark()
        else:
            pop()
    elif op == 0x31:  # POP_MARK
        pop_mark()
    else:  # DUP
        stack.append(top())
