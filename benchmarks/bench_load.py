"""Sandboxed loads and conversions against in-process torch, on the same files, in one run.

One command prints, for each case, the median and the range (min-max) of ``--repeat`` timed
runs, the peak host RSS the case added to this process, and a ratio (ours / baseline):

* state dicts of ``--sizes-mb`` (default 10,100,1024) and a pickled ``nn.Module``
  (``--module-mb``, default 1024; 0 skips it):
  in-process ``torch.load`` (``weights_only=True``, ``weights_only=False``, ``mmap=True``), an
  in-process "HF-style conversion" (``torch.load`` + ``safetensors.torch.save_file``), and
  ours: ``safe_load`` cold (a fresh container per call), warm (a ``Pool(size=1)`` with a ready
  sandbox waiting; the warm-up is not timed), back-to-back through the pool (no waiting), and
  ``Pool.convert`` warm;
* batch conversion of ``--small-files`` small files and ``--big-files`` files of
  ``--big-file-mb``: ``run_batch`` with ``--jobs`` (default: the number of cores) against
  ``torch.load`` + ``save_file`` in as many processes, as files/s and MB/s; through the Docker
  runner and, where bubblewrap can run, the daemonless bwrap runner; beside the small files,
  the engine's floor: as many containers that run an empty interpreter, as many at once (one
  container per file costs that much on this machine before any sandbox work);
* ``model-sandbox convert small.pt -o out`` in a new process, end to end;

then one MET/MISSED line per performance target. Asserts nothing; a case that raises prints
``failed: <message>`` and the run goes on. Needs a Docker engine and the worker image.

    .venv/bin/python benchmarks/bench_load.py            # full size: ~3 GB of disk, tens of minutes
    .venv/bin/python benchmarks/bench_load.py --tiny     # every row on tiny inputs, ~1-2 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402  (after the path fix above)
from sandbox import _batch, _launch  # noqa: E402
from sandbox._worker import _protocol as P  # noqa: E402

MB = 2**20  # every "MB" printed is 2**20 bytes
NAME_W = 45

# The targets: (label, threshold). Checked at the end against the medians.
WARM_SMALL_MB, WARM_SMALL_EXTRA_S = 10, 0.3  # warm safe_load <= torch.load + 0.3 s
BIG_MB, BIG_MAX_RATIO = 1024, 1.25  # 1 GB state dict <= 1.25x torch.load(w_o=False)
MODULE_MAX_RATIO = 3.0  # 1 GB module <= 3x torch.load(w_o=False)
BATCH_MIN_SPEED = 0.5  # 12 x 100 MB batch >= 0.5x in-process MB/s
SMALL_MIN_FILES_S = 5.0  # 200 small files >= 5 files/s
CLI_MAX_S = 1.0  # cold CLI convert of a small file < 1 s


# -- measuring ---------------------------------------------------------------------------------


def _rss() -> int | None:
    """Resident set size of this process (bytes), from /proc/self/statm; None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakRss:
    """Peak RSS of this process above its level on entry: sampled on entry, every ``period_s``
    by a thread, and on exit (while the caller still holds the call's result). A spike
    shorter than the period, or one while a C call holds the GIL, can be missed."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.base: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = _rss()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> PeakRss:
        self.base = _rss()
        self.peak = self.base
        if self.base is not None:
            self._thread = threading.Thread(target=self._loop, name="bench-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def added(self) -> int | None:
        return None if self.base is None or self.peak is None else self.peak - self.base


@dataclass
class Result:
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    note: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def peak(self) -> int | None:
        return max(self.peaks) if self.peaks else None


def _failure(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text[:240]


def _give_back_memory() -> None:
    """Return the memory this process has freed to the system (glibc's ``malloc_trim``), so
    that the next call pays for fresh pages like a first load does, whichever row it is: a
    repeated ``torch.load`` of one file otherwise reuses the heap its last call freed (1 GB:
    0.24 s against 0.52 s on this project's machine)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(
    fn: Callable[[], Any],
    repeat: int,
    *,
    before: Callable[[], None] | None = None,
    untimed_first: bool = False,
    track_rss: bool = True,
) -> Result:
    """Time ``repeat`` calls of ``fn``; ``before`` runs (untimed) ahead of each one."""
    res = Result()
    try:
        if untimed_first:
            fn()
        for _ in range(repeat):
            if before is not None:
                before()
            gc.collect()
            _give_back_memory()
            with PeakRss() if track_rss else contextlib.nullcontext() as rss:
                start = time.perf_counter()
                value = fn()
                res.times.append(time.perf_counter() - start)
            del value
            if isinstance(rss, PeakRss) and rss.added is not None:
                res.peaks.append(rss.added)
    except Exception as exc:
        res.error = _failure(exc)
    return res


# -- printing ----------------------------------------------------------------------------------


def out(line: str = "") -> None:
    print(line, flush=True)


def _s(x: float) -> str:
    return f"{x:.3f}"


def _mb(n: int | None) -> str:
    if n is None:
        return "-"
    mb = n / MB
    return f"+{mb:.0f} MB" if mb >= 10 else f"+{mb:.1f} MB"


def _ratio(res: Result, ref: Result | None) -> str:
    if ref is None or not ref.ok or not res.ok or ref.median <= 0:
        return "-"
    r = res.median / ref.median
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def time_header() -> None:
    out(f"  {'case':<{NAME_W}} {'median s':>9} {'min-max s':>15} {'peak RSS':>9} {'ratio':>7}  note")


def time_row(name: str, res: Result, ref: Result | None = None, note: str = "") -> None:
    if not res.ok:
        out(f"  {name:<{NAME_W}} failed: {res.error or 'no run'}")
        return
    rng = f"{_s(min(res.times))}-{_s(max(res.times))}"
    out(
        f"  {name:<{NAME_W}} {_s(res.median):>9} {rng:>15} {_mb(res.peak):>9} "
        f"{_ratio(res, ref):>7}  {' '.join(x for x in (res.note, note) if x)}".rstrip()
    )


def rate_header() -> None:
    out(
        f"  {'case':<{NAME_W}} {'median s':>9} {'min-max s':>15} {'files/s':>8} {'MB/s':>8} "
        f"{'peak RSS':>9} {'ratio':>7}  note"
    )


def rate_row(name: str, res: Result, files: int, nbytes: int, ref: Result | None = None) -> None:
    if not res.ok:
        out(f"  {name:<{NAME_W}} failed: {res.error or 'no run'}")
        return
    rng = f"{_s(min(res.times))}-{_s(max(res.times))}"
    out(
        f"  {name:<{NAME_W}} {_s(res.median):>9} {rng:>15} {files / res.median:>8.2f} "
        f"{nbytes / MB / res.median:>8.2f} {_mb(res.peak):>9} {_ratio(res, ref):>7}  {res.note}".rstrip()
    )


# -- inputs ------------------------------------------------------------------------------------


def _layers(mb: float, d: int) -> int:
    return max(1, round(mb * MB / (4 * (d * d + d))))


def _width(mb: float) -> int:
    return 1024 if mb >= 64 else 256


def write_state_dict(path: Path, mb: float, seed: int = 0) -> tuple[int, int]:
    """A float32 state dict of about ``mb`` MB: layers of a (d, d) weight and a (d,) bias.
    Returns (file size, tensor count)."""
    gen = torch.Generator().manual_seed(seed)
    d = _width(mb)
    n = _layers(mb, d)
    sd = {}
    for i in range(n):
        sd[f"layers.{i}.weight"] = torch.randn(d, d, generator=gen)
        sd[f"layers.{i}.bias"] = torch.randn(d, generator=gen)
    torch.save(sd, path)
    return path.stat().st_size, len(sd)


def write_module(path: Path, mb: float) -> tuple[int, int]:
    """``torch.save`` of an ``nn.Sequential`` of ``nn.Linear`` layers, about ``mb`` MB."""
    torch.manual_seed(0)
    d = _width(mb)
    model = torch.nn.Sequential(*(torch.nn.Linear(d, d) for _ in range(_layers(mb, d))))
    torch.save(model, path)
    return path.stat().st_size, len(model.state_dict())


def write_small(path: Path, kb: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cols = max(1, round(kb * 1024 / 4 / 4 / 64))
    torch.save({f"t{i}": torch.randn(64, cols, generator=gen) for i in range(4)}, path)


def write_many_big(folder: Path, count: int, mb: float) -> None:
    """``count`` distinct state dicts of about ``mb`` MB (one element differs per file)."""
    gen = torch.Generator().manual_seed(1)
    d = _width(mb)
    sd = {f"layers.{i}.weight": torch.randn(d, d, generator=gen) for i in range(_layers(mb, d))}
    first = sd["layers.0.weight"]
    for k in range(count):
        first[0, 0] = float(k)
        torch.save(sd, folder / f"big-{k:03d}.pt")


# -- the in-process baselines ------------------------------------------------------------------


def hf_style_convert(src: str, dst: str, weights_only: bool = True) -> int:
    """What an in-process converter does: unpickle, then write SafeTensors (no fsync)."""
    obj = torch.load(src, map_location="cpu", weights_only=weights_only)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    save_file({k: v.contiguous() for k, v in obj.items()}, dst)
    return os.path.getsize(src)


def sha256_file(path: str) -> str:
    """The file's sha256 alone, read in pieces into one buffer (``_protocol.sha256_fd``, as
    ``scan`` and ``convert`` take it; ``safe_load`` of a plain state dict hashes the bytes it
    reads into the tensors): what no load of ours can be faster than."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return P.sha256_fd(fd)[0]
    finally:
        os.close(fd)


def empty_containers(count: int, jobs: int) -> int:
    """The engine's own floor: ``count`` containers of the worker image that run an empty
    interpreter (``python3 -I -S -c pass``, no network), created, started, waited for and removed
    through the engine client, ``jobs`` at a time. No sandbox work at all: what one container per
    file costs on this machine before the first byte of a checkpoint is read."""
    runner = _launch.DockerRunner()
    image, engine = runner.ensure_image(), runner.engine
    tasks = iter(range(count))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if errors or next(tasks, None) is None:
                    return
            try:
                cid = engine.create(
                    {
                        "Image": image,
                        "Entrypoint": ["/opt/python/bin/python3", "-I", "-S", "-c", "pass"],
                        "Cmd": [],
                        "Labels": {"model-sandbox.bench": "floor"},
                        "HostConfig": {"NetworkMode": "none"},
                    }
                )
                try:
                    engine.start(cid)
                    engine.wait(cid, 60.0)
                finally:
                    engine.remove(cid)
            except BaseException as exc:  # reported by the row, after every thread ends
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return count


def in_process_batch(pairs: Sequence[tuple[str, str]], jobs: int) -> int:
    """``hf_style_convert`` over ``pairs`` in ``jobs`` spawned processes (their start-up, each
    importing torch, is counted, as the sandbox batch's start-up is)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return sum(pool.map(hf_style_convert, [s for s, _ in pairs], [d for _, d in pairs]))


_NEW_PROCESS_BASELINE = (
    "import sys, torch; from safetensors.torch import save_file; "
    "save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])"
)


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    pool: sandbox.Pool
    results: dict[str, Result] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    bwrap: bool = False  # the batches run through the daemonless runner too

    def settle(self) -> None:
        """Let background work end before a timed call: containers being removed (the
        sandbox removes a used one in a thread of that name) and the pool's refill."""
        for t in threading.enumerate():
            if t.name == "model-sandbox-remove":
                t.join(timeout=60)
        with contextlib.suppress(Exception):  # no engine or image: the sandboxed rows say so
            self.pool.warm(wait=True)

    def warm_counted(self, fn: Callable[[], Any], *, settle_each: bool) -> Result:
        """``fn`` through the pool; the note says how many calls found a ready sandbox."""
        w0, c0 = self.pool.served_warm, self.pool.served_cold
        if not settle_each:
            self.settle()  # one ready sandbox at the start of the series, then no waiting
        res = measure(fn, self.args.repeat, before=self.settle if settle_each else None)
        warm = self.pool.served_warm - w0
        res.note = f"warm {warm}/{warm + self.pool.served_cold - c0}"
        return res

    # -- one file, every way --------------------------------------------------------------------
    def loads(self, key: str, title: str, path: Path, *, module: bool) -> None:
        out()
        out(f"== {title} ==")
        time_header()
        r = self.args.repeat
        p = str(path)
        dst = str(path.with_suffix(".hf.safetensors"))
        wo_true = not module
        res: dict[str, Result] = {}
        self.settle()
        if not module:
            res["load_wo"] = measure(lambda: torch.load(p, weights_only=True), r, untimed_first=True)
        res["load"] = measure(lambda: torch.load(p, weights_only=False), r, untimed_first=True)
        res["load_mmap"] = measure(
            lambda: torch.load(p, mmap=True, weights_only=wo_true), r, untimed_first=True
        )
        res["hf"] = measure(lambda: hf_style_convert(p, dst, wo_true), r, untimed_first=True)
        res["sha256"] = measure(lambda: sha256_file(p), r, untimed_first=True, track_rss=False)
        ref, hf = res["load"], res["hf"]
        mmap_name = f"torch.load(mmap=True, weights_only={wo_true})"
        if not module:
            time_row("torch.load(weights_only=True)", res["load_wo"], ref)
        else:
            out(
                f"  {'torch.load(weights_only=True)':<{NAME_W}} not run: torch refuses a pickled "
                "nn.Module unless weights_only=False"
            )
        time_row("torch.load(weights_only=False)", ref, ref, "(ratio reference)")
        time_row(mmap_name, res["load_mmap"], ref)
        time_row(f"HF-style convert (load w_o={wo_true} + save_file)", hf, ref)
        # every load of ours includes the file's sha256: one stream, one core, whatever else runs
        time_row("sha256 of the file alone (part of ours)", res["sha256"], ref)

        kw: dict[str, Any] = {"weights_only": False} if module else {}
        if module:
            out("  (ours below: safe_load(path, weights_only=False), which returns the state_dict)")

        def cold() -> Any:
            return sandbox.safe_load(p, runner=_launch.DockerRunner(), **kw)

        res["cold"] = measure(cold, r, before=self.settle)
        time_row("ours: safe_load cold (fresh container)", res["cold"], ref)
        res["warm"] = self.warm_counted(lambda: self.pool.safe_load(p, **kw), settle_each=True)
        time_row("ours: safe_load warm (Pool, ready)", res["warm"], ref)
        res["b2b"] = self.warm_counted(lambda: self.pool.safe_load(p, **kw), settle_each=False)
        time_row("ours: safe_load Pool back-to-back", res["b2b"], ref)
        sdst = str(path.with_suffix(".ours.safetensors"))
        res["convert"] = self.warm_counted(lambda: self.pool.convert(p, sdst), settle_each=True)
        time_row("ours: Pool.convert warm (ratio vs HF-style)", res["convert"], hf)
        for name, value in res.items():
            self.results[f"{key}:{name}"] = value
        for leftover in (dst, sdst, sdst + ".report.json"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)

    def state_dicts(self) -> None:
        for mb in self.args.sizes:
            path = self.tmp / f"sd-{mb:g}mb.pt"
            try:
                size, count = write_state_dict(path, mb)
            except Exception as exc:
                out(f"\n== state dict, {mb:g} MB ==\n  failed: writing the file: {_failure(exc)}")
                continue
            self.info[f"sd:{mb:g}"] = size
            self.loads(
                f"sd:{mb:g}", f"state dict, {size / MB:.1f} MB, {count} float32 tensors", path, module=False
            )
            path.unlink()

    def module(self) -> None:
        mb = self.args.module_mb
        if mb <= 0:
            return
        path = self.tmp / f"module-{mb:g}mb.pt"
        try:
            size, count = write_module(path, mb)
        except Exception as exc:
            out(f"\n== pickled nn.Module, {mb:g} MB ==\n  failed: writing the file: {_failure(exc)}")
            return
        self.info["module"] = size
        self.loads(
            "module",
            f"pickled nn.Module (nn.Sequential of nn.Linear), {size / MB:.1f} MB, {count} tensors",
            path,
            module=True,
        )
        path.unlink()

    # -- batches --------------------------------------------------------------------------------
    def batch(self, key: str, title: str, src: Path) -> None:
        files = sorted(src.iterdir())
        nbytes = sum(f.stat().st_size for f in files)
        jobs = self.args.jobs
        self.info[key] = (len(files), nbytes)
        out()
        out(f"== batch: {title}, {len(files)} files, {nbytes / MB:.1f} MB in all, jobs={jobs} ==")
        rate_header()
        runs = iter(range(1_000_000))

        def fresh_dir() -> Path:
            d = self.tmp / f"{key}-out-{next(runs)}"
            d.mkdir()
            return d

        def baseline() -> int:
            d = fresh_dir()
            try:
                return in_process_batch([(str(f), str(d / (f.stem + ".safetensors"))) for f in files], jobs)
            finally:
                shutil.rmtree(d, ignore_errors=True)

        def ours(runner: str | None = None) -> _batch.BatchSummary:
            d = fresh_dir()  # a fresh OUTDIR: nothing is resumed
            try:
                summary = _batch.run_batch([src], d, _batch.BatchOptions(jobs=jobs, runner=runner))
            finally:
                shutil.rmtree(d, ignore_errors=True)
            if summary.stopped:
                raise RuntimeError(f"batch stopped: {summary.stopped}")
            bad = [x for x in summary.results if x.status is not _batch.Status.CONVERTED]
            if bad or summary.not_done or len(summary.results) != len(files):
                why = f"; first: {bad[0].rel}: {bad[0].status} {bad[0].reason}" if bad else ""
                raise RuntimeError(
                    f"converted {len(summary.results) - len(bad)} of {len(files)}, "
                    f"not done {len(summary.not_done)}{why}"
                )
            return summary

        self.settle()
        base = measure(baseline, self.args.repeat, track_rss=False)
        rate_row(f"torch.load+save_file, {jobs} processes", base, len(files), nbytes, base)
        self.settle()
        mine = measure(ours, self.args.repeat, before=self.settle)
        rate_row(f"ours: run_batch(jobs={jobs})", mine, len(files), nbytes, base)
        self.results[f"{key}:base"] = base
        self.results[f"{key}:ours"] = mine
        if key == "small":  # what one container per file costs before any work: the ceiling
            self.settle()
            floor = measure(lambda: empty_containers(len(files), jobs), self.args.repeat, before=self.settle)
            rate_row(f"floor: {len(files)} empty containers, {jobs} at once", floor, len(files), nbytes, base)
            self.results[f"{key}:floor"] = floor
        if self.bwrap:  # the daemonless runner: the same sandbox, no engine between
            self.settle()
            daemonless = measure(lambda: ours("bwrap"), self.args.repeat, before=self.settle)
            rate_row(f"ours: run_batch(jobs={jobs}, runner=bwrap)", daemonless, len(files), nbytes, base)
            self.results[f"{key}:bwrap"] = daemonless

    def batches(self) -> None:
        small = self.tmp / "small"
        big = self.tmp / "big"
        try:
            small.mkdir()
            for i in range(self.args.small_files):
                write_small(small / f"small-{i:04d}.pt", self.args.small_file_kb, seed=i)
        except Exception as exc:
            out(f"\n== batch: small files ==\n  failed: writing the files: {_failure(exc)}")
        else:
            self.batch("small", f"small state dicts (~{self.args.small_file_kb:g} KB)", small)
        shutil.rmtree(small, ignore_errors=True)
        try:
            big.mkdir()
            write_many_big(big, self.args.big_files, self.args.big_file_mb)
        except Exception as exc:
            out(f"\n== batch: big files ==\n  failed: writing the files: {_failure(exc)}")
        else:
            self.batch("big", f"state dicts of ~{self.args.big_file_mb:g} MB", big)
        shutil.rmtree(big, ignore_errors=True)

    # -- the CLI in a new process ---------------------------------------------------------------
    def cli(self) -> None:
        src = self.tmp / "cli-small.pt"
        write_small(src, self.args.small_file_kb, seed=7)
        exe = Path(sys.executable).with_name("model-sandbox")
        cli = str(exe) if exe.exists() else shutil.which("model-sandbox")
        out()
        out(
            f"== a new process per call: one small state dict ({src.stat().st_size / 1024:.0f} KB), "
            "end to end =="
        )
        time_header()
        runs = iter(range(1_000_000))

        def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
            dst = self.tmp / f"cli-out-{next(runs)}.safetensors"
            argv = [{"SRC": str(src), "DST": str(dst)}.get(a, a) for a in cmd]
            proc = subprocess.run(argv, capture_output=True, env=env, check=False)
            for leftover in (dst, Path(str(dst) + ".report.json")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if proc.returncode != 0:
                text = (proc.stderr + proc.stdout).decode(errors="replace").splitlines()
                lines = [x.strip() for x in text if x.strip()]
                why = next((x for x in lines if "error[" in x or "Error:" in x), lines[0] if lines else "")
                raise RuntimeError(f"exit {proc.returncode}: {why}")

        r = self.args.repeat
        first = r > 1  # an untimed first call (page cache of the interpreter and its modules)
        self.settle()
        base = measure(
            lambda: run([sys.executable, "-c", _NEW_PROCESS_BASELINE, "SRC", "DST"]),
            r,
            untimed_first=first,
            track_rss=False,
        )
        time_row("python -c 'torch.load + save_file'", base, base, "(ratio reference)")
        if cli is None:
            out(f"  {'model-sandbox convert':<{NAME_W}} failed: the model-sandbox script is not installed")
            return
        convert = [cli, "convert", "SRC", "-o", "DST"]
        self.settle()
        ours = measure(lambda: run(convert), r, untimed_first=first, before=self.settle, track_rss=False)
        time_row("ours: model-sandbox convert SRC -o DST", ours, base)
        cold_env = {**os.environ, "MODEL_SANDBOX_WARM": "0"}
        self.settle()
        ours_cold = measure(
            lambda: run(convert, cold_env), r, untimed_first=first, before=self.settle, track_rss=False
        )
        time_row("ours: same, MODEL_SANDBOX_WARM=0", ours_cold, base)
        self.results["cli:base"] = base
        self.results["cli:ours"] = ours
        self.results["cli:cold"] = ours_cold
        src.unlink()

    # -- the targets ----------------------------------------------------------------------------
    def targets(self) -> None:
        out()
        out("== targets (medians) ==")
        sizes = self.args.sizes

        def verdict(ok: bool, text: str) -> None:
            out(f"  {'MET   ' if ok else 'MISSED'}  {text}")

        def missing(text: str, why: str) -> None:
            out(f"  {'NOT MEASURED':<6}  {text}: {why}")

        def get(key: str) -> Result | None:
            res = self.results.get(key)
            return res if res is not None and res.ok else None

        def at(target_mb: float) -> tuple[float | None, str]:
            if not sizes:
                return None, ""
            mb = min(sizes, key=lambda s: abs(s - target_mb))
            return mb, "" if mb == target_mb else f" [measured at {mb:g} MB, not {target_mb:g} MB]"

        mb, caveat = at(WARM_SMALL_MB)
        text = f"warm safe_load of a {WARM_SMALL_MB} MB state dict <= torch.load + {WARM_SMALL_EXTRA_S} s"
        ours, base = get(f"sd:{mb:g}:warm"), get(f"sd:{mb:g}:load_wo")
        if ours and base:
            limit = base.median + WARM_SMALL_EXTRA_S
            verdict(
                ours.median <= limit,
                f"{text}: {_s(ours.median)} s vs torch.load(weights_only=True) "
                f"{_s(base.median)} s + {WARM_SMALL_EXTRA_S} = {_s(limit)} s{caveat}",
            )
        else:
            missing(text, "a case failed or was not run")

        mb, caveat = at(BIG_MB)
        text = f"safe_load of a 1 GB state dict <= {BIG_MAX_RATIO}x torch.load(weights_only=False)"
        ours, base, cold = get(f"sd:{mb:g}:warm"), get(f"sd:{mb:g}:load"), get(f"sd:{mb:g}:cold")
        if ours and base:
            ratio = ours.median / base.median
            extra = f"; cold {_s(cold.median)} s = {cold.median / base.median:.2f}x" if cold else ""
            floor = get(f"sd:{mb:g}:sha256")
            if floor:
                extra += f"; the sha256 alone {floor.median / base.median:.2f}x"
            verdict(
                ratio <= BIG_MAX_RATIO,
                f"{text}: warm {_s(ours.median)} s vs {_s(base.median)} s = {ratio:.2f}x{extra}{caveat}",
            )
        else:
            missing(text, "a case failed or was not run")

        text = f"safe_load of a 1 GB pickled module <= {MODULE_MAX_RATIO}x torch.load(weights_only=False)"
        ours, base = get("module:warm"), get("module:load")
        caveat = "" if self.args.module_mb == 1024 else f" [measured at {self.args.module_mb:g} MB]"
        if ours and base:
            ratio = ours.median / base.median
            verdict(
                ratio <= MODULE_MAX_RATIO,
                f"{text}: warm {_s(ours.median)} s vs {_s(base.median)} s = {ratio:.2f}x{caveat}",
            )
        else:
            missing(text, "a case failed or was not run")

        text = f"batch of 12 x 100 MB >= {BATCH_MIN_SPEED}x in-process MB/s"
        ours, base = get("big:ours"), get("big:base")
        if ours and base and self.info.get("big", (0, 0))[1]:
            n, nbytes = self.info["big"]
            o, b = nbytes / MB / ours.median, nbytes / MB / base.median
            caveat = (
                ""
                if (n, self.args.big_file_mb) == (12, 100)
                else f" [measured on {n} x {self.args.big_file_mb:g} MB]"
            )
            verdict(o >= BATCH_MIN_SPEED * b, f"{text}: {o:.2f} MB/s vs {b:.2f} MB/s = {o / b:.3f}x{caveat}")
        else:
            missing(text, "a case failed or was not run")

        for key, how in (("small:ours", "Docker runner"), ("small:bwrap", "bwrap runner")):
            text = f"batch of 200 small files >= {SMALL_MIN_FILES_S:g} files/s, {how}"
            ours = get(key)
            if ours and self.info.get("small", (0,))[0]:
                n = self.info["small"][0]
                rate = n / ours.median
                caveat = "" if n == 200 else f" [measured on {n} files]"
                floor = get("small:floor") if key == "small:ours" else None
                if floor:  # the engine's ceiling on this machine, whatever the sandbox does
                    caveat += f"; empty containers alone: {n / floor.median:.2f} files/s"
                verdict(
                    rate >= SMALL_MIN_FILES_S,
                    f"{text}: {rate:.2f} files/s ({n} files in {_s(ours.median)} s){caveat}",
                )
            elif key == "small:bwrap" and not self.bwrap:
                missing(text, "bubblewrap cannot run here")
            else:
                missing(text, "a case failed or was not run")

        text = f"cold `model-sandbox convert` of a small state dict in a new process < {CLI_MAX_S:g} s"
        ours = get("cli:ours")
        if ours:
            verdict(ours.median < CLI_MAX_S, f"{text}: {_s(ours.median)} s (min {_s(min(ours.times))} s)")
        else:
            missing(text, "a case failed or was not run")


# -- the command -------------------------------------------------------------------------------

FULL = {
    "sizes_mb": "10,100,1024",
    "module_mb": 1024.0,
    "small_files": 200,
    "small_file_kb": 256.0,
    "big_files": 12,
    "big_file_mb": 100.0,
    "repeat": 3,
}
TINY = {
    "sizes_mb": "1",
    "module_mb": 1.0,
    "small_files": 6,
    "small_file_kb": 64.0,
    "big_files": 2,
    "big_file_mb": 2.0,
    "repeat": 1,
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument(
        "--tiny",
        action="store_true",
        help="every row on tiny inputs in a minute or two: a 1 MB state dict and module, "
        "6 small files of 64 KB, 2 files of 2 MB, repeat 1 (explicit options win)",
    )
    p.add_argument("--sizes-mb", help=f"state dict sizes, comma-separated (default {FULL['sizes_mb']})")
    p.add_argument("--module-mb", type=float, help="pickled nn.Module size, 0 skips it (default 1024)")
    p.add_argument("--small-files", type=int, help="files in the small batch (default 200)")
    p.add_argument("--small-file-kb", type=float, help="size of each small file (default 256)")
    p.add_argument("--big-files", type=int, help="files in the big batch (default 12)")
    p.add_argument("--big-file-mb", type=float, help="size of each big file (default 100)")
    p.add_argument("--repeat", type=int, help="timed runs per case (default 3)")
    p.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel jobs of both batches (default: os.cpu_count())",
    )
    p.add_argument("--dir", help="where the temporary directory goes (default: the system's)")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.sizes = [float(x) for x in str(args.sizes_mb).split(",") if x.strip()]
    args.repeat = max(1, args.repeat)
    args.jobs = max(1, args.jobs)
    return args


def header(args: argparse.Namespace, tmp: Path) -> None:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    out(f"bench_load {now}")
    out(f"machine: {os.cpu_count()} CPUs, {mem} RAM, {platform.platform()}, {platform.machine()}")
    out(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, model-sandbox {sandbox.__version__}"
    )
    try:
        runner = _launch.DockerRunner()
        engine = runner.engine.negotiate().get("Version", "?")
        out(f"docker engine {engine}, worker image {runner.ensure_image()}")
    except Exception as exc:
        out(
            f"docker: failed: {_failure(exc)} (sandboxed rows will fail; "
            "`.venv/bin/model-sandbox image build` builds the image)"
        )
    out(f"repeat {args.repeat}, jobs {args.jobs}, files in {tmp}")
    out(
        "times: wall seconds, median and min-max of the timed runs, page cache warm (baselines: one "
        "untimed run first)."
    )
    out(
        "memory: before every timed run, of every row, gc and malloc_trim(0) give this process's freed "
        "memory back,"
    )
    out(
        "  so each call writes to fresh pages, as a process's first load of a checkpoint does "
        "(else a repeated"
    )
    out("  torch.load reuses the pages its last call freed: 1 GB here in about half the time).")
    out(
        "peak RSS: the most this process's RSS rose above its level at the call's start (sampled every 10 ms,"
    )
    out(
        "  result still held; the container's memory is not included). ratio: median / the reference "
        "row's median."
    )
    out("ours: cold = safe_load(runner=DockerRunner()); warm = Pool(size=1).safe_load with a ready sandbox")
    out("  (warm-up untimed); back-to-back = the same pool, calls with no wait (refill in the background,")
    out("  started only once the last call returned for inputs of 256 MiB or more: HOLD_REFILL_BYTES).")


def _bwrap_usable() -> bool:
    """Whether the bwrap runner can start here (its root filesystem made if it is missing)."""
    from sandbox import _bwrap

    try:
        image = _bwrap.BwrapRunner().ensure_image()
    except Exception as exc:
        out(f"bwrap: cannot run here ({_failure(exc)}): its batch rows are left out")
        return False
    out(f"bwrap runner: root filesystem of {image}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bench-load-", dir=args.dir) as tmp_s,
        sandbox.Pool(size=1) as pool,
    ):
        tmp = Path(tmp_s)
        header(args, tmp)
        bench = Bench(args=args, tmp=tmp, pool=pool, bwrap=_bwrap_usable())
        # untimed: imports, engine connection, page cache of the worker image, one warm sandbox
        try:
            prime = tmp / "prime.pt"
            write_small(prime, 16, seed=99)
            pool.warm(wait=True)
            pool.safe_load(prime)
        except Exception as exc:
            out(f"warm-up load failed: {_failure(exc)}")
        for step in (bench.state_dicts, bench.module, bench.batches, bench.cli):
            try:
                step()
            except Exception as exc:  # a bug here must not hide the rest
                out(f"  failed: {_failure(exc)}")
        bench.targets()
    return 0


if __name__ == "__main__":
    sys.exit(main())
