"""Stage 3, host half: the supervisor's event log -> report events and findings.

The events (JSON lines the supervisor streamed over the channel while the load ran) and the
``monitor``/``canaries`` parts of its status never passed through a place the loader can write,
but they are still parsed as untrusted data: at most
:data:`~sandbox._worker._protocol.MAX_EVENTS_BYTES` (the channel enforces it as it reads), a
bounded number of lines, each a JSON object whose fields are checked one by one; strings are cut
and made printable (a path or an argv may carry terminal escapes). Nothing here evaluates
anything.

Findings rest on ``kernel`` events (seccomp notifications the supervisor decoded) and, under
gVisor, ``gvisor`` events (the sentry's trace, read by the host: :mod:`._gvisor`);
``self_reported`` events (the loader's audit hook, which the payload can forge or silence) are
kept as context. Each finding names the events that support it.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._rules import finding
from ._worker import _protocol as P
from .report import Event, Finding, Severity

if TYPE_CHECKING:
    from ._gvisor import Trace

__all__ = ["PATH_CALLS", "PATH_OPS", "Monitoring", "analyse", "parse_events", "read"]

EVIDENCE_SOURCES = frozenset({"kernel", "gvisor"})  # what findings rest on

_MAX_LINES = P.MAX_KERNEL_EVENTS + P.MAX_SELF_REPORTED_EVENTS + 16
_MAX_EVENT_IDS = 50

_PRIVILEGE = frozenset(
    {
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "keyctl",
        "add_key",
        "request_key",
        "setuid",
        "setgid",
        "setreuid",
        "setregid",
        "setgroups",
        "setresuid",
        "setresgid",
        "setfsuid",
        "setfsgid",
        "seccomp",
        "prctl",
        "pidfd_send_signal",
        "foreign_abi",
    }
)
_OTHER_PROCESS = frozenset(
    {
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_open",
        "pidfd_getfd",
        "prlimit64",
        "sched_setparam",
        "sched_setscheduler",
        "sched_setaffinity",
        "sched_setattr",
        "setpriority",
        "ioprio_set",
        "kill",
        "tgkill",
        "tkill",
        "rt_sigqueueinfo",
        "rt_tgsigqueueinfo",
    }
)
_CODE = frozenset({"memfd_create", "mprotect", "pkey_mprotect", "mmap"})
_SEND = frozenset({"connect", "sendto", "sendmsg", "sendmmsg"})
_OPEN = frozenset({"open", "openat", "openat2", "creat"})
#: system calls that create, rename, link, remove or re-permission a path (gVisor traces these)
PATH_CALLS = tuple(
    "unlink unlinkat rename renameat renameat2 link linkat symlink symlinkat chmod fchmodat fchmodat2".split()
)
#: ...and those that empty, create or remove one, or change its owner or times, without an open
PATH_OPS = frozenset(PATH_CALLS + P.PATH_CHANGES)
#: ...and the loader's filter's calls on a descriptor's file or on extended attributes (judged
#: like the path calls; gVisor's trace does not list them)
_FILE_CHANGES = PATH_OPS | frozenset(P.METADATA_CHANGES)


@dataclass
class Monitoring:
    events: list[Event] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


# -- parsing -----------------------------------------------------------------------------------

_printable = P.printable


def _event(obj: Any) -> Event | None:
    line = P.EventLine.from_obj(obj)
    if line is None:
        return None
    return Event(
        id=line.id, t=line.t, source=line.source, kind=line.kind, detail=line.detail, action=line.action
    )


def _lines(data: bytes | bytearray, end: int, limit: int) -> Iterator[bytes | bytearray]:
    """The first ``limit`` newline-separated pieces of ``data[:end]``, cut one at a time:
    splitting the whole stream first made an object of every piece (16 MiB of ``ab\n``: 5.6
    million of them, half a gigabyte) to keep the first few thousand."""
    start = 0
    while start < end and limit > 0:
        nl = data.find(b"\n", start, end)
        stop = end if nl < 0 else nl
        yield data[start:stop]
        start, limit = stop + 1, limit - 1


def parse_events(data: bytes | bytearray) -> tuple[list[Event], int]:
    """Events from the bytes of ``events.jsonl``. Returns (events, rejected lines)."""
    events: list[Event] = []
    rejected = 0
    seen: set[int] = set()

    def no_constants(name: str) -> None:
        raise ValueError(name)

    for raw in _lines(data, min(len(data), P.MAX_EVENTS_BYTES), _MAX_LINES):
        if not raw.strip():
            continue
        if len(raw) > P.MAX_EVENT_LINE:
            rejected += 1
            continue
        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
        except (ValueError, RecursionError):
            rejected += 1
            continue
        ev = _event(obj)
        if ev is None or ev.id in seen:
            rejected += 1
            continue
        seen.add(ev.id)
        events.append(ev)
    return events, rejected


# -- judging -------------------------------------------------------------------------------------


def describe(ev: Event) -> str:
    """One line for an event: ``connect AF_INET 127.0.0.1:4444 — denied``."""
    d = ev.detail
    if ev.source == "gvisor" and ev.action == "denied" and "refused_by" in d:
        return _printable(
            f"{ev.kind} (refused by the loader's filter; gVisor traces no "
            f"arguments of a refused call) — {ev.action}",
            300,
        )
    if ev.kind in ("execve", "execveat"):
        argv: list[Any] = d["argv"] if isinstance(d.get("argv"), list) else []
        what = " ".join(str(a) for a in argv[:16]) or str(d.get("path", ""))
        what = f"{d.get('path', '')} [{what}]"
    elif "target" in d and not isinstance(d.get("target"), int):
        what = str(d["target"])
    elif "path" in d:
        what = f"{d['path']} {d.get('flags', '')}".strip()
    elif "paths" in d:
        what = " -> ".join(str(p) for p in d["paths"]) if isinstance(d["paths"], list) else ""
    elif ev.kind == "socket":
        what = f"{d.get('family', '?')} {d.get('type', '')}".strip()
    else:
        what = ", ".join(f"{k}={v}" for k, v in list(d.items())[:4])
    return _printable(f"{ev.kind} {what} — {ev.action}", 300)


class _Findings:
    """Groups events into findings: one per (rule, what), listing the supporting event ids."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], tuple[Finding, list[int], int]] = {}

    def add(
        self,
        ev: Event,
        rule: str,
        category: str,
        message: str,
        evidence: dict[str, Any] | None = None,
        *,
        key: str = "",
        severity: Severity | None = None,
    ) -> None:
        """A finding of ``rule`` for ``ev`` (its severity the table's unless given), or one
        more event for the finding already made for the same rule and ``key``."""
        k = (rule, key)
        if k in self.groups:
            f, ids, n = self.groups[k]
            if len(ids) < _MAX_EVENT_IDS:
                ids.append(ev.id)
            self.groups[k] = (f, ids, n + 1)
            return
        kept = {k2: v for k2, v in (evidence or {}).items() if v is not None}
        f = finding(rule, category, message, {"event": describe(ev), **kept}, severity)
        self.groups[k] = (f, [ev.id], 1)

    def add_plain(self, finding: Finding) -> None:
        self.groups[(finding.rule, str(len(self.groups)))] = (finding, [], 0)

    def result(self) -> list[Finding]:
        out = []
        for f, ids, n in self.groups.values():
            evidence = dict(f.evidence)
            if n > 1:
                evidence["occurrences"] = n
            out.append(dataclasses.replace(f, evidence=evidence, events=tuple(ids)))
        return out


def _judge(
    ev: Event,
    canaries: dict[str, str],
    canary_files: set[str],
    out: _Findings,
    context: dict[str, Any] | None = None,
) -> None:
    """``context``: for a refused call gVisor saw without its arguments, what the audit hook
    said just before (self-reported: it names where the arguments came from)."""
    d, kind, action = ev.detail, ev.kind, ev.action
    ctx = {"arguments": context} if context else {}
    found = (
        set(x for x in d.get("canaries", []) if isinstance(x, str))
        if isinstance(d.get("canaries"), list)
        else set()
    )
    text = json.dumps(d)
    found |= {name for name, value in canaries.items() if value in text}
    if found:
        out.add(
            ev,
            "canary-exfiltration",
            "credential",
            "exfiltration attempt: a planted credential appeared in a system call's arguments",
            {"canaries": sorted(found)[:10]},
            key=kind,
        )
    if kind in ("execve", "execveat"):
        out.add(
            ev,
            "exec-attempt",
            "exec",
            "the load tried to run a program",
            {"path": d.get("path"), "argv": d.get("argv"), **ctx},
            key=str(d.get("path")),
        )
    elif kind in ("fork", "vfork", "clone"):
        if d.get("style") == "fork" or action == "denied":
            out.add(ev, "process-creation", "process", "the load tried to start another process (refused)")
        else:
            out.add(ev, "process-spawn", "process", "the load started a child process to run a program")
    elif kind in _SEND or kind in ("bind", "listen", "accept", "accept4"):
        fam = d.get("family")
        target = d.get("target")
        if kind in _SEND and (
            fam in ("AF_INET", "AF_INET6") or (ev.source == "gvisor" and action == "denied")
        ):
            # under gVisor a refused call's arguments are not in the trace: its address is
            # unknown to the evidence (the audit hook's, if any, is in "arguments")
            out.add(
                ev,
                "network-connect",
                "network",
                "the load tried to reach a network address",
                {"address": d.get("address"), "port": d.get("port"), **ctx},
                key=f"{kind} {target}",
            )
        else:
            out.add(
                ev,
                f"network-{kind}",
                "network",
                f"the load tried to use a socket ({kind})",
                key=str(target),
            )
    elif kind in ("socket", "socketpair"):
        out.add(ev, "network-socket", "network", "the load created a socket", key=f"{d.get('family')}")
    elif kind == "inotify" and ev.source == "kernel":
        # the kernel's own record (an inotify watch the supervisor alone holds): whatever path
        # the call named, and whatever the monitor read of it, this file was used
        path = str(d.get("path", ""))
        if path in canary_files or d.get("class") == "canary":
            out.add(
                ev,
                "canary-file-read",
                "credential",
                "the load opened a planted credential file",
                {"path": path, "seen_by": "inotify", "event": str(d.get("event", ""))[:16]},
                key=path,
            )
    elif kind in _OPEN:
        path, cls = str(d.get("path", "")), d.get("class")
        if cls in ("canary", "canary_home") or path in canary_files:
            out.add(
                ev,
                "canary-file-read",
                "credential",
                "the load opened a planted credential file",
                {"path": path},
                key=path,
            )
        elif d.get("write") and (action == "denied" or cls == "outside"):
            out.add(
                ev,
                "file-write-outside",
                "file",
                "the load tried to write outside the sandbox's scratch space",
                {"path": path, "flags": d.get("flags")},
                key=path,
            )
        elif d.get("write") and cls == "scratch":
            out.add(
                ev,
                "file-write",
                "file",
                "the load created or wrote a file (in the sandbox's scratch space; a plain "
                "torch.load would write it on your machine)",
                {"path": path, "flags": d.get("flags")},
                key=path,
            )
        elif cls == "sensitive":
            out.add(
                ev,
                "sensitive-file-read",
                "file",
                "the load opened a sensitive path",
                {"path": path},
                key=path,
            )
        elif cls == "probe":
            out.add(
                ev,
                "environment-probe",
                "evasion",
                "the load looked for signs of a container or a sandbox (a payload that "
                "stays quiet where it is watched)",
                {"path": path},
                key=path,
            )
    elif kind in _FILE_CHANGES:
        if (
            action != "denied"
            and d.get("class") == "scratch"
            and kind not in ("symlink", "symlinkat", "link", "linkat")
        ):
            out.add(
                ev,
                "file-write",
                "file",
                f"the load changed files ({kind}) in the sandbox's scratch space",
                {"paths": d.get("paths")},
                key=str(d.get("paths")),
            )
        elif action == "denied" or d.get("class") == "outside":
            out.add(
                ev,
                "file-change-outside",
                "file",
                "the load tried to change files outside its output and scratch directories",
                {"paths": d.get("paths")},
                key=kind,
            )
        elif kind in ("symlink", "symlinkat", "link", "linkat"):
            out.add(
                ev,
                "file-link",
                "file",
                "the load created a link",
                {"paths": d.get("paths"), "target": d.get("target")},
                key=str(d.get("paths")),
            )
    elif kind in _OTHER_PROCESS:
        if d.get("supervisor"):
            out.add(
                ev,
                "attack-supervisor",
                "privilege",
                "the load tried to signal, trace or read the sandbox supervisor",
                key=kind,
            )
        elif action == "denied":
            out.add(ev, "other-process", "privilege", "the load tried to act on another process", key=kind)
    elif kind == "seccomp_kill":
        out.add(
            ev,
            "privileged-call",
            "privilege",
            "the kernel killed the loader for a system call no load makes (io_uring, userfaultfd, "
            "a new namespace, chroot, mknod, fchmodat2, setxattrat)",
            key=kind,
        )
    elif kind in _PRIVILEGE:
        out.add(
            ev,
            "privileged-call",
            "privilege",
            f"the load made a privileged or kernel-surface system call ({kind})",
            key=kind,
        )
    elif kind in _CODE:
        out.add(
            ev,
            "executable-memory",
            "code",
            "the load created executable memory or an in-memory file",
            key=kind,
        )
    elif kind == "decode_error":
        out.add(
            ev, "monitor-decode-error", "monitor", "the supervisor could not decode a system call (refused)"
        )


# What the loader's audit hook reports, by event: (rule, severity, category, message). The hook
# writes each event to the supervisor's pipe *before* the audited action runs, so the first one
# a payload triggers left the loader before the payload's next line; later ones could be forged
# (they say so in their evidence). Kernel evidence stays primary: these close the gap where a
# payload runs Python without a refused system call.
_SELF_EVIDENCE: dict[str, tuple[str, Severity, str, str]] = {
    "compile": (
        "code-execution",
        Severity.HIGH,
        "code",
        "the load compiled Python source (code execution while deserialising)",
    ),
    "exec": (
        "code-execution",
        Severity.HIGH,
        "code",
        "the load executed a code object that is not part of an installed module",
    ),
    **dict.fromkeys(
        "os.system subprocess.Popen os.exec os.posix_spawn os.spawn pty.spawn os.fork os.forkpty".split(),
        ("process-attempt", Severity.HIGH, "exec", "the load asked Python to run a program"),
    ),
    **dict.fromkeys(
        "socket.connect socket.bind socket.sendto socket.getaddrinfo socket.gethostbyname urllib.Request "
        "http.client.connect ftplib.connect smtplib.connect webbrowser.open".split(),
        ("network-attempt", Severity.HIGH, "network", "the load asked Python for the network"),
    ),
    **dict.fromkeys(
        ("ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.string_at"),
        ("native-code", Severity.HIGH, "code", "the load reached native code through ctypes"),
    ),
    **dict.fromkeys(
        ("sys.addaudithook", "sys.setprofile", "sys.settrace"),
        (
            "monitor-tamper",
            Severity.HIGH,
            "monitor",
            "the load tried to install or replace Python's tracing or audit hooks",
        ),
    ),
    **dict.fromkeys(
        ("os.remove", "os.rename", "os.chmod", "shutil.rmtree"),
        ("file-write", Severity.MEDIUM, "file", "the load asked Python to change files"),
    ),
}


def _judge_self(ev: Event, out: _Findings, code_ran: bool) -> bool:
    """A finding for a self-reported event that shows code running; True when it is HIGH."""
    d, kind = ev.detail, ev.kind
    rule = _SELF_EVIDENCE.get(kind)
    if rule is None and kind == "open" and any(c in str(d.get("mode", "")) for c in "wax+"):
        rule = ("file-write", Severity.MEDIUM, "file", "the load opened a file for writing")
    if rule is None:
        return False
    name, severity, category, message = rule
    target = str(d.get("path") or d.get("args") or "").lstrip("[\"' ")
    if name == "file-write" and (target.startswith(P.LOADER_SCRATCH) or not target.startswith("/")):
        # torch's own extraction of a legacy tar, or a path relative to a directory
        # descriptor: the kernel's events, with the path resolved, judge those
        return False
    evidence: dict[str, Any] = {"source": "self_reported"}
    for key in ("source", "object", "path", "executable", "address", "args", "caller"):
        if key in d:
            evidence["code" if key == "source" else key] = _printable(str(d[key]), 300)
    if code_ran:
        evidence["possibly_forged"] = True  # after code already ran, the loader may write anything
    out.add(
        ev,
        name,
        category,
        message,
        evidence,
        key=f"{kind}:{evidence.get('code') or evidence.get('object') or evidence.get('path')}",
        severity=severity,
    )
    return severity >= Severity.HIGH


def _truncation(say: str, counts: dict[str, int], **more: Any) -> tuple[str, Finding]:
    """The note and the finding for a log that kept fewer events than there were: ``counts``
    (exact, by ``source:kind:action`` or ``kind:action``) stand in for what it lost."""
    note = say + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())[:40])
    evidence = {"counts": dict(sorted(counts.items())[:100]), **more}
    return note, finding("event-log-truncated", "monitor", "more events than the log keeps", evidence)


def _refusals_not_logged(denied: dict[str, int], logged: list[Event]) -> Finding | None:
    """Refused calls the log had no room for still weigh: ``denied`` holds the exact counts
    by kind, ``logged`` the refused events the log kept."""
    kept: dict[str, int] = {}
    for ev in logged:
        kept[ev.kind] = kept.get(ev.kind, 0) + 1
    missing = {k: n - kept.get(k, 0) for k, n in denied.items() if n > kept.get(k, 0)}
    if not missing:
        return None
    categories = {P.event_category(kind, {}) for kind in missing}
    return finding(
        "refusals-not-logged",
        "monitor",
        "the load made refused calls beyond what the event log keeps: "
        + ", ".join(f"{n} {k}" for k, n in sorted(missing.items())[:8]),
        {"refused": dict(sorted(missing.items())[:50]), "categories": sorted(categories)},
        severity=Severity.CRITICAL if categories & {"exec", "network"} else Severity.HIGH,
    )


_RAISED = {Severity.LOW: Severity.MEDIUM, Severity.MEDIUM: Severity.HIGH}


def _after_probe(findings: list[Finding]) -> list[Finding]:
    """A load that looked for signs of a sandbox first and then acted: what it did after the
    first probe is one level more severe (LOW to MEDIUM, MEDIUM to HIGH), since a payload that
    checks where it runs is one that would do more where nobody watches. The probe alone stays
    LOW."""
    probes = [min(f.events) for f in findings if f.rule == "environment-probe" and f.events]
    if not probes:
        return findings
    first = min(probes)
    out = []
    for f in findings:
        if f.rule != "environment-probe" and f.events and min(f.events) > first and f.severity in _RAISED:
            f = dataclasses.replace(
                f,
                severity=_RAISED[f.severity],
                message=f.message + " (after the load probed for a sandbox)",
                evidence={**f.evidence, "after_probe_event": first},
            )
        out.append(f)
    return out


_CONTEXT_OF = {  # a refused call gVisor saw -> the audit events that name its arguments
    **{
        k: ("socket.connect", "socket.sendto", "socket.bind", "http.client.connect", "urllib.Request")
        for k in ("connect", "sendto", "sendmsg", "sendmmsg", "bind")
    },
    **{
        k: ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn")
        for k in ("execve", "execveat")
    },
}


_CONTEXT_KINDS = frozenset(k for kinds in _CONTEXT_OF.values() for k in kinds)


def _context(ev: Event, said: list[Event]) -> dict[str, Any] | None:
    """For a refused ``gvisor`` event: the self-reported event nearest in time (within 2 s)
    that names its arguments (the audit hook writes before the call; the two clocks start a
    few milliseconds apart, so order alone cannot pair them)."""
    if ev.source != "gvisor" or ev.action != "denied":
        return None
    kinds = _CONTEXT_OF.get(ev.kind, ())
    near = [e for e in said if e.kind in kinds and abs(e.t - ev.t) <= 2.0]
    if not near:
        return None
    best = min(near, key=lambda e: abs(e.t - ev.t))
    detail = {k: _printable(str(v), 300) for k, v in list(best.detail.items())[:6]}
    return {"source": "self_reported", "event": best.id, "kind": best.kind, **detail}


def analyse(events: list[Event], status: P.Status | None) -> Monitoring:
    """Findings for parsed events plus the supervisor's counts."""
    status = status or P.Status()
    mon = Monitoring(events=events)
    canaries, files = dict(status.canaries), status.canary_files
    mon.counts = {_printable(k, 160): v for k, v in status.counts}
    truncated = status.truncated
    out = _Findings()
    code_ran = False  # a HIGH self-reported event was seen: later ones may be forged
    said = [e for e in events if e.source == "self_reported" and e.kind in _CONTEXT_KINDS]
    for ev in events:
        if ev.source in EVIDENCE_SOURCES:
            _judge(ev, canaries, set(files), out, _context(ev, said))
        elif ev.source == "self_reported":
            code_ran = _judge_self(ev, out, code_ran) or code_ran
    mon.findings = _after_probe(out.result())
    if truncated:
        denied = {}
        for key, count in mon.counts.items():
            source, _, rest = key.partition(":")
            kind, _, action = rest.rpartition(":")
            if source == "kernel" and action == "denied":
                denied[kind] = count
        refused = [e for e in events if e.source == "kernel" and e.action == "denied"]
        unlogged = _refusals_not_logged(denied, refused)
        if unlogged is not None:
            mon.findings.append(unlogged)
        note, lost = _truncation("the event log was truncated; per-call counts are exact: ", mon.counts)
        mon.notes.append(note)
        mon.findings.append(lost)
    if (
        status.result is not None
        and not status.kernel_monitor
        and not any(e.source == "gvisor" for e in events)
    ):
        mon.notes.append("kernel monitoring was not active for this load")
    return mon


_SEARCH_CHUNK = 128 << 10


def _found(m: mmap.mmap, needles: dict[str, bytes]) -> list[str]:
    """The names of the ``needles`` that occur in ``m``, in one pass: every needle is sought
    in each chunk (overlapping by the longest needle) while it is in the cache, instead of a
    pass over the whole of ``m`` per needle (about four times faster on tensor bytes)."""
    overlap = max(map(len, needles.values())) - 1
    left = dict(needles)
    for start in range(0, len(m), _SEARCH_CHUNK):
        end = start + _SEARCH_CHUNK + overlap
        for name in [k for k, v in left.items() if m.find(v, start, end) >= 0]:
            del left[name]
        if not left:
            break
    return sorted(needles.keys() - left.keys())


def _scan_outputs(outputs: dict[str, int], canaries: dict[str, str]) -> list[Finding]:
    """A planted credential inside what the loader wrote (the manifest and tensor memfds), all
    of it, whatever its size (held to the output cap): a payload that pads its output does not
    hide a credential past a bound. Tensors a full load leaves as the input's own bytes never
    cross (see ``_worker._spans``), so a load searches only what it made or changed (about
    0.8 s per GB here where it made a whole gigabyte: a legacy or pickle-only format)."""
    if not canaries:
        return []
    needles = {k: v.encode() for k, v in canaries.items()}
    findings = []
    for name, fd in sorted(outputs.items()):
        try:
            if os.fstat(fd).st_size == 0:
                continue
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
                hits = _found(m, needles)
        except (OSError, ValueError):
            hits = []
        if hits:
            findings.append(
                finding(
                    "canary-exfiltration",
                    "credential",
                    "exfiltration attempt: a planted credential was written to the output",
                    {"file": name, "canaries": hits[:10]},
                )
            )
    return findings


def read(
    events: bytes | bytearray,
    status: P.Status | None,
    outputs: dict[str, int],
    dropped: int = 0,
    *,
    trace: Trace | None = None,
    allow_read: tuple[str, ...] = (),
) -> Monitoring:
    """Everything monitoring found for one load: the streamed events, the status, and a search
    of the outputs for planted credentials. ``trace``: under gVisor, the sentry's trace of the
    sandbox (its events join the supervisor's in time order, numbered afresh)."""
    parsed: list[Event] = []
    rejected = 0
    if events:
        parsed, rejected = parse_events(events)
    trace_findings: list[Finding] = []
    trace_notes: list[str] = []
    if trace is not None:
        parsed, trace_findings, trace_notes = _with_trace(parsed, trace, status, allow_read)
    mon = analyse(parsed, status)
    mon.findings += trace_findings
    mon.notes += trace_notes
    if dropped:
        mon.notes.append(f"{dropped} events past the {P.MAX_EVENTS_BYTES} byte cap were dropped")
    if rejected:
        mon.notes.append(f"{rejected} malformed event lines were ignored")
    mon.findings += _scan_outputs(outputs, dict(status.canaries) if status else {})
    return mon


def _with_trace(
    events: list[Event], trace: Trace, status: P.Status | None, allow_read: tuple[str, ...]
) -> tuple[list[Event], list[Finding], list[str]]:
    """The supervisor's events and gVisor's, in time order and numbered afresh; findings about
    the trace itself (missing, broken lines, flooded, truncated)."""
    from ._gvisor import MAX_LOG_BYTES, to_events

    files = frozenset(status.canary_files) if status is not None else frozenset()
    mine = to_events(trace, canary_files=files, allow_read=allow_read)
    merged = sorted(events + mine, key=lambda e: (e.t, e.source != "self_reported", e.id))
    events = [
        Event(id=i, t=e.t, source=e.source, kind=e.kind, detail=e.detail, action=e.action)
        for i, e in enumerate(merged, 1)
    ]
    findings: list[Finding] = []
    notes = [
        f"kernel-level evidence: gVisor's trace of the sandbox (runsc --strace, read by "
        f"the host): {len(mine)} events from {trace.bytes_read:,} bytes"
    ]
    loaded = status is not None and status.result is not None
    if loaded and not (trace.found and trace.started):
        why = "was not found" if not trace.found else "never showed the loader's filter going in"
        findings.append(
            finding(
                "monitor-lost",
                "evasion",
                f"the monitor was lost: gVisor's trace of this sandbox {why}; evidence may be missing",
                {"trace": trace.path or "none", "found": trace.found, "started": trace.started},
            )
        )
    if trace.anomalies:
        findings.append(
            finding(
                "trace-anomaly",
                "evasion",
                "gVisor's trace of the load holds lines that do not read as whole system "
                "calls (a line break in a path or a thread name): a call may be hidden",
                {"lines": trace.anomalies[:10], "count": trace.counts.get("anomaly", 0)},
            )
        )
    if trace.flooded:
        findings.append(
            finding(
                "trace-flood",
                "evasion",
                f"the load made so many traced calls that gVisor's trace outgrew "
                f"{MAX_LOG_BYTES // 2**20} MiB; the sandbox was stopped",
                {"limit_bytes": MAX_LOG_BYTES},
            )
        )
    if trace.dropped or trace.truncated:
        note, lost = _truncation(
            "gVisor's trace held more than the report keeps; exact counts: ",
            trace.counts,
            read_bytes=trace.bytes_read,
            truncated=trace.truncated,
        )
        notes.append(note)
        findings.append(lost)
        denied = {k.rpartition(":")[0]: v for k, v in trace.counts.items() if k.endswith(":denied")}
        unlogged = _refusals_not_logged(denied, [e for e in mine if e.action == "denied"])
        if unlogged is not None:
            findings.append(unlogged)
    return events, findings, notes
