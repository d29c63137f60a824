"""Plots of a sweep, drawn from its tables alone (matplotlib, Agg backend, PNG).

    accuracy_vs_flops(metrics, task, metric, path)   # every strategy a curve, CIs, frontier
    exit_histograms(exits, task, settings, path)     # exit-step distribution per setting
    accuracy_by_step(metrics, path)                  # fixed-depth accuracy per task
    accuracy_by_difficulty(samples, task, metric, settings, path)

`metrics` is metrics.csv as a DataFrame, `samples` samples.parquet, `exits` exits.csv.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ouro_lab.files import atomic_path  # noqa: E402
from ouro_lab.stats import frontier_curve  # noqa: E402

STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "font.size": 9, "svg.hashsalt": "ouro-lab"}
FIXED = "fixed"


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, "a plot") as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def _colors(names):
    """tab10 without its grey (grey is for fixed steps)."""
    cmap = plt.get_cmap("tab10")
    palette = [cmap(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def accuracy_vs_flops(metrics, task: str, metric: str, path: Path, mode: str = "replay",
                      x: str = "flops_executed_per_token") -> Path:
    """Accuracy (y, with bootstrap CIs) against executed FLOPs per token (x) for one task:
    fixed steps as labelled points joined by a grey line, every other strategy a curve
    through its settings, live runs as hollow markers, the Pareto frontier dashed."""
    m = metrics[(metrics.task == task) & (metrics.metric == metric)]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        replay = m[m["mode"] == mode]
        strategies = [s for s in dict.fromkeys(replay.strategy) if s != FIXED]
        colors = _colors(strategies)
        fixed = replay[replay.strategy == FIXED].sort_values(x)
        if len(fixed):
            yerr = _yerr(fixed)
            ax.errorbar(fixed[x], fixed.value, yerr=yerr, color="0.35", marker="s", ms=5, lw=1,
                        capsize=2, label="fixed step", zorder=3)
            for _, r in fixed.iterrows():
                ax.annotate(f"step {_step_of(r)}", (r[x], r.value), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color="0.3")
        for s in strategies:
            d = replay[replay.strategy == s].sort_values([x, "value"])
            if (d["kind"] == "select").all():  # an oracle reads the answer: a bound, not a curve
                ax.axhline(d.value.max(), color=colors[s], ls=":", lw=1.2, label=f"{s}: upper bound")
                ax.scatter(d[x], d.value, color=colors[s], marker="*", s=80, zorder=5)
                continue
            ax.errorbar(d[x], d.value, yerr=_yerr(d), color=colors[s], marker="o", ms=4, lw=1.2,
                        capsize=2, label=s, alpha=0.9)
        live = m[m["mode"] == "live"] if mode == "replay" else m.iloc[:0]
        for s, d in live.groupby("strategy", sort=False):
            ax.scatter(d[x], d.value, facecolors="none", edgecolors=[colors.get(s, "k")], marker="D", s=36,
                       label=f"{s} (live)", zorder=4)
        real = replay[replay["kind"] != "select"]  # oracles are upper bounds, not achievable points
        if len(real):
            fx, fy = frontier_curve(real[x].to_numpy(), real.value.to_numpy())
            ax.step(fx, fy, where="post", color="k", ls="--", lw=1, alpha=0.7, label="Pareto frontier")
        ax.set_xlabel("FLOPs per token (executed)")
        full = replay[replay.is_full.astype(bool)][x]
        if len(full) and float(full.iloc[0]) > 0:
            f = float(full.iloc[0])
            top = ax.secondary_xaxis("top", functions=(lambda v: v / f, lambda v: v * f))
            top.set_xlabel("relative to full depth", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric} vs compute ({mode})")
        ax.legend(fontsize=7, loc="lower right", ncol=2 if len(strategies) > 5 else 1)
        return _save(fig, path)


def _yerr(d):
    lo = (d.value - d.ci_low).to_numpy(dtype=float)
    hi = (d.ci_high - d.value).to_numpy(dtype=float)
    if not (np.isfinite(lo).any() or np.isfinite(hi).any()):
        return None
    return np.vstack([np.nan_to_num(np.maximum(lo, 0)), np.nan_to_num(np.maximum(hi, 0))])


def _step_of(row) -> str:
    import json

    try:
        return str(json.loads(row.params).get("step", "?"))
    except (ValueError, AttributeError):
        return "?"


def exit_histograms(exits, task: str, settings: list[str], path: Path) -> Path:
    """Share of scored tokens exiting at each loop step, one bar group per setting."""
    e = exits[(exits.task == task) & exits.setting.isin(settings)]
    steps = sorted(e.step.unique())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        width = 0.8 / max(len(settings), 1)
        colors = _colors(settings)
        for i, s in enumerate(settings):
            d = e[e.setting == s].set_index("step")["count"].reindex(steps, fill_value=0)
            share = d / max(d.sum(), 1)
            ax.bar(np.arange(len(steps)) + i * width - 0.4 + width / 2, share.to_numpy(), width,
                   color=colors[s], label=s)
        ax.set_xticks(np.arange(len(steps)), [str(int(s) + 1) for s in steps])
        ax.set_xlabel("exit step")
        ax.set_ylabel("share of tokens")
        ax.set_title(f"{task}: where tokens exit")
        ax.legend(fontsize=6, ncol=2)
        return _save(fig, path)


def accuracy_by_step(metrics, tasks_metrics: dict[str, tuple[str, str]], path: Path) -> Path:
    """Fixed-depth accuracy at every loop step, one line per task ({task: (metric, mode)})."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for task, (metric, mode) in tasks_metrics.items():
            d = metrics[(metrics.task == task) & (metrics.metric == metric) & (metrics.strategy == FIXED)
                        & (metrics["mode"] == mode)]
            if not len(d):
                continue
            steps = d.params.map(lambda p: int(__import__("json").loads(p)["step"]))
            d = d.assign(_step=steps).sort_values("_step")
            ax.errorbar(d._step, d.value, yerr=_yerr(d), marker="o", capsize=2, label=f"{task} ({metric})")
        ax.set_xlabel("loop step")
        ax.set_ylabel("score at fixed depth")
        ax.set_title("Accuracy by loop step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        return _save(fig, path)


def accuracy_by_difficulty(samples, task: str, metric: str, settings: list[str], path: Path,
                           mode: str = "replay") -> Path:
    """Mean per-document score by the task's `difficulty`, one line per setting, with
    mean steps used on a second axis for the first adaptive setting."""
    s = samples[(samples.task == task) & (samples["mode"] == mode)]
    fixed = sorted((n for n in s.setting.unique() if n.startswith(f"{FIXED}(step=")),
                   key=lambda n: int(n.split("=")[1].rstrip(")")))
    adaptive = [n for n in settings if not n.startswith(f"{FIXED}(")]
    with plt.rc_context(STYLE):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
        colors = _colors(adaptive)
        greys = {n: str(0.75 - 0.6 * i / max(len(fixed) - 1, 1)) for i, n in enumerate(fixed)}
        for name in fixed + adaptive:
            d = s[s.setting == name].groupby("difficulty", sort=True)
            style = dict(color=greys[name], ls="--", marker="s", ms=3) if name in greys else \
                dict(color=colors[name], marker="o", ms=4)
            ax.plot(d[metric].mean().index, d[metric].mean().to_numpy(), label=name, **style)
            if name not in greys:
                ax2.plot(d["steps_used"].mean().index, d["steps_used"].mean().to_numpy(), label=name, **style)
        ax.set_xlabel("difficulty")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric} by difficulty")
        ax2.set_xlabel("difficulty")
        ax2.set_ylabel("mean steps used")
        ax2.set_title("steps used by difficulty")
        ax.legend(fontsize=7)
        return _save(fig, path)
