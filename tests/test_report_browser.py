"""report.html in a real headless Chromium, at 1400 and 390 px wide: it loads, every plot
decodes to a non-empty image, the page requests nothing but itself, the headline and the
main plot lie within the first 900 px, nothing overflows sideways, and a click on a table
header sorts the table.

Headless Chromium will not make a window narrower than 500 px, so the page is shown in
an iframe of the exact width (its own viewport: media queries and the viewport tag apply
as on a phone); the probe inside writes what it saw into the top document."""
import html as htmllib
import json
import re
import shutil
import subprocess

import pytest
import sweep_helpers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

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
  const bottom = el => el ? el.getBoundingClientRect().bottom + window.scrollY : null;
  const heads = [...document.querySelectorAll('ul.head li')].map(bottom);
  const main = document.querySelector('#main img');
  const table = document.querySelector('table.sortable');
  const col = [...table.tHead.rows[0].cells].findIndex(th => th.textContent.startsWith('FLOPs saved'));
  const column = () => [...table.tBodies[0].rows].map(r => r.cells[col].dataset.v);
  const bounds = [...table.tBodies[0].rows].map(r => r.cells[0].textContent.includes('reads the answer'));
  const before = column();
  table.tHead.rows[0].cells[col].click();
  const asc = column();
  table.tHead.rows[0].cells[col].click();
  const desc = column();
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({title: document.title, imgs, errors, res, heads,
    main: bottom(main), mainWidth: main && main.getBoundingClientRect().width,
    scrollWidth: document.documentElement.scrollWidth, width: window.innerWidth,
    h2: document.querySelectorAll('h2').length, before, asc, desc, bounds,
    scrolled: [...document.querySelectorAll('.wrap')].filter(w => w.scrollWidth > w.clientWidth + 1).length});
  window.top.document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("headless browser test needs chromium (Debian package `chromium`)")
    return sweep_helpers.finished_run(tmp_path_factory.getbasetemp() / "lab")


def frame(page, width: int, height: int = 1000):
    """A page holding `page`'s HTML in an iframe exactly `width` px wide (same origin)."""
    out = page.with_name(f"frame{width}.html")
    out.write_text(f'<!DOCTYPE html><html><body style="margin:0"><iframe style="width:{width}px;'
                   f'height:{height}px;border:0" srcdoc="{htmllib.escape(page.read_text())}"></iframe>'
                   "</body></html>")
    return out


def _browse(page, profile, width: int) -> dict:
    page = frame(page, width)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--window-size={max(width, 500)},1000", f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the page did not finish loading: {res.stdout[-500:]} {res.stderr[-1000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))


def _number(v):
    return float(v) if v not in ("", None) else float("nan")


@pytest.mark.parametrize("width", [1400, 390])
def test_report_page_in_a_browser(run1, tmp_path, width):
    page = tmp_path / "report.html"
    html = (run1 / "report.html").read_text()
    assert "</body>" in html
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    shutil.copy(page, tmp_path / "unused")  # nothing else lies next to it that it could load
    seen = _browse(page, tmp_path / "profile", width)
    assert seen["title"].startswith("ouro-lab sweep report")
    assert seen["h2"] >= 3
    n_plots = len(list((run1 / "plots").glob("*.png")))
    assert len(seen["imgs"]) == n_plots >= 5
    for img in seen["imgs"]:
        assert img["scheme"] == "data:" and img["ok"] and img["w"] > 1000 and img["h"] > 500, img
    assert seen["errors"] == []
    assert seen["res"] == []  # not one request: the page is self-contained
    assert seen["width"] == width
    assert seen["scrollWidth"] <= width, "the page overflows sideways"
    assert seen["scrolled"] == 0, "a table is wider than the page (it would scroll inside its box)"
    assert len(seen["heads"]) == 2 and max(seen["heads"]) < seen["main"] <= 900, seen
    assert seen["mainWidth"] >= 0.8 * min(width, 900) - 40
    # sorted by savings first (none within tolerance next, the oracle, a bound, last), then by
    # clicks both ways
    before = [_number(v) for v in seen["before"]]
    rules = [v for v, b in zip(before, seen["bounds"], strict=True) if not b]
    given = [v for v in rules if v == v]
    assert given == sorted(given, reverse=True) and rules[:len(given)] == given
    assert seen["bounds"] == sorted(seen["bounds"])
    every = [v for v in before if v == v]
    asc, desc = [_number(v) for v in seen["asc"]], [_number(v) for v in seen["desc"]]
    assert [v for v in asc if v == v] == sorted(every) and [v for v in desc if v == v] == sorted(every)[::-1]
    assert all(v != v for v in asc[len(every):])  # missing values stay last either way
