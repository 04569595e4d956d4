"""Stage 6, host: cross-checks between what the host knows and what the sandbox reported.

* the input the worker hashed inside the container is the file the host hashed before the
  run (a file swapped under the sandbox is an error, not a load);
* the weights the loader returned are the weights the file holds. For plain state_dicts the
  tensors are rebuilt from the archive's records without any unpickler
  (:func:`.reconstruct.try_reconstruct`) and compared name by name, so a pickle that changes
  weights while it loads (Sleepy Pickle) is caught (``weights-tampered``). For everything else
  (objects of any class, optimizer states, numpy arrays) the general reading
  (:func:`.reconstruct.try_inventory`) lists every tensor the file describes, and each tensor
  the loader returned must be one of them; one that is not was computed while loading and is
  ``weights-unverified`` (which ``safe_load(weights_only=True)`` and ``convert`` refuse);
* (tensor bytes against the manifest are checked while reading them, in ``_convert``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from sandbox import _scan
from sandbox._formats.buffer import sha256_file_region
from sandbox._verify import reconstruct as _reconstruct
from sandbox._worker import _protocol as P
from sandbox.errors import MalformedInput
from sandbox.report import Finding, Severity

if TYPE_CHECKING:
    import torch

_MAX_NAMED = 20  # tensors named in one finding


def input_identity(host_sha256: str, status: P.Status | None) -> Finding | None:
    """A finding when the sandbox loaded other bytes than the host hashed."""
    if status is None or status.input_sha256 is None or status.input_sha256 == host_sha256:
        return None
    return Finding(
        rule="input-changed",
        severity=Severity.HIGH,
        category="evasion",
        message="the file inside the sandbox differs from the file the host hashed",
        evidence={"host_sha256": host_sha256, "sandbox_sha256": status.input_sha256},
    )


class _Returned:
    """What the sandbox returned, by tensor name: dtype and shape, and the sha256 of the bytes,
    asked for only where needed. A stored tensor's digest is the manifest's where it gives one
    (a scan, where no bytes cross: the sandbox's own, which the host cannot check), else the
    host's, computed from the bytes it holds when first asked; a tensor matched byte for byte
    with the file is never hashed. A tensor the manifest names by its span in the input has
    the file's bytes there: the host read them (a load), or the sandbox says so (a scan, its
    word like a digest): its digest is the file's at that span (``span_digest``). A view has a
    digest only where the host holds it (with ``want_view``, only for names in it); otherwise
    its base stands for it."""

    def __init__(
        self,
        manifest: P.Manifest,
        tensors: Mapping[str, torch.Tensor] | None,
        want_view: Mapping[str, Any] | None = None,
        span_digest: Callable[[tuple[int, int]], str] | None = None,
    ) -> None:
        self.tensors = tensors
        self.span_digest = span_digest
        self.kinds: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._digests: dict[str, str] = {}
        self._hashable: set[str] = set()
        #: where in the input a tensor's bytes are (the manifest named it by span)
        self.spans: dict[str, tuple[int, int]] = {}
        self._claimed: set[str] = set()  # ... and only there: the host holds no bytes for it
        for e in manifest.tensors:
            self.kinds[e.name] = (e.dtype, e.shape)
            held = tensors is not None and e.name in tensors
            if e.span is not None:
                self.spans[e.name] = e.span
                if not held:
                    self._claimed.add(e.name)
            if e.sha256 is not None:
                self._digests[e.name] = e.sha256
            elif held:
                self._hashable.add(e.name)
        for v in manifest.views:
            self.kinds[v.name] = (v.dtype, v.shape)
            if tensors is not None and v.name in tensors and (want_view is None or v.name in want_view):
                self._hashable.add(v.name)

    def compared(self, name: str) -> bool:
        """Whether ``name``'s bytes are compared at all (else its base stands for it)."""
        return name in self._digests or name in self._hashable or name in self._claimed

    def digest(self, name: str) -> str | None:
        if name not in self._digests and name in self._hashable:
            from sandbox._convert import tensor_digest

            assert self.tensors is not None
            self._digests[name] = tensor_digest(self.tensors[name])
        elif name not in self._digests and name in self._claimed and self.span_digest is not None:
            self._digests[name] = self.span_digest(self.spans[name])
        return self._digests.get(name)

    def raw(self, name: str) -> memoryview | None:
        """The row-major bytes the host holds under ``name`` (what ``tensor_digest`` hashes)."""
        return _held(self.tensors, name) if self.compared(name) else None

    def actual(self) -> dict[str, _reconstruct.Actual]:
        """Every name with its digest (``None``: not compared), those still to compute hashed
        on every core (hashlib lets go of the GIL)."""
        todo = [n for n in self._hashable if n not in self._digests]
        if len(todo) > 1:
            from concurrent.futures import ThreadPoolExecutor

            from sandbox._convert import tensor_digest

            assert self.tensors is not None
            held = self.tensors
            with ThreadPoolExecutor(min(4, os.cpu_count() or 1), "model-sandbox-digest") as pool:
                for name, digest in zip(todo, pool.map(lambda n: tensor_digest(held[n]), todo), strict=True):
                    self._digests[name] = digest
        return {n: (dtype, shape, self.digest(n)) for n, (dtype, shape) in self.kinds.items()}


_Reading: TypeAlias = "_reconstruct.Reconstruction | _reconstruct.Inventory | _reconstruct.NotReconstructed"


class Reading:
    """:func:`.reconstruct.read` in a background thread, started while the sandbox loads the same
    file; :meth:`result` waits. ``spans``: the host will hold the returned tensors' bytes, so the
    file's own tensors are located, not hashed (see :func:`weights`)."""

    def __init__(self, path: str, scan: _scan.StaticScan | None, *, spans: bool = False) -> None:
        self._result: _Reading | BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path, scan, spans), daemon=True, name="model-sandbox-verify"
        )
        self._thread.start()

    def _run(self, path: str, scan: _scan.StaticScan | None, spans: bool) -> None:
        try:
            self._result = _reconstruct.read(path, scan, cancel=self._cancel, spans=spans)
        except BaseException as exc:  # handed to the caller by result()
            self._result = exc

    def cancel(self) -> None:
        """The result is no longer wanted (the load failed or was refused): the thread stops
        at its next check instead of hashing the rest of the file. Does not wait."""
        self._cancel.set()

    def result(self) -> _Reading:
        self._thread.join()
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result


# numpy dtype codes (native or no byte order) -> the torch dtype the sandbox returns them as
_NP_TORCH = {
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "i1": "int8",
    "i2": "int16",
    "i4": "int32",
    "i8": "int64",
    "u1": "uint8",
    "u2": "uint16",
    "u4": "uint32",
    "u8": "uint64",
    "b1": "bool",
    "c8": "complex64",
    "c16": "complex128",
}


def joblib_inventory(scan: _scan.StaticScan) -> _reconstruct.Inventory:
    """The host's reading of a joblib file: every inline numeric array the static scan walked
    past (joblib's own layout, inflated within the scan's bound), by dtype, shape and sha256.
    Only C-ordered arrays in this machine's byte order are listed: the sandbox returns arrays
    as native, row-major tensors, so others (and object arrays) stay unverified."""
    import sys

    native = "<" if sys.byteorder == "little" else ">"
    digests = set()
    for a in scan.joblib_arrays:
        dtype = _NP_TORCH.get(a.code.lstrip("<>|="))
        if dtype is None or (a.fortran and len(a.shape) > 1) or a.byteorder not in ("|", "=", native):
            continue
        digests.add((dtype, a.shape, a.sha256))
    return _reconstruct.Inventory(format="joblib", digests=frozenset(digests), findings=(), named={})


_SAMPLE = 64  # bytes at each end of a tensor that pick the file's candidates for it
_MAX_COMPARED = 4  # candidates compared in full; past that, by digest (each hashed once)
_CHUNK = 1 << 20


class _FileBytes:
    """The file's stored tensors (``Inventory.stored``) held against tensors the host holds,
    byte for byte, read from the file with ``pread``. A returned tensor's candidates share its
    dtype, shape and first and last bytes (an index built once per dtype and shape); at most
    :data:`_MAX_COMPARED` are compared in full, and where more share those bytes the rest are
    matched by digest, each span hashed at most once: the work stays linear in the file."""

    def __init__(self, path: str, stored: Mapping[tuple[str, tuple[int, ...]], tuple[tuple[int, int], ...]]):
        self._stored = stored
        self._path = path
        self._fd = -1  # opened when first needed
        self._index: dict[tuple[str, tuple[int, ...]], dict[tuple[bytes, bytes], list[tuple[int, int]]]] = {}
        self._digests: dict[tuple[int, int], str] = {}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> _FileBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def _ends(self, begin: int, end: int) -> tuple[bytes, bytes]:
        n = min(_SAMPLE, end - begin)
        return os.pread(self.fd, n, begin), os.pread(self.fd, n, end - n)

    def digest(self, span: tuple[int, int]) -> str:
        """The sha256 of the file's bytes in ``span`` (for evidence, and past the candidates)."""
        if span not in self._digests:
            try:
                self._digests[span] = sha256_file_region(self.fd, *span)
            except MalformedInput:  # the file shrank: an empty digest never matches
                self._digests[span] = ""
        return self._digests[span]

    def equal(self, span: tuple[int, int], raw: memoryview) -> bool:
        """Whether the file's bytes in ``span`` are exactly ``raw``."""
        begin, end = span
        if end - begin != len(raw):
            return False
        chunk = bytearray(min(_CHUNK, len(raw)))
        with memoryview(chunk) as view:
            pos = 0
            while pos < len(raw):
                got = os.preadv(self.fd, [view[: min(len(chunk), len(raw) - pos)]], begin + pos)
                if got <= 0:
                    return False
                if (chunk if got == len(chunk) else chunk[:got]) != raw[pos : pos + got]:
                    return False
                pos += got
        return True

    def matches(
        self, dtype: str, shape: tuple[int, ...], raw: memoryview | None, digest: Callable[[], str | None]
    ) -> bool:
        """Whether the file stores a tensor of this dtype and shape with these bytes (``raw``;
        without them, the ``digest()`` of the returned tensor, asked for only if needed)."""
        key = (dtype, shape)
        spans = self._stored.get(key)
        if not spans:
            return False
        if raw is None:
            want = digest()
            return any(self.digest(span) == want for span in spans)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = {}
            for span in spans:
                index.setdefault(self._ends(*span), []).append(span)
        n = min(_SAMPLE, len(raw))
        candidates = index.get((bytes(raw[:n]), bytes(raw[len(raw) - n :])), [])
        if any(self.equal(span, raw) for span in candidates[:_MAX_COMPARED]):
            return True
        rest = candidates[_MAX_COMPARED:]
        return bool(rest) and any(self.digest(span) == digest() for span in rest)


def _held(tensors: Mapping[str, torch.Tensor] | None, name: str) -> memoryview | None:
    """The row-major bytes of the tensor the host holds under ``name`` (what ``tensor_digest``
    hashes), or None."""
    if tensors is None or name not in tensors:
        return None
    from sandbox._convert import tensor_bytes

    return tensor_bytes(tensors[name])


def _skeleton_refs(
    skeleton: object,
) -> tuple[dict[tuple[str, ...], list[object]], dict[tuple[str, ...], str]]:
    """What the sandbox's skeleton puts at each path through the containers the host rebuilds
    as containers (dicts, lists, tuples, namespaces, a module's state, which the worker names
    at the module's own path): each tensor's ref, or a composite tensor's node; and, for the
    evidence, what else it puts at a path (a kind, or an opaque object's type)."""
    out: dict[tuple[str, ...], list[object]] = {}
    other: dict[tuple[str, ...], str] = {}
    stack: list[tuple[object, tuple[str, ...], int]] = [(skeleton, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > P.MAX_SKELETON_DEPTH + 2:
            continue
        if not isinstance(node, dict):
            other[path] = type(node).__name__
            continue
        kind, items = node.get("$"), node.get("items")
        if kind in ("tensor", "ndarray", "npscalar"):
            out.setdefault(path, []).append(node.get("ref"))
        elif kind == "composite":
            out.setdefault(path, []).append(node)
        elif kind == "module":
            stack.append((node.get("state"), path, depth + 1))
        elif kind in ("list", "tuple") and isinstance(items, list):
            stack.extend((item, path + (str(i),), depth + 1) for i, item in enumerate(items))
        elif kind in ("dict", "namespace") and isinstance(items, list):
            for pair in items:
                if isinstance(pair, list) and len(pair) == 2:
                    comp = _component(pair[0])
                    if comp is not None:
                        stack.append((pair[1], path + (comp,), depth + 1))
        else:
            other[path] = f"{kind} {node.get('type')}" if kind == "opaque" else str(kind)[:40]
    return out, other


def _component(key: object) -> str | None:
    """The path component of a skeleton's dict key, as the worker names it (None: a key
    the host cannot rebuild, under which it places nothing)."""
    if isinstance(key, (str, bool, int)) or key is None:
        return P.path_component(key)
    from sandbox._convert import rebuild
    from sandbox.errors import OutputRejected

    try:
        return P.path_component(rebuild(key, {}, weights_only=False))
    except (OutputRejected, RecursionError):
        return None
    except Exception:  # anything torch or the builders raise for a key nobody can rebuild
        return None


def _fits(got: object, name: str, path: tuple[str, ...]) -> bool:
    """Whether ``got`` (a ref, or a composite's node, that the skeleton puts at ``path``) is
    the tensor ``name``: a composite by its own name, with its parts named under it."""
    if not isinstance(got, dict):
        return got == name
    parts = got.get("parts")
    return (
        got.get("name") == name
        and isinstance(parts, dict)
        and all(
            isinstance(p, dict)
            and isinstance(p.get("ref"), str)
            and p["ref"].split("#")[0] == P.tensor_name((*path, str(part)), set())
            for part, p in parts.items()
        )
    )


def _misplaced(
    skeleton: object, paths: Mapping[str, tuple[tuple[str, ...], ...]]
) -> list[tuple[str, tuple[str, ...], object, str | None]]:
    """(name, path, the tensor the skeleton puts there, what else it puts there) for each path
    at which the file puts the tensor ``name`` (plain containers from the top) where the
    skeleton puts another tensor, or none: a weight dropped, or replaced by a value or a
    tensor without data (a meta tensor), while loading. Paths inside dict keys are left out
    (the worker returns a tensor key as an opaque value)."""
    if not paths:
        return []
    refs, other = _skeleton_refs(skeleton)
    expected: dict[tuple[str, ...], set[str]] = {}
    for name, where in paths.items():
        for path in where:
            expected.setdefault(path, set()).add(name)
    out: list[tuple[str, tuple[str, ...], object, str | None]] = []
    for name, where in sorted(paths.items()):
        for path in where:
            if "<key>" in path:
                continue
            got = refs.get(path, [])
            # where two keys give one path component (1 and "1"), each may hold its own
            stray = [g for g in got if not any(_fits(g, n, path) for n in expected[path])]
            if stray or not any(_fits(g, name, path) for g in got):
                put = (stray or got or [None])[0]
                put = put.get("name") if isinstance(put, dict) else put
                out.append((name, path, put if isinstance(put, str) else None, other.get(path)))
    return out


def _moved(skeleton: object, paths: Mapping[str, tuple[tuple[str, ...], ...]]) -> list[dict[str, Any]]:
    """The evidence for :func:`_misplaced`: one entry per tensor (its first wrong place)."""
    out: dict[str, dict[str, Any]] = {}
    for name, at, put, instead in _misplaced(skeleton, paths):
        if name not in out:
            out[name] = {"name": name, "path": list(at), "actual_tensor": put}
            if put is None:
                out[name]["actual"] = instead or "nothing"
    return list(out.values())


def _composites(skeleton: object) -> Iterator[dict[str, Any]]:
    """Every composite tensor's node anywhere in ``skeleton`` (any JSON: nothing assumed)."""
    stack: list[object] = [skeleton]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
            if node.get("$") == "composite":
                yield node


def _unquantized(
    skeleton: object,
    kinds: Mapping[str, tuple[str, tuple[int, ...]]],
    quantizers: frozenset[_reconstruct.Quantizer],
) -> list[str]:
    """The names of the quantized tensors in ``skeleton`` (anywhere in it) whose quantizer
    (scale and zero point, or axis) is none the file describes for integer values of their
    dtype and shape."""
    out: list[str] = []
    for node in _composites(skeleton):
        kind, parts, params = node.get("kind"), node.get("parts"), node.get("params")
        if kind not in ("quantized_per_tensor", "quantized_per_channel"):
            continue
        values = parts.get("int_repr") if isinstance(parts, dict) else None
        ref = values.get("ref") if isinstance(values, dict) else None
        if not isinstance(ref, str) or ref not in kinds or not isinstance(params, dict):
            continue  # the host cannot rebuild it
        dtype, shape = kinds[ref]
        if kind == "quantized_per_tensor":
            want: _reconstruct.Quantizer = (kind, dtype, shape, params.get("scale"), params.get("zero_point"))
        else:
            want = (kind, dtype, shape, params.get("axis"))
        literal = all(v is None or isinstance(v, (int, float, str)) for v in want[3:])
        if not literal or want not in quantizers:
            out.append(str(node.get("name")))
    return out


def _unsized(
    skeleton: object,
    kinds: Mapping[str, tuple[str, tuple[int, ...]]],
    sizes: frozenset[_reconstruct.SparseSize],
) -> list[str]:
    """The names of the sparse tensors in ``skeleton`` (anywhere in it) whose size is none the
    file describes for a sparse tensor of their values' dtype: the size is the skeleton's word
    (its parts, verified as tensors, do not fix it)."""
    out: list[str] = []
    for node in _composites(skeleton):
        kind, parts, shape = node.get("kind"), node.get("parts"), node.get("shape")
        if not isinstance(kind, str) or not kind.startswith("sparse_"):
            continue
        values = parts.get("values") if isinstance(parts, dict) else None
        ref = values.get("ref") if isinstance(values, dict) else None
        if not isinstance(ref, str) or ref not in kinds or not isinstance(shape, list):
            continue  # the host cannot rebuild it
        if (
            not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or (
                kinds[ref][0],
                tuple(shape),
            )
            not in sizes
        ):
            out.append(str(node.get("name")))
    return out


def weights(
    path: str,
    manifest: P.Manifest,
    tensors: Mapping[str, torch.Tensor] | None = None,
    scan: _scan.StaticScan | None = None,
    reading: Reading | None = None,
) -> list[Finding]:
    """Compare what the sandbox returned with an independent reading of the file.

    ``scan``: the static stage's complete scan of the same file, when there is one (the file
    is not scanned again); ``reading``: that reading, already under way."""
    got = reading.result() if reading is not None else _reconstruct.read(path, scan)
    if isinstance(got, _reconstruct.NotReconstructed) and scan is not None and scan.format == "joblib":
        got = joblib_inventory(scan)
    if isinstance(got, _reconstruct.Reconstruction):
        with _FileBytes(path, {}) as whole:  # the file's digests at the spans the manifest names
            return list(got.findings) + _reconstruct.compare_digests(
                got,
                _Returned(manifest, tensors, got.tensors, span_digest=whole.digest).actual(),
                _moved(manifest.skeleton, got.paths),
            )
    returned = _Returned(manifest, tensors)
    kinds = returned.kinds
    if not kinds:
        return []  # nothing handed over, nothing to verify
    inv = got
    if isinstance(inv, _reconstruct.NotReconstructed):
        unverified = sorted(kinds)
        reason = f"the file has no independent reading: {inv.reason}"
        found: list[Finding] = []
    else:
        with _FileBytes(path, inv.stored) as file_bytes:
            returned.span_digest = file_bytes.digest

            def same(name: str, ref: _reconstruct.Digest | _reconstruct.Stored) -> bool:
                if kinds[name] != ref[:2]:
                    return False
                if returned.spans.get(name) == ref[2]:
                    return True  # the host read these very bytes from the file, there
                if isinstance(ref[2], str):
                    return returned.digest(name) == ref[2]
                raw = returned.raw(name)
                if raw is None:
                    return file_bytes.digest(ref[2]) == returned.digest(name)
                return file_bytes.equal(ref[2], raw)

            def expected(ref: _reconstruct.Digest | _reconstruct.Stored) -> str:
                return ref[2] if isinstance(ref[2], str) else file_bytes.digest(ref[2])

            def verified(name: str) -> bool:
                """The bytes are a tensor the file stores, or the digest one it describes."""
                dtype, shape = kinds[name]
                if returned.spans.get(name) in inv.stored.get((dtype, shape), ()):
                    return True  # read by the host from the file where it stores this tensor
                raw = returned.raw(name)
                if raw is not None and file_bytes.matches(dtype, shape, raw, lambda: returned.digest(name)):
                    return True
                digest = returned.digest(name)
                if (dtype, shape, digest) in inv.digests:
                    return True
                return (
                    raw is None
                    and digest is not None
                    and file_bytes.matches(dtype, shape, None, lambda: digest)
                )

            # a name both readings give (plain containers from the top) must hold the same tensor
            differ = [
                n
                for n in sorted(kinds)
                if n in inv.named and returned.compared(n) and not same(n, inv.named[n])
            ]
            changed: list[dict[str, Any]] = [
                {
                    "name": n,
                    "expected_sha256": expected(inv.named[n]),
                    "actual_sha256": returned.digest(n),
                    "expected_shape": list(inv.named[n][1]),
                    "actual_shape": list(kinds[n][1]),
                }
                for n in differ
            ]
            unverified = sorted(
                n for n in kinds if returned.compared(n) and n not in differ and not verified(n)
            )
        # ... and the skeleton the host rebuilds the returned structure from must put it there:
        # a skeleton that puts another tensor at its place swaps weights however honest the
        # names and bytes are, and one that puts none there (a value, a meta tensor, a key
        # taken out) leaves the model without it
        for entry in _moved(manifest.skeleton, inv.paths):
            if entry["name"] not in differ:
                differ.append(entry["name"])
                changed.append(entry)
        # a quantized tensor is rebuilt from its integer values (verified above) and the
        # skeleton's parameters, which must be a quantizer the file describes for them
        unverified = sorted({*unverified, *_unquantized(manifest.skeleton, kinds, inv.quantizers)})
        # ... and a sparse tensor from its parts (verified above) and the skeleton's size
        unverified = sorted({*unverified, *_unsized(manifest.skeleton, kinds, inv.sparse_sizes)})
        reason = "not among the tensors the file's records describe: computed or changed while loading"
        found = list(inv.findings)
        if changed:
            found.append(
                Finding(
                    rule="weights-tampered",
                    severity=Severity.HIGH,
                    category="evasion",
                    message=(
                        "the loader returned other weights than the file holds under these "
                        "names: "
                        + ", ".join(differ[:5])
                        + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                    ),
                    evidence={"tensors": changed[:_MAX_NAMED], "count": len(changed), "format": inv.format},
                )
            )
    if unverified:
        found.append(
            Finding(
                rule="weights-unverified",
                severity=Severity.MEDIUM,
                category="integrity",
                message=(
                    f"{len(unverified)} of the {len(kinds)} tensors the loader returned could "
                    f"not be verified against the file ({reason}): "
                    + ", ".join(unverified[:5])
                    + (f" and {len(unverified) - 5} more" if len(unverified) > 5 else "")
                ),
                evidence={
                    "tensors": unverified[:_MAX_NAMED],
                    "count": len(unverified),
                    "returned": len(kinds),
                    "reason": reason,
                    "format": inv.format,
                },
            )
        )
    return found
