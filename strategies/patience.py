"""Exit once the top-1 prediction has stayed the same for n consecutive steps (PABEE's patience)."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    n: int = 1  # unchanged transitions: n=1 exits at the first step that agrees with the one before
    needs: ClassVar[tuple[str, ...]] = ("argmax",)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"parameter n must be >= 1, got {self.n}")

    def decide(self, s: Signals, r: int) -> Tensor:
        if r < self.n:
            return torch.zeros(s.n, dtype=torch.bool)
        window = s.argmax[r - self.n: r + 1]  # (n+1, N)
        return (window == window[-1]).all(0)
