"""A saved report as one self-contained HTML page (``model-sandbox report FILE --html OUT``).

The JSON on disk is untrusted input (it may have been edited, or written by something else):
:func:`read_report` reads at most :data:`MAX_REPORT_BYTES`, parses strict JSON (no ``NaN``),
and checks every field it uses, type by type, before a :class:`~sandbox.report.LoadReport`
exists. :func:`render_html` escapes every string (HTML-escaped after the control and format
characters are shown as escapes, so a file name cannot reorder the line with a bidirectional
override), uses no external asset (inline CSS and SVG), no script, and a Content-Security-Policy
that forbids scripts and every fetch, so even a bug in the escaping could not run anything.

The page shows the verdict, the findings with their evidence, a timeline of the events (with the
pickle global imported last before each system call, the call's likely origin) and the resource
use: memory and CPU over time from the supervisor's samples (``resources.series``) where the
report has them, and the peaks.
"""

from __future__ import annotations

import html
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ReportInvalid
from .report import SCHEMA_VERSION, Event, Finding, LoadReport, Severity, Verdict, clean_text, size_text

__all__ = ["MAX_REPORT_BYTES", "read_report", "read_reports", "render_html", "render_html_many", "write_html"]

MAX_REPORT_BYTES = 64 * 2**20
_MAX_ITEMS = 20_000  # findings, events, notes
_MAX_DEPTH = 32
_TRUSTED_TOP = frozenset({"torch", "collections", "numpy", "_codecs", "copyreg"})


# -- reading -----------------------------------------------------------------------------------


class _Bad(Exception):
    pass


def _depth(value: Any, level: int = 0) -> None:
    if level > _MAX_DEPTH:
        raise _Bad(f"nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        for v in value.values():
            _depth(v, level + 1)
    elif isinstance(value, list):
        for v in value:
            _depth(v, level + 1)


def _str(data: dict[str, Any], key: str, *, optional: bool = False, limit: int = 100_000) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Bad(f"{key!r} must be a string")
    if len(value) > limit:
        raise _Bad(f"{key!r} is longer than {limit} characters")
    return value


def _int(data: dict[str, Any], key: str, *, optional: bool = False, default: int = 0) -> Any:
    value = data.get(key, None if optional else default)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**64:
        raise _Bad(f"{key!r} must be an integer")
    return value


def _num(data: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1e15 < value < 1e15:
        raise _Bad(f"{key!r} must be a number (of a plausible size)")
    return float(value)


def _obj(data: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = data.get(key, None if optional else {})
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise _Bad(f"{key!r} must be an object")
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise _Bad(f"{key!r} must be a list")
    if len(value) > _MAX_ITEMS:
        raise _Bad(f"{key!r} has more than {_MAX_ITEMS} entries")
    return value


def _each(items: list[Any], what: str, build: Callable[[dict[str, Any]], Any]) -> list[Any]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _Bad(f"{what}[{i}] must be an object")
        try:
            out.append(build(item))
        except _Bad as exc:
            raise _Bad(f"{what}[{i}]: {exc}") from None
    return out


def _finding(f: dict[str, Any]) -> Finding:
    try:
        severity = Severity.parse(_str(f, "severity", limit=20))
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    events = _list(f, "events")
    if any(isinstance(e, bool) or not isinstance(e, int) for e in events):
        raise _Bad("'events' must be a list of integers")
    return Finding(
        rule=_str(f, "rule", limit=200),
        severity=severity,
        category=_str(f, "category", limit=200),
        message=_str(f, "message"),
        evidence=_obj(f, "evidence"),
        events=tuple(events),
    )


def _event(e: dict[str, Any]) -> Event:
    return Event(
        id=_int(e, "id"),
        t=_num(e, "t"),
        source=_str(e, "source", limit=200),
        kind=_str(e, "kind", limit=200),
        detail=_obj(e, "detail"),
        action=_str({"action": "recorded", **e}, "action", limit=200),
    )


def _series(value: Any) -> list[tuple[float, float, int]]:
    """``resources.series``: ``[t, cpu_s, rss_bytes]`` samples in time order, or nothing."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _MAX_ITEMS:
        raise _Bad(f"'resources.series' must be a list of at most {_MAX_ITEMS} samples")
    out: list[tuple[float, float, int]] = []
    for p in value:
        if not (
            isinstance(p, list)
            and len(p) == 3
            and isinstance(p[2], int)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        ):
            raise _Bad("'resources.series' samples must be [t, cpu_s, rss_bytes]")
        if not all(-1e15 < v < 1e15 for v in p):
            raise _Bad("'resources.series' samples must be in range and in time order")
        t, cpu, rss = float(p[0]), float(p[1]), int(p[2])
        if not (0 <= t <= 1e7 and 0 <= cpu <= 1e9 and 0 <= rss < 2**50) or (out and t < out[-1][0]):
            raise _Bad("'resources.series' samples must be in range and in time order")
        out.append((t, cpu, rss))
    return out


def validate(data: Any) -> LoadReport:
    """A :class:`LoadReport` from parsed JSON, every field checked; raises :class:`_Bad`."""
    if not isinstance(data, dict):
        raise _Bad("the document must be a JSON object")
    schema = data.get("schema")
    if not isinstance(schema, str) or not schema.startswith("model-sandbox/load-report/1."):
        raise _Bad(f"not a model-sandbox load report 1.x (schema {clean_text(str(schema), 80)!r})")
    _depth(data)
    try:
        verdict = Verdict(_str(data, "verdict", limit=20))
    except ValueError:
        raise _Bad("'verdict' must be clean, suspicious, malicious or error") from None
    notes = _list(data, "notes")
    if any(not isinstance(n, str) for n in notes):
        raise _Bad("'notes' must be a list of strings")
    resources = _obj(data, "resources")
    _series(resources.get("series"))
    error = _obj(data, "error", optional=True)
    if error is not None and any(not isinstance(v, str) for v in error.values()):
        raise _Bad("'error' must map names to strings")
    return LoadReport(
        input_path=_str(data, "input_path"),
        input_sha256=_str(data, "input_sha256", optional=True, limit=128),
        input_size=_int(data, "input_size", optional=True),
        format=_str(data, "format", optional=True, limit=200),
        verdict=verdict,
        findings=_each(_list(data, "findings"), "findings", _finding),
        events=_each(_list(data, "events"), "events", _event),
        tensors=_int(data, "tensors"),
        tensor_bytes=_int(data, "tensor_bytes"),
        outputs=_obj(data, "outputs"),
        resources=resources,
        notes=notes,
        error=error,
        static=_obj(data, "static"),
        tool=_obj(data, "tool"),
        policy=_obj(data, "policy"),
        duration_s=_num(data, "duration_s", optional=True),
    )


def read_report(path: str | os.PathLike[str]) -> LoadReport:
    """The one report saved at ``path``, validated; raises
    :class:`~sandbox.errors.ReportInvalid`."""
    reports = read_reports(path)
    if len(reports) != 1:
        raise ReportInvalid(
            f"{clean_text(os.fspath(path), 300)} holds {len(reports)} reports, not one",
            path=os.fspath(path),
            problem="not exactly one report",
        )
    return reports[0]


def read_reports(path: str | os.PathLike[str]) -> list[LoadReport]:
    """The report, or the list of reports (a batch's ``--format json``), saved at ``path``,
    each validated; raises :class:`~sandbox.errors.ReportInvalid`."""
    name = os.fspath(path)

    def bad(problem: str) -> ReportInvalid:
        return ReportInvalid(
            f"{clean_text(name, 300)} is not a usable model-sandbox report: {problem}",
            path=name,
            problem=problem,
        )

    try:
        with open(name, "rb") as f:
            raw = f.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise bad(f"cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise bad(f"larger than {MAX_REPORT_BYTES // 2**20} MiB")

    def no_constants(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not strict JSON ({clean_text(str(exc), 200)})") from None
    if not isinstance(data, list):
        data = [data]
    elif not data or len(data) > _MAX_ITEMS:
        raise bad(f"a list of reports must hold 1 to {_MAX_ITEMS}")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(validate(item))
        except _Bad as exc:
            raise bad(str(exc) if len(data) == 1 else f"report [{i}]: {exc}") from None
    return out


# -- rendering ---------------------------------------------------------------------------------


def _e(value: Any, limit: int = 2000) -> str:
    """Any value as escaped HTML text: printable (control and format characters as escapes)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return html.escape(clean_text(text, limit), quote=True)


_VERDICT_COLOURS = {"clean": "#1f7a3a", "suspicious": "#a36a00", "malicious": "#b3261e", "error": "#5a5a5a"}
_SEVERITY_COLOURS = {
    "info": "#5a5a5a",
    "low": "#2d6a9f",
    "medium": "#a36a00",
    "high": "#c0392b",
    "critical": "#7b1010",
}

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f5f5f4;
color:#1c1c1c}
main{max-width:1100px;margin:0 auto;padding:24px}
header{display:flex;gap:16px;align-items:center;flex-wrap:wrap}
h1{font-size:20px;margin:0;word-break:break-all}
h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #ccc;padding-bottom:4px}
.verdict{color:#fff;font-weight:700;padding:6px 14px;border-radius:6px;letter-spacing:.05em}
.facts{color:#444;margin:8px 0 0;font-size:14px;display:flex;flex-wrap:wrap;gap:2px 14px}
.facts span{word-break:break-all}
.finding{background:#fff;border-left:6px solid #999;border-radius:4px;padding:10px 14px;
margin:10px 0;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.sev{color:#fff;font-size:12px;font-weight:700;padding:2px 8px;border-radius:10px;
text-transform:uppercase;margin-right:8px}
.rule{font-family:ui-monospace,monospace;font-size:13px;color:#555}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:8px 0 0;font-size:13px}
dt{color:#555}dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e4e4e4;vertical-align:top}
td.mono,span.mono{font-family:ui-monospace,monospace;word-break:break-all}
tr.denied td{background:#fdecea}
.muted{color:#777}
.box{background:#fff;padding:10px 14px;border-radius:4px}
svg text{font:11px system-ui,sans-serif}
"""


def _severity_badge(sev: Severity) -> str:
    name = str(sev)
    return f'<span class="sev" style="background:{_SEVERITY_COLOURS[name]}">{name}</span>'


def _facts(r: LoadReport) -> str:
    facts = r.facts(_e, lambda sha: f'<span class="mono">{_e(sha, 80)}</span>')
    if r.policy.get("name") is not None:
        facts.append(f"policy {_e(r.policy.get('name'), 80)}")
    if r.tool.get("version") is not None:
        facts.append(f"model-sandbox {_e(r.tool.get('version'), 40)}")
    return "".join(f"<span>{f}</span>" for f in facts)


def _finding_html(f: Finding, known: set[int], p: str) -> str:
    rows = "".join(f"<dt>{_e(k, 100)}</dt><dd>{_e(v, 2000)}</dd>" for k, v in f.evidence.items())
    if f.events:
        links = ", ".join(f'<a href="#{p}ev-{i}">#{i}</a>' if i in known else f"#{i}" for i in f.events[:50])
        rows += f"<dt>events</dt><dd>{links}</dd>"
    colour = _SEVERITY_COLOURS[str(f.severity)]
    return (
        f'<section class="finding" data-rule="{_e(f.rule, 200)}" '
        f'style="border-left-color:{colour}">'
        f"<div>{_severity_badge(f.severity)}<strong>{_e(f.message, 1000)}</strong></div>"
        f'<div class="rule">{_e(f.rule, 200)} · {_e(f.category, 60)}</div>'
        f"<dl>{rows}</dl></section>"
    )


def _global_name(ev: Event) -> str | None:
    if ev.kind != "pickle.find_class":
        return None
    module, name = ev.detail.get("module"), ev.detail.get("name")
    if not isinstance(module, str) or not isinstance(name, str):
        return None
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
    return f"{module}.{name}"


def origins(report: LoadReport) -> dict[int, tuple[str, int]]:
    """For each kernel event, the suspect pickle global imported last before it (by the
    supervisor's order of arrival): ``{event id: (global, its event id)}``. A global is suspect
    when the static scan named it dangerous or unknown, or its package is none of torch's,
    numpy's or the standard containers'. An attribution by order, not a proof: code that ran
    later may have made the call."""
    lists = [report.static.get(key) for key in ("dangerous", "unknown")]
    flagged = {n for names in lists if isinstance(names, list) for n in names if isinstance(n, str)}
    out: dict[int, tuple[str, int]] = {}
    last: tuple[str, int] | None = None
    for ev in sorted(report.events, key=lambda e: e.id):
        name = _global_name(ev)
        if name is not None and (name in flagged or name.split(".")[0] not in _TRUSTED_TOP):
            last = (name, ev.id)
        elif ev.source in ("kernel", "gvisor") and last is not None:
            out[ev.id] = last
    return out


def _describe(ev: Event) -> str:
    from ._events import describe

    try:
        return describe(ev)
    except Exception:  # a malformed detail of a hand-edited report: show the raw values
        return clean_text(f"{ev.kind} {json.dumps(ev.detail, default=str)}", 300)


def _timeline_svg(events: list[Event]) -> str:
    """Each event a mark at its millisecond, one lane per source; refused calls in red and
    named."""
    if not events:
        return ""
    lanes = ["kernel", "self_reported", "supervisor"]
    lanes += sorted({e.source for e in events} - set(lanes))
    used = [lane for lane in lanes if any(e.source == lane for e in events)]
    width, left, lane_h = 1000, 110, 26
    # the axis spans the events (a load may spend seconds importing torch before the first)
    start = min(e.t for e in events)
    span = max(max(e.t for e in events) - start, 1e-3)
    height = 30 + lane_h * len(used)
    labels = 0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="events over time">'
    ]
    for i, lane in enumerate(used):
        y = 10 + i * lane_h
        parts.append(
            f'<text x="0" y="{y + 14}">{_e(lane, 30)}</text>'
            f'<line x1="{left}" x2="{width - 10}" y1="{y + 10}" y2="{y + 10}" '
            f'stroke="#ccc"/>'
        )
        for ev in events[:5000]:
            if ev.source != lane:
                continue
            x = left + (width - 10 - left) * (ev.t - start) / span
            colour = "#c0392b" if ev.action == "denied" else "#2d6a9f"
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y + 10}" r="4" fill="{colour}" '
                f'fill-opacity=".75"><title>#{ev.id} {_e(ev.kind, 60)} '
                f"{ev.t * 1000:.1f} ms</title></circle>"
            )
            if ev.action == "denied" and labels < 40:  # refused calls named on the chart
                labels += 1
                parts.append(
                    f'<text x="{x:.1f}" y="{y + 2}" text-anchor="end" fill="#b3261e">{_e(ev.kind, 30)}</text>'
                )
    y = 10 + len(used) * lane_h
    for k in range(5):
        x = left + (width - 10 - left) * k / 4
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        parts.append(
            f'<text x="{x:.0f}" y="{y + 12}" text-anchor="{anchor}">'
            f"{(start + span * k / 4) * 1000:.1f} ms</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _events_html(r: LoadReport, p: str) -> str:
    if not r.events:
        return '<p class="muted">No events were recorded.</p>'
    via = origins(r)
    rows = []
    for ev in sorted(r.events, key=lambda e: e.id)[:_MAX_ITEMS]:
        cause = via.get(ev.id)
        cause_html = f'<a href="#{p}ev-{cause[1]}" class="mono">{_e(cause[0], 200)}</a>' if cause else ""
        cls = ' class="denied"' if ev.action == "denied" else ""
        rows.append(
            f'<tr id="{p}ev-{ev.id}"{cls}><td>{ev.id}</td><td>{ev.t * 1000:.1f}</td>'
            f"<td>{_e(ev.source, 30)}</td><td>{_e(ev.action, 30)}</td>"
            f'<td class="mono">{_e(_describe(ev), 400)}</td><td>{cause_html}</td></tr>'
        )
    return (
        _timeline_svg(r.events) + '<p class="muted">Times count from the moment the job reached the sandbox. '
        "<em>kernel</em> events are system calls the seccomp monitor decoded (evidence); "
        "<em>self_reported</em> ones come from the loader's audit hook (context a payload "
        "could forge). <em>after global</em>: the suspect pickle global imported last "
        "before the call.</p>"
        "<table><thead><tr><th>#</th><th>ms</th><th>source</th><th>action</th>"
        "<th>event</th><th>after global</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


# the figures the page names, in its order; a name's suffix is its unit: _s seconds, _bytes, _kb
_RESOURCE_LABELS = {
    "wall_s": "wall time of the load",
    "container_s": "container lifetime",
    "cpu_s": "CPU time of the loader's process tree",
    "cpu_user_s": "CPU user time",
    "cpu_system_s": "CPU system time",
    "rss_peak_bytes": "peak memory (RSS) of the tree",
    "max_rss_kb": "largest process's maximum RSS",
    "threads_peak": "peak threads",
    "children_peak": "peak child processes",
    "samples": "samples taken",
    "handoff": "hand-off of the tensors",
    "warm": "started before the job",
}


def _series_svg(points: list[tuple[float, float, int]], p: str) -> str:
    """Memory (RSS of the loader's tree) and CPU use (percent of one core, between samples)
    over the load, as two lines on one time axis."""
    if len(points) < 2:
        return ""
    width, height, left, right, top, bottom = 1000, 240, 60, 60, 32, 28
    t0, t1 = points[0][0], points[-1][0]
    span = max(t1 - t0, 1e-3)
    rss_max = max(max(p[2] for p in points), 1)
    cpu = [0.0] + [
        max(0.0, (b[1] - a[1]) / (b[0] - a[0]) * 100) if b[0] > a[0] else 0.0
        for a, b in itertools.pairwise(points)
    ]
    cpu_max = max(100.0, max(cpu))
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(t: float, frac: float) -> str:
        return f"{left + plot_w * (t - t0) / span:.1f},{top + plot_h * (1 - frac):.1f}"

    rss_line = " ".join(xy(p[0], p[2] / rss_max) for p in points)
    cpu_line = " ".join(xy(p[0], c / cpu_max) for p, c in zip(points, cpu, strict=True))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="resource use over time" id="{p}resource-chart">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#ddd"/>',
        f'<polyline points="{rss_line}" fill="none" stroke="#2d6a9f" stroke-width="2"/>',
        f'<polyline points="{cpu_line}" fill="none" stroke="#c05a00" stroke-width="1.5" '
        f'stroke-dasharray="4 2"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" fill="#2d6a9f">{size_text(rss_max)}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" fill="#2d6a9f">0</text>',
        f'<text x="{width - right + 6}" y="{top + 10}" fill="#c05a00">{cpu_max:.0f}%</text>',
        f'<text x="{width - right + 6}" y="{top + plot_h}" fill="#c05a00">0%</text>',
    ]
    for k in range(5):
        x = left + plot_w * k / 4
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        parts.append(
            f'<text x="{x:.0f}" y="{height - 10}" text-anchor="{anchor}">'
            f"{(t0 + span * k / 4) * 1000:.0f} ms</text>"
        )
    parts.append(
        f'<text x="{left}" y="12" fill="#2d6a9f">── memory (RSS of the loader\'s '
        f'processes)</text><text x="{left + 320}" y="12" fill="#c05a00">- - CPU (% of '
        f"one core)</text></svg>"
    )
    return "".join(parts)


def _resources_html(r: LoadReport, p: str) -> str:
    res = r.resources
    if not res:
        return '<p class="muted">The report holds no resource figures.</p>'
    series = _series(res.get("series"))
    rows = []
    for key, label in _RESOURCE_LABELS.items():
        if key not in res:
            continue
        value = res[key]
        if key.endswith("_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
            shown = f"{value:.3f} s"
        elif key.endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool):
            shown = size_text(value)
        elif key.endswith("_kb") and isinstance(value, int) and not isinstance(value, bool):
            shown = size_text(value * 1024)
        else:
            shown = _e(value, 100)
        rows.append(f"<tr><td>{label}</td><td>{shown}</td></tr>")
    known = set(_RESOURCE_LABELS) | {"series"}
    rows += [
        f'<tr><td class="mono">{_e(k, 60)}</td><td>{_e(v, 200)}</td></tr>'
        for k, v in sorted(res.items())
        if k not in known
    ]
    if len(series) >= 2:
        head = (
            "<p class=\"muted\">The supervisor's samples of the loader's process tree "
            f"({len(series)} kept, about every 100 ms or fewer for long loads), then the "
            "peaks.</p>" + _series_svg(series, p)
        )
    else:
        head = (
            '<p class="muted">Peaks over the supervisor\'s samples (about every 100 ms); '
            "this report holds no series over time.</p>"
        )
    return head + "<table><tbody>" + "".join(rows) + "</tbody></table>"


def _static_html(r: LoadReport) -> str:
    s = r.static
    if not s:
        return '<p class="muted">No static scan in this report.</p>'
    rows = "".join(f"<dt>{_e(k, 60)}</dt><dd>{_e(v, 2000)}</dd>" for k, v in sorted(s.items()))
    return f'<div class="box"><dl>{rows}</dl></div>'


_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(clean_text(title, 300))}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def _report_html(r: LoadReport, p: str) -> str:
    """One report's part of a page; every id starts with ``p`` (several reports, one page)."""
    verdict = r.verdict.value
    known = {e.id for e in r.events}
    findings = sorted(r.findings, key=lambda f: -f.severity)
    findings_html = (
        "".join(_finding_html(f, known, p) for f in findings[:_MAX_ITEMS])
        or '<p class="muted">No findings.</p>'
    )
    error = ""
    if r.error:
        error = (
            f'<section class="finding" style="border-left-color:#5a5a5a"><strong>error['
            f"{_e(r.error.get('reference', '?'), 80)}]</strong> "
            f"{_e(r.error.get('message', ''), 4000)}</section>"
        )
    notes = "".join(f"<li>{_e(n, 2000)}</li>" for n in r.notes[:_MAX_ITEMS])
    outputs = "".join(f"<dt>{_e(k, 60)}</dt><dd>{_e(v, 1000)}</dd>" for k, v in r.outputs.items())
    return (
        f'<header><span class="verdict" id="{p}verdict" style="background:'
        f'{_VERDICT_COLOURS[verdict]}">{verdict.upper()}</span>'
        f"<h1>{_e(r.input_path, 500)}</h1></header>"
        f'<div class="facts">{_facts(r)}</div>'
        f'<h2>Findings ({len(r.findings)})</h2><div id="{p}findings">{error}{findings_html}</div>'
        f'<h2>Timeline ({len(r.events)} events)</h2><div id="{p}timeline">'
        f"{_events_html(r, p)}</div>"
        f'<h2>Resources</h2><div id="{p}resources">{_resources_html(r, p)}</div>'
        f"<h2>Static scan</h2>{_static_html(r)}"
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + (f'<h2>Outputs</h2><div class="box"><dl>{outputs}</dl></div>' if outputs else "")
        + f'<p class="muted">schema model-sandbox/load-report/{SCHEMA_VERSION} · '
        f"tool {_e(r.tool.get('image', ''), 100)}</p>"
    )


def render_html(report: LoadReport) -> str:
    """The whole page for ``report``: one string, no external reference."""
    return _page(f"{report.verdict.value.upper()}: {report.input_path}", _report_html(report, ""))


def render_html_many(reports: list[LoadReport]) -> str:
    """One page for several reports (a batch's ``--format json``): a table of them, worst
    verdict first, each linking to its own part of the page."""
    order = sorted(range(len(reports)), key=lambda i: (-reports[i].verdict.rank, reports[i].input_path))
    rows = []
    for i in order:
        r = reports[i]
        top = max(r.findings, key=lambda f: f.severity, default=None)
        why = f"{top.severity} {top.rule}: {top.message}" if top else ""
        rows.append(
            f'<tr><td><span class="sev" style="background:'
            f'{_VERDICT_COLOURS[r.verdict.value]}">{r.verdict.value}</span></td>'
            f'<td class="mono"><a href="#r{i}">{_e(r.input_path, 300)}</a></td>'
            f"<td>{_e(why, 300)}</td></tr>"
        )
    worst = max((r.verdict for r in reports), key=lambda v: v.rank)
    body = (
        f'<header><span class="verdict" id="verdict" style="background:'
        f'{_VERDICT_COLOURS[worst.value]}">{worst.value.upper()}</span>'
        f"<h1>{len(reports)} reports</h1></header>"
        '<table id="reports"><thead><tr><th>verdict</th><th>file</th><th>top finding</th>'
        "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + "".join(
            f'<section class="report" id="r{i}"><hr>{_report_html(reports[i], f"r{i}-")}</section>'
            for i in order
        )
    )
    return _page(f"{worst.value.upper()}: {len(reports)} reports", body)


def write_html(reports: list[LoadReport], out: str | os.PathLike[str]) -> Path:
    """Render ``reports`` (one page, one or several reports) and write it to ``out``
    atomically."""
    from ._files import atomic_write

    path = Path(out)
    page = render_html(reports[0]) if len(reports) == 1 else render_html_many(reports)
    atomic_write(path, page.encode("utf-8"))
    return path
