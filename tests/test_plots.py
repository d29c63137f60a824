"""Figures a reviewer accepts, checked on the drawn matplotlib objects of a real run: one
colour and marker per strategy whatever the order, every point labelled, full-depth line,
tolerance band and chance line, scores in points with metric names in words, relative
FLOPs with absolute FLOPs on the other axis, legends outside the data, captions that say
what the error bars are, PNG at 200 dpi beside SVG and PDF; the trace heatmap's values."""

import json

import numpy as np
import pandas as pd
import pytest
import sweep_helpers
from matplotlib.colors import to_hex

from ouro_lab import labels, plots


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    return sweep_helpers.finished_run(tmp_path_factory.getbasetemp() / "lab")


@pytest.fixture
def drawn(monkeypatch):
    """Keep every figure a plot function draws (it is saved as usual)."""
    figs = []
    save = plots._save

    def keep(fig, path):
        fig.canvas.draw()
        figs.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def _outside(fig, ax):
    """The legend's box does not overlap the axes' box."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # the figure was closed after saving: give it a canvas again
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    leg = ax.get_legend() or fig.legends[0]
    a, b = leg.get_window_extent(r), ax.get_window_extent(r)
    return a.x0 >= b.x1 or a.x1 <= b.x0 or a.y0 >= b.y1 or a.y1 <= b.y0


def _legend_colours(ax) -> dict[str, str]:
    leg = ax.get_legend()
    pairs = zip(leg.get_texts(), leg.legend_handles, strict=True)
    return {t.get_text(): to_hex(h.get_color()) for t, h in pairs if hasattr(h, "get_color")}


def test_palette_is_keyed_by_name():
    names = ["fixed", "threshold", "confidence", "kl", "hidden_delta", "patience", "budget", "random",
             "oracle"]
    styles = [labels.strategy_style(n) for n in names]
    assert len({c for c, _ in styles}) == len(names) and len({m for _, m in styles}) == len(names)
    assert labels.strategy_style("my_rule") == labels.strategy_style("my_rule")  # hashed, not counted
    assert labels.metric_words("exact_match", "strip") == "exact match (strip)"
    assert labels.metric_words("exact_match,strip") == "exact match (strip)"
    assert labels.metric_words("acc") == "accuracy"
    assert labels.point_labels(["kl(eps=0.01,min_step=2)", "kl(eps=0.1,min_step=2)"]) == \
        (["0.01", "0.1"], "eps; min_step=2")
    assert labels.flops_unit(3.2e6) == (1e6, "MFLOP")


def test_accuracy_vs_flops_reads_on_its_own(run1, tmp_path, drawn, monkeypatch):
    monkeypatch.delenv("OURO_LAB_PLOT_FORMATS", raising=False)  # every format, as users get them
    m = pd.read_csv(run1 / "metrics.csv")
    png = plots.accuracy_vs_flops(m, "tiny_mc", "acc", tmp_path / "a.png", tolerance=1.0, chance=0.25)
    fig = drawn[-1]
    ax = fig.axes[0]
    assert ax.get_ylabel() == "accuracy (%)"
    assert ax.get_title().endswith("(replayed from one full-depth trace; hollow: live)")  # live points drawn
    assert ax.get_xlabel() == "FLOPs per token, relative to full depth"
    assert ax.xaxis.get_major_formatter()(0.5, 0) == "50%"
    top = [a for a in fig.axes[0].child_axes if a.get_xlabel()]
    assert top and top[0].get_xlabel().startswith("executed FLOPs per token (")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    rows = m[(m.task == "tiny_mc") & (m.metric == "acc")]
    full = rows[rows.is_full & (rows["run_mode"] == "replay")].value.iloc[0] * 100
    assert "within 1 point of full depth" in legend and f"full depth ({full:.1f})" in legend
    assert "chance (25.0)" in legend and "threshold (q)" in legend and "threshold live (q)" in legend
    assert "oracle: best fixed step per document (reads the answer)" in legend
    ys = {round(line.get_ydata()[0], 6) for line in ax.lines if len(line.get_ydata()) == 2
          and line.get_ydata()[0] == line.get_ydata()[1]}
    assert {round(full, 6), 25.0} <= ys  # the full-depth and chance lines, in points
    # every setting is a labelled point: fixed steps as "step k", others by their parameter value
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == len(rows) and {"step 1", "step 4", "0.3", "0.6", "0.9", "1.5", "2.5"} <= set(texts)
    assert _outside(fig, ax)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "Error bars: 95% paired-bootstrap intervals over 8 documents" in caption
    # colours follow the name: the same whatever order the rows come in
    colours = {k: v for k, v in _legend_colours(ax).items() if k.startswith(("threshold (", "budget ("))}
    assert colours == {"threshold (q)": labels.STYLES["threshold"][0].lower(),
                       "budget (mean_steps)": labels.STYLES["budget"][0].lower()}
    plots.accuracy_vs_flops(m.iloc[::-1], "tiny_mc", "acc", tmp_path / "b.png", chance=0.0)
    plots.accuracy_vs_flops(m[m.run_mode == "replay"], "tiny_mc", "acc", tmp_path / "c.png")
    assert drawn[-1].axes[0].get_title().endswith("(replayed from one full-depth trace)")
    plots.accuracy_vs_flops(m.iloc[::-1], "tiny_mc", "acc", tmp_path / "b.png", chance=0.0)
    assert not any(t.get_text().startswith("chance") for t in drawn[-1].axes[0].get_legend().get_texts())
    again = _legend_colours(drawn[-1].axes[0])
    assert all(again[k] == v for k, v in colours.items())
    from PIL import Image

    assert min(Image.open(png).info["dpi"]) >= 199.9
    svg = png.with_suffix(".svg").read_text()
    assert svg.lstrip().startswith("<?xml") and ">accuracy (%)</text>" in svg  # text stays text
    assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_speculative_settings_are_timed_not_drawn_against_flops(run1, tmp_path, drawn):
    """Full depth's output at 2-4x its FLOPs: on the FLOPs axis they stretched it to 400%
    and squashed every exit rule into its first quarter; the caption says where they are."""
    m = pd.read_csv(run1 / "metrics.csv")
    spec = m[(m.task == "tiny_gen") & (m.strategy == "speculative")]
    assert len(spec) and (spec.flops_rel > 1).all()
    plots.accuracy_vs_flops(m, "tiny_gen", "exact_match,first", tmp_path / "g.png", mode="live")
    ax = drawn[-1].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any(t.startswith("speculative") for t in legend) and "threshold (q)" in legend
    assert ax.get_xlim()[1] < 1.2
    caption = " ".join(t.get_text() for t in drawn[-1].texts)
    assert f"Not drawn: speculative decoding ({spec.setting.nunique()} settings" in caption
    plots.accuracy_vs_seconds(m, "tiny_gen", "exact_match,first", tmp_path / "s.png")
    legend = [t.get_text() for t in drawn[-1].axes[0].get_legend().get_texts()]
    assert any(t.startswith("speculative") for t in legend)


def test_by_difficulty_has_intervals_and_a_legend_off_the_data(run1, tmp_path, drawn):
    s = pd.read_parquet(run1 / "samples.parquet")
    plots.accuracy_by_difficulty(s, "tiny_mc", "acc", ["threshold(q=0.6)"], tmp_path / "d.png", resamples=50)
    fig = drawn[-1]
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 5 and all(c.has_yerr for c in bars)  # four fixed steps and the chosen setting
    assert _outside(fig, ax) and _outside(fig, fig.axes[1])
    assert any("95% bootstrap intervals" in t for t in _texts(fig))


def test_accuracy_vs_seconds(run1, tmp_path, drawn):
    m = pd.read_csv(run1 / "metrics.csv")
    live = m["run_mode"] == "live"
    m.loc[live, "decode_s_per_token"] = np.linspace(1e-3, 2e-3, live.sum())
    assert plots.seconds_column(m) == "decode_s_per_token"
    plots.accuracy_vs_seconds(m, "tiny_gen", "exact_match,first", tmp_path / "s.png")
    ax = drawn[-1].axes[0]
    assert ax.get_xlabel() == "measured milliseconds per token (decode)"
    assert ax.get_ylabel() == "exact match (first) (%)"
    ran = (m.task == "tiny_gen") & live & (m.metric_key == "exact_match,first") & (m["kind"] != "select")
    assert len(ax.texts) == ran.sum() and all(line.get_linewidth() == 0 for line in ax.lines
                                              if len(line.get_xdata()) > 2)  # measured: not joined


def test_trace_heatmap_writes_every_value(tmp_path, drawn, monkeypatch):
    import torch

    from ouro_lab.trace import Trace, random_signals

    sig = random_signals(3, 4, seed=0)
    tr = Trace(sig, torch.zeros(4, dtype=torch.long), torch.arange(4), torch.arange(1, 5),
               {"next_top": [[[5, 0.6], [7, 0.3]], [[7, 0.7], [5, 0.2]], [[7, 0.9], [1, 0.05]]]})
    saved = []
    monkeypatch.setattr(plots.plt, "close", lambda fig: saved.append(fig))
    png = plots.trace_heatmap(tr, ["a", "b", "c", "d"], tmp_path / "t.png",
                              decode=lambda ids: [f"w{i}" for i in ids])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = saved[-1]
    texts = _texts(fig)
    pdf = sig["exit_pdf"]
    assert f"{pdf[2, 3]:.2f}" in texts  # exit pdf values in the cells
    assert f"w{int(sig['argmax'][0, 0])}" in " ".join(texts)  # top-1 predictions by name
    right = fig.axes[-1]
    assert [t.get_text() for t in right.get_xticklabels()] == ["w7", "w1", "w5"]
    assert {"0.90", "0.60", "0.05"} <= {t.get_text() for t in right.texts}
    assert "next token after 'd'" in right.get_title()
    json.dumps(tr.meta)
