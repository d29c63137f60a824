"""Certified threshold: P(accuracy loss vs full depth > delta) <= alpha (Learn-then-Test, HB p-values).

fit() tests a fixed ladder of thresholds on `signal`, most cautious first, on the
calibration documents only (the sweep cross-fits: a document is never scored by a rule
calibrated on it). For each threshold the loss of a document is 1 when full depth gets
it right and the exits do not (its score drop, clipped to [0, 1]: an upper bound on the
accuracy drop), read through `calibration.outcome` with the task's own metric; the
null "expected loss > delta" is rejected when its Hoeffding-Bentkus p-value is <= alpha,
and testing stops at the first threshold it cannot reject (fixed-sequence testing,
family-wise error <= alpha). The most aggressive rejected threshold is used; if none is,
every token runs to full depth (loss 0, the guarantee holds trivially). As CALM
calibrates its confidence thresholds. The guarantee is over calibration draws: with
probability >= 1 - alpha the expected accuracy loss on documents like these is <= delta.
Tasks whose primary metric is not a per-document score in [0, 1] averaged over documents
(perplexities, corpus-level F1 or BLEU) are refused: a loss bound there has no unit.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ouro_lab import stats
from ouro_lab.strategy import DIRECTION, ExitStrategy, Signals

# thresholds tried, from the cautious end: (first, last, log-spaced) in the signal's units
LADDER = {"exit_cdf": (1.0, 0.0, False), "exit_pdf": (1.0, 0.0, False), "max_prob": (1.0, 0.0, False),
          "margin": (1.0, 0.0, False), "gate_logit": (12.0, -12.0, False), "entropy": (1e-4, 10.0, True),
          "kl_prev": (1e-5, 10.0, True), "hidden_delta": (1e-4, 2.0, True)}


@dataclass
class Strategy(ExitStrategy):
    signal: str = "exit_cdf"
    delta: float = 0.05    # accuracy loss allowed versus full depth, a fraction (0.05 = 5 points)
    alpha: float = 0.1     # the guarantee may fail with probability at most alpha
    candidates: int = 50   # thresholds on the ladder
    _threshold: float | None = field(default=None, init=False, repr=False)
    _record: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.signal not in LADDER:
            raise ValueError(f"parameter signal must be one of {', '.join(LADDER)}, got {self.signal!r}")
        if not 0 < self.delta < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"parameters delta and alpha must be in (0, 1), got {self.delta}, {self.alpha}")
        if self.candidates < 1:
            raise ValueError(f"parameter candidates must be >= 1, got {self.candidates}")
        self.needs = (self.signal,)

    def ladder(self) -> list[float]:
        """The thresholds fit() tests, in order, fixed before any data is seen."""
        a, b, log = LADDER[self.signal]
        pts = np.geomspace(a, b, self.candidates) if log else np.linspace(a, b, self.candidates + 1)[1:]
        return [float(x) for x in pts]

    def fit(self, calibration: Signals) -> None:
        if calibration.outcome is None:
            raise ValueError("risk: the calibration split carries no per-document outcome; run it through "
                             "`ouro-lab sweep` (cross-fitted on loglikelihood tasks)")
        R, sign = calibration.steps, DIRECTION[self.signal]
        if R == 1:  # one step: nothing to exit from; the guarantee holds trivially
            self._threshold = math.inf if sign > 0 else -math.inf
            docs = int(calibration.outcome(torch.zeros(calibration.n, dtype=torch.long)).numel())
            self._record = {"threshold": self._threshold, "docs": docs, "certified": False,
                            "calibration_loss": 0.0, "p_value": None, "tested": 0, "delta": self.delta,
                            "alpha": self.alpha}
            return
        x = torch.nan_to_num(sign * getattr(calibration, self.signal)[: R - 1].double(), nan=-math.inf)
        m = x.cummax(0).values  # (R-1, N): exited by step r iff m_r >= sign * t
        full = calibration.outcome(torch.full((calibration.n,), R - 1, dtype=torch.long)).double()
        n = int(full.numel())
        best, tested = None, []
        for t in self.ladder():
            hit = m >= sign * t
            exits = torch.where(hit.any(0), hit.int().argmax(0), R - 1)
            loss = float((full - calibration.outcome(exits).double()).clamp(0, 1).mean())
            p = stats.hb_pvalue(loss, n, self.delta)
            tested.append((t, loss, p))
            if p > self.alpha:
                break
            best = (t, loss, p)
        self._threshold = best[0] if best else (math.inf if sign > 0 else -math.inf)
        self._record = {"threshold": self._threshold, "docs": n, "certified": best is not None,
                        "calibration_loss": best[1] if best else 0.0, "p_value": best[2] if best else None,
                        "tested": len(tested), "delta": self.delta, "alpha": self.alpha}

    def fitted(self) -> dict:
        return dict(self._record)

    def decide(self, s: Signals, r: int) -> Tensor:
        if self._threshold is None:
            raise RuntimeError("risk: call fit(calibration) before decide(); it never calibrates on the data "
                               "it reports")
        x = getattr(s, self.signal)[r]
        return x >= self._threshold if DIRECTION[self.signal] > 0 else x <= self._threshold
