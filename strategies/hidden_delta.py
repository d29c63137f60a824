"""Exit at the first step (1-based, >= min_step) whose ||h_r - h_r-1|| / ||h_r|| is below eps."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    eps: float = 0.05
    min_step: int = 2  # 1-based
    needs: ClassVar[tuple[str, ...]] = ("hidden_delta",)
    depth_params: ClassVar[tuple[str, ...]] = ("min_step",)

    def __post_init__(self):
        if self.min_step < 1:
            raise ValueError(f"parameter min_step must be >= 1 (1-based), got {self.min_step}")

    def decide(self, s: Signals, r: int) -> Tensor:
        if r + 1 < self.min_step:
            return torch.zeros(s.n, dtype=torch.bool)
        return s.hidden_delta[r] < self.eps
