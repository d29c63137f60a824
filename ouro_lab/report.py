"""Turn a run folder's tables into answers: summary.json, report.md and report.html.

Reads only files (metrics.csv, samples.parquet, exits.csv, provenance.json), so
`ouro-lab report RUN_DIR` rebuilds everything after the fact. Per task the report
answers, first in one headline sentence:

- how much compute each strategy saves at no more than `tolerance` points of accuracy
  loss against full depth, with a paired-bootstrap interval over documents;
- which strategy is best at each budget (the compute of each fixed step);
- the area under each accuracy-versus-FLOPs curve over one FLOPs range common to all;
- the replay-versus-live gap where live runs were made;
- provenance (model, tasks, versions, git SHA, seeds, device, dtype), folded away.

The page itself is drawn by `ouro_lab.report_page`; two runs are set side by side by
`ouro_lab.compare`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ouro_lab import claims, stats
from ouro_lab.errors import OuroLabError
from ouro_lab.files import atomic_write
from ouro_lab.labels import LOWER_IS_BETTER, metric_words, points_scale, split_metric
from ouro_lab.tables import MODE

KEY = "metric_key"  # a metric with its filter: the samples.parquet column of its per-document values


class RunDirError(OuroLabError):
    """A run folder without the files a report needs."""


# what the report reads of each table: a file without these columns is not the sweep's
METRICS_COLUMNS = ("task", "strategy", "params", "setting", "kind", MODE, "is_full", KEY, "value",
                   "flops_rel", "flops_executed_per_token")
SAMPLES_COLUMNS = ("task", "setting", MODE, "doc_id")
EXITS_COLUMNS = ("task", "setting", "count")  # and exit_step (1-based), or step (0-based: older runs)


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
        if "exit_step" not in exits.columns:
            if "step" not in exits.columns:
                raise DamagedFileError(efile, "missing column exit_step: not the table ouro-lab wrote")
            exits["exit_step"] = exits["step"] + 1  # written before exits.csv counted from 1
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
    """The command that made the run, as it was typed (overrides kept: they are in the
    settings' keys) but writing to this folder (it may have been moved), and where, else
    the recipe and the folder."""
    import shlex

    prov = prov if isinstance(prov, dict) else {}
    argv, cwd = prov.get("argv"), prov.get("cwd")
    if isinstance(argv, list) and argv[:1] == ["sweep"] and all(isinstance(a, str) for a in argv):
        outs, kept, i = ("--out", "--output_path", "--output-path"), [], 0
        while i < len(argv):  # every way the folder was named, dropped
            a = argv[i]
            i += 2 if a in outs else 1
            if a not in outs and not a.startswith((*(f"{o}=" for o in outs), "output=")):
                kept.append(a)
        argv = [*kept, "--out", str(Path(run).resolve())]
        where = f" in {cwd}" if cwd else ""
        return (f"rerun the sweep to rebuild it (`ouro-lab {shlex.join(argv)}`{where}: finished settings "
                "are reused)")
    recipe = prov.get("recipe_file")
    return (f"rerun the sweep to rebuild it (`ouro-lab sweep {recipe or 'RECIPE.yaml'} --out {run}` with the "
            "overrides it was run with: finished settings are reused)")


def base_mode(metrics: pd.DataFrame, task: str) -> str:
    """The mode a task's curves are drawn in: replay where a trace exists, else live."""
    return "replay" if ((metrics.task == task) & (metrics[MODE] == "replay")).any() else "live"


def primary_metric(metrics: pd.DataFrame, task: str) -> str:
    """The task's main metric key: the rows marked `primary`, else chosen as tables does."""
    m = metrics[metrics.task == task]
    if "primary" in m.columns and m.primary.astype(bool).any():
        return str(m[m.primary.astype(bool)][KEY].iloc[0])
    return stats.primary_metric(m[KEY])


# --------------------------------------------------------------------------- analysis


def analyze(run: dict) -> dict:
    """Per task: primary metric, full-depth score, documents, compute saved per strategy
    with its interval (most saved first), the headline, best setting per budget, AUC per
    curve over one common FLOPs range, replay-vs-live gaps. Plus the model's facts."""
    metrics, prov = run["metrics"], run["provenance"]
    recipe = prov.get("recipe", {})
    out = {"tolerance": float(recipe.get("tolerance", 1.0)), "model": model_facts(prov), "tasks": {},
           "warnings": list(prov.get("warnings") or []), "replay_assumes": claims.REPLAY_ASSUMES}
    order = list((recipe.get("tasks") or {}).get("names") or [])
    for task in sorted(dict.fromkeys(metrics.task), key=lambda t: (order.index(t) if t in order else 1e9, t)):
        t = _analyze_task(run, task, out["tolerance"])
        if t is not None:
            out["tasks"][task] = t
            out["warnings"] += claims.guarantee_warnings(task, t["certified"], t["scale"])
    out["warnings"] += claims.warnings(run, out)  # checked before stated: shown beside their rows
    return out


def _analyze_task(run: dict, task: str, tol: float) -> dict | None:
    metrics, samples, prov = run["metrics"], run["samples"], run["provenance"]
    recipe = prov.get("recipe", {})
    metric = primary_metric(metrics, task)
    m = metrics[(metrics.task == task) & (metrics[KEY] == metric)]
    mode = base_mode(metrics, task)
    rep = m[m[MODE] == mode]
    full = rep[rep.is_full.astype(bool)]
    if not len(full):
        return None
    full = full.iloc[0]
    scale = points_scale(metric, rep.value)
    info = (prov.get("tasks") or {}).get(task) or {}
    lower = split_metric(metric)[0] in LOWER_IS_BETTER
    t = {"metric": metric, "metric_words": metric_words(metric), "mode": mode, "full": float(full.value),
         "full_flops": float(full.flops_executed_per_token), "scale": scale, "lower_is_better": lower,
         "n_docs": _n_docs(m, samples, task), "chance": info.get("chance"),
         # the AUC ranks by mean score, higher first, chance below a curve: not for perplexities
         "curves": [] if lower else _curves(rep, info.get("chance")), "saved": [],
         "budgets": _budgets(rep, lower), "live": []}
    t["auc_range"] = [t["curves"][0]["auc_lo"], 1.0] if t["curves"] else None
    t["full_setting"] = str(full.setting)
    # compute saved per document needs the metric to be the mean of its per-document values
    # (perplexities and bits per byte are corpus-level: samples hold log-likelihoods)
    t["doc_mean"] = (None if samples is None or metric not in samples.columns
                     else _doc_mean(samples, task, mode, metric, full))
    if t["doc_mean"]:
        cal = recipe.get("calibration") or {}
        folds = (int(cal.get("folds", 2)), int(cal.get("seed", 0)))
        saved = _saved(samples, rep, task, metric, full, tol / scale, int(recipe.get("bootstrap", 1000)),
                       int(recipe.get("seed", 1234)), mode, folds, prov.get("fitted") or {})
        # most compute saved first; none within tolerance next; oracles (bounds, not rules) last
        t["saved"] = sorted(saved, key=lambda r: (r["kind"] == "select", r["chosen"] is None,
                                                  -r["saved"] if r["chosen"] else 0))
    live = m[m[MODE] == "live"] if mode == "replay" else m.iloc[:0]
    for _, r in live.iterrows():
        twin = rep[(rep.strategy == r.strategy) & (rep.params == r.params)]
        if len(twin):
            tw = twin.iloc[0]
            t["live"].append({"setting": r.setting, "kv_policy": r.get("kv_policy", ""),
                              "replay": float(tw.value), "live": float(r.value),
                              "gap": float(r.value - tw.value),
                              "replay_flops": float(tw.flops_executed_per_token),
                              "live_flops": float(r.flops_executed_per_token)})
    t["headline"] = _headline(t, tol / scale)
    t["certified"] = claims.certified(run, task, t)
    t["speed"] = _speed(m)
    return t


def _speed(m) -> list[dict]:
    """Live rows with measured decode seconds: the speed-up over full-depth live decoding
    (same batch plan) beside the FLOPs saved and the ideal speed-up (the FLOPs ratio)."""
    if "decode_s_per_token" not in m.columns:
        return []
    live = m[(m[MODE] == "live") & m.decode_s_per_token.notna()]
    full = live[live.is_full.astype(bool)]
    if not len(full):
        return []
    f = full.iloc[0]
    return [{"setting": r.setting, "kind": str(r.get("kind", "")), "value": float(r.value),
             "decode_s": float(r.decode_s_per_token),
             "prefill_s": float(r.prefill_s_per_token),
             "speedup": f.decode_s_per_token / r.decode_s_per_token,
             "flops_saved": 1 - r.flops_executed_per_token / f.flops_executed_per_token,
             "ideal": f.flops_executed_per_token / r.flops_executed_per_token,
             "acceptance": float(r.get("acceptance", np.nan))}
            for _, r in live.sort_values("decode_s_per_token").iterrows()]


def _n_docs(m, samples, task) -> int | None:
    n = m.n_docs.dropna() if "n_docs" in m.columns else m.iloc[:0]
    if len(n):
        return int(n.max())
    if samples is not None and len(samples):
        return int(samples[samples.task == task].doc_id.nunique())
    return None


def _curves(rep, chance) -> list[dict]:
    """AUC of every strategy over one range: from the cheapest fixed step to full depth
    (stats.auc_common; below a curve's cheapest point it scores chance, else 0)."""
    fixed = rep[rep.strategy == "fixed"]
    lo = float(fixed.flops_rel.min()) if len(fixed) else float(rep.flops_rel.min())
    floor = float(chance) if chance is not None else 0.0
    out = []
    for s, d in rep.groupby("strategy", sort=False):
        if (d["kind"].astype(str) == "speculative").all():  # above full depth's FLOPs by design
            continue
        out.append({"strategy": s, "settings": int(len(d)), "kind": str(d["kind"].iloc[0]),
                    "auc": stats.auc_common(d.flops_rel.to_numpy(), d.value.to_numpy(), lo, 1.0, floor),
                    "auc_lo": lo, "flops_rel_lo": float(d.flops_rel.min()),
                    "flops_rel_hi": float(d.flops_rel.max())})
    return sorted(out, key=lambda c: -c["auc"] if np.isfinite(c["auc"]) else 0)


def _doc_mean(samples, task, mode, metric, full) -> bool | None:
    """Whether full depth's `metric` is the mean of its per-document sample values (None:
    no per-document rows to tell, e.g. a group, whose samples are its leaf tasks')."""
    d = samples[(samples.task == task) & (samples.setting == full.setting) & (samples[MODE] == mode)]
    per = d.groupby("doc_id")[metric].first().to_numpy(np.float64)
    if not per.size:
        return None
    return bool(np.isclose(per.mean(), float(full.value), rtol=1e-6, atol=1e-9))


def _budgets(rep, lower: bool = False) -> list[dict]:
    """Per fixed step's FLOPs: the best-scoring setting (lowest, for a lower-is-better
    metric) that costs no more."""
    fixed = rep[rep.strategy == "fixed"].sort_values("flops_rel")
    pts = [r for r in rep.to_dict("records") if r["kind"] != "select"]
    out = []
    bests = stats.best_at_budgets(pts, list(fixed.flops_rel), lower=lower)
    for (_, f), best in zip(fixed.iterrows(), bests, strict=True):
        out.append({"budget": f"step {json.loads(f.params).get('step')}", "flops_rel": float(f.flops_rel),
                    "fixed": float(f.value), "best": best["setting"] if best else None,
                    "best_value": float(best["value"]) if best else None,
                    "best_flops_rel": float(best["flops_rel"]) if best else None})
    return out


def _headline(t: dict, tol: float) -> dict | None:
    """The strategy (oracles apart) that saves the most compute within tolerance `tol`
    (a fraction), cross-fitted: its setting chosen on other documents, scored on held-out
    ones, and held out it stays within tolerance. It is named by the settings the folds
    chose (one, or one per fold); the in-sample figure, chosen and scored on the same
    documents, rides along."""
    real = [r for r in t["saved"] if r["kind"] != "select" and r["crossfit"]["saved"] > 0
            and r["crossfit"]["delta"] >= -tol - 1e-12]
    if not real:
        return None
    best = max(real, key=lambda r: r["crossfit"]["saved"])
    cf = best["crossfit"]
    picked = list(dict.fromkeys(cf["settings"]))
    setting = picked[0] if len(picked) == 1 else (
        f"{best['strategy']} (per fold: {', '.join(cf['settings'])})")
    live = next((x for x in t["live"] if x["setting"] == setting), None)
    return {"strategy": best["strategy"], "setting": setting, "key": best["chosen"] or best["strategy"],
            "saved": cf["saved"], "ci_low": cf["ci_low"], "ci_high": cf["ci_high"], "delta": cf["delta"],
            "mode": t["mode"], "live": live, "crossfit": True,
            "in_sample": ({k: best[k] for k in ("saved", "ci_low", "ci_high", "delta")}
                          if best["chosen"] else None)}


# why a cross-fitted figure is refused (`empty_folds` names its counts)
REFUSED = {"not_recorded": "its run did not record whether its fit reads the calibration documents' scores; "
                           "rerun the sweep",
           "reads_answers": "its fit reads the calibration documents' scores"}


def _saved(samples, rep, task, metric, full, tol, B, seed, mode, folds=(2, 0), fitted=None) -> list[dict]:
    """Per strategy: the cheapest setting within tolerance in sample (`stats.compute_saved`)
    and cross-fitted over the calibration folds (`crossfit`), each setting's FLOPs over its
    own tokens (so FLOPs saved = 1 - flops_rel). Speculative decoding is not an exit rule:
    its output is full depth's at more FLOPs, so its figure is the measured speed-up.
    A rule whose fit read the calibration documents' scores (`reads_outcomes` in `fitted`,
    e.g. `risk`) gets no cross-fitted figure: its copy scoring fold k was fitted on the
    other folds, so those folds' results, on which a choice for fold k would be made, came
    from copies fitted on fold k's answers. Its claim is the certified one, checked held out."""
    s = samples[(samples.task == task) & (samples[MODE] == mode)]
    docs = np.sort(s.doc_id.unique())
    idx = stats.bootstrap_indices(len(docs), B, seed)

    def table(col):
        t = s.pivot_table(index="setting", columns="doc_id", values=col, aggfunc="first")
        return t.reindex(columns=docs)

    val, fl, tok = table(metric), table("flops_executed"), table("tokens")
    fold = stats.doc_folds([task] * len(docs), docs, *folds)  # the folds calibrating rules are fitted on
    full_row = full.setting
    if full_row not in val.index:
        return []
    empty = folds[0] - len(np.unique(fold))  # folds without documents: a choice made on nothing
    out = []
    for strat, d in rep.groupby("strategy", sort=False):
        if strat == "fixed" and len(d) == 1:
            continue
        if (d["kind"].astype(str) == "speculative").all():  # lossless, spends more FLOPs: see "speed"
            continue
        names = [n for n in d.setting if n in val.index]
        if not names:
            continue
        args = (val.loc[names].to_numpy(float), fl.loc[names].to_numpy(float), tok.loc[names].to_numpy(float),
                val.loc[full_row].to_numpy(float), fl.loc[full_row].to_numpy(float))
        res = stats.compute_saved(*args, idx, tolerance=tol, full_tokens=tok.loc[full_row].to_numpy(float))
        recs = [x for n in names for x in (fitted or {}).get(n, []) if x.get("task") == task]
        unknown = any("reads_outcomes" not in x for x in recs)  # a run recorded before it was
        code = ("empty_folds" if empty else "not_recorded" if unknown else
                "reads_answers" if any(x["reads_outcomes"] for x in recs) else None)
        if code:
            why = (REFUSED[code] if code != "empty_folds" else
                   f"{empty} of {folds[0]} calibration folds hold none of the {len(docs)} documents")
            cf = {"refused": why, "refused_code": code, "saved": np.nan, "delta": np.nan, "ci_low": np.nan,
                  "ci_high": np.nan, "chosen": []}
        else:
            cf = stats.compute_saved_crossfit(*args, fold, idx, tolerance=tol,
                                              full_tokens=tok.loc[full_row].to_numpy(float))
        cf["settings"] = [names[i] if i >= 0 else "full depth" for i in cf["chosen"]]
        res["crossfit"] = cf
        res["strategy"] = strat
        res["kind"] = str(d["kind"].iloc[0])
        res["chosen"] = names[res["setting"]] if res["setting"] >= 0 else None
        out.append(res)
    return out


def model_facts(prov: dict) -> dict:
    """Name, parameters, layers and loop steps of the run's model: from provenance, else
    from the checkpoint's config.json where it still is (None where neither says)."""
    model = dict(prov.get("model") or {})
    path = ((prov.get("recipe") or {}).get("model") or {}).get("path")
    model.setdefault("name", Path(path).name if path else None)
    if "parameters" not in model and path and (Path(path) / "config.json").is_file():
        try:
            from ouro_lab.flops import ModelCost
            from ouro_lab.loading import read_config

            cfg = read_config(path)
            model.update(parameters=ModelCost.from_config(cfg).params, layers=cfg.num_hidden_layers,
                         steps=cfg.total_ut_steps)
        except OuroLabError:
            pass
    steps = ((prov.get("recipe") or {}).get("model") or {}).get("steps")
    if steps:
        model["steps"] = steps
    model.setdefault("dtype", prov.get("dtype"))
    model.setdefault("device", prov.get("device"))
    return model


# --------------------------------------------------------------------------- plots


def make_plots(run: dict, summary: dict) -> list[dict]:
    """Every plot of the run: [{'title', 'path', 'task', 'kind', 'caption'}], the main
    plot (accuracy versus FLOPs of the first task) first."""
    from ouro_lab import plots

    pdir = run["dir"] / "plots"
    pdir.mkdir(exist_ok=True)
    metrics, samples, exits = run["metrics"], run["samples"], run["exits"]
    recipe = run["provenance"].get("recipe", {})
    tol, B, seed = summary["tolerance"], int(recipe.get("bootstrap", 1000)), int(recipe.get("seed", 1234))
    made = []

    def add(kind, task, title, path, caption):
        made.append({"kind": kind, "task": task, "title": title, "path": path, "caption": caption})

    bars = f"Error bars: 95% paired-bootstrap intervals over documents ({B} resamples)."
    for task, t in summary["tasks"].items():
        words = t["metric_words"]
        add("main", task, f"{task}: {words} versus FLOPs per token",
            plots.accuracy_vs_flops(metrics, task, t["metric"], pdir / f"{_safe(task)}_acc_vs_flops.png",
                                    mode=t["mode"], tolerance=tol, chance=t.get("chance")),
            f"{_capital(words)}{' (points)' if t['scale'] == 100 else ''} against FLOPs per token relative "
            f"to full depth (absolute FLOPs on the top axis), "
            f"{'replayed from the trace' if t['mode'] == 'replay' else 'live runs'}; each "
            f"point is one setting, labelled with its parameter value. {bars} The grey band is the "
            f"{tol:g}-{'point' if t['scale'] == 100 else 'unit'} tolerance "
            f"{'above' if t.get('lower_is_better') else 'under'} full depth"
            f"{' (lower is better)' if t.get('lower_is_better') else ''}.")
        col = plots.seconds_column(metrics[metrics.task == task])
        if col is not None and ((metrics.task == task) & (metrics[MODE] == "live")).any():
            add("seconds", task, f"{task}: {words} versus measured time per token",
                plots.accuracy_vs_seconds(metrics, task, t["metric"],
                                          pdir / f"{_safe(task)}_acc_vs_seconds.png", tolerance=tol,
                                          chance=t.get("chance"), column=col),
                f"Live runs: {words} against measured seconds per token. {bars}")
        chosen = _representatives(metrics, task, t)
        if exits is not None and len(exits[(exits.task == task) & exits.setting.isin(chosen)]):
            add("exits", task, f"{task}: exit-step histogram",
                plots.exit_histograms(exits, task, chosen, pdir / f"{_safe(task)}_exit_hist.png", t["mode"]),
                "Share of tokens exiting at each loop step (scored tokens; generated ones for a generation "
                "task), for the setting chosen for each strategy.")
        if samples is not None and "difficulty" in samples.columns and t["metric"] in samples.columns \
                and samples[samples.task == task]["difficulty"].notna().any():
            add("difficulty", task, f"{task}: {words} by difficulty",
                plots.accuracy_by_difficulty(samples, task, t["metric"], chosen,
                                             pdir / f"{_safe(task)}_by_difficulty.png", mode=t["mode"],
                                             resamples=B, seed=seed),
                f"{_capital(words)} and loop steps used per difficulty level. Error bars: 95% bootstrap "
                "intervals over the documents of each level.")
    add("steps", None, "Score by loop step", plots.accuracy_by_step(
        metrics, {k: (v["metric"], v["mode"]) for k, v in summary["tasks"].items()},
        pdir / "accuracy_by_step.png"), f"Every task at fixed depth 1..R. {bars}")
    return made


def _capital(s: str) -> str:
    return s[:1].upper() + s[1:]


def _representatives(metrics, task, t) -> list[str]:
    """Per adaptive strategy (oracles apart), the setting chosen for 'compute saved'
    (else its median-cost setting)."""
    rep = metrics[(metrics.task == task) & (metrics[KEY] == t["metric"]) & (metrics[MODE] == t["mode"])]
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


# --------------------------------------------------------------------------- build


def build_report(run_dir: str | Path) -> dict:
    """(Re)build plots/, summary.json, report.md and report.html from a run folder's files."""
    from ouro_lab import report_page

    run = read_run(run_dir)
    summary = analyze(run)
    made = make_plots(run, summary)
    d = run["dir"]
    atomic_write(d / "summary.json", json.dumps(_nulls(summary), indent=2, default=_jsonable, allow_nan=False)
                 + "\n")  # strict JSON (jq, JavaScript): no NaN
    atomic_write(d / "report.md", report_page.render_markdown(run, summary, made))
    atomic_write(d / "report.html", report_page.render_html(run, summary, made))
    return {"summary": summary, "plots": [p["path"] for p in made], "report_md": d / "report.md",
            "report_html": d / "report.html"}


def _nulls(x):
    """Non-finite numbers as null, through dicts and lists (numpy scalars first made plain)."""
    if isinstance(x, dict):
        return {k: _nulls(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nulls(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    return None if isinstance(x, float) and not np.isfinite(x) else x


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
