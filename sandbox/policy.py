"""Load policies: frozen, typed values with named constructors.

A policy file is TOML and starts with ``name`` and ``description``::

    name = "default"
    description = "..."
    fail_on = "malicious"            # safe_load/convert refuse at or above this verdict;
                                     # "never" returns the (validated) data of any file

    [limits]
    wall_clock_s = 300
    cpu_s = 300                      # CPU time of the loader's whole process tree; default:
                                     # the same as wall_clock_s
    memory_mb = 8192
    pids = 64
    cpus = 1.0
    tmp_mb = 256
    output_mb = 65536                # ceiling; the real cap also scales with the input
    output_ratio = 4.0

    [events]
    fatal = ["exec", "network", "credential", "privilege"]  # refused calls that end the load
    errno = "EPERM"                  # what refused calls return
    allow_read = []                  # extra path prefixes whose reads are expected
    [events.severity]                # per rule id: another severity, or "ignore"
    "network-socket" = "medium"

    [static]
    unknown_globals = "info"         # severity of a pickle global outside the allowlist
    stop_before_sandbox = "malicious"  # safe_load/convert refuse before running at this verdict

Unknown keys are errors (a typo must not silently weaken a limit). Every problem in a file is
reported at once, with its key, by :class:`~sandbox.errors.PolicyError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PolicyError

__all__ = ["EventRules", "Limits", "Policy", "StaticRules"]

_VERDICTS = ("suspicious", "malicious", "never")
_BOUNDS: dict[str, tuple[float, float]] = {
    "wall_clock_s": (1.0, 86400.0),
    "cpu_s": (1.0, 86400.0),
    "memory_mb": (256, 1 << 20),
    "pids": (8, 65536),
    "cpus": (0.1, 1024.0),
    "tmp_mb": (1, 1 << 20),
    "output_mb": (1, 1 << 24),
    "output_ratio": (1.0, 1000.0),
}


@dataclass(frozen=True)
class Limits:
    """What one sandboxed load may use.

    ``wall_clock_s``: seconds from the loader's start to its end; ``cpu_s``: CPU seconds (user
    plus system) of the loader's whole process tree, as the supervisor samples it about every
    100 ms (not set: the same as ``wall_clock_s``, which one CPU cannot exceed, so it changes
    nothing unless configured); ``memory_mb``: the container's memory (and swap) limit;
    ``pids``: processes and threads in the container; ``cpus``: CPU share; ``tmp_mb``: the
    scratch ``/tmp``; ``output_mb`` / ``output_ratio``: the cap on the output directory (see
    :meth:`output_bytes`). Exceeding any of them ends the load with
    :class:`~sandbox.errors.LimitExceeded` naming the limit.
    """

    wall_clock_s: float = 300.0
    cpu_s: float = 0.0  # 0: not set, becomes wall_clock_s
    memory_mb: int = 8192
    pids: int = 64
    cpus: float = 1.0
    tmp_mb: int = 256
    output_mb: int = 65536
    output_ratio: float = 4.0

    def __post_init__(self) -> None:
        if not self.cpu_s:
            object.__setattr__(self, "cpu_s", float(self.wall_clock_s))

    def output_bytes(self, input_size: int) -> int:
        """The byte cap on the output directory for an input of ``input_size`` bytes."""
        scaled = max(256 * 2**20, int(self.output_ratio * input_size) + 64 * 2**20)
        return min(self.output_mb * 2**20, scaled)


@dataclass(frozen=True)
class StaticRules:
    """How the static pre-scan's findings count.

    ``unknown_globals``: the severity of a pickle global outside the allowlist (full-module
    pickles name their own classes, so ``info`` under the default policy, ``medium`` under
    ``strict``). ``stop_before_sandbox``: ``safe_load``/``convert`` refuse without running the
    sandbox when the static verdict reaches this (``never``: always run it; ``scan`` always
    runs it, to collect behaviour evidence)."""

    unknown_globals: str = "info"
    stop_before_sandbox: str = "malicious"


_STATIC_CHOICES = {
    "unknown_globals": ("info", "low", "medium", "high", "critical"),
    "stop_before_sandbox": ("suspicious", "malicious", "never"),
}


_ERRNOS = {"EPERM": 1, "ENOENT": 2, "EACCES": 13, "ENOSYS": 38}
_SEVERITY_CHOICES = ("ignore", "info", "low", "medium", "high", "critical")


@dataclass(frozen=True)
class EventRules:
    """What the loader's filter and the report do with what the kernel shows.

    ``fatal``: categories of refused calls that end the load at the first one (``exec``,
    ``network``, ``credential``, ``privilege``, ``process``, ``file``); the report still says
    what it tried, and the verdict is malicious. ``errno``: what refused calls return.
    ``allow_read``: extra path prefixes whose reads are expected (not recorded).
    ``severity``: per rule id (see docs/rules.md), another severity, or ``ignore`` to keep the
    events but drop the finding."""

    fatal: tuple[str, ...] = ("exec", "network", "credential", "privilege")
    errno: str = "EPERM"
    allow_read: tuple[str, ...] = ()
    severity: tuple[tuple[str, str], ...] = ()

    @property
    def errno_number(self) -> int:
        return _ERRNOS[self.errno]


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    fail_on: str = "malicious"
    limits: Limits = field(default_factory=Limits)
    static: StaticRules = field(default_factory=StaticRules)
    events: EventRules = field(default_factory=EventRules)

    # -- named constructors -------------------------------------------------------------------
    @classmethod
    def default(cls) -> Policy:
        return cls.builtin("default")

    @classmethod
    def strict(cls) -> Policy:
        return cls.builtin("strict")

    @classmethod
    def audit(cls) -> Policy:
        return cls.builtin("audit")

    @classmethod
    def builtin(cls, name: str) -> Policy:
        names = builtin_names()
        if name not in names:
            raise PolicyError(f"no built-in policy {name!r}; built-in: {', '.join(names)}")
        text = _policy_files().joinpath(f"{name}.toml").read_text("utf-8")
        return cls.from_toml(text, source=f"<builtin:{name}>")

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        p = Path(path)
        try:
            text = p.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read policy {p}: {exc}", source=str(p)) from None
        return cls.from_toml(text, source=str(p))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(
                f"{source}: not valid TOML: {exc}", source=source, problems=[str(exc)]
            ) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> Policy:
        problems: list[str] = []
        known = {"name", "description", "fail_on", "limits", "static", "events"}
        problems += [f"unknown key {k!r}" for k in data if k not in known]
        for key in ("name", "description"):
            if not isinstance(data.get(key), str) or not data.get(key, "").strip():
                problems.append(f"{key!r} is required and must be a non-empty string")
        fail_on = data.get("fail_on", "malicious")
        if fail_on not in _VERDICTS:
            problems.append(f"'fail_on' must be one of {list(_VERDICTS)}, not {fail_on!r}")
        raw_limits = data.get("limits", {})
        limits_kwargs: dict[str, Any] = {}
        if not isinstance(raw_limits, dict):
            problems.append("'limits' must be a table")
            raw_limits = {}
        fields = {f.name: f for f in dataclasses.fields(Limits)}
        for key, value in raw_limits.items():
            f = fields.get(key)
            if f is None:
                problems.append(f"unknown key 'limits.{key}'")
                continue
            want = float if f.type in ("float", float) else int
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (want is int and not isinstance(value, int))
            ):
                problems.append(f"'limits.{key}' must be {'a number' if want is float else 'an integer'}")
                continue
            lo, hi = _BOUNDS[key]
            if not lo <= value <= hi:
                problems.append(f"'limits.{key}' = {value} is outside [{lo}, {hi}]")
                continue
            limits_kwargs[key] = want(value)
        raw_static = data.get("static", {})
        static_kwargs: dict[str, str] = {}
        if not isinstance(raw_static, dict):
            problems.append("'static' must be a table")
            raw_static = {}
        for key, value in raw_static.items():
            choices = _STATIC_CHOICES.get(key)
            if choices is None:
                problems.append(f"unknown key 'static.{key}'")
            elif value not in choices:
                problems.append(f"'static.{key}' must be one of {list(choices)}, not {value!r}")
            else:
                static_kwargs[key] = value
        events = _event_rules(data.get("events", {}), problems)
        if problems:
            raise PolicyError(
                f"{source}: invalid policy: " + "; ".join(problems), source=source, problems=problems
            )
        if fail_on == "never":
            warnings.warn(
                f'policy {data["name"]!r} (fail_on = "never") hands back the data of '
                "files judged malicious; isolation is unchanged, but use it for "
                "research, not in production",
                UserWarning,
                stacklevel=3,
            )
        return cls(
            name=data["name"],
            description=data["description"],
            fail_on=fail_on,
            limits=Limits(**limits_kwargs),
            static=StaticRules(**static_kwargs),
            events=events,
        )

    # -- identity -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @property
    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _event_rules(raw: Any, problems: list[str]) -> EventRules:
    if not isinstance(raw, dict):
        problems.append("'events' must be a table")
        return EventRules()
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "fatal":
            from ._worker._protocol import FATAL_CATEGORIES

            if not isinstance(value, list) or not all(v in FATAL_CATEGORIES for v in value):
                problems.append(f"'events.fatal' must be a list of {list(FATAL_CATEGORIES)}")
            else:
                kwargs["fatal"] = tuple(dict.fromkeys(value))
        elif key == "errno":
            if value not in _ERRNOS:
                problems.append(f"'events.errno' must be one of {list(_ERRNOS)}, not {value!r}")
            else:
                kwargs["errno"] = value
        elif key == "allow_read":
            if not isinstance(value, list) or not all(
                isinstance(v, str) and v.startswith("/") and ".." not in v.split("/") for v in value
            ):
                problems.append("'events.allow_read' must be a list of absolute path prefixes without '..'")
            else:
                kwargs["allow_read"] = tuple(value)
        elif key == "severity":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and v in _SEVERITY_CHOICES for k, v in value.items()
            ):
                problems.append(f"'events.severity' maps rule ids to one of {list(_SEVERITY_CHOICES)}")
            else:
                kwargs["severity"] = tuple(sorted(value.items()))
        else:
            problems.append(f"unknown key 'events.{key}'")
    return EventRules(**kwargs)


def _policy_files() -> Any:
    """The built-in policy files: the installed ``sandbox.policies`` package, or, in a source
    checkout run without installing (the static pre-commit hook), its ``policies/`` folder."""
    try:
        return resources.files("sandbox.policies")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / "policies"
        if not (checkout / "default.toml").is_file():
            raise
        return checkout


def builtin_names() -> list[str]:
    files = _policy_files()
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def seccomp_profile() -> str:
    """The container-level seccomp profile (Docker's JSON format), as text."""
    return str(_policy_files().joinpath("seccomp.json").read_text("utf-8"))
