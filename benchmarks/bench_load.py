"""Sandboxed load against in-process torch.load, on the same files, in the same run.

Prints, per file size, the median wall time of ``torch.load(weights_only=True)`` (the unsafe
baseline a user would otherwise run) and of ``sandbox.safe_load`` / ``sandbox.scan``, their
ratio, and where the sandboxed time goes (host hashing, container, host read-back, weight
check). Asserts nothing. Needs a Docker engine and the worker image.

    .venv/bin/python benchmarks/bench_load.py [--sizes-mb 1,100,1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sandbox
from sandbox import _api, _convert, _launch, _verify


def timed(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm the page cache and the engine
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


class _Stages:
    """Accumulates time spent in named stages by wrapping their functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, attr, timed_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="1,100,1024")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stages = _Stages()
    stages.wrap(_api, "_hash_file", "host sha256")
    stages.wrap(_launch.DockerRunner, "run", "container")
    stages.wrap(_convert, "load_tensors", "host read-back")
    stages.wrap(_verify, "weights", "weight check")

    print(f"{'size':>8} {'torch.load':>11} {'safe_load':>10} {'ratio':>6} {'scan':>7}  "
          "stages of one safe_load")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in (int(x) for x in args.sizes_mb.split(",")):
            n = max(1, mb // 8)
            path = Path(tmp) / f"sd-{mb}.pt"
            torch.save({f"layer{i}.weight": torch.randn(1024, 2048) if mb >= 8 else
                        torch.randn(mb * 1024 * 256 // n) for i in range(n)}, path)
            base = timed(lambda p=path: torch.load(p, weights_only=True), args.repeat)  # type: ignore[misc]
            ours = timed(lambda p=path: sandbox.safe_load(p), args.repeat)  # type: ignore[misc]
            scan = timed(lambda p=path: sandbox.scan(p), args.repeat)  # type: ignore[misc]
            stages.seconds.clear()
            sandbox.safe_load(path)
            split = ", ".join(f"{k} {v:.2f}s" for k, v in stages.seconds.items())
            print(f"{mb:>6}MB {base:>10.2f}s {ours:>9.2f}s {ours / base:>5.1f}x {scan:>6.2f}s  {split}")
            path.unlink()


if __name__ == "__main__":
    main()
