"""Paired statistics for accuracy-versus-compute curves (numpy only).

Every interval is a percentile bootstrap over documents. All settings of one task are
resampled with the *same* document indices (`bootstrap_indices`), so differences
between settings are paired, and a fixed seed makes every number reproducible.

    idx = bootstrap_indices(n_docs, 1000, seed=0)      # (B, n)
    lo, hi = mean_ci(correct, idx)                     # accuracy interval
    lo, hi = mean_ci(correct - correct_full, idx)      # paired difference interval

"Compute saved within tolerance" comes twice: in sample (`compute_saved`: the cheapest
setting chosen and scored on the same documents, optimistic) and cross-fitted
(`compute_saved_crossfit`: chosen on the other folds, scored on each held-out fold, the
folds `doc_folds` gives, the same ones calibrating rules are fitted on). Both use one
FLOPs denominator: saved = 1 - (FLOPs / token of the setting) / (FLOPs / token at full
depth), i.e. 1 - `flops_rel`. Certified thresholds (`strategies/risk.py`) use
`hb_pvalue` and `fixed_sequence` (Learn-then-Test).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# the metric a task's answer is read from, first found; lower-is-better metrics apart
PRIMARY = ("acc", "exact_match", "acc_norm", "f1", "mcc", "bleu")
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def primary_metric(names) -> str:
    """The primary metric among `names` (in order; lm-eval's `metric,filter` keys count as
    their metric): the first of PRIMARY, else the first higher-is-better one, else the first."""
    have = list(dict.fromkeys(names))
    for m in PRIMARY:
        for h in have:
            if h == m or h.startswith(f"{m},"):
                return h
    higher = [m for m in have if m.split(",")[0] not in LOWER_IS_BETTER]
    return (higher or have)[0]


def doc_folds(tasks, doc_ids, folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each document: a seeded hash of (task, doc_id), so a document's fold
    does not depend on which other documents are present."""
    out = np.empty(len(doc_ids), dtype=np.int64)
    for i, (t, d) in enumerate(zip(tasks, doc_ids, strict=True)):
        h = hashlib.blake2b(f"{seed}:{t}:{int(d)}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") % folds
    return out


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


def _per_token(flops: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """FLOPs per token of each setting (S,) or (B, S) under document weights (n,) or (B, n):
    the setting's own FLOPs over its own tokens (generation: each setting's tokens)."""
    return (weights @ flops.T) / np.maximum(weights @ tokens.T, 1e-300)


def _prepare(correct, flops, tokens, full_correct, full_flops, full_tokens):
    correct = np.atleast_2d(np.asarray(correct, np.float64))
    flops = np.atleast_2d(np.asarray(flops, np.float64))
    tokens = np.asarray(tokens, np.float64)
    if full_tokens is None:
        if tokens.ndim != 1:
            raise ValueError("per-setting tokens (S, n) need full_tokens (n,) too")
        full_tokens = tokens
    tokens = np.broadcast_to(tokens, flops.shape)
    return (correct, flops, tokens, np.asarray(full_correct, np.float64)[None],
            np.asarray(full_flops, np.float64)[None], np.asarray(full_tokens, np.float64)[None])


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    counts = np.zeros((idx.shape[0], n))
    np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return counts


def compute_saved(correct: np.ndarray, flops: np.ndarray, tokens: np.ndarray, full_correct: np.ndarray,
                  full_flops: np.ndarray, idx: np.ndarray, tolerance: float = 0.01,
                  alpha: float = 0.05, full_tokens: np.ndarray | None = None) -> dict:
    """Compute one curve saves against full depth at <= `tolerance` accuracy loss, in sample.

    correct, flops: (S, n) per-setting, per-document correctness (0/1 or a score) and
    FLOPs summed over the document's tokens; tokens: (S, n) (or (n,), shared) tokens per
    document; full_*: (n,) the full-depth reference (`full_tokens` default: `tokens`,
    when shared). The point estimate picks the cheapest setting within tolerance of
    full-depth accuracy and reports 1 - flops_rel. The interval repeats the whole
    selection on each paired resample `idx` (B, n), so it includes the uncertainty of
    choosing the setting. Returns a dict with `setting` (index, -1 if none qualifies),
    `saved`, `ci_low`, `ci_high`, `delta` (accuracy difference of the chosen setting)
    and `flops_rel`."""
    correct, flops, tokens, full, fflops, ftok = _prepare(correct, flops, tokens, full_correct,
                                                          full_flops, full_tokens)
    n = correct.shape[1]

    def pick(acc, fl, facc, ffl):
        i = cheapest_within(acc, fl, facc, tolerance)
        return i, (1.0 - fl[i] / ffl) if i >= 0 else 0.0

    w = np.ones(n)
    acc, fl = correct.mean(1), _per_token(flops, tokens, w)
    facc, ffl = full.mean(), float(_per_token(fflops, ftok, w)[0])
    i, saved = pick(acc, fl, facc, ffl)
    out = {"setting": i, "saved": float(saved), "ci_low": float("nan"), "ci_high": float("nan"),
           "delta": float(acc[i] - facc) if i >= 0 else float("nan"),
           "flops_rel": float(fl[i] / ffl) if i >= 0 else float("nan")}
    if idx.shape[0] and n:
        counts = _counts(idx, n)  # (B, n): how often each document is drawn
        b_acc, b_fl = counts @ correct.T / n, _per_token(flops, tokens, counts)
        b_facc, b_ffl = (counts @ full.T)[:, 0] / n, _per_token(fflops, ftok, counts)[:, 0]
        s = np.array([pick(b_acc[b], b_fl[b], b_facc[b], b_ffl[b])[1] for b in range(idx.shape[0])])
        out["ci_low"], out["ci_high"] = float(np.quantile(s, alpha / 2)), float(np.quantile(s, 1 - alpha / 2))
    return out


def compute_saved_crossfit(correct: np.ndarray, flops: np.ndarray, tokens: np.ndarray,
                           full_correct: np.ndarray, full_flops: np.ndarray, fold: np.ndarray,
                           idx: np.ndarray, tolerance: float = 0.01, alpha: float = 0.05,
                           full_tokens: np.ndarray | None = None) -> dict:
    """`compute_saved`, cross-fitted: for each fold k the cheapest setting within tolerance
    is chosen on the documents of the other folds and scored on fold k's; the figures pool
    the held-out folds (every document scored once, by a choice that never saw it). The
    interval repeats both steps on every paired resample `idx` (B, n). `fold` (n,) from
    `doc_folds`. Returns `saved`, `ci_low`, `ci_high`, `delta` (held-out accuracy change),
    `flops_rel`, `chosen` (per fold, the setting index or -1: none qualified, so that
    fold runs at full depth) and `folds`."""
    correct, flops, tokens, full, fflops, ftok = _prepare(correct, flops, tokens, full_correct,
                                                          full_flops, full_tokens)
    fold = np.asarray(fold, np.int64)
    n, K = correct.shape[1], int(fold.max()) + 1 if fold.size else 0

    def estimate(w):  # w (n,) document weights -> (saved, delta, flops_rel, chosen per fold)
        acc_num = flop_num = tok_num = facc_num = 0.0
        chosen = []
        for k in range(K):
            cal, held = w * (fold != k), w * (fold == k)
            if held.sum() == 0:
                chosen.append(-1)
                continue
            ncal = max(cal.sum(), 1e-300)
            i = cheapest_within(correct @ cal / ncal, _per_token(flops, tokens, cal),
                                float(full[0] @ cal / ncal), tolerance) if cal.sum() else -1
            chosen.append(i)
            c, f, t = (correct[i], flops[i], tokens[i]) if i >= 0 else (full[0], fflops[0], ftok[0])
            acc_num += c @ held
            flop_num += f @ held
            tok_num += t @ held
            facc_num += full[0] @ held
        ffl = float(_per_token(fflops, ftok, w)[0])
        rel = flop_num / max(tok_num, 1e-300) / ffl
        return 1.0 - rel, (acc_num - facc_num) / max(w.sum(), 1e-300), rel, chosen

    saved, delta, rel, chosen = estimate(np.ones(n))
    out = {"saved": float(saved), "delta": float(delta), "flops_rel": float(rel), "chosen": chosen,
           "folds": K, "ci_low": float("nan"), "ci_high": float("nan")}
    if idx.shape[0] and n:
        s = np.array([estimate(w)[0] for w in _counts(idx, n)])
        out["ci_low"], out["ci_high"] = float(np.quantile(s, alpha / 2)), float(np.quantile(s, 1 - alpha / 2))
    return out


# --------------------------------------------------------------------------- certified risk


def hb_pvalue(risk_hat: float, n: int, delta: float) -> float:
    """Hoeffding-Bentkus p-value of the null "risk > delta", from the mean `risk_hat` of
    `n` independent losses in [0, 1] (Bates et al. 2021, Learn-then-Test):
    min(exp(-n h(min(risk_hat, delta), delta)), e * P(Binomial(n, delta) <= ceil(n risk_hat)))."""
    if n <= 0 or not 0 < delta < 1:
        return 1.0
    r = min(float(risk_hat), delta)

    def h(a, b):  # KL divergence of Bernoulli(a) from Bernoulli(b), 0 log 0 = 0
        return ((a * math.log(a / b) if a > 0 else 0.0)
                + ((1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0))

    hoeffding = math.exp(-n * h(r, delta))
    k = np.arange(0, min(n, math.ceil(n * float(risk_hat) - 1e-9)) + 1)
    logpmf = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])
              + k * math.log(delta) + (n - k) * math.log1p(-delta))
    bentkus = math.e * float(np.exp(logpmf).sum())
    return min(hoeffding, bentkus, 1.0)


def fixed_sequence(pvalues, alpha: float) -> int:
    """Learn-then-Test by fixed-sequence testing: hypotheses in their given order (most
    cautious first) are rejected while p <= alpha; returns how many were rejected (the
    last rejected is the most aggressive certified one). Controls the family-wise error
    at alpha whatever the order, as long as it is fixed before the data is seen."""
    k = 0
    for p in pvalues:
        if p > alpha:
            break
        k += 1
    return k


def best_at_budgets(points: list[dict], budgets: list[float], key_cost: str = "flops_rel",
                    key_value: str = "value", lower: bool = False) -> list[dict | None]:
    """For each budget, the point with the highest value (`lower`: the lowest) among those
    costing at most the budget (ties: cheaper, then earlier). `points` are dicts; None if
    none fits."""
    sign = -1.0 if lower else 1.0
    out = []
    for b in budgets:
        fit = [p for p in points if np.isfinite(p[key_cost]) and p[key_cost] <= b + 1e-9]
        if not fit:
            out.append(None)
            continue
        out.append(max(enumerate(fit), key=lambda ip: (sign * ip[1][key_value], -ip[1][key_cost], -ip[0]))[1])
    return out
