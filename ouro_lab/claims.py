"""Claims checked before they are stated: the warnings a report shows beside the rows
they concern, and the checks of certified (`risk`) settings on held-out documents.

    summary["warnings"] += warnings(run, summary)   # [{task, setting, code, message}]
    summary["tasks"][t]["certified"] = certified(run, t, summary["tasks"][t])

Each warning is a dict {task, setting (a label, or None for the whole task), code,
message}. Codes:

    baseline_broken    full depth scores at or below chance (or zero): no saving against it
                       means anything, so the task's headline is withdrawn
    head_of_file       the documents are the first N of each file (tasks.limit), not a sample
    wide_interval      an interval too wide to support the claim: FLOPs saved may be zero, or
                       the score change may be beyond the tolerance
    replay_live_gap    a claimed setting's live run differs from its replay by more than the
                       tolerance (the live figure is the real one)
    crossfit_gap       the cross-fitted (held-out) choice loses more than the tolerance
    guarantee_missed   a certified setting's held-out loss exceeds its delta
    other_code         stored settings computed by other code (another ouro-lab version or
                       git commit) were reused: the task's rows do not all come from this code

Reads only what the report reads (tables, provenance, the summary).
"""

from __future__ import annotations

import numpy as np

# What replay assumes, in one sentence (the report prints it beside replayed figures).
REPLAY_ASSUMES = ("Replayed figures come from one full-depth pass: every context token is computed at "
                  "full depth and only the scored tokens exit early, so a later token always sees its "
                  "predecessors' deeper steps; a live run (real early exit, every token) is what a "
                  "deployment gets.")


def _w(task, setting, code, message) -> dict:
    return {"task": task, "setting": setting, "code": code, "message": message}


def warnings(run: dict, summary: dict) -> list[dict]:
    """Every warning the run's data supports (see the module doc), task by task."""
    prov, metrics = run["provenance"], run["metrics"]
    info = prov.get("tasks") or {}
    tol = float(summary["tolerance"])
    out = []
    for task, t in summary["tasks"].items():
        sc, sel = t["scale"], info.get(task) or {}
        unit = "points" if sc == 100 else "units"
        chance = sel.get("chance")
        floor = float(chance) if chance is not None else 0.0
        if t["full"] <= floor + 1e-12:
            out.append(_w(task, None, "baseline_broken",
                          f"full depth scores {t['full'] * sc:.1f}, at or below chance ({floor * sc:.1f}): "
                          "savings against it mean nothing, none are claimed; check the model, "
                          "live.kv_policy and the task"))
            t["headline"], t["withdrawn"] = None, "baseline_broken"
        if sel.get("how") == "limit":
            out.append(_w(task, None, "head_of_file",
                          f"the documents are the first {sel['documents']} of {sel['of']} in the file "
                          f"(tasks.limit), not a sample; use tasks.sample: {sel['documents']} for a seeded "
                          "random subset"))
        for r in t["saved"]:
            if r.get("kind") == "select":  # a bound, not a claim
                continue
            if r.get("chosen") and r.get("saved", 0) > 0:  # an in-sample claim made
                out += _claim_warnings(task, t, r, metrics, tol, unit)
            out += _crossfit_warnings(task, t, r, tol, unit)
        other = [o for o in prov.get("other_code") or [] if task in o.get("tasks", [])]
        if other:
            here = _code_words({"ouro_lab": (prov.get("versions") or {}).get("ouro-lab"),
                                "git_sha": prov.get("git_sha")})
            known = [o for o in other if o.get("code")]
            said = []
            if known:
                codes = "; ".join(sorted({_code_words(o["code"]) for o in known}))
                said.append(f"{len(known)} of its stored settings were computed by other code ({codes}) "
                            f"than this run ({here})")
            if len(known) < len(other):
                said.append(f"{len(other) - len(known)} were stored before ouro-lab recorded the code that "
                            "computed them (it may or may not be this run's)")
            dirty = (" (a -dirty tree cannot be told apart from other edits of itself)" if "-dirty" in here
                     else "")
            out.append(_w(task, None, "other_code", "; ".join(said) + f"; they were reused{dirty}: sweep "
                          "into a fresh --out to compute every setting with this code"))
    return out


def _code_words(code: dict) -> str:
    """Which code computed a setting, as words."""
    sha = code.get("git_sha")
    return f"ouro-lab {code.get('ouro_lab')}" + (f" at {sha[:12]}{'-dirty' if sha.endswith('-dirty') else ''}"
                                                  if sha else "")


def _crossfit_warnings(task, t, r, tol, unit) -> list[dict]:
    """The cross-fitted figure (the headline's) checked on its own, whatever the in-sample
    choice: named by the in-sample setting, else by the strategy."""
    sc, name, cf = t["scale"], r.get("chosen") or r["strategy"], r.get("crossfit") or {}
    if not cf.get("saved", 0) > 0:
        return []
    out = []
    if np.isfinite(cf.get("delta", np.nan)) and cf["delta"] * sc < -tol - 1e-9:
        out.append(_w(task, name, "crossfit_gap",
                      f"chosen on other documents, the cheapest setting within tolerance loses "
                      f"{cf['delta'] * sc:+.2f} {unit} on held-out ones: the in-sample choice is optimistic"))
    if np.isfinite(cf.get("ci_low", np.nan)) and cf["ci_low"] <= 0:
        out.append(_w(task, name, "wide_interval", f"the 95% interval of cross-fitted FLOPs saved reaches "
                                                   f"{cf['ci_low'] * 100:.1f}%: it may save nothing"))
    return out


def _claim_warnings(task, t, r, metrics, tol, unit) -> list[dict]:
    sc, name = t["scale"], r["chosen"]
    out = []
    if np.isfinite(r.get("ci_low", np.nan)) and r["ci_low"] <= 0:
        out.append(_w(task, name, "wide_interval", f"the 95% interval of FLOPs saved reaches "
                                                   f"{r['ci_low'] * 100:.1f}%: it may save nothing"))
    row = _row(metrics, task, name, t)
    lo = float(row["delta_ci_low"]) if row is not None and np.isfinite(row["delta_ci_low"]) else np.nan
    if np.isfinite(lo) and lo * sc < -tol - 1e-9:
        out.append(_w(task, name, "wide_interval",
                      f"the 95% interval of its score change reaches {lo * sc:+.2f} {unit}, beyond the "
                      f"{tol:g}-{unit[:-1]} tolerance: {t.get('n_docs') or 'these'} documents cannot show "
                      "it is within tolerance"))
    live = next((x for x in t.get("live") or [] if x["setting"] == name), None)
    if live is not None and abs(live["gap"]) * sc > tol + 1e-9:
        out.append(_w(task, name, "replay_live_gap",
                      f"replayed it scores {live['replay'] * sc:.2f}, run live ({live['kv_policy']} KV) "
                      f"{live['live'] * sc:.2f} ({live['gap'] * sc:+.2f} {unit}): the live figure is what "
                      "real early exit gets"))
    return out


def _row(metrics, task, setting, t):
    from ouro_lab.tables import MODE

    key = "metric_key" if "metric_key" in metrics.columns else "metric"
    m = metrics[(metrics.task == task) & (metrics.setting == setting) & (metrics[key] == t["metric"])
                & (metrics[MODE] == t["mode"])]
    return m.iloc[0] if len(m) else None


def certified(run: dict, task: str, t: dict) -> list[dict]:
    """Per certified setting (a strategy whose fit records `delta` and `alpha`): the
    guarantee as stated, and its held-out check: the share of documents full depth gets
    right and the setting does not, over every held-out fold."""
    from ouro_lab.tables import MODE

    fitted = (run["provenance"].get("fitted") or {})
    samples = run["samples"]
    out = []
    if samples is None or t["metric"] not in samples.columns:
        return out
    s = samples[(samples.task == task) & (samples[MODE] == t["mode"])]
    full = s[s.setting == t.get("full_setting")].groupby("doc_id")[t["metric"]].first()
    for label, recs in fitted.items():
        recs = [r for r in recs if r.get("task") == task and "delta" in r and "alpha" in r]
        d = s[s.setting == label].groupby("doc_id")[t["metric"]].first()
        if not recs or not len(d) or not len(full):
            continue
        loss = float((full.reindex(d.index) - d).clip(0, 1).mean())
        delta, alpha = float(recs[0]["delta"]), float(recs[0]["alpha"])
        out.append({"setting": label, "delta": delta, "alpha": alpha, "held_out_loss": loss,
                    "met": loss <= delta + 1e-12, "calibration_docs": [r.get("docs") for r in recs],
                    "certified_folds": sum(bool(r.get("certified")) for r in recs), "folds": len(recs)})
    return out


def guarantee_warnings(task: str, rows: list[dict], scale: float) -> list[dict]:
    return [_w(task, r["setting"], "guarantee_missed",
               f"held-out accuracy loss {r['held_out_loss'] * scale:.2f} exceeds delta "
               f"{r['delta'] * scale:.2f} "
               f"(the guarantee allows this with probability <= {r['alpha']:g})")
            for r in rows if not r["met"]]
