"""Container side entry point: the supervisor.

Started as the container's PID 1 with an **empty environment** (the engine always injects
PATH, HOSTNAME and HOME, and nothing of ours is to be visible to the payload: the image's
entrypoint, ``python3 -I -S -c BOOT``, imports nothing and re-executes ``python3 -I -m
sandbox_worker --stage2 ARGS`` with no variables; started any other way, :func:`main` does the
same before anything else), it

1. connects to the host's channel and waits for its job;
2. hashes the input, plants *canary* credentials (fresh fake AWS/HF/OpenAI/GitHub values in
   the loader's environment and under its ``HOME``, a small tmpfs), then forks the *loader* in a
   new session with resource limits;
3. takes the loader's seccomp listener (see :mod:`._seccomp`: the loader installs a notifying
   filter before it opens the input, and fails closed if it cannot) and, while waiting under the
   wall-clock and CPU-time limits, answers every notification, drains the loader's
   self-reported audit events, samples the resources of the loader's process tree (``/proc``,
   about every 100 ms, between notifications) and collects its bounded result message;
4. kills every other process left in the container (PID 1 can; the payload cannot kill PID 1:
   the kernel drops signals to a namespace's init that it has no handler for, and we keep none:
   Python's SIGINT handler is reset; kill/ptrace of PID 1 are refused by the filter, and this
   process is not dumpable, so its memory and descriptors are out of the loader's reach);
5. sends the host, over the channel the loader never holds, the events (bounded: separate
   budgets for kernel and self-reported events, exact counts in the status) and then the status
   (with the canary values, so that the host can search for them, the ``resources`` the tree
   used and the ``limit`` the supervisor enforced, if any) and the sealed outputs.

The supervisor never imports torch and never unpickles anything; it samples the loader's
process tree from ``/proc`` (no psutil: its import cost every sandbox ~20 ms of CPU).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import string
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import _protocol as P
from . import _seccomp, _spans

STAGE2 = P.STAGE2
PLAIN_HANDOFF = b"plain"  # the loader's word, under gVisor, that its plain filter is in place
_RESULT_LIMIT = 64 * 1024
_SAMPLE_EVERY_S = 0.1
_CPU_BACKSTOP_S = 5  # RLIMIT_CPU of the loader: this many seconds past the tree's limit
_MAX_COUNT_KEYS = 256  # distinct (source, kind, action) counters in the status


def _loader_main(ch: _ChildEnds, env: dict[str, str], prepare: bool, plain: bool = False) -> None:
    """Runs in the forked child; never returns. Warm until the supervisor hands it a job: the
    heavy imports happen before any input exists, the filter goes in before the input arrives.
    ``plain`` (under gVisor): the filter refuses in the kernel and reports to nobody here."""
    code = 4
    message: dict[str, Any] = {"ok": False, "kind": "load-failed", "message": "no result"}
    try:
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # no real-time policy and no priority above the supervisor's for the loader and its
        # children, whatever the engine's defaults (its filter lets it schedule itself); gVisor
        # has neither limit (nor real-time scheduling) and refuses to set them
        for limit in (resource.RLIMIT_RTPRIO, resource.RLIMIT_NICE):
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(limit, (0, 0))
        os.chdir("/tmp")
        os.environ.clear()
        os.environ.update(env)  # the canaries: the loader's whole environment
        from . import _loader

        if prepare:
            _loader.prepare()  # torch, numpy, safetensors: trusted code, no input yet
        os.write(ch.hand_w, b"R")  # warm: the supervisor says hello only now
        cfg, input_fd = _receive_job(ch.job)
        if not cfg.layout and not prepare:
            # the host's scan says the full loader: import torch now, before the filter (no
            # byte of the input has been read; under it, the import notifies ~1,200 opens)
            _loader.prepare()
        # every clock of the evidence counts from (about) here: the supervisor's, when it takes
        # the filter's listener; gVisor's trace, when it sees the filter go in
        received = time.monotonic()
        if cfg.max_output_bytes > 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, (cfg.max_output_bytes, cfg.max_output_bytes))
        if cfg.cpu_s > 0:  # a backstop per process: the supervisor stops the whole tree before this
            soft = int(cfg.cpu_s) + _CPU_BACKSTOP_S
            resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + _CPU_BACKSTOP_S))
        if input_fd != P.INPUT_FD:  # a fixed number: the monitor knows an open of it is the input
            os.dup2(input_fd, P.INPUT_FD)
            os.close(input_fd)
        source = _loader.Input(P.INPUT_FD)  # probes its descriptor before the filter is in place
        views: _spans.SelfViews | None = None
        import tempfile

        tempfile.gettempdir()  # its one-time probe writes a file: done before monitoring starts
        try:
            if plain:  # gVisor: its trace of this sandbox (read by the host) is the evidence
                _seccomp.install_plain(os.getpid(), cfg.errno)
                os.write(ch.hand_w, PLAIN_HANDOFF)
                ack = os.read(ch.ack_r, 16)
            else:
                # Dumpable, so that the supervisor may take the listener and read our memory;
                # after the filter, prctl(PR_SET_DUMPABLE) is refused.
                _seccomp.prctl(_seccomp.PR_SET_DUMPABLE, 1)
                # the OOM killer's first choice, whatever the sizes: memory the payload holds
                # outside its RSS (tmpfs, memfds, pipe buffers) must never make the supervisor
                # the victim. Writable only once we are dumpable (our /proc files are ours);
                # the filter's monitor refuses the payload's write that would lower it again.
                try:
                    with open("/proc/self/oom_score_adj", "wb", buffering=0) as f:
                        f.write(b"1000")
                except OSError:  # a runtime without it (the control group still bounds the tree)
                    pass
                # where a returned tensor still is the input's own bytes: read after the load,
                # opened now (our /proc files are ours only once we are dumpable)
                views = _spans.SelfViews()
                listener = _seccomp.install(os.getpid())
                os.write(ch.hand_w, str(listener).encode())
                ack = os.read(ch.ack_r, 16)
                os.close(listener)  # the supervisor holds the only copy from here on
        except OSError as exc:
            raise _MonitorFailed(f"could not install the monitoring filter: {exc}") from None
        if ack != b"ok":
            raise _MonitorFailed("the supervisor could not take the monitoring listener")
        os.close(ch.hand_w)
        os.close(ch.ack_r)
        from . import _audit

        try:
            # the layout reader resolves nothing but inert stand-ins: no code of the file can
            # run there, so the audit hook goes in after it, and after torch is imported (its
            # import, here or in a warm sandbox, is not the file's doing)
            layout = _loader.try_layout(source) if cfg.layout else None
            if layout is None:
                _loader.prepare()
            _audit.install(ch.audit_w, received)  # one clock for both sources
            if layout is not None:  # a plain state dict: the host maps the bytes itself
                _loader.write_layout(layout, manifest_fd=ch.manifest)
                message = {
                    "ok": True,
                    "format": layout["format"],
                    "tensors": len(layout["layout"]),
                    "handoff": "layout",
                }
            else:
                obj, fmt, locations = _loader.load(source)
                manifest = _loader.write_outputs(
                    obj,
                    fmt,
                    locations,
                    tensors_fd=ch.tensors,
                    manifest_fd=ch.manifest,
                    tensors=cfg.write_tensors,
                    views=views,
                )
                message = {"ok": True, "format": fmt, "tensors": len(manifest["tensors"]), "handoff": "memfd"}
            code = 0
        except _loader.LoaderError as exc:
            message = {"ok": False, "kind": exc.kind, "message": str(exc)[:4000], "detected": exc.detected}
            code = 3
        except BaseException as exc:  # whatever torch (or the payload) raised
            message = _raised("load-failed", exc)
            code = 4
    except _MonitorFailed as exc:
        message = {"ok": False, "kind": "monitor-failed", "message": str(exc)[:4000]}
        code = 5
    except BaseException as exc:  # setting up the loader failed: no input was opened
        message = _raised("monitor-failed", exc)
        code = 5
    finally:
        try:
            os.write(ch.result_w, json.dumps(message, default=str).encode()[:_RESULT_LIMIT])
        except BaseException:
            pass
        os._exit(code)


def _raised(kind: str, exc: BaseException) -> dict[str, Any]:
    """The loader's result when an unexpected exception ended it: ``kind``, and what it was."""
    return {"ok": False, "kind": kind, "type": type(exc).__name__, "message": str(exc)[:4000]}


def _receive_job(sock: socket.socket) -> tuple[P.JobConfig, int]:
    """The job the supervisor forwards (its config and the input descriptor)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, P.MAX_FRAME, 1)
    if not data or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise SystemExit(0)  # the sandbox is being discarded unused
    sock.close()
    return P.JobConfig.from_json(data), fds[0]


class _MonitorFailed(Exception):
    pass


@dataclass
class _ChildEnds:
    result_w: int
    hand_w: int
    ack_r: int
    audit_w: int
    job: socket.socket
    tensors: int
    manifest: int


# -- canary credentials ----------------------------------------------------------------------------


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _canaries() -> dict[str, str]:
    """Fresh fake credentials of realistic shapes; unique per run, so any sighting is ours."""
    up, alnum = string.ascii_uppercase + "234567", string.ascii_letters + string.digits
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + _rand(up, 16),
        "AWS_SECRET_ACCESS_KEY": _rand(alnum + "+/", 40),
        "HF_TOKEN": "hf_" + _rand(string.ascii_letters, 34),
        "OPENAI_API_KEY": "sk-proj-" + _rand(alnum, 48),
        "GITHUB_TOKEN": "ghp_" + _rand(alnum, 36),
        "SSH_PRIVATE_KEY": _rand(alnum + "+/", 64),
        "NETRC_PASSWORD": _rand(alnum, 32),
        "DOCKER_AUTH": base64.b64encode(f"sandbox:{_rand(alnum, 24)}".encode()).decode(),
    }


_ENV_CANARIES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "OPENAI_API_KEY", "GITHUB_TOKEN")


def _plant(values: dict[str, str]) -> list[str]:
    """Write the canary files under the canary home. Returns their paths ([] without a home)."""
    home = P.CANARY_HOME
    ssh_body = "\n".join(
        textwrap.wrap("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAAB" + values["SSH_PRIVATE_KEY"], 70)
    )
    files = {
        ".aws/credentials": f"[default]\naws_access_key_id = {values['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {values['AWS_SECRET_ACCESS_KEY']}\n",
        ".cache/huggingface/token": values["HF_TOKEN"],
        ".ssh/id_rsa": f"-----BEGIN OPENSSH PRIVATE KEY-----\n{ssh_body}\n"
        "-----END OPENSSH PRIVATE KEY-----\n",
        ".netrc": f"machine github.com\n  login sandbox\n  password {values['NETRC_PASSWORD']}\n",
        ".docker/config.json": json.dumps(
            {"auths": {"https://index.docker.io/v1/": {"auth": values["DOCKER_AUTH"]}}}
        ),
    }
    written = []
    for rel, text in files.items():
        path = f"{home}/{rel}"
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            written.append(path)
        except OSError:
            continue
    return written


# -- the event log ---------------------------------------------------------------------------------


class _EventLog:
    """Bounded: kernel and self-reported events have separate budgets; counts stay exact."""

    def __init__(self, canaries: dict[str, str]) -> None:
        self.lines: list[bytes] = []
        self.size = 0
        self.kept = {"kernel": 0, "self_reported": 0}
        self.dropped = {"kernel": 0, "self_reported": 0}
        self.counts: dict[str, int] = {}
        self.next_id = 1
        self.canaries = {k: v.encode() for k, v in canaries.items()}

    def find_canaries(self, *blobs: bytes) -> list[str]:
        return sorted(name for name, value in self.canaries.items() if any(value in b for b in blobs if b))

    def add(
        self, source: str, kind: str, detail: dict[str, Any], action: str, t: float, *, keep: bool = True
    ) -> None:
        key = f"{source}:{kind}:{action}"
        if key not in self.counts and len(self.counts) >= _MAX_COUNT_KEYS:
            key = f"{source}:other:{action}"  # kinds are the loader's words: their number is bounded
        self.counts[key] = self.counts.get(key, 0) + 1
        if not keep:
            return
        cap = P.MAX_KERNEL_EVENTS if source == "kernel" else P.MAX_SELF_REPORTED_EVENTS
        budget = P.MAX_EVENTS_BYTES // 2 if source == "kernel" else P.MAX_EVENTS_BYTES // 8
        if action != "denied":
            # a fifth of the log is kept for refusals: a flood of allowed calls (sockets,
            # reads) cannot push out the exec or connect that follows it
            cap, budget = cap * 4 // 5, budget * 4 // 5
        if self.kept[source] >= cap or self.size >= P.MAX_EVENTS_BYTES - 2 * P.MAX_EVENT_LINE:
            self.dropped[source] += 1
            return
        line = self._line(source, kind, detail, action, t)
        if self.kept[source] and self.size + len(line) > budget * (2 if source == "kernel" else 1):
            self.dropped[source] += 1
            return
        self.lines.append(line)
        self.size += len(line)
        self.kept[source] += 1

    def _line(self, source: str, kind: str, detail: dict[str, Any], action: str, t: float) -> bytes:
        ev = {
            "id": self.next_id,
            "t": round(max(t, 0.0), 4),
            "source": source,
            "kind": kind[:64],
            "detail": detail,
            "action": action,
        }
        try:
            line = json.dumps(ev, default=str, ensure_ascii=True).encode()
        except (ValueError, RecursionError):
            ev["detail"] = {"unencodable": True}
            line = json.dumps(ev).encode()
        if len(line) >= P.MAX_EVENT_LINE:
            ev["detail"] = {"oversized": True, **{k: str(v)[:1000] for k, v in list(detail.items())[:8]}}
            line = json.dumps(ev, default=str, ensure_ascii=True).encode()[: P.MAX_EVENT_LINE - 1]
            if not line.endswith(b"}"):
                ev["detail"] = {"oversized": True}
                line = json.dumps(ev).encode()
        self.next_id += 1
        return line + b"\n"

    def finish(self, t: float) -> None:
        if any(self.dropped.values()):
            line = self._line("supervisor", "truncated", {"dropped": dict(self.dropped)}, "recorded", t)
            self.lines.append(line)

    def summary(self) -> dict[str, Any]:
        return {
            "kept": dict(self.kept),
            "dropped": dict(self.dropped),
            "truncated": any(self.dropped.values()),
            "counts": dict(sorted(self.counts.items())),
        }


_MAX_PARTIAL = 4096  # bytes of an unfinished self-reported line the supervisor keeps


class _SelfReports:
    """Reads the audit hook's JSON lines from the loader: untrusted, bounded."""

    def __init__(self, log: _EventLog) -> None:
        self.log = log
        self.buf = b""
        self.skipping = False

    def feed(self, data: bytes) -> None:
        """One chunk as read: each complete line is one record; what follows the last newline
        waits for the next chunk, unless it is already longer than any record (then it and the
        rest of its line are dropped). Linear in the chunk: the lines are found from a moving
        index, never by copying what remains after each one (a chunk of 64 KiB of newlines
        cost 2 GiB of copying that way)."""
        buf = self.buf + data if self.buf else data
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            line, start = buf[start:nl], nl + 1
            if self.skipping:
                self.skipping = False
                continue
            self._one(line)
        rest = buf[start:]
        if len(rest) > _MAX_PARTIAL:
            rest, self.skipping = b"", True
        self.buf = rest

    def _one(self, line: bytes) -> None:
        """Total: any bytes become one bounded record or a count of malformed lines."""
        try:
            if not line.startswith(b"{"):  # no object: malformed without a parser's exception
                raise ValueError
            ev = json.loads(line.decode("utf-8", "replace"))
            kind, detail, t = ev["kind"], ev["detail"], ev["t"]
            if (
                not isinstance(kind, str)
                or not isinstance(detail, dict)
                or isinstance(t, bool)
                or not isinstance(t, (int, float))
            ):
                raise ValueError
            t = float(t) if -1e7 < t < 1e7 else 0.0
            detail = _flat(detail)
        except Exception:
            self.log.add("self_reported", "malformed", {}, "recorded", 0.0, keep=False)
            return
        self.log.add("self_reported", kind[:64], detail, "recorded", min(max(t, 0.0), 1e7))


def _flat(detail: dict[Any, Any]) -> dict[str, Any]:
    """At most 16 keys of scalars or short strings: nothing the loader sends is kept nested."""
    out: dict[str, Any] = {}
    for k, v in list(detail.items())[:16]:
        if v is None or isinstance(v, (bool, float)):
            out[str(k)[:64]] = v
        elif isinstance(v, int):
            out[str(k)[:64]] = v if -(2**63) <= v < 2**63 else str(v)[:40]
        elif isinstance(v, str):
            out[str(k)[:64]] = v[:1000]
        else:
            try:
                out[str(k)[:64]] = json.dumps(v, default=str)[:1000]
            except (ValueError, RecursionError, TypeError):
                out[str(k)[:64]] = "<unencodable>"
    return out


# -- resources ----------------------------------------------------------------------------------


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_stat(pid: int, proc: str = "/proc") -> tuple[float, int, int] | None:
    """(CPU seconds, its reaped children's included; resident bytes; threads) of a live process,
    from ``/proc/PID/stat``; None when it is gone or a zombie. Read past the *last* ``)``: the
    command name before it is the loader's to choose (``prctl(PR_SET_NAME)``), spaces and
    parentheses included."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 1 :].split()  # fields[0] is proc(5)'s field 3, the state
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime (14-17)
        return ticks / _CLK_TCK, int(fields[21]) * _PAGE, int(fields[17])  # rss (24), threads (20)
    except (IndexError, ValueError):
        return None


class _Resources:
    """Samples the loader's process tree from ``/proc``: every process in the container's PID
    namespace but this one (the loader, whatever it spawned, and orphans re-parented to us).

    CPU time is the live processes' own and reaped children's time plus what this process has
    reaped (``RUSAGE_CHILDREN``), kept monotonic; RSS is summed over the tree; threads and child
    processes are counted. Peaks are over samples, so a spike shorter than the interval can be
    missed (the final figures also take the kernel's ``ru_maxrss`` of the largest process)."""

    def __init__(self, loader: int, cpu_limit_s: float, start: float = 0.0) -> None:
        self.loader = loader
        self.cpu_limit_s = cpu_limit_s
        self.start = start  # the job's start: the series' times count from it, as events do
        # (t, cpu_s, rss) per kept sample: at most MAX_RESOURCE_POINTS, halved (every other
        # point kept, and from then on every second sample) whenever it fills
        self.series: list[tuple[float, float, int]] = []
        self.stride = 1
        self.seen = 0  # samples offered to the series
        self.me = os.getpid()
        self.next_at = 0.0
        self.at = 0.0  # when the current sample was taken
        self.samples = 0
        self.cpu_s = 0.0
        self.rss_peak = 0
        self.threads_peak = 0
        self.children_peak = 0
        self.sample_s = 0.0  # time spent sampling, to keep the cost visible
        self.error: str | None = None

    def wait_s(self, now: float, most: float) -> float:
        """How long the event loop may block before the next sample is due."""
        if self.error is not None:
            return most
        return min(most, max(0.0, self.next_at - now))

    def due(self, now: float) -> bool:
        return self.error is None and now >= self.next_at

    def over_limit(self) -> bool:
        return 0 < self.cpu_limit_s < self.cpu_s

    def sample(self, now: float) -> None:
        # 10, 20, 40, 80 ms apart at first, then every _SAMPLE_EVERY_S: a short load still
        # has a few points, a long one costs no more
        self.next_at = now + min(_SAMPLE_EVERY_S, 0.01 * 2**self.samples)
        self.at = now
        t0 = time.perf_counter()
        try:
            self._sample()
        except Exception as exc:  # monitoring must never stop the supervisor
            self.error = f"{type(exc).__name__}: {exc}"[:200]
        self.sample_s += time.perf_counter() - t0

    def _sample(self) -> None:
        cpu = 0.0
        rss = threads = others = 0
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == self.me:
                continue
            pid = int(name)
            got = proc_stat(pid)
            if got is None:  # gone, or a zombie: its time reaches its parent (or us) when reaped
                continue
            cpu += got[0]
            rss += got[1]
            threads += got[2]
            others += pid != self.loader
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.samples += 1
        self.cpu_s = max(self.cpu_s, cpu + reaped.ru_utime + reaped.ru_stime)
        self.rss_peak = max(self.rss_peak, rss)
        self.threads_peak = max(self.threads_peak, threads)
        self.children_peak = max(self.children_peak, others)
        self.keep(self.at - self.start, self.cpu_s, rss)

    def keep(self, t: float, cpu_s: float, rss: int) -> None:
        """Add this sample to the series when it falls on the stride; when the series is full,
        keep every other point and from then on every other sample: evenly spread over the
        whole load, at most MAX_RESOURCE_POINTS."""
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        if len(self.series) >= P.MAX_RESOURCE_POINTS:
            self.series = self.series[::2]
            self.stride *= 2
            if (self.seen - 1) % self.stride:
                return
        self.series.append((round(max(0.0, t), 3), round(cpu_s, 3), rss))

    def finish(self) -> dict[str, Any]:
        """Final figures, once every loader process has been reaped."""
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        out: dict[str, Any] = {
            "cpu_s": round(max(self.cpu_s, usage.ru_utime + usage.ru_stime), 3),
            "rss_peak_bytes": max(self.rss_peak, usage.ru_maxrss * 1024),
            "threads_peak": self.threads_peak,
            "children_peak": self.children_peak,
            "samples": self.samples,
            "sample_s": round(self.sample_s, 4),
            "series": [list(p) for p in self.series],
        }
        if self.error:
            out["error"] = self.error
        return out


# -- supervision ---------------------------------------------------------------------------------


class _Monitor:
    """Answers the loader's notifications and records them."""

    def __init__(
        self,
        listener: int,
        loader: int,
        log: _EventLog,
        canary_files: list[str],
        start: float,
        cfg: P.JobConfig,
        *,
        memfds: bool = True,
    ) -> None:
        self.listener = listener
        self.mem = _seccomp.Memory()
        self.decoder = _seccomp.Decoder(
            self.mem, loader, frozenset(canary_files), extra_quiet=cfg.allow_read, memfds=memfds
        )
        self.log = log
        self.start = start
        self.notifications = 0
        self.vanished = 0
        # the policy: which refused events end the load at once, and the errno refusals get
        self.fatal = frozenset(cfg.fatal)
        self.errno = cfg.errno
        self.stopped: dict[str, Any] | None = None

    def serve(self, budget: int = 256) -> bool:
        """Answer up to ``budget`` pending notifications. False when the listener is done."""
        for _ in range(budget):
            if not _seccomp.wait_readable([self.listener], 0):
                return True
            try:
                n = _seccomp.recv(self.listener)
            except OSError:
                return False
            if n is None:
                continue
            self.notifications += 1
            try:
                d = self.decoder.decide(n)
            except Exception as exc:  # a decoding bug must not leave the caller hanging
                d = _seccomp.Decision("decode_error", {"nr": n.nr, "error": str(exc)[:200]})
            if not _seccomp.id_valid(self.listener, n.id):
                self.vanished += 1  # the memory we read may no longer be the caller's
                continue
            _seccomp.respond(self.listener, n.id, deny=None if d.deny is None else self.errno)
            action = "allowed" if d.deny is None else "denied"
            if d.record:
                strings = [
                    str(v).encode("utf-8", "surrogateescape") for v in d.detail.values() if isinstance(v, str)
                ]
                found = self.log.find_canaries(d.payload, *strings)
                if found:
                    d.detail["canaries"] = found
            t = time.monotonic() - self.start
            self.log.add("kernel", d.kind, d.detail, action, t, keep=d.record)
            if d.deny is not None and self.stopped is None:
                category = P.event_category(d.kind, d.detail)
                if category in self.fatal:
                    self.stopped = {"kind": d.kind, "category": category, "t": round(t, 4)}
                    return True
        return True

    def close(self) -> None:
        self.mem.close()
        os.close(self.listener)


class _Host:
    """The supervisor's end of the channel. Sends are blocking (the host reads concurrently);
    a host that is gone makes every later send a no-op and :attr:`gone` true."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.gone = False
        self.stop: dict[str, Any] | None = None  # the host's STOP (gVisor: the policy's end)

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if self.gone:
            return
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        except OSError:
            self.gone = True

    def json(self, kind: bytes, doc: Any, fds: list[int] | None = None) -> None:
        self.send(P.json_frame(kind, doc), fds)

    def events(self, lines: list[bytes]) -> None:
        """Event lines, packed into frames of at most MAX_FRAME bytes."""
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > P.MAX_FRAME:
                self.send(P.frame(P.EVENTS, b"".join(batch)))
                batch, size = [], 0
            batch.append(line[: P.MAX_FRAME])
            size += len(line)
        if batch:
            self.send(P.frame(P.EVENTS, b"".join(batch)))

    def hung_up(self) -> bool:
        """True when the host closed its end (or sent something it never sends mid-load). A
        STOP (gVisor: the policy ends the load) is kept in :attr:`stop` instead."""
        if self.gone:
            return True
        try:
            data = self.sock.recv(512, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if data[:1] == P.STOP and self.stop is None:
            try:
                doc = json.loads(data[1:])
                t = float(doc["t"])
                self.stop = {
                    "kind": str(doc["kind"])[:40],
                    "category": str(doc["category"])[:40],
                    "t": round(t, 4) if 0 <= t < 1e7 else 0.0,
                }
                return False
            except (ValueError, KeyError, TypeError):
                pass
        self.gone = True  # EOF, an error, or an unexpected frame: the host is not waiting
        return True


def _hash_fd(fd: int, out: dict[str, Any]) -> None:
    """sha256 and size of the input, read with pread (the loader shares the file offset)."""
    try:
        out["input_sha256"], out["input_size"] = P.sha256_fd(fd)
    except OSError as exc:
        out["input_error"] = str(exc)[:200]


def _size_fd(fd: int, out: dict[str, Any]) -> None:
    """The input's size only (the host checks a large input's identity itself)."""
    try:
        out["input_size"] = os.fstat(fd).st_size
    except OSError as exc:
        out["input_error"] = str(exc)[:200]


def _bounded_result(raw: bytes) -> dict[str, Any] | None:
    """The loader's result message, reduced to known keys of bounded size; None if unreadable.
    Total: nothing the loader writes can raise out of here."""
    try:
        doc = json.loads(raw.decode("utf-8", "replace"))
        if not isinstance(doc, dict):
            return None
        out: dict[str, Any] = {"ok": doc.get("ok") is True}
        for key, limit in (
            ("kind", 64),
            ("message", 4000),
            ("type", 200),
            ("format", 64),
            ("detected", 64),
            ("handoff", 16),
        ):
            if isinstance(doc.get(key), str):
                out[key] = doc[key][:limit]
        if (
            isinstance(doc.get("tensors"), int)
            and not isinstance(doc["tensors"], bool)
            and 0 <= doc["tensors"] < 2**40
        ):
            out["tensors"] = doc["tensors"]
        return out
    except Exception:
        return None


def _seal(fd: int, limit: int) -> tuple[int, str | None]:
    """Seal an output memfd (every loader process is dead: no writable mapping is left).
    Returns (size, problem)."""
    import fcntl

    try:
        fcntl.fcntl(fd, P.F_ADD_SEALS, P.OUTPUT_SEALS)
        size = os.fstat(fd).st_size
    except OSError as exc:
        return 0, f"could not seal: {exc.strerror}"
    if limit and size > limit:
        return size, "over the output limit"
    return size, None


class _Supervisor:
    """One sandbox, one job: warm loader, job hand-off, supervision, sealed outputs."""

    def __init__(self, host: _Host, prepare: bool = True, plain: bool = False, memfds: bool = True) -> None:
        self.host = host
        self.prepare = prepare
        self.plain = plain  # gVisor: the loader's filter refuses itself; no notifications
        self.memfds = memfds  # False: no control group bounds them, so the loader's are refused
        self.start = time.monotonic()
        self.values = _canaries()
        self.log = _EventLog(self.values)
        self.sent = 0  # event lines already streamed to the host
        self.status: dict[str, Any] = {"protocol": P.PROTOCOL_VERSION, "env_keys": sorted(os.environ)}

    def stream(self) -> None:
        if self.sent < len(self.log.lines):
            self.host.events(self.log.lines[self.sent :])
            self.sent = len(self.log.lines)

    def run(self) -> None:
        canary_files = _plant(self.values)
        self.status["canaries"] = {"values": self.values, "files": canary_files}
        try:  # before the loader exists: it never holds this descriptor
            self.canary_watch: _seccomp.CanaryWatch | None = _seccomp.CanaryWatch(canary_files)
        except OSError:
            self.canary_watch = None
        env = {k: self.values[k] for k in _ENV_CANARIES}
        env["HOME"] = P.CANARY_HOME
        tensors, manifest = P.memfd_create("tensors"), P.memfd_create("manifest")
        job_sup, job_ldr = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rfd, result_w = os.pipe()
        hand_r, hand_w = os.pipe()
        ack_r, ack_w = os.pipe()
        audit_r, audit_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in (rfd, hand_r, ack_w, audit_r, self.host.sock.fileno()):
                os.close(fd)
            if self.canary_watch is not None:
                self.canary_watch.close()
            job_sup.close()
            _loader_main(
                _ChildEnds(result_w, hand_w, ack_r, audit_w, job_ldr, tensors, manifest),
                env,
                self.prepare,
                self.plain,
            )
        for fd in (result_w, hand_w, ack_r, audit_w):
            os.close(fd)
        job_ldr.close()
        if not _seccomp.wait_readable([hand_r], 300) or os.read(hand_r, 1) != b"R":
            sys.stderr.write("model-sandbox supervisor: the loader could not get ready\n")
            _kill_all()
            return  # no hello: the host reports a sandbox that could not start
        self.host.json(P.HELLO, {"protocol": P.PROTOCOL_VERSION, "pid": os.getpid(), "warm": True})
        job = self._wait_for_job(pid, rfd)
        if job is None:  # the host went away, or sent no usable job: discard the sandbox
            _kill_all()
            return
        cfg, input_fd = job
        hashed: dict[str, Any] = {}
        hasher = threading.Thread(
            target=_hash_fd if cfg.hash_input else _size_fd, args=(input_fd, hashed), daemon=True
        )
        hasher.start()
        if self.canary_watch is not None:
            self.canary_watch.begin()
        try:
            socket.send_fds(job_sup, [cfg.to_json()], [input_fd])
        except OSError:
            pass  # the loader died while warm: its result (or its absence) says so
        job_sup.close()
        self.start = time.monotonic()
        raw, wait_status, limit, resources, monitor_info = self._supervise(
            pid, cfg, rfd, hand_r, ack_w, audit_r, canary_files
        )
        hasher.join(timeout=60)
        os.close(input_fd)
        self.status.update(hashed)
        self.status["monitor"] = monitor_info
        result = _bounded_result(raw)
        self.status["result"] = result
        self.status.update(
            {
                "limit": limit,
                "timed_out": limit == "wall_clock",
                "resources": resources,
                "exit_code": os.waitstatus_to_exitcode(wait_status),
            }
        )
        if self.host.gone:
            return
        ok = bool(result and result.get("ok"))
        for name, fd in (("manifest", manifest), ("tensors", tensors)):
            size, problem = _seal(fd, cfg.max_output_bytes if name == "tensors" else 0)
            if problem == "over the output limit" and self.status["limit"] is None:
                self.status["limit"] = "output_bytes"
            if problem:
                self.status.setdefault("output_problems", {})[name] = problem
            elif ok and size and self.plain:  # gVisor: no descriptor reaches a host socket
                self.host.json(P.OUTPUT, {"name": name, "size": size, "inline": True})
                self._send_inline(fd, size)
            elif ok and size:
                self.host.json(P.OUTPUT, {"name": name, "size": size}, [fd])
            os.close(fd)
        self.stream()
        self.host.send(P.json_frame(P.STATUS, self._bounded_status()))
        self.host.send(P.frame(P.DONE, b"{}"))

    def _send_inline(self, fd: int, size: int) -> None:
        """A sealed output's bytes as CHUNK frames (every loader process is dead: nothing
        changes them while they are read)."""
        pos = 0
        while pos < size and not self.host.gone:
            chunk = os.pread(fd, min(P.MAX_FRAME, size - pos), pos)
            if not chunk:
                break
            self.host.send(P.frame(P.CHUNK, chunk))
            pos += len(chunk)

    def _bounded_status(self) -> dict[str, Any]:
        data = json.dumps(self.status, default=str).encode()
        resources = self.status.get("resources")
        if len(data) > P.MAX_FRAME and isinstance(resources, dict) and resources.get("series"):
            resources.pop("series")  # the samples over time give way first; counts are evidence
            data = json.dumps(self.status, default=str).encode()
        if len(data) > P.MAX_FRAME:
            self.status["monitor"]["counts"] = {}
            self.status["monitor"]["counts_dropped"] = True
        try:
            P.Status.from_obj(json.loads(json.dumps(self.status, default=str)))
        except P.ProtocolError as exc:  # our own bug: say so instead of a status the host refuses
            self.status = {
                "protocol": P.PROTOCOL_VERSION,
                "env_keys": self.status["env_keys"],
                "result": {
                    "ok": False,
                    "kind": "internal-error",
                    "message": f"the supervisor's status is invalid: {exc}",
                },
            }
        return self.status

    def _wait_for_job(self, loader: int, rfd: int) -> tuple[P.JobConfig, int] | None:
        """Block until the host sends a job; None when it hangs up or breaks the protocol."""
        while True:
            ready = _seccomp.wait_readable([self.host.sock.fileno()], 1.0)
            if not ready:
                if os.waitpid(loader, os.WNOHANG)[0] == loader:
                    return None  # the warm loader died (import failure): nothing can be served
                continue
            try:
                data, fds, _flags, _ = socket.recv_fds(self.host.sock, P.MAX_FRAME + 1, 2)
            except OSError:
                return None
            if not data or data[:1] != P.JOB or len(fds) != 1 or len(data) > P.MAX_FRAME + 1:
                for fd in fds:
                    os.close(fd)
                return None
            try:
                return P.JobConfig.from_json(data[1:]), fds[0]
            except P.ProtocolError:
                os.close(fds[0])
                return None

    def _supervise(
        self,
        pid: int,
        cfg: P.JobConfig,
        rfd: int,
        hand_r: int,
        ack_w: int,
        audit_r: int,
        canary_files: list[str],
    ) -> tuple[bytes, int, str | None, dict[str, Any], dict[str, Any]]:
        log, job_start = self.log, self.start
        monitor, start = _take_listener(
            pid, hand_r, ack_w, log, canary_files, cfg, self.plain, memfds=self.memfds
        )
        self.start = start  # events and samples count from the filter's start, as the loader's do
        resources = _Resources(pid, cfg.cpu_s, start)
        monitor_info: dict[str, Any] = {
            "kernel": monitor is not None,
            "filter": "plain" if self.plain else "notify",
        }
        for fd in (rfd, audit_r):
            os.set_blocking(fd, False)
        reports = _SelfReports(log)
        canaries = self.canary_watch
        monitor_info["inotify"] = canaries is not None

        def canary_events() -> None:
            """The kernel's record of the canary files' use (see ``_seccomp.CanaryWatch``)."""
            for path, what in canaries.take() if canaries is not None else ():
                detail = {"path": path, "class": "canary", "event": what}
                log.add("kernel", "inotify", detail, "recorded", time.monotonic() - start)

        chunks: list[bytes] = []
        received = 0
        wait_status: int | None = None
        limit: str | None = None
        open_fds = [rfd, audit_r]
        host_fd = self.host.sock.fileno()
        while wait_status is None:
            watch = open_fds + [host_fd] + ([monitor.listener] if monitor else [])
            if canaries is not None:
                watch.append(canaries.fd)
            ready = _seccomp.wait_readable(watch, resources.wait_s(time.monotonic(), 0.05))
            if canaries is not None and canaries.fd in ready:
                canary_events()
            if host_fd in ready and self.host.hung_up():
                break  # nobody is waiting for this load: end it now
            if self.host.stop is not None:  # gVisor: the host saw a fatal refusal in the trace
                self.status["stopped"] = self.host.stop
                break
            if monitor and monitor.listener in ready and not monitor.serve():
                monitor.close()
                monitor = None
            if monitor and monitor.stopped:
                self.status["stopped"] = monitor.stopped  # a fatal event: the load ends here
                break
            for fd in (rfd, audit_r):
                if fd in ready and fd in open_fds:
                    data = _read_some(fd)
                    if data is None:
                        continue
                    if not data:
                        open_fds.remove(fd)
                    elif fd == audit_r:
                        reports.feed(data)
                    elif received < _RESULT_LIMIT:
                        chunks.append(data)
                        received += len(data)
            self.stream()  # evidence leaves the sandbox as soon as it is recorded
            done, st = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                wait_status = st
                break
            wait_status = _reap_others(pid)
            if wait_status is not None:
                break
            now = time.monotonic()
            if now - job_start > cfg.wall_clock_s:
                limit = "wall_clock"
                break
            if resources.due(now):
                resources.sample(now)
                if resources.over_limit():
                    limit = "cpu"
                    break
        elapsed = time.monotonic() - start
        reaped = _kill_all()
        canary_events()  # what the kernel queued before the loader ended
        if wait_status is None:
            wait_status = reaped.get(pid, signal.SIGKILL)
        if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGSYS:
            # the loader's filter kills it for a call no load makes (io_uring, userfaultfd, a new
            # namespace: _seccomp.KILLED), which the container would refuse without a trace
            log.add(
                "kernel",
                "seccomp_kill",
                {"signal": "SIGSYS", "calls": sorted(_seccomp.KILLED)},
                "denied",
                elapsed,
            )
        if monitor:
            monitor_info.update(notifications=monitor.notifications, vanished=monitor.vanished)
            monitor.close()
        for fd in (rfd, audit_r):
            while fd in open_fds and (data := _read_some(fd)):
                if fd == audit_r:
                    reports.feed(data)
                elif received < _RESULT_LIMIT:
                    chunks.append(data)
                    received += len(data)
            os.close(fd)
        log.finish(time.monotonic() - start)
        monitor_info.update(log.summary())
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.status["usage"] = {
            "wall_s": round(elapsed, 4),
            "cpu_user_s": round(usage.ru_utime, 3),
            "cpu_system_s": round(usage.ru_stime, 3),
            "max_rss_kb": usage.ru_maxrss,
        }
        return b"".join(chunks)[:_RESULT_LIMIT], wait_status, limit, resources.finish(), monitor_info


def _read_some(fd: int) -> bytes | None:
    """Bytes from a non-blocking pipe: None when none are waiting, b"" at its end."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _take_listener(
    pid: int,
    hand_r: int,
    ack_w: int,
    log: _EventLog,
    canary_files: list[str],
    cfg: P.JobConfig,
    plain: bool = False,
    *,
    memfds: bool = True,
) -> tuple[_Monitor | None, float]:
    """Copy the loader's listener fd into this process, then let the loader close its own.
    ``plain`` (gVisor): the loader only says that its plain filter is in; nothing to take.
    Returns the monitor and when monitoring began (the handshake: the clock of the evidence)."""
    monitor = None
    if plain:
        ok = _seccomp.wait_readable([hand_r], 30) and os.read(hand_r, 32) == PLAIN_HANDOFF
        start = time.monotonic()
    else:
        start = time.monotonic()
        try:
            if _seccomp.wait_readable([hand_r], 30):
                number = os.read(hand_r, 32)
                start = time.monotonic()
                if number.isdigit():
                    listener = _seccomp.take_fd(pid, int(number))
                    monitor = _Monitor(listener, pid, log, canary_files, start, cfg, memfds=memfds)
        except OSError:
            monitor = None
        ok = monitor is not None
    try:
        os.write(ack_w, b"ok" if ok else b"no")
    except OSError:
        pass
    os.close(hand_r)
    os.close(ack_w)
    return monitor, start


def _reap_others(loader: int) -> int | None:
    """As PID 1, collect orphans that the loader left behind. Returns the loader's wait status
    if it happened to be among them."""
    try:
        while True:
            pid, st = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return None
            if pid == loader:
                return st
    except ChildProcessError:
        return None


def _kill_all() -> dict[int, int]:
    """SIGKILL every other process in the container, then reap them. Returns their statuses."""
    reaped: dict[int, int] = {}
    try:
        os.kill(-1, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.01)
        else:
            reaped[pid] = st
    return reaped


def _connect() -> socket.socket:
    """The host's socket, waited for briefly (it exists before the container starts)."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(P.SOCKET_PATH)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    if STAGE2 not in argv:
        os.execve(sys.executable, [sys.executable, "-I", "-m", "sandbox_worker", STAGE2, *argv], {})
    # PID 1 in its namespace gets only the signals it has handlers for: drop Python's SIGINT
    # handler so that nothing the loader sends can interrupt us, and stay non-dumpable so that
    # the loader can neither read our memory nor take our descriptors.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _seccomp.prctl(_seccomp.PR_SET_DUMPABLE, 0)
    for arg in argv:  # the bwrap runner's process limit: set here, inside the user namespace,
        # it counts this sandbox's processes and threads only (every later one inherits it)
        if arg.startswith(P.NPROC) and arg[len(P.NPROC) :].isdigit():
            n = int(arg[len(P.NPROC) :])
            resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
    try:
        sock = _connect()
    except OSError as exc:
        sys.stderr.write(f"model-sandbox supervisor: cannot reach the host's channel: {exc}\n")
        return 6
    _Supervisor(
        _Host(sock),
        prepare=P.COLD not in argv,
        plain=P.PLAIN_FILTER in argv,
        memfds=P.SHMEM_UNBOUNDED not in argv,
    ).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
