"""The ``model-sandbox`` command. The only module that prints.

Exit codes: 0 clean, 1 unsafe (suspicious or malicious), 2 error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import _api, _files, _hfcache
from ._launch import RUNNERS, RUNTIMES, Runner, make_runner
from ._pool import Pool
from .errors import PolicyError, SandboxError
from .policy import Policy, builtin_names
from .report import LoadReport, clean_text, size_text

EXIT_CLEAN, EXIT_UNSAFE, EXIT_ERROR = 0, 1, 2


def _policy(value: str | None) -> Policy:
    if value is None:
        return Policy.default()
    if value in builtin_names():
        return Policy.builtin(value)
    return Policy.from_file(value)


def _emit(reports: list[LoadReport], fmt: str) -> None:
    if fmt == "sarif":
        from ._sarif import render_sarif

        print(json.dumps(render_sarif(reports), indent=2, sort_keys=True, ensure_ascii=False))
    elif fmt == "json":
        data = [r.to_dict() for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2, sort_keys=True, default=str))
    else:
        print("\n\n".join(r.to_text() for r in reports))


def _exit_code(reports: list[LoadReport]) -> int:
    return max((r.exit_code for r in reports), default=EXIT_CLEAN)


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _pin(value: str) -> tuple[str | None, str]:
    """``HEX`` (for the one input) or ``FILE:HEX``."""
    if _HEX64.fullmatch(value):
        return None, value.lower()
    path, sep, hexd = value.rpartition(":")
    if not sep or not path or not _HEX64.fullmatch(hexd):
        raise argparse.ArgumentTypeError(f"expected FILE:HEX (or HEX for one input), got {value!r}")
    return path, hexd.lower()


def _pins(args: argparse.Namespace, inputs: Sequence[str]) -> dict[str, str]:
    """Pins from --lock and --expect-sha256, keyed by absolute and resolved path."""
    from ._lock import read_lock

    pins: dict[str, str] = read_lock(args.lock) if getattr(args, "lock", None) else {}
    for path, hexd in args.expect_sha256 or []:
        if path is None:
            if len(inputs) != 1 or os.path.isdir(inputs[0]):
                raise SandboxError("--expect-sha256 HEX pins a single input file; use FILE:HEX")
            path = inputs[0]
        full = os.path.abspath(path)
        for key in {full, os.path.realpath(full)}:
            pins[key] = hexd
    return pins


def _pin_for(pins: dict[str, str], path: str) -> str | None:
    return pins.get(os.path.abspath(path)) or pins.get(os.path.realpath(path))


@contextlib.contextmanager
def _runner(files: int, kind: str | None = None, runtime: str | None = None) -> Iterator[Runner]:
    """One file: a fresh sandbox (nothing warmed for later). Several: a pool of one, so the
    next file's sandbox starts while this one loads. ``kind``: docker, bwrap or auto (None:
    ``$MODEL_SANDBOX_RUNNER``, else auto); ``runtime``: runc or runsc (None:
    ``$MODEL_SANDBOX_RUNTIME``, else runc)."""
    if files > 1:
        with Pool(size=1, runner=make_runner(kind, runtime=runtime) if runtime else kind or None) as pool:
            yield pool
    else:
        yield make_runner(kind, runtime=runtime)


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan each file statically (every pickle read, never run), then load it in the sandbox, keep
    no weights, and print the report. Exit code: the worst over all files."""
    policy = _policy(args.policy)
    paths = list(args.paths) + ([str(_hfcache.default_cache())] if args.hf_cache else [])
    if not paths:
        raise SandboxError("nothing to scan: give a PATH or --hf-cache")
    pins = _pins(args, paths)
    targets = [t for p in paths for t in _hfcache.expand(p)]
    by_blob: dict[str, LoadReport] = {}  # a blob several revisions share is scanned once
    reports = []
    bar: Any = None
    if args.format == "text" and len(targets) > 1 and sys.stderr.isatty():
        from ._term import ScanBar, console

        bar = ScanBar(console(sys.stderr), len(targets))
    with (
        _runner(len({t.real for t in targets}), args.runner, args.runtime) as runner,
        bar if bar is not None else contextlib.nullcontext(),
    ):
        for t in targets:
            if bar is not None:
                bar.start(t.path)
            first = by_blob.get(t.real)
            if first is None:
                first = by_blob[t.real] = _api.scan(
                    t.path,
                    policy=policy,
                    expected_sha256=_pin_for(pins, t.path),
                    dynamic=not args.static_only,
                    runner=runner,
                )
                report = first
            else:
                report = dataclasses.replace(first, input_path=t.path)
                report.notes = [*first.notes, "the same file as another revision's: scanned once"]
            reports.append(report)
            if bar is not None:
                bar.done(report)
    if args.format == "text" and any(t.repo for t in targets):
        print(_models_text(targets, reports))
    else:
        _emit(reports, args.format)
    if args.format == "text" and len(reports) > 1 and sys.stdout.isatty():
        from ._term import console, scan_table

        print()
        console(sys.stdout).print(scan_table(reports))  # a person reads the verdicts at a glance
    return _exit_code(reports)


def _models_text(targets: Sequence[_hfcache.Target], reports: Sequence[LoadReport]) -> str:
    """Hugging Face cache results: one line per model file, grouped by model and revision."""
    lines: list[str] = []
    last = None
    for t, r in zip(targets, reports, strict=True):
        key = (t.repo, t.revision)
        if key != last:
            lines.append(f"{clean_text(key[0] or '(not in a cache)', 300)} @ {clean_text(key[1] or '-', 80)}")
            last = key
        top = max(r.findings, key=lambda f: f.severity, default=None)
        why = (
            f" ({clean_text(top.rule, 60)}: {clean_text(top.message, 200)})"
            if top and r.verdict.value != "clean"
            else ""
        )
        name = t.label.split(": ", 1)[-1]
        lines.append(f"  {r.verdict.value.upper():10} {clean_text(name, 300)}{why}")
    return "\n".join(lines)


_BATCH_ONLY = ("jobs", "include", "exclude", "force", "report_dir", "quiet", "cluster")


def cmd_convert(args: argparse.Namespace) -> int:
    """One file: load SRC in the sandbox and write DST (default: SRC with the suffix .safetensors)
    and DST.report.json. Several files or directories (recursive): write OUTDIR mirroring
    the input tree (a/b/x.pt -> OUTDIR/a/b/x.safetensors), one report per file, and a
    manifest that lets a re-run skip what is done. Files are recognised by content; others
    are listed as skipped. Nothing is written for a file judged unsafe."""
    srcs: list[str] = args.srcs
    if args.cluster is None and args.cluster_output != "stream":
        from .errors import BatchError

        raise BatchError("--cluster-output applies to a batch on a Dask cluster: add --cluster")
    batch = (
        len(srcs) > 1
        or os.path.isdir(srcs[0])
        or (args.output is not None and os.path.isdir(args.output))
        or any(getattr(args, k) not in (None, False, []) for k in _BATCH_ONLY)
    )
    if batch:
        return _convert_batch(args)
    policy = _policy(args.policy)
    pins = _pins(args, srcs)
    expected = _pin_for(pins, srcs[0])
    if args.lock and expected is None:
        raise SandboxError(
            f"{srcs[0]!r} is not listed in the lock file {args.lock!r}; refusing to open it",
            hint="add it with `model-sandbox lock` after checking it",
        )
    try:
        with _runner(1, args.runner, args.runtime) as runner:
            report = _api.convert(
                srcs[0],
                args.output,
                policy=policy,
                expected_sha256=expected,
                runner=runner,
                shared=args.shared,
                allow_unverified=args.allow_unverified,
            )
    except SandboxError as exc:
        if exc.report is None:
            raise
        report = exc.report
    _emit([report], args.format)
    return report.exit_code


# -- batch conversion --------------------------------------------------------------------------


def _item_line(r: object) -> str:
    from ._batch import ItemResult

    assert isinstance(r, ItemResult)
    verdict = r.verdict.value if r.verdict else "-"
    extra = " (unchanged)" if r.reused else ""
    if r.reason and r.verdict is not None:
        extra += f" ({clean_text(r.reference or 'error', 60)}: {clean_text(r.reason, 500)})"
    elif r.reason:
        extra += f" ({clean_text(r.reason, 500)})"
    return f"{r.status.value:9} {verdict:10} {clean_text(r.rel, 500)}{extra}"


def _summary_text(summary: object, *, quiet: bool) -> str:
    from ._batch import BatchSummary, Status

    assert isinstance(summary, BatchSummary)
    res = summary.results
    by_status = {s: sum(r.status is s for r in res) for s in Status}
    c = summary.counts
    lines = [
        f"model-sandbox: {len(res)} files: {by_status[Status.CONVERTED]} converted, "
        f"{by_status[Status.REFUSED]} refused as unsafe, {by_status[Status.FAILED]} failed, "
        f"{by_status[Status.SKIPPED]} skipped ({c['reused']} unchanged since the last run"
        f"{f', {summary.excluded} excluded by pattern' if summary.excluded else ''})",
        f"  verdicts: clean {c['clean']}, suspicious {c['suspicious']}, malicious {c['malicious']}, "
        f"error {c['error']}",
        f"  {size_text(summary.bytes_in)} in, {size_text(summary.bytes_out)} out, "
        f"{summary.elapsed_s:.1f} s; output in {clean_text(str(summary.outdir), 500)}",
    ]
    slow = summary.slowest(5)
    if slow and not quiet:
        lines.append(
            "  slowest: " + ", ".join(f"{clean_text(r.rel, 200)} {r.duration_s:.1f} s" for r in slow)
        )
    if summary.problems:
        lines.append("not clean:")
        for r in summary.problems:
            verdict = r.verdict.value.upper() if r.verdict else "-"
            why = r.top_finding or (f"{r.reference}: {r.reason}" if r.reason else "")
            lines.append(f"  {verdict:10} {clean_text(r.rel, 500)}: {clean_text(why, 500)}")
    skipped = [r for r in res if r.status is Status.SKIPPED]
    if skipped and not quiet:
        lines.append("skipped:")
        lines += [f"  {clean_text(r.rel, 500)}: {clean_text(r.reason or '', 300)}" for r in skipped]
    for rel in summary.indexes:
        lines.append(f"sharded checkpoint: wrote {clean_text(rel, 500)}")
    for why in summary.index_problems:
        lines.append(f"sharded checkpoint: no index: {clean_text(why, 500)}")
    for note in summary.notes:
        lines.append(f"note: {clean_text(note, 1000)}")
    if summary.stopped:
        lines.append(f"stopped: {clean_text(summary.stopped, 1000)}")
    if summary.stopped or summary.interrupted:
        lines.append(
            f"{len(summary.not_done)} files not done; run the same command again to "
            "continue (finished files are not redone)"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _cluster(address: str | None) -> Iterator[Any]:
    """A ``distributed.Client`` connected to ``address``, or None without one."""
    if address is None:
        yield None
        return
    from .errors import ClusterError

    try:
        from distributed import Client
    except ImportError:
        raise ClusterError("--cluster needs Dask: pip install 'model-sandbox[dask]'") from None
    try:
        client = Client(address, timeout=30, set_as_default=False)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address!r}: {exc}") from None
    try:
        yield client
    finally:
        client.close()  # type: ignore[no-untyped-call]


def _convert_batch(args: argparse.Namespace) -> int:
    from ._batch import BatchOptions, run_batch
    from .errors import BatchError

    if args.output is None:
        raise BatchError("several inputs or a directory need -o OUTDIR")
    if args.runtime:  # the batch's pools (and a Dask worker's) take it from the environment
        from ._launch import RUNTIME_ENV, runtime_kind

        os.environ[RUNTIME_ENV] = runtime_kind(args.runtime)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise BatchError(f"{args.output!r} exists and is not a directory")
    options = BatchOptions(
        policy=_policy(args.policy),
        jobs=args.jobs,
        include=tuple(args.include or ()),
        exclude=tuple(args.exclude or ()),
        force=args.force,
        report_dir=Path(args.report_dir) if args.report_dir else None,
        pins=_pins(args, args.srcs),
        require_pins=bool(args.lock),
        shared=args.shared,
        allow_unverified=args.allow_unverified,
        runner=args.runner,
    )
    interactive = args.format == "text" and not args.quiet
    # a person watching stderr gets rich's bar; anything else the plain per-file lines
    bar: Any = None
    if interactive and sys.stderr.isatty():
        from ._term import BatchBar, console

        bar = BatchBar(console(sys.stderr))
    per_file = interactive and bar is None
    with bar if bar is not None else contextlib.nullcontext(), _cluster(args.cluster) as client:
        summary = run_batch(
            args.srcs,
            args.output,
            options,
            progress=bar,
            on_result=(lambda r: print(_item_line(r), flush=True)) if per_file else None,
            client=client,
            cluster_output=args.cluster_output,
        )
    if args.format == "text" and sys.stdout.isatty():
        from ._term import console, summary_tables

        console(sys.stdout).print(summary_tables(summary, quiet=args.quiet))
        for note in summary.notes:
            print(f"note: {note}")
    elif args.format == "text":
        print(_summary_text(summary, quiet=args.quiet))
    else:
        reports = summary.reports()
        if args.format == "sarif":
            _emit(reports, "sarif")
        else:  # always a list here, even for one file
            print(json.dumps([r.to_dict() for r in reports], indent=2, sort_keys=True, default=str))
        if summary.stopped or summary.interrupted:
            print(_summary_text(summary, quiet=True), file=sys.stderr)
    if summary.interrupted:
        return 130
    return summary.exit_code


def cmd_bom(args: argparse.Namespace) -> int:
    """One machine-learning-model component per converted model, with its legacy source as pedigree
    ancestor and the verdict, hashes, tool, image and policy digests as properties."""
    from ._bom import build_bom

    text, problems = build_bom(args.outdir)
    for p in problems:
        print(f"model-sandbox: {clean_text(p, 1000)}", file=sys.stderr)
    if not text:
        return EXIT_ERROR
    if args.output in (None, "-"):
        print(text)
    else:
        _files.atomic_write(Path(args.output), text.encode())
    return EXIT_ERROR if problems else EXIT_CLEAN


def cmd_lock(args: argparse.Namespace) -> int:
    """Find model files (by content) under each PATH and print `HEX  PATH` lines (sha256sum format)
    to use with `convert --lock FILE`. Paths are relative to the current directory, as for
    `sha256sum -c`."""
    from ._lock import lock_entries, render_lock

    sys.stdout.write(
        render_lock(lock_entries(args.paths, include=args.include or (), exclude=args.exclude or ()))
    )
    return EXIT_CLEAN


def cmd_image_build(args: argparse.Namespace) -> int:
    """Assemble the worker image from this Python environment (no registry needed) and import it
    into Docker; with --runner bwrap, extract it into the user's cache instead (the bwrap
    runner also does that on first use)."""
    from ._bwrap import BwrapRunner
    from ._launch import DockerRunner

    def progress(msg: str) -> None:
        print(f"model-sandbox: {msg}", file=sys.stderr)

    runner = make_runner(args.runner)
    assert isinstance(runner, DockerRunner | BwrapRunner)
    tag, seconds, size = runner.build_image(force=args.force, progress=progress)
    if seconds == 0.0:
        print(f"{tag} is up to date ({size / 2**20:.0f} MiB)")
    else:
        print(f"built {tag} in {seconds:.1f} s ({size / 2**20:.0f} MiB)")
    return EXIT_CLEAN


def cmd_image_tag(args: argparse.Namespace) -> int:
    """Print the content-derived tag of the worker image."""
    from ._image import image_tag

    print(image_tag())
    return EXIT_CLEAN


def _patch_dir(args: argparse.Namespace) -> Path:
    from . import _autopatch

    return Path(args.target) if args.target else _autopatch.site_dir(user=args.user)


def cmd_patch_install(args: argparse.Namespace) -> int:
    """Install the .pth file."""
    from . import _autopatch

    path = _autopatch.install(_patch_dir(args))
    print(
        f"wrote {path}: run a script with {_autopatch.ENV}=1 and its torch.load calls go through the sandbox"
    )
    return EXIT_CLEAN


def cmd_patch_uninstall(args: argparse.Namespace) -> int:
    """Uninstall the .pth file."""
    from . import _autopatch

    target = _patch_dir(args)
    removed = _autopatch.uninstall(target)
    print(f"removed {target / _autopatch.PTH_NAME}" if removed else f"nothing to remove in {target}")
    return EXIT_CLEAN


def cmd_policy_show(args: argparse.Namespace) -> int:
    """Print a policy."""
    policy = _policy(args.name)
    print(json.dumps({**policy.to_dict(), "digest": policy.digest}, indent=2))
    return EXIT_CLEAN


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Validate a policy file and list every problem."""
    try:
        policy = Policy.from_file(args.file)
    except PolicyError as exc:
        print(f"{args.file}: invalid", file=sys.stderr)
        for problem in exc.problems or [exc.message]:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.file}: valid policy {policy.name!r}")
    return EXIT_CLEAN


def cmd_report_render(args: argparse.Namespace) -> int:
    """Print a saved JSON report or list of reports (checked field by field first), or with --html
    write one self-contained page (several reports: a table of them first): verdict,
    findings with their evidence, a timeline of the events and the resource use (over time
    where the report has the samples, and the peaks)."""
    from ._html import read_reports, write_html

    reports = read_reports(args.file)  # untrusted input: size-capped, strict, each field checked
    if args.html:
        path = write_html(reports, args.html)
        what = ", ".join(
            f"{n} {v}"
            for v in ("malicious", "suspicious", "error", "clean")
            if (n := sum(r.verdict.value == v for r in reports))
        )
        print(
            f"wrote {clean_text(str(path), 500)} ({len(reports)} "
            f"report{'s' if len(reports) > 1 else ''}: {what}; "
            f"{sum(len(r.findings) for r in reports)} findings)"
        )
    else:
        _emit(reports, args.format)
    return _exit_code(reports)


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
) -> argparse.ArgumentParser:
    """The subcommand ``name`` among ``commands``, which ``func`` runs; ``func``'s docstring is
    its ``--help`` description."""
    p = commands.add_parser(name, help=help, description=inspect.getdoc(func))
    p.set_defaults(func=func)
    return p


def _actions(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, *, help: str, description: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The subcommand ``name`` among ``commands``, whose own subcommands (one required, the
    ACTION; ``args.NAME_command`` names it) do the work."""
    p = commands.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-sandbox",
        description="Open untrusted PyTorch checkpoints inside a locked-down container and get "
        "SafeTensors plus a report. Exit codes: 0 clean, 1 unsafe, 2 error.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--format",
            choices=("text", "json", "sarif"),
            default="text",
            help="output format: text, json (the versioned report schema; a list for "
            "several files) or sarif (SARIF 2.1.0) (default: text)",
        )
        p.add_argument(
            "--policy",
            metavar="NAME|FILE",
            help=f"load policy: one of {', '.join(builtin_names())} or a TOML file (default: default)",
        )
        p.add_argument(
            "--expect-sha256",
            metavar="FILE:HEX",
            type=_pin,
            action="append",
            help="refuse FILE unless its sha256 is HEX, before the sandbox opens it "
            "(repeatable; plain HEX pins the one input)",
        )
        runner_option(p)
        p.add_argument(
            "--runtime",
            choices=RUNTIMES,
            default=None,
            help="the Docker runner's runtime: runc (the engine's default) or "
            "runsc (gVisor: a kernel in user space between the payload and "
            "the host's kernel; slower; evidence from gVisor's own trace; "
            "needs the engine's model-sandbox-runsc runtime, see "
            "`MODEL_SANDBOX_RUNSC=1 scripts/ensure-docker.sh`) "
            "(default: $MODEL_SANDBOX_RUNTIME, else runc)",
        )

    def runner_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--runner",
            choices=RUNNERS,
            default=None,
            help="what makes the sandbox: docker (a Docker engine), bwrap (bubblewrap, "
            "no daemon: unprivileged user namespaces) or auto (Docker when an "
            "engine answers, else bwrap) (default: $MODEL_SANDBOX_RUNNER, else "
            "auto)",
        )

    p = _command(
        sub, "scan", cmd_scan, help="load files in the sandbox without keeping weights; print reports"
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files, directories (every checkpoint in them, recognised by content) "
        "or a Hugging Face cache (models--org--name/snapshots/REV/...: results "
        "per model and revision, each blob scanned once)",
    )
    p.add_argument(
        "--hf-cache",
        action="store_true",
        help="also scan the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub)",
    )
    p.add_argument("--static-only", action="store_true", help="stop after the static scan (no Docker needed)")
    common(p)

    p = _command(sub, "convert", cmd_convert, help="convert checkpoints to SafeTensors through the sandbox")
    p.add_argument("srcs", nargs="+", metavar="SRC", help="checkpoint files or directories")
    p.add_argument(
        "-o",
        "--output",
        metavar="DST|OUTDIR",
        help="output file (one SRC file) or directory (required for directories and several inputs)",
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        metavar="N",
        help="sandboxes run in parallel (default: number of cores); with --cluster, "
        "files in flight on the cluster (default: the sandboxes its ready "
        "workers may run together)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only inputs whose relative path or name matches (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="leave out inputs whose relative path or name matches (repeatable)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="redo every input, even those the manifest shows as done and unchanged",
    )
    p.add_argument(
        "--shared",
        choices=_api.SHARED_MODES,
        default="complete",
        help="tensors that share storage: every name a tensor of its own (complete, "
        "what plain SafeTensors readers expect), or a tied tensor under one "
        "name (dedupe, Hugging Face's save_pretrained convention) "
        "(default: complete)",
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="write tensors the host could not verify against its own reading of the "
        "file (a jagged nested tensor's values, Fortran-ordered joblib arrays); "
        "the report keeps the weights-unverified finding (default: refuse)",
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress and no per-file lines: only the summary"
    )
    p.add_argument(
        "--report-dir",
        metavar="DIR",
        help="write each file's JSON report under DIR, mirroring the tree (default: OUTDIR)",
    )
    p.add_argument(
        "--lock",
        metavar="FILE",
        help="a lock file from `model-sandbox lock`: refuse, before opening it, every "
        "input whose sha256 differs or that it does not list",
    )
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run each file's sandbox on the workers of this Dask scheduler "
        "(tcp://HOST:8786; needs model-sandbox[dask], the same version and "
        "image on every worker, and the inputs at the same paths there; see "
        "docs/dask.md); hashes, pins, reports and the manifest stay here",
    )
    p.add_argument(
        "--cluster-output",
        choices=("stream", "shared"),
        default="stream",
        help="with --cluster: workers send the converted bytes back (stream), or "
        "write them beside their destination in OUTDIR, which they must reach "
        "at the same path (shared); the client checks them either way "
        "(default: stream)",
    )
    common(p)

    p = _command(sub, "bom", cmd_bom, help="write a CycloneDX 1.6 ML-BOM for a batch's OUTDIR")
    p.add_argument("outdir", metavar="OUTDIR")
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: stdout)")

    p = _command(sub, "lock", cmd_lock, help="print a lock file pinning the sha256 of model files")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--include", action="append", metavar="GLOB", help="only matching files")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out matching files")

    isub = _actions(sub, "image", help="the worker image", description="Manage the worker image.")
    b = _command(isub, "build", cmd_image_build, help="build the worker image offline from this environment")
    b.add_argument("--force", action="store_true", help="rebuild even if it is up to date")
    runner_option(b)
    _command(isub, "tag", cmd_image_tag, help="print the tag this version expects")

    psub = _actions(
        sub,
        "policy",
        help="show or check load policies",
        description="Show a built-in policy or check a policy file.",
    )
    s = _command(psub, "show", cmd_policy_show, help="print a policy as JSON")
    s.add_argument("name", metavar="NAME|FILE")
    c = _command(psub, "check", cmd_policy_check, help="validate a policy file")
    c.add_argument("file", metavar="FILE")

    patch_sub = _actions(
        sub,
        "patch",
        help="route torch.load of unmodified scripts through the sandbox",
        description="Install (or remove) a .pth file in site-packages that makes "
        "every Python started with MODEL_SANDBOX_PATCH=1 route "
        "torch.load through sandbox.safe_load once torch is "
        "imported. Without the variable the file does nothing.",
    )
    for action, func in (("install", cmd_patch_install), ("uninstall", cmd_patch_uninstall)):
        a = _command(patch_sub, action, func, help=f"{action} the .pth file")
        where = a.add_mutually_exclusive_group()
        where.add_argument("--user", action="store_true", help="the user site-packages")
        where.add_argument("--target", metavar="DIR", help="another site directory")

    rsub = _actions(
        sub,
        "report",
        help="render a saved report as text, JSON, SARIF or an HTML page",
        description="Render a saved JSON report (or a batch's list of them). "
        "`report FILE ...` is short for `report render FILE ...`.",
    )
    r = _command(
        rsub, "render", cmd_report_render, help="print a saved JSON report, or write it as an HTML page"
    )
    r.add_argument("file", metavar="FILE")
    r.add_argument("--format", choices=("text", "json", "sarif"), default="text")
    r.add_argument(
        "--html",
        metavar="OUT",
        help="write the report as one HTML page (no external assets, no script) "
        "to OUT instead of printing it",
    )
    return parser


_REPORT_ACTIONS = ("render", "-h", "--help")


def _shorthand(argv: list[str]) -> list[str]:
    """``report FILE ...`` is ``report render FILE ...``."""
    for i, arg in enumerate(argv):
        if arg == "report":
            if i + 1 < len(argv) and argv[i + 1] not in _REPORT_ACTIONS:
                return [*argv[: i + 1], "render", *argv[i + 1 :]]
            return argv
        if not arg.startswith("-"):
            return argv
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_shorthand(list(sys.argv[1:] if argv is None else argv)))
    _terminate_like_interrupt()
    try:
        code: int = args.func(args)
        return code
    except SandboxError as exc:
        if args.verbose:
            traceback.print_exc()
        print("\n".join(clean_text(line, 4000) for line in exc.diagnostics().splitlines()), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("model-sandbox: interrupted", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _terminate_like_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every sandbox container is removed on the way out."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def run() -> None:
    sys.exit(main())
