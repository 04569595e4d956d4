"""Stage 3, host: gVisor's own trace of a sandbox's system calls -> kernel-level evidence.

Under gVisor (``--runtime runsc``) the payload's system calls never reach the host kernel: the
*sentry*, gVisor's kernel in user space, serves them. Seccomp user notification does not exist
there (``seccomp(SECCOMP_GET_NOTIF_SIZES)`` fails with ``EINVAL``), so the loader installs a
plain filter that refuses in the kernel what the supervisor would refuse
(:func:`sandbox._worker._seccomp.build_plain_filter`), and the evidence comes from the sentry
itself: the engine's runtime ``model-sandbox-runsc`` runs every sandbox with ``--strace``
(narrowed to the calls below) and ``--debug``, logged with ``--debug-log`` into a directory of the
host that no container mounts. The host finds its container's log by the container id the
sentry writes into its first line, reads it (bounded) and turns its lines into ``gvisor`` events:

* ``X`` lines (a traced call returned): opens with their path, flags and result; sockets;
  process creation (``clone``/``vfork``); path operations (unlink, rename, link, chmod...);
* ``Syscall N: denied by seccomp`` (debug) lines: a call the loader's filter refused. gVisor
  logs these *before* its tracer sees the call, so they carry the call's number and thread but
  not its arguments (an address, an argv): those come only from the audit hook
  (``self_reported``), which the report keeps apart.

Monitoring starts at the loader's own ``seccomp(SECCOMP_SET_MODE_FILTER)`` (no code of the file
can run before it); lines of thread group 1 (the supervisor) are not the load's. While the load
runs, :class:`Watch` follows the log: a log past :data:`MAX_LOG_BYTES` stops the sandbox, and the
first refusal of a category the policy calls fatal makes the host send the supervisor a STOP
frame (under runc the supervisor sees refusals itself and ends the load at once).

The log is written by the sentry, not by the payload, but the payload chooses much of what is in
it (paths, thread names), so it is read as untrusted data: bounded in bytes, lines and events;
each line parsed on its own with anchored patterns (nothing is evaluated); strings made
printable. A path or a thread name with a line break splits a trace line: the broken line no
longer parses and is reported (``trace-anomaly``, HIGH), so a payload can add lines to the log but
cannot make one of its calls disappear without a finding. Where a line can be split into
arguments in more than one way (a path containing ``, 0x...``), every reading is classified and
the most severe one kept. What the payload prints on stdout/stderr never reaches this log.

This module never calls the engine: :mod:`._launch` hands it the engine's facts.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._events import PATH_CALLS, PATH_OPS
from ._syscalls import X86_64
from ._worker import _protocol as P
from .errors import EngineUnavailable
from .report import Event

__all__ = [
    "ENGINE_RUNTIME",
    "LOG_DIR",
    "RUNTIME_ARGS",
    "Trace",
    "check_runtime",
    "find_log",
    "parse",
    "read_trace",
    "to_events",
]

#: the name under which the engine knows our gVisor runtime (a runtime of our own, so that the
#: tracing flags apply to our sandboxes only)
ENGINE_RUNTIME = "model-sandbox-runsc"
#: where the sentry writes its logs: root's, on the host, mounted into no container
LOG_DIR = "/var/log/model-sandbox/runsc"
#: the calls gVisor traces (refused ones appear as "denied by seccomp" lines whatever this says):
#: opens, sockets, processes, the monitor's path operations (but fchmodat2, which the sentry's
#: table may lack: its lines still parse, see _TRACED_NAMES) and in-memory files
TRACED = (
    *"open openat creat socket socketpair clone fork vfork execve execveat seccomp".split(),
    *(c for c in PATH_CALLS if c != "fchmodat2"),
    "memfd_create",
)
#: ``runtimeArgs`` of the runtime in ``daemon.json``. ``--network=none``: runsc refuses
#: ``network_mode=none`` containers without it; ``--host-uds=open``: the supervisor connects to
#: the host's channel socket (it creates none; the channel's directory is the only host path
#: mounted, read-only, and its socket is unlinked once connected); ``--oci-seccomp``: our
#: container-level profile is enforced inside the sandbox as under runc.
RUNTIME_ARGS = (
    "--platform=ptrace",
    "--network=none",
    "--host-uds=open",
    "--oci-seccomp",
    "--debug",
    "--debug-command=boot",
    f"--debug-log={LOG_DIR}/",
    "--strace",
    f"--strace-syscalls={','.join(TRACED)}",
)

MAX_LOG_BYTES = 256 * 2**20  # the sandbox is stopped when its log grows past this (a flood)
MAX_READ_BYTES = 256 * 2**20  # read at most this much of one log
MAX_LINE = 16 * 1024  # longer lines are cut (and a cut trace line is an anomaly)
MAX_TRACE_EVENTS = P.MAX_KERNEL_EVENTS
_HEAD_BYTES = 64 * 1024  # where the container id must appear (the sentry's first lines)


def snippet(log_dir: str = LOG_DIR) -> str:
    """What to add to ``/etc/docker/daemon.json`` (under ``runtimes``)."""
    args = ", ".join(f'"{a}"' for a in RUNTIME_ARGS).replace(f"{LOG_DIR}/", f"{log_dir}/")
    return f'"runtimes": {{"{ENGINE_RUNTIME}": {{"path": "/usr/bin/runsc", "runtimeArgs": [{args}]}}}}'


def check_runtime(runtimes: dict[str, Any]) -> str:
    """The log directory of our runtime, from the engine's ``Runtimes`` (``docker info``);
    raises :class:`EngineUnavailable` naming what to add when it is missing or lacks a flag
    the evidence needs."""
    hint = (
        "register it: `MODEL_SANDBOX_RUNSC=1 scripts/ensure-docker.sh` as root (installs "
        "Debian's runsc, adds the runtime to /etc/docker/daemon.json and reloads dockerd "
        "with SIGHUP), or add it by hand: " + snippet()
    )
    entry = runtimes.get(ENGINE_RUNTIME) if isinstance(runtimes, dict) else None
    if not isinstance(entry, dict):
        raise EngineUnavailable(
            f"the Docker engine has no runtime {ENGINE_RUNTIME!r} (gVisor): add to "
            f"/etc/docker/daemon.json {{{snippet()}}} and reload dockerd (kill -HUP)",
            hint=hint,
        )
    args = [str(a) for a in entry.get("runtimeArgs") or []]
    flags: dict[str, str] = {}
    for a in args:
        name, _, value = a.partition("=")
        flags[name.lstrip("-").replace("_", "-")] = value if _ else "true"
    missing = [
        f"--{k}={v}" if v != "true" else f"--{k}"
        for k, v in (("network", "none"), ("strace", "true"), ("debug", "true"), ("host-uds", "open"))
        if flags.get(k) != v
    ]
    traced = set(flags.get("strace-syscalls", "").split(","))
    if flags.get("strace-syscalls", "") and not set(TRACED) <= traced:
        missing.append(f"--strace-syscalls={','.join(TRACED)}")
    log_dir = flags.get("debug-log", "")
    if not log_dir.startswith("/") or not log_dir.endswith("/") or "%" in log_dir:
        missing.append(f"--debug-log={LOG_DIR}/ (a directory of the host, ending in /)")
    if flags.get("debug-command", "boot") not in ("boot", "true") and "boot" not in flags.get(
        "debug-command", ""
    ).split(","):
        missing.append("--debug-command=boot")
    if missing:
        raise EngineUnavailable(
            f"the engine's runtime {ENGINE_RUNTIME!r} lacks what model-sandbox needs to collect "
            f"gVisor's trace: {', '.join(missing)}; its runtimeArgs should be "
            f"{list(RUNTIME_ARGS)}",
            hint=hint,
        )
    return log_dir.rstrip("/") or "/"


def profile(seccomp_json: str) -> str:
    """Our container profile as gVisor's ``--oci-seccomp`` enforces it: the 2022 runsc ignores
    ``errnoRet`` (every refusal becomes ``EPERM``), so ``clone3``, which the profile answers
    with ``ENOSYS`` for libc to fall back to ``clone``, is allowed instead: the sentry does not
    implement it and answers ``ENOSYS`` itself (the loader's own filter refuses it too)."""
    import json

    doc = json.loads(seccomp_json)
    for rule in doc.get("syscalls", []):
        if rule.get("names") == ["clone3"]:
            rule["action"] = "SCMP_ACT_ALLOW"
            rule.pop("errnoRet", None)
    return json.dumps(doc)


def host_pids(pids: int) -> int:
    """The control group's pids limit around a gVisor sandbox of ``pids`` tasks: with the ptrace
    platform the sentry, the gofer and every task's stub are host threads and processes (at the
    default 64 the full torch loader made the sentry panic: "error initializing first thread:
    resource temporarily unavailable")."""
    return max(256, 8 * pids)


def gofers(sandbox_pid: int, container_id: str) -> list[int]:
    """Host pids of the gofer of ``container_id``: under gVisor the sandbox's connection to a
    host socket (our channel) is made by its gofer, a sibling of the sandbox process (same
    parent, the engine's shim) whose command line names the container."""

    def ppid(pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read(4096)
            return int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            return None

    parent = ppid(sandbox_pid)
    if parent is None or not re.fullmatch(r"[0-9a-f]{64}", container_id):
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == sandbox_pid:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read(65536).split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0] == b"runsc-gofer"
            and any(container_id.encode() in a for a in argv)
            and ppid(int(entry)) == parent
        ):
            found.append(int(entry))
    return found


# -- finding and watching a container's log ------------------------------------------------------


def find_log(log_dir: str, container_id: str, since: float) -> str | None:
    """The sentry's log of ``container_id``: a ``*.boot.txt`` file in ``log_dir`` modified
    since ``since`` whose first lines name the container (the id ends the sentry's Args line)."""
    if not re.fullmatch(r"[0-9a-f]{64}", container_id):
        return None
    needle = container_id.encode()
    try:
        names = os.listdir(log_dir)
    except OSError:
        return None
    found = []
    for name in names:
        if not (name.startswith("runsc.log.") and name.endswith(".boot.txt")):
            continue
        path = os.path.join(log_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_mtime < since - 5 or not stat.S_ISREG(st.st_mode):
                continue
            head = os.pread(fd, _HEAD_BYTES, 0)
        except OSError:
            continue
        finally:
            os.close(fd)
        if _names_container(head, needle):
            found.append(path)
    return sorted(found)[-1] if found else None


def _names_container(head: bytes, needle: bytes) -> bool:
    for line in head.split(b"\n")[:50]:
        if b"] Args: [" in line and line.rstrip().endswith(b" " + needle + b"]"):
            return True
    return False


class Watch:
    """Follows the sandbox's log while the load runs: stops the sandbox (``kill``) when the log
    grows past :data:`MAX_LOG_BYTES` (a flood of traced calls must not fill the host's disk),
    and calls ``on_fatal`` at the first refused call of a category in ``fatal`` (the policy's
    ``events.fatal``: under runc the supervisor ends the load itself; here only the host sees the
    refusals). Polls every ``poll_s``: the load ends within about that much of the refusal."""

    def __init__(
        self, log_dir: str, container_id: str, since: float, kill: Callable[[], None], poll_s: float = 0.1
    ) -> None:
        self.log_dir, self.container_id, self.since = log_dir, container_id, since
        self.kill = kill
        self.poll_s = poll_s
        self.path: str | None = None
        self.flooded = False
        self.fatal: frozenset[str] = frozenset()
        self.on_fatal: Callable[[dict[str, Any]], None] | None = None
        self.stopped: dict[str, Any] | None = None
        self._offset = 0
        self._partial = b""
        self._parser = _Parser(Trace())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def locate(self) -> str | None:
        if self.path is None:
            self.path = find_log(self.log_dir, self.container_id, self.since)
        return self.path

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-sandbox-trace-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            path = self.locate()
            if path is None:
                continue
            try:
                size = os.stat(path).st_size
                if self.fatal and self.stopped is None:
                    self._follow(path, size)
            except OSError:
                continue
            if size > MAX_LOG_BYTES:
                self.flooded = True
                self.kill()
                return

    def _follow(self, path: str, size: int) -> None:
        """Parse what the log gained since the last poll (at most 4 MiB of it per poll)."""
        with open(path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(min(size - self._offset, 4 * 2**20)) if size > self._offset else b""
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[: MAX_LINE + 1]
        for raw in lines:
            record = self._parser.feed(raw)
            self._parser.trace.records.clear()  # only the verdict on each line is needed here
            if record is None or record.action != "denied" or record.name in _BY_DESIGN:
                continue
            category = P.event_category(record.name, {})
            if category in self.fatal:
                self.stopped = {"kind": record.name, "category": category, "t": record.t}
                if self.on_fatal is not None:
                    self.on_fatal(self.stopped)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- parsing --------------------------------------------------------------------------------------

# glog header: severity, date, time, thread id, file:line]
_HEADER = re.compile(rb"^([IWEDF])(\d{4}) (\d\d):(\d\d):(\d\d)\.(\d{6}) +\d+ ([\w.]+):\d+\] ")
_TASK = re.compile(r"^\[ *(\d+): *(\d+)\] ")
_CALL = re.compile(r" ([EX]) ([a-z0-9_]+)\(")
_DENIED = re.compile(r"^Syscall (\d+): denied by seccomp$")
_RESULT = re.compile(
    r"\) = (-?\d+) \(0x[0-9a-f]+\)(?: errno=(\d+) \(([a-z ,'-]*)\))? "
    r"\([0-9.]+(?:ns|µs|us|ms|s|m|h)[0-9.a-zµ]*\)$"
)
_FLAGS = r"[A-Z0-9_|x]+"
_MODE = r"(?:[A-Z_]+\|)*0o[0-7]+"  # e.g. 0o644, S_ISVTX|0o0
_ADDR = re.compile(r", (0x[0-9a-f]+) ")
_DIRFD = re.compile(r"^(AT_FDCWD|0x[0-9a-f]+) ")

_NAMES = {nr: name for name, nr in X86_64.items()}  # a refused call's number -> name
_BY_DESIGN = frozenset({"clone3"})  # refused with ENOSYS so that libc falls back: not evidence
_WRITE_FLAGS = frozenset({"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND", "O_TMPFILE"})


@dataclass
class Record:
    """One line of the trace that is evidence, parsed but not yet judged."""

    t: float  # seconds since the loader's filter went in
    pid: int  # thread group and thread, as the sandbox numbers them
    tid: int
    name: str  # the system call
    action: str  # "returned" (an X line) or "denied" (refused by the loader's filter)
    args: str = ""  # the call's arguments as gVisor printed them (returned calls)
    ret: int | None = None
    errno: int | None = None


@dataclass
class Trace:
    """What the host read of one sandbox's trace."""

    path: str | None = None
    found: bool = False  # the log of this container was found
    started: bool = False  # the loader's filter going in was seen: monitoring began
    records: list[Record] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)  # broken or cut trace lines (printable)
    counts: dict[str, int] = field(default_factory=dict)  # "name:action" -> exact number
    dropped: int = 0  # records past MAX_TRACE_EVENTS (counted, not kept)
    bytes_read: int = 0
    truncated: bool = False  # the log was longer than MAX_READ_BYTES
    flooded: bool = False  # the log outgrew MAX_LOG_BYTES and the sandbox was stopped
    lines: int = 0


def _seconds(m: re.Match[bytes]) -> float:
    """Seconds since midnight of a glog header (the trace's own clock)."""
    h, mi, s, us = (int(m.group(i)) for i in (3, 4, 5, 6))
    return h * 3600 + mi * 60 + s + us / 1e6


def parse(data: bytes | Iterable[bytes], trace: Trace | None = None) -> Trace:
    """The evidence in a sentry's log: its bytes, or its lines without their newlines (see the
    module docstring)."""
    parser = _Parser(trace or Trace())
    for raw in data.split(b"\n") if isinstance(data, bytes) else data:
        parser.feed(raw)
    return parser.trace


class _Parser:
    """Reads a sentry's log one line at a time (each line on its own: nothing a line says
    changes how another is read, except the one line that starts monitoring)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.t0: float | None = None
        self.day = 0.0  # glog has no date change marker: times wrap at midnight
        self.prev: float | None = None

    def feed(self, raw: bytes) -> Record | None:
        """Take one line; returns the record it added, if any."""
        trace, t0 = self.trace, self.t0
        trace.lines += 1
        if not raw:
            return None
        cut = len(raw) > MAX_LINE
        raw = raw[:MAX_LINE]
        head = _HEADER.match(raw)
        if head is None:
            # a continuation: the rest of a line that held a line break. After the filter went
            # in, the sentry writes none of its own (none in a full torch load): a path or a
            # thread name with a line break does this, even where a forged header came between
            if t0 is not None:
                _anomaly(
                    trace, "a line continued on the next one (a line break in a path or a thread name)", raw
                )
            return None
        now = _seconds(head)
        if self.prev is not None and now + self.day < self.prev - 3600:
            self.day += 86400.0
        now += self.day
        self.prev = now
        source = head.group(7)
        if source not in (b"strace.go", b"task_syscall.go"):
            return None
        text = raw[head.end() :].decode("utf-8", "replace")
        task = _TASK.match(text)
        if task is None:
            if t0 is not None and source == b"strace.go":
                _anomaly(trace, "a trace line without its task", raw)
            return None
        pid, tid = int(task.group(1)), int(task.group(2))
        rest = text[task.end() :]
        if source == b"task_syscall.go":
            denied = _DENIED.match(rest)
            if denied is None or t0 is None or pid == 1:
                return None
            nr = int(denied.group(1))
            return _keep(
                trace,
                Record(
                    t=round(max(now - t0, 0.0), 4),
                    pid=pid,
                    tid=tid,
                    name=_NAMES.get(nr, f"syscall_{nr}"),
                    action="denied",
                ),
            )
        calls = _split_calls(rest)
        if not calls:
            if t0 is not None and pid != 1:
                _anomaly(trace, "a trace line that does not read as a system call", raw)
            return None
        if t0 is None:
            # monitoring begins when the loader's own filter goes in: seccomp(SET_MODE_FILTER),
            # returned 0 (no code of the file can run before it; the thread name is still ours)
            if pid != 1 and len(calls) == 1 and not cut:
                direction, name, args = calls[0]
                result = _RESULT.search(args)
                if (
                    direction == "X"
                    and name == "seccomp"
                    and result is not None
                    and args.startswith("0x1, ")
                    and result.group(1) == "0"
                    and not result.group(2)
                ):
                    self.t0 = now
                    trace.started = True
            return None
        if pid == 1:
            return None  # the supervisor's own calls
        read = False
        added = None
        for direction, name, args in calls:
            result = _RESULT.search(args)
            if result is None or cut:
                continue
            read = True
            if direction != "X":
                continue
            added = _keep(
                trace,
                Record(
                    t=round(max(now - t0, 0.0), 4),
                    pid=pid,
                    tid=tid,
                    name=name,
                    action="returned",
                    args=args[: result.start()],
                    ret=int(result.group(1)),
                    errno=int(result.group(2)) if result.group(2) else None,
                ),
            )
        if not read and any(d == "X" for d, _, _ in calls):
            _anomaly(trace, "a returned call whose line is cut or broken", raw)
        return added


def _split_calls(rest: str) -> list[tuple[str, str, str]]:
    """Every reading of ``rest`` as (E or X, name, what follows the opening parenthesis). The
    thread name before the call is the payload's to choose (up to 15 bytes, spaces allowed),
    so it may itself look like `` X seccomp(``: every `` E name(``/`` X name(`` of a traced
    call that starts within the thread name's reach is a candidate, and each is kept."""
    return [
        (m.group(1), m.group(2), rest[m.end() :])
        for m in _CALL.finditer(rest[:64])
        if m.start() <= 20 and m.group(2) in _TRACED_NAMES
    ]


_TRACED_NAMES = frozenset(TRACED) | {"openat2", "clone3", "fchmodat2"}


def _anomaly(trace: Trace, what: str, raw: bytes) -> None:
    trace.counts["anomaly"] = trace.counts.get("anomaly", 0) + 1
    if len(trace.anomalies) < 20:
        trace.anomalies.append(f"{what}: {P.printable(raw.decode('utf-8', 'replace'), 300)}")


def _keep(trace: Trace, record: Record) -> Record:
    key = f"{record.name}:{record.action}"
    trace.counts[key] = trace.counts.get(key, 0) + 1
    cap = MAX_TRACE_EVENTS if record.action == "denied" else MAX_TRACE_EVENTS * 4 // 5
    if len(trace.records) >= cap:
        trace.dropped += 1
    else:
        trace.records.append(record)
    return record


def read_trace(path: str | None, trace: Trace | None = None) -> Trace:
    """Read (at most :data:`MAX_READ_BYTES` of) the log at ``path``, a line at a time (no line
    held beyond :data:`MAX_LINE`), and parse it."""
    trace = trace or Trace()
    trace.path = path
    if path is None:
        return trace
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return trace
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return trace
            trace.found = True
            parse(_lines(f, trace), trace)
        except OSError:
            pass
    return trace


def _lines(f: Any, trace: Trace) -> Iterator[bytes]:
    """The lines of ``f`` without their newline, each cut at ``MAX_LINE + 1`` bytes (the rest of
    a longer line is skipped), until :data:`MAX_READ_BYTES` have been read."""
    while trace.bytes_read < MAX_READ_BYTES:
        line = f.readline(MAX_LINE + 1)
        if not line:
            return
        trace.bytes_read += len(line)
        if not line.endswith(b"\n") and len(line) > MAX_LINE:
            while (rest := f.readline(1 << 16)) and trace.bytes_read < MAX_READ_BYTES:
                trace.bytes_read += len(rest)
                if rest.endswith(b"\n"):
                    break
        yield line.rstrip(b"\n")
    trace.truncated = bool(f.read(1))


def remove(path: str | None) -> None:
    """Remove a read log (a host that may not, e.g. not root, leaves it)."""
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


# -- records -> events -----------------------------------------------------------------------


def _norm(path: str, base: str, pid: int = 0) -> str:
    """An absolute, normalised path as the supervisor's decoder makes it: relative to ``base``
    (the directory gVisor printed for the call's dirfd), ``/proc/self`` as ``/proc/<pid>``, the
    input's descriptor as :data:`~sandbox._worker._protocol.INPUT_ALIAS`. (Links are not
    resolved: gVisor prints the path as given; a link the payload made is itself an event.)"""
    if not path.startswith("/"):
        path = (base.rstrip("/") or "") + "/" + path if base.startswith("/") else "<unknown>/" + path
    path = os.path.normpath(path) if path.startswith("/") else path
    for alias in ("/proc/self", "/proc/thread-self"):
        if pid and (path == alias or path.startswith(alias + "/")):
            path = f"/proc/{pid}" + path[len(alias) :]
    if pid and path == f"/proc/{pid}/fd/{P.INPUT_FD}":
        return P.INPUT_ALIAS
    return path


def _readings(arg_text: str, *, dirfd: bool) -> list[tuple[str, str, str]]:
    """Every way to read ``[dirfd dirpath, ]0xADDR path, rest`` as (base, path, rest): gVisor
    prints paths raw, so a path may itself hold ``, 0x...``."""
    out: list[tuple[str, str, str]] = []
    if dirfd:
        d = _DIRFD.match(arg_text)
        if d is None:
            return out
        body = arg_text[d.end() :]
        for m in _ADDR.finditer(body):
            base = body[: m.start()]
            out.append((base, body[m.end() :], ""))
        return out
    first = re.match(r"^(0x[0-9a-f]+) ", arg_text)
    if first is None:
        return out
    out.append(("", arg_text[first.end() :], ""))
    return out


_SEVERITY_OF_CLASS = {
    "canary": 6,
    "canary_home": 5,
    "sensitive": 4,
    "outside": 4,
    "probe": 3,
    "other": 2,
    "scratch": 1,
    "loader_scratch": 1,
    "quiet": 0,
}


def _open_event(
    r: Record, canary_files: frozenset[str], quiet: tuple[str, ...]
) -> tuple[str, dict[str, Any], str] | None:
    """An open's (kind, detail, action), or None for a quiet read."""
    tail: re.Match[str] | None
    if r.name == "openat":
        tail = re.search(rf", ({_FLAGS}), {_MODE}$", r.args)
        readings = _readings(r.args[: tail.start()], dirfd=True) if tail else []
    elif r.name == "open":
        tail = re.search(rf", ({_FLAGS}), {_MODE}$", r.args)
        readings = _readings(r.args[: tail.start()], dirfd=False) if tail else []
    else:  # creat(path, mode)
        tail = re.search(rf"(), {_MODE}$", r.args)
        readings = _readings(r.args[: tail.start()], dirfd=False) if tail else []
    if tail is None or not readings:
        return "open-unreadable", {"args": P.printable(r.args, 500)}, "recorded"
    flags = tail.group(1) or "O_WRONLY|O_CREAT|O_TRUNC"
    writing = bool(set(flags.split("|")) & _WRITE_FLAGS)
    failed = r.errno is not None
    best: tuple[int, dict[str, Any], str] | None = None
    for base, given, _ in readings:
        path = _norm(given, base, r.pid)
        cls = P.classify_path(path, canary_files=canary_files, own=(f"/proc/{r.pid}/",), quiet_prefixes=quiet)
        action = "allowed"
        detail: dict[str, Any] = {"path": P.printable(path, 1000), "flags": flags, "class": cls}
        if given != path:
            detail["given"] = P.printable(given, 1000)
        if writing:
            detail["write"] = True
            scratch = path.startswith(P.WRITABLE_PREFIXES) and not path.startswith("/proc/")
            if path in ("/dev/null", "/tmp"):  # noqa: S108 - a path inside the sandbox
                continue
            if scratch:
                detail["class"] = "loader_scratch" if path.startswith(P.LOADER_SCRATCH) else "scratch"
            else:
                detail["class"] = "outside"
                action = "denied" if failed else "allowed"
        elif cls == "quiet":
            continue
        if failed:
            detail["errno"] = r.errno
        rank = _SEVERITY_OF_CLASS.get(str(detail["class"]), 2)
        if best is None or rank > best[0]:
            best = (rank, detail, action)
    if best is None:
        return None
    if len(readings) > 1:
        best[1]["ambiguous"] = len(readings)
    return r.name, best[1], best[2]


def _path_event(r: Record) -> tuple[str, dict[str, Any], str]:
    """unlink/rename/link/symlink/chmod...: every path argument, the sandbox's answer."""
    base = ""
    body = r.args
    d = _DIRFD.match(body)
    if d is not None:
        first = _ADDR.search(body[d.end() :])
        base = body[d.end() : d.end() + first.start()] if first else ""
    found = re.findall(
        r"(?:^|, )0x[0-9a-f]+ ((?:(?!, 0x[0-9a-f]+ |, AT_FDCWD |, 0x[0-9a-f]+$)"
        r".)*)",
        body,
    )
    target = None
    if r.name in ("symlink", "symlinkat") and found:
        target = P.printable(found[0], 1000)  # a string, not a path of this call
        found = found[1:]
        mid = re.search(r", (?:AT_FDCWD|0x[0-9a-f]+) (.*?), 0x[0-9a-f]+ ", body)
        base = mid.group(1) if mid and r.name == "symlinkat" else base
    paths = [P.printable(_norm(p, base, r.pid), 1000) for p in found[:4]]
    scratch = bool(paths) and all(p.startswith(P.WRITABLE_PREFIXES) for p in paths)
    failed = r.errno is not None
    detail: dict[str, Any] = {
        "paths": paths,
        "class": (
            "loader_scratch"
            if scratch and all(p.startswith(P.LOADER_SCRATCH) for p in paths)
            else "scratch"
            if scratch
            else "outside"
        ),
    }
    if target is not None:
        detail["target"] = target
    if failed:
        detail["errno"] = r.errno
    action = "denied" if failed and not scratch else "allowed"
    return r.name, detail, action


_CLONE_THREAD = "CLONE_THREAD"


def _record_event(
    r: Record, canary_files: frozenset[str], quiet: tuple[str, ...]
) -> tuple[str, dict[str, Any], str] | None:
    base: dict[str, Any] = {"pid": r.pid, "tid": r.tid}
    if r.action == "denied":
        if r.name in _BY_DESIGN:
            return None  # ENOSYS by design, for libc to fall back to clone (no event under runc)
        return r.name, {**base, "refused_by": "seccomp (the loader's filter)"}, "denied"
    if r.name in ("open", "openat", "creat"):
        ev = _open_event(r, canary_files, quiet)
        if ev is None:
            return None
        return ev[0], {**ev[1], **base}, ev[2]
    if r.name in ("socket", "socketpair"):
        parts = [p.strip() for p in r.args.split(",")[:3]]
        detail = {
            **base,
            "family": P.printable(parts[0], 40) if parts else "?",
            "type": P.printable(parts[1].split("|")[0], 40) if len(parts) > 1 else "?",
        }
        return r.name, detail, "allowed"
    if r.name in ("clone", "vfork", "fork"):
        flags = r.args.split(",")[0] if r.name == "clone" else ""
        if _CLONE_THREAD in flags:
            return None  # a thread
        vfork = r.name == "vfork" or ("CLONE_VM" in flags and "CLONE_VFORK" in flags)
        return (
            "clone" if r.name == "clone" else r.name,
            {
                **base,
                "style": "vfork" if vfork else "fork",
                **({"flags": P.printable(flags, 200)} if flags else {}),
            },
            "allowed",
        )
    if r.name in PATH_OPS:
        kind, detail, action = _path_event(r)
        return kind, {**detail, **base}, action
    if r.name in ("execve", "execveat"):  # only reached if the filter let one through
        m = re.match(r"^0x[0-9a-f]+ (.*?), 0x[0-9a-f]+ \[", r.args)
        return r.name, {**base, "path": P.printable(m.group(1) if m else r.args, 500)}, "allowed"
    if r.name == "memfd_create":
        return r.name, {**base}, "allowed"
    return None


def to_events(
    trace: Trace, *, canary_files: frozenset[str] = frozenset(), allow_read: tuple[str, ...] = ()
) -> list[Event]:
    """``gvisor`` events (ids 0: the caller numbers them) for the records of ``trace``."""
    quiet = P.QUIET_READ_PREFIXES + tuple(p for p in allow_read if p.startswith("/"))
    out: list[Event] = []
    for r in trace.records:
        ev = _record_event(r, canary_files, quiet)
        if ev is None:
            continue
        kind, detail, action = ev
        out.append(Event(id=0, t=r.t, source="gvisor", kind=kind, detail=detail, action=action))
    return out
