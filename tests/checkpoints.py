"""Checkpoints the tests write: benign variants of every supported format, and hostile ones
whose payloads only leave markers (a file in a directory the test owns, or a connection to a
127.0.0.1 port the test listens on).

This module runs in the *test* process, which may pickle freely; it never loads a hostile file
except through :func:`prove_live`, which does so in a throw-away subprocess.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import datetime
import io
import json
import math
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sandbox._worker import _protocol as P

# -- benign --------------------------------------------------------------------------------------

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint64,
    torch.uint32,
    torch.uint16,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.complex64,
    torch.complex128,
]


def dtype_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def state_dict() -> collections.OrderedDict[str, torch.Tensor]:
    """A small state dict as ``Module.state_dict()`` makes it: with the module versions
    (``_metadata``) that ``load_state_dict`` reads."""
    g = torch.Generator().manual_seed(1)
    sd = collections.OrderedDict(
        [
            ("encoder.weight", torch.randn(16, 8, generator=g)),
            ("encoder.bias", torch.randn(16, generator=g)),
            ("decoder.weight", torch.randn(8, 16, generator=g).half()),
            ("steps", torch.tensor(7)),
        ]
    )
    sd._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
        [("", {"version": 1}), ("encoder", {"version": 1}), ("decoder", {"version": 1})]
    )
    return sd


def nested_checkpoint() -> dict[str, Any]:
    sd = state_dict()
    return {
        "epoch": 3,
        "lr": 1e-3,
        "best": float("nan"),
        "name": "run-ü",
        "flags": (True, False, None),
        "blob": b"\x00\x01bytes",
        "state_dict": sd,
        "history": [1.5, 2.5, {"nested": [torch.arange(4), "x"]}],
        "config": argparse.Namespace(hidden=16, act="gelu", dims=[1, 2]),
        "shape": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "z": complex(1.0, -2.0),
        "int_keys": {0: "a", 1: "b", (2, 3): "tuple-key"},
        "np_array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "np_scalar": np.float64(2.5),
        "set": {1, 2, 3},
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        # dense layouts other than row-major, each the only user of its storage
        "conv": torch.arange(120.0).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "lone_t": torch.arange(12).reshape(3, 4).t(),
        "saved_at": datetime.datetime(2024, 5, 6, 7, 8, 9),
        "run_dir": pathlib.PosixPath("/runs/exp 1"),
        "keep": slice(None, 10, 2),
    }


class TiedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied weights


def views_checkpoint() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "base": base,
        "row_slice": base[1:3],  # a view with an offset
        "column": base[:, 2],  # strided view
        "transposed": base.t(),  # non-contiguous view of the whole
        "alias": base.view(24),  # same storage, other shape
        "lonely_t": torch.randn(3, 5).t(),  # non-contiguous, its base not in the file
    }


def write_legacy_tar(
    path: Path, obj_factory: Any, tensors: dict[str, torch.Tensor], location: str = "cpu"
) -> None:
    """The tar format of torch < 0.1.10, built by hand: members ``sys_info``, ``storages``,
    ``tensors`` and ``pickle``. ``obj_factory(ref)`` builds the pickled object from
    ``ref(name)``, which stands for a tensor (a persistent id)."""
    storage_types = {
        torch.float32: torch.FloatStorage,
        torch.float64: torch.DoubleStorage,
        torch.int64: torch.LongStorage,
        torch.float16: torch.HalfStorage,
        torch.uint8: torch.ByteStorage,
    }
    names = list(tensors)
    storages = io.BytesIO()
    pickle.dump(len(names), storages, protocol=2)
    for i, name in enumerate(names):
        t = tensors[name].contiguous()
        pickle.dump((i, location, storage_types[t.dtype]), storages, protocol=2)
        storages.write(struct.pack("<q", t.numel()))
        storages.write(t.numpy().tobytes())
    pickle.dump([], storages, protocol=2)
    tens = io.BytesIO()
    pickle.dump(len(names), tens, protocol=2)
    for i, name in enumerate(names):
        t = tensors[name].contiguous()
        pickle.dump((1000 + i, i, None), tens, protocol=2)
        tens.write(struct.pack("<i", t.dim()) + b"\0" * 4)
        tens.write(struct.pack(f"<{t.dim()}q", *t.shape))
        tens.write(struct.pack(f"<{t.dim()}q", *t.stride()))
        tens.write(struct.pack("<q", 0))

    class _Ref:
        def __init__(self, key: int) -> None:
            self.key = key

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return str(obj.key) if isinstance(obj, _Ref) else None

    body = io.BytesIO()
    _Pickler(body, protocol=2).dump(obj_factory(lambda name: _Ref(1000 + names.index(name))))
    sys_info = pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
        protocol=2,
    )
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in (
            ("sys_info", sys_info),
            ("storages", storages.getvalue()),
            ("tensors", tens.getvalue()),
            ("pickle", body.getvalue()),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# -- hostile -------------------------------------------------------------------------------------


class Reduce:
    """Pickles as ``func(*args)``: the classic REDUCE payload."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def eval_payload(code: str) -> Reduce:
    """An object whose unpickling evaluates ``code`` (an expression) and becomes its value."""
    return Reduce(builtins.eval, code)


def exec_payload(code: str) -> Reduce:
    return Reduce(builtins.exec, code)


def hostile_checkpoint(payload: Reduce) -> dict[str, Any]:
    """A realistic checkpoint with the payload riding along as one value."""
    return {"state_dict": state_dict(), "epoch": 1, "payload": payload}


def save(obj: Any, path: Path, fmt: str = "zip") -> Path:
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif fmt == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    else:
        raise ValueError(fmt)
    return path


def prove_live(path: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Load ``path`` with plain ``torch.load`` in a throw-away subprocess (what a victim would
    do) and return its stdout, which prints the ``payload`` value when there is one."""
    code = (
        "import sys, pickle, torch\n"
        "p = sys.argv[1]\n"
        "try:\n"
        "    obj = torch.load(p, weights_only=False)\n"
        "except RuntimeError:\n"
        "    obj = pickle.load(open(p, 'rb'))\n"
        "print(repr(obj.get('payload') if isinstance(obj, dict) else None))\n"
    )
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the live proof failed to load the file: {proc.stderr[-2000:]}")
    return proc.stdout


def prove_marker(path: Path, marker: Path, content: str | None = None) -> None:
    """:func:`prove_live` for a payload that leaves ``marker``: it must appear (with
    ``content``, when given) under a plain load, and is removed again for the sandboxed run."""
    prove_live(path)
    assert marker.exists(), "the payload is not live"
    if content is not None:
        assert marker.read_text() == content
    marker.unlink()


#: a payload that connects to 127.0.0.1:9 (nothing listens there) and returns the errno it got
CONNECT_ERRNO = (
    "import socket\n"
    "try:\n"
    "    socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
    "    result = 'connected'\n"
    "except OSError as exc:\n"
    "    result = exc.errno\n"
)


def code_payload(code: str) -> Reduce:
    """Runs the statements in ``code`` (try/except allowed) and becomes the value they leave in
    ``result``: ``eval("exec(code, g) or g['result']")`` with plain-data arguments."""
    return Reduce(builtins.eval, "exec(code, g) or g.get('result')", {"code": code, "g": {}})


def hostile_file(directory: Path, code: str, name: str = "payload.pt") -> Path:
    """A realistic checkpoint whose unpickling runs ``code`` (errors swallowed, so that the load
    itself succeeds and the verdict rests on what the payload tried, not on an exception)."""
    wrapped = (
        "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except BaseException:\n    pass\n"
    )
    return save(hostile_checkpoint(exec_payload(wrapped)), directory / name)


def plant_and_probe(directory: Path) -> tuple[Path, Path]:
    """Two hostile files for sandboxes that must be single-use: ``plant.pt`` leaves
    /tmp/persist in its sandbox (its ``payload``: 1); ``probe.pt``'s ``payload`` says whether
    /tmp/persist is there (False in a fresh sandbox)."""
    plant = save(
        hostile_checkpoint(code_payload("open('/tmp/persist', 'w').write('x')\nresult = 1")),
        directory / "plant.pt",
    )
    probe = save(
        hostile_checkpoint(code_payload("import os\nresult = os.path.exists('/tmp/persist')")),
        directory / "probe.pt",
    )
    return plant, probe


def observe_policy(fail_on: str = "never", **limits: float) -> Any:
    """A policy that always runs the sandbox (no refusal on the static scan), lets the load go
    on after a refused call (no fatal events), and, with
    ``fail_on="never"``, hands back the validated data even of hostile files: what the tests
    need to see what a payload achieved inside the sandbox."""
    return policy_from_dict(
        {
            "name": "observe",
            "description": "tests: always load, report everything",
            "fail_on": fail_on,
            "limits": limits,
            "static": {"stop_before_sandbox": "never"},
            "events": {"fatal": []},
        }
    )


def policy_from_dict(spec: dict[str, Any]) -> Any:
    """``Policy.from_dict(spec)`` without the warning that a ``fail_on = "never"`` policy draws
    (it hands back the data of files judged malicious: what these tests look at)."""
    import warnings

    import sandbox

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sandbox.Policy.from_dict(spec)


# -- the formats of issue 11: composites, joblib, TorchScript --------------------------------------


def composite_checkpoint() -> dict[str, Any]:
    """Sparse (COO, coalesced and not; CSR; CSC), quantized (per tensor, per channel) and
    nested tensors beside an ordinary one."""
    import warnings

    g = torch.Generator().manual_seed(3)
    dense = torch.randn(4, 5, generator=g)
    dense[dense.abs() < 0.8] = 0
    with warnings.catch_warnings():  # torch calls nested and CSR tensors a prototype / beta
        warnings.simplefilter("ignore")
        return _composites(g, dense)


def _composites(g: torch.Generator, dense: torch.Tensor) -> dict[str, Any]:
    nested = torch.nested.nested_tensor([torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)])
    return {
        "plain": torch.arange(6, dtype=torch.float32),
        "coo": torch.sparse_coo_tensor(
            torch.tensor([[0, 2, 1, 0], [1, 0, 3, 1]]), torch.tensor([1.5, -2.0, 3.25, 0.5]), (3, 4)
        ),
        "coo_coalesced": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "csc": dense.to_sparse_csc(),
        "q_tensor": torch.quantize_per_tensor(torch.randn(3, 4, generator=g), 0.05, 7, torch.qint8),
        "q_channel": torch.quantize_per_channel(
            torch.randn(3, 4, generator=g),
            torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64),
            torch.tensor([0, 5, 255]),
            0,
            torch.quint8,
        ),
        "nested": nested,
    }


def jagged_checkpoint() -> dict[str, Any]:
    """A jagged nested tensor (torch pickles it as a tensor subclass with dynamic-shape
    metadata: the static scan flags the ``torch._dynamo`` global it names)."""
    import warnings

    g = torch.Generator().manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "jagged": torch.nested.nested_tensor(
                [torch.randn(1, 2, generator=g), torch.randn(3, 2, generator=g)], layout=torch.jagged
            )
        }


def composite_components(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ordinary tensors a converted file holds for ``composite_checkpoint()``, written out
    by hand from torch's own accessors (the test's independent expectation)."""
    out: dict[str, torch.Tensor] = {"plain": obj["plain"]}
    for key in ("coo", "coo_coalesced"):
        out[f"{key}.indices"], out[f"{key}.values"] = obj[key]._indices(), obj[key]._values()
    out["csr.crow_indices"], out["csr.col_indices"] = obj["csr"].crow_indices(), obj["csr"].col_indices()
    out["csr.values"] = obj["csr"].values()
    out["csc.ccol_indices"], out["csc.row_indices"] = obj["csc"].ccol_indices(), obj["csc"].row_indices()
    out["csc.values"] = obj["csc"].values()
    q = obj["q_tensor"]
    out["q_tensor.int_repr"] = q.int_repr()  # scale and zero point are in the recipe
    qc = obj["q_channel"]
    out["q_channel.int_repr"], out["q_channel.scales"] = qc.int_repr(), qc.q_per_channel_scales()
    out["q_channel.zero_points"] = qc.q_per_channel_zero_points()
    nested = obj["nested"]
    out["nested.values"], out["nested.sizes"] = nested.values(), nested._nested_tensor_size()
    out["nested.strides"] = nested._nested_tensor_strides()
    out["nested.storage_offsets"] = nested._nested_tensor_storage_offsets()
    return out


class Estimator:
    """Stands for a scikit-learn estimator: a class the sandbox does not have, holding arrays."""

    def __init__(self) -> None:
        self.coef_ = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
        self.n_features_in_ = 3


def joblib_pipeline() -> dict[str, Any]:
    return {
        "weights": np.arange(20, dtype=np.float32).reshape(4, 5) - 3.5,
        "bias": np.array([1, -2, 3], dtype=np.int64),
        "estimator": Estimator(),
        "name": "pipeline",
    }


def dump_joblib(path: Path, compress: Any = 0, payload_code: str | None = None) -> Path:
    """``joblib.dump(joblib_pipeline() [+ a code payload], path, compress=...)`` in a
    subprocess: the test process never imports joblib (tests/unit/test_scan.py fakes its module
    names to build joblib-like files without it)."""
    code = (
        "import sys, json, joblib\n"
        "from tests import checkpoints as ck\n"
        "path, compress, payload = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]\n"
        "obj = ck.joblib_pipeline()\n"
        "if payload:\n"
        "    obj['payload'] = ck.code_payload(payload)\n"
        "joblib.dump(obj, path, compress=tuple(compress) if compress else 0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), json.dumps(compress), payload_code or ""],
        check=True,
        timeout=120,
        capture_output=True,
        cwd=Path(__file__).parent.parent,
    )
    return path


def joblib_components(obj: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays a converted ``joblib_pipeline()`` holds (the estimator's by its state)."""
    return {"weights": obj["weights"], "bias": obj["bias"], "estimator.state.coef_": obj["estimator"].coef_}


def reference_components(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Load a *trusted* fixture with plain ``torch.load``/``joblib.load`` in a throw-away
    subprocess and return its components as numpy arrays (bytes exactly as loaded)."""
    out = path.with_suffix(".reference.npz")
    code = (
        "import sys, numpy as np, torch, joblib\n"
        "from tests import checkpoints as ck\n"
        "p, kind, out = sys.argv[1:4]\n"
        "if kind == 'joblib':\n"
        "    comps = ck.joblib_components(joblib.load(p))\n"
        "elif kind == 'torchscript':\n"
        "    comps = {k: v.numpy() for k, v in torch.jit.load(p).state_dict().items()}\n"
        "else:\n"
        "    comps = {k: v.numpy() for k, v in ck.composite_components(\n"
        "        torch.load(p, weights_only=False)).items()}\n"
        "np.savez(out, **{k: np.ascontiguousarray(v) for k, v in comps.items()})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(path), kind, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the reference load failed: {proc.stderr[-2000:]}")
    with np.load(out) as npz:
        return {k: npz[k] for k in npz.files}


class TorchScriptProbe(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (archive code, run by ``torch.jit.load``)
    opens the file at ``path``: harmless on a test's own file, a credential read elsewhere."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]  # type: ignore[assignment]
        self.path = state[1]
        self.training = state[2]
        if torch.from_file(self.path, False, 1, dtype=torch.uint8).numel() > 1:
            self.training = True


class TorchScriptNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fc = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 4, generator=g))
        self.register_buffer("scale", torch.tensor([0.5, 2.0, 4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x) * self.scale
        return out


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():  # torch.jit.script is deprecated
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))  # type: ignore[no-untyped-call]
    return path


# -- comparing what came back -------------------------------------------------------------------
def assert_same(a: Any, b: Any, where: str = "root") -> None:
    """Structural equality with bit-exact tensors (dtype, shape, bytes) and exact types."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.device.type == b.device.type, where
        assert isinstance(a, torch.nn.Parameter) == isinstance(b, torch.nn.Parameter), where
        if b.layout == torch.strided and P.dense_strides(list(b.shape), list(b.stride())):
            assert a.stride() == b.stride(), f"{where}: strides {a.stride()} != {b.stride()}"
        left = a.detach().contiguous().reshape(-1).view(torch.uint8)
        right = b.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(left, right), where
        return
    if isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
        return
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(b, dict):
        assert list(a.keys()) == list(b.keys()), where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{where}: _metadata"
        for k in b:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(b, argparse.Namespace):
        assert_same(vars(a), vars(b), where)
    elif isinstance(b, float) and math.isnan(b):
        assert math.isnan(a), where
    elif isinstance(b, np.generic):
        assert a.dtype == b.dtype and a == b, where
    else:
        assert a == b, where
