"""Container side: turn whatever ``torch.load`` returned into tensors + a JSON skeleton.

Walks dicts (plain, OrderedDict, defaultdict, subclasses), lists, tuples, sets, argparse
Namespaces, ``nn.Module`` / optimizer / LR-scheduler objects (their ``state_dict()``), numpy
arrays and scalars, and tensors. Every tensor gets a name; tensors that are views of another
stored tensor's storage (tied weights, slices) are recorded as views instead of being stored
twice. Anything that cannot be represented as data is named in ``unrepresentable`` and
replaced by an ``opaque`` node: it is never passed through.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _protocol as P
from ._ghosts import Ghost, ghost_parts

_PRIMITIVE_TYPES = (bool, int, float, str)


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class _TensorUse:
    name: str
    tensor: torch.Tensor
    kind: str  # "tensor" | "ndarray" | "npscalar"


@dataclass
class Extraction:
    skeleton: Any
    stored: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    views: list[dict[str, Any]] = field(default_factory=list)
    unrepresentable: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Extractor(P.TensorNames):
    def __init__(self, locations: dict[int, str] | None = None) -> None:
        super().__init__()
        self.locations = locations or {}
        self.uses: list[_TensorUse] = []
        self.unrepresentable: list[dict[str, str]] = []
        self.notes: list[str] = []
        self.composites: dict[int, dict[str, Any]] = {}
        self.keep: list[torch.Tensor] = []  # composites stay alive while their ids are keys

    # -- naming --------------------------------------------------------------------------------
    def _name(self, path: tuple[str, ...]) -> str:
        return P.tensor_name(path, self.names)

    _component = staticmethod(P.path_component)

    # -- walking -------------------------------------------------------------------------------
    def _opaque(self, obj: object, where: str, why: str) -> dict[str, Any]:
        tname = _type_name(obj)
        self.unrepresentable.append({"path": where, "type": tname, "reason": why})
        return {"$": "opaque", "type": tname, "path": where}

    def walk(self, obj: Any, path: tuple[str, ...] = (), depth: int = 0) -> Any:
        where = "root" + "".join(f"[{p!r}]" for p in path)
        self.nodes += 1
        if self.nodes > P.MAX_SKELETON_NODES:
            raise ValueError(f"the loaded object has more than {P.MAX_SKELETON_NODES} nodes")
        if depth > P.MAX_SKELETON_DEPTH:
            return self._opaque(obj, where, f"nested deeper than {P.MAX_SKELETON_DEPTH}")

        if obj is None or type(obj) in (bool, int, str):
            if type(obj) is str and len(obj) > P.MAX_STRING_LEN:
                return self._opaque(obj, where, "string too long")
            return obj
        if type(obj) is float:
            return obj if math.isfinite(obj) else {"$": "float", "v": repr(obj)}
        if type(obj) is complex:
            return {
                "$": "complex",
                "re": self.walk(obj.real, path, depth + 1),
                "im": self.walk(obj.imag, path, depth + 1),
            }
        if isinstance(obj, (bytes, bytearray)):
            if len(obj) > P.MAX_STRING_LEN:
                return self._opaque(obj, where, "bytes too long")
            return {"$": "bytes", "b64": base64.b64encode(bytes(obj)).decode("ascii")}

        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path, where)
        if isinstance(obj, np.ndarray):
            return self._ndarray(obj, path, where)
        if isinstance(obj, np.generic):
            return self._npscalar(obj, path, where)
        if isinstance(obj, torch.dtype):
            return {"$": "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"$": "device", "v": str(obj)}
        if isinstance(obj, torch.Size):
            return {"$": "size", "v": [int(x) for x in obj]}

        tname = _type_name(obj)
        if tname in P.VALUE_TYPES:
            return self._value(obj, tname, path, where, depth)
        if isinstance(obj, _PRIMITIVE_TYPES):  # subclasses: int enums, str subclasses...
            self.notes.append(f"{where}: {_type_name(obj)} stored as its base value")
            for base in (bool, int, float, str):
                if isinstance(obj, base):
                    return self.walk(base(obj), path, depth)

        if id(obj) in self.active:
            return self._opaque(obj, where, "reference cycle")
        self.active.add(id(obj))
        try:
            return self._container(obj, path, where, depth)
        finally:
            self.active.discard(id(obj))

    def _value(self, obj: Any, tname: str, path: tuple[str, ...], where: str, depth: int) -> Any:
        if tname in ("datetime.datetime", "datetime.date", "datetime.time"):
            v: Any = obj.isoformat()
        elif tname == "datetime.timedelta":
            v = [obj.days, obj.seconds, obj.microseconds]
        elif tname in ("builtins.range", "builtins.slice"):
            v = [obj.start, obj.stop, obj.step]
            if not all(x is None or type(x) is int for x in v):
                return self._opaque(obj, where, "a slice of non-integers")
        else:
            v = str(obj)
        if isinstance(v, str) and len(v) > P.MAX_STRING_LEN:
            return self._opaque(obj, where, "value too long")
        return {"$": "value", "type": tname, "v": v}

    def _container(self, obj: Any, path: tuple[str, ...], where: str, depth: int) -> Any:
        if isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                kind = "OrderedDict"
            elif isinstance(obj, collections.defaultdict):
                kind = "defaultdict"
            else:
                kind = "dict"
            if type(obj) not in (dict, collections.OrderedDict, collections.defaultdict):
                self.notes.append(f"{where}: {_type_name(obj)} returned as {kind}")
            items = []
            for key, value in obj.items():
                comp = self._component(key)
                items.append(
                    [self._key(key, path + (comp,), depth), self.walk(value, path + (comp,), depth + 1)]
                )
            node = {"$": "dict", "kind": kind, "items": items}
            if kind == "OrderedDict":
                self._metadata(obj, node, where)
            return node
        if isinstance(obj, (list, tuple, set, frozenset)):
            kind = (
                "list"
                if isinstance(obj, list)
                else "tuple"
                if isinstance(obj, tuple)
                else "set"
                if isinstance(obj, set)
                else "frozenset"
            )
            if type(obj) not in (list, tuple, set, frozenset):
                self.notes.append(f"{where}: {_type_name(obj)} returned as {kind}")
            seq = sorted(obj, key=repr) if kind in ("set", "frozenset") else obj
            return {
                "$": kind,
                "items": [self.walk(v, path + (str(i),), depth + 1) for i, v in enumerate(seq)],
            }
        if isinstance(obj, argparse.Namespace):
            return {
                "$": "namespace",
                "items": [[k, self.walk(v, path + (k,), depth + 1)] for k, v in vars(obj).items()],
            }
        if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            try:
                state = obj.state_dict()
            except Exception as exc:  # a hostile or broken state_dict()
                return self._opaque(obj, where, f"state_dict() failed: {type(exc).__name__}")
            self.notes.append(f"{where}: {_type_name(obj)} returned as its state_dict()")
            return {"$": "module", "type": _type_name(obj), "state": self.walk(state, path, depth + 1)}
        if isinstance(obj, Ghost):
            return self._ghost(obj, path, where, depth)
        return self._opaque(obj, where, "not a data type the host can rebuild")

    def _metadata(self, obj: Any, node: dict[str, Any], where: str) -> None:
        """A state dict's ``_metadata`` (the module versions ``load_state_dict`` reads) on its
        dict node, where it is one the host can rebuild."""
        raw = getattr(obj, "__dict__", {}).get("_metadata")
        if raw is None:
            return
        meta = P.state_dict_metadata(raw)
        if meta is None:
            self.notes.append(f"{where}: its _metadata is not module versions; left out")
        else:
            node["metadata"] = meta

    def _ghost(self, obj: Ghost, path: tuple[str, ...], where: str, depth: int) -> Any:
        """An object of a class the sandbox does not have: keep what it holds, as data."""
        tname = obj._ghost_type
        parts = ghost_parts(obj)
        state = parts.get("state")
        if isinstance(state, dict) and "_parameters" in state and "_modules" in state:
            self.notes.append(f"{where}: {tname} (not installed in the sandbox) returned as its state_dict")
            return {"$": "module", "type": tname, "state": self.walk(_module_state(state), path, depth + 1)}
        if set(parts) <= {"items", "state"} and "items" in parts and not state:
            self.notes.append(f"{where}: {tname} (not installed in the sandbox) returned as dict")
            return self._container(collections.OrderedDict(parts["items"]), path, where, depth) | {
                "kind": "dict"
            }
        if set(parts) == {"list"}:
            self.notes.append(f"{where}: {tname} (not installed in the sandbox) returned as list")
            return self._container(parts["list"], path, where, depth)
        node = self._opaque(obj, where, "class not installed in the sandbox")
        node["type"] = tname
        self.unrepresentable[-1]["type"] = tname
        if parts:
            node["state"] = self.walk(parts, path, depth + 1)
        return node

    def _key(self, key: Any, path: tuple[str, ...], depth: int) -> Any:
        if isinstance(key, (torch.Tensor, np.ndarray)):
            return self._opaque(key, "key of root" + "".join(f"[{p!r}]" for p in path), "tensor as key")
        return self.walk(key, path + ("<key>",), depth + 1)

    # -- tensors -------------------------------------------------------------------------------
    def _tensor(self, t: torch.Tensor, path: tuple[str, ...], where: str) -> Any:
        if t.device.type == "meta":
            return self._opaque(t, where, "meta tensor (it has no data)")
        if isinstance(t, getattr(torch.nn.parameter, "UninitializedTensorMixin", ())):
            return self._opaque(t, where, "uninitialized parameter of a lazy module (it has no data)")
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            return self._composite(t, path, where)
        if str(t.dtype).removeprefix("torch.") not in P.TORCH_DTYPES:
            return self._opaque(t, where, f"dtype {t.dtype} not supported")
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            self.notes.append(f"{where}: tensor subclass {_type_name(t)} returned as a plain tensor")
        node = {
            "$": "tensor",
            "ref": self._ref(t, path, "tensor"),
            "parameter": isinstance(t, torch.nn.Parameter),
            "requires_grad": bool(t.requires_grad),
        }
        return node

    def _composite(self, t: torch.Tensor, path: tuple[str, ...], where: str) -> Any:
        """A sparse, quantized or nested tensor as its component tensors (ordinary strided
        tensors, stored like any other under ``<name>.<part>``) and the parameters the host
        needs to reassemble it; a placeholder when it has no such description here."""
        try:
            recipe = _recipe(t)
        except Exception as exc:  # a kind or state this torch cannot take apart
            return self._opaque(t, where, f"{t.layout} tensor cannot be taken apart ({type(exc).__name__})")
        if recipe is None:
            kind = "quantized" if t.is_quantized else "nested" if t.is_nested else str(t.layout)
            return self._opaque(t, where, f"{kind} tensor of a kind the host cannot reassemble")
        kind, parts, params = recipe
        for part, c in parts.items():
            if (
                c.layout != torch.strided
                or c.is_quantized
                or c.is_nested
                or str(c.dtype).removeprefix("torch.") not in P.TORCH_DTYPES
            ):
                return self._opaque(t, where, f"{kind} tensor whose {part} is not a plain tensor")
        seen = self.composites.get(id(t))
        if seen is not None:  # the same composite twice: the same recipe, the same parts
            return seen
        name = P.tensor_name(path, self.names)  # the composite's own name (nothing stored)
        nodes = {
            part: {
                "$": "tensor",
                "ref": self._ref(c.detach(), path + (part,), "tensor"),
                "parameter": False,
                "requires_grad": False,
            }
            for part, c in parts.items()
        }
        self.notes.append(
            f"{where}: {kind} tensor returned as its components "
            + ", ".join(str(n["ref"]) for n in nodes.values())
        )
        node = {
            "$": "composite",
            "kind": kind,
            "name": name,
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": None if t.is_nested else [int(d) for d in t.shape],
            "parts": nodes,
            "params": params,
            "parameter": isinstance(t, torch.nn.Parameter),
            "requires_grad": bool(t.requires_grad),
        }
        self.composites[id(t)] = node
        self.keep.append(t)
        return node

    def _ref(self, t: torch.Tensor, path: tuple[str, ...], kind: str) -> str:
        name, new = self.name_of(t, path)
        if new:
            self.uses.append(_TensorUse(name, t, kind))
        return name

    def _ndarray(self, a: np.ndarray, path: tuple[str, ...], where: str) -> Any:
        if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.kind not in "biufc":
            return self._opaque(a, where, f"numpy dtype {a.dtype} is not numeric")
        if id(a) in self.by_id:
            return {"$": "ndarray", "ref": self.by_id[id(a)]}
        native = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False))
        t = torch.from_numpy(native)
        name = self._name(path)
        self.by_id[id(a)] = name
        self.uses.append(_TensorUse(name, t, "ndarray"))
        return {"$": "ndarray", "ref": name}

    def _npscalar(self, s: np.generic, path: tuple[str, ...], where: str) -> Any:
        if s.dtype.kind not in "biufc":
            return self._opaque(s, where, f"numpy scalar of dtype {s.dtype}")
        t = torch.from_numpy(np.array(s, dtype=s.dtype.newbyteorder("=")))
        name = self._name(path)
        self.uses.append(_TensorUse(name, t, "npscalar"))
        return {"$": "npscalar", "dtype": str(s.dtype), "ref": name}

    # -- storage planning ----------------------------------------------------------------------
    def finish(self, skeleton: Any, *, digests: bool = True) -> Extraction:
        """The stored tensors and their entries; ``digests``: each entry carries the sha256 of
        its bytes (else ``None``: the bytes go to the host, which hashes them itself)."""
        out = Extraction(skeleton=skeleton, unrepresentable=self.unrepresentable, notes=self.notes)
        if len(self.uses) > P.MAX_TENSORS:
            raise ValueError(f"more than {P.MAX_TENSORS} tensors")
        # Bases: per storage, the contiguous tensors, largest first, are stored; a tensor whose
        # elements lie inside a stored base of the same dtype becomes a view of it.
        by_storage: dict[int, list[_TensorUse]] = collections.defaultdict(list)
        for use in self.uses:
            t = use.tensor
            if t.numel() > 0 and use.kind == "tensor":
                by_storage[t.untyped_storage().data_ptr()].append(use)
        view_of: dict[str, tuple[_TensorUse, int]] = {}
        for group in by_storage.values():
            if len(group) < 2:
                continue
            order = {id(u): i for i, u in enumerate(group)}  # ties: first seen is the base
            group = sorted(group, key=lambda u: (-u.tensor.numel(), order[id(u)]))
            bases: list[_TensorUse] = []
            for use in group:
                t = use.tensor
                lo = t.storage_offset()
                hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
                for base in bases:
                    b = base.tensor
                    if (
                        b.dtype == t.dtype
                        and b.storage_offset() <= lo
                        and hi < b.storage_offset() + b.numel()
                    ):
                        view_of[use.name] = (base, int(lo - b.storage_offset()))
                        break
                else:
                    if t.is_contiguous():
                        bases.append(use)
            shared = [u.name for u in group if u.name not in view_of]
            if len(shared) > 1:
                out.notes.append(
                    "tensors share storage but are not views of one another; stored as copies: "
                    + ", ".join(shared[:8])
                    + (" ..." if len(shared) > 8 else "")
                )
        bases_of_views = {base.name for base, _ in view_of.values()}
        owners: collections.Counter[int] = collections.Counter(
            u.tensor.untyped_storage().data_ptr()
            for u in self.uses
            if u.name not in view_of and u.tensor.numel() > 0
        )
        for use in self.uses:
            t = use.tensor
            dtype = str(t.dtype).removeprefix("torch.")
            location = (
                self.locations.get(t.untyped_storage().data_ptr(), str(t.device))
                if use.kind == "tensor"
                else "cpu"
            )
            if use.name in view_of:
                base, offset = view_of[use.name]
                out.views.append(
                    {
                        "name": use.name,
                        "base": base.name,
                        "offset": offset,
                        "shape": list(t.shape),
                        "stride": list(t.stride()),
                        "dtype": dtype,
                        "location": location,
                    }
                )
                continue
            data = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            if (
                owners[data.untyped_storage().data_ptr()] > 1
                or data.data_ptr() != data.untyped_storage().data_ptr()
                or data.untyped_storage().nbytes() != data.numel() * data.element_size()
            ):
                data = data.clone()  # safetensors refuses tensors that share or overhang memory
            stored_as, _ = P.TORCH_DTYPES[dtype]
            raw = data.reshape(-1).view(torch.uint8)
            if stored_as == "U8" and dtype != "uint8":
                data = raw
            # the host compares the bytes it receives itself; only a scan (no bytes cross) needs ours
            digest = tensor_sha256(raw) if digests else None
            out.stored[use.name] = data
            entry = {
                "name": use.name,
                "dtype": dtype,
                "shape": list(t.shape),
                "stored_as": stored_as,
                "nbytes": raw.numel(),
                "sha256": digest,
                "location": location,
            }
            # a dense layout other than row-major (channels_last, a transpose) is kept: the
            # bytes cross row-major, the host lays them out again (a view's base stays as it is)
            stride = [int(s) for s in t.stride()]
            if use.kind == "tensor" and not t.is_contiguous() and P.dense_strides(list(t.shape), stride):
                if use.name not in bases_of_views:
                    entry["stride"] = stride
            out.entries.append(entry)
        return out


def tensor_sha256(t: torch.Tensor) -> str:
    """The sha256 of a stored (contiguous, CPU) tensor's bytes in row-major order."""
    raw = t.reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().data if raw.numel() else b"").hexdigest()


_SPARSE_PARTS = {
    torch.sparse_csr: ("crow_indices", "col_indices"),
    torch.sparse_csc: ("ccol_indices", "row_indices"),
    torch.sparse_bsr: ("crow_indices", "col_indices"),
    torch.sparse_bsc: ("ccol_indices", "row_indices"),
}
_QUANTIZED = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}


def _recipe(t: torch.Tensor) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(kind, component tensors, JSON parameters) of a sparse, quantized or nested tensor
    (the host's ``_convert.assemble`` is the inverse), or None for a kind it does not know."""
    if t.is_nested:
        if t.layout == torch.jagged:
            if t.lengths() is not None:  # type: ignore[attr-defined]
                return None  # a non-contiguous jagged tensor (with holes): a placeholder
            parts = {"values": t.values(), "offsets": t.offsets()}  # type: ignore[attr-defined]
            return "nested_jagged", parts, {"ragged_idx": int(t._ragged_idx)}  # type: ignore[attr-defined]
        if t.layout == torch.strided:  # what torch.save writes: a buffer and each piece's view
            return (
                "nested",
                {
                    "values": t.values(),
                    "sizes": t._nested_tensor_size(),
                    "strides": t._nested_tensor_strides(),
                    "storage_offsets": t._nested_tensor_storage_offsets(),
                },
                {},
            )
        return None
    if t.is_quantized:
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _QUANTIZED:
            return None
        scheme = t.qscheme()
        if scheme == torch.per_tensor_affine:
            scale = float(t.q_scale())
            if not math.isfinite(scale):
                return None
            return (
                "quantized_per_tensor",
                {"int_repr": t.int_repr()},
                {"scale": scale, "zero_point": int(t.q_zero_point())},
            )
        if scheme == torch.per_channel_affine:
            return (
                "quantized_per_channel",
                {
                    "int_repr": t.int_repr(),
                    "scales": t.q_per_channel_scales(),
                    "zero_points": t.q_per_channel_zero_points(),
                },
                {"axis": int(t.q_per_channel_axis())},
            )
        return None  # float zero points (per_channel_affine_float_qparams), symmetric schemes
    if t.layout == torch.sparse_coo:
        return (
            "sparse_coo",
            {"indices": t._indices(), "values": t._values()},
            {"coalesced": bool(t.is_coalesced())},
        )
    if t.layout in _SPARSE_PARTS:
        compressed, plain = _SPARSE_PARTS[t.layout]
        getter = {
            "crow_indices": t.crow_indices,
            "col_indices": t.col_indices,
            "ccol_indices": t.ccol_indices,
            "row_indices": t.row_indices,
        }
        return (
            str(t.layout).removeprefix("torch."),
            {compressed: getter[compressed](), plain: getter[plain](), "values": t.values()},
            {},
        )
    return None


def _module_state(
    attrs: dict[str, Any],
    prefix: str = "",
    out: collections.OrderedDict[str, Any] | None = None,
    depth: int = 0,
) -> collections.OrderedDict[str, Any]:
    """What ``nn.Module.state_dict()`` would return, from the attributes of a module whose
    class is missing: parameters and persistent buffers, recursively through submodules."""
    out = collections.OrderedDict() if out is None else out
    if depth > 100:
        return out
    skip = attrs.get("_non_persistent_buffers_set") or set()
    for key in ("_parameters", "_buffers"):
        table = attrs.get(key)
        if isinstance(table, dict):
            for name, value in table.items():
                if value is not None and not (key == "_buffers" and name in skip):
                    out[prefix + str(name)] = value.detach() if isinstance(value, torch.Tensor) else value
    modules = attrs.get("_modules")
    if isinstance(modules, dict):
        for name, sub in modules.items():
            if isinstance(sub, torch.nn.Module):
                for k, v in sub.state_dict().items():
                    out[f"{prefix}{name}.{k}"] = v
            elif isinstance(sub, Ghost) and isinstance(ghost_parts(sub).get("state"), dict):
                _module_state(ghost_parts(sub)["state"], f"{prefix}{name}.", out, depth + 1)
    return out


def extract(obj: Any, locations: dict[int, str] | None = None, *, digests: bool = True) -> Extraction:
    ex = Extractor(locations)
    skeleton = ex.walk(obj)
    return ex.finish(skeleton, digests=digests)
