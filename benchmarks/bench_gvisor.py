"""What gVisor costs: the same ``convert`` through a fresh Docker sandbox under runc and under
runsc (gVisor, ``--platform=ptrace``), alternating, ``--repeat`` runs each; prints medians,
min-max and the ratio runsc/runc per case. Asserts nothing.

Cases (written into a temporary directory):

* a plain state dict of ~256 KB: the layout hand-off (no torch import in the sandbox);
* a pickled ``nn.Sequential`` of ~10 MB: the full loader (``import torch`` in the sandbox) and
  the tensors back through the channel (a sealed memfd under runc, inline frames under runsc);
* ``--big-mb`` (default 100): the same with ~100 MB of weights.

Needs the engine's ``model-sandbox-runsc`` runtime (``MODEL_SANDBOX_RUNSC=1
scripts/ensure-docker.sh``) and the worker image. Usage::

    .venv/bin/python benchmarks/bench_gvisor.py [--repeat 3] [--big-mb 100]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import sandbox
from sandbox import _launch


def _module(mb: float) -> torch.nn.Module:
    width = 512
    layers = max(1, round(mb * 2**20 / (width * width * 4)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _cases(tmp: Path, big_mb: float) -> list[tuple[str, Path]]:
    g = torch.Generator().manual_seed(0)
    small = tmp / "small-state-dict.pt"
    torch.save({f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(16)}, small)
    module = tmp / "module-10mb.pt"
    torch.save(_module(10), module)
    big = tmp / f"module-{big_mb:g}mb.pt"
    torch.save(_module(big_mb), big)
    return [
        ("plain state dict (layout hand-off)", small),
        ("pickled nn.Module, full loader", module),
        ("pickled nn.Module, full loader", big),
    ]


def _convert(src: Path, runtime: str) -> float:
    runner = _launch.DockerRunner(runtime=runtime)
    dst = src.with_suffix(f".{runtime}.safetensors")
    start = time.perf_counter()
    report = sandbox.convert(
        src, dst, runner=runner, write_report=False, allow_unverified=True, policy=sandbox.Policy.default()
    )
    took = time.perf_counter() - start
    if report.verdict.value != "clean":
        raise SystemExit(f"{src.name} under {runtime}: {report.verdict.value}: {report.to_text()}")
    dst.unlink()
    return took


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.3f}  {min(xs):.3f}-{max(xs):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big-mb", type=float, default=100.0)
    args = ap.parse_args(argv)
    _launch.DockerRunner(runtime="runsc").trace_dir()  # a clear error when not registered
    print(f"bench_gvisor {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}; python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    print(
        f"repeat {args.repeat} (runc and runsc alternating, one untimed run of each first); "
        "wall seconds of sandbox.convert through a fresh container"
    )
    with tempfile.TemporaryDirectory(prefix="bench-gvisor-") as tmp:
        rows: list[tuple[str, str, list[float], list[float]]] = []
        for name, path in _cases(Path(tmp), args.big_mb):
            size = f"{path.stat().st_size / 2**20:.1f} MB"
            for runtime in ("runc", "runsc"):
                _convert(path, runtime)  # untimed: page cache, engine warm
            times: dict[str, list[float]] = {"runc": [], "runsc": []}
            for _ in range(args.repeat):
                for runtime in ("runc", "runsc"):
                    times[runtime].append(_convert(path, runtime))
            rows.append((name, size, times["runc"], times["runsc"]))
        print(
            f"\n  {'case':42} {'size':>9}  {'runc median  min-max':>22}  {'runsc median  min-max':>22}  ratio"
        )
        for name, size, runc, runsc in rows:
            ratio: Any = statistics.median(runsc) / statistics.median(runc)
            print(f"  {name:42} {size:>9}  {_fmt(runc):>22}  {_fmt(runsc):>22}  {ratio:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
