"""A bound, not a rule: per document, the earliest step whose lm-eval decision is right, else full depth.

It reads the answer: its per-document view (`doc_correct`) is composed from the fixed-step
runs' lm-eval results, for every kind of task (multiple choice from the trace, generation
from the live fixed-step runs). Each document is charged the real FLOPs of the fixed-step
run it takes, so it scores at least full depth and at least every fixed step, and no rule
that picks one depth per document is cheaper at its score; rules that exit per token can
be (they may take a different step for every token). The plots draw it as a star, not as
a curve.
"""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    needs: ClassVar[tuple[str, ...]] = ("doc_correct",)
    kind: ClassVar[str] = "select"  # composed from the fixed steps; it cannot run live

    def decide(self, s: Signals, r: int) -> Tensor:
        return s.doc_correct[r].bool()
