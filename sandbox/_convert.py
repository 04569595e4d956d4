"""Stage 5, host: open the worker's SafeTensors with the safetensors library, check every
tensor against the manifest (names, dtypes, shapes), hash each one's bytes for the verification
stage, and rebuild the returned structure from the JSON skeleton. No unpickler is involved
anywhere.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._worker import _protocol as P
from .errors import LoadFailed, OutputRejected, UnrepresentableObject

if TYPE_CHECKING:
    import torch

    from ._verify.reconstruct import Placement

_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|meta|hpu|xla|privateuseone|ipu|mtia)(:\d{1,4})?$")


class Unrepresentable:
    """Stands where the checkpoint held an object that model-sandbox does not rebuild.

    ``type_name`` is the class the object claimed to be and ``path`` where it was; nothing of
    the object itself crossed the sandbox boundary."""

    __slots__ = ("path", "state", "type_name")

    def __init__(self, type_name: str, path: str, state: Any = None) -> None:
        self.type_name = type_name
        self.path = path
        #: for a class the sandbox did not have: the data the object held (its constructor
        #: arguments, ``__setstate__`` state, items), rebuilt like any other data
        self.state = state

    def __repr__(self) -> str:
        return f"<Unrepresentable {self.type_name} at {self.path}>"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order (a contiguous copy where it is not): what
    :func:`tensor_digest` hashes and the verification compares with the file's."""
    import torch

    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.contiguous().view(torch.uint8).numpy().data


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def _mapped(path: str, keys: set[str]) -> dict[str, torch.Tensor]:
    """Tensors that live in a private memory mapping of the (already validated) file: no copy.
    The file may be deleted afterwards; the mapping keeps it. A tensor whose offset is not
    aligned to its element size is left out (the caller reads it normally)."""
    import torch

    size = os.path.getsize(path)
    storage: Any = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    from safetensors.torch import _getdtype

    out = {}
    for name in keys:
        info = header[name]
        dtype = _getdtype(info["dtype"])
        begin = 8 + n + int(info["data_offsets"][0])
        elem = torch.empty(0, dtype=dtype).element_size()
        if begin % elem or 0 in info["shape"]:
            continue
        shape = [int(d) for d in info["shape"]]
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * shape[i + 1]
        out[name] = torch.empty(0, dtype=dtype).set_(storage, begin // elem, shape, stride)
    return out


def layout_spans(placements: list[Placement]) -> dict[str, tuple[int, int]]:
    """The bytes of the input that each storage's tensors span, ``key -> [lo, hi)``: what
    :func:`map_layout` reads of it (``lo`` rounded down to 8 bytes, which keeps every element as
    aligned in memory as in the file)."""
    spans: dict[str, tuple[int, int]] = {}
    for p in placements:
        if p.extent:
            lo, hi = spans.get(p.key, (p.file_offset, p.file_offset + p.extent))
            spans[p.key] = (min(lo, p.file_offset), max(hi, p.file_offset + p.extent))
    return {key: (lo - lo % 8, hi) for key, (lo, hi) in spans.items()}


def map_layout(
    path: str,
    placements: list[Placement],
    *,
    copy: bool,
    prefetched: dict[str, tuple[int, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict, straight from the input file's own records (the
    placements were checked against the file and against the sandbox's layout). ``copy=False``:
    they share one private, copy-on-write mapping of the file (tensors of one storage share
    memory, as after ``torch.load(mmap=True)``); ``copy=True``: each storage's bytes are read
    once into memory, and tensors of one storage still share it. ``prefetched``: those bytes,
    already read (:class:`._input.Prefetch`, given the same spans); used only where its spans
    are exactly :func:`layout_spans` of ``placements``, else the file is read here."""
    import torch

    out: dict[str, torch.Tensor] = {}
    if copy:
        spans = layout_spans(placements)
        buffers: dict[str, tuple[int, torch.Tensor]] = {}
        if prefetched is not None and {k: (lo, lo + b.numel()) for k, (lo, b) in prefetched.items()} == spans:
            buffers = dict(prefetched)
        else:
            with open(path, "rb", buffering=0) as f:
                for key, (lo, hi) in spans.items():
                    buffers[key] = (lo, _read_range(f.fileno(), lo, hi))
        for p in placements:
            dtype = getattr(torch, p.dtype)
            if not p.extent:
                out[p.name] = torch.empty(p.shape, dtype=dtype)
                continue
            lo, buf = buffers[p.key]
            out[p.name] = _strided(buf.untyped_storage(), p.file_offset - lo, p, dtype)
        return out
    size = os.path.getsize(path)
    storage: Any = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    for p in placements:
        dtype = getattr(torch, p.dtype)
        out[p.name] = (
            _strided(storage, p.file_offset, p, dtype) if p.extent else torch.empty(p.shape, dtype=dtype)
        )
    return out


def _from_input(source: str | None, manifest: P.Manifest, *, mapped: bool) -> dict[str, torch.Tensor]:
    """The tensors the manifest names by their span in the input, from the input at ``source``:
    each span read into memory of its own (``mapped``: a private mapping of the input instead).
    Raises ``OutputRejected`` for a span past the end of the file (the sizes were checked
    against the output cap before)."""
    import torch

    named = [t for t in manifest.tensors if t.span is not None]
    if not named:
        return {}
    if source is None:
        raise OutputRejected("the manifest names spans of an input the host does not hold")
    out: dict[str, torch.Tensor] = {}
    with open(source, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        storage: Any = None
        for e in named:
            assert e.span is not None
            begin, end = e.span
            if end > size:
                raise OutputRejected(f"{e.name}: its span ends past the input's end", item=e.name)
            dtype = getattr(torch, e.dtype, None)
            if dtype is None:
                raise OutputRejected(f"{e.name}: dtype {e.dtype} is unknown to this torch")
            if end == begin:
                out[e.name] = torch.empty(e.shape, dtype=dtype)
                continue
            if mapped and begin % P.TORCH_DTYPES[e.dtype][1] == 0:
                if storage is None:
                    storage = torch.UntypedStorage.from_file(source, shared=False, nbytes=size)
                flat = torch.empty(0, dtype=torch.uint8).set_(storage, begin, (end - begin,), (1,))
            else:
                flat = _read_range(f.fileno(), begin, end, item=e.name)
            out[e.name] = flat.view(dtype).reshape(e.shape)
    return out


def _read_range(fd: int, begin: int, end: int, *, item: str | None = None) -> torch.Tensor:
    """Bytes ``begin`` to ``end`` of the file at ``fd``, read into a tensor of their own.
    Raises ``OutputRejected`` when the file ends before ``end`` (it shrank)."""
    import torch

    from ._input import pread_full

    buf = torch.empty(end - begin, dtype=torch.uint8)
    if pread_full(fd, memoryview(buf.numpy().data), begin) < end - begin:
        raise OutputRejected("the input file shrank while it was read", item=item)
    return buf


def _strided(storage: Any, byte_offset: int, p: Placement, dtype: torch.dtype) -> torch.Tensor:
    import torch

    elem = torch.empty(0, dtype=dtype).element_size()
    if byte_offset % elem == 0:
        return torch.empty(0, dtype=dtype).set_(storage, byte_offset // elem, p.shape, p.stride)
    # an unaligned record (not what torch.save writes): copy the bytes it spans
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, byte_offset, (p.extent,), (1,))
    return raw.clone().view(dtype).as_strided(p.shape, p.stride, 0)


def load_tensors(
    path: str,
    manifest: P.Manifest,
    *,
    mmap: bool = False,
    source: str | None = None,
    map_source: bool = False,
) -> dict[str, torch.Tensor]:
    """Every tensor and view named by the (validated) manifest, checked against it: names,
    dtypes, shapes and sizes. The bytes are not hashed here: the verification compares them
    with the file's (``_verify``), hashing only what it cannot compare directly. A digest the
    sandbox sent for bytes it sent (it sends none) must still agree with them.
    ``mmap=True``: the tensors share a private mapping of the file instead of being copied.
    A tensor the manifest names by its span in the input is the input's own bytes, read from
    ``source`` (the host's descriptor of the input; mapped with ``mmap`` or ``map_source``);
    without ``source`` such an entry is refused."""
    import torch
    from safetensors import SafetensorError, safe_open

    entries = {t.name: t for t in manifest.tensors if t.span is None}
    out: dict[str, torch.Tensor] = _from_input(source, manifest, mapped=mmap or map_source)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(entries):
                missing = sorted(set(entries) - keys)[:5]
                extra = sorted(keys - set(entries))[:5]
                raise OutputRejected(
                    f"tensor file and manifest disagree (missing {missing}, unexpected {extra})",
                    item=P.TENSORS_FILE,
                )
            # the header is validated by the library above before anything is mapped
            mapped = _mapped(path, keys) if mmap else {}
            for name, entry in entries.items():
                stored_as = entry.stored_as
                raw = stored_as == "U8" and entry.dtype != "uint8"
                # raw bytes are re-viewed as a wider dtype, which needs an aligned offset
                t = mapped[name] if name in mapped and not raw else f.get_tensor(name)
                target = getattr(torch, entry.dtype, None)
                if target is None:
                    raise OutputRejected(f"{name}: dtype {entry.dtype} is unknown to this torch")
                if raw:
                    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != entry.nbytes:
                        raise OutputRejected(f"{name}: raw bytes of the wrong size", item=name)
                    t = (
                        t.view(target).reshape(entry.shape)
                        if t.numel()
                        else torch.empty(entry.shape, dtype=target)
                    )
                if t.dtype != target or tuple(t.shape) != entry.shape:
                    raise OutputRejected(f"{name}: dtype/shape differ from the manifest", item=name)
                if entry.sha256 is not None and tensor_digest(t) != entry.sha256:
                    raise OutputRejected(f"{name}: bytes differ from the manifest's sha256", item=name)
                out[name] = t
    except SafetensorError as exc:
        raise OutputRejected(
            f"the tensor file is not valid SafeTensors: {exc}", item=P.TENSORS_FILE
        ) from None
    for v in manifest.views:
        base = out[v.base]
        out[v.name] = base.as_strided(v.shape, v.stride, base.storage_offset() + v.offset)
    return out


MapLocation = Any  # None | str | torch.device | dict[str, str] | Callable[[storage, str], storage]


def place(
    tensors: dict[str, torch.Tensor], manifest: P.Manifest, map_location: MapLocation
) -> dict[str, torch.Tensor]:
    """Move tensors where ``torch.load(map_location=...)`` would have put them.

    A tensor the manifest gives its own strides (channels_last, a transpose) is laid out that
    way again. Views follow their base, so storage sharing survives the move. A callable is handed the
    part of a tensor's storage its elements span, as torch hands it each storage of the file
    (not a whole file that ``mmap=True`` maps them from)."""

    import torch

    moved: dict[str, torch.Tensor] = {}
    for entry in manifest.tensors:
        t = tensors[entry.name]
        if entry.stride is not None and tuple(t.stride()) != entry.stride:  # its own layout again
            t = torch.empty_strided(entry.shape, entry.stride, dtype=t.dtype, device=t.device).copy_(t)
        moved[entry.name] = _move(t, entry.location, map_location)
    for v in manifest.views:
        base = moved[v.base]
        moved[v.name] = base.as_strided(v.shape, v.stride, base.storage_offset() + v.offset)
    return moved


def _move(t: torch.Tensor, location: str, map_location: MapLocation) -> torch.Tensor:
    import torch

    if map_location is None:
        target: Any = location
    elif isinstance(map_location, (str, torch.device)):
        target = map_location
    elif isinstance(map_location, dict):
        target = map_location.get(location, location)
    elif callable(map_location):
        own, offset = _own_storage(t)
        result = map_location(own, location)
        if result is None:
            target = "cpu"
        elif isinstance(result, (torch.UntypedStorage, torch.TypedStorage)):
            if result.device == t.device and result.data_ptr() == own.data_ptr():
                return t
            storage = result.untyped() if isinstance(result, torch.TypedStorage) else result  # type: ignore[no-untyped-call]
            fresh = torch.empty(0, dtype=t.dtype, device=storage.device)
            return fresh.set_(storage, offset, t.shape, t.stride())
        else:
            target = result
    else:
        raise TypeError(f"map_location of type {type(map_location).__name__} is not supported")
    try:
        device = torch.device(target)
        return t if device == t.device else t.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        # torch.load raises RuntimeError for a location it cannot restore to (no such device
        # type, no CUDA here: torch's own check is an AssertionError); the location is the
        # sandbox's word, so nothing of torch's may come out unwrapped
        raise LoadFailed(
            f"a tensor stored on {location!r} cannot be placed on {str(target)[:64]!r} here "
            f"({str(exc)[:200]}): pass map_location"
        ) from None


def _own_storage(t: torch.Tensor) -> tuple[Any, int]:
    """The part of ``t``'s storage that its elements span (sharing its memory), and ``t``'s
    offset in it: what ``map_location`` is handed, as torch hands it each storage of the file,
    where ``t`` lies at an offset in a mapping of a whole file (``mmap=True``)."""
    storage = t.untyped_storage()
    if t.numel() == 0:
        return storage, int(t.storage_offset())
    elem, first = t.element_size(), int(t.storage_offset())
    end = (first + 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride(), strict=True))) * elem
    if first == 0 and end == storage.nbytes():
        return storage, 0
    return storage[first * elem : end], 0


def rebuild(skeleton: Any, tensors: dict[str, torch.Tensor], *, weights_only: bool) -> Any:
    """The structure the skeleton describes, with tensors from ``tensors``. Raises
    ``OutputRejected`` for a skeleton it cannot rebuild, whatever refused it."""
    import torch

    params: dict[str, torch.Tensor] = {}
    opaque: list[str] = []
    nodes = 0

    def tensor(ref: Any) -> torch.Tensor:
        if not isinstance(ref, str) or ref not in tensors:
            raise OutputRejected(f"skeleton names an unknown tensor {str(ref)[:80]!r}")
        return tensors[ref]

    def floaty(node: Any) -> float:
        v = build(node, 0)
        if not isinstance(v, float):
            raise OutputRejected("skeleton: complex part is not a float")
        return v

    def build(node: Any, depth: int) -> Any:
        nonlocal nodes
        nodes += 1
        if nodes > P.MAX_SKELETON_NODES or depth > P.MAX_SKELETON_DEPTH + 2:
            raise OutputRejected("skeleton is too large or too deep")
        if node is None or isinstance(node, (bool, int, str)):
            return node
        if isinstance(node, float):
            if not math.isfinite(node):
                raise OutputRejected("skeleton holds a non-finite bare float")
            return node
        if not isinstance(node, dict) or not isinstance(node.get("$"), str) or node["$"] not in P.NODE_KINDS:
            raise OutputRejected(f"skeleton node of unknown kind {str(node)[:80]!r}")
        kind = node["$"]
        if kind == "float":
            if node.get("v") not in ("nan", "inf", "-inf"):
                raise OutputRejected("skeleton: bad float")
            return float(node["v"])
        if kind == "bytes":
            try:
                return base64.b64decode(node["b64"], validate=True)
            except (KeyError, TypeError, ValueError):
                raise OutputRejected("skeleton: bad bytes") from None
        if kind in ("list", "tuple", "set", "frozenset"):
            items = node.get("items")
            if not isinstance(items, list):
                raise OutputRejected(f"skeleton: {kind} without items")
            built = [build(i, depth + 1) for i in items]
            if kind == "list":
                return built
            if kind == "tuple":
                return tuple(built)
            try:
                return set(built) if kind == "set" else frozenset(built)
            except TypeError:
                raise OutputRejected("skeleton: unhashable set member") from None
        if kind in ("dict", "namespace"):
            items = node.get("items")
            if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
                raise OutputRejected(f"skeleton: {kind} items malformed")
            pairs = [(build(k, depth + 1), build(v, depth + 1)) for k, v in items]
            if kind == "namespace":
                if not all(isinstance(k, str) for k, _ in pairs):
                    raise OutputRejected("skeleton: namespace keys must be strings")
                return argparse.Namespace(**dict(pairs))
            dkind = node.get("kind")
            if not isinstance(dkind, str) or dkind not in P.DICT_KINDS:
                raise OutputRejected("skeleton: unknown dict kind")
            meta = None
            if node.get("metadata") is not None:
                raw = node["metadata"]  # JSON: the pairs (the worker's mapping form never crosses)
                ordered = dkind == "OrderedDict" and isinstance(raw, list)
                meta = P.state_dict_metadata(raw) if ordered else None
                if meta is None:
                    raise OutputRejected("skeleton: a dict's metadata is not a state dict's module versions")
            try:
                if dkind == "OrderedDict":
                    od: collections.OrderedDict[Any, Any] = collections.OrderedDict(pairs)
                    if meta is not None:  # the checked copy, never the sandbox's own objects
                        od._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
                            (prefix, record) for prefix, record in meta
                        )
                    return od
                if dkind == "defaultdict":
                    return collections.defaultdict(None, pairs)
                return dict(pairs)
            except TypeError:
                raise OutputRejected("skeleton: unhashable dict key") from None
        if kind == "tensor":
            t = tensor(node.get("ref"))
            if node.get("parameter") is True:
                ref = node["ref"]
                if ref not in params:
                    params[ref] = torch.nn.Parameter(t, requires_grad=bool(node.get("requires_grad")))
                return params[ref]
            if node.get("requires_grad") is True and t.is_floating_point():
                t.requires_grad_(True)
            return t
        if kind == "ndarray":
            return tensor(node.get("ref")).detach().cpu().numpy()
        if kind == "npscalar":
            arr = tensor(node.get("ref")).detach().cpu().numpy()
            if arr.ndim != 0 or str(arr.dtype) != node.get("dtype"):
                raise OutputRejected("skeleton: numpy scalar does not match its tensor")
            return arr[()]
        if kind == "dtype":
            value = node.get("v")
            dt = getattr(torch, value, None) if isinstance(value, str) and value.isidentifier() else None
            if not isinstance(dt, torch.dtype):
                raise OutputRejected(f"skeleton: unknown dtype {str(value)[:40]!r}")
            return dt
        if kind == "device":
            value = node.get("v")
            if not isinstance(value, str) or not _DEVICE.match(value):
                raise OutputRejected("skeleton: bad device")
            return torch.device(value)
        if kind == "size":
            value = node.get("v")
            if not isinstance(value, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in value
            ):
                raise OutputRejected("skeleton: bad size")
            return torch.Size(value)
        if kind == "complex":
            return complex(floaty(node.get("re")), floaty(node.get("im")))
        if kind == "composite":
            parts = node.get("parts")
            if not isinstance(parts, dict) or len(parts) > P.MAX_TENSORS:
                raise OutputRejected("skeleton: composite without parts")
            pieces = {str(k): tensor(v.get("ref") if isinstance(v, dict) else None) for k, v in parts.items()}
            t = assemble(node, pieces)
            if node.get("parameter") is True:
                return torch.nn.Parameter(t, requires_grad=bool(node.get("requires_grad")))
            return t
        if kind == "module":
            return build(node.get("state"), depth + 1)
        if kind == "value":
            return _value(node)
        # opaque
        type_name, path = node.get("type"), node.get("path")
        if not isinstance(type_name, str) or not isinstance(path, str):
            raise OutputRejected("skeleton: bad opaque node")
        opaque.append(type_name[:200])
        state = build(node["state"], depth + 1) if "state" in node else None
        return Unrepresentable(type_name[:200], path[:500], state)

    try:
        result = build(skeleton, 0)
    except OutputRejected:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        # what torch or numpy refuse to build from a hostile node (a numpy array of a dtype
        # numpy lacks, an integer Parameter that requires grad, a namespace's __class__)
        raise OutputRejected(f"skeleton cannot be rebuilt: {str(exc)[:200]}") from None
    if weights_only and opaque:
        raise UnrepresentableObject(
            f"the checkpoint holds {len(opaque)} object(s) that cannot be rebuilt as data: "
            + ", ".join(sorted(set(opaque))[:5]),
            types=sorted(set(opaque)),
        )
    return result


_QUANTIZED = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}
_COMPRESSED = {
    "sparse_csr": "crow_indices",
    "sparse_bsr": "crow_indices",
    "sparse_csc": "ccol_indices",
    "sparse_bsc": "ccol_indices",
}


def assemble(recipe: dict[str, Any], parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sparse, quantized or nested tensor a composite recipe (a skeleton node, or an entry
    of a converted file's ``model_sandbox.composites``) describes, from its component tensors.

    Every recipe is untrusted: the parts must be exactly those of its kind, sparse tensors are
    built with torch's invariant checks (indices in bounds), quantization parameters must have
    the dtypes and lengths torch gives them, and the result must have the declared dtype and
    shape. Raises :class:`OutputRejected` otherwise."""
    import warnings

    import torch

    kind, dtype, shape, params = (
        recipe.get("kind"),
        recipe.get("dtype"),
        recipe.get("shape"),
        recipe.get("params"),
    )
    if not isinstance(kind, str) or kind not in P.COMPOSITE_KINDS or not isinstance(params, dict):
        raise OutputRejected(f"composite of unknown kind {str(kind)[:40]!r}")
    need, optional = P.COMPOSITE_KINDS[kind]
    nested = kind.startswith("nested")
    if nested:
        if shape is not None:
            raise OutputRejected("composite: a nested tensor has no fixed shape")
    elif not (
        isinstance(shape, list)
        and len(shape) <= P.MAX_NDIM
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise OutputRejected("composite: bad shape")
    if not need <= set(parts) <= need | optional:
        raise OutputRejected(f"composite {kind}: parts {sorted(parts)[:8]} are not its parts")

    def param(key: str, typ: type) -> Any:
        v = params.get(key)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise OutputRejected(f"composite {kind}: bad parameter {key!r}")
        return v

    try:
        with warnings.catch_warnings():  # torch calls nested tensors a prototype
            warnings.simplefilter("ignore")
            if kind == "sparse_coo":
                out = torch.sparse_coo_tensor(parts["indices"], parts["values"], shape, check_invariants=True)
                if param("coalesced", bool):
                    merged = out.coalesce()
                    if not torch.equal(merged._indices(), parts["indices"]):
                        raise OutputRejected("composite sparse_coo: claims to be coalesced but is not")
                    out = torch.sparse_coo_tensor(
                        parts["indices"], parts["values"], shape, is_coalesced=True, check_invariants=True
                    )
            elif kind in _COMPRESSED:
                compressed = _COMPRESSED[kind]
                plain = "col_indices" if compressed == "crow_indices" else "row_indices"
                out = torch.sparse_compressed_tensor(
                    parts[compressed],
                    parts[plain],
                    parts["values"],
                    shape,
                    layout=getattr(torch, kind),
                    check_invariants=True,
                )
            elif kind.startswith("quantized"):
                data = parts["int_repr"]
                if (
                    dtype not in _QUANTIZED
                    or str(data.dtype) != f"torch.{_QUANTIZED[dtype]}"
                    or list(data.shape) != shape
                ):
                    raise OutputRejected(f"composite {kind}: int_repr does not fit {dtype!s:.20}")
                if kind == "quantized_per_tensor":
                    scale = param("scale", float)
                    if not math.isfinite(scale):
                        raise OutputRejected(f"composite {kind}: bad scale")
                    out = torch._make_per_tensor_quantized_tensor(data, scale, param("zero_point", int))
                else:
                    axis = param("axis", int)
                    scales, zeros = parts["scales"], parts["zero_points"]
                    if (
                        not 0 <= axis < len(shape)
                        or scales.dtype != torch.float64
                        or zeros.dtype != torch.int64
                        or list(scales.shape) != [shape[axis]]
                        or list(zeros.shape) != [shape[axis]]
                    ):
                        raise OutputRejected(
                            f"composite {kind}: scales, zero points and axis do not fit the data"
                        )
                    out = torch._make_per_channel_quantized_tensor(data, scales, zeros, axis)
            elif kind == "nested":
                _check_nested_views(parts)
                values = parts["values"]
                if values.storage_offset():
                    # the pieces' offsets count from the buffer's storage, not from the buffer:
                    # a buffer mapped at an offset in a whole file (``mmap=True``) gets one of
                    # its own, or the pieces are that file's first bytes
                    values = values.clone()
                out = torch._nested_view_from_buffer(
                    values, parts["sizes"], parts["strides"], parts["storage_offsets"]
                )
            else:  # nested_jagged
                values, offsets = parts["values"], parts["offsets"]
                ragged = param("ragged_idx", int)
                ok = (
                    offsets.dtype == torch.int64
                    and offsets.dim() == 1
                    and offsets.numel() >= 1
                    and bool(offsets[0] == 0)
                    and bool((offsets[1:] >= offsets[:-1]).all())
                    and int(offsets[-1]) <= (values.shape[0] if values.dim() else 0)
                    and 1 <= ragged <= values.dim()
                )
                if not ok:
                    raise OutputRejected("composite nested_jagged: offsets do not fit the values")
                out = torch.nested.nested_tensor_from_jagged(values, offsets, jagged_dim=ragged)
    except OutputRejected:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise OutputRejected(f"composite {kind} cannot be reassembled: {str(exc)[:200]}") from None
    if str(out.dtype) != f"torch.{dtype}" or (not nested and list(out.shape) != shape):
        raise OutputRejected(
            f"composite {kind}: the reassembled tensor does not have the declared dtype and shape"
        )
    return out


def load_composites(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The sparse, quantized and nested tensors of a file that ``convert`` wrote, reassembled
    from their component tensors (which stay in the file under their own names) by the recipes
    in its ``model_sandbox.composites`` metadata. The file is read with the safetensors library
    and every recipe is checked as ``safe_load`` checks it (:class:`OutputRejected`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            raw = meta.get("model_sandbox.composites", "{}")
            recipes: Any = None
            as_bytes: Any = None
            try:
                recipes = json.loads(raw) if len(raw) <= P.MAX_JSON_BYTES else None
                as_bytes = json.loads(meta.get("model_sandbox.dtypes", "{}"))
            except ValueError:
                pass
            if not isinstance(recipes, dict) or not isinstance(as_bytes, dict):
                raise OutputRejected("model_sandbox.composites is not a JSON object")
            keys = set(f.keys())
            out: dict[str, torch.Tensor] = {}
            for name, recipe in recipes.items():
                refs = recipe.get("parts") if isinstance(recipe, dict) else None
                if not isinstance(refs, dict) or not all(
                    isinstance(r, str) and r in keys and r not in as_bytes for r in refs.values()
                ):
                    raise OutputRejected(
                        f"composite {str(name)[:80]!r}: its parts are not tensors of the file"
                    )
                out[str(name)] = assemble(recipe, {str(p): f.get_tensor(r) for p, r in refs.items()})
            return out
    except SafetensorError as exc:
        raise OutputRejected(f"not a valid SafeTensors file: {exc}") from None


def _check_nested_views(parts: dict[str, torch.Tensor]) -> None:
    """Every piece of a strided nested tensor lies inside its buffer (what
    ``_nested_view_from_buffer`` itself does not check)."""
    import torch

    values, sizes = parts["values"], parts["sizes"]
    strides, offsets = parts["strides"], parts["storage_offsets"]
    ok = (
        values.dim() == 1
        and sizes.dtype == strides.dtype == offsets.dtype == torch.int64
        and sizes.dim() == 2
        and strides.shape == sizes.shape
        and offsets.dim() == 1
        and offsets.shape[0] == sizes.shape[0]
        and sizes.shape[0] > 0
    )
    if ok:
        sizes_l, strides_l, offsets_l = sizes.tolist(), strides.tolist(), offsets.tolist()
        for size, stride, offset in zip(sizes_l, strides_l, offsets_l, strict=True):
            if offset < 0 or any(d < 0 for d in size) or any(s < 0 for s in stride):
                ok = False
            elif (
                all(size)
                and offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True)) >= values.numel()
            ):
                ok = False
    if not ok:
        raise OutputRejected("composite nested: the pieces do not lie inside the buffer")


def composites(skeleton: object) -> dict[str, dict[str, Any]]:
    """The composite recipes of a (bounded, untrusted) skeleton by the composite's name, with
    each part's tensor name: what a converted file's ``model_sandbox.composites`` holds and
    :func:`assemble` reads. Walked iteratively with a node budget; malformed nodes are skipped
    (``rebuild`` rejects them)."""
    found: dict[str, dict[str, Any]] = {}
    stack: list[tuple[object, int]] = [(skeleton, 0)]
    budget = P.MAX_SKELETON_NODES
    while stack and budget > 0:
        node, depth = stack.pop()
        budget -= 1
        if isinstance(node, list):
            stack.extend((child, depth + 1) for child in node[: P.MAX_SKELETON_NODES])
            continue
        if not isinstance(node, dict) or depth > P.MAX_SKELETON_DEPTH + 2:
            continue
        if node.get("$") == "composite":
            name, parts = node.get("name"), node.get("parts")
            if isinstance(name, str) and isinstance(parts, dict):
                refs = {str(k): v.get("ref") for k, v in parts.items() if isinstance(v, dict)}
                if all(isinstance(r, str) for r in refs.values()):
                    found[name] = {
                        "kind": node.get("kind"),
                        "dtype": node.get("dtype"),
                        "shape": node.get("shape"),
                        "params": node.get("params"),
                        "parts": refs,
                    }
            continue
        stack.extend((child, depth + 1) for key, child in node.items() if key != "$")
    return found


_BIG_EXPONENT = re.compile(r"[eE][+-]?0*\d{4,}")


def _value(node: dict[str, Any]) -> Any:
    """A standard-library value from plain data: constructors that parse, never import."""
    import datetime
    import decimal
    import fractions
    import pathlib
    import uuid

    tname, v = node.get("type"), node.get("v")
    if not isinstance(tname, str) or tname not in P.VALUE_TYPES:
        raise OutputRejected(f"skeleton: {str(tname)[:60]!r} is not a value type")
    try:
        if tname in ("builtins.range", "builtins.slice"):
            if (
                not isinstance(v, list)
                or len(v) != 3
                or not all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in v)
            ):
                raise ValueError("bad bounds")
            if tname == "builtins.slice":
                return slice(*v)
            return range(*(x for x in v if x is not None))
        if tname == "datetime.timedelta":
            if (
                not isinstance(v, list)
                or len(v) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            ):
                raise ValueError("bad timedelta")
            return datetime.timedelta(days=v[0], seconds=v[1], microseconds=v[2])
        if not isinstance(v, str) or len(v) > 4096:
            raise ValueError("not a short string")
        if tname == "fractions.Fraction" and _BIG_EXPONENT.search(v):
            # Fraction("1e999999999") computes 10**999999999: minutes of CPU on the host
            raise ValueError("an exponent too large")
        parsers: dict[str, Any] = {
            "datetime.datetime": datetime.datetime.fromisoformat,
            "datetime.date": datetime.date.fromisoformat,
            "datetime.time": datetime.time.fromisoformat,
            "pathlib.PosixPath": pathlib.PurePosixPath if os.name != "posix" else pathlib.PosixPath,
            "pathlib.PurePosixPath": pathlib.PurePosixPath,
            "pathlib.WindowsPath": pathlib.PureWindowsPath,
            "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
            "decimal.Decimal": decimal.Decimal,
            "fractions.Fraction": fractions.Fraction,
            "uuid.UUID": uuid.UUID,
        }
        return parsers[tname](v)
    except (ValueError, TypeError, ArithmeticError, KeyError) as exc:
        raise OutputRejected(f"skeleton: bad {tname} value ({str(exc)[:80]})") from None


def check_map_location(map_location: MapLocation) -> None:
    """Reject argument types torch.load would reject, before any work is done."""
    import torch

    if map_location is None or isinstance(map_location, (str, torch.device, dict)):
        return
    if isinstance(map_location, Callable):  # type: ignore[arg-type]
        return
    raise TypeError(f"map_location of type {type(map_location).__name__} is not supported")
