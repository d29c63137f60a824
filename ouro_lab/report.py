"""Turn a run folder's tables into answers: report.md and a self-contained report.html.

Reads only files (metrics.csv, samples.parquet, exits.csv, provenance.json), so
`ouro-lab report RUN_DIR` rebuilds everything after the fact. The report answers:

- which strategy is best at each budget (the compute of each fixed step);
- how much compute each strategy saves at no more than `tolerance` points of accuracy
  loss against full depth, with a paired-bootstrap interval over documents;
- the area under each accuracy-versus-FLOPs curve;
- the replay-versus-live gap where live runs were made;
- provenance (model, tasks, versions, git SHA, seeds, device, dtype).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ouro_lab import stats
from ouro_lab.errors import OuroLabError
from ouro_lab.files import atomic_write

PRIMARY = ("acc", "exact_match", "acc_norm", "f1", "mcc", "bleu")
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


class RunDirError(OuroLabError):
    """A run folder without the files a report needs."""


# what the report reads of each table: a file without these columns is not the sweep's
METRICS_COLUMNS = ("task", "strategy", "params", "setting", "kind", "mode", "is_full", "metric", "value",
                   "flops_rel", "flops_executed_per_token")
SAMPLES_COLUMNS = ("task", "setting", "mode", "doc_id")
EXITS_COLUMNS = ("task", "setting", "step", "count")


def read_run(run_dir: str | Path, verify: bool = True) -> dict:
    """The run folder's tables, each checked: a file that is missing, empty, cut short,
    unparseable, lacks the sweep's columns or (with `verify`) no longer matches the checksum
    provenance.json recorded for it is refused in one line naming it and the fix. A report
    is built from whole tables or not at all."""
    from ouro_lab.files import DamagedFileError, file_digest, read_csv, read_json, read_parquet

    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"{run}: no such run folder")
    mfile = run / "metrics.csv"
    if not mfile.is_file():
        raise RunDirError(f"{mfile}: missing; this is not a finished sweep folder (run `ouro-lab sweep` "
                          "first, or resume it)")
    prov = None
    try:
        pfile = run / "provenance.json"
        if not pfile.is_file():
            raise DamagedFileError(pfile, "missing")
        prov = read_json(pfile)
        if not isinstance(prov, dict):
            raise DamagedFileError(pfile, "not the provenance record a sweep writes (a JSON object)")
        metrics = read_csv(mfile, METRICS_COLUMNS, keep_default_na=True)
        bad = metrics[list(METRICS_COLUMNS[:8])].isna().any(axis=1)
        if bad.any():
            raise DamagedFileError(mfile, f"row {int(bad.to_numpy().argmax()) + 2} is incomplete "
                                   "(a key column is empty)")
        sfile = next((run / n for n in ("samples.parquet", "samples.csv") if (run / n).is_file()),
                     run / "samples.parquet")
        if not sfile.is_file():
            raise DamagedFileError(sfile, "missing (the per-document table that compute saved and its "
                                   "intervals are computed from)")
        samples = (read_parquet(sfile, SAMPLES_COLUMNS) if sfile.suffix == ".parquet"
                   else read_csv(sfile, SAMPLES_COLUMNS))
        efile = run / "exits.csv"
        if not efile.is_file():
            raise DamagedFileError(efile, "missing (the exit-step counts the histograms are drawn from)")
        exits = read_csv(efile, EXITS_COLUMNS)
        recorded = prov.get("files") if verify and isinstance(prov.get("files"), dict) else {}
        for name, want in recorded.items():  # whole tables, as the sweep wrote them, byte for byte
            p = run / name
            if not p.is_file():
                raise DamagedFileError(p, "missing (provenance.json lists it)")
            if isinstance(want, dict) and want.get("checksum") and file_digest(p) != want["checksum"]:
                raise DamagedFileError(p, "does not match the checksum provenance.json recorded for it "
                                       "(changed, truncated or damaged after the sweep wrote it)")
    except DamagedFileError as e:
        raise RunDirError(f"{e}; {_rebuild_hint(run, prov)}") from None
    return {"dir": run, "metrics": metrics, "samples": samples, "exits": exits, "provenance": prov}


def _rebuild_hint(run: Path, prov: dict | None) -> str:
    recipe = prov.get("recipe_file") if isinstance(prov, dict) else None
    return (f"rerun the sweep to rebuild it (`ouro-lab sweep {recipe or 'RECIPE.yaml'} --out {run}`: "
            "finished settings are reused)")


def base_mode(metrics: pd.DataFrame, task: str) -> str:
    """The mode a task's curves are drawn in: replay where a trace exists, else live."""
    return "replay" if ((metrics.task == task) & (metrics["mode"] == "replay")).any() else "live"


def primary_metric(metrics: pd.DataFrame, task: str) -> str:
    have = list(dict.fromkeys(metrics[metrics.task == task].metric))
    for m in PRIMARY:
        if m in have:
            return m
    higher = [m for m in have if m not in LOWER_IS_BETTER]
    return (higher or have)[0]


# --------------------------------------------------------------------------- analysis


def analyze(run: dict) -> dict:
    """Per task: primary metric, full-depth score, AUC per curve, compute saved per
    strategy with its interval, best setting per budget, replay-vs-live gaps."""
    metrics, samples = run["metrics"], run["samples"]
    prov = run["provenance"]
    recipe = prov.get("recipe", {})
    tol = float(recipe.get("tolerance", 1.0))
    B = int(recipe.get("bootstrap", 1000))
    seed = int(recipe.get("seed", 1234))
    out = {"tolerance": tol, "tasks": {}}
    order = list((recipe.get("tasks") or {}).get("names") or [])
    for task in sorted(dict.fromkeys(metrics.task), key=lambda t: (order.index(t) if t in order else 1e9, t)):
        metric = primary_metric(metrics, task)
        m = metrics[(metrics.task == task) & (metrics.metric == metric)]
        mode = base_mode(metrics, task)
        rep = m[m["mode"] == mode]
        full = rep[rep.is_full.astype(bool)]
        if not len(full):
            continue
        full = full.iloc[0]
        scale = 100.0 if _is_fraction(rep.value) else 1.0
        t = {"metric": metric, "mode": mode, "full": float(full.value),
             "full_flops": float(full.flops_executed_per_token),
             "scale": scale, "curves": [], "saved": [], "budgets": [], "live": []}
        for s, d in rep.groupby("strategy", sort=False):
            a, lo, hi = stats.auc(d.flops_rel.to_numpy(), d.value.to_numpy())
            t["curves"].append({"strategy": s, "settings": int(len(d)), "auc": a, "flops_rel_lo": lo,
                                "flops_rel_hi": hi, "kind": str(d["kind"].iloc[0])})
        if samples is not None and metric in samples.columns:
            t["saved"] = _saved(samples, rep, task, metric, full, tol / scale, B, seed, mode)
        fixed = rep[rep.strategy == "fixed"].sort_values("flops_rel")
        pts = [r for r in rep.to_dict("records") if r["kind"] != "select"]
        for (_, f), best in zip(fixed.iterrows(), stats.best_at_budgets(pts, list(fixed.flops_rel)),
                                strict=True):
            t["budgets"].append({"budget": f"step {json.loads(f.params).get('step')}",
                                 "flops_rel": float(f.flops_rel), "fixed": float(f.value),
                                 "best": best["setting"] if best else None,
                                 "best_value": float(best["value"]) if best else None,
                                 "best_flops_rel": float(best["flops_rel"]) if best else None})
        live = m[m["mode"] == "live"] if mode == "replay" else m.iloc[:0]
        for _, r in live.iterrows():
            twin = rep[(rep.strategy == r.strategy) & (rep.params == r.params)]
            if len(twin):
                tw = twin.iloc[0]
                t["live"].append({"setting": r.setting, "kv_policy": r.get("kv_policy", ""),
                                  "replay": float(tw.value), "live": float(r.value),
                                  "gap": float(r.value - tw.value),
                                  "replay_flops": float(tw.flops_executed_per_token),
                                  "live_flops": float(r.flops_executed_per_token)})
        out["tasks"][task] = t
    return out


def _is_fraction(values) -> bool:
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v)) and bool(((v >= 0) & (v <= 1)).all())


def _saved(samples, rep, task, metric, full, tol, B, seed, mode) -> list[dict]:
    s = samples[(samples.task == task) & (samples["mode"] == mode)]
    docs = np.sort(s.doc_id.unique())
    idx = stats.bootstrap_indices(len(docs), B, seed)

    def table(col):
        t = s.pivot_table(index="setting", columns="doc_id", values=col, aggfunc="first")
        return t.reindex(columns=docs)

    val, fl, tok = table(metric), table("flops_executed"), table("tokens")
    full_row = full.setting
    if full_row not in val.index:
        return []
    out = []
    for strat, d in rep.groupby("strategy", sort=False):
        if strat == "fixed" and len(d) == 1:
            continue
        names = [n for n in d.setting if n in val.index]
        if not names:
            continue
        res = stats.compute_saved(val.loc[names].to_numpy(float), fl.loc[names].to_numpy(float),
                                  tok.loc[full_row].to_numpy(float), val.loc[full_row].to_numpy(float),
                                  fl.loc[full_row].to_numpy(float), idx, tolerance=tol)
        res["strategy"] = strat
        res["kind"] = str(d["kind"].iloc[0])
        res["chosen"] = names[res["setting"]] if res["setting"] >= 0 else None
        out.append(res)
    return out


# --------------------------------------------------------------------------- plots


def make_plots(run: dict, summary: dict) -> list[tuple[str, Path]]:
    from ouro_lab import plots

    pdir = run["dir"] / "plots"
    pdir.mkdir(exist_ok=True)
    metrics, samples, exits = run["metrics"], run["samples"], run["exits"]
    made = []
    for task, t in summary["tasks"].items():
        made.append((f"{task}: {t['metric']} versus FLOPs per token",
                     plots.accuracy_vs_flops(metrics, task, t["metric"],
                                             pdir / f"{_safe(task)}_acc_vs_flops.png", mode=t["mode"])))
        chosen = _representatives(metrics, task, t)
        if exits is not None and len(exits[exits.task == task]):
            made.append((f"{task}: exit-step histogram",
                         plots.exit_histograms(exits, task, chosen, pdir / f"{_safe(task)}_exit_hist.png")))
        if samples is not None and "difficulty" in samples.columns and t["metric"] in samples.columns:
            has = samples[(samples.task == task)]["difficulty"].notna().any()
            if has:
                made.append((f"{task}: {t['metric']} by difficulty",
                             plots.accuracy_by_difficulty(samples, task, t["metric"], chosen,
                                                          pdir / f"{_safe(task)}_by_difficulty.png",
                                                          mode=t["mode"])))
    made.append(("Accuracy by loop step", plots.accuracy_by_step(
        metrics, {k: (v["metric"], v["mode"]) for k, v in summary["tasks"].items()},
        pdir / "accuracy_by_step.png")))
    return made


def _representatives(metrics, task, t) -> list[str]:
    """Per adaptive strategy (oracles apart), the setting chosen for 'compute saved'
    (else its median-cost setting)."""
    rep = metrics[(metrics.task == task) & (metrics.metric == t["metric"]) & (metrics["mode"] == t["mode"])]
    chosen = {r["strategy"]: r["chosen"] for r in t["saved"] if r["chosen"]}
    out = []
    for s, d in rep.groupby("strategy", sort=False):
        if s == "fixed" or (d["kind"] == "select").all():
            continue
        name = chosen.get(s) or d.sort_values("flops_rel").setting.iloc[len(d) // 2]
        out.append(name)
    return out[:9]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------- documents


def _pct(x, scale=100.0, signed=False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x * scale:+.1f}" if signed else f"{x * scale:.1f}"


def _num(x, digits=3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def sections(run: dict, summary: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) tables shared by the markdown and the HTML."""
    out = []
    tol = summary["tolerance"]
    for task, t in summary["tasks"].items():
        sc = t["scale"]
        unit = ("point" if tol == 1 else "points") if sc == 100 else ("unit" if tol == 1 else "units")
        rows = [[b["budget"], _pct(b["flops_rel"]) + "%", _num(b["fixed"] * sc, 1),
                 b["best"] or "none", _num(np.nan if b["best_value"] is None else b["best_value"] * sc, 1),
                 _pct(b["best_flops_rel"]) + "%"] for b in t["budgets"]]
        out.append((f"{task}: best strategy at each budget ({t['metric']})",
                    ["budget", "FLOPs vs full", "fixed", "best setting", "its score", "its FLOPs"], rows,
                    "Budget = the executed FLOPs per token of each fixed step; best = the highest-scoring "
                    "setting (oracles excluded) that costs no more."))
        rows = [[r["strategy"] + (" (oracle: reads the answer)" if r["kind"] == "select" else ""),
                 r["chosen"] or "none within tolerance", _pct(r["saved"]) + "%" if r["chosen"] else "-",
                 f"[{_pct(r['ci_low'])}%, {_pct(r['ci_high'])}%]", _pct(r["delta"], sc, signed=True)]
                for r in t["saved"]]
        out.append((f"{task}: compute saved at <= {tol:g} {unit} loss",
                    ["strategy", "cheapest setting within tolerance", "FLOPs saved", "95% paired bootstrap",
                     "score change"], rows,
                    f"Full depth scores {t['full'] * sc:.1f}. The interval repeats the choice of setting "
                    "on every resample of documents (paired across settings)."))
        rows = [[c["strategy"], str(c["settings"]), _num(c["auc"] * sc, 2),
                 f"{_pct(c['flops_rel_lo'])}%-{_pct(c['flops_rel_hi'])}%"] for c in t["curves"]]
        out.append((f"{task}: area under the curve", ["strategy", "settings", "AUC", "FLOPs range"], rows,
                    "AUC = trapezoid area under score versus relative FLOPs divided by the FLOPs range the "
                    "curve covers (its mean score over that range)."))
        if t["live"]:
            rows = [[r["setting"], str(r["kv_policy"]), _num(r["replay"] * sc, 2), _num(r["live"] * sc, 2),
                     _num(r["gap"] * sc, 2), f"{r['live_flops'] / max(r['replay_flops'], 1e-300):.3f}"]
                    for r in t["live"]]
            out.append((f"{task}: replay versus live", ["setting", "KV policy", "replay", "live",
                                                         "gap (live - replay)", "live/replay FLOPs"], rows,
                        "Replay assumes earlier tokens' deeper steps exist; live really stops them."))
    return out


def provenance_rows(prov: dict) -> list[list[str]]:
    rows = []
    for k in ("run_id", "recipe_file", "git_sha", "device", "dtype", "seed", "model_fingerprint",
              "started", "finished", "wall_s"):
        if k in prov:
            rows.append([k, str(prov[k])])
    for k, v in (prov.get("versions") or {}).items():
        rows.append([f"version {k}", str(v)])
    return rows


def render_markdown(run: dict, summary: dict, plots: list[tuple[str, Path]]) -> str:
    prov = run["provenance"]
    lines = [f"# ouro-lab sweep report: {prov.get('recipe_name', run['dir'].name)}", ""]
    lines.append(f"Run folder `{run['dir']}`. Tables: `metrics.csv` (one row per task x strategy x setting x "
                 "metric), `samples.parquet` (per document). Rebuild with `ouro-lab report "
                 f"{run['dir']}`.")
    lines.append("")
    for title, header, rows, note in sections(run, summary):
        lines += [f"## {title}", "", note, "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += (["| " + " | ".join(r) + " |" for r in rows]
                  or ["| " + " | ".join(["-"] * len(header)) + " |"])
        lines.append("")
    lines += ["## Plots", ""]
    for title, p in plots:
        lines += [f"![{title}](plots/{p.name})", ""]
    lines += ["## Provenance", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in provenance_rows(prov)]
    lines += ["", "The resolved recipe is in `provenance.json` (`recipe`).", ""]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;
margin:.5em 0}figure{margin:1em 0}figcaption{font-size:13px;color:#555}.note{color:#555;font-size:13px}
code{background:#f5f5f5;padding:0 3px}"""


def render_html(run: dict, summary: dict, plots: list[tuple[str, Path]]) -> str:
    prov = run["provenance"]
    e = html.escape
    title = f"ouro-lab sweep report: {prov.get('recipe_name', run['dir'].name)}"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<p class=note>Run folder <code>{e(str(run['dir']))}</code>. Rebuild with "
             f"<code>ouro-lab report {e(str(run['dir']))}</code>.</p>"]
    for t, header, rows, note in sections(run, summary):
        parts += [f"<h2>{e(t)}</h2>", f"<p class=note>{e(note)}</p>", "<table><tr>"
                  + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("<h2>Plots</h2>")
    for t, p in plots:
        b64 = base64.b64encode(Path(p).read_bytes()).decode()
        parts.append(f'<figure><img alt="{e(t)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(t)}</figcaption></figure>")
    parts += ["<h2>Provenance</h2>", "<table><tr><th>field</th><th>value</th></tr>"]
    parts += [f"<tr><td>{e(k)}</td><td><code>{e(v)}</code></td></tr>" for k, v in provenance_rows(prov)]
    parts += ["</table>", "<h3>Resolved recipe</h3>",
              f"<pre>{e(json.dumps(prov.get('recipe', {}), indent=2))}</pre>", "</body></html>"]
    return "\n".join(parts)


def build_report(run_dir: str | Path) -> dict:
    """(Re)build plots/, summary.json, report.md and report.html from a run folder's files."""
    run = read_run(run_dir)
    summary = analyze(run)
    made = make_plots(run, summary)
    d = run["dir"]
    atomic_write(d / "summary.json", json.dumps(summary, indent=2, default=_jsonable) + "\n")
    atomic_write(d / "report.md", render_markdown(run, summary, made))
    atomic_write(d / "report.html", render_html(run, summary, made))
    return {"summary": summary, "plots": [p for _, p in made], "report_md": d / "report.md",
            "report_html": d / "report.html"}


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


# --------------------------------------------------------------------------- compare


def compare(run_a: str | Path, run_b: str | Path) -> str:
    """A markdown table setting two runs side by side: every (task, strategy, params,
    metric, mode) row they share, with both scores, the difference and both FLOPs."""
    a, b = read_run(run_a, verify=False)["metrics"], read_run(run_b, verify=False)["metrics"]
    key = ["task", "strategy", "params", "metric", "mode"]
    j = a.merge(b, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
    lines = [f"A = {run_a}", f"B = {run_b}", "",
             "| task | strategy | params | metric | mode | A | B | B - A | A FLOPs/tok | B FLOPs/tok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in j.iterrows():
        va, vb = r.get("value_a"), r.get("value_b")
        diff = vb - va if pd.notna(va) and pd.notna(vb) else np.nan
        lines.append(f"| {r.task} | {r.strategy} | {r.params} | {r.metric} | {r['mode']} | {_num(va, 4)} | "
                     f"{_num(vb, 4)} | {_num(diff, 4)} | {_num(r.get('flops_executed_per_token_a'), 0)} | "
                     f"{_num(r.get('flops_executed_per_token_b'), 0)} |")
    only_a, only_b = int((j._merge == "left_only").sum()), int((j._merge == "right_only").sum())
    lines += ["", f"{len(j) - only_a - only_b} rows in both, {only_a} only in A, {only_b} only in B."]
    return "\n".join(lines)
