"""Exit at the first step whose cumulative exit probability reaches q (Ouro's Q-exit)."""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    q: float = 0.5
    needs: ClassVar[tuple[str, ...]] = ("exit_cdf",)

    def __post_init__(self):
        if not 0 <= self.q <= 1:
            raise ValueError(f"parameter q is a probability: use 0..1, got {self.q}")

    def decide(self, s: Signals, r: int) -> Tensor:
        return s.exit_cdf[r] >= self.q
