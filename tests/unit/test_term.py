"""The batch's terminal output (sandbox/_term.py): the rich bar shows counts, rate, ETA and the
file being loaded; the summary is tables; colours follow the terminal and NO_COLOR; names from
the disk are shown, never obeyed (no markup, no escape sequences). The plain lines for pipes
are the CLI's own and stay as they were. (The real CLI in a pseudo-terminal:
tests/container/test_terminal.py.)"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from sandbox import _term
from sandbox._batch import BatchProgress, BatchSummary, ItemResult, Status
from sandbox.report import Finding, LoadReport, Severity, Verdict

SGR_COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;[0-9;]+)m")
HOSTILE = "dir/[bold red]fake[/]\x1b[2J.pt"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _results() -> list[ItemResult]:
    return [
        ItemResult("a.pt", Status.CONVERTED, size=100, verdict=Verdict.CLEAN, duration_s=1.0),
        ItemResult(
            HOSTILE,
            Status.REFUSED,
            size=50,
            verdict=Verdict.MALICIOUS,
            top_finding="critical exec-attempt: the load tried to run a program",
            duration_s=2.0,
        ),
        ItemResult("notes.txt", Status.SKIPPED, reason="not a model file"),
    ]


def _progress(last: ItemResult | None, running: tuple[str, ...]) -> BatchProgress:
    return BatchProgress(
        done=2,
        total=5,
        bytes_done=150 * 2**20,
        bytes_total=300 * 2**20,
        elapsed_s=10.0,
        counts={"clean": 1, "suspicious": 0, "malicious": 1, "error": 0, "skipped": 4},
        last=last,
        running=running,
    )


def _render_bar(out: Console, *snapshots: BatchProgress) -> str:
    bar = _term.BatchBar(out)
    with bar:
        for p in snapshots:
            bar(p)
        bar.progress.refresh()
    assert isinstance(out.file, io.StringIO)
    return out.file.getvalue()


def test_the_bar_shows_counts_rate_eta_and_the_current_file() -> None:
    out = Console(file=_Tty(), force_terminal=True, width=220, color_system="standard")
    text = _render_bar(out, _progress(None, ("b.pt", "c.pt")))
    assert "2/5 files" in text and "50%" in text
    assert "150.0 MiB/300.0 MiB" in text and "15.0 MiB/s 0.2 files/s" in text
    assert "ETA 0:15" in text  # three files left at five seconds each
    assert "clean 1" in text and "malicious 1" in text and "skipped 4" in text
    assert "b.pt (+1)" in text
    assert SGR_COLOUR.search(text)


def test_a_refused_file_is_listed_above_the_bar_as_written() -> None:
    out = Console(file=_Tty(), force_terminal=True, width=220, color_system="standard")
    refused = _results()[1]
    text = _render_bar(out, _progress(refused, ()))
    assert "refused" in text and "malicious" in text
    assert "[bold red]fake[/]" in text  # markup shown, not applied
    assert "\x1b[2J" not in text and "\\x1b[2J" in text


@pytest.mark.parametrize(
    ("tty", "env", "colour"),
    [(True, {}, True), (True, {"NO_COLOR": "1"}, False), (True, {"NO_COLOR": ""}, True), (False, {}, False)],
)
def test_colours_follow_the_terminal_and_no_color(
    monkeypatch: pytest.MonkeyPatch, tty: bool, env: dict[str, str], colour: bool
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stream = _Tty() if tty else io.StringIO()
    out = _term.console(stream)
    summary = BatchSummary(outdir=Path("/out"), results=_results(), elapsed_s=3.0)
    out.print(_term.summary_tables(summary, quiet=False))
    text = stream.getvalue()
    assert bool(SGR_COLOUR.search(text)) is colour
    if not tty:
        assert "\x1b" not in text


def test_the_summary_is_tables_of_what_matters() -> None:
    stream = _Tty()
    out = Console(file=stream, force_terminal=True, width=200, no_color=True)
    summary = BatchSummary(
        outdir=Path("/out"), results=_results(), elapsed_s=3.0, interrupted=True, not_done=["x.pt"]
    )
    out.print(_term.summary_tables(summary, quiet=False))
    text = stream.getvalue()
    assert "3 files" in text and "refused as unsafe" in text
    rows = [line for line in text.splitlines() if "MALICIOUS" in line]
    assert len(rows) == 1 and "[bold red]fake[/]" in rows[0] and "exec-attempt" in rows[0]
    assert "│" in rows[0]  # a table row, with its borders
    assert "notes.txt" in text and "not a model file" in text
    assert "1 files not done" in text
    quiet = Console(file=_Tty(), force_terminal=True, width=200, no_color=True)
    quiet.print(_term.summary_tables(summary, quiet=True))
    assert isinstance(quiet.file, io.StringIO)
    assert "notes.txt" not in quiet.file.getvalue()


def test_several_scanned_files_are_a_table_worst_first() -> None:
    clean = LoadReport(input_path="a.pt")
    bad = LoadReport(
        input_path=HOSTILE,
        verdict=Verdict.MALICIOUS,
        findings=[
            Finding("exec-attempt", Severity.CRITICAL, "exec", "the load tried to run a program"),
            Finding("network-socket", Severity.MEDIUM, "network", "the load created a socket"),
        ],
    )
    broken = LoadReport(
        input_path="c.pt",
        verdict=Verdict.ERROR,
        error={"reference": "malformed-input", "message": "truncated"},
    )
    stream = _Tty()
    Console(file=stream, force_terminal=True, width=200, no_color=True).print(
        _term.scan_table([clean, bad, broken])
    )
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())  # bold stays without colours
    rows = [ln for ln in plain.splitlines() if "│" in ln]
    assert [r.split("│")[1].strip() for r in rows] == ["ERROR", "MALICIOUS", "CLEAN"]
    assert "malformed-input: truncated" in rows[0]
    assert "critical exec-attempt" in rows[1] and "[bold red]fake[/]" in rows[1]


def test_the_scan_bar_counts_verdicts_and_lists_what_is_not_clean() -> None:
    stream = _Tty()
    out = Console(file=stream, force_terminal=True, width=220, color_system="standard")
    bad = LoadReport(
        input_path=HOSTILE,
        verdict=Verdict.MALICIOUS,
        findings=[Finding("exec-attempt", Severity.CRITICAL, "exec", "the load tried to run a program")],
    )
    with _term.ScanBar(out, 3) as bar:
        bar.start("a.pt")
        bar.done(LoadReport(input_path="a.pt"))
        bar.start(HOSTILE)
        bar.done(bad)
        bar.start("c.pt")
        bar.progress.refresh()
    text = stream.getvalue()
    assert "2/3" in text and "ETA" in text and "clean 1" in text and "malicious 1" in text
    assert "c.pt" in text  # the file being scanned
    listed = [
        ln for ln in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).splitlines() if "critical exec-attempt" in ln
    ]
    assert listed and "[bold red]fake[/]" in listed[0] and "\x1b[2J" not in text
