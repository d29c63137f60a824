"""How results are named and drawn everywhere: metric names in words, scores in points,
one colour and marker per strategy, parameter values as labels.

The palette is keyed by strategy *name*, never by order of appearance, so a strategy
has the same colour and marker in every plot of every run (and in the report's tables).
Strategies it does not list get a stable colour from a hash of their name.

    metric_words("exact_match", "strip")   # 'exact match (strip)'
    strategy_style("threshold")            # ('#0072B2', 'o')
    setting_params("kl(eps=0.01,min_step=2)")   # {'eps': '0.01', 'min_step': '2'}
"""

from __future__ import annotations

import zlib

from ouro_lab.stats import LOWER_IS_BETTER  # noqa: F401 (re-exported for plots)

METRIC_WORDS = {
    "acc": "accuracy", "acc_norm": "length-normalised accuracy", "exact_match": "exact match",
    "f1": "F1", "mcc": "Matthews correlation", "bleu": "BLEU", "rouge": "ROUGE", "em": "exact match",
    "perplexity": "perplexity", "word_perplexity": "word perplexity",
    "byte_perplexity": "byte perplexity", "bits_per_byte": "bits per byte",
}

# colour-blind-safe (Okabe-Ito first), one marker each; grey is kept for fixed depth
STYLES = {
    "fixed": ("#555555", "s"),
    "threshold": ("#0072B2", "o"),
    "confidence": ("#E69F00", "^"),
    "kl": ("#009E73", "v"),
    "hidden_delta": ("#CC79A7", "D"),
    "patience": ("#56B4E9", "P"),
    "budget": ("#D55E00", "X"),
    "random": ("#A6761D", "h"),
    "oracle": ("#000000", "*"),
    "risk": ("#7570B3", "<"),
}
_EXTRA_COLORS = ("#1B9E77", "#E7298A", "#66A61E", "#E6AB02", "#17BECF", "#BCBD22", "#8C564B", "#6A3D9A")
_EXTRA_MARKERS = ("o", "^", "v", "D", "P", "X", "<", ">", "p", "d")


def strategy_style(name: str) -> tuple[str, str]:
    """(colour, marker) of a strategy: fixed for the built-ins, hashed from the name otherwise."""
    if name in STYLES:
        return STYLES[name]
    h = zlib.crc32(name.encode())
    return _EXTRA_COLORS[h % len(_EXTRA_COLORS)], _EXTRA_MARKERS[(h // 7) % len(_EXTRA_MARKERS)]


def split_metric(metric: str, filt: str | None = None) -> tuple[str, str]:
    """(metric, filter) from lm-eval's `metric,filter` key or the two apart."""
    if "," in metric:
        metric, filt = metric.split(",", 1)
    return metric, (filt or "none")


def metric_words(metric: str, filt: str | None = None) -> str:
    """A metric as words for axis labels and headlines: 'exact match (strip)'."""
    m, f = split_metric(metric, filt)
    words = METRIC_WORDS.get(m, m.replace("_", " "))
    return words if f in ("none", "") else f"{words} ({f.replace('_', ' ')})"


def is_fraction(values) -> bool:
    """True when every finite value lies in [0, 1]: the score is shown in points (x 100)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(v.size) and bool(((v >= 0) & (v <= 1)).all())


def points_scale(metric: str, values) -> float:
    """100 for a score between 0 and 1 (accuracy, exact match: shown in points), else 1."""
    return 1.0 if split_metric(metric)[0] in LOWER_IS_BETTER or not is_fraction(values) else 100.0


def score_unit(metric: str, scale: float) -> str:
    return "%" if scale == 100 else ""


def setting_params(label: str) -> dict[str, str]:
    """The parameters a setting's label shows: 'kl(eps=0.01,min_step=2)' -> {'eps': '0.01', ...}."""
    if "(" not in label:
        return {}
    inner = label[label.index("(") + 1:label.rindex(")")]
    out = {}
    for part in inner.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def point_labels(labels: list[str]) -> tuple[list[str], str]:
    """Short labels for the points of one strategy's curve and the legend's note on them.
    Only the parameters that vary along the curve label its points; the others go to the
    legend: (['0.01', '0.1'], 'eps; min_step=2')."""
    params = [setting_params(x) for x in labels]
    keys = list(dict.fromkeys(k for p in params for k in p))
    vary = [k for k in keys if len({p.get(k) for p in params}) > 1]
    const = [k for k in keys if k not in vary]
    if not vary:  # a single setting: its values label the point itself
        return [",".join(p[k] for k in const if k in p) for p in params], ", ".join(const)
    names = [",".join(p.get(k, "") for k in vary) for p in params]
    note = ",".join(vary) + "".join(f"; {k}={params[0][k]}" for k in const if k in params[0])
    return names, note


def flops_unit(x: float) -> tuple[float, str]:
    """(divisor, unit) to write FLOPs without an exponent offset: 2.4e9 -> (1e9, 'GFLOP')."""
    for div, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if abs(x) >= div:
            return div, unit
    return 1.0, "FLOP"
