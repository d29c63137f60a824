"""Exit at the first step (1-based, from min_step on) whose KL(p_r || p_r-1) is below eps."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    eps: float = 0.01
    min_step: int = 2  # 1-based; step 1 has no previous step to compare with
    needs: ClassVar[tuple[str, ...]] = ("kl_prev",)
    depth_params: ClassVar[tuple[str, ...]] = ("min_step",)

    def __post_init__(self):
        if self.min_step < 1:
            raise ValueError(f"parameter min_step must be >= 1 (1-based), got {self.min_step}")

    def decide(self, s: Signals, r: int) -> Tensor:
        if r + 1 < self.min_step:
            return torch.zeros(s.n, dtype=torch.bool)
        return s.kl_prev[r] < self.eps
