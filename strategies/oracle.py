"""Upper bound, not a rule: exit at the earliest step whose top-1 already is the target (reads the answer).

It bounds what a per-token exit rule can reach when every scored token has one right
answer: greedy generation, perplexity, the gold continuation. On multiple-choice tasks
every choice's continuation is scored as a "target", so the oracle also exits wrong
choices where they look best and can score below full depth: it bounds nothing there.
"""

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
