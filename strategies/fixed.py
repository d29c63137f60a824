"""Exit every token at step k (1-based: step=1 is the first loop step); the static-depth baseline."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    step: int = 4  # 1-based; a step past the model's depth means the last step
    needs: ClassVar[tuple[str, ...]] = ()
    depth_params: ClassVar[tuple[str, ...]] = ("step",)

    def __post_init__(self):
        if self.step < 1:
            raise ValueError(f"parameter step must be >= 1 (1-based), got {self.step}")

    def decide(self, s: Signals, r: int) -> Tensor:
        return torch.full((s.n,), r + 1 >= self.step, dtype=torch.bool)

    def earliest(self) -> int:  # no token stops before step k: live decoding runs them back to back
        return self.step - 1
