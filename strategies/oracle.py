"""Upper bound, not a rule: exit at the earliest step whose top-1 already is the target (reads the answer)."""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    needs: ClassVar[tuple[str, ...]] = ("target_is_argmax",)
    kind: ClassVar[str] = "select"  # it only picks a step; it cannot run live

    def decide(self, s: Signals, r: int) -> Tensor:
        return s.target_is_argmax[r].bool()
