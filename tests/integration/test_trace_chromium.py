"""The HTML trace viewer in a real browser: headless Chromium loads a rendered trace, every
step's image is present and decodes, and the page logs no console errors.

Needs Chromium (`/usr/bin/chromium`, or `chromium`/`chromium-browser`/`google-chrome` on PATH;
Debian: `apt-get install -y chromium`); skipped without it. The page is loaded twice with
`--dump-dom`: a copy with a probe script appended (it awaits `img.decode()` for every image
and records errors and `console.error` calls into the DOM), and, as a control, a page with a
deliberate `console.error`, so that a silent probe cannot pass the test by accident.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lavida_agent.api import LavidaAgent
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.tools.images import decode_png
from lavida_agent.traces import render_html
from tests.fakes import FakeEngine, draw


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                "(Debian: apt-get install -y chromium)")  # fmt: skip

PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(
  'error: ' + (e.message || (e.target && (e.target.src || e.target.tagName)) || 'unknown')), true);
const origError = console.error;
console.error = (...a) => {
  window.__errors.push('console.error: ' + a.join(' '));
  origError(...a);
};
// Synchronous on `load` (which waits for every image): an async `decode()` could resolve
// after --dump-dom has already written the page, and the probe would be missing (flaky).
window.addEventListener('load', () => {
  const sizes = Array.from(document.images).map(i => (i.complete && i.naturalWidth)
    ? [i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)] : ['failed', 'not decoded']);
  const out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({images: sizes, errors: window.__errors});
  document.body.appendChild(out);
});
</script>
"""


def _dump_dom(page: Path, tmp_path: Path) -> tuple[str, str]:
    """(DOM after load, stderr) of `page` in headless Chromium."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
           page.as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def _probe(dom: str) -> dict:
    m = re.search(r'<pre id="__probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe did not run:\n" + dom[-1000:]
    result: dict = json.loads(html.unescape(m.group(1)))
    return result


def _console_errors(stderr: str) -> list[str]:
    """Console messages in Chromium's log. At `--v=0` every level is logged as
    `INFO:CONSOLE`; the trace page has no scripts, so any console message is a problem."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.fixture
def trace_page(tmp_path):
    """A trace of a two-round edit run (rejected, then accepted) rendered to a file."""
    engine = FakeEngine()
    red = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}
    engine.enqueue_edit_plan(EditPlanResult(targets=["red circle"], target_boxes=[red["box"]],
                                            layout=[red]))  # fmt: skip
    engine.enqueue_critique(False, ["the circle is still red"])
    with LavidaAgent(engine=engine, num_steps=3, max_rounds=2) as agent:
        scene = draw(np.zeros((64, 64, 3), np.uint8), [red])
        result = agent.edit(scene, "make the circle green", seed=3)
        page = render_html(result.trace, agent.store)
    path = tmp_path / "trace.html"
    path.write_text(page, encoding="utf-8")
    return path, result.trace


def test_trace_page_images_decode_without_console_errors(trace_page, tmp_path):
    path, trace = trace_page
    page = path.read_text(encoding="utf-8")
    # Self-contained: every image is an inline PNG that decodes, one per node.
    srcs = re.findall(r"<img [^>]*src='([^']+)'", page)
    assert len(srcs) == len(trace.nodes) >= 4
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert decode_png(base64.b64decode(s.split(",", 1)[1])).shape == (256, 256, 3)
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", page)

    # The page as is: no console errors while loading.
    dom, stderr = _dump_dom(path, tmp_path)
    assert dom.count("<img") == len(trace.nodes)
    assert _console_errors(stderr) == []

    # With the probe: every image decodes in the browser at its size.
    probed = tmp_path / "trace_probe.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom, stderr = _dump_dom(probed, tmp_path)
    result = _probe(dom)
    assert result["errors"] == [] and _console_errors(stderr) == []
    assert result["images"] == [[256, 256, "data:image/png;base64,"]] * len(trace.nodes)


def test_the_probe_sees_errors(tmp_path):
    """Control: a broken image and a console error are reported (the checks can fail)."""
    page = tmp_path / "bad.html"
    broken = ("<img src='data:image/png;base64,AAAA'>"
              "<script>console.error('boom'); notDefined();</script>")  # fmt: skip
    page.write_text(f"<!DOCTYPE html><html><body>{PROBE}{broken}</body></html>")
    dom, stderr = _dump_dom(page, tmp_path)
    result = _probe(dom)
    assert result["images"][0][0] == "failed"
    assert any("boom" in e for e in result["errors"])
    logged = _console_errors(stderr)
    assert any("boom" in ln for ln in logged) and any("Uncaught" in ln for ln in logged)
