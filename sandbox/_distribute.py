"""Batch conversion on a Dask cluster: each file's sandbox runs on a worker, the rest stays here.

``run_batch(..., client=distributed.Client(...))`` (CLI: ``convert --cluster ADDRESS``) does
everything the local batch does on the client -- discovery, hashing, pins, resume, reports,
the manifest, SARIF/CycloneDX -- and only the load itself, one Dask task per input file, runs
on a worker, with that worker's local runner. The per-file result handling is the local
batch's own (``_batch._process``, ``finish``); this module supplies the step in between.

Worker side
    :class:`Readiness` (a ``distributed.WorkerPlugin``, registered by the client on every
    worker, also on those that join later) checks at worker start that this worker's
    model-sandbox is the client's (the same worker image digest, :func:`_image.worker_digest`)
    and that its runner works (the image with that digest is built and the engine answers).
    A ready worker advertises the resource ``model-sandbox-<digest[:16]>`` with as many
    units as sandboxes it may run at once (``--resources model-sandbox=N`` given to the worker,
    else its cores; run it with at least N threads): every task asks for one
    unit, so the scheduler sends tasks only to ready workers of the right version, never more
    than that many at a time to one worker. A worker that is not ready gets no unit, and
    :func:`convert_task` refuses to run there anyway with :class:`WorkerNotReady`, the reason
    attached. The client reads every worker's state first and fails with that error, the
    reasons listed, when no worker is ready; workers that refuse are named in the summary.

    :func:`convert_task` loads the file in the sandbox with ``_api.convert`` (the input is
    read at the same path as on the client: shared storage) and returns plain data only: the
    report's JSON and, in ``stream`` mode, the converted bytes; in ``shared`` mode the worker
    writes them to a temporary name beside their destination instead.

Client side (:class:`Remote`)
    Everything a worker returns is untrusted, as what comes out of a sandbox is: the answer's
    shape and sizes are bounded, the report is parsed by ``LoadReport.from_json`` and must name
    the input hash the client computed; converted bytes must be no larger than the policy's
    output cap, hash to the report's ``safetensors_sha256``, parse as SafeTensors with a strict
    header check (every tensor's dtype, shape and byte range, the data region covered exactly)
    and carry the client's input hash in their metadata. Only then are they renamed into place
    (temporary file, fsync, rename). A file that fails a check fails with
    :class:`OutputRejected`.

Back-pressure: the batch keeps ``jobs`` files in flight (default: the ready workers'
sandbox units together), one client thread per file, so the client holds at most one file's
bytes per in-flight task. A worker that dies mid-task (SIGKILL, a lost node) has its task
rescheduled on another worker by the scheduler; a task whose workers keep dying
(``distributed.scheduler.allowed-failures``) fails that one file with :class:`ClusterError`.
Each file is one task and one client thread: its result is recorded once, whatever the retries.
A scheduler that goes away, or a cluster left without a ready worker for a minute, stops the
batch like an engine that goes away (a re-run continues).

Trust: Dask moves tasks and results between client and workers with pickle; the cluster
(scheduler and workers) must be as trusted as this host (use TLS and a private network, see
docs/dask.md). What the checkpoint produced stays untrusted and is checked as above.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import WorkerPlugin, get_worker

from . import _api, _files, _image
from ._formats import safetensors_header
from .errors import (
    ClusterError,
    EngineError,
    EngineUnavailable,
    InternalError,
    MalformedInput,
    OutputRejected,
    SandboxError,
    WorkerNotReady,
)
from .policy import Policy
from .report import LoadReport, Verdict

if TYPE_CHECKING:
    from distributed import Client, Worker

    from ._batch import BatchContext, Item, ItemResult
    from ._launch import StartingRunner
    from ._pool import Pool

__all__ = ["OUTPUTS", "PLUGIN_NAME", "SLOTS_RESOURCE", "Readiness", "Remote", "convert_task", "resource_name"]

PLUGIN_NAME = "model-sandbox-readiness"
#: a worker started with ``--resources model-sandbox=N`` runs at most N sandboxes at once
SLOTS_RESOURCE = "model-sandbox"
OUTPUTS = ("stream", "shared")
_MAX_REPORT_BYTES = 64 << 20  # a report's JSON from a worker
_MAX_TEXT = 4000  # an error message from a worker
_WAIT_FOR_WORKERS_S = 60.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def resource_name(digest: str) -> str:
    """The worker resource a ready worker of this model-sandbox version advertises."""
    return f"model-sandbox-{digest[:16]}"


# -- worker side --------------------------------------------------------------------------------


class Readiness(WorkerPlugin):
    """Checks at worker start that this worker can run the client's sandbox (see the module
    docstring); a ready worker advertises ``slots`` sandbox units: ``slots``, else the worker's
    own resource ``model-sandbox`` (``dask worker --resources model-sandbox=N``), else its
    cores."""

    def __init__(self, expected_digest: str, slots: int | None = None) -> None:
        self.expected = expected_digest
        self.slots = slots
        self.state: dict[str, Any] = {"ready": False, "error": "not set up yet"}
        self._pool: Pool | None = None
        self._runner: StartingRunner | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # what travels to the workers: the parameters
        return {"expected": self.expected, "slots": self.slots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["expected"], state["slots"])  # type: ignore[misc]

    async def setup(self, worker: Worker) -> None:
        own = worker.state.total_resources.get(SLOTS_RESOURCE)
        self.state = await asyncio.to_thread(self._check, worker.address, int(own) if own else None)
        if self.state["ready"]:
            await worker.set_resources(**{resource_name(self.expected): float(self.state["slots"])})

    def _check(self, address: str, own_slots: int | None) -> dict[str, Any]:
        found = _image.worker_digest()
        if found != self.expected:
            return {
                "ready": False,
                "digest": found,
                "error": f"worker {address} runs another model-sandbox: worker image digest "
                f"{found[:16]}, the client's is {self.expected[:16]}",
            }
        try:
            from ._launch import make_runner

            # the worker's own choice: $MODEL_SANDBOX_RUNNER, else Docker where an engine
            # answers, else bubblewrap
            runner = make_runner()
            tag = runner.ensure_image()
        except SandboxError as exc:
            return {
                "ready": False,
                "digest": found,
                "error": f"worker {address} cannot run the sandbox: {exc.message}",
            }
        except Exception as exc:  # the engine's client library failed in another way
            return {
                "ready": False,
                "digest": found,
                "error": f"worker {address} cannot run the sandbox: {type(exc).__name__}: {exc}",
            }
        slots = max(1, self.slots or own_slots or os.cpu_count() or 1)
        self._runner = runner
        return {
            "ready": True,
            "digest": found,
            "image": tag,
            "runner": runner.name,
            "slots": slots,
            "error": None,
        }

    def runner(self) -> Pool:
        """This worker's pool of warm sandboxes (as many as its units), made on first use."""
        from ._pool import Pool

        with self._lock:
            if self._pool is None:
                self._pool = Pool(size=int(self.state["slots"]), runner=self._runner)
            return self._pool

    def teardown(self, worker: Worker) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


def _state(dask_worker: Worker) -> dict[str, Any]:
    """This worker's readiness (run on every worker by the client)."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, Readiness):
        return {"ready": False, "error": f"worker {dask_worker.address} has no readiness check"}
    return dict(plugin.state)


def convert_task(
    src: str,
    sha256: str,
    policy: Policy,
    shared: str,
    expected_digest: str,
    staged: str | None,
    retries: int,
    backoff_s: float,
) -> dict[str, Any]:
    """One file's load on a worker. Returns plain data (``kind``: converted, error, engine or
    internal; ``report``: the report's JSON; ``data``: the converted bytes in stream mode).
    Raises :class:`WorkerNotReady` on a worker that is not ready for ``expected_digest``."""
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if (
        not isinstance(plugin, Readiness)
        or plugin.expected != expected_digest
        or not plugin.state.get("ready")
    ):
        why = (
            plugin.state.get("error")
            if isinstance(plugin, Readiness) and plugin.expected == expected_digest
            else "its readiness check did not run for this client"
        )
        raise WorkerNotReady(
            f"worker {worker.address} refuses the task: {why}",
            worker=worker.address,
            expected=expected_digest,
            found=str(plugin.state.get("digest", "")) if isinstance(plugin, Readiness) else "",
        )
    runner = plugin.runner()
    delay = backoff_s
    with tempfile.TemporaryDirectory(prefix="model-sandbox-dask-") as tmp:
        dst = staged or os.path.join(tmp, "out.safetensors")
        for attempt in range(retries + 1):
            try:
                report = _api.convert(
                    src,
                    dst,
                    policy=policy,
                    expected_sha256=sha256,
                    shared=shared,
                    runner=runner,
                    write_report=False,
                )
                report.notes.append(f"loaded by Dask worker {worker.address}")
                answer: dict[str, Any] = {"kind": "converted", "report": report.to_json()}
                if staged is None:
                    answer["data"] = Path(dst).read_bytes()
                return answer
            except EngineUnavailable as exc:
                if attempt == retries:
                    return {"kind": "engine", "message": exc.diagnostics()}
                time.sleep(min(delay, 30.0))
                delay *= 2
            except EngineError as exc:
                return {"kind": "engine", "message": exc.diagnostics()}
            except SandboxError as exc:
                rep = exc.report or LoadReport(input_path=src, verdict=Verdict.ERROR)
                rep.notes.append(f"loaded by Dask worker {worker.address}")
                return {
                    "kind": "error",
                    "report": rep.to_json(),
                    "message": exc.message,
                    "reference": exc.reference,
                }
            except Exception as exc:  # a bug or a worker I/O error: this file fails
                return {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"}
    raise AssertionError("unreachable")


# -- client side --------------------------------------------------------------------------------


class Remote:
    """The step of ``_batch._process`` that runs a file's sandbox on the cluster of ``client``.
    Registers :class:`Readiness` and reads every worker's state; raises
    :class:`WorkerNotReady` when none is ready."""

    def __init__(
        self,
        client: Client,
        *,
        output: str = "stream",
        slots: int | None = None,
        wait_s: float = _WAIT_FOR_WORKERS_S,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        self.client = client
        self.output = output
        self.digest = _image.worker_digest()
        self.resource = resource_name(self.digest)
        try:
            client.wait_for_workers(1, timeout=wait_s)
        except TimeoutError:
            raise ClusterError(f"the Dask cluster has no worker after {wait_s:.0f} s") from None
        try:
            client.register_plugin(Readiness(self.digest, slots), name=PLUGIN_NAME)
        except Exception as exc:  # a worker without model-sandbox cannot even unpickle it
            raise WorkerNotReady(
                "a Dask worker cannot install model-sandbox's readiness check (is the client's "
                f"release of model-sandbox[dask] installed there?): {type(exc).__name__}: "
                f"{str(exc)[:_MAX_TEXT]}",
                expected=self.digest,
            ) from None
        states = client.run(_state, on_error="return")  # an exception: that worker is not ready
        self.ready: dict[str, int] = {}
        self.refused: dict[str, str] = {}
        for address, st in sorted(states.items()):
            addr = str(address)[:200]
            if (
                isinstance(st, dict)
                and st.get("ready") is True
                and st.get("digest") == self.digest
                and isinstance(st.get("slots"), int)
            ):
                self.ready[addr] = max(1, st["slots"])
            else:
                err = (
                    st.get("error")
                    if isinstance(st, dict)
                    else f"worker {addr} did not answer: {type(st).__name__}: {st}"
                )
                self.refused[addr] = str(err or "not ready")[:_MAX_TEXT]
        if not self.ready:
            reasons = "; ".join(self.refused.values()) or "no worker answered"
            raise WorkerNotReady(f"no Dask worker can run the sandbox: {reasons}", expected=self.digest)
        self.slots = sum(self.ready.values())
        self.notes = [f"Dask worker refused its tasks: {why}" for why in self.refused.values()]
        self.wait_s = wait_s
        self._watch = threading.Lock()
        self._checked = time.monotonic()
        self._none_since: float | None = None

    def _gone(self) -> str | None:
        """Why no task can run any more (no worker ready for us for ``wait_s``), or None.
        Asks the scheduler at most every few seconds, whichever thread asks."""
        with self._watch:
            now = time.monotonic()
            if now - self._checked < 5.0:
                return None
            self._checked = now
            try:
                workers = self.client.scheduler_info()["workers"].values()
                alive = any(w.get("resources", {}).get(self.resource) for w in workers)
            except Exception:  # the scheduler does not answer: as good as no worker
                alive = False
            if alive:
                self._none_since = None
                return None
            self._none_since = self._none_since or now
            if now - self._none_since < self.wait_s:
                return None
            return (
                f"no Dask worker ready for this model-sandbox has been left for "
                f"{self.wait_s:.0f} s (the workers died or left the cluster, or the "
                "scheduler went away)"
            )

    def __call__(self, item: Item, ctx: BatchContext) -> ItemResult:
        from distributed import KilledWorker

        from . import _batch

        entry, sha, dst = item.entry, item.sha, item.dst
        assert sha is not None and dst is not None  # _process hashed the file and placed its output
        opts = ctx.options
        staged = (
            dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp" if self.output == "shared" else None
        )  # the name _batch._sweep_stale removes
        try:
            fut = self.client.submit(
                convert_task,
                entry.source,
                sha,
                opts.policy,
                opts.shared,
                self.digest,
                None if staged is None else str(staged),
                opts.retries,
                opts.backoff_s,
                pure=False,
                resources={self.resource: 1},
                key=f"model-sandbox-{sha[:16]}-{secrets.token_hex(8)}",
            )
        except Exception as exc:  # a closed or disconnected client
            raise _batch.EngineGone(
                f"cannot submit to the Dask cluster: {type(exc).__name__}: {exc}"
            ) from None
        try:
            while True:
                try:
                    answer = fut.result(timeout=0.5)
                    break
                except TimeoutError:
                    if ctx.cancel.is_set():
                        fut.cancel()  # type: ignore[no-untyped-call]
                        raise _batch.Cancelled from None
                    gone = self._gone()
                    if gone is not None:
                        fut.cancel()  # type: ignore[no-untyped-call]
                        raise _batch.EngineGone(gone) from None
                except KilledWorker as exc:
                    return _batch.static_failure(
                        item,
                        ctx,
                        ClusterError(
                            f"{entry.rel!r}: the Dask cluster gave up on this file, every worker that "
                            f"ran it died ({exc})",
                            hint="see the workers' logs (memory?); a re-run redoes it",
                        ),
                    )
                except WorkerNotReady as exc:
                    raise _batch.EngineGone(exc.diagnostics()) from None
                except (OSError, concurrent.futures.CancelledError) as exc:  # scheduler gone, cancelled
                    raise _batch.EngineGone(
                        f"the Dask cluster went away: {type(exc).__name__}: {exc}"
                    ) from None
            return self._accept(answer, item, ctx, staged)
        finally:
            fut.release()  # type: ignore[no-untyped-call]
            if staged is not None:
                with contextlib.suppress(OSError):
                    os.unlink(staged)  # still there only when it was not accepted

    def _accept(self, answer: object, item: Item, ctx: BatchContext, staged: Path | None) -> ItemResult:
        from . import _batch

        entry, sha, dst = item.entry, item.sha, item.dst
        assert sha is not None and dst is not None

        def rejected(why: str, report: LoadReport | None = None) -> ItemResult:
            exc = OutputRejected(f"{entry.rel!r}: a Dask worker's answer is rejected: {why}")
            if report is None:
                return _batch.static_failure(item, ctx, exc)
            report.verdict = Verdict.ERROR
            report.error = {"reference": exc.reference, "message": exc.message}
            report.outputs.pop("safetensors", None)
            report.outputs.pop("safetensors_sha256", None)
            return _batch.finish(
                item, ctx, report, _batch.Status.FAILED, reason=exc.message, reference=exc.reference
            )

        if not isinstance(answer, dict) or answer.get("kind") not in (
            "converted",
            "error",
            "engine",
            "internal",
        ):
            return rejected("not an answer of convert_task")
        kind = answer["kind"]
        if kind == "engine":
            raise _batch.EngineGone(_text(answer.get("message")))
        if kind == "internal":
            return _batch.static_failure(
                item,
                ctx,
                InternalError(
                    f"internal error on a Dask worker while converting {entry.rel!r}: "
                    f"{_text(answer.get('message'))}"
                ),
            )
        text = answer.get("report")
        if not isinstance(text, str) or len(text) > _MAX_REPORT_BYTES:
            return rejected("no report, or one over 64 MiB")
        report_or_why = parse_report(text)
        if isinstance(report_or_why, str):
            return rejected(f"the report is invalid: {report_or_why}")
        report = report_or_why
        if report.input_sha256 not in (None, sha) or (kind == "converted" and report.input_sha256 != sha):
            return rejected(
                f"the report describes another input (sha256 "
                f"{str(report.input_sha256)[:64]}, the client hashed {sha})"
            )
        if kind == "error":
            return _batch.not_converted(
                item,
                ctx,
                report,
                reason=_text(answer.get("message")),
                reference=_text(answer.get("reference"), 100),
            )
        if report.verdict is Verdict.ERROR or report.error is not None:
            return rejected("a converted file's report carries an error", report)
        out_sha = report.outputs.get("safetensors_sha256")
        if not isinstance(out_sha, str) or not _HEX64.match(out_sha):
            return rejected("the report has no sha256 of the converted file", report)
        cap = ctx.options.policy.limits.output_bytes(entry.size)
        if staged is None:
            data = answer.get("data")
            if not isinstance(data, bytes) or len(data) > cap:
                return rejected(f"no converted bytes, or more than the output cap ({cap} bytes)", report)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            del data
            answer.pop("data", None)
        else:
            tmp = staged
            try:
                st = os.lstat(tmp)
            except OSError:
                return rejected(
                    "the worker wrote no file at the shared output location "
                    "(does it reach OUTDIR at the same path?)",
                    report,
                )
            if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
                return rejected(f"the staged output is not a regular file of at most {cap} bytes", report)
        try:
            problem = check_safetensors(tmp, out_sha=out_sha, source_sha=sha)
            if problem is not None:
                return rejected(problem, report)
            os.replace(tmp, dst)
            _files.fsync_dir(dst.parent)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # gone after the rename
        report.outputs["safetensors"] = str(dst)
        return _batch.finish(item, ctx, report, _batch.Status.CONVERTED)


_Check = Callable[[object], bool]


def _is(t: type) -> _Check:
    return lambda v: isinstance(v, t)


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_num(v: object) -> bool:
    return type(v) in (int, float)


def _is_str_map(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _check_for(hint: Any) -> _Check:
    """How a field of this type reads in a report's JSON: enums as their text, tuples as lists,
    ``X | None`` as X or null, a dataclass as an object of its own fields."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (inner,) = [a for a in args if a is not type(None)]
        check = _check_for(inner)
        return lambda v: v is None or check(v)
    if typing.get_origin(hint) in (list, tuple):
        item = _check_for(args[0])
        return lambda v: isinstance(v, list) and all(item(x) for x in v)
    if typing.get_origin(hint) is dict:
        return _is_str_map if args == (str, str) else _is(dict)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _record(hint)
    simple = {int: _is_int, float: _is_num, str: _is(str)}
    if hint in simple:
        return simple[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _is(str)
    raise TypeError(f"no JSON check for {hint!r}")


def _record(cls: type, **extra: _Check) -> _Check:
    """The JSON object of a report dataclass (``LoadReport.to_dict``): every field of the type
    its annotation gives, the fields without a default present, no other key but ``extra``."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    spec = {f.name: _check_for(hints[f.name]) for f in fields} | extra
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    } | set(extra)
    return lambda v: (
        isinstance(v, dict) and required <= set(v) and all(k in spec and spec[k](x) for k, x in v.items())
    )


#: the type of every field of a load report's JSON, from the report's own dataclasses
#: (``LoadReport.from_dict`` trusts its input: it parses our own reports; a worker's answer is
#: checked against this first)
_REPORT = _record(LoadReport, schema=_is(str))


def parse_report(text: str) -> LoadReport | str:
    """A worker's report, parsed and typed, or why it is not one: strict JSON (no NaN or
    Infinity), every field of the type the schema gives it, then ``LoadReport.from_dict``."""

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {str(exc)[:200]}"
    if not _REPORT(data):
        return "a field is missing, unknown or of the wrong type"
    try:
        return LoadReport.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    return (value if isinstance(value, str) else "(no message)")[:limit]


def check_safetensors(path: Path, *, out_sha: str, source_sha: str) -> str | None:
    """Why the file at ``path`` is not the converted file a report describes, or None: its
    sha256 is ``out_sha``; its header is strict SafeTensors (every entry a known dtype, a shape
    of naturals and a byte range of exactly that size, the ranges tiling the data region with
    no gap or overlap); its metadata names ``source_sha`` as the input's sha256."""
    with open(path, "rb") as f:
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if h.hexdigest() != out_sha:
            return "the converted bytes do not hash to the report's safetensors_sha256"
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(safetensors_header.MAX_HEADER, size - 8):
            return "not SafeTensors: bad header length"
        try:
            header = safetensors_header.load_header(f.read(n))
        except MalformedInput as exc:
            return f"not SafeTensors: {exc.message}"
    if not isinstance(header, dict):
        return "not SafeTensors: the header is not an object"
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return "the SafeTensors metadata is missing or not strings"
    if meta.get("model_sandbox.source_sha256") != source_sha:
        return "the SafeTensors metadata names another input"
    spans = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            return f"SafeTensors entry {name[:100]!r} is malformed"
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if (
            dtype not in safetensors_header.DTYPES
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            return f"SafeTensors entry {name[:100]!r} is malformed"
        if not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != safetensors_header.byte_count(
            shape, safetensors_header.DTYPES[dtype], offsets[1] - offsets[0]
        ):
            return f"SafeTensors entry {name[:100]!r}: shape and byte range disagree"
        spans.append((offsets[0], offsets[1]))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            return "SafeTensors byte ranges overlap or leave gaps"
        pos = end
    if pos != size - 8 - n:
        return "SafeTensors data region does not match its entries"
    return None
