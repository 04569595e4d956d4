"""Warm, single-use sandboxes: :class:`Pool`.

A pool keeps ``size`` sandboxes started ahead of demand -- container up, supervisor connected to
its channel, loader forked (torch imported ahead once the host's scan sent a job to the full
loader; a plain state dict's layout hand-off never needs it) -- each waiting for exactly one job and
discarded after it. A background thread refills the pool as sandboxes are used; :meth:`close`
(also on ``with`` exit, Ctrl-C or an exception) removes every sandbox that is still waiting.
Nothing is reused across jobs: a payload can never see the next file.

A warm sandbox serves a job whose :class:`~sandbox._launch.ContainerSpec` equals the one it was
started with (the same image and container limits); any other job gets a fresh sandbox. The pool
learns the spec to keep warm from its policy, else from the first job it runs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any

from . import _launch
from .errors import SandboxError
from .policy import Policy

if TYPE_CHECKING:
    from .report import LoadReport

__all__ = ["Pool"]

_WAIT_FOR_STARTING_S = 60.0
# A job on an input this large holds back the start of the sandbox that replaces the one it took
# until its result is closed (the caller has what it asked for): its load keeps the host's cores
# busy (hash, read, placement), and a container start beside it (~0.4 s of CPU) slows it more
# than a ready sandbox would save the next call.
HOLD_REFILL_BYTES = 256 * 2**20


class Pool:
    """``size`` warm sandboxes, refilled in the background. Use as a context manager::

        with sandbox.Pool(size=2) as pool:
            sd = pool.safe_load("model.pt")
            report = pool.scan("other.bin")

    It is a runner too: ``sandbox.safe_load(f, runner=pool)``. Thread-safe. ``runner``: the
    runner its sandboxes come from, or its name (``"docker"``, ``"bwrap"``, ``"auto"``); by
    default ``$MODEL_SANDBOX_RUNNER``, else ``auto``. ``limit``: at most this many sandboxes
    started ahead in the pool's life (a batch knows how many files it has: none is started
    for a job that will never come); jobs past it get a fresh sandbox each. A job on an input of
    :data:`HOLD_REFILL_BYTES` or more holds back the start of its replacement until the call
    that made it returns."""

    def __init__(
        self,
        size: int = 1,
        *,
        policy: Policy | None = None,
        runner: _launch.StartingRunner | str | None = None,
        labels: tuple[tuple[str, str], ...] = (),
        prepare: bool | None = None,
        limit: int | None = None,
    ) -> None:
        if size < 0 or (limit is not None and limit < 0):
            raise ValueError("size and limit must be >= 0")
        # never more waiting or starting than the limit allows in all
        self.size = size if limit is None else min(size, limit)
        self.limit = limit
        self.started = 0  # sandboxes started ahead so far (counted against ``limit``)
        # Whether waiting sandboxes import torch ahead of their job. A plain state dict (the
        # layout hand-off) never needs it, the full loader always does: by default the pool
        # follows what the host's scan says of each job as it arrives (``prepare=True``/``False``
        # fixes it). A job that finds torch not imported yet imports it before its monitoring.
        self._adaptive = prepare is None
        self._prepare = bool(prepare)
        self._layouts_in_a_row = 0
        self.policy = policy
        self.labels = labels
        # a runner, or its name ("docker", "bwrap", "auto"); None: $MODEL_SANDBOX_RUNNER or auto
        self._runner: _launch.StartingRunner | None = None if isinstance(runner, str) else runner
        self._runner_kind = runner if isinstance(runner, str) else None
        self._runtime = getattr(runner, "runtime", None)  # the default pool's key, with the kind
        if self._runner_kind is not None:
            _launch.runner_kind(self._runner_kind)  # validated now, chosen on first use
        self._spec: _launch.ContainerSpec | None = None
        self._ready: deque[_launch.Box] = deque()
        self._starting = 0
        self._held = 0  # jobs on big inputs in flight: each holds back one refill
        self._lock = threading.Condition()
        self._making = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._starters: set[threading.Thread] = set()
        self._failures_in_a_row = 0
        self.failures = 0
        self.last_error: str | None = None
        self.served_warm = 0
        self.served_cold = 0
        _live.add(self)

    # -- the runner protocol ----------------------------------------------------------------
    @property
    def runner(self) -> _launch.StartingRunner:
        with self._making:  # threads asking first at once get one runner (making it may probe)
            if self._runner is None:
                self._runner = _launch.make_runner(self._runner_kind)
            return self._runner

    @property
    def name(self) -> str:
        return self.runner.name

    def ensure_image(self) -> str:
        return self.runner.ensure_image()

    def _labelled(self, spec: _launch.ContainerSpec) -> _launch.ContainerSpec:
        return replace(spec, labels=spec.labels + self.labels) if self.labels else spec

    def run(self, spec: _launch.ContainerSpec, job: _launch.Job) -> _launch.RunResult:
        """Run ``job`` in a warm sandbox of ``spec`` if one is ready, else in a fresh one."""
        spec = self._labelled(spec)
        hold = job.input_size >= HOLD_REFILL_BYTES
        box = self._take(spec, full=not job.config.layout, hold=hold)
        try:
            if box is None:
                with self._lock:
                    self.served_cold += 1
                result = self.runner.start(spec, prepare=False).run(job)
            else:
                with self._lock:
                    self.served_warm += 1
                result = box.run(job)
                result.warm = True
        except BaseException:
            if hold:
                self._release()
            raise
        if hold:
            result.on_close = self._release
        return result

    def _release(self) -> None:
        """A big job's result was closed: the refill it held back may start."""
        with self._lock:
            self._held -= 1
            self._lock.notify_all()

    def _learn(self, full: bool) -> None:
        """Adapt ``prepare`` to the jobs, as each arrives (so the sandbox started to replace
        the one it takes already follows it): on from a job the host's scan sends to the full
        loader, off after three that may take the layout hand-off in a row. Under the lock."""
        if not self._adaptive:
            return
        if full:
            self._prepare, self._layouts_in_a_row = True, 0
        else:
            self._layouts_in_a_row += 1
            if self._layouts_in_a_row >= 3:
                self._prepare = False

    def _take(
        self, spec: _launch.ContainerSpec, full: bool = False, hold: bool = False
    ) -> _launch.Box | None:
        """A ready sandbox of ``spec`` (waiting for one already starting), or None: the job
        goes cold. ``hold``: the refill waits until :meth:`_release` (counted here, under the
        lock, before the filler is woken)."""
        with self._lock:
            if self._closed:
                raise SandboxError("the pool is closed")
            self._learn(full)
            if self._spec is None:
                self._spec = spec
            elif self._spec != spec:
                self._held += hold  # released as any other: the pool's own refills wait too
                return None
            self._ensure_thread()
            self._lock.notify_all()  # wake the filler: a job wants a sandbox
            # A sandbox already starting is ready sooner than a fresh one would be: wait for it
            # (but not for a filler that keeps failing, and not past a bound)
            now = time.monotonic()
            deadline = now + _WAIT_FOR_STARTING_S
            failures = self.failures
            while (
                not self._ready
                and not self._starting
                and self.size
                and not self._spent()
                and time.monotonic() < now + 0.5
            ):
                self._lock.wait(0.02)  # the filler, just woken, is about to start one
            while (
                not self._ready
                and self._starting
                and not self._closed
                and self.failures == failures
                and not self._failures_in_a_row  # a retry waits out its back-off first
                and time.monotonic() < deadline
            ):
                self._lock.wait(0.05)
            box = None
            while self._ready:
                candidate = self._ready.popleft()
                if candidate.alive():
                    box = candidate
                    break
                threading.Thread(target=candidate.discard, daemon=True).start()
            self._held += hold
            self._lock.notify_all()  # the filler replaces what was taken
            return box

    # -- warming ------------------------------------------------------------------------------
    def warm(self, wait: bool = False, timeout_s: float = 120.0) -> Pool:
        """Start filling now (by default the first job starts it). ``wait=True`` blocks until
        ``size`` sandboxes are ready (or the timeout passes, or three starts fail meanwhile)."""
        with self._lock:
            if self._spec is None:
                policy = self.policy or Policy.default()
                self._spec = self._labelled(_launch.make_spec(policy, image=self.ensure_image()))
            self._ensure_thread()
            if wait:
                deadline = time.monotonic() + timeout_s
                failures = self.failures  # those before this call say nothing of the engine now
                while (
                    len(self._ready) < self.size
                    and not self._closed
                    and time.monotonic() < deadline
                    and self.failures < failures + 3
                ):
                    self._lock.wait(0.1)
        return self

    @property
    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def _ensure_thread(self) -> None:
        if self._thread is None and self.size > 0:
            self._thread = threading.Thread(target=self._fill, name="model-sandbox-pool", daemon=True)
            self._thread.start()

    def _spent(self) -> bool:
        """Every start ``limit`` allows has been made (under the lock)."""
        return self.limit is not None and self.started >= self.limit

    def _fill(self) -> None:
        """Keep ``size`` sandboxes ready or starting (within ``limit``); starts run side by side
        (one start is mostly waiting on the engine), each in a thread of its own."""
        while True:
            with self._lock:
                while not self._closed and (
                    len(self._ready) + self._starting >= self.size - self._held
                    or self._spec is None
                    or self._spent()
                ):
                    self._lock.wait(1.0)
                if self._closed:
                    return
                spec = self._spec
                self._starting += 1
                self.started += 1
                delay = min(30.0, 0.5 * 2**self._failures_in_a_row) if self._failures_in_a_row else 0.0
            assert spec is not None
            starter = threading.Thread(
                target=self._start_one, args=(spec, delay), name="model-sandbox-pool-start", daemon=True
            )
            with self._lock:
                self._starters.add(starter)
            starter.start()

    def _start_one(self, spec: _launch.ContainerSpec, delay: float) -> None:
        box: _launch.Box | None = None
        failed = False
        with self._lock:
            if delay:  # the engine failed just before: back off, unless the pool closes
                self._lock.wait_for(lambda: self._closed, timeout=delay)
            # closed since this start was counted: none is made (close() may not wait for it)
            closed = self._closed
        if not closed:
            try:
                box = self.runner.start(spec, prepare=self._prepare)
            except Exception as exc:  # the engine went away, an image problem: jobs go cold
                failed = True
                with self._lock:
                    self.failures += 1
                    self.last_error = str(exc)[:300]
        with self._lock:
            self._failures_in_a_row = self._failures_in_a_row + 1 if failed else 0
            self._starting -= 1
            self._starters.discard(threading.current_thread())
            if box is not None and not self._closed:
                self._ready.append(box)
                box = None
            self._lock.notify_all()
        if box is not None:
            box.discard()

    # -- closing ------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every waiting sandbox; jobs already running finish on their own."""
        with self._lock:
            self._closed = True
            boxes = list(self._ready)
            self._ready.clear()
            self._lock.notify_all()
        for box in boxes:
            with contextlib.suppress(Exception):
                box.discard()
        with self._lock:
            threads = [t for t in (self._thread, *self._starters) if t is not None]
        for thread in threads:  # a start in flight discards its sandbox once it is up
            if thread is not threading.current_thread():
                thread.join(timeout=90)
        _live.discard(self)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the operations, through this pool ----------------------------------------------------
    def safe_load(
        self, f: str | os.PathLike[str] | IO[bytes], map_location: Any = None, **kwargs: Any
    ) -> Any:
        """:func:`sandbox.safe_load` in one of this pool's sandboxes."""
        from ._api import safe_load

        kwargs.setdefault("policy", self.policy)
        return safe_load(f, map_location, runner=self, **kwargs)

    def convert(
        self, src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> LoadReport:
        """:func:`sandbox.convert` in one of this pool's sandboxes."""
        from ._api import convert

        kwargs.setdefault("policy", self.policy)
        return convert(src, dst, runner=self, **kwargs)

    def scan(self, path: str | os.PathLike[str], **kwargs: Any) -> LoadReport:
        """:func:`sandbox.scan` in one of this pool's sandboxes."""
        from ._api import scan

        kwargs.setdefault("policy", self.policy)
        return scan(path, runner=self, **kwargs)


_live: weakref.WeakSet[Pool] = weakref.WeakSet()
_default: Pool | None = None
_default_lock = threading.Lock()


def default_runner() -> _launch.Runner:
    """The runner of the module-level functions: a process-wide pool of one warm sandbox,
    created on first use, unless ``MODEL_SANDBOX_WARM=0`` (then a fresh sandbox per call).
    The runner is ``$MODEL_SANDBOX_RUNNER`` (``docker``, ``bwrap`` or ``auto``, the default)."""
    global _default
    if os.environ.get("MODEL_SANDBOX_WARM", "1").strip().lower() in ("0", "false", "no", "off"):
        return _launch.make_runner()
    kind, runtime = _launch.runner_kind(), _launch.runtime_kind()
    with _default_lock:
        if (
            _default is None
            or _default._closed
            or _default._runner_kind != kind
            or _default._runtime != runtime
        ):
            if _default is not None and not _default._closed:
                _default.close()
            _default = Pool(size=1, runner=kind)
            _default._runtime = runtime
        return _default


@atexit.register
def _close_all() -> None:
    for pool in list(_live):
        with contextlib.suppress(Exception):
            pool.close()
