"""Property tests for the HTML page's reader: any JSON document, or a valid report with any
field replaced by any JSON value, is either refused with ``ReportInvalid`` or rendered into a
page that holds no element or attribute the report's strings could have injected."""

from __future__ import annotations

import html.parser
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox._html import read_reports, render_html, render_html_many
from sandbox.errors import ReportInvalid
from tests.fakes import hostile_report

SETTINGS = settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.too_slow])

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    [
        "<script>alert(1)</script>",
        "\"'><img src=x onerror=alert(1)>",
        "</style><b>",
        "\x1b[2J",
        "\u202e",
        "javascript:alert(1)",
        "]]>",
        "<!--",
    ]
)
_json: Any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([10**400, -(10**400)])  # past what a float holds
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_FIELDS = sorted(hostile_report().to_dict())


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs |= {k for k, _ in attrs}


_ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "main",
    "header",
    "span",
    "h1",
    "h2",
    "div",
    "section",
    "strong",
    "dl",
    "dt",
    "dd",
    "a",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "p",
    "em",
    "svg",
    "line",
    "circle",
    "text",
    "rect",
    "polyline",
    "ul",
    "li",
    "hr",
}
_ALLOWED_ATTRS = {
    "charset",
    "http-equiv",
    "content",
    "name",
    "lang",
    "class",
    "id",
    "style",
    "href",
    "data-rule",
    "xmlns",
    "viewbox",
    "width",
    "height",
    "role",
    "aria-label",
    "x",
    "y",
    "x1",
    "x2",
    "y1",
    "y2",
    "cx",
    "cy",
    "r",
    "fill",
    "fill-opacity",
    "stroke",
    "stroke-width",
    "stroke-dasharray",
    "text-anchor",
    "points",
}


def _check(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.json"
        path.write_text(json.dumps(doc))
        try:
            reports = read_reports(path)
        except ReportInvalid:
            return
    page = render_html(reports[0]) if len(reports) == 1 else render_html_many(reports)
    tags = _Tags()
    tags.feed(page)
    assert tags.tags <= _ALLOWED_TAGS, tags.tags - _ALLOWED_TAGS
    assert tags.attrs <= _ALLOWED_ATTRS, tags.attrs - _ALLOWED_ATTRS


@SETTINGS
@given(_json)
def test_any_json_is_refused_or_rendered_inert(doc: Any) -> None:
    _check(doc)


@SETTINGS
@given(st.sampled_from(_FIELDS), _json)
def test_a_report_with_any_field_replaced(field: str, value: Any) -> None:
    doc = hostile_report().to_dict()
    doc[field] = value
    _check(doc)


@SETTINGS
@given(
    st.sampled_from(["static", "resources", "tool", "policy", "outputs"]),
    st.sampled_from(["dangerous", "unknown", "series", "name", "image", "version", "x"]),
    _json,
)
def test_a_report_with_any_figure_replaced(where: str, key: str, value: Any) -> None:
    doc = hostile_report().to_dict()
    doc[where][key] = value
    _check(doc)


@SETTINGS
@given(
    st.lists(st.sampled_from(_FIELDS), max_size=3), st.lists(_json, min_size=3, max_size=3), st.integers(1, 3)
)
def test_a_list_of_reports_with_fields_replaced(fields: list[str], values: list[Any], n: int) -> None:
    docs = [hostile_report().to_dict() for _ in range(n)]
    for i, (field, value) in enumerate(zip(fields, values, strict=False)):
        docs[i % n][field] = value
    _check(docs)


@SETTINGS
@given(st.sampled_from(["findings", "events"]), st.text(max_size=20), _json)
def test_a_report_with_any_entry_field_replaced(where: str, key: str, value: Any) -> None:
    doc = hostile_report().to_dict()
    doc[where][0][key] = value
    _check(doc)
