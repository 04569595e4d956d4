"""Terminal output of a batch, with ``rich``: a progress bar and summary tables.

Used by ``_cli`` only where a person watches: the bar when stderr is a terminal, the tables
when stdout is one. Elsewhere (a pipe, a file, CI logs) the CLI prints its plain, stable lines
and this module is not used. Colours are off when ``NO_COLOR`` is set to anything but the
empty string (https://no-color.org) or when the stream is not a terminal.

Every string that came from the disk or a sandbox (file names, reasons, findings) goes through
:func:`~sandbox.report.clean_text` and into ``rich`` as plain :class:`~rich.text.Text`, never
as markup: a file named ``[red]x`` or holding an escape sequence is shown as it is.
"""

from __future__ import annotations

import os
from typing import IO, Any, Self

from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from ._batch import BatchProgress, BatchSummary, ItemResult, Status
from .report import LoadReport, clean_text, size_text

__all__ = ["BatchBar", "ScanBar", "console", "no_color", "scan_table", "summary_tables"]

VERDICT_STYLES = {"clean": "green", "suspicious": "yellow", "malicious": "bold red", "error": "magenta"}


def no_color(environ: Any = None) -> bool:
    """``NO_COLOR`` set and not empty."""
    env = os.environ if environ is None else environ
    return bool(env.get("NO_COLOR"))


def console(stream: IO[str]) -> Console:
    """A console on ``stream``: colours only on a terminal and without ``NO_COLOR``."""
    tty = stream.isatty()
    return Console(
        file=stream,
        force_terminal=tty,
        no_color=no_color() or not tty,
        highlight=False,
        emoji=False,
        markup=False,
    )


def duration(s: float | None) -> str:
    if s is None:
        return "-:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _counts_text(counts: dict[str, int] | Any, *, skipped: bool = False) -> Text:
    text = Text()
    for key, label in (
        ("clean", "clean"),
        ("suspicious", "suspicious"),
        ("malicious", "malicious"),
        ("error", "failed"),
    ):
        n = int(counts.get(key, 0))
        if text:
            text.append(" ")
        text.append(f"{label} {n}", style=VERDICT_STYLES[key] if n else "dim")
    if skipped:
        text.append(f" skipped {int(counts.get('skipped', 0))}", style="dim")
    return text


class _Fields(ProgressColumn):
    """One of the snapshot's texts, kept in the task's fields as a :class:`Text` (never
    markup)."""

    def __init__(self, key: str, column: Column | None = None) -> None:
        super().__init__(table_column=column)
        self.key = key

    def render(self, task: Task) -> Text:
        value = task.fields.get(self.key)
        return value if isinstance(value, Text) else Text(str(value or ""))


class _Live:
    """A rich progress display on ``out`` shown while the ``with`` block runs: ``columns``, then
    the file being worked on (the task's ``current`` field), across the whole width; gone when
    it stops."""

    def __init__(self, out: Console, *columns: ProgressColumn) -> None:
        self.progress = Progress(
            *columns,
            _Fields("current", Column(no_wrap=True, overflow="ellipsis", min_width=10, ratio=1)),
            console=out,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
            expand=True,
        )

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class BatchBar(_Live):
    """The batch's progress on a terminal: files done of all, percent of bytes, bytes, rate,
    ETA, verdict counts and the file being loaded; files that are not clean are listed above
    the bar as they finish. Call it with each :class:`BatchProgress`; use as a context
    manager."""

    def __init__(self, out: Console) -> None:
        self.console = out
        super().__init__(
            out,
            _Fields("files"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            _Fields("bytes"),
            _Fields("rate"),
            _Fields("eta"),
            _Fields("counts"),
        )
        self.task = self.progress.add_task(
            "convert", total=None, files="", bytes="", rate="", eta="", counts=Text(), current=Text()
        )

    def __call__(self, p: BatchProgress) -> None:
        files_s = p.done / p.elapsed_s if p.elapsed_s > 0 else 0.0
        current = p.running[0] if p.running else (p.last.rel if p.last else "")
        more = f" (+{len(p.running) - 1})" if len(p.running) > 1 else ""
        self.progress.update(
            self.task,
            total=max(p.bytes_total, 1),
            completed=p.bytes_done if p.bytes_total else (1 if p.done >= p.total else 0),
            files=Text(f"{p.done}/{p.total} files", style="bold"),
            bytes=Text(f"{size_text(p.bytes_done)}/{size_text(p.bytes_total)}"),
            rate=Text(f"{size_text(p.rate_bytes_s)}/s {files_s:.1f} files/s"),
            eta=Text(f"ETA {duration(p.eta_s)}"),
            counts=_counts_text(p.counts, skipped=True),
            current=Text(clean_text(current, 300) + more, style="cyan"),
        )
        last = p.last
        if last is not None and (last.status in (Status.REFUSED, Status.FAILED)):
            self.progress.console.print(item_text(last))

    def close(self) -> None:
        self.progress.stop()


class ScanBar(_Live):
    """``scan`` of several files on a terminal: files done of all, elapsed time, ETA, verdict
    counts and the file being scanned; a file that is not clean is listed above the bar as it
    finishes. ``start(path)`` before each file, ``done(report)`` after it."""

    def __init__(self, out: Console, total: int) -> None:
        super().__init__(
            out,
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TimeElapsedColumn(),
            TextColumn("ETA", markup=False),
            TimeRemainingColumn(),
            _Fields("counts"),
        )
        self.counts = {"clean": 0, "suspicious": 0, "malicious": 0, "error": 0}
        self.task = self.progress.add_task(
            "scan", total=total, counts=_counts_text(self.counts), current=Text()
        )

    def start(self, path: str) -> None:
        self.progress.update(self.task, current=Text(clean_text(path, 300), style="cyan"))

    def done(self, report: LoadReport) -> None:
        self.counts[report.verdict.value] += 1
        self.progress.update(self.task, advance=1, counts=_counts_text(self.counts))
        if report.verdict.value != "clean":
            top = max(report.findings, key=lambda f: f.severity, default=None)
            line = Text(f"{report.verdict.value:10}", style=VERDICT_STYLES[report.verdict.value])
            line.append(" " + clean_text(report.input_path, 500))
            if top is not None:
                line.append(f" ({top.severity} {clean_text(top.rule, 60)})", style="dim")
            self.progress.console.print(line)


def item_text(r: ItemResult) -> Text:
    """One finished file: status, verdict (coloured) and path, and why when it is not clean."""
    verdict = r.verdict.value if r.verdict else "-"
    text = Text(f"{r.status.value:9} ")
    text.append(f"{verdict:10}", style=VERDICT_STYLES.get(verdict, ""))
    text.append(" " + clean_text(r.rel, 500))
    why = r.top_finding or (f"{r.reference or 'error'}: {r.reason}" if r.reason else "")
    if why:
        text.append(f" ({clean_text(why, 300)})", style="dim")
    return text


def summary_tables(summary: BatchSummary, *, quiet: bool) -> RenderableType:
    """The batch summary for a terminal: totals, then the files that are not clean and the
    files skipped, each as a table."""
    res = summary.results
    by_status = {s: sum(r.status is s for r in res) for s in Status}
    c = summary.counts
    totals = Table(
        title=Text(f"{len(res)} files", style="bold"),
        show_header=False,
        box=None,
        padding=(0, 2),
        title_justify="left",
    )
    totals.add_column(style="dim")
    totals.add_column()
    totals.add_row("converted", str(by_status[Status.CONVERTED]))
    totals.add_row(
        "refused as unsafe",
        Text(str(by_status[Status.REFUSED]), style="bold red" if by_status[Status.REFUSED] else ""),
    )
    totals.add_row(
        "failed", Text(str(by_status[Status.FAILED]), style="magenta" if by_status[Status.FAILED] else "")
    )
    totals.add_row("skipped", f"{by_status[Status.SKIPPED]} ({c['reused']} unchanged since the last run)")
    if summary.excluded:
        totals.add_row("excluded by pattern", str(summary.excluded))
    totals.add_row("verdicts", _counts_text(c))
    totals.add_row(
        "data",
        f"{size_text(summary.bytes_in)} in, {size_text(summary.bytes_out)} out, {summary.elapsed_s:.1f} s",
    )
    totals.add_row("output", Text(clean_text(str(summary.outdir), 500)))
    slow = summary.slowest(5)
    if slow and not quiet:
        totals.add_row(
            "slowest", Text(", ".join(f"{clean_text(r.rel, 200)} {r.duration_s:.1f} s" for r in slow))
        )
    parts: list[RenderableType] = [totals]
    if summary.problems:
        table = Table(
            title=Text("not clean", style="bold"), title_justify="left", expand=False, show_lines=False
        )
        table.add_column("verdict", no_wrap=True)
        table.add_column("file", overflow="fold")
        table.add_column("why", overflow="fold")
        for r in summary.problems:
            verdict = r.verdict.value if r.verdict else "-"
            why = r.top_finding or (f"{r.reference}: {r.reason}" if r.reason else "")
            table.add_row(
                Text(verdict.upper(), style=VERDICT_STYLES.get(verdict, "")),
                Text(clean_text(r.rel, 500)),
                Text(clean_text(why, 500)),
            )
        parts.append(table)
    skipped = [r for r in res if r.status is Status.SKIPPED and not r.reused]
    if skipped and not quiet:
        table = Table(title=Text("skipped", style="bold"), title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("why", overflow="fold")
        for r in skipped:
            table.add_row(Text(clean_text(r.rel, 500)), Text(clean_text(r.reason or "", 300)))
        parts.append(table)
    tail = Text()
    for rel in summary.indexes:
        tail.append(f"sharded checkpoint: wrote {clean_text(rel, 500)}\n")
    for why in summary.index_problems:
        tail.append(f"sharded checkpoint: no index: {clean_text(why, 500)}\n", style="red")
    if summary.stopped:
        tail.append(f"stopped: {clean_text(summary.stopped, 1000)}\n", style="bold red")
    if summary.stopped or summary.interrupted:
        tail.append(
            f"{len(summary.not_done)} files not done; run the same command again to "
            "continue (finished files are not redone)\n"
        )
    if tail:
        tail.rstrip()
        parts.append(tail)
    return Group(*parts)


def scan_table(reports: list[LoadReport]) -> Table:
    """Several scanned files at a glance: verdict, file, top finding (worst first)."""
    table = Table(title=Text(f"{len(reports)} files scanned", style="bold"), title_justify="left")
    table.add_column("verdict", no_wrap=True)
    table.add_column("file", overflow="fold")
    table.add_column("top finding", overflow="fold")
    for r in sorted(reports, key=lambda r: (-r.verdict.rank, r.input_path)):
        top = max(r.findings, key=lambda f: f.severity, default=None)
        why = (
            f"{top.severity} {top.rule}: {top.message}"
            if top
            else (f"{r.error.get('reference', 'error')}: {r.error.get('message', '')}" if r.error else "")
        )
        table.add_row(
            Text(r.verdict.value.upper(), style=VERDICT_STYLES[r.verdict.value]),
            Text(clean_text(r.input_path, 500)),
            Text(clean_text(why, 300)),
        )
    return table
