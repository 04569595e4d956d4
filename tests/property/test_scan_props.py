"""Property tests for the static scanner: hostile bytes never make it raise anything but
MalformedInput/UnsupportedFormat, never make it slow, and never make it allocate much.

Nothing here unpickles the generated data.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox._scan import DANGEROUS_GLOBALS, identify, scan_file, scan_pickle_bytes
from sandbox._scan.globals import _dangerous_suffix
from sandbox.errors import MalformedInput
from tests.property.bounds import bounded

SETTINGS = settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.too_slow])


def _os_system_p4() -> bytes:
    return b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R."


def _corpus() -> list[bytes]:
    obj = {
        "a": [1, 2.5, "x", b"yy", (1, None)],
        "s": {1, 2},
        "od": collections.OrderedDict(k=1),
        "arr": np.arange(6, dtype=np.float32),
        "big": list(range(300)),
    }
    out = [pickle.dumps(obj, protocol=p) for p in range(6)]
    out += [
        _os_system_p4(),
        b"cos\nsystem\n(S'true'\ntR.",
        b"(S'true'\nios\nsystem\n.",
        b"\x80\x04\x8c\x06pickle\x8c\x05loads\x93C"
        + bytes([len(_os_system_p4())])
        + _os_system_p4()
        + b"\x85R.",
    ]
    return out


PICKLES = _corpus()


def _torch_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4), "b": torch.zeros(2, dtype=torch.float16)}, buf)
    return buf.getvalue()


def _legacy() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _npy_object() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([1, "a", None], dtype=object), allow_pickle=True)
    return buf.getvalue()


CONTAINERS = [_torch_zip(), _legacy(), _npy_object()]


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            chunk = draw(
                st.sampled_from(
                    [
                        b"\xff\xff\xff\xff",
                        b"\x00" * 8,
                        b"(" * 8,
                        b"\x94" * 4,
                        struct.pack("<Q", 2**63 - 1),
                        b"PK\x05\x06",
                    ]
                )
            )
            data[at : at + len(chunk)] = chunk
    return bytes(data)


def scan_as_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "input.bin")
        with open(path, "wb") as fh:
            fh.write(data)
        bounded(lambda: scan_file(path, time_budget_s=2.0))
        bounded(lambda: identify(path))


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_as_pickle(data: bytes) -> None:
    bounded(lambda: scan_pickle_bytes(data, time_budget_s=2.0))


@SETTINGS
@given(st.binary(max_size=4096).map(lambda b: b"\x80" + bytes([len(b) % 6]) + b))
def test_random_bytes_after_a_protocol_header(data: bytes) -> None:
    bounded(lambda: scan_pickle_bytes(data, time_budget_s=2.0))


@SETTINGS
@given(mutated(PICKLES))
def test_mutated_pickles(data: bytes) -> None:
    bounded(lambda: scan_pickle_bytes(data, time_budget_s=2.0))


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_files(data: bytes) -> None:
    scan_as_file(data)


@SETTINGS
@given(mutated(PICKLES + CONTAINERS))
def test_mutated_files(data: bytes) -> None:
    scan_as_file(data)


@SETTINGS
@given(mutated([CONTAINERS[0]]))
def test_mutated_torch_zips(data: bytes) -> None:
    scan_as_file(data)


_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=5)
        | st.frozensets(st.integers(), max_size=4)
        | st.builds(collections.OrderedDict, st.dictionaries(st.text(max_size=3), inner, max_size=3))
    ),
    max_leaves=30,
)


@SETTINGS
@given(_values, st.integers(0, 5))
def test_valid_pickles_agree_with_pickletools(value: object, protocol: int) -> None:
    """Cross-check against pickletools: same stream end, one GlobalRef per importing opcode."""
    data = pickle.dumps(value, protocol=protocol)
    res = scan_pickle_bytes(data + b"trailing bytes")
    ops = list(pickletools.genops(data))
    assert ops[-1][2] is not None and res.end == ops[-1][2] + 1 == len(data)
    importing = [op for op, _, _ in ops if op.name in ("GLOBAL", "STACK_GLOBAL", "INST")]
    assert len(res.globals) == len(importing)
    assert all(g.classification == "allowed" for g in res.globals)
    assert res.findings == ()
    declared = ops[0][1] if ops[0][0].name == "PROTO" else 0
    assert isinstance(declared, int)
    assert res.protocol == max(declared, *(op.proto for op, _, _ in ops))


_NUMBER_CHARS = st.sampled_from(
    list("0123456789") * 4 + list("xXoObBaAfFeE+-_ .Lnita") + ["\t", "\x0b", "\x00"]
)
_NUMBER_LINES = st.one_of(
    st.lists(_NUMBER_CHARS, max_size=24).map(lambda cs: "".join(cs).encode("latin-1")),
    st.tuples(
        st.sampled_from(["", "-", "0x", "0o"]), st.integers(4290, 4310), st.sampled_from(["", "L", "\x00z"])
    ).map(lambda t: (t[0] + "7" * t[1] + t[2]).encode()),
)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([b"I", b"L", b"F", b"p", b"g"]), _NUMBER_LINES)
def test_number_and_memo_lines_read_as_the_c_unpickler_reads_them(op: bytes, line: bytes) -> None:
    """A literal the scanner refuses while the unpickler reads on would hide everything after
    it (``I1\\0junk`` did). The streams here hold one number or memo opcode and STOP: loading
    them builds an int, a float, a bool or None, and imports nothing."""
    if op in (b"p", b"g"):
        stream = b"N" + (b"p0\n0g" if op == b"g" else b"p") + line + b"\n."
    else:
        stream = op + line + b"\n."
    try:
        pickle.loads(stream)
        loads = True
    except MemoryError:
        return  # a memo index in the billions: the C unpickler fails for memory, not syntax
    except Exception:
        loads = False
    try:
        scan_pickle_bytes(stream)
        scans = True
    except MalformedInput:
        scans = False
    assert scans == loads, (stream[:60], loads)


def _suffix_reference(full: str) -> str | None:
    """The dotted-suffix rule written plainly (quadratic): every suffix after a dot, joined."""
    parts = full.split(".")
    for i in range(1, len(parts)):
        for prefix, category in DANGEROUS_GLOBALS:
            suffix = ".".join(parts[i:])
            if suffix == prefix or suffix.startswith(prefix + "."):
                return category
    return None


_WORDS = sorted({w for p, _ in DANGEROUS_GLOBALS for w in p.split(".")} | {"", "a", "torch", "nn", "path"})
_DOTTED = st.lists(st.sampled_from(_WORDS), min_size=1, max_size=6).map(".".join)


@settings(max_examples=1000, deadline=None)
@given(_DOTTED)
def test_the_dangerous_suffix_search_agrees_with_its_plain_statement(full: str) -> None:
    assert _dangerous_suffix(full) == _suffix_reference(full)
