"""Fakes shared by the tests that need no daemon: a runner that plays the container (benign
files only, loaded in this process by the worker's own code, its outputs sealed in memfds as the
supervisor does), the small batch helpers built on it, and a starting runner whose
sandboxes run no load (for the pool's own logic). The real sandbox is tested in
tests/container and tests/adversarial; the helpers those tests share (a batch's snapshot, a
report's finding) live here too."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sandbox import _batch
from sandbox._batch import BatchOptions, BatchSummary, run_batch
from sandbox._channel import Received
from sandbox._launch import ContainerSpec, Job, RunResult
from sandbox._worker import _loader
from sandbox._worker import _protocol as P
from sandbox.errors import EngineError
from sandbox.report import Event, Finding, LoadReport, Severity, Verdict
from tests import checkpoints as ck

HOSTILE_NAME = 'evil<script>alert(1)</script>"\u202e.pt'


@dataclass
class Played:
    """What the fake sandbox sends: a test may change any of it before it is sealed."""

    input_name: str
    manifest: bytes | None = None
    tensors: bytes | None = None


def manifest_of(ex: Any, fmt: str = "x") -> P.Manifest:
    """The manifest the sandbox sends for the worker's extraction ``ex``, as the host reads it."""
    return P.Manifest.from_obj(
        {
            "protocol": P.PROTOCOL_VERSION,
            "format": fmt,
            "tensors": ex.entries,
            "views": ex.views,
            "skeleton": ex.skeleton,
        }
    )


def sealed(data: bytes, name: str = "out") -> int:
    fd = P.memfd_create(name)
    os.write(fd, data)
    fcntl.fcntl(fd, P.F_ADD_SEALS, P.OUTPUT_SEALS)
    return fd


def play(obj: Any, fmt: str, loc: dict[int, str], write_tensors: bool) -> tuple[bytes, bytes]:
    """(manifest, tensors) as the loader writes them."""
    t_fd, m_fd = P.memfd_create("t"), P.memfd_create("m")
    try:
        _loader.write_outputs(obj, fmt, loc, tensors_fd=t_fd, manifest_fd=m_fd, tensors=write_tensors)
        return (os.pread(m_fd, os.fstat(m_fd).st_size, 0), os.pread(t_fd, os.fstat(t_fd).st_size, 0))
    finally:
        os.close(t_fd)
        os.close(m_fd)


class FakeRunner:
    """Does what the container does, in-process, then lets a test tamper with what is sent."""

    def __init__(
        self,
        tamper: Callable[[Played, dict[str, Any]], None] | None = None,
        run_result: RunResult | None = None,
        *,
        layout: bool = False,
    ) -> None:
        self.tamper = tamper
        self.run_result = run_result
        self.layout = layout  # play the layout hand-off for plain state dicts
        self.specs: list[ContainerSpec] = []
        self.jobs: list[Job] = []

    def ensure_image(self) -> str:
        return "model-sandbox-worker:fake"

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        self.specs.append(spec)
        self.jobs.append(job)
        source = _loader.Input(job.input_fd)
        digest, size = P.sha256_fd(job.input_fd)
        played = Played(os.path.basename(os.readlink(f"/proc/self/fd/{job.input_fd}")))
        status: dict[str, Any] = {
            "protocol": P.PROTOCOL_VERSION,
            "env_keys": [],
            "input_sha256": digest if job.config.hash_input else None,  # as the supervisor: small inputs
            "input_size": size,
            "exit_code": 0,
            "usage": {"wall_s": 0.1, "cpu_user_s": 0.08, "cpu_system_s": 0.02, "max_rss_kb": 90_000},
        }
        layout = _loader.try_layout(source) if self.layout and job.config.layout else None
        try:
            if layout is not None:
                fd = P.memfd_create("m")
                _loader.write_layout(layout, manifest_fd=fd)
                played.manifest = os.pread(fd, os.fstat(fd).st_size, 0)
                os.close(fd)
                status["result"] = {"ok": True, "format": "torch-zip", "handoff": "layout"}
            else:
                obj, fmt, loc = _loader.load(source)
                played.manifest, played.tensors = play(obj, fmt, loc, job.config.write_tensors)
                status["result"] = {"ok": True, "format": fmt}
        except _loader.LoaderError as exc:
            status["result"] = {"ok": False, "kind": exc.kind, "message": str(exc), "detected": exc.detected}
            status["exit_code"] = 3
        if self.tamper:
            self.tamper(played, status)
        result = self.run_result or RunResult(exit_code=0)
        got = Received(status=json.dumps(status).encode(), completed=True, closed=True)
        if played.manifest is not None:
            got.outputs["manifest"] = sealed(played.manifest)
        if played.tensors:
            got.outputs["tensors"] = sealed(played.tensors)
        result.received = got
        return result


class Fake(FakeRunner):
    """FakeRunner that plays a hostile load (the input swapped under the sandbox, as in
    test_api) for inputs named ``evil*``, and remembers every input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[str] = []
        self._serial = threading.Lock()  # self.tamper is per load; the batch runs loads in threads

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        with self._serial:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{job.input_fd}"))
            self.inputs.append(name)
            if name.startswith("evil"):

                def swap(out: Played, status: dict[str, Any]) -> None:
                    status["input_sha256"] = "f" * 64

                self.tamper = swap
            else:
                self.tamper = None
            return super().run(spec, job)


class FakeBox:
    """A warm sandbox of :class:`FakeStartingRunner`. Like a real one it runs one job and then
    discards itself (a second job is refused); ``dead`` plays a sandbox that died while it
    waited, ``discard_error`` an engine that fails to remove it."""

    def __init__(self, runner: FakeStartingRunner, spec: ContainerSpec, prepare: bool, serial: int) -> None:
        self.runner = runner
        self.spec = spec
        self.prepare = prepare
        self.serial = serial
        self.hello: P.Hello | None = None
        self.dead = False
        self.discard_error: Exception | None = None
        self.jobs: list[Job] = []
        self.discards = 0

    def alive(self) -> bool:
        return not self.dead and not self.discards

    def run(self, job: Job) -> RunResult:
        with self.runner.cond:
            self.jobs.append(job)
            if len(self.jobs) > 1 or self.discards:
                raise AssertionError(f"sandbox {self.serial} was handed a second job, or after its discard")
        try:
            self.runner.on_run(self)
            # the supervisor's status says how the tensors were handed off (compact JSON, as sent)
            result = {"ok": True, "format": "torch-zip", "handoff": self.runner.handoff}
            status = json.dumps({"protocol": P.PROTOCOL_VERSION, "result": result}, separators=(",", ":"))
            out = RunResult(exit_code=0, runner=self.runner.name)
            out.received = Received(status=status.encode(), completed=True, closed=True)
            out.notes.append(f"box {self.serial}")
            return out
        finally:
            self.discard(background=True)

    def discard(self, *, keep_logs: bool = False, background: bool = False) -> None:
        with self.runner.cond:
            self.discards += 1
            self.runner.cond.notify_all()
        if self.discard_error is not None:
            raise self.discard_error


class FakeStartingRunner:
    """A :class:`~sandbox._launch.StartingRunner` without containers, for :class:`~sandbox.Pool`:
    :meth:`start` hands out :class:`FakeBox` es and records every call. A test can make starts
    fail (``down``: all of them; ``fail_next``: that many) or hold them (``hold`` is called
    first by every start, in the starting thread, and may block)."""

    name = "fake"

    def __init__(self, *, fail_next: int = 0, handoff: str = "memfd") -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[ContainerSpec, bool]] = []  # every start(): (spec, prepare)
        self.boxes: list[FakeBox] = []  # every sandbox started, in order
        self.in_flight = 0
        self.failures = 0
        self.down = False
        self.fail_next = fail_next
        self.handoff = handoff  # what the next job's status says: "memfd" (full loader) or "layout"
        self.hold: Callable[[], object] = lambda: None
        self.on_run: Callable[[FakeBox], object] = lambda box: None

    def ensure_image(self) -> str:
        return "model-sandbox-worker:fake"

    def start(self, spec: ContainerSpec, *, connect_s: float = 120.0, prepare: bool = True) -> FakeBox:
        with self.cond:
            self.calls.append((spec, prepare))
            self.in_flight += 1
            self.cond.notify_all()
        try:
            self.hold()
            with self.cond:
                if self.down or self.fail_next > 0:
                    self.fail_next = max(0, self.fail_next - 1)
                    self.failures += 1
                    raise EngineError("could not start the sandbox: the engine is gone")
                box = FakeBox(self, spec, prepare, len(self.boxes))
                self.boxes.append(box)
            return box
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()

    def run(self, spec: ContainerSpec, job: Job) -> RunResult:
        return self.start(spec, prepare=False).run(job)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
        """Whether ``predicate`` (read under this runner's lock) came true within ``timeout_s``."""
        with self.cond:
            return self.cond.wait_for(predicate, timeout_s)

    @property
    def live(self) -> list[FakeBox]:
        """Sandboxes started and not discarded."""
        with self.cond:
            return [box for box in self.boxes if not box.discards]


def tree(root: Path) -> Path:
    """A small input tree with odd names, symlinks, non-model and broken files."""
    src = root / "src"
    (src / "a" / "b").mkdir(parents=True)
    ck.save(ck.state_dict(), src / "a" / "b" / "x.pt")
    ck.save({"w": torch.ones(2)}, src / "a" / "b" / "x.bin")  # same stem as x.pt
    (src / "sp ace ü").mkdir()
    ck.save({"w": torch.zeros(3)}, src / "sp ace ü" / "modèle 1.ckpt")
    ck.save(ck.state_dict(), src / "legacy.pth", fmt="legacy")
    ck.save({"w": torch.arange(3)}, src / "no_extension")
    (src / "notes.txt").write_text("not a model")
    (src / "empty.pt").write_bytes(b"")
    save_file({"w": torch.ones(1)}, str(src / "done.safetensors"))
    os.symlink("a/b/x.pt", src / "inside-link.pt")  # stays inside: followed
    outside = root / "outside.pt"
    ck.save(ck.state_dict(), outside)
    os.symlink(outside, src / "outside-link.pt")  # leaves SRC: skipped
    os.symlink("a", src / "dir-link")  # symlinked dir: skipped
    os.symlink("missing.pt", src / "broken-link.pt")
    return src


def batch(src: Path | list[Path], out: Path, runner: FakeRunner | None = None, **kw: Any) -> BatchSummary:
    sources = src if isinstance(src, list) else [src]
    return run_batch(sources, out, BatchOptions(jobs=2, **kw), runner=runner or Fake())


def by_rel(summary: BatchSummary) -> dict[str, _batch.ItemResult]:
    return {r.rel: r for r in summary.results}


UNSTABLE = ("started", "finished", "duration_s", "report_sha256", "output_sha256")


def strip_times(records: dict[str, _batch.ItemResult]) -> dict[str, dict[str, Any]]:
    return {k: {f: v for f, v in r.to_record().items() if f not in UNSTABLE} for k, r in records.items()}


def st_content(path: Path) -> tuple[dict[str, Any], bytes]:
    """A SafeTensors file's header (as data) and tensor bytes."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def snapshot(outdir: Path) -> dict[str, Any]:
    files: dict[str, Any] = {}
    for p in sorted(outdir.rglob("*")):
        rel = p.relative_to(outdir).as_posix()
        if p.is_dir() or rel in (_batch.MANIFEST_NAME, _batch.LOCK_NAME):
            continue
        if p.suffix == ".safetensors":
            files[rel] = st_content(p)
        else:
            report = json.loads(p.read_text())
            files[rel] = (
                report["verdict"],
                sorted(f["rule"] for f in report["findings"]),
                (report["error"] or {}).get("reference"),
            )
    manifest = {
        k: {f: v for f, v in r.to_record().items() if f not in UNSTABLE}
        for k, r in _batch.read_manifest(outdir).items()
    }
    return {"files": files, "manifest": manifest}


def finding(report: LoadReport, rule: str) -> Finding:
    """The report's first finding of ``rule``; there must be one."""
    found = [f for f in report.findings if f.rule == rule]
    assert found, f"no {rule} finding in {[f.rule for f in report.findings]}"
    return found[0]


def hostile_report() -> LoadReport:
    """A report whose every string is hostile markup (for the HTML page's tests)."""
    r = LoadReport(
        input_path=HOSTILE_NAME,
        input_sha256="ab" * 32,
        input_size=10,
        format="torch-zip",
        verdict=Verdict.MALICIOUS,
        duration_s=1.5,
        static={"dangerous": ["builtins.eval"], "unknown": []},
        resources={
            "wall_s": 1.2,
            "rss_peak_bytes": 5 * 2**20,
            "threads_peak": 2,
            "custom": "<b>x</b>",
            "series": [[0.0, 0.0, 2**20], [0.1, 0.1, 3 * 2**20], [0.2, 0.15, 5 * 2**20]],
        },
    )
    r.events = [
        Event(
            1, 0.010, "self_reported", "pickle.find_class", {"module": "collections", "name": "OrderedDict"}
        ),
        Event(2, 0.011, "self_reported", "pickle.find_class", {"module": "__builtin__", "name": "eval"}),
        Event(3, 0.012, "kernel", "execve", {"path": "/bin/sh", "argv": ["sh", "-c", "</style>"]}, "denied"),
        Event(
            4,
            0.013,
            "self_reported",
            "pickle.find_class",
            {"module": "torch._utils", "name": "_rebuild_tensor_v2"},
        ),
        Event(
            5,
            0.014,
            "kernel",
            "connect",
            {"family": "AF_INET", "target": "AF_INET 127.0.0.1:9", "address": "127.0.0.1", "port": 9},
            "denied",
        ),
    ]
    r.findings = [
        Finding(
            "exec-attempt",
            Severity.CRITICAL,
            "exec",
            "the load tried to run a program",
            {"argv": ["sh", "-c", "<img src=x onerror=alert(1)>"]},
            (3,),
        ),
        Finding(
            "network-connect",
            Severity.CRITICAL,
            "network",
            "reach <a href='x'>",
            {"event": "connect \x1b[2J"},
            (5, 99),
        ),
    ]
    return r


# -- classic BPF --------------------------------------------------------------------------------
def run_bpf(program: bytes, nr: int, args: tuple[int, ...] = (), arch: int = P.AUDIT_ARCH_X86_64) -> int:
    """Evaluate a classic BPF seccomp program on ``struct seccomp_data``."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    ins: list[tuple[int, int, int, int]] = [
        struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)
    ]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = ins[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            acc = int(struct.unpack_from("<I", data, k)[0])
        elif code == 0x54:  # and #k
            acc &= k
        elif code in (0x15, 0x35, 0x45):  # jeq, jge, jset
            hit = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += jt if hit else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected instruction 0x{code:x}")
