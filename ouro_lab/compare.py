"""`ouro-lab compare RUN_A RUN_B`: what changed between two runs, and does it matter?

First the differences in configuration (model, dtype, device, KV policy, seeds, tasks,
versions, settings present in one run only), then per task and common setting the
paired difference B - A of the task's main metric over the documents both runs scored,
with its 95% paired-bootstrap interval, flagged where the interval excludes zero.
Settings are ordered by strategy, then by their parameters' numeric values.
"""

from __future__ import annotations

import json

import numpy as np

from ouro_lab import stats
from ouro_lab.report import KEY, MODE, primary_metric, read_run

CONFIG = (("model", ("recipe", "model", "path")), ("model fingerprint", ("model_fingerprint",)),
          ("dtype", ("dtype",)), ("device", ("device",)),
          ("KV policy (live)", ("recipe", "live", "kv_policy")),
          ("max_gen_toks (live)", ("recipe", "live", "max_gen_toks")), ("seed", ("recipe", "seed")),
          ("calibration", ("recipe", "calibration")), ("granularity", ("recipe", "granularity")),
          ("tasks", ("recipe", "tasks", "names")), ("limit", ("recipe", "tasks", "limit")),
          ("sample", ("recipe", "tasks", "sample")),
          ("num_fewshot", ("recipe", "tasks", "num_fewshot")), ("bootstrap", ("recipe", "bootstrap")),
          ("tolerance", ("recipe", "tolerance")), ("git", ("git_sha",)))


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def config_differences(pa: dict, pb: dict) -> list[tuple[str, str, str]]:
    """(what, in A, in B) for every provenance field that differs."""
    out = []
    keys = list(CONFIG) + [(f"version {k}", ("versions", k))
                           for k in dict.fromkeys([*(pa.get("versions") or {}), *(pb.get("versions") or {})])]
    for name, path in keys:
        a, b = _get(pa, path), _get(pb, path)
        if a != b:
            out.append((name, json.dumps(a), json.dumps(b)))
    return out


def param_key(params: str) -> tuple:
    """Sort key of a setting's params JSON: numbers as numbers (0.9 before 0.95 before 0.99)."""
    try:
        p = json.loads(params)
    except (TypeError, ValueError):
        return ((1, str(params)),)
    return tuple((0, k, float(v)) if isinstance(v, int | float) and not isinstance(v, bool)
                 else (1, k, str(v)) for k, v in sorted(p.items()))


def _per_doc(samples, task, setting, mode, metric, selection=None):
    """A setting's per-document values, indexed by the document's place in its file: with
    `tasks.sample`, doc_id i is the file's document `indices[i]` (provenance), so two runs
    that sampled differently are paired on the documents they share, not on doc_id."""
    d = samples[(samples.task == task) & (samples.setting == setting) & (samples[MODE] == mode)]
    if metric not in d.columns:
        return None
    per = d.groupby("doc_id")[metric].first()
    if (selection or {}).get("how") == "sample" and selection.get("indices") is not None:
        idx = selection["indices"]
        per.index = [idx[int(i)] for i in per.index]
    return per


def paired(ra: dict, rb: dict, task: str, metric: str, setting: str, mode: str, resamples: int, seed: int):
    """(B - A mean over common documents, ci_low, ci_high, n, A's mean and B's mean over
    them, A's and B's documents) of one setting, or None."""
    sa, sb = ra["samples"], rb["samples"]
    if sa is None or sb is None:
        return None
    sel = [((r.get("provenance") or {}).get("tasks") or {}).get(task) for r in (ra, rb)]
    a = _per_doc(sa, task, setting, mode, metric, sel[0])
    b = _per_doc(sb, task, setting, mode, metric, sel[1])
    if a is None or b is None:
        return None
    ma, mb = ra["metrics"], rb["metrics"]
    for per_doc, m in ((a, ma), (b, mb)):  # the metric must be the mean of its per-document values
        row = m[(m.task == task) & (m.setting == setting) & (m[MODE] == mode) & (m[KEY] == metric)]
        if not len(row) or not np.isclose(float(per_doc.mean()), float(row.value.iloc[0]), rtol=1e-6,
                                          atol=1e-9):
            return None  # perplexity, bits per byte, grouped metrics: no per-document pairing
    common = a.index.intersection(b.index)
    d = (b.loc[common] - a.loc[common]).to_numpy(np.float64)
    if not d.size or not np.isfinite(d).all():
        return None
    lo, hi = stats.mean_ci(d, stats.bootstrap_indices(d.size, resamples, seed))
    return (float(d.mean()), lo, hi, int(d.size), float(a.loc[common].mean()), float(b.loc[common].mean()),
            len(a), len(b))


def compare(run_a, run_b, resamples: int = 1000, seed: int = 0) -> str:
    """The comparison as markdown: configuration differences, settings in one run only,
    then per task the paired differences of its main metric (flagged with `*`)."""
    ra, rb = read_run(run_a, verify=False), read_run(run_b, verify=False)  # edited copies compare too
    ma, mb = ra["metrics"], rb["metrics"]
    lines = [f"A = {run_a}", f"B = {run_b}", "", "## What differs in configuration", ""]
    diffs = config_differences(ra["provenance"], rb["provenance"])
    lines += (["| field | A | B |", "|---|---|---|"] + [f"| {n} | {a} | {b} |" for n, a, b in diffs]
              if diffs else ["Nothing: same model, dtype, device, KV policy, seeds, tasks and versions."])
    key = ["task", "setting", MODE]
    sa, sb = set(map(tuple, ma[key].drop_duplicates().to_numpy())), set(map(tuple, mb[key].drop_duplicates()
                                                                               .to_numpy()))
    for name, only in (("A", sa - sb), ("B", sb - sa)):
        if only:
            lines += ["", f"Settings only in {name} ({len(only)}): "
                      + ", ".join(f"{t}/{s} ({m})" for t, s, m in sorted(only))]
    flagged, total, body = [], 0, []
    order = list(((ra["provenance"].get("recipe") or {}).get("tasks") or {}).get("names") or [])
    for task in dict.fromkeys(order + list(ma.task) + list(mb.task)):
        if task not in set(mb.task) or task not in set(ma.task):
            continue
        metric = primary_metric(ma, task)
        rows, n_task = _task_rows(ra, rb, task, metric, resamples, seed, flagged)
        total += n_task
        body += ["", f"## {task}: {metric}, B - A per setting", "",
                 "| setting | mode | A | B | B - A | 95% paired CI | docs | A FLOPs/tok | B FLOPs/tok |",
                 "|---|---|---|---|---|---|---|---|---|"] + rows
    lines += ["", f"## Summary: {len(flagged)} of {total} common settings differ (paired 95% interval "
              "excludes zero)" + (": " + ", ".join(flagged) if flagged else "")]
    lines += body
    lines += ["", "`*` the interval excludes zero. A, B and B - A are means over the documents both runs "
              "scored (docs), where the paired interval is; where the metric is not a mean over documents "
              "(perplexity) they are the runs' own figures, unpaired (CI n/a). FLOPs/tok: each run's own. "
              "Differences in points where the metric is a fraction."]
    return "\n".join(lines)


def _task_rows(ra, rb, task, metric, resamples, seed, flagged) -> tuple[list[str], int]:
    ma, mb = ra["metrics"], rb["metrics"]
    a = ma[(ma.task == task) & (ma[KEY] == metric)]
    b = mb[(mb.task == task) & (mb[KEY] == metric)]
    j = a.merge(b, on=["setting", "strategy", "params", MODE], suffixes=("_a", "_b"))
    scale = 100.0 if ((j.value_a.between(0, 1)) & (j.value_b.between(0, 1))).all() else 1.0
    keys = [(s, param_key(p), m) for s, p, m in zip(j.strategy, j.params, j[MODE], strict=True)]
    rows = []
    for i in sorted(range(len(j)), key=keys.__getitem__):
        r = j.iloc[i]
        res = paired(ra, rb, task, metric, r.setting, r[MODE], resamples, seed)
        va, vb = r.value_a, r.value_b
        if res is None:  # no per-document samples: the runs' own figures, unpaired
            ci, n, flag = "n/a", "", ""
        else:  # A, B and B - A on the documents both scored, where the interval is
            d, lo, hi, n, va, vb, na, nb = res
            flag = "*" if (lo > 0 or hi < 0) else ""
            ci = f"[{lo * scale:+.2f}, {hi * scale:+.2f}]"
            n = n if na == nb == n else f"{n} shared (A {na}, B {nb})"
        diff = (vb - va) * scale
        if flag:
            flagged.append(f"{task}/{r.setting} ({r[MODE]}) {diff:+.2f}")
        rows.append(f"| {r.setting} | {r[MODE]} | {va * scale:.2f} | {vb * scale:.2f} | "
                    f"{diff:+.2f}{flag} | {ci} | {n} | {r.flops_executed_per_token_a:,.0f} | "
                    f"{r.flops_executed_per_token_b:,.0f} |")
    return rows, len(j)
