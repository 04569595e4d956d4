"""Everything a sandbox sends, mutated, through the host's real pipeline: ``safe_load`` over a
runner that replays an honest load's outputs (manifest, SafeTensors bytes, status) after
random mutations. Whatever the mutation, the host either returns the file's own tensors or
raises a documented ``SandboxError``: never another exception, never a hang, never a tensor
the file does not hold under the name it had."""

from __future__ import annotations

import copy
import json
import math
import struct
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sandbox
from sandbox._channel import Received
from sandbox._launch import ContainerSpec, Job, RunResult
from sandbox._worker import _loader
from sandbox._worker import _protocol as P
from sandbox.errors import SandboxError
from tests import checkpoints as ck
from tests.fakes import play, sealed


def _checkpoint() -> dict[str, Any]:
    """Something of every kind the manifest describes: views, ties, composites, raw dtypes,
    0-dim and empty tensors, and non-tensor values."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "base": base,
            "row": base[1:3],
            "col": base[:, 2],
            "t": base.t(),
            "c128": torch.arange(3, dtype=torch.float64).to(torch.complex128),
            "f8": torch.arange(4, dtype=torch.float32).to(torch.float8_e4m3fn),
            "b": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.empty(0, 3),
            "epoch": 3,
            "names": ["a", ("b", 1.5)],
            "param": torch.nn.Parameter(torch.ones(2)),
            **ck.composite_checkpoint(),
        }


class Replay:
    """Plays a sandbox that sends the given outputs and status (as bytes), whatever the job."""

    def __init__(self, manifest: bytes | None, tensors: bytes | None, status: bytes) -> None:
        self.manifest, self.tensors, self.status = manifest, tensors, status

    def ensure_image(self) -> str:
        return "model-sandbox-worker:fake"

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        got = Received(status=self.status, completed=True, closed=True)
        if self.manifest is not None:
            got.outputs["manifest"] = sealed(self.manifest)
        if self.tensors:
            got.outputs["tensors"] = sealed(self.tensors)
        result = RunResult(exit_code=0)
        result.received = got
        return result


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], bytes, Any]:
    """The checkpoint's path, its honest outputs (manifest as JSON, tensors, status) and what
    ``safe_load`` returns for them."""
    path = ck.save(_checkpoint(), tmp_path_factory.mktemp("fuzz") / "ck.pt")
    with open(path, "rb") as f:
        fd = f.fileno()
        digest, size = P.sha256_fd(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own, on quantized storages
            obj, fmt, loc = _loader.load(_loader.Input(fd))
            manifest, tensors = play(obj, fmt, loc, True)
    status = {
        "protocol": P.PROTOCOL_VERSION,
        "env_keys": [],
        "input_sha256": digest,
        "input_size": size,
        "exit_code": 0,
        "result": {"ok": True, "format": fmt},
        "usage": {"wall_s": 0.1, "cpu_user_s": 0.08, "cpu_system_s": 0.02, "max_rss_kb": 90_000},
        "resources": {"cpu_s": 0.1, "series": [[0.0, 0.0, 1000]]},
        "monitor": {"kernel": True, "counts": {}},
    }
    doc = {"manifest": json.loads(manifest), "status": status}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sandbox.safe_load(path, runner=Replay(manifest, tensors, json.dumps(status).encode()))
    return path, doc, tensors, expected


HOSTILE: st.SearchStrategy[Any] = st.sampled_from(
    [
        None,
        True,
        0,
        -1,
        1,
        2**31,
        2**53 + 1,
        2**62,
        2**63,
        2**64,
        10**400,
        -(10**400),
        0.5,
        1e308,
        -0.0,
        "",
        "\x00",
        "\ud800",
        "a" * 5000,
        "__metadata__",
        "cuda:0",
        "meta",
        "garbage",
        "float32",
        "complex128",
        "float8_e4m3fn",
        "U8",
        "nan",
        "sparse_csr",
        "quantized_per_channel",
        "nested",
        [],
        {},
        [0],
        [2**61, 2**61],
        [0, 2**61, 2**61],
        [2**31, 2**31, 2**31],
        [-1],
        [[[[[]]]]],
        {"$": "tensor", "ref": "base"},
        {"$": "complex", "re": 1.0, "im": 1.0},
    ]
)
VALUE = HOSTILE | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False, allow_infinity=False)


def _slots(doc: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON document, depth first."""
    out: list[tuple[Any, Any]] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        for k in keys:
            out.append((node, k))
            stack.append(node[k])
    return out


Op = tuple[str, str | None, int, int, Any]
#: the keys of the documents (manifest, status, SafeTensors header) a mutation may aim at
KEYS = [
    *("name", "dtype", "shape", "stride", "offset", "base", "nbytes", "stored_as", "span"),
    *("location", "sha256", "ref", "parts", "params", "kind", "items", "v", "$", "data_offsets"),
    *("scale", "zero_point", "axis", "coalesced", "ragged_idx", "skeleton", "tensors", "views"),
    *("result", "usage", "resources", "series", "monitor", "canaries", "input_sha256", "exit_code"),
]
#: changes to a JSON document: a value (anywhere, or under one of KEYS) replaced by a hostile
#: one or by another part of the document, a key dropped, a list entry repeated, an integer
#: moved by a little
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["set", "copy", "drop", "repeat", "bump"]),
        st.none() | st.sampled_from(KEYS),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        VALUE,
    ),
    min_size=1,
    max_size=4,
)


def mutate(doc: Any, ops: list[Op]) -> None:
    for op, aim, i, j, value in ops:
        slots = _slots(doc)
        aimed = [(n, k) for n, k in slots if k == aim] if aim is not None else slots
        if not aimed:
            continue
        node, key = aimed[i % len(aimed)]
        if op == "set":
            node[key] = copy.deepcopy(value)
        elif op == "copy":
            other, okey = slots[j % len(slots)]
            node[key] = copy.deepcopy(other[okey])
        elif op == "drop" and isinstance(node, dict):
            del node[key]
        elif op == "repeat" and isinstance(node, list):
            node.append(copy.deepcopy(node[key]))
        elif op == "bump" and isinstance(node[key], int) and not isinstance(node[key], bool):
            node[key] += j % 7 - 3


def _tensors_of(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors_of(v, f"{path}/{k!r}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors_of(v, f"{path}/{i}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_nested or b.is_nested:
        return a.is_nested == b.is_nested and a.dtype == b.dtype and a.layout == b.layout
    if a.layout != b.layout or a.dtype != b.dtype or a.shape != b.shape or a.is_quantized != b.is_quantized:
        return False
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    if a.is_quantized:
        a, b = a.int_repr(), b.int_repr()
    left = a.detach().contiguous().reshape(-1).view(torch.uint8)
    right = b.detach().contiguous().reshape(-1).view(torch.uint8)
    return a.device == b.device and torch.equal(left, right)


def _drive(path: Path, manifest: bytes | None, tensors: bytes | None, status: bytes, expected: Any) -> None:
    start = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch calls nested and sparse tensors prototypes
            got = sandbox.safe_load(path, runner=Replay(manifest, tensors, status))
    except SandboxError:
        pass
    else:
        # a result holds the file's tensors: any tensor where the honest result has one is it
        want = dict(_tensors_of(expected))
        for where, t in _tensors_of(got):
            if where in want:
                assert _same(t, want[where]), f"{where} is not the file's tensor"
    assert time.monotonic() - start < 10


SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(which=st.sampled_from(["manifest", "status"]), ops=MUTATIONS, nan=st.booleans())
def test_a_mutated_manifest_or_status_is_refused_or_the_files_own(
    honest: tuple[Path, dict[str, Any], bytes, Any], which: str, ops: list[Op], nan: bool
) -> None:
    path, doc, tensors, expected = honest
    doc = copy.deepcopy(doc)
    mutate(doc[which], ops)
    manifest = json.dumps(doc["manifest"], allow_nan=nan).encode("utf-8", "surrogatepass")
    status = json.dumps(doc["status"], allow_nan=nan).encode("utf-8", "surrogatepass")
    _drive(path, manifest, tensors, status, expected)


@SETTINGS
@given(ops=MUTATIONS, cut=st.integers(0, 10**6), flip=st.integers(0, 10**6), how=st.integers(0, 3))
def test_mutated_tensor_bytes_are_refused_or_the_files_own(
    honest: tuple[Path, dict[str, Any], bytes, Any],
    ops: list[Op],
    cut: int,
    flip: int,
    how: int,
) -> None:
    """The SafeTensors header (as JSON) mutated like a manifest, or the bytes cut or flipped."""
    path, doc, tensors, expected = honest
    n = struct.unpack("<Q", tensors[:8])[0]
    if how == 0:
        header = json.loads(tensors[8 : 8 + n])
        mutate(header, ops)
        head = json.dumps(header).encode("utf-8", "surrogatepass")
        head += b" " * (-len(head) % 8)
        blob = struct.pack("<Q", len(head)) + head + tensors[8 + n :]
    elif how == 1:
        blob = tensors[: cut % (len(tensors) + 1)]
    else:
        data = bytearray(tensors)
        data[flip % len(data)] ^= 1 << (cut % 8)
        blob = bytes(data)
    manifest = json.dumps(doc["manifest"]).encode()
    _drive(path, manifest, blob, json.dumps(doc["status"]).encode(), expected)


def test_the_honest_outputs_load_as_the_file(honest: tuple[Path, dict[str, Any], bytes, Any]) -> None:
    _, _, _, expected = honest
    assert math.isclose(float(expected["scalar"]), 2.5)
    assert torch.equal(expected["row"], torch.arange(24, dtype=torch.float32).reshape(4, 6)[1:3])
