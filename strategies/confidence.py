"""Exit at the first step whose max_prob (or top-1 minus top-2 margin) is >= tau (CALM softmax response)."""

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    tau: float = 0.9
    signal: Literal["max_prob", "margin"] = "max_prob"
    needs: ClassVar[tuple[str, ...]] = ("max_prob", "margin")

    def __post_init__(self):
        if self.signal not in ("max_prob", "margin"):
            raise ValueError(f"parameter signal must be 'max_prob' or 'margin', got {self.signal!r}")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"parameter tau is a probability: use 0..1, got {self.tau}")

    def decide(self, s: Signals, r: int) -> Tensor:
        return getattr(s, self.signal)[r] >= self.tau
