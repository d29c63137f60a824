"""Baseline to beat: exit at random, constant per-step hazard, expected steps = mean_steps.

Deterministic: a pure function of (run seed, seed parameter, request, token position), so
replay and live decoding draw alike, whatever else the run holds.
"""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals

_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_C2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform(index: Tensor, *seeds: int) -> Tensor:
    """A uniform number in [0, 1) per token, a pure function of (seeds, index) (splitmix64)."""
    x = index.long()
    for s in seeds:
        x = x + ((s * _GOLDEN + (1 << 63)) % (1 << 64) - (1 << 63))  # wrapped to int64, as the hash wants
        x = x ^ _srl(x, 30)
        x = x * _C1
        x = x ^ _srl(x, 27)
        x = x * _C2
        x = x ^ _srl(x, 31)
    return _srl(x, 11).double() / float(1 << 53)


def hazard(mean_steps: float, steps: int) -> float:
    """Per-step exit probability h with E[steps] = sum_k (1-h)^k over k < R equal to mean_steps."""
    lo, hi = 0.0, 1.0
    for _ in range(80):  # E[steps] falls from R (h=0) to 1 (h=1)
        h = (lo + hi) / 2
        if sum((1 - h) ** k for k in range(steps)) > mean_steps:
            lo = h
        else:
            hi = h
    return (lo + hi) / 2


@dataclass
class Strategy(ExitStrategy):
    mean_steps: float = 2.0  # expected steps per token, 1 <= mean_steps <= the model's depth
    seed: int = 0  # combined with the run's seed: a grid over seeds gives independent baselines
    needs: ClassVar[tuple[str, ...]] = ()
    depth_params: ClassVar[tuple[str, ...]] = ("mean_steps",)
    _last: tuple = field(default=(), init=False, repr=False, compare=False)  # (key..., h, u)

    def __post_init__(self):
        if not self.mean_steps >= 1:
            raise ValueError(f"parameter mean_steps must be >= 1 (1-based), got {self.mean_steps}")

    def decide(self, s: Signals, r: int) -> Tensor:
        if not 1 <= self.mean_steps <= s.steps:
            raise ValueError(f"parameter mean_steps must be in [1, {s.steps}], got {self.mean_steps}")
        # one uniform per token: exits at the first r with u < P(steps <= r+1). Replay asks
        # step after step with the same index tensor: compute u and h once per pass.
        key = (s.seed, s.steps, self.mean_steps, self.seed)
        if not (self._last and self._last[0] is s.draw and self._last[1] == key):
            self._last = (s.draw, key, hazard(self.mean_steps, s.steps), uniform(s.draw, s.seed, self.seed))
        h, u = self._last[2:]
        return u < 1 - (1 - h) ** (r + 1)
