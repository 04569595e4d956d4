"""Static scan benchmark: ``sandbox._scan.scan_file`` on large checkpoints, as ratios.

Writes benchmark checkpoints into a temporary directory (or ``--dir``), then times, per file
and in this one process:

* ``scan_file`` (throughput in MB/s of file size and in tensors/s);
* ``sandbox._verify.reconstruct.try_reconstruct`` (the static weight rebuild, hashes only);
* ``torch.load(weights_only=True)`` of the same file, the in-process baseline;

and, when a separate benchmark interpreter is given (``--baseline-python`` or the
``BENCH_BASELINE_PYTHON`` environment variable; never a dependency of the project),
picklescan's and modelscan's scan of the same file, timed inside that interpreter so that
its start-up is not counted. Missing tools print ``not installed``.

Nothing is asserted: timings depend on the machine. Every number is a median of
``--repeat`` runs with a warm page cache (one untimed run first).

    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install picklescan modelscan
    .venv/bin/python benchmarks/bench_static_scan.py --baseline-python /tmp/bench-venv/bin/python
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox._scan import scan_file  # noqa: E402
from sandbox._verify.reconstruct import try_reconstruct  # noqa: E402  (after the path fix above)

# Runs in the baseline interpreter: time one tool's scan of one file, print JSON.
_BASELINE = r"""
import json, sys, time, statistics, logging
logging.disable(logging.CRITICAL)
tool, path, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if tool == "picklescan":
        from picklescan.scanner import scan_file_path
        def run():
            r = scan_file_path(path)
            return {"issues": r.issues_count, "infected": r.infected_files,
                    "globals": len(r.globals)}
    else:
        from modelscan.modelscan import ModelScan
        def run():
            r = ModelScan().scan(path)
            return {"issues": len(r.get("issues", [])),
                    "errors": len(r.get("errors", [])),
                    "scanned": r.get("summary", {}).get("scanned", {}).get("total_scanned")}
except Exception as exc:
    print(json.dumps({"error": f"not installed ({type(exc).__name__}: {exc})"}))
    sys.exit(0)
info = run()
times = []
for _ in range(repeat):
    t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
print(json.dumps({"median_s": statistics.median(times), "info": info}))
"""


def median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm the page cache and imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_files(d: Path, size_mb: int, big_tensors: int, small_tensors: int) -> list[tuple[str, Path, int]]:
    """(label, path, tensor count) for each benchmark file."""
    g = torch.Generator().manual_seed(0)
    files = []
    per = max(1, size_mb * (1 << 20) // 4 // big_tensors)
    big = collections.OrderedDict(
        (f"layers.{i}.weight", torch.empty(per).uniform_(generator=g)) for i in range(big_tensors)
    )
    path = d / "big.pt"
    torch.save(big, path)
    files.append((f"torch zip, {big_tensors} tensors", path, big_tensors))
    del big
    small = collections.OrderedDict(
        (f"blocks.{i // 8}.p{i % 8}", torch.randn(16, generator=g)) for i in range(small_tensors)
    )
    path = d / "small.pt"
    torch.save({"state_dict": small, "epoch": 3}, path)
    files.append((f"torch zip, {small_tensors} small tensors", path, small_tensors))
    path = d / "small_legacy.pt"
    torch.save({"state_dict": small, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    files.append((f"legacy, {small_tensors} small tensors", path, small_tensors))
    mid = collections.OrderedDict(
        (f"layers.{i}.weight", torch.randn(per // 8, generator=g)) for i in range(big_tensors)
    )
    path = d / "mid_legacy.pt"
    torch.save(mid, path, _use_new_zipfile_serialization=False)
    files.append((f"legacy, {big_tensors} tensors", path, big_tensors))
    return files


def baseline(python: str | None, tool: str, path: Path, repeat: int) -> dict[str, object]:
    if not python:
        return {"error": "not installed (no --baseline-python)"}
    proc = subprocess.run(
        [python, "-c", _BASELINE, tool, str(path), str(repeat)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"failed ({proc.stderr.strip().splitlines()[-1:]})"}
    result: dict[str, object] = json.loads(lines[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, help="where to write the files (default: a temp dir)")
    ap.add_argument("--size-mb", type=int, default=1024, help="size of the big zip file")
    ap.add_argument("--big-tensors", type=int, default=2000)
    ap.add_argument("--small-tensors", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--baseline-python",
        default=os.environ.get("BENCH_BASELINE_PYTHON"),
        help="interpreter with picklescan/modelscan installed",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = make_files(Path(tmp), args.size_mb, args.big_tensors, args.small_tensors)
        print(
            f"python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"{os.cpu_count()} cpus, median of {args.repeat} warm runs"
        )
        for label, path, count in files:
            mb = path.stat().st_size / 1e6
            scan = scan_file(path)
            t_scan = median_time(functools.partial(scan_file, path), args.repeat)
            t_rec = median_time(functools.partial(try_reconstruct, path), args.repeat)
            t_load = median_time(functools.partial(torch.load, path, weights_only=True), args.repeat)
            print(
                f"\n{label}: {mb:,.1f} MB, {len(scan.storages)} storage records, "
                f"{len(scan.findings)} findings"
            )
            print(
                f"  scan_file          {t_scan * 1e3:9.1f} ms  {mb / t_scan:9.0f} MB/s  "
                f"{count / t_scan:10.0f} tensors/s"
            )
            print(f"  try_reconstruct    {t_rec * 1e3:9.1f} ms  ({t_rec / t_scan:.2f}x scan_file)")
            print(f"  torch.load(w_o)    {t_load * 1e3:9.1f} ms  (scan_file is {t_scan / t_load:.2f}x of it)")
            for tool in ("picklescan", "modelscan"):
                r = baseline(args.baseline_python, tool, path, args.repeat)
                if "error" in r:
                    print(f"  {tool:18} {r['error']}")
                    continue
                t = float(r["median_s"])  # type: ignore[arg-type]
                print(f"  {tool:18} {t * 1e3:9.1f} ms  (scan_file is {t_scan / t:.2f}x of it) {r['info']}")


if __name__ == "__main__":
    main()
