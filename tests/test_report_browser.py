"""report.html in a real headless Chromium: it loads, every plot decodes to a non-empty image,
and the page requests nothing but itself (no broken or external references)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sweep_helpers

CHROMIUM = Path("/usr/bin/chromium")

# Appended to a copy of the page: after `load`, write what the browser saw into the DOM,
# which --dump-dom then prints.
PROBE = """<script>
const errors = [];
window.addEventListener('error',
  e => errors.push(String((e.target && (e.target.src || e.target.href)) || e.message)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({scheme: i.src.slice(0, 5), w: i.naturalWidth,
                                               h: i.naturalHeight, ok: i.complete && i.naturalWidth > 0}));
  const res = performance.getEntriesByType('resource').map(r => r.name);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({title: document.title, imgs, errors, res,
                                    h2: document.querySelectorAll('h2').length});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip("headless browser test needs /usr/bin/chromium (Debian package `chromium`)")
    return sweep_helpers.finished_run(tmp_path_factory.getbasetemp() / "lab")


def test_report_page_loads_and_shows_every_plot(run1, tmp_path):
    page = tmp_path / "report.html"
    html = (run1 / "report.html").read_text()
    assert "</body>" in html
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    shutil.copy(page, tmp_path / "unused")  # nothing else lies next to it that it could load
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the page did not finish loading: {res.stdout[-500:]} {res.stderr[-1000:]}"
    seen = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))
    assert seen["title"].startswith("ouro-lab sweep report")
    assert seen["h2"] >= 5
    n_plots = len(list((run1 / "plots").iterdir()))
    assert len(seen["imgs"]) == n_plots >= 5
    for img in seen["imgs"]:
        assert img["scheme"] == "data:" and img["ok"] and img["w"] > 100 and img["h"] > 100, img
    assert seen["errors"] == []
    assert seen["res"] == []  # not one request: the page is self-contained
