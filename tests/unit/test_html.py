"""The HTML page of a saved report: the JSON on disk is checked field by field before anything
is rendered, every string is escaped, the page refers to nothing outside itself, and the
timeline names the pickle global imported before each system call. (The page in a real
browser, for a real hostile load: tests/container/test_report_html.py.)"""

from __future__ import annotations

import html.parser
import json
from pathlib import Path
from typing import Any

import pytest

from sandbox import _cli
from sandbox._html import (
    MAX_REPORT_BYTES,
    origins,
    read_report,
    read_reports,
    render_html,
    render_html_many,
)
from sandbox.errors import ReportInvalid
from sandbox.report import Event, LoadReport
from tests.fakes import HOSTILE_NAME, hostile_report


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(page)
    return p.tags


def test_every_string_is_escaped_and_nothing_is_external() -> None:
    page = render_html(hostile_report())
    found = tags(page)
    names = {t for t, _ in found}
    assert "script" not in names and "img" not in names and "a" in names
    assert not any(k.startswith("on") for _, attrs in found for k in attrs)
    assert all((attrs.get("href") or "#").startswith("#") for t, attrs in found if t == "a")
    assert not any("src" in attrs for _, attrs in found)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;/style&gt;" in page and "\x1b" not in page and "\u202e" not in page
    assert "\\u202e" in page and "\\x1b[2J" in page  # shown, not obeyed
    csp = [a["content"] for t, a in found if t == "meta" and a.get("http-equiv")]
    assert csp and "default-src 'none'" in (csp[0] or "")
    # the finding's link to an event the report holds, none to one it lacks
    assert 'href="#ev-5"' in page and 'href="#ev-99"' not in page and 'id="ev-5"' in page


def test_resource_use_over_time_is_a_chart_when_the_report_has_samples() -> None:
    r = hostile_report()
    page = render_html(r)
    found = tags(page)
    lines = [a["points"] for t, a in found if t == "polyline"]
    assert len(lines) == 2  # memory and CPU
    rss = [tuple(float(v) for v in p.split(",")) for p in (lines[0] or "").split()]
    assert len(rss) == 3 and rss[0][1] > rss[1][1] > rss[2][1]  # rising memory: y falls
    cpu = [tuple(float(v) for v in p.split(",")) for p in (lines[1] or "").split()]
    assert cpu[1][1] < cpu[2][1]  # 100% of a core, then 50%
    assert "5.0 MiB" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    del r.resources["series"]
    assert "polyline" not in render_html(r) and "no series over time" in render_html(r)


def test_origins_name_the_suspect_global_before_each_kernel_event() -> None:
    r = hostile_report()
    # the torch global imported between them is not a suspect: eval stays the origin
    assert origins(r) == {3: ("builtins.eval", 2), 5: ("builtins.eval", 2)}
    r.static = {"dangerous": 5, "unknown": "builtins.eval"}  # a hand-edited report
    assert origins(r) == {3: ("builtins.eval", 2), 5: ("builtins.eval", 2)}
    r.events = [e for e in r.events if e.id != 2]
    assert origins(r) == {}


def test_round_trip_of_a_saved_report(tmp_path: Path) -> None:
    r = hostile_report()
    path = tmp_path / "r.json"
    path.write_text(r.to_json())
    back = read_report(path)
    assert back.to_dict() == r.to_dict()
    path.write_text(json.dumps([r.to_dict()]))  # a batch's list of one
    assert read_report(path).input_path == HOSTILE_NAME


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "r.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"schema": "other/1.0"}, "not a model-sandbox load report"),
        ({"verdict": "fine"}, "'verdict'"),
        ({"input_path": 3}, "'input_path' must be a string"),
        ({"tensors": True}, "'tensors' must be an integer"),
        ({"duration_s": "1"}, "'duration_s' must be a number"),
        ({"duration_s": 10**400}, "'duration_s' must be a number"),
        (
            {"events": [{"id": 1, "t": 10**400, "source": "k", "kind": "x", "detail": {}, "action": "a"}]},
            "events[0]: 't'",
        ),
        ({"findings": [{"rule": "x"}]}, "findings[0]"),
        (
            {"findings": [{"rule": "x", "severity": "huge", "category": "c", "message": "m"}]},
            "unknown severity",
        ),
        (
            {
                "events": [
                    {"id": 1, "t": 0, "source": "kernel", "kind": "x", "detail": [], "action": "denied"}
                ]
            },
            "events[0]: 'detail' must be an object",
        ),
        ({"events": [{"id": "1", "t": 0, "source": "k", "kind": "x", "action": "a"}]}, "events[0]: 'id'"),
        ({"notes": [1]}, "'notes'"),
        ({"resources": {"series": [[0.2, 0, 1], [0.1, 0, 1]]}}, "'resources.series'"),
        ({"resources": {"series": [[0.1, 0, "1"]]}}, "'resources.series'"),
        ({"error": {"reference": 1}}, "'error'"),
        ({"static": {"a": json.loads("[" * 40 + "1" + "]" * 40)}}, "nested deeper"),
    ],
)
def test_malformed_reports_are_refused_by_field(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    data = {**hostile_report().to_dict(), **change}
    with pytest.raises(ReportInvalid) as info:
        read_report(_write(tmp_path, data))
    assert problem in info.value.problem
    assert info.value.reference == "report-invalid"


@pytest.mark.parametrize("text", ["{", '{"schema": NaN}', "[1, 2]", "\xff"])
def test_not_strict_json_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ReportInvalid):
        read_report(_write(tmp_path, text))


def test_an_oversize_report_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(MAX_REPORT_BYTES + 1)
    with pytest.raises(ReportInvalid, match="larger than"):
        read_report(path)


def test_cli_writes_the_page_and_keeps_the_reports_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write(tmp_path, hostile_report().to_json())
    out = tmp_path / "page.html"
    assert _cli.main(["report", str(src), "--html", str(out)]) == 1
    assert "<!DOCTYPE html>" in out.read_text()
    assert "wrote" in capsys.readouterr().out
    assert _cli.main(["report", "render", str(src), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "malicious"
    bad = _write(tmp_path, "{}")
    assert _cli.main(["report", str(bad), "--html", str(out)]) == 2
    assert "error[report-invalid]" in capsys.readouterr().err


def test_a_batch_list_is_one_page_with_a_table_and_unique_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean = LoadReport(input_path="good.pt", events=[Event(1, 0.1, "kernel", "openat", {})])
    bad = hostile_report()
    src = _write(tmp_path, json.dumps([clean.to_dict(), bad.to_dict()]))
    assert [r.input_path for r in read_reports(src)] == ["good.pt", HOSTILE_NAME]
    with pytest.raises(ReportInvalid, match="not one"):
        read_report(src)
    page = render_html_many(read_reports(src))
    found = tags(page)
    ids = [a["id"] for _, a in found if a.get("id")]
    assert len(ids) == len(set(ids))  # every report's ids are its own
    assert {"r0-ev-1", "r1-ev-1", "r1-ev-5", "r0-findings", "r1-findings"} <= set(ids)
    rows = page.split('<table id="reports">')[1].split("</table>")[0].split("<tr>")[2:]
    assert len(rows) == 2 and "malicious" in rows[0] and 'href="#r1"' in rows[0]  # worst first
    assert 'href="#r1-ev-5"' in page and 'href="#ev-5"' not in page
    out = tmp_path / "batch.html"
    assert _cli.main(["report", str(src), "--html", str(out)]) == 1
    assert "2 reports: 1 malicious, 1 clean" in capsys.readouterr().out
    assert out.read_text() == page
    assert _cli.main(["report", str(src)]) == 1  # text: both reports
    text = capsys.readouterr().out
    assert "good.pt: CLEAN" in text and "MALICIOUS" in text


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([], "a list of reports must hold"),
        (
            [{"schema": "model-sandbox/load-report/1.0", "input_path": "a", "verdict": "clean"}, 3],
            "report [1]: the document must be a JSON object",
        ),
    ],
)
def test_malformed_lists_of_reports_are_refused(tmp_path: Path, doc: Any, problem: str) -> None:
    with pytest.raises(ReportInvalid) as info:
        read_reports(_write(tmp_path, doc))
    assert problem in info.value.problem
