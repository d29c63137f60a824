"""Plots of a sweep, drawn from its tables alone (matplotlib, Agg backend).

    accuracy_vs_flops(metrics, task, metric, path)      # every strategy a curve, CIs, frontier
    accuracy_vs_seconds(metrics, task, metric, path)    # live runs: score vs measured s/token
    exit_histograms(exits, task, settings, path)        # exit-step distribution per setting
    accuracy_by_step(metrics, tasks_metrics, path)      # fixed-depth score per task
    accuracy_by_difficulty(samples, task, metric, settings, path)

`metrics` is metrics.csv as a DataFrame, `samples` samples.parquet, `exits` exits.csv.
Every figure is written as PNG (200 dpi), SVG and PDF beside each other
(`OURO_LAB_PLOT_FORMATS=png` keeps only the PNG the report embeds); the functions return
the PNG's path. Colours and markers come from `ouro_lab.labels` (keyed by
strategy name, the same in every plot of every run), scores are drawn in points like
the tables, every point carries its parameter value, legends sit outside the axes and
the caption under each figure says what the error bars are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from ouro_lab import stats  # noqa: E402
from ouro_lab.files import atomic_path  # noqa: E402
from ouro_lab.labels import (  # noqa: E402
    LOWER_IS_BETTER,
    flops_unit,
    metric_words,
    point_labels,
    points_scale,
    split_metric,
    strategy_style,
)

DPI = 200
FORMATS = ("png", "svg", "pdf")
STYLE = {"figure.dpi": DPI, "savefig.dpi": DPI, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "font.size": 9, "legend.fontsize": 7.5,
         "legend.frameon": False, "svg.hashsalt": "ouro-lab", "svg.fonttype": "none", "pdf.fonttype": 42}
FIXED = "fixed"
MODE, KEY = "run_mode", "metric_key"  # metrics.csv's columns (ouro_lab.tables)
REF = {"full": dict(color="0.2", ls=":", lw=1.1), "chance": dict(color="#B22222", ls="-.", lw=1.0),
       "band": dict(color="0.86", lw=0, zorder=0)}


def formats() -> tuple[str, ...]:
    """The formats written: $OURO_LAB_PLOT_FORMATS (comma list) within png, svg, pdf; the
    PNG always (the report embeds it)."""
    asked = os.environ.get("OURO_LAB_PLOT_FORMATS")
    if not asked:
        return FORMATS
    return ("png",) + tuple(f for f in FORMATS[1:] if f in {x.strip().lower() for x in asked.split(",")})


def _save(fig, path: Path) -> Path:
    """Write `path` (.png) and its .svg and .pdf twins atomically; return the PNG's path."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None, "Producer": None}}
    try:
        box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)  # once, not a draw per format
        for fmt in formats():
            with atomic_path(path.with_suffix(f".{fmt}"), "a plot") as tmp:
                fig.savefig(tmp, format=fmt, bbox_inches=box, metadata=meta[fmt])
    finally:
        plt.close(fig)
    return path


def _caption(fig, text: str) -> None:
    """The figure's caption, under everything already drawn (axes, labels, a legend below)."""
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    w, h = fig.get_size_inches()
    fig.text(box.x0 / w, (box.y0 - 0.06) / h, text, ha="left", va="top", fontsize=7, color="0.3",
             wrap=True)


def _yerr(d, scale: float = 1.0):
    lo = (d.value - d.ci_low).to_numpy(dtype=float) * scale
    hi = (d.ci_high - d.value).to_numpy(dtype=float) * scale
    if not (np.isfinite(lo).any() or np.isfinite(hi).any()):
        return None
    return np.vstack([np.nan_to_num(np.maximum(lo, 0)), np.nan_to_num(np.maximum(hi, 0))])


def _rows(metrics, task: str, metric: str):
    """A task's rows of one metric key ('acc', 'exact_match,strip': ouro_lab.tables)."""
    m = metrics[metrics.task == task]
    return m[m[KEY] == metric]


def _strategies(rows) -> list[str]:
    """Fixed depth first, then the rest in the order they appear."""
    names = list(dict.fromkeys(rows.strategy))
    return sorted(names, key=lambda s: s != FIXED)


def _label_points(ax, points, obstacles, ymax: float | None = None) -> None:
    """Write each point's text beside it: greedily the first of eight places around the
    point that overlaps no earlier label and no marker and stays inside the axes (else
    the least bad one). points: (x, y, text, colour) and obstacles (x, y low, y high), a
    marker with its error bar, in data units."""
    fig = ax.figure
    (y0, y1), (x0, x1) = ax.get_ylim(), ax.get_xlim()
    top = y1 + 0.07 * (y1 - y0)  # headroom: labels of the points at the top fit above them
    ax.set_ylim(y0, top if ymax is None else min(top, ymax))
    ax.set_xlim(x0, x1 + 0.03 * (x1 - x0))
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    inside = ax.get_window_extent(r)
    px = ax.transData.transform
    s = DPI / 72 * 3.0
    blocked = []  # each marker with its error bar: (x, y low, y high) in data units
    for x, lo, hi in obstacles:
        (u, v0), (_, v1) = px([(x, lo), (x, hi)])
        blocked.append(Bbox.from_extents(u - s, min(v0, v1) - s, u + s, max(v0, v1) + s))
    near = [(4, 3, "left", "bottom"), (4, -3, "left", "top"), (-4, 3, "right", "bottom"),
            (-4, -3, "right", "top"), (0, 6, "center", "bottom"), (0, -6, "center", "top"),
            (7, 0, "left", "center"), (-7, 0, "right", "center")]
    places = near + [(f * dx, f * dy, ha, va) for f in (3, 5) for dx, dy, ha, va in near]  # leader lines
    pt = DPI / 72  # pixels per point
    placed: list[Bbox] = []
    for x, y, text, color in points:
        if not text or not (np.isfinite(x) and np.isfinite(y)):
            continue
        probe = ax.text(0, 0, text, fontsize=6)  # measured once; each place is arithmetic
        e = probe.get_window_extent(r)
        probe.remove()
        w, h = e.width, e.height
        u, v = px((x, y))
        best = None
        for dx, dy, ha, va in places:
            left = u + dx * pt - {"left": 0, "center": w / 2, "right": w}[ha]
            bottom = v + dy * pt - {"bottom": 0, "center": h / 2, "top": h}[va]
            bb = Bbox.from_extents(left - 3, bottom - 1, left + w + 3, bottom + h + 1)  # some air around
            far = abs(dx) + abs(dy) > 10
            cost = sum(_overlap(bb, b) for b in placed) + 0.5 * sum(_overlap(bb, b) for b in blocked)
            cost += 10 * (bb.width * bb.height - _overlap(bb, inside)) + (0.01 if far else 0)
            if best is None or cost < best[0]:
                best = (cost, (dx, dy, ha, va, far), bb)
            if cost <= 0.01:
                break
        dx, dy, ha, va, far = best[1]
        leader = dict(arrowstyle="-", lw=0.4, color=color, shrinkA=0, shrinkB=2) if far else None
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=6,
                    color=color, zorder=6, arrowprops=leader)
        placed.append(best[2])


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _reference_lines(ax, full: float | None, tolerance: float | None, chance: float | None,
                     lower_better: bool, unit: str) -> None:
    """Full-depth score, the tolerance band under it and chance, each in the legend."""
    if full is not None and np.isfinite(full):
        if tolerance:
            lo, hi = (full, full + tolerance) if lower_better else (full - tolerance, full)
            ax.axhspan(lo, hi, label=f"within {tolerance:g} {unit} of full depth", **REF["band"])
        ax.axhline(full, label=f"full depth ({full:.1f})", **REF["full"])
    if chance is not None and np.isfinite(chance) and chance > 0:  # exact match's 0 is no line
        ax.axhline(chance, label=f"chance ({chance:.1f})", **REF["chance"])


def _unit(tolerance, scale: float) -> str:
    one = tolerance is not None and float(tolerance) == 1
    return ("point" if one else "points") if scale == 100 else ("unit" if one else "units")


def _legend_outside(ax) -> None:
    h, labels = ax.get_legend_handles_labels()
    if h:
        ax.legend(h, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  handlelength=1.8)


def _score_axis(ax, metric: str, scale: float) -> None:
    ax.set_ylabel(metric_words(metric) + (" (%)" if scale == 100 else ""))
    if scale == 100:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _curve(ax, d, x: str, scale: float, live: bool, points: list, obstacles: list,
           joined: bool = True) -> None:
    """One strategy's settings as a curve (or a lone point; `joined` False: points only),
    its parameter values as labels."""
    s = str(d.strategy.iloc[0])
    color, marker = strategy_style(s)
    d = d.sort_values([x, "value"])
    names, note = point_labels(list(d.setting))
    select = (d["kind"].astype(str) == "select").all()
    label = s + (f" ({note})" if note else "")
    style = dict(color=color, marker=marker, ms=6 if marker == "*" else 4.5, lw=0 if select else 1.2,
                 capsize=2, elinewidth=0.8, zorder=4 if s != FIXED else 3)
    if select:  # an oracle reads the answer: a bound (its star), not a strategy curve
        label = f"{s}: best fixed step per document (reads the answer)"
        style.update(ms=9)
    if live:
        style.update(mfc="white", mew=1.2, ls="--", lw=0.9)
        label = f"{s} live ({note})" if note else f"{s} live"
    if not joined:
        style.update(lw=0)
    xs, ys = d[x].to_numpy(float), d.value.to_numpy(float) * scale
    ax.errorbar(xs, ys, yerr=_yerr(d, scale), label=label, **style)
    if s == FIXED:
        names = [f"step {n}" for n in names]
    elif not any(names):  # a setting without parameters (the oracle): its name
        names = [s] * len(names)
    points += [(a, b, n, color) for a, b, n in zip(xs, ys, names, strict=True)]
    err = _yerr(d, scale)
    lo, hi = (ys, ys) if err is None else (ys - err[0], ys + err[1])
    obstacles += list(zip(xs, lo, hi, strict=True))


def accuracy_vs_flops(metrics, task: str, metric: str, path: Path, mode: str = "replay",
                      tolerance: float | None = 1.0, chance: float | None = None,
                      note: str = "") -> Path:
    """Score (points, with bootstrap CIs) against FLOPs per token relative to full depth
    (absolute FLOPs on the top axis) for one task: fixed steps in grey, every other
    strategy a curve through its settings, live runs hollow, the Pareto frontier dashed,
    the full-depth score, the tolerance band under it and chance (a fraction) if given."""
    m = _rows(metrics, task, metric)
    spec = m[m["kind"].astype(str) == "speculative"]  # full depth's output above its FLOPs: timed instead
    m = m[m["kind"].astype(str) != "speculative"]
    if len(spec):
        lo, hi = float(spec.flops_rel.min()) * 100, float(spec.flops_rel.max()) * 100
        note = (note + " " if note else "") + (
            f"Not drawn: speculative decoding ({spec.setting.nunique()} settings, full depth's output at "
            f"{lo:.0f}-{hi:.0f}% of its FLOPs; see the plot against seconds).")
    base = m[m[MODE] == mode]
    scale = points_scale(metric, m.value)
    lower = split_metric(metric)[0] in LOWER_IS_BETTER
    x = "flops_rel"
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.0, 4.3))
        full = base[base.is_full.astype(bool)]
        fv = float(full.value.iloc[0]) * scale if len(full) else None
        _reference_lines(ax, fv, tolerance, None if chance is None else chance * scale, lower,
                         _unit(tolerance, scale))
        points, obstacles = [], []
        for s in _strategies(base):
            _curve(ax, base[base.strategy == s], x, scale, False, points, obstacles)
        live = m[m[MODE] == "live"] if mode == "replay" else m.iloc[:0]
        for s in _strategies(live):
            _curve(ax, live[live.strategy == s], x, scale, True, points, obstacles)
        bound = base[base["kind"].astype(str) == "select"]
        if len(bound) and fv is not None and float(bound.value.max()) * scale > fv + 0.05:
            ax.axhline(float(bound.value.max()) * scale, color=strategy_style(str(bound.strategy.iloc[0]))[0],
                       ls=(0, (1, 3)), lw=1.0, zorder=1)  # above full depth: no rule can score more
        real = base[base["kind"].astype(str) != "select"]
        if len(real):
            fx, fy = stats.frontier_curve(real[x].to_numpy(), real.value.to_numpy() * scale)
            ax.step(fx, fy, where="post", color="k", ls="--", lw=0.8, alpha=0.6, label="Pareto frontier",
                    zorder=2)
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        ax.set_xlabel("FLOPs per token, relative to full depth")
        if len(full) and float(full.flops_executed_per_token.iloc[0]) > 0:
            f = float(full.flops_executed_per_token.iloc[0])
            div, unit = flops_unit(f)
            top = ax.secondary_xaxis("top", functions=(lambda v: v * f / div, lambda v: v * div / f))
            top.set_xlabel(f"executed FLOPs per token ({unit})", fontsize=8)
            top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        _score_axis(ax, metric, scale)
        how = "replayed from one full-depth trace" if mode == "replay" else "run live, token by token"
        how += "; hollow: live" if mode == "replay" and len(live) else ""
        ax.set_title(f"{task}: {metric_words(metric)} versus compute ({how})", fontsize=9.5)
        _label_points(ax, points, obstacles, ymax=104.9 if scale == 100 else None)
        _legend_outside(ax)
        n = _n_docs(base)
        _caption(fig, "Error bars: 95% paired-bootstrap intervals over " + (f"{n} documents" if n else
                 "documents") + ". Labels: each point's parameter value. "
                 + ("Hollow markers: the same setting run live (real early exit). " if len(live) else "")
                 + (note + " " if note else "")
                 + "Dashed black: Pareto frontier of the achievable settings.")
        return _save(fig, path)


def _n_docs(rows) -> int | None:
    if "n_docs" not in rows.columns:
        return None
    n = rows.n_docs.dropna()
    return int(n.max()) if len(n) else None


SECONDS_COLUMNS = ("decode_s_per_token", "s_per_token", "seconds_per_token")


def seconds_column(metrics) -> str | None:
    """The measured seconds-per-token column of live rows, where a run has one."""
    for c in SECONDS_COLUMNS:
        if c in metrics.columns and metrics[c].notna().any():
            return c
    return None


def accuracy_vs_seconds(metrics, task: str, metric: str, path: Path, tolerance: float | None = 1.0,
                        chance: float | None = None, column: str | None = None) -> Path:
    """Live runs only: score against measured wall-clock seconds per token, one marker per
    setting, not joined (a setting's time is measured, so the order of a grid's settings
    need not be the order of their times), full depth, tolerance band and chance as in
    accuracy_vs_flops. Settings that were not run (the oracle, composed) are left out."""
    m = _rows(metrics, task, metric)
    col = column or seconds_column(m)
    live = m[(m[MODE] == "live") & m[col].notna() & (m["kind"].astype(str) != "select")]
    scale = points_scale(metric, m.value)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.0, 4.3))
        full = live[live.strategy == FIXED].sort_values("flops_executed_per_token").tail(1)
        fv = float(full.value.iloc[0]) * scale if len(full) else None
        _reference_lines(ax, fv, tolerance, None if chance is None else chance * scale,
                         split_metric(metric)[0] in LOWER_IS_BETTER, _unit(tolerance, scale))
        points, obstacles = [], []
        scaled = live.assign(**{col: live[col] * 1e3})
        for s in _strategies(scaled):
            _curve(ax, scaled[scaled.strategy == s], col, scale, False, points, obstacles, joined=False)
        ax.set_xlabel("measured milliseconds per token" + (" (decode)" if col.startswith("decode") else ""))
        _score_axis(ax, metric, scale)
        ax.set_title(f"{task}: {metric_words(metric)} versus measured time (live runs)", fontsize=9.5)
        _label_points(ax, points, obstacles, ymax=104.9 if scale == 100 else None)
        _legend_outside(ax)
        _caption(fig, "Error bars: 95% paired-bootstrap intervals over documents. Time: the wall clock of "
                 "each live run on the run's device divided by its tokens, measured once (no interval; "
                 "noisy on a shared machine).")
        return _save(fig, path)


def exit_histograms(exits, task: str, settings: list[str], path: Path, mode: str | None = None) -> Path:
    """Share of scored tokens exiting at each loop step (`exit_step`, 1-based), one bar
    group per setting that has counts, coloured by its strategy; `mode`: that run mode's."""
    e = exits[(exits.task == task) & exits.setting.isin(settings)]
    if mode is not None and MODE in e.columns:
        e = e[e[MODE] == mode]
    settings = [s for s in settings if s in set(e.setting)]
    steps = sorted(e.exit_step.unique())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.0, 3.4))
        width = 0.8 / max(len(settings), 1)
        seen: dict[str, int] = {}
        for i, s in enumerate(settings):
            strat = s.split("(")[0].split("/")[0]
            color, _ = strategy_style(strat)
            hatch = ["", "//", "..", "xx"][seen.get(strat, 0) % 4]
            seen[strat] = seen.get(strat, 0) + 1
            d = e[e.setting == s].set_index("exit_step")["count"].reindex(steps, fill_value=0)
            share = d / max(d.sum(), 1)
            ax.bar(np.arange(len(steps)) + i * width - 0.4 + width / 2, share.to_numpy() * 100, width,
                   color=color, hatch=hatch, edgecolor="white", lw=0.3, label=s)
        ax.set_xticks(np.arange(len(steps)), [str(int(s)) for s in steps])
        ax.set_xlabel("exit step")
        ax.set_ylabel("share of tokens (%)")
        ax.set_title(f"{task}: where tokens exit", fontsize=9.5)
        _legend_outside(ax)
        _caption(fig, "One bar group per loop step; within it one bar per setting (the setting the report "
                 "chose for each strategy). Counts over every scored token (generated tokens, for a "
                 "generation task); no intervals.")
        return _save(fig, path)


def _task_style(i: int) -> tuple[str, str]:
    return ("#332288", "#117733", "#882255", "#44AA99", "#999933", "#AA4499")[i % 6], "os^Dvp"[i % 6]


def accuracy_by_step(metrics, tasks_metrics: dict[str, tuple[str, str]], path: Path) -> Path:
    """Fixed-depth score at every loop step, one line per task ({task: (metric, mode)})."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.6, 3.6))
        for i, (task, (metric, mode)) in enumerate(tasks_metrics.items()):
            d = _rows(metrics, task, metric)
            d = d[(d.strategy == FIXED) & (d[MODE] == mode)]
            if not len(d):
                continue
            scale = points_scale(metric, d.value)
            steps = d.params.map(lambda p: int(json.loads(p)["step"]))
            d = d.assign(_step=steps).sort_values("_step")
            color, marker = _task_style(i)
            ax.errorbar(d._step, d.value * scale, yerr=_yerr(d, scale), marker=marker, color=color, capsize=2,
                        label=f"{task}: {metric_words(metric)}")
        ax.set_xlabel("loop steps run (fixed depth)")
        ax.set_ylabel("score (%, points)")
        ax.set_title("Score by loop step", fontsize=9.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _legend_outside(ax)
        _caption(fig, "Error bars: 95% paired-bootstrap intervals over documents.")
        return _save(fig, path)


def _by_bucket(d, col: str, key: str, resamples: int, seed: int):
    """Per value of `key`: mean of `col` and its 95% bootstrap interval over documents."""
    out = []
    for k, g in d.groupby(key, sort=True):
        v = g[col].to_numpy(np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        lo, hi = stats.mean_ci(v, stats.bootstrap_indices(v.size, resamples, seed))
        out.append((float(k), float(v.mean()), lo, hi))
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def accuracy_by_difficulty(samples, task: str, metric: str, settings: list[str], path: Path,
                           mode: str = "replay", resamples: int = 1000, seed: int = 0) -> Path:
    """Mean per-document score by the task's `difficulty` (left) and mean steps used
    (right), fixed steps in greys, the chosen setting of each strategy in its colour,
    each point with its 95% bootstrap interval over that difficulty's documents."""
    s = samples[(samples.task == task) & (samples[MODE] == mode)]
    fixed = sorted((n for n in s.setting.unique() if n.startswith(f"{FIXED}(step=")),
                   key=lambda n: int(n.split("=")[1].rstrip(")")))
    adaptive = [n for n in settings if not n.startswith(f"{FIXED}(")]
    scale = points_scale(metric, s[metric])
    names = fixed + adaptive
    dodge = {n: (i - (len(names) - 1) / 2) * min(0.6 / max(len(names), 1), 0.06) for i, n in enumerate(names)}
    with plt.rc_context(STYLE):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.9))
        for i, name in enumerate(names):
            d = s[s.setting == name]
            if name in fixed:
                style = dict(color=str(0.78 - 0.6 * i / max(len(fixed) - 1, 1)), ls="--", marker="s", ms=3,
                             lw=1)
                label = name.replace("fixed(step=", "fixed step ").rstrip(")")
            else:
                color, marker = strategy_style(name.split("(")[0].split("/")[0])
                style, label = dict(color=color, marker=marker, ms=4, lw=1.2), name
            for a, col, sc in ((ax, metric, scale), (ax2, "steps_used", 1.0)):
                if a is ax2 and name in fixed:
                    continue
                b = _by_bucket(d, col, "difficulty", resamples, seed)
                if not len(b):
                    continue
                err = np.vstack([b[:, 1] - b[:, 2], b[:, 3] - b[:, 1]]) * sc
                a.errorbar(b[:, 0] + dodge[name], b[:, 1] * sc, yerr=np.nan_to_num(np.maximum(err, 0)),
                           capsize=1.5, elinewidth=0.7, label=label if a is ax else None, **style)
        ax.set_xlabel("difficulty")
        _score_axis(ax, metric, scale)
        ax.set_title(f"{task}: {metric_words(metric)} by difficulty", fontsize=9.5)
        ax2.set_xlabel("difficulty")
        ax2.set_ylabel("mean loop steps used")
        ax2.set_title("steps used by difficulty", fontsize=9.5)
        for a in (ax, ax2):
            a.xaxis.get_major_locator().set_params(integer=True)
        h, labels = ax.get_legend_handles_labels()
        fig.tight_layout()
        fig.legend(h, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7)
        _caption(fig, "Error bars: 95% bootstrap intervals over the documents of each "
                 "difficulty (points nudged sideways so they do not hide each other). Coloured: the setting "
                 "the report chose for each strategy; grey: fixed depth.")
        return _save(fig, path)


def _cells(ax, values, text, threshold: float = 0.55) -> None:
    """Write `text[r][i]` in every cell of an imshow of `values` (R, n), dark on light."""
    for r in range(values.shape[0]):
        for i in range(values.shape[1]):
            if text[r][i]:
                v = values[r, i]
                ax.text(i, r, text[r][i], ha="center", va="center", fontsize=6.5,
                        color="white" if np.isfinite(v) and v > threshold else "black")


def _short(label: str, n: int = 10) -> str:
    s = repr(label)[1:-1]
    return s if len(s) <= n else s[:n - 1] + "…"


def trace_heatmap(trace, labels: list[str], path: Path, decode=None) -> Path:
    """A traced text over loop steps x tokens, every cell with its value: the exit pdf,
    the top-1 next-token prediction with its probability (`*`: it is the text's next
    token), and the next token's distribution after the text, per step (the answer a
    prompt-only text asks for). `decode(ids) -> labels` names predicted tokens."""
    decode = decode or (lambda ids: [str(i) for i in ids])
    s, R, n = trace.signals, trace.steps, trace.n
    pdf, conf = s["exit_pdf"].numpy(), s["max_prob"].numpy()
    pred = decode(s["argmax"].reshape(-1).tolist())
    hit = s["target_is_argmax"].numpy()
    top = trace.meta.get("next_top") or []
    cand = list(dict.fromkeys(i for step in reversed(top) for i, _ in step))  # last step's order first
    with plt.rc_context({**STYLE, "axes.grid": False}):
        w = max(4.5, 0.62 * n + 1.8)
        fig = plt.figure(figsize=(w + (0.62 * len(cand) + 2.2 if cand else 0), 1.7 * R / 2 + 4.2))
        grid = fig.add_gridspec(2, 2 if cand else 1,
                                width_ratios=[w, 0.62 * len(cand) + 1.2] if cand else None)
        panels = [(fig.add_subplot(grid[0, 0]), pdf, "viridis", "exit probability at each step (exit pdf)",
                   [[f"{pdf[r, i]:.2f}" for i in range(n)] for r in range(R)]),
                  (fig.add_subplot(grid[1, 0]), conf, "Greens",
                   "top-1 next-token prediction and its probability (* = the text's next token)",
                   [[_short(pred[r * n + i], 6) + ("*" if hit[r, i] else "") + f"\n{conf[r, i]:.2f}"
                     for i in range(n)] for r in range(R)])]
        for ax, data, cmap, title, text in panels:
            im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=1, origin="lower",
                           interpolation="nearest")
            _cells(ax, data, text)
            ax.set_yticks(range(R), [str(r + 1) for r in range(R)])
            ax.set_ylabel("loop step")
            ax.set_xticks(range(n), [_short(x) for x in labels], rotation=0 if n <= 12 else 90, fontsize=7)
            ax.set_title(title, fontsize=8.5)
            fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
        if cand:
            ax = fig.add_subplot(grid[:, 1])
            p = np.zeros((R, len(cand)))
            for r, step in enumerate(top):
                for i, v in step:
                    p[r, cand.index(i)] = v
            ax.imshow(p, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            _cells(ax, p, [[f"{p[r, j]:.2f}" if p[r, j] >= 0.005 else "" for j in range(len(cand))]
                           for r in range(R)])
            ax.set_xticks(range(len(cand)), [_short(x, 6) for x in decode(cand)], fontsize=7)
            ax.set_yticks(range(R), [str(r + 1) for r in range(R)])
            ax.set_ylabel("loop step")
            ax.set_title(f"next token after {_short(labels[-1])!r}:\ntop candidates per step", fontsize=8.5)
        fig.tight_layout()
        _caption(fig, "Columns: the text's tokens (left) and the candidates for the token after it (right); "
                 "rows: loop steps. Colour and number: probability.")
        path = Path(path).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path, "a trace heatmap") as tmp:
                fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
        finally:
            plt.close(fig)
        return path
