"""Paired statistics for accuracy-versus-compute curves (numpy only).

Every interval is a percentile bootstrap over documents. All settings of one task are
resampled with the *same* document indices (`bootstrap_indices`), so differences
between settings are paired, and a fixed seed makes every number reproducible.

    idx = bootstrap_indices(n_docs, 1000, seed=0)      # (B, n)
    lo, hi = mean_ci(correct, idx)                     # accuracy interval
    lo, hi = mean_ci(correct - correct_full, idx)      # paired difference interval
"""

from __future__ import annotations

import numpy as np


def bootstrap_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(B, n) document indices drawn with replacement; deterministic in (n, B, seed)."""
    rng = np.random.default_rng(seed)
    if n == 0 or resamples == 0:
        return np.zeros((0, n), dtype=np.int64)
    return rng.integers(0, n, size=(resamples, n))


def mean_ci(x, idx: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the mean of `x` (n,) under resampling `idx` (B, n).
    NaN when there are no resamples or no finite values."""
    x = np.asarray(x, dtype=np.float64)
    if idx.shape[0] == 0 or x.size == 0 or not np.isfinite(x).all():
        return float("nan"), float("nan")
    means = x[idx].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def ratio_ci(num, den, idx: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of sum(num) / sum(den) (e.g. FLOPs per token over documents)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if idx.shape[0] == 0 or num.size == 0:
        return float("nan"), float("nan")
    r = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-300)
    return float(np.quantile(r, alpha / 2)), float(np.quantile(r, 1 - alpha / 2))


def pareto_front(cost, value) -> np.ndarray:
    """(n,) bool: points no other point beats (cost <= and value >=, one strictly).
    Ties in both are all kept."""
    cost, value = np.asarray(cost, np.float64), np.asarray(value, np.float64)
    n = cost.size
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = (cost <= cost[i]) & (value >= value[i]) & ((cost < cost[i]) | (value > value[i]))
        keep[i] = not dominated.any()
    return keep


def frontier_curve(cost, value) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto points sorted by cost (value then increases with cost)."""
    cost, value = np.asarray(cost, np.float64), np.asarray(value, np.float64)
    m = pareto_front(cost, value)
    order = np.argsort(cost[m], kind="stable")
    return cost[m][order], value[m][order]


def auc(cost, value) -> tuple[float, float, float]:
    """Normalized area under a curve: the trapezoid integral of value over cost, points
    sorted by cost (mean value at equal cost averaged), divided by the cost span, i.e.
    the mean value over the compute range the curve covers. Returns (auc, lo, hi);
    a single point gives its value and a zero span."""
    cost, value = np.asarray(cost, np.float64), np.asarray(value, np.float64)
    ok = np.isfinite(cost) & np.isfinite(value)
    cost, value = cost[ok], value[ok]
    if cost.size == 0:
        return float("nan"), float("nan"), float("nan")
    xs = np.unique(cost)
    ys = np.array([value[cost == x].mean() for x in xs])
    lo, hi = float(xs[0]), float(xs[-1])
    if xs.size == 1 or hi - lo <= 0:
        return float(ys.mean()), lo, hi
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
    return area / (hi - lo), lo, hi


def auc_common(cost, value, lo: float, hi: float, floor: float = 0.0) -> float:
    """Mean value over one compute range [lo, hi] shared by every curve, so curves that
    cover different ranges compare fairly. The curve is its Pareto points joined linearly
    (mixing two settings per document reaches any point between them), flat after its
    most expensive point (spending less than the budget is allowed) and `floor` below
    its cheapest point (nothing it offers is that cheap). NaN without finite points."""
    cost, value = np.asarray(cost, np.float64), np.asarray(value, np.float64)
    ok = np.isfinite(cost) & np.isfinite(value)
    if not ok.any() or not hi > lo:
        return float("nan")
    xs, ys = frontier_curve(cost[ok], value[ok])
    grid = np.unique(np.clip(np.concatenate([[lo, hi], xs]), lo, hi))
    f = np.interp(grid, xs, ys)  # flat beyond the ends; below the cheapest point see next line
    f = np.where(grid < xs[0], floor, f)
    area = np.sum((grid[1:] - grid[:-1]) * (f[1:] + f[:-1]) / 2)
    # the jump at the cheapest point: the segment just before it lies at the floor, not on a slope
    if lo < xs[0] <= hi:
        j = int(np.searchsorted(grid, xs[0]))
        area -= (grid[j] - grid[j - 1]) * (f[j] - floor) / 2
    return float(area / (hi - lo))


def cheapest_within(acc: np.ndarray, cost: np.ndarray, ref_acc: float, tolerance: float) -> int:
    """Index of the cheapest setting whose accuracy is at least `ref_acc - tolerance`
    (ties: the more accurate, then the first); -1 if none."""
    ok = acc >= ref_acc - tolerance - 1e-12
    if not ok.any():
        return -1
    cand = np.flatnonzero(ok)
    order = np.lexsort((cand, -acc[cand], cost[cand]))
    return int(cand[order[0]])


def compute_saved(correct: np.ndarray, flops: np.ndarray, tokens: np.ndarray, full_correct: np.ndarray,
                  full_flops: np.ndarray, idx: np.ndarray, tolerance: float = 0.01,
                  alpha: float = 0.05) -> dict:
    """Compute one curve saves against full depth at <= `tolerance` accuracy loss.

    correct, flops: (S, n) per-setting, per-document correctness (0/1 or a score) and
    FLOPs summed over the document's tokens; tokens: (n,) scored tokens per document;
    full_*: (n,) the full-depth reference. The point estimate picks the cheapest setting
    within tolerance of full-depth accuracy and reports 1 - its FLOPs / full FLOPs.
    The interval repeats the whole selection on each paired resample `idx` (B, n), so it
    includes the uncertainty of choosing the setting. Returns a dict with `setting`
    (index, -1 if none qualifies), `saved`, `ci_low`, `ci_high`, `delta` (accuracy
    difference of the chosen setting) and `flops_rel`."""
    correct = np.atleast_2d(np.asarray(correct, np.float64))
    flops = np.atleast_2d(np.asarray(flops, np.float64))
    tokens, full_correct = np.asarray(tokens, np.float64), np.asarray(full_correct, np.float64)
    full_flops = np.asarray(full_flops, np.float64)

    def pick(acc, fl, facc, ffl):
        i = cheapest_within(acc, fl, facc, tolerance)
        return i, (1.0 - fl[i] / ffl) if i >= 0 else 0.0

    tok = max(tokens.sum(), 1e-300)
    acc, fl = correct.mean(1), flops.sum(1) / tok
    facc, ffl = full_correct.mean(), full_flops.sum() / tok
    i, saved = pick(acc, fl, facc, ffl)
    out = {"setting": i, "saved": float(saved), "ci_low": float("nan"), "ci_high": float("nan"),
           "delta": float(acc[i] - facc) if i >= 0 else float("nan"),
           "flops_rel": float(fl[i] / ffl) if i >= 0 else float("nan")}
    if idx.shape[0] and correct.shape[1]:
        # (B, S): every setting's accuracy and FLOPs per token on each resample
        counts = np.zeros((idx.shape[0], correct.shape[1]))
        np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1.0)
        b_tok = np.maximum(counts @ tokens, 1e-300)
        b_acc = counts @ correct.T / correct.shape[1]
        b_fl = (counts @ flops.T) / b_tok[:, None]
        b_facc = counts @ full_correct / correct.shape[1]
        b_ffl = (counts @ full_flops) / b_tok
        s = np.array([pick(b_acc[b], b_fl[b], b_facc[b], b_ffl[b])[1] for b in range(idx.shape[0])])
        out["ci_low"], out["ci_high"] = float(np.quantile(s, alpha / 2)), float(np.quantile(s, 1 - alpha / 2))
    return out


def best_at_budgets(points: list[dict], budgets: list[float], key_cost: str = "flops_rel",
                    key_value: str = "value") -> list[dict | None]:
    """For each budget, the point with the highest value among those costing at most
    the budget (ties: cheaper, then earlier). `points` are dicts; None if none fits."""
    out = []
    for b in budgets:
        fit = [p for p in points if np.isfinite(p[key_cost]) and p[key_cost] <= b + 1e-9]
        if not fit:
            out.append(None)
            continue
        out.append(max(enumerate(fit), key=lambda ip: (ip[1][key_value], -ip[1][key_cost], -ip[0]))[1])
    return out
