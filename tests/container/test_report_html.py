"""The HTML report of a real hostile load, opened in a real headless Chromium.

The checkpoint's payload really runs in the sandbox: it asks for a shell that would leave a
marker in this test's directory, then connects to a port this test listens on. The report the
CLI saved becomes a page (`model-sandbox report FILE --html OUT`); the browser loads it with no
console error (a blocked script or fetch, an exception), shows the verdict and every finding, the timeline
ties the refused execve and connect to the pickle global imported before them, and the
resource chart draws the supervisor's samples; a list of reports (a batch's JSON) is one page
with a table of them first. The
screenshot is saved next to the page; ``MODEL_SANDBOX_UPDATE_SCREENSHOT=1`` also writes it to
``docs/img/report-hostile.png`` (the README's picture)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import sandbox
from tests import checkpoints as ck
from tests.browser import open_page, save_screenshot
from tests.conftest import Listener
from tests.container.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]

# what the page shows, read back by the browser: verdict, each finding's rule, whether it is
# laid out (a box with a height), and the timeline rows of refused calls with their origin
_SCRIPT = """JSON.stringify({
  verdict: document.getElementById('verdict').innerText,
  findings: [...document.querySelectorAll('#findings .finding')].map(e => ({
    rule: e.dataset.rule, height: e.getBoundingClientRect().height,
    visible: getComputedStyle(e).visibility === 'visible' && getComputedStyle(e).display !== 'none',
    text: e.innerText})),
  denied: [...document.querySelectorAll('#timeline tr.denied')].map(
    r => [...r.querySelectorAll('td')].map(td => td.innerText)),
  series: [...document.querySelectorAll('#resource-chart polyline')].map(
    l => l.getAttribute('points').trim().split(' ').length),
  chart: (() => { const c = document.getElementById('resource-chart');
                  return c ? c.getBoundingClientRect().height : 0; })(),
  scripts: document.scripts.length,
  external: [...document.querySelectorAll('[src],link[href]')].length,
})"""


def test_hostile_report_page_in_chromium(tmp_path: Path, listener: Listener, cli: Cli) -> None:
    marker = tmp_path / "marker"
    payload = ck.code_payload(
        "import os, socket\n"
        f"os.system('touch {marker}')\n"
        "s = socket.socket()\n"
        "try:\n"
        f"    s.connect(('127.0.0.1', {listener.port}))\n"
        "except OSError:\n"
        "    pass\n"
        "result = 1\n"
    )
    model = ck.save(ck.hostile_checkpoint(payload), tmp_path / "hostile.pt")
    report = sandbox.scan(model, policy=ck.observe_policy())
    saved = tmp_path / "hostile.report.json"
    saved.write_text(report.to_json())
    assert not marker.exists() and listener.connections == 0

    page_path = tmp_path / "hostile.html"
    proc = cli("report", str(saved), "--html", str(page_path), timeout=120)
    assert proc.returncode == 1, proc.stderr  # the report's own exit code: unsafe
    assert "malicious" in proc.stdout and page_path.is_file()

    page = open_page(page_path.as_uri(), _SCRIPT)
    problems = [m for m in page.console if m.get("level") in ("error", "assert")]
    assert problems == [], problems
    seen = json.loads(page.value)
    assert seen["verdict"] == "MALICIOUS"
    assert seen["scripts"] == 0 and seen["external"] == 0
    rules = [f["rule"] for f in seen["findings"]]
    assert sorted(rules) == sorted(f.rule for f in report.findings)
    assert {"exec-attempt", "network-connect"} <= set(rules)
    for f in seen["findings"]:
        assert f["visible"] and f["height"] > 20, f
    shown = {f["rule"]: f["text"] for f in seen["findings"]}
    assert str(marker) in shown["exec-attempt"]
    assert f"127.0.0.1:{listener.port}" in shown["network-connect"]
    # the refused calls, each after the global that led to them
    denied = {row[4].split(" ")[0]: row for row in seen["denied"]}
    assert {"execve", "connect"} <= set(denied)
    for row in denied.values():
        assert row[5] == "builtins.eval", row
        assert float(row[1]) > 0
    # resource use over time: memory and CPU lines of the supervisor's samples, drawn
    samples = len(report.resources["series"])
    assert samples >= 2 and seen["series"] == [samples, samples] and seen["chart"] > 50
    shot = save_screenshot(page.screenshot, tmp_path / "hostile.png")
    assert shot.stat().st_size > 10_000
    if os.environ.get("MODEL_SANDBOX_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "img" / "report-hostile.png")

    # a batch's list (this report and a benign file's static scan): one page, a table first
    benign = sandbox.scan(ck.save(ck.state_dict(), tmp_path / "good.pt"), dynamic=False)
    listed = tmp_path / "batch.json"
    listed.write_text(json.dumps([benign.to_dict(), report.to_dict()]))
    many = tmp_path / "batch.html"
    proc = cli("report", str(listed), "--html", str(many), timeout=120)
    assert proc.returncode == 1 and "2 reports" in proc.stdout, proc.stderr
    page = open_page(
        many.as_uri(),
        """JSON.stringify({
      rows: [...document.querySelectorAll('#reports tbody tr')].map(r => r.innerText),
      sections: [...document.querySelectorAll('section.report')].map(s => ({
        id: s.id, findings: s.querySelectorAll('.finding').length,
        height: s.getBoundingClientRect().height})),
    })""",
    )
    assert [m for m in page.console if m.get("level") in ("error", "assert")] == []
    seen = json.loads(page.value)
    assert len(seen["rows"]) == 2 and seen["rows"][0].startswith("MALICIOUS")
    assert "good.pt" in seen["rows"][1]
    assert [s["findings"] for s in seen["sections"]] == [len(report.findings), 0]
    assert all(s["height"] > 100 for s in seen["sections"])
