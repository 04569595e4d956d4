"""The load report: verdict, findings with evidence, events and figures.

A :class:`LoadReport` is plain data. It serialises to a versioned JSON document
(:data:`SCHEMA_VERSION`), renders as text for people, and owns the exit code
(0 clean, 1 unsafe, 2 error).
"""

from __future__ import annotations

import enum
import json
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "Finding",
    "LoadReport",
    "Severity",
    "Verdict",
]

SCHEMA_VERSION = "1.0"


class Severity(enum.IntEnum):
    """Ordered: ``Severity.HIGH > Severity.LOW``."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> Severity:
        try:
            return cls[value.upper()]
        except KeyError:
            raise ValueError(f"unknown severity {value!r}; one of {[str(s) for s in cls]}") from None


class Verdict(enum.Enum):
    CLEAN = "clean"
    SUSPICIOUS = "suspicious"
    MALICIOUS = "malicious"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        return {"clean": 0, "suspicious": 1, "malicious": 2, "error": 3}[self.value]


@dataclass(frozen=True)
class Event:
    """One observed action. ``source`` is ``kernel`` (seccomp notification, trustworthy),
    ``gvisor`` (gVisor's trace of the sandbox, read by the host: trustworthy), ``engine``
    (container engine facts) or ``self_reported`` (inside the loader; may be forged)."""

    id: int
    t: float
    source: str
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)
    action: str = "recorded"


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Severity
    category: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    events: tuple[int, ...] = ()


@dataclass
class LoadReport:
    """Everything known about one load of one file."""

    input_path: str
    input_sha256: str | None = None
    input_size: int | None = None
    format: str | None = None
    verdict: Verdict = Verdict.CLEAN
    findings: list[Finding] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    tensors: int = 0
    tensor_bytes: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    static: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, str] = field(default_factory=dict)
    policy: dict[str, str] = field(default_factory=dict)
    duration_s: float | None = None

    # -- judgement ---------------------------------------------------------------------------
    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    @property
    def exit_code(self) -> int:
        if self.verdict is Verdict.ERROR:
            return 2
        return 0 if self.verdict is Verdict.CLEAN else 1

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = f"model-sandbox/load-report/{SCHEMA_VERSION}"
        data["verdict"] = self.verdict.value
        data["findings"] = [
            {**asdict(f), "severity": str(f.severity), "events": list(f.events)} for f in self.findings
        ]
        return data

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, allow_nan=False, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        schema = data.get("schema", "")
        if not isinstance(schema, str) or not schema.startswith("model-sandbox/load-report/1."):
            raise ValueError(f"not a model-sandbox load report (schema {schema!r})")
        fields = {k: v for k, v in data.items() if k != "schema"}
        fields["verdict"] = Verdict(fields.get("verdict", "error"))
        fields["findings"] = [
            Finding(
                rule=f["rule"],
                severity=Severity.parse(f["severity"]),
                category=f["category"],
                message=f["message"],
                evidence=dict(f.get("evidence", {})),
                events=tuple(f.get("events", ())),
            )
            for f in fields.get("findings", [])
        ]
        fields["events"] = [Event(**e) for e in fields.get("events", [])]
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> LoadReport:
        return cls.from_dict(json.loads(text))

    # -- rendering ---------------------------------------------------------------------------
    def facts(self, escape: Callable[[str, int], str], sha256: Callable[[str], str]) -> list[str]:
        """The facts every rendering opens with (format, size, the input's sha256, tensors,
        duration), with ``escape`` making the file's strings safe for the medium and
        ``sha256`` rendering the digest."""
        facts = []
        if self.format:
            facts.append(f"format {escape(self.format, 60)}")
        if self.input_size is not None:
            facts.append(f"{self.input_size:,} bytes")
        if self.input_sha256:
            facts.append(f"sha256 {sha256(self.input_sha256)}")
        if self.tensors:
            facts.append(f"{self.tensors:,} tensors, {self.tensor_bytes:,} bytes")
        if self.duration_s is not None:
            facts.append(f"{self.duration_s:.2f} s")
        return facts

    def to_text(self) -> str:
        """Readable text. Every string that came from the file or the sandbox is escaped
        (:func:`clean_text`): a file name or a global cannot move the cursor, clear the screen
        or draw a fake verdict."""
        c = clean_text
        lines = [f"{c(self.input_path, 500)}: {self.verdict.value.upper()}"]
        facts = self.facts(c, lambda sha: f"{c(sha[:16])}…")
        if self.tool.get("runner"):
            runtime = self.tool.get("runtime")
            facts.append(
                f"runner {c(str(self.tool['runner']), 20)}"
                + (f" ({c(str(runtime), 20)})" if runtime and runtime != "runc" else "")
            )
        if facts:
            lines.append("  " + ", ".join(facts))
        if self.error:
            lines.append(
                f"  error[{c(str(self.error.get('reference', '?')), 60)}]: "
                f"{c(str(self.error.get('message', '')), 2000)}"
            )
        for f in sorted(self.findings, key=lambda f: -f.severity):
            lines.append(f"  [{str(f.severity).upper():8}] {c(f.category, 40)}: {c(f.message, 1000)}")
            for key, value in f.evidence.items():
                lines.append(f"             {c(str(key), 60)}: {_short(value)}")
        for note in self.notes:
            lines.append(f"  note: {c(note, 1000)}")
        for name, path in self.outputs.items():
            lines.append(f"  wrote {c(name, 60)}: {c(str(path), 500)}")
        return "\n".join(lines)


def clean_text(text: str, limit: int = 300) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences, carriage
    returns, backspaces, bidirectional overrides) shown as ``\\x1b``-style escapes, at most
    ``limit`` characters. JSON and SARIF keep the exact value; only text output is escaped."""
    out = []
    for ch in text[: limit * 2]:
        if ch.isprintable() and unicodedata.category(ch) not in ("Cf", "Zl", "Zp"):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    joined = "".join(out)
    return joined if len(joined) <= limit else joined[: limit - 1] + "…"


def size_text(n: float) -> str:
    """``n`` bytes for people: whole bytes below 1 KiB, else KiB, MiB or GiB (the largest unit,
    however large ``n``) with one decimal."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return clean_text(text, limit)
