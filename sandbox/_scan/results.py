"""What the static scan reports: the public records of one scan (static stage, host side)."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.report import Finding, Severity


@dataclass(frozen=True)
class GlobalRef:
    """One global a pickle stream would import.

    ``module``/``name`` are what the unpickler would resolve (Python-2 names already mapped
    through ``_compat_pickle`` when the stream's protocol is below 3, as ``pickle`` does);
    ``<unresolved>`` when a STACK_GLOBAL operand or an EXT code cannot be resolved statically.
    ``member`` names the stream, ``opcode`` the opcode that imported it (GLOBAL, STACK_GLOBAL,
    INST, EXT1/EXT2/EXT4), ``offset`` its position in that stream. ``called`` is true when a
    REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, INST or OBJ applied it directly (best effort: a global
    passed as an argument to another callable is not marked).
    """

    module: str
    name: str
    member: str
    opcode: str
    offset: int
    classification: str
    called: bool

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class StorageRecord:
    """One tensor storage named by a ``persistent_load`` record.

    ``key`` is the record key (``archive/data/<key>`` in a torch zip, the storage key of a
    legacy file), ``dtype`` comes from the storage type (``FloatStorage`` -> ``float32``;
    ``UntypedStorage`` -> ``uint8`` with ``numel`` counted in bytes), ``numel`` is the element
    count the record claims and ``location`` its device tag (``cpu``, ``cuda:0``).
    """

    key: str
    dtype: str
    numel: int
    location: str
    member: str


@dataclass(frozen=True)
class ScanRecords:
    """What a static walk records, of one stream (:class:`PickleScan`) or of a whole file
    (:class:`StaticScan`): the pickle streams walked, the globals they import, the tensor
    storages they name and the findings."""

    pickles: tuple[str, ...]
    globals: tuple[GlobalRef, ...]
    storages: tuple[StorageRecord, ...]
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class PickleScan(ScanRecords):
    """What :func:`scan_pickle_bytes` found in one stream (and the pickles nested in it)."""

    member: str
    protocol: int
    end: int  # offset just past the STOP opcode


@dataclass(frozen=True)
class JoblibArray:
    """One numeric array joblib wrote inline after its wrapper: how the wrapper describes it
    and the sha256 of its raw bytes (``fortran``: column-major)."""

    code: str
    byteorder: str
    shape: tuple[int, ...]
    fortran: bool
    sha256: str


@dataclass(frozen=True)
class StaticScan(ScanRecords):
    """Everything the static scan of one file found. See the module docstring."""

    format: str
    protocol_max: int | None
    torch_would_load: str | None
    joblib_arrays: tuple[JoblibArray, ...] = ()  # the inline arrays of a joblib file

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)
