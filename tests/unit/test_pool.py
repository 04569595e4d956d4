"""The pool's own logic (:class:`sandbox.Pool`: warm single-use sandboxes, refilled in the
background), with a fake starting runner: no engine. The real sandboxes behind a pool are tested
in tests/container (test_channel, test_runners).

Waits are for the pool's state (read under its lock) or the fake's, bounded by ``WAIT_S``,
which only a broken pool reaches: no test asserts on timings."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest

from sandbox import Policy, _api, _launch, _pool
from sandbox._launch import Job, RunResult, make_job, make_spec
from sandbox._pool import Pool
from sandbox.errors import EngineError, PolicyError, SandboxError
from tests.fakes import FakeBox, FakeStartingRunner

WAIT_S = 20.0
# what warm() keeps warm with the default policy and the fake's image
SPEC = make_spec(Policy.default(), image="model-sandbox-worker:fake")
OTHER = replace(SPEC, memory_bytes=SPEC.memory_bytes * 2)


def job(n: int = 0, *, full: bool = False) -> Job:
    """A job (the fake never reads its input); ``full``: the host's scan sends it to the full loader."""
    return make_job(Policy.default(), input_fd=1000 + n, input_size=1, layout=not full)


def until(pool: Pool, predicate: Callable[[], bool]) -> bool:
    """Whether ``predicate``, read under the pool's lock, came true: read at each notification
    of the pool's condition, and every 10 ms (not every change of the pool notifies)."""
    deadline = time.monotonic() + WAIT_S
    with pool._lock:
        while not predicate():
            if time.monotonic() > deadline:
                return False
            pool._lock.wait(0.01)
        return True


def waiting_in(pool: Pool) -> list[FakeBox]:
    """The sandboxes waiting in ``pool``, in the order it hands them out."""
    with pool._lock:
        return [cast(FakeBox, box) for box in pool._ready]


def box_of(runner: FakeStartingRunner, result: RunResult) -> FakeBox:
    """The sandbox that ran ``result``'s job."""
    (note,) = result.notes
    return runner.boxes[int(note.removeprefix("box "))]


@pytest.fixture
def runner() -> FakeStartingRunner:
    return FakeStartingRunner()


@pytest.fixture
def new(runner: FakeStartingRunner) -> Iterator[Callable[..., Pool]]:
    """Pools on ``runner``; closed afterwards, when nothing they started may be left."""
    pools: list[Pool] = []

    def make(size: int = 1, **kwargs: Any) -> Pool:
        pools.append(Pool(size=size, runner=runner, **kwargs))
        return pools[-1]

    yield make
    runner.hold = lambda: None
    for pool in pools:
        pool.close()
    assert runner.wait_for(lambda: runner.in_flight == 0 and all(b.discards for b in runner.boxes))


# -- size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 3])
def test_warm_wait_keeps_size_sandboxes_ready(
    new: Callable[..., Pool], runner: FakeStartingRunner, size: int
) -> None:
    pool = new(size)
    assert pool.warm(wait=True) is pool
    assert pool.ready == size
    # started for the policy's spec on the runner's image, no more than asked, none used yet
    assert [spec for spec, _ in runner.calls] == [SPEC] * size
    assert len(runner.live) == size and not any(box.jobs for box in runner.boxes)


def test_a_negative_size_is_refused(runner: FakeStartingRunner) -> None:
    with pytest.raises(ValueError, match="size"):
        Pool(size=-1, runner=runner)
    assert runner.calls == []


def test_size_zero_keeps_nothing_warm_and_runs_every_job_cold(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(0)
    assert pool.warm(wait=True).ready == 0
    assert pool._thread is None and runner.calls == []
    results = [pool.run(SPEC, job(n)) for n in range(3)]
    assert not any(r.warm for r in results)
    assert runner.calls == [(SPEC, False)] * 3  # each a fresh sandbox, torch left to its job
    assert len({box_of(runner, r).serial for r in results}) == 3
    assert (pool.served_cold, pool.served_warm, pool.ready) == (3, 0, 0)


# -- single use -----------------------------------------------------------------------------------
def test_each_job_runs_in_a_sandbox_of_its_own_and_the_pool_refills(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(2).warm(wait=True)
    used: list[FakeBox] = []
    for n in range(5):
        waiting = runner.live
        result = pool.run(SPEC, job(n))
        assert result.warm
        box = box_of(runner, result)
        assert box in waiting and box.jobs == [job(n)]
        used.append(box)
        # the filler replaces it by itself (no warm() call)
        assert until(pool, lambda: len(pool._ready) == 2)
    assert len({box.serial for box in used}) == 5
    # a used sandbox is gone (it discards itself after its job) and never handed out again
    assert all(box.discards == 1 and len(box.jobs) == 1 for box in used)
    assert not set(used) & set(pool._ready)
    assert (pool.served_warm, pool.served_cold) == (5, 0)
    assert len(runner.calls) == 2 + 5  # exactly one start per sandbox used


def big_job(n: int = 0) -> Job:
    """A job on an input of :data:`_pool.HOLD_REFILL_BYTES`: its refill waits for its close."""
    return make_job(Policy.default(), input_fd=2000 + n, input_size=_pool.HOLD_REFILL_BYTES)


def test_a_big_job_holds_back_its_refill_until_its_result_is_closed(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(1).warm(wait=True)
    result = pool.run(SPEC, big_job())
    assert result.warm and len(runner.calls) == 1
    # nothing starts beside the big load while the caller still works on its result
    assert pool.warm(wait=True, timeout_s=0.5).ready == 0
    assert len(runner.calls) == 1 and pool._starting == 0
    result.close()
    assert until(pool, lambda: len(pool._ready) == 1)
    result.close()  # a second close releases nothing more
    assert pool._held == 0 and len(runner.calls) == 2
    # a small job's refill starts at once, before its result is closed
    small = pool.run(SPEC, job(1))
    assert until(pool, lambda: len(pool._ready) == 1)
    small.close()


def test_a_big_job_that_fails_releases_its_hold(new: Callable[..., Pool], runner: FakeStartingRunner) -> None:
    pool = new(1).warm(wait=True)

    def fail(box: FakeBox) -> None:
        raise EngineError("the engine went away mid-job")

    runner.on_run = fail
    with pytest.raises(EngineError):
        pool.run(SPEC, big_job())
    runner.on_run = lambda box: None
    assert until(pool, lambda: len(pool._ready) == 1 and pool._held == 0)
    # and a big job of another spec (a fresh sandbox) holds and releases as well
    other = pool.run(OTHER, big_job(1))
    assert not other.warm and pool._held == 1
    other.close()
    assert pool._held == 0


def test_a_limited_pool_starts_no_sandbox_past_its_limit(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    """A batch of three files on a pool of two: three sandboxes started ahead, in all, and none
    left warm for a fourth job that will never come; a job past the limit (a retry) runs in a
    fresh sandbox at once, without waiting for a start that is not coming."""
    pool = new(2, limit=3)
    results = [pool.run(SPEC, job(n)) for n in range(3)]
    assert all(r.warm for r in results)
    assert until(pool, lambda: pool._starting == 0)
    assert pool.started == 3 and pool.ready == 0
    assert len(runner.calls) == 3
    extra = pool.run(SPEC, job(3))
    assert not extra.warm and runner.calls[-1] == (SPEC, False)
    assert (pool.served_warm, pool.served_cold, pool.started) == (3, 1, 3)


def test_a_pool_never_keeps_more_waiting_than_its_limit(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(2, limit=1)
    assert pool.size == 1
    assert pool.warm(wait=True, timeout_s=WAIT_S).ready == 1  # not a wait for a second one
    assert len(runner.calls) == 1


def test_a_negative_limit_is_refused(runner: FakeStartingRunner) -> None:
    with pytest.raises(ValueError, match="limit"):
        Pool(size=1, runner=runner, limit=-1)


def test_concurrent_jobs_never_share_a_sandbox(new: Callable[..., Pool], runner: FakeStartingRunner) -> None:
    pool = new(3).warm(wait=True)
    threads_n, jobs_n = 6, 6
    barrier = threading.Barrier(threads_n)
    results: list[RunResult] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            barrier.wait(WAIT_S)
            for n in range(jobs_n):
                results.append(pool.run(SPEC, job(t * jobs_n + n)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == threads_n * jobs_n
    boxes = [box_of(runner, r) for r in results]
    assert len({box.serial for box in boxes}) == len(results)  # every job a sandbox of its own
    assert all(len(box.jobs) <= 1 for box in runner.boxes)
    assert pool.served_warm + pool.served_cold == len(results) and pool.served_warm >= 3
    assert sum(r.warm for r in results) == pool.served_warm


def test_a_dead_waiting_sandbox_is_not_handed_out(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(2).warm(wait=True)
    first, second = waiting_in(pool)
    first.dead = True  # died while it waited
    result = pool.run(SPEC, job(1))
    assert result.warm and box_of(runner, result) is second
    assert runner.wait_for(lambda: first.discards == 1) and first.jobs == []
    assert until(pool, lambda: len(pool._ready) == 2)
    dead = waiting_in(pool)
    for box in dead:
        box.dead = True
    result = pool.run(SPEC, job(2))  # none alive: a fresh one
    assert not result.warm and box_of(runner, result) not in dead
    assert runner.wait_for(lambda: all(box.discards == 1 for box in dead))
    assert not any(box.jobs for box in dead)
    assert until(pool, lambda: len(pool._ready) == 2)  # refilled with live ones
    assert all(box.alive() for box in pool._ready)


# -- specs ----------------------------------------------------------------------------------------
def test_a_job_of_another_spec_gets_a_fresh_sandbox(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(2).warm(wait=True)
    waiting = runner.live
    result = pool.run(OTHER, job())
    assert not result.warm
    box = box_of(runner, result)
    assert box not in waiting and box.spec == OTHER and box.prepare is False
    assert runner.calls[-1] == (OTHER, False)
    assert not any(b.jobs or b.discards for b in waiting) and pool.ready == 2  # untouched
    assert (pool.served_cold, pool.served_warm) == (1, 0)
    # the pool still keeps the first spec warm, and serves it
    assert pool.run(SPEC, job(1)).warm
    assert until(pool, lambda: len(pool._ready) == 2)
    assert [spec for spec, _ in runner.calls].count(OTHER) == 1


def test_without_warm_the_spec_is_learned_from_the_first_job(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(1)
    pool.run(OTHER, job(1))
    assert until(pool, lambda: len(pool._ready) == 1)
    assert pool.run(OTHER, job(2)).warm
    assert until(pool, lambda: len(pool._ready) == 1)
    assert {spec for spec, _ in runner.calls} == {OTHER}  # the filler keeps the learned spec warm
    assert not pool.run(SPEC, job(3)).warm  # not the spec it learned: a fresh sandbox
    assert runner.calls[-1] == (SPEC, False) and pool.ready == 1


def test_labels_go_on_every_sandbox_and_a_job_still_matches(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    label = ("org.example.batch", "b1")
    pool = new(1, labels=(label,)).warm(wait=True)
    assert runner.calls[0][0] == replace(SPEC, labels=(*SPEC.labels, label))
    assert pool.run(SPEC, job(1)).warm  # the job's spec is labelled the same before matching
    pool.run(OTHER, job(2))
    assert runner.calls[-1][0].labels == (*SPEC.labels, label)


# -- closing --------------------------------------------------------------------------------------
def test_close_discards_what_waits_stops_the_filler_and_refuses_work(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(3).warm(wait=True)
    waiting = runner.live
    assert pool in _pool._live
    pool.close()
    assert len(waiting) == 3 and all(box.discards == 1 and not box.jobs for box in waiting)
    assert runner.live == [] and runner.in_flight == 0 and pool.ready == 0
    assert pool._thread is not None and not pool._thread.is_alive()
    assert pool not in _pool._live
    calls = len(runner.calls)
    with pytest.raises(SandboxError, match="closed"):
        pool.run(SPEC, job())
    assert pool.warm(wait=True).ready == 0  # warm() on a closed pool starts nothing
    pool.close()  # again: nothing to do
    assert len(runner.calls) == calls and runner.live == []


def test_a_pool_closed_before_it_warmed_starts_nothing(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(2)
    pool.close()
    pool.warm(wait=True)
    if pool._thread is not None:  # a filler warm() may start, which ends at once
        pool._thread.join(WAIT_S)
        assert not pool._thread.is_alive()
    with pytest.raises(SandboxError, match="closed"):
        pool.run(SPEC, job())
    assert runner.calls == []


@pytest.mark.parametrize("fails", [False, True])
def test_leaving_the_with_block_closes_the_pool(runner: FakeStartingRunner, fails: bool) -> None:
    waiting: list[FakeBox] = []
    raised: contextlib.AbstractContextManager[Any] = (
        pytest.raises(RuntimeError, match="boom") if fails else contextlib.nullcontext()
    )
    with raised, Pool(size=2, runner=runner) as pool:
        pool.warm(wait=True)
        waiting = runner.live
        if fails:
            raise RuntimeError("boom")  # not swallowed by the pool
    assert len(waiting) == 2 and all(box.discards == 1 for box in waiting)
    assert runner.live == [] and runner.in_flight == 0
    assert pool._thread is not None and not pool._thread.is_alive()
    with pytest.raises(SandboxError, match="closed"):
        pool.run(SPEC, job())


def test_close_waits_for_a_start_in_flight_and_discards_its_sandbox(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    gate = threading.Event()
    runner.hold = lambda: gate.wait(WAIT_S)
    pool = new(2).warm()
    assert runner.wait_for(lambda: runner.in_flight == 2)
    closer = threading.Thread(target=pool.close, daemon=True)
    closer.start()
    try:
        assert until(pool, lambda: pool._closed)
    finally:
        gate.set()  # the engine answers: both sandboxes come up after close() began
    closer.join(WAIT_S)
    assert not closer.is_alive()
    # close() returned only once they were up, and discarded them: nothing is left
    assert len(runner.boxes) == 2 and all(box.discards == 1 and not box.jobs for box in runner.boxes)
    assert runner.in_flight == 0 and pool.ready == 0


def test_close_goes_on_when_removing_a_sandbox_fails(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(2).warm(wait=True)
    first, second = runner.live
    first.discard_error = EngineError("could not remove the container")
    pool.close()
    assert first.discards == 1 and second.discards == 1


def test_close_ends_a_back_off_and_starts_nothing_after(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    pool = new(1)
    pool._failures_in_a_row = 6  # the engine failed for a while: the next start backs off 30 s
    pool.warm()
    assert until(pool, lambda: pool._starting == 1)
    closer = threading.Thread(target=pool.close, daemon=True)
    closer.start()
    closer.join(WAIT_S)  # well before the back-off would end
    assert not closer.is_alive()
    assert runner.calls == []  # the start it backed off for is never made


def test_a_start_the_filler_sets_off_as_close_runs_is_not_made(
    new: Callable[..., Pool], runner: FakeStartingRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filler counts a start, then hands it to a thread of its own: a close() in between
    must not leave that start to happen after it returned (an exit then leaves its sandbox)."""
    held, closing, returned = threading.Event(), threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    class Thread(threading.Thread):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("name") == "model-sandbox-pool-start":
                held.set()
                closing.wait(WAIT_S)  # the filler waits here until close() waits for it
            super().__init__(*args, **kwargs)
            threads.append(self)

        def join(self, timeout: float | None = None) -> None:
            closing.set()
            super().join(timeout)

    shim = SimpleNamespace(
        Thread=Thread,
        Condition=threading.Condition,
        Lock=threading.Lock,
        current_thread=threading.current_thread,
    )
    monkeypatch.setattr(_pool, "threading", shim)
    runner.hold = lambda: returned.wait(WAIT_S)  # a start made now is still on when close() returns
    pool = new(1).warm()
    assert held.wait(WAIT_S)
    pool.close()
    in_flight, calls = runner.in_flight, len(runner.calls)
    returned.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert in_flight == 0 and len(runner.calls) == calls == 0
    assert runner.live == []


# -- failing starts -------------------------------------------------------------------------------
def test_a_start_that_fails_reaches_the_job_and_the_pool_recovers(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    runner.down = True
    pool = new(1, prepare=True)
    with pytest.raises(EngineError, match="engine is gone"):
        pool.run(SPEC, job(1))
    assert (SPEC, False) in runner.calls  # the job tried a fresh sandbox of its own
    assert pool.failures >= 1 and "engine is gone" in (pool.last_error or "")
    runner.down = False  # the engine is back: jobs run, and the filler refills
    assert pool.run(SPEC, job(2)).exit_code == 0
    assert until(pool, lambda: len(pool._ready) == 1)
    assert pool._failures_in_a_row == 0
    assert pool.run(SPEC, job(3)).warm


def test_after_a_failed_start_a_job_does_not_wait_out_the_back_off(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    """A sandbox already starting is worth waiting for, not a retry that first waits out its
    back-off (a second, doubling to 30 s): after a failed start the job takes a fresh one."""
    runner.fail_next = 1
    release = threading.Event()
    results: list[RunResult] = []
    job_thread = threading.Thread(target=lambda: results.append(pool.run(SPEC, job())), daemon=True)

    def hold() -> None:  # the filler's retry hangs (an engine slow to come back), not the job's start
        if len(runner.calls) > 1 and threading.current_thread() is not job_thread:
            release.wait(WAIT_S)

    runner.hold = hold
    pool = new(1).warm()
    assert until(pool, lambda: pool.failures == 1)
    job_thread.start()
    try:
        job_thread.join(WAIT_S)
        assert not job_thread.is_alive()
    finally:
        release.set()
        job_thread.join(WAIT_S)
    assert len(results) == 1 and not results[0].warm and results[0].exit_code == 0


def test_a_failing_engine_is_retried_with_back_off_not_in_a_loop(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    runner.down = True
    pool = new(2).warm()
    assert runner.wait_for(lambda: runner.failures >= 2)
    # the first two starts fail at once; the next waits at least a second (then two, four...):
    # a filler that retried at once would start hundreds in this half second
    threading.Event().wait(0.5)
    assert len(runner.calls) <= 4
    assert pool.failures == runner.failures and pool.ready == 0


def test_warm_wait_gives_up_on_an_engine_that_keeps_failing(
    new: Callable[..., Pool], runner: FakeStartingRunner
) -> None:
    runner.down = True
    pool = new(3)
    waiter = threading.Thread(target=pool.warm, kwargs={"wait": True, "timeout_s": 600.0}, daemon=True)
    waiter.start()
    waiter.join(WAIT_S)  # after three failed starts, not at its timeout
    assert not waiter.is_alive()
    assert pool.ready == 0 and pool.failures >= 3


def test_warm_wait_gives_up_on_failures_while_it_waits_not_on_old_ones(
    new: Callable[..., Pool], runner: FakeStartingRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = threading.Event()  # this test's thread waits on the pool (warm() is waiting)
    me = threading.current_thread()

    class Condition(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            if threading.current_thread() is me:
                waiting.set()
            return super().wait(timeout)

    shim = SimpleNamespace(
        Thread=threading.Thread,
        Condition=Condition,
        Lock=threading.Lock,
        current_thread=threading.current_thread,
    )
    monkeypatch.setattr(_pool, "threading", shim)
    runner.hold = lambda: waiting.wait(WAIT_S)  # the sandbox comes up once warm() waits for it
    pool = new(1)
    pool.failures = 3  # starts failed long ago (an engine restarted, say): the engine is fine now
    try:
        assert pool.warm(wait=True).ready == 1
    finally:
        waiting.set()


# -- prepare (torch imported ahead) ---------------------------------------------------------------
def test_prepare_follows_what_the_jobs_need(new: Callable[..., Pool], runner: FakeStartingRunner) -> None:
    """Each job says whether the host's scan sends it to the full loader; the sandbox started
    to replace the one it takes already follows it (not the job before)."""
    pool = new(1).warm(wait=True)
    assert runner.calls[0] == (SPEC, False) and pool._prepare is False  # nothing known yet

    def one(full: bool) -> bool:
        """Whether the start this job set off imports torch ahead."""
        n = len(runner.calls)
        assert pool.run(SPEC, job(full=full)).warm
        assert until(pool, lambda: len(pool._ready) == 1)
        assert len(runner.calls) == n + 1
        return runner.calls[n][1]

    assert one(True) is True  # the full loader: from the very next sandbox on
    assert [one(False), one(False)] == [True, True]  # one or two plain ones: still
    assert one(False) is False  # three in a row: off
    assert one(True) is True
    assert [one(False), one(False), one(False)] == [True, True, False]  # the full one reset it
    assert not pool.run(OTHER, job(full=True)).warm and runner.calls[-1] == (OTHER, False)  # cold


@pytest.mark.parametrize("prepare", [True, False])
def test_a_fixed_prepare_ignores_the_jobs(
    new: Callable[..., Pool], runner: FakeStartingRunner, prepare: bool
) -> None:
    pool = new(1, prepare=prepare).warm(wait=True)
    for full in (True, False, False, False, False, True):
        assert pool.run(SPEC, job(full=full)).warm
        assert until(pool, lambda: len(pool._ready) == 1)
        assert pool._prepare is prepare
    assert [p for _, p in runner.calls] == [prepare] * 7
    pool.run(OTHER, job())
    assert runner.calls[-1] == (OTHER, False)  # a cold start leaves torch to its job


# -- the runner ----------------------------------------------------------------------------------
def test_a_runner_named_is_checked_at_once_and_made_on_first_use(
    monkeypatch: pytest.MonkeyPatch, runner: FakeStartingRunner
) -> None:
    made: list[str | None] = []

    def make_runner(kind: str | None = None, **kwargs: Any) -> FakeStartingRunner:
        made.append(kind)
        return runner

    monkeypatch.setattr(_launch, "make_runner", make_runner)
    with pytest.raises(PolicyError, match="unknown runner"):
        Pool(runner="nope")
    pool = Pool(runner="bwrap")
    try:
        assert made == []
        assert pool.name == "fake" and pool.ensure_image() == "model-sandbox-worker:fake"
        assert made == ["bwrap"]  # once
    finally:
        pool.close()


def test_threads_asking_for_the_runner_at_once_get_one(
    monkeypatch: pytest.MonkeyPatch, runner: FakeStartingRunner
) -> None:
    """Making a runner may probe an engine for seconds: threads that ask meanwhile wait for it
    instead of making (and leaking) runners of their own."""
    made: list[str | None] = []
    asked = threading.Barrier(4)

    def make_runner(kind: str | None = None, **kwargs: Any) -> FakeStartingRunner:
        made.append(kind)
        time.sleep(0.2)  # a slow probe, so that the other threads ask meanwhile
        return runner

    monkeypatch.setattr(_launch, "make_runner", make_runner)
    pool = Pool(runner="docker")
    got: list[object] = []

    def ask() -> None:
        asked.wait()
        got.append(pool.runner)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert made == ["docker"] and got == [runner] * 4


def test_the_operations_run_through_the_pool_with_its_policy(
    new: Callable[..., Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def fake(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return name

        return call

    for name in ("safe_load", "convert", "scan"):
        monkeypatch.setattr(_api, name, fake(name))
    policy, other = Policy.default(), Policy.default()
    pool = new(1, policy=policy)
    results: list[Any] = [
        pool.safe_load("a.pt", weights_only=False),
        pool.convert("b.pt", "b.safetensors"),
        pool.scan("c.pt", policy=other),  # a policy of the call's own wins
    ]
    assert results == ["safe_load", "convert", "scan"]
    assert calls == [
        ("safe_load", ("a.pt", None), {"runner": pool, "policy": policy, "weights_only": False}),
        ("convert", ("b.pt", "b.safetensors"), {"runner": pool, "policy": policy}),
        ("scan", ("c.pt",), {"runner": pool, "policy": other}),
    ]


# -- the default pool of the module-level functions -----------------------------------------------
@pytest.fixture
def no_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No default pool yet, the environment unset; whatever default pool a test made is closed."""
    for name in ("MODEL_SANDBOX_WARM", _launch.RUNNER_ENV, _launch.RUNTIME_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_pool, "_default", None)
    yield
    if _pool._default is not None:
        _pool._default.close()


def test_the_default_runner_is_one_pool_for_the_process(
    no_default: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_launch.RUNNER_ENV, "bwrap")
    first = _pool.default_runner()
    assert isinstance(first, Pool) and first.size == 1
    assert (first._runner_kind, first._runtime) == ("bwrap", "runc")
    assert _pool.default_runner() is first
    assert first._runner is None  # no runner made (nothing started) before a job


def test_the_default_pool_follows_the_runner_and_runtime_chosen(
    no_default: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = _pool.default_runner()
    assert isinstance(auto, Pool) and (auto._runner_kind, auto._runtime) == ("auto", "runc")
    monkeypatch.setenv(_launch.RUNNER_ENV, "docker")
    docker = _pool.default_runner()
    assert isinstance(docker, Pool) and docker is not auto and docker._runner_kind == "docker"
    with pytest.raises(SandboxError, match="closed"):  # the one it replaced is closed
        auto.run(SPEC, job())
    monkeypatch.setenv(_launch.RUNTIME_ENV, "runsc")
    gvisor = _pool.default_runner()
    assert isinstance(gvisor, Pool) and gvisor is not docker and gvisor._runtime == "runsc"
    assert docker._closed
    gvisor.close()  # a closed default pool is replaced
    again = _pool.default_runner()
    assert again is not gvisor and isinstance(again, Pool) and not again._closed


@pytest.mark.parametrize("off", ["0", "false", "no", " OFF "])
def test_the_default_pool_can_be_turned_off(
    no_default: None, monkeypatch: pytest.MonkeyPatch, off: str
) -> None:
    monkeypatch.setattr(_launch, "make_runner", lambda *a, **kw: FakeStartingRunner())
    monkeypatch.setenv("MODEL_SANDBOX_WARM", off)
    first, second = _pool.default_runner(), _pool.default_runner()
    assert isinstance(first, FakeStartingRunner) and first is not second  # a fresh runner per call
    assert _pool._default is None
    monkeypatch.setenv("MODEL_SANDBOX_WARM", "1")
    assert isinstance(_pool.default_runner(), Pool)


def test_close_all_closes_every_live_pool(
    new: Callable[..., Pool], runner: FakeStartingRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = new(1).warm(wait=True), new(2).warm(wait=True), new(1).warm(wait=True)

    def broken() -> None:
        raise RuntimeError("cannot close")

    monkeypatch.setattr(c, "close", broken)  # one pool failing to close stops nothing
    _pool._close_all()
    for pool in (a, b):
        assert pool._closed and pool not in _pool._live
        with pytest.raises(SandboxError, match="closed"):
            pool.run(SPEC, job())
    monkeypatch.undo()
    assert [box for box in runner.live if box not in c._ready] == []
