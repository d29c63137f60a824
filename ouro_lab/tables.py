"""Tidy tables from finished settings: metrics (long, with paired-bootstrap CIs), samples (wide), exits.

    metrics, samples, exits = assemble(records, frames, recipe)   # -> metrics.csv, samples.parquet, exits.csv

`records` are (Setting, mode, stored record) triples and `frames` the settings' per-document
samples tagged with `tag_samples`, as the sweep's `SettingStore` keeps them.

Column names never clash with pandas (`run_mode`, not `mode`; `filter_name`, not
`filter`). A metric is named apart from its filter (`metric` exact_match, `filter_name`
strip); `metric_key` is the samples.parquet column of that pair (lm-eval's
`exact_match,strip`, the filter left out when it is `none`). `primary` marks each task's
main metric; every strategy parameter has a `param_<name>` column beside the JSON, so

    m = pd.read_csv("metrics.csv"); d = m[m.primary & (m.run_mode == "replay")]
    for s, g in d[d.task == "loop_demo_mc"].groupby("strategy"): plt.plot(g.flops_rel, g.value, "o-", label=s)
"""

from __future__ import annotations

from ouro_lab.recipe import Recipe
from ouro_lab.settings import Setting, kv_policy_of


def tag_samples(samples, s: Setting, mode: str):
    """A setting's per-document samples with its setting, strategy, params and mode in front."""
    samples = samples.copy()
    samples.insert(0, "setting", s.label)
    samples.insert(1, "strategy", s.strategy)
    samples.insert(2, "params", s.params_json)
    samples.insert(3, MODE, mode)
    return samples


MODE = "run_mode"  # replay | live
COLUMNS = ["task", "strategy", "params", "setting", "granularity", "kind", MODE, "kv_policy", "is_full",
           "primary", "metric", "filter_name", "metric_key", "value", "stderr", "ci_low", "ci_high",
           "delta_vs_full", "delta_ci_low", "delta_ci_high", "steps_used_mean", "steps_executed_mean",
           "flops_per_token", "flops_executed_per_token", "flops_total_per_token", "flops_rel",
           "seconds_per_token", "decode_s_per_token", "prefill_s_per_token", "decode_speedup", "acceptance",
           "n_docs"]  # the param_<name> columns follow `params`
# wall-clock columns (live rows): the only ones two identical runs may differ in. decode_s_per_token:
# seconds per decoded token, prefill_s_per_token: per prefilled prompt token, decode_speedup: the
# task's full-depth live decode seconds per token / the row's (every setting on the same batch plan)
TIMING = ("seconds_per_token", "decode_s_per_token", "prefill_s_per_token", "decode_speedup")


def _measure(metric: str, filt: str) -> str:
    return metric if filt in ("none", "", None) else f"{metric},{filt}"


def param_columns(metrics):
    """`param_<name>` columns, one per strategy parameter, from the params JSON (numbers
    stay numbers; NaN where a strategy has no such parameter), right after `params`."""
    import json

    import pandas as pd

    parsed = [json.loads(p) for p in metrics.params]
    names = sorted({k for p in parsed for k in p})
    cols = pd.DataFrame({f"param_{k}": [p.get(k) for p in parsed] for k in names}, index=metrics.index)
    for c in cols:
        num = pd.to_numeric(cols[c], errors="coerce")
        if num.notna().sum() == cols[c].notna().sum():
            cols[c] = num
    at = list(metrics.columns).index("params") + 1
    return pd.concat([metrics.iloc[:, :at], cols, metrics.iloc[:, at:]], axis=1)


def wide_samples(frames):
    """Per-document rows, one per task x setting x mode x doc; metrics under a filter
    other than "none" become columns `metric,filter`."""
    import pandas as pd

    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if "filter" not in df.columns:
        return df
    key = ["setting", "strategy", "params", MODE, "task", "doc_id"]
    metric_cols = [c for c in df.columns if c not in key and c not in SAMPLE_COMPUTE
                   and c not in ("filter", "difficulty")]
    parts = []
    for _, dt in df.groupby("task", sort=True):  # per task: its first filter brings the compute columns
        out = None
        for f in sorted(dt["filter"].unique(), key=lambda f: (f != "none", f)):
            d = dt[dt["filter"] == f].drop(columns="filter")
            d = d.rename(columns={c: _measure(c, f) for c in metric_cols})
            if out is None:
                out = d
            else:
                out = out.merge(d[key + [_measure(c, f) for c in metric_cols]], on=key, how="outer")
        parts.append(out.dropna(axis=1, how="all"))
    return pd.concat(parts, ignore_index=True)


SAMPLE_COMPUTE = {"steps_used", "steps_executed", "flops_per_token", "flops_executed_per_token", "tokens",
                  "flops", "flops_executed", "flops_used", "flops_total", "flops_total_per_token", "seconds"}


# a live run's per-request records, summed per document (`live_per_doc`)
LIVE_SUMS = ("tokens", "steps_used", "steps_executed", "flops", "flops_used", "flops_total", "seconds",
             "decode_seconds", "decode_tokens", "prefill_seconds", "prefill_tokens", "drafted", "accepted")


def live_per_doc(records: dict, task: str):
    """Per document of `task`, the live run's records summed (LIVE_SUMS)."""
    import pandas as pd

    per_doc: dict[int, dict] = {}
    for (t, doc_id, _idx), rec in records.items():
        if t != task:
            continue
        d = per_doc.setdefault(int(doc_id), dict.fromkeys(LIVE_SUMS, 0))
        for k in ("tokens", "steps_used", "steps_executed", "seconds", "decode_seconds", "prefill_seconds",
                  "prefill_tokens", "drafted", "accepted"):
            d[k] += rec.get(k, 0)
        # decode FLOPs for generation, scored-token FLOPs for loglikelihood (prompt prefill apart)
        d["flops"] += rec.get("flops_decode", rec.get("flops_scored", rec.get("flops", 0.0)))
        d["flops_used"] += rec.get("flops_used_decode", rec.get("flops_used_scored", 0.0))
        d["flops_total"] += rec.get("flops", 0.0)  # the whole request: prompt prefill included
        # tokens decoded live: the generated ones, or every token fed for loglikelihood (prompt included)
        d["decode_tokens"] += rec.get("tokens_all", rec.get("tokens", 0))
    return pd.DataFrame([{"task": task, "doc_id": k, **v} for k, v in sorted(per_doc.items())])


def live_row(tot) -> dict:
    """A live metric row's compute and measured seconds from the task's summed records."""
    n = max(int(tot["tokens"]), 1)

    def per(a, b):
        return float(tot[a]) / float(tot[b]) if tot[b] else None

    return {"steps_used_mean": float(tot["steps_used"]) / n,
            "steps_executed_mean": float(tot["steps_executed"]) / n,
            "flops_per_token": float(tot["flops_used"]) / n,
            "flops_executed_per_token": float(tot["flops"]) / n,
            "flops_total_per_token": float(tot["flops_total"]) / n,
            "seconds": float(tot["seconds"]), "seconds_per_token": float(tot["seconds"]) / n,
            "decode_s_per_token": per("decode_seconds", "decode_tokens"),
            "prefill_s_per_token": per("prefill_seconds", "prefill_tokens"),
            "acceptance": per("accepted", "drafted")}


def assemble(records, frames, recipe: Recipe):
    """metrics (long: one row per task x setting x mode x metric), samples (wide, per
    document) and exits (counts per task x setting x step), with paired-bootstrap CIs,
    FLOPs relative to full depth and differences from full depth."""
    import numpy as np
    import pandas as pd

    from ouro_lab import stats

    samples = wide_samples(frames)
    rows = []
    for s, mode, rec in records:
        for m in rec["metrics"]:
            rows.append({"task": m["task"], "strategy": s.strategy, "params": s.params_json,
                         "setting": s.label,
                         "granularity": s.granularity, "kind": "fixed" if s.strategy == "fixed" else s.kind,
                         MODE: mode, "kv_policy": kv_policy_of(s, recipe) if mode == "live" else "",
                         "is_full": s.is_full, "metric": m["metric"], "filter_name": m.get("filter", "none"),
                         "metric_key": _measure(m["metric"], m.get("filter", "none")),
                         "value": m["value"], "stderr": m.get("stderr"),
                         **{k: m.get(k, np.nan) for k in ("steps_used_mean", "steps_executed_mean",
                                                          "flops_per_token", "flops_executed_per_token",
                                                          "flops_total_per_token", "seconds_per_token",
                                                          "decode_s_per_token", "prefill_s_per_token",
                                                          "acceptance")}})
    metrics = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in metrics.columns:
            metrics[c] = np.nan
    # the reference mode of a task: replay where a trace exists, else live (generation tasks)
    base = {t: ("replay" if (d[MODE] == "replay").any() else "live") for t, d in metrics.groupby("task")}
    main = {t: stats.primary_metric(d.metric_key) for t, d in metrics.groupby("task")}
    metrics["primary"] = metrics.metric_key == metrics.task.map(main)
    full = metrics[metrics.is_full & (metrics[MODE] == metrics.task.map(base))]
    full_flops = full.groupby("task").flops_executed_per_token.first()
    metrics["flops_rel"] = metrics.flops_executed_per_token / metrics.task.map(full_flops)
    live = metrics[MODE] == "live"
    live_full = metrics[metrics.is_full & live].groupby("task").decode_s_per_token.first()
    metrics["decode_speedup"] = np.where(live, metrics.task.map(live_full)
                                         / metrics.decode_s_per_token.astype(float), np.nan)
    fullv = full.set_index(["task", "metric_key"]).value
    metrics["delta_vs_full"] = [v - fullv.get((t, m), np.nan) for t, m, v in
                                zip(metrics.task, metrics.metric_key, metrics.value, strict=True)]
    # paired bootstrap over documents, the same resamples for every setting of a task
    for task in metrics.task.unique():
        st = samples[samples.task == task] if len(samples) else samples
        docs = np.sort(st.doc_id.unique()) if len(st) else np.array([])
        idx = stats.bootstrap_indices(len(docs), recipe.bootstrap, recipe.seed)
        full_label = full[full.task == task].setting.iloc[0] if len(full[full.task == task]) else None
        for i in metrics.index[metrics.task == task]:
            r = metrics.loc[i]
            if r.metric_key not in st.columns:
                continue
            x = _per_doc(st, r.setting, r[MODE], r.metric_key, docs)
            if x is None or not np.isfinite(x).all() or abs(x.mean() - r.value) > 1e-6:
                continue  # not a mean over documents (perplexity, grouped metrics): no doc-level CI
            metrics.loc[i, ["ci_low", "ci_high"]] = stats.mean_ci(x, idx)
            metrics.loc[i, "n_docs"] = len(docs)
            y = _per_doc(st, full_label, base[task], r.metric_key, docs) if full_label else None
            if y is not None and np.isfinite(y).all():
                metrics.loc[i, ["delta_ci_low", "delta_ci_high"]] = stats.mean_ci(x - y, idx)
    metrics = metrics[COLUMNS].sort_values(["task", MODE, "strategy", "flops_executed_per_token", "params",
                                            "metric_key"], kind="stable").reset_index(drop=True)
    metrics = param_columns(metrics)
    exits = []
    for s, mode, rec in records:  # records count steps from 0; exits.csv from 1, as steps_used does
        for e in rec.get("exits", []):
            exits.append({"task": e["task"], "setting": s.label, "strategy": s.strategy, MODE: mode,
                          "exit_step": int(e["step"]) + 1, "count": int(e["count"])})
    exits = pd.DataFrame(exits, columns=["task", "setting", "strategy", MODE, "exit_step", "count"])
    exits = exits.sort_values(["task", MODE, "setting", "exit_step"], kind="stable").reset_index(drop=True)
    if len(samples):
        samples = samples.sort_values(["task", MODE, "setting", "doc_id"], kind="stable")
        samples = samples.reset_index(drop=True)
    return metrics, samples, exits


def compose_selects(settings, records, frames):
    """Select rules (the oracle) composed from the fixed-step runs, per task in its base
    mode (replay where a trace exists, else live): the rule sees `doc_correct` (R, D) from
    the fixed steps' per-document primary metric and picks a step per document; that
    document then gets the fixed-step run's lm-eval results and real compute at that step.
    Returns (records, frames) to add to the sweep's."""
    import pandas as pd

    fixed: dict = {}  # (task, mode) -> {step: (samples of the task, its metric rows)}
    for (s, mode, rec), fr in zip(records, frames, strict=True):
        if s.strategy == "fixed":
            for task, d in fr.groupby("task"):
                rows = [m for m in rec["metrics"] if m["task"] == task]
                fixed.setdefault((task, mode), {})[s.params["step"]] = (d, rows)
    base = {t: "replay" if (t, "replay") in fixed else "live" for t, _ in fixed}
    out_records, out_frames = [], []
    for s in (x for x in settings if x.kind == "select"):
        for mode in ("replay", "live"):
            recs, parts, exits = [], [], []
            for (task, m), by_step in sorted(fixed.items()):
                done = _compose_task(s.obj, by_step) if m == mode == base[task] else None
                if done is not None:
                    parts.append(done[0])
                    recs += done[1]
                    exits += [{"task": task, **e} for e in done[2]]
            if recs:
                out_records.append((s, mode, {"metrics": recs, "exits": exits}))
                out_frames.append(tag_samples(pd.concat(parts, ignore_index=True), s, mode))
    return out_records, out_frames


def _compose_task(rule, by_step):
    """One task: (per-document samples, metric rows, exit counts), or None where the task's
    primary metric is lower-is-better (no per-document "correct")."""
    import numpy as np
    import pandas as pd
    import torch

    from ouro_lab.stats import LOWER_IS_BETTER, primary_metric
    from ouro_lab.strategy import Signals, replay

    R = max(by_step)
    full = by_step[R][0]
    first = sorted(full["filter"].unique(), key=lambda f: (f != "none", f))[0]
    names = [c for c in full.columns if c not in NOT_METRICS | SAMPLE_COMPUTE and full[c].notna().any()]
    primary = primary_metric(names)
    if primary in LOWER_IS_BETTER:
        return None
    docs = np.sort(full.doc_id.unique())
    score = np.stack([by_step[k][0][by_step[k][0]["filter"] == first].set_index("doc_id")[primary]
                      .reindex(docs).to_numpy(float) for k in range(1, R + 1)])
    best = np.where(np.isnan(score), -np.inf, score).max(0)  # a step without a score is not the best
    ok = torch.as_tensor((score >= best) & (best > 0))
    pick = pd.Series(replay(rule, Signals({"doc_correct": ok}, R)).numpy() + 1, index=docs)  # 1-based
    comp = pd.concat([d[d.doc_id.map(pick) == k] for k, (d, _) in sorted(by_step.items())])
    tok = comp[comp["filter"] == first]
    exits = [{"step": k - 1, "count": int(tok.tokens[tok.doc_id.map(pick) == k].sum())}
             for k in range(1, R + 1)]
    comp = comp.drop(columns=["setting", "strategy", "params", MODE])
    return comp, _composed_metrics(comp, full, by_step[R][1]), exits


NOT_METRICS = {"task", "doc_id", "filter", "difficulty", "setting", "strategy", "params", MODE,
               "flops_used"}


def _composed_metrics(comp, full_frame, full_rows) -> list[dict]:
    """Metric rows of a composed setting: each metric that is a mean over documents at full
    depth, averaged over the composed documents; compute per token, token-weighted."""
    import numpy as np

    rows = []
    for fr in full_rows:
        f, col = fr.get("filter", "none"), fr["metric"]
        d, ref = comp[comp["filter"] == f], full_frame[full_frame["filter"] == f]
        if col not in d.columns or not len(d) or not np.isfinite(d[col].to_numpy(float)).all():
            continue
        if abs(float(ref[col].mean()) - float(fr["value"])) > 1e-6:
            continue  # not a mean over documents (corpus-level metrics): no per-document choice
        x, t = d[col].to_numpy(float), d.tokens.to_numpy(float)
        n = max(t.sum(), 1e-300)
        live = {}  # what live runs measure, for the documents as composed
        if "flops_total_per_token" in d.columns and d.flops_total_per_token.notna().all():
            live["flops_total_per_token"] = float((d.flops_total_per_token * t).sum() / n)
        if "seconds" in d.columns and d.seconds.notna().all():
            live["seconds_per_token"] = float(d.seconds.sum() / n)
        rows.append({**live, "task": fr["task"], "metric": col, "filter": f, "value": float(x.mean()),
                     "stderr": float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None,
                     "steps_used_mean": float((d.steps_used * t).sum() / n),
                     "steps_executed_mean": float((d.steps_executed * t).sum() / n),
                     "flops_per_token": float((d.flops_per_token * t).sum() / n),
                     "flops_executed_per_token": float(d.flops_executed.sum() / n)})
    return rows


def _per_doc(st, setting, mode, metric, docs):
    import numpy as np

    d = st[(st.setting == setting) & (st[MODE] == mode)]
    if not len(d) or metric not in d.columns:
        return None
    v = d.groupby("doc_id")[metric].first().reindex(docs)
    return v.to_numpy(dtype=np.float64)
