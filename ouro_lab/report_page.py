"""The report as documents: report.md and a self-contained, responsive report.html.

The first screen answers: the model (name, parameters, loop steps), the tasks with the
documents scored, one headline sentence per task and the main plot. Then per task its
tables (most compute saved first, sortable in the page by a small inline script), the
other plots, and the recipe with its provenance folded away. Files are named relative
to the report, so a moved run folder stays right. Warnings from `summary["warnings"]`
({task, setting, code, message}) are shown beside what they concern.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ouro_lab.claims import REPLAY_ASSUMES
from ouro_lab.labels import strategy_style

FILES = ("metrics.csv", "samples.parquet", "samples.csv", "exits.csv", "provenance.json")  # where present
WRITTEN = ("summary.json", "report.md")  # written with the report itself


@dataclass
class Table:
    """One table of the report: cells are text or (text, sort value); `keys` name the
    setting (or strategy) each row is about, for warnings and colour swatches."""
    id: str
    title: str
    header: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""
    keys: list = field(default_factory=list)
    strategies: list = field(default_factory=list)


# --------------------------------------------------------------------------- words


def _pct(x, scale=100.0, signed=False, digits=1) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x * scale:+.{digits}f}" if signed else f"{x * scale:.{digits}f}"


def _num(x, digits=3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _v(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _unit(t: dict, n: float) -> str:
    one = float(n) == 1
    return ("point" if one else "points") if t["scale"] == 100 else ("unit" if one else "units")


def headline(task: str, t: dict, tol: float) -> str:
    """One sentence: the strategy that saves the most compute within tolerance, with its
    interval, its score change, replay or live (and the live result where one exists)."""
    sc, words = t["scale"], t["metric_words"]
    full = f"{t['full'] * sc:.1f}{'%' if sc == 100 else ''}"
    h = t.get("headline")
    if not h:
        if t.get("doc_mean") is False:
            return (f"{task}: {words} {full} at full depth. It is not a mean over documents (a corpus-level "
                    "figure), so no per-document compute-saved figure is stated; the budget table and the "
                    "curve compare the settings.")
        if t.get("withdrawn") == "baseline_broken":
            return f"{task}: no claim: full depth scores {full}, at or below chance."
        claims = [r for r in t.get("saved") or [] if r["kind"] != "select" and r["chosen"] and r["saved"] > 0]
        if claims and all((r.get("crossfit") or {}).get("refused") for r in claims):  # not "no saving"
            best = max(claims, key=lambda r: r["saved"])
            return (f"{task}: no cross-fitted figure ({best['crossfit']['refused']}); in sample, "
                    f"{best['chosen']} saves {_pct(best['saved'])}% of the FLOPs per token for "
                    f"{_pct(best['delta'], sc, True)} {_unit(t, 2)} of {words} against full depth ({full}).")
        return (f"{task}: no strategy saves compute within {tol:g} {_unit(t, tol)} of full depth "
                f"({words} {full}).")
    how = "replayed from the full-depth trace" if h["mode"] == "replay" else "run live (real early exit)"
    ci = (f" (95% CI {_pct(h['ci_low'])} to {_pct(h['ci_high'])}%)" if _pct(h["ci_low"]) != "n/a"
          else " (no interval: bootstrap 0)")
    s = (f"{task}: {h['setting']} saves {_pct(h['saved'])}% of the FLOPs per token{ci} for "
         f"{_pct(h['delta'], sc, True)} {_unit(t, 2)} of {words} against full depth ({full}), {how}")
    ins = h.get("in_sample")
    s += "; cross-fitted: chosen on other documents, scored on held-out ones (in sample " + (
        f"{_pct(ins['saved'])}% for {_pct(ins['delta'], sc, True)})." if ins else
        "no setting is within tolerance).")
    live = h.get("live")
    if live:
        s += (f" Run live ({live['kv_policy']} KV policy) it scores {_pct(live['live'], sc)} "
              f"({_pct(live['gap'], sc, True)} {_unit(t, 2)} against replay).")
    return s


def facts(run: dict, summary: dict) -> tuple[str, str]:
    """(model sentence, tasks sentence) for the first screen."""
    m = summary.get("model") or {}
    bits = []
    if m.get("parameters"):
        bits.append(f"{int(m['parameters']):,} parameters")
    if m.get("layers") and m.get("steps"):
        bits.append(f"{m['layers']} layers x {m['steps']} loop steps")
    elif m.get("steps"):
        bits.append(f"{m['steps']} loop steps")
    if m.get("dtype"):
        bits.append(f"{m['dtype']}" + (f" on {m['device']}" if m.get("device") else ""))
    model = f"Model {m.get('name') or 'unknown'}" + (f": {', '.join(bits)}." if bits else ".")
    tasks = []
    for task, t in summary["tasks"].items():
        n = f"{t['n_docs']:,} documents" if t.get("n_docs") else "documents: n/a"
        how = "replayed from one trace pass" if t["mode"] == "replay" else "decoded live"
        tasks.append(f"{task} ({n}, {t['metric_words']}, {how})")
    recipe = run["provenance"].get("recipe", {})
    tol = summary["tolerance"]
    scales = {t["scale"] for t in summary["tasks"].values()}
    unit = _unit({"scale": scales.pop()}, tol) if len(scales) == 1 else "(points for scores in %, else units)"
    return model, (f"Tasks: {'; '.join(tasks)}. Tolerance {tol:g} {unit}; "
                   f"intervals: 95% paired bootstrap over documents, {recipe.get('bootstrap', 1000)} "
                   "resamples.")


def warnings_for(summary: dict, task: str | None, setting: str | None = None) -> list[str]:
    """Messages of the summary's warnings about one task (setting None: the task-wide ones)."""
    out = []
    for w in summary.get("warnings") or []:
        if w.get("task") not in (task, None, "") and task is not None:
            continue
        if (w.get("setting") or None) != setting:
            continue
        out.append(str(w.get("message") or w.get("code") or w))
    return out


# --------------------------------------------------------------------------- tables


def tables(summary: dict) -> dict[str, list[Table]]:
    """Per task, its tables in reading order."""
    return {task: [t for t in (_saved_table(task, t, summary), _certified_table(task, t),
                               _budget_table(task, t), _auc_table(task, t), _live_table(task, t),
                               _speed_table(task, t)) if t is not None]
            for task, t in summary["tasks"].items()}


def _saved_table(task, t, summary) -> Table | None:
    if t.get("doc_mean") is False:  # a corpus-level metric: no per-document figure (see the headline)
        return None
    sc, tol = t["scale"], summary["tolerance"]
    tab = Table(f"{task}-saved", f"{task}: compute saved at <= {tol:g} {_unit(t, tol)} loss",
                ["strategy", "cheapest setting within tolerance", "FLOPs saved", "95% paired bootstrap",
                 f"{t['metric_words']} change", "cross-fitted: saved [95%]", "its change (held out)"],
                note=f"Full depth scores {t['full'] * sc:.1f}. Most compute saved first, the oracle "
                     "(best fixed depth per document: a bound on accuracy, not on per-token FLOPs) last; "
                     "FLOPs saved = 1 - FLOPs per token relative to full depth. In sample, "
                     "the setting is chosen and scored on the same documents; cross-fitted, it is chosen on "
                     "the other calibration folds and scored on each held-out fold (the headline's figure; "
                     "the headline's pick among the strategies compared is made on these same documents). "
                     "Intervals repeat the choice on every resample of documents (paired across settings). "
                     "Cross-fitted \"none\": the rule's fit reads the calibration documents' answers "
                     "(its claim is the certified table), a calibration fold holds no documents, or the run "
                     "did not record what its fit reads. "
                     + REPLAY_ASSUMES)
    if t.get("withdrawn"):  # a broken baseline: no saving against it is claimed (see the warning)
        tab.note = "No claim: full depth scores at or below chance. " + tab.note
    for r in t["saved"]:
        cf = r.get("crossfit") or {}
        if t.get("withdrawn"):
            tab.rows.append([r["strategy"], "no claim (full depth at chance)"] + ["-"] * 5)
            tab.keys.append(None)
            tab.strategies.append(r["strategy"])
            continue
        tab.rows.append([r["strategy"] + (" (reads the answer)" if r["kind"] == "select" else ""),
                         r["chosen"] or "none within tolerance",
                         (_pct(r["saved"]) + "%", _v(r["saved"])) if r["chosen"] else ("-", None),
                         (f"[{_pct(r['ci_low'])}%, {_pct(r['ci_high'])}%]", _v(r["ci_low"])),
                         (_pct(r["delta"], sc, signed=True), _v(r["delta"])),
                         (f"{_pct(cf.get('saved'))}% [{_pct(cf.get('ci_low'))}, {_pct(cf.get('ci_high'))}]",
                          _v(cf.get("saved", np.nan))) if not cf.get("refused") else
                         ("none: " + refused_words(cf), None),
                         (_pct(cf.get("delta"), sc, signed=True), _v(cf.get("delta", np.nan)))
                         if not cf.get("refused") else ("-", None)])
        tab.keys.append(r["chosen"] or r["strategy"])  # the key its warnings carry
        tab.strategies.append(r["strategy"])
    return tab


REFUSED_WORDS = {"empty_folds": "empty folds", "not_recorded": "not recorded",
                 "reads_answers": "fit reads the answers"}


def refused_words(cf: dict) -> str:
    """Why a cross-fitted figure is refused, in a few words (the table's note says the rest)."""
    return REFUSED_WORDS.get(cf.get("refused_code"), "refused")


def _certified_table(task, t) -> Table | None:
    """Certified settings (`risk`): the guarantee as stated, checked on held-out folds."""
    if not t.get("certified"):
        return None
    sc = t["scale"]
    tab = Table(f"{task}-certified", f"{task}: certified thresholds, checked on held-out documents",
                ["setting", "guarantee", "calibration documents per fold", "folds certified",
                 "held-out loss", "met"],
                note="Learn-then-Test with Hoeffding-Bentkus p-values, fitted on the calibration folds only: "
                     "with probability >= 1 - alpha the expected share of documents full depth gets right "
                     "and the setting does not is <= delta; a fold with no certified threshold runs at full "
                     "depth. Held-out loss: that share on the documents each fold's copy never saw.")
    for r in t["certified"]:
        tab.rows.append([r["setting"], f"P(loss > {_pct(r['delta'], sc)} {_unit(t, 2)}) <= {r['alpha']:g}",
                         ", ".join(str(d) for d in r["calibration_docs"]),
                         f"{r['certified_folds']} of {r['folds']}",
                         (_num(r["held_out_loss"] * sc, 2), _v(r["held_out_loss"])),
                         "yes" if r["met"] else "no"])
        tab.keys.append(r["setting"])
        tab.strategies.append(r["setting"].split("(")[0])
    return tab


def _budget_table(task, t) -> Table:
    sc = t["scale"]
    best = (f"setting with the lowest {t['metric_words']} (lower is better)" if t.get("lower_is_better")
            else "highest-scoring setting")
    tab = Table(f"{task}-budgets", f"{task}: best strategy at each budget ({t['metric_words']})",
                ["budget", "FLOPs vs full", "fixed", "best setting", "its score", "its FLOPs"],
                note=f"Budget = the executed FLOPs per token of each fixed step; best = the {best} "
                     "(oracles excluded) that costs no more.")
    for b in t["budgets"]:
        bv = np.nan if b["best_value"] is None else b["best_value"]
        tab.rows.append([(b["budget"], _v(b["flops_rel"])), (_pct(b["flops_rel"]) + "%", _v(b["flops_rel"])),
                         (_num(b["fixed"] * sc, 1), _v(b["fixed"])), b["best"] or "none",
                         (_num(bv * sc, 1), _v(bv)),
                         (_pct(b["best_flops_rel"]) + "%", _v(b["best_flops_rel"]))])
        tab.keys.append(b["best"])
        tab.strategies.append((b["best"] or "").split("(")[0] or None)
    return tab


def _auc_table(task, t) -> Table | None:
    if t.get("lower_is_better"):  # a mean score over FLOPs, highest first: not for a perplexity
        return None
    sc = t["scale"]
    lo = t["auc_range"][0] if t.get("auc_range") else float("nan")
    floor = "chance" if t.get("chance") is not None else "0"
    tab = Table(f"{task}-auc", f"{task}: area under the curve, {_pct(lo)}% to 100% of full-depth FLOPs",
                ["strategy", "settings", "AUC", "FLOPs the curve covers"],
                note="AUC = mean score over one FLOPs range shared by every curve (the cheapest fixed step "
                     f"to full depth): the curve's Pareto points joined linearly, flat after its most "
                     f"expensive point, {floor} below its cheapest. Highest first.")
    for c in t["curves"]:
        tab.rows.append([c["strategy"] + (" (reads the answer)" if c["kind"] == "select" else ""),
                         (str(c["settings"]), float(c["settings"])), (_num(c["auc"] * sc, 1), _v(c["auc"])),
                         (f"{_pct(c['flops_rel_lo'])}%-{_pct(c['flops_rel_hi'])}%", _v(c["flops_rel_lo"]))])
        tab.keys.append(None)
        tab.strategies.append(c["strategy"])
    return tab


def _live_table(task, t) -> Table | None:
    if not t["live"]:
        return None
    sc = t["scale"]
    tab = Table(f"{task}-live", f"{task}: replay versus live",
                ["setting", "KV policy", "replay", "live", "gap (live - replay)", "live/replay FLOPs"],
                note="Replay assumes earlier tokens' deeper steps exist; live really stops them.")
    for r in t["live"]:
        ratio = r["live_flops"] / max(r["replay_flops"], 1e-300)
        tab.rows.append([r["setting"], str(r["kv_policy"]), (_num(r["replay"] * sc, 1), _v(r["replay"])),
                         (_num(r["live"] * sc, 1), _v(r["live"])), (_num(r["gap"] * sc, 1), _v(r["gap"])),
                         (f"{ratio:.3f}", ratio)])
        tab.keys.append(r["setting"])
        tab.strategies.append(r["setting"].split("(")[0])
    return tab


def _speed_table(task, t) -> Table | None:
    if not t.get("speed"):
        return None
    sc = t["scale"]
    note = ""
    one = [r for r in t["speed"] if r["setting"] == "fixed(step=1)"]
    if one and one[0]["speedup"] < 0.8 * one[0]["ideal"]:  # checked on this run's own rows
        frac = one[0]["speedup"] / one[0]["ideal"]
        note = (f" Here fixed(step=1) reaches {frac:.2f} of its ideal speed-up: "
                "per-token work that does not shrink with depth (Python bookkeeping, small tensor "
                "operations) is a large share of each token's time on this model and machine; "
                "bench/live_speed.py measures a mid-size model.")
    tab = Table(f"{task}-speed", f"{task}: measured speed (live decoding)",
                ["setting", t["metric_words"], "decode ms/token", "prefill ms/token", "measured speed-up",
                 "FLOPs saved", "ideal speed-up (FLOPs)", "measured / ideal", "drafts accepted"],
                note="Wall-clock seconds measured in this run, every setting on the same batch plan; "
                     "speed-up = full-depth live decoding's seconds per token / the setting's; ideal = full "
                     "depth's executed FLOPs per token / the setting's. Speculative settings output full "
                     "depth's tokens exactly: they spend FLOPs on fewer sequential passes. Each setting is "
                     "timed once, in one run (no interval): on a shared machine single timings can differ "
                     "by tens of percent; bench/live_speed.py times methods in adjacent pairs and prints "
                     "their spread." + note)
    for r in t["speed"]:
        acc = r["acceptance"]
        tab.rows.append([r["setting"], (_num(r["value"] * sc, 1), _v(r["value"])),
                         (_num(r["decode_s"] * 1e3, 3), _v(r["decode_s"])),
                         (_num(r["prefill_s"] * 1e3, 3), _v(r["prefill_s"])),
                         (f"{r['speedup']:.2f}x", _v(r["speedup"])), (_pct(r["flops_saved"]) + "%",
                                                                     _v(r["flops_saved"])),
                         (f"{r['ideal']:.2f}x", _v(r["ideal"])),
                         (_num(r["speedup"] / r["ideal"], 2), _v(r["speedup"] / r["ideal"])),
                         (_pct(acc) + "%", acc) if np.isfinite(acc) else ("-", None)])
        tab.keys.append(r["setting"])
        tab.strategies.append(r["setting"].split("(")[0])
    return tab


def provenance_rows(prov: dict) -> list[list[str]]:
    rows = []
    for k in ("run_id", "recipe_file", "git_sha", "device", "dtype", "seed", "model_fingerprint",
              "started", "finished", "wall_s"):
        if k in prov:
            rows.append([k, str(prov[k])])
    for k, v in (prov.get("versions") or {}).items():
        rows.append([f"version {k}", str(v)])
    return rows


def _files(run: dict) -> list[str]:
    d = run["dir"]
    out = [f for f in FILES if (d / f).is_file()] + list(WRITTEN) + ["plots/"]
    return out + (["samples/"] if (d / "samples").is_dir() else [])


def _formats(plots: list[dict]) -> str:
    """'PNG, SVG and PDF': the formats written beside the plots' PNGs."""
    if not plots:
        return "PNG"
    png = Path(plots[0]["path"])
    have = ["PNG"] + [f.upper() for f in ("svg", "pdf") if png.with_suffix(f".{f}").is_file()]
    return have[0] if len(have) == 1 else ", ".join(have[:-1]) + " and " + have[-1]


def _text(cell) -> str:
    return cell[0] if isinstance(cell, tuple) else str(cell)


# --------------------------------------------------------------------------- markdown


def render_markdown(run: dict, summary: dict, plots: list[dict]) -> str:
    prov = run["provenance"]
    tol = summary["tolerance"]
    model, tasks = facts(run, summary)
    lines = [f"# ouro-lab sweep report: {prov.get('recipe_name', run['dir'].name)}", "", model, "", tasks, ""]
    for task, t in summary["tasks"].items():
        lines.append(f"- **{headline(task, t, tol)}**")
        lines += [f"  - warning: {w}" for w in warnings_for(summary, task)]
    lines.append("")
    for p in plots[:1]:
        lines += [f"![{p['title']}](plots/{Path(p['path']).name})", "", f"*{p['caption']}*", ""]
    lines += [f"Files beside this report: {', '.join(f'`{f}`' for f in _files(run))}; plots as "
              f"{_formats(plots)}. Rebuild with `ouro-lab report .` in this folder.", ""]
    for task, tabs in tables(summary).items():
        lines += [f"## {task}", ""]
        lines += [f"- warning ({k}): {w}" for k in dict.fromkeys(x for tb in tabs for x in tb.keys if x)
                  for w in warnings_for(summary, task, k)]
        for tab in tabs:
            lines += [f"### {tab.title}", "", tab.note, "", "| " + " | ".join(tab.header) + " |",
                      "|" + "---|" * len(tab.header)]
            lines += (["| " + " | ".join(_text(c) for c in r) + " |" for r in tab.rows]
                      or ["| " + " | ".join(["-"] * len(tab.header)) + " |"])
            lines.append("")
        for p in plots[1:]:
            if p["task"] == task:
                lines += [f"![{p['title']}](plots/{Path(p['path']).name})", "", f"*{p['caption']}*", ""]
    for p in plots[1:]:
        if p["task"] is None:
            lines += [f"![{p['title']}](plots/{Path(p['path']).name})", "", f"*{p['caption']}*", ""]
    lines += ["## Provenance", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in provenance_rows(prov)]
    lines += ["", "The resolved recipe is in `provenance.json` (`recipe`).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML


CSS = """*{box-sizing:border-box}html{-webkit-text-size-adjust:100%}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:0 auto;
padding:10px 16px 40px;color:#1d1d1d;overflow-wrap:anywhere}
h1{font-size:1.35em;margin:.3em 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .3em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1.1em 0 .2em}p{margin:.3em 0}.facts{color:#333;font-size:14px}
ul.head{margin:.4em 0;padding-left:1.2em}ul.head li{margin:.25em 0}
.wrap{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.3em 0 1em;font-size:13px;
overflow-wrap:normal}td,th{border:1px solid #d8d8d8;padding:3px 7px;text-align:left;vertical-align:top;
overflow-wrap:break-word}td code{overflow-wrap:anywhere}
th{background:#f3f3f3;cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:100%;height:auto;display:block}figure{margin:.6em 0 1.2em}#main img{max-width:min(100%,900px)}
figcaption,.note{font-size:13px;color:#555}code{background:#f4f4f4;padding:0 3px}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;background:#f8f8f8;padding:8px}
.sw{display:inline-block;width:.75em;height:.75em;border-radius:2px;margin-right:.35em}
.warn{color:#7a4100;background:#fff4dc;border-left:3px solid #e0a030;padding:2px 6px;margin:.2em 0;
font-size:13px;white-space:normal;text-align:left;min-width:16em}
details{margin:1.5em 0}summary{cursor:pointer;font-weight:600}
nav{font-size:13px;margin:.6em 0}nav a{margin-right:.8em}
@media (max-width:600px){body{font-size:14px;padding:6px 10px}td,th{padding:2px 4px;font-size:12px}
table.sortable,table.sortable tbody,table.sortable tr,table.sortable td{display:block}
table.sortable thead tr{display:flex;flex-wrap:wrap;gap:3px}table.sortable th{font-size:11px;padding:1px 5px}
table.sortable tr{border-top:1px solid #bbb;padding:3px 0}table.sortable td{border:0;padding:0 4px;
text-align:left;white-space:normal}table.sortable td::before{content:attr(data-h) ": ";color:#666}}"""

# Sort a table by the clicked column: numbers by their data-v value (missing last), text otherwise.
SCRIPT = """document.querySelectorAll('table.sortable th').forEach((th, i) =>
 th.addEventListener('click', () => {
  const t = th.closest('table'), body = t.tBodies[0], dir = th.dataset.dir === 'asc' ? -1 : 1;
  t.querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = dir > 0 ? 'asc' : 'desc';
  const key = r => { const c = r.cells[i]; return 'v' in c.dataset ? parseFloat(c.dataset.v)
                                                                   : c.textContent.trim().toLowerCase(); };
  [...body.rows].sort((x, y) => {
    const a = key(x), b = key(y);
    if (typeof a === 'number' || typeof b === 'number') {
      if (isNaN(a)) return isNaN(b) ? 0 : 1;
      if (isNaN(b)) return -1;
      return (a - b) * dir;
    }
    return a.localeCompare(b) * dir;
  }).forEach(r => body.appendChild(r));
}));"""


def _cell(c, head: str, swatch: str | None = None) -> str:
    """A table cell; numbers carry their sort value, the first cell its strategy's colour,
    every cell its column name (shown beside it on narrow screens)."""
    e = html.escape
    sw = f'<span class=sw style="background:{strategy_style(swatch)[0]}"></span>' if swatch else ""
    if isinstance(c, tuple):
        v = "" if c[1] is None else repr(float(c[1]))
        return f'<td class=n data-h="{e(head)}" data-v="{v}">{e(c[0])}</td>'
    return f'<td data-h="{e(head)}">{sw}{e(str(c))}</td>'


def _table_html(tab: Table, summary: dict, task: str) -> list[str]:
    e = html.escape
    out = [f'<h3 id="{e(tab.id)}">{e(tab.title)}</h3>', f"<p class=note>{e(tab.note)}</p>",
           '<div class=wrap><table class=sortable><thead><tr>'
           + "".join(f'<th title="sort by this column">{e(h)}</th>' for h in tab.header)
           + "</tr></thead><tbody>"]
    for row, key, strat in zip(tab.rows, tab.keys, tab.strategies, strict=True):
        cells = [_cell(c, tab.header[j], strat if j == 0 else None) for j, c in enumerate(row)]
        warns = warnings_for(summary, task, key) if key else []
        if warns:
            cells[-1] = cells[-1][:-5] + "".join(f"<div class=warn>{e(w)}</div>" for w in warns) + "</td>"
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def _figure(p: dict, main: bool = False) -> str:
    e = html.escape
    b64 = base64.b64encode(Path(p["path"]).read_bytes()).decode()
    ident = ' id="main"' if main else ""
    name = Path(p["path"]).name
    return (f'<figure{ident}><a href="plots/{e(name)}" title="the full-size PNG">'
            f'<img alt="{e(p["title"])}" src="data:image/png;base64,{b64}"></a>'
            f"<figcaption>{e(p['caption'])}</figcaption></figure>")


def render_html(run: dict, summary: dict, plots: list[dict]) -> str:
    prov = run["provenance"]
    e = html.escape
    tol = summary["tolerance"]
    title = f"ouro-lab sweep report: {prov.get('recipe_name', run['dir'].name)}"
    model, tasks = facts(run, summary)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<p class=facts>{e(model)}<br>{e(tasks)}</p>", "<ul class=head>"]
    for task, t in summary["tasks"].items():
        sentence = headline(task, t, tol)
        name, rest = sentence.split(":", 1)
        warns = warnings_for(summary, task) + (warnings_for(summary, task, t["headline"]["key"])
                                               if t.get("headline") else [])
        parts.append(f"<li><b>{e(name)}</b>:{e(rest)}"
                     + "".join(f"<div class=warn>{e(w)}</div>" for w in warns) + "</li>")
    parts.append("</ul>")
    if plots:
        parts.append(_figure(plots[0], main=True))
    by_task = tables(summary)
    parts.append("<nav>" + "".join(f'<a href="#{e(task)}">{e(task)}</a>' for task in by_task)
                 + '<a href="#plots">more plots</a><a href="#provenance">recipe and provenance</a></nav>')
    for task, tabs in by_task.items():
        parts.append(f'<h2 id="{e(task)}">{e(task)}</h2>')
        for tab in tabs:
            parts += _table_html(tab, summary, task)
        parts += [_figure(p) for p in plots[1:] if p["task"] == task and p["kind"] == "main"]
    parts.append('<h2 id="plots">More plots</h2>')
    parts += [_figure(p) for p in plots[1:] if p["kind"] != "main"]
    files = ", ".join(f'<a href="{e(f)}">{e(f)}</a>' for f in _files(run))
    parts += ['<details id="provenance"><summary>Recipe and provenance</summary>',
              f"<p class=note>Files beside this report: {files}; every plot as {e(_formats(plots))} in "
              "<code>plots/</code>. Rebuild with <code>ouro-lab report .</code> in this folder.</p>",
              "<div class=wrap><table><thead><tr><th>field</th><th>value</th></tr></thead><tbody>"]
    parts += [f"<tr><td>{e(k)}</td><td><code>{e(v)}</code></td></tr>" for k, v in provenance_rows(prov)]
    parts += ["</tbody></table></div>", "<h3>Resolved recipe</h3>",
              f"<pre>{e(json.dumps(prov.get('recipe', {}), indent=2))}</pre></details>",
              f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts)
