"""Meet a budget (mean steps or FLOPs per token) with a threshold on one signal, calibrated by fit().

The threshold is the one whose mean cost on the calibration split passed to fit() stays
within the budget; it is then applied unchanged to the split being reported (never
calibrated on it). decide() before fit() raises.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ouro_lab.strategy import DIRECTION, HEAD_SIGNALS, ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    signal: str = "exit_cdf"
    mean_steps: float | None = None  # target mean loop steps per token (1-based); 2.0 if flops is unset
    flops: float | None = None       # or: target mean FLOPs per token (needs Signals.cost and .ctx)
    _threshold: float | None = field(default=None, init=False, repr=False)
    depth_params: ClassVar[tuple[str, ...]] = ("mean_steps",)

    def __post_init__(self):
        if self.signal not in DIRECTION:
            raise ValueError(f"parameter signal must be one of {', '.join(DIRECTION)}, got {self.signal!r}")
        if self.mean_steps is not None and self.flops is not None:
            raise ValueError("set only one of the parameters mean_steps and flops")
        if self.flops is None and self.mean_steps is None:
            self.mean_steps = 2.0
        if self.mean_steps is not None and not self.mean_steps >= 1:
            raise ValueError(f"parameter mean_steps must be >= 1 (1-based), got {self.mean_steps}")
        if self.flops is not None and not self.flops > 0:
            raise ValueError(f"parameter flops must be > 0, got {self.flops}")
        self.needs = (self.signal,)  # what it reads depends on the parameter

    def fit(self, calibration: Signals) -> None:
        """The largest threshold whose mean cost on `calibration` stays within the budget."""
        R, sign = calibration.steps, DIRECTION[self.signal]
        y = sign * getattr(calibration, self.signal).double()       # (R, N), exit when y >= t
        y = torch.nan_to_num(y, nan=-torch.inf)
        m = y[: R - 1].cummax(0).values                              # (R-1, N) exited by step r iff m_r >= t
        n = m.shape[1]
        if n == 0:
            raise ValueError("budget: the calibration split has no tokens")
        if self.flops is None:
            w, base, target = torch.ones(n, dtype=torch.float64), 1.0, float(self.mean_steps)
        else:
            cost, ctx = calibration.cost, calibration.ctx
            if cost is None or ctx is None:
                raise ValueError("budget: a flops target needs Signals built with cost= and ctx= "
                                 "(Trace.to_signals does when the trace records them)")
            w = cost.step_flops(ctx.double())                        # one more step of token i
            head = float(cost.head_flops)
            if self.signal in HEAD_SIGNALS:                          # a readout at every step
                w = w + head
                base = float(w.mean())
            else:
                base = float(w.mean()) + head
            target = float(self.flops)
        # mean cost(t) = base + sum over (r, i) with m_ri < t of w_i / n: nondecreasing in t
        vals, order = m.reshape(-1).sort()
        cw = torch.cat((torch.zeros(1, dtype=torch.float64), (w.repeat(R - 1)[order] / n).cumsum(0)))
        uniq = vals.unique()
        cost_at = base + cw[torch.searchsorted(vals, uniq, side="left")]  # cost(t = uniq_k)
        # a NaN signal (-inf here) passes no threshold in decide(): t = -inf is no candidate
        finite = uniq > -torch.inf
        uniq, cost_at = uniq[finite], cost_at[finite]
        cheapest = float(cost_at[0]) if len(uniq) else base + float(cw[-1])
        if cheapest > target * (1 + 1e-12):
            raise ValueError(f"budget: target {target:g} is below the cheapest possible "
                             f"{cheapest:g} (every token exits at step 1, but one whose signal is NaN)")
        if base + float(cw[-1]) <= target * (1 + 1e-12):
            self._threshold = torch.inf                              # the budget allows full depth
        else:
            k = int(torch.searchsorted(cost_at, torch.tensor([target * (1 + 1e-12)],
                                                              dtype=torch.float64), side="right")) - 1
            self._threshold = float(uniq[k])

    def fitted(self) -> dict:
        return {"threshold": self.threshold} if self._threshold is not None else {}

    @property
    def threshold(self) -> float:
        """The calibrated threshold, in the signal's own units."""
        if self._threshold is None:
            raise RuntimeError("budget: call fit(calibration) before decide(); it never calibrates "
                               "on the data it reports")
        return DIRECTION[self.signal] * self._threshold

    def decide(self, s: Signals, r: int) -> Tensor:
        t = self.threshold
        x = getattr(s, self.signal)[r]
        return x >= t if DIRECTION[self.signal] > 0 else x <= t
