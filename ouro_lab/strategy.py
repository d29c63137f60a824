"""The exit-strategy contract: one small base class and the replay that applies it.

A strategy is one file in a strategies folder defining a dataclass `Strategy` that
subclasses `ExitStrategy`. Its first docstring line states its rule. Its fields are
its parameters (typed, with defaults). It declares the signals it reads in `needs`
and answers one question, vectorized over tokens:

    decide(signals, r) -> (N,) bool   # exit at step r (0-based)?

`signals` holds steps 0..r only, so a decision can never read the future: the same
file drives offline replay over a trace and live, token-by-token decoding.

    @dataclass
    class Strategy(ExitStrategy):
        '''Exit at the first step whose cumulative exit probability reaches q (Ouro's Q-exit).'''
        q: float = 0.5
        needs: ClassVar[tuple[str, ...]] = ("gate",)

        def decide(self, s: Signals, r: int) -> Tensor:
            return s.exit_cdf[r] >= self.q
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

# Per-step signals a trace records, each (R, N): R loop steps, N scored tokens.
SIGNALS: dict[str, str] = {
    "gate_logit": "raw exit-gate logit",
    "exit_pdf": "Ouro's exit probability of the step",
    "exit_cdf": "cumulative exit probability (last step exactly 1)",
    "hidden_delta": "||h_r - h_{r-1}|| / ||h_r|| (inf at step 0)",
    "argmax": "top-1 token id of the step's prediction",
    "entropy": "entropy of the step's next-token distribution (nats)",
    "max_prob": "probability of the top-1 token",
    "margin": "top-1 minus top-2 probability",
    "kl_prev": "KL(p_r || p_{r-1}) in nats (inf at step 0)",
    "target_logprob": "log-probability of the target token (scoring and oracles only)",
    "target_is_argmax": "the target is the top-1 token (scoring and oracles only)",
}
# Signals that need the LM head's full-vocabulary logits at the step they are read.
HEAD_SIGNALS = frozenset({"argmax", "entropy", "max_prob", "margin", "kl_prev",
                          "target_logprob", "target_is_argmax"})
# `needs` may use these short names.
ALIASES = {"gate": ("gate_logit", "exit_pdf", "exit_cdf"), "kl": ("kl_prev",),
           "hidden": ("hidden_delta",), "confidence": ("max_prob", "margin"),
           "target": ("target_logprob", "target_is_argmax")}


def expand_needs(needs) -> set[str]:
    out: set[str] = set()
    for n in needs:
        out.update(ALIASES.get(n, (n,)))
    unknown = out - set(SIGNALS)
    if unknown:
        raise ValueError(f"unknown signal(s) {sorted(unknown)}; known: {sorted(SIGNALS)}")
    return out


class Signals:
    """Per-step signals for N tokens, steps 0..r (attribute access: `s.exit_cdf[r]`).

    `steps` is the model's full depth R (the last step always exits), `seed` a per-run
    seed for randomized rules, `index` (N,) the tokens' global indices (stable ids for
    deterministic randomness), `group` (N,) the sequence each token belongs to.
    Optional, for rules with a FLOPs budget: `ctx` (N,) keys each token attends to and
    `cost` (an `ouro_lab.flops.ModelCost`). `n` gives N even when `data` is empty.
    """

    def __init__(self, data: dict[str, Tensor], steps: int, index: Tensor | None = None,
                 group: Tensor | None = None, seed: int = 0, ctx: Tensor | None = None,
                 cost=None, n: int | None = None):
        self._data = data
        self.steps = steps
        if n is None:
            n = (next(iter(data.values())).shape[1] if data else
                 next(t.shape[0] for t in (index, group, ctx) if t is not None))
        self.index = torch.arange(n) if index is None else index
        self.group = self.index if group is None else group
        self.seed = seed
        self.ctx = ctx
        self.cost = cost

    def __getattr__(self, name: str) -> Tensor:
        data = self.__dict__.get("_data", {})
        if name in data:
            return data[name]
        raise AttributeError(f"signal {name!r} not recorded; declare it in `needs` "
                             f"(known: {sorted(SIGNALS)})")

    def __contains__(self, name: str) -> bool:
        return name in self._data

    @property
    def n(self) -> int:
        return self.index.shape[0]

    def upto(self, r: int) -> Signals:
        """The view a causal decision at step r may read: steps 0..r."""
        return Signals({k: v[: r + 1] for k, v in self._data.items()}, self.steps,
                       self.index, self.group, self.seed, self.ctx, self.cost, self.n)

    def subset(self, rows: Tensor) -> Signals:
        return Signals({k: v[:, rows] for k, v in self._data.items()}, self.steps,
                       self.index[rows], self.group[rows], self.seed,
                       None if self.ctx is None else self.ctx[rows], self.cost)


@dataclass
class ExitStrategy:
    """Base of every strategy: subclass it as a dataclass named `Strategy`."""

    needs: ClassVar[tuple[str, ...]] = ("gate",)
    # "select": only picks which step's prediction to use (an oracle / upper bound);
    # "skip": a real exit rule whose skipped steps need not run.
    kind: ClassVar[str] = "skip"

    def fit(self, calibration: Signals) -> None:
        """Optional: set internal state from calibration data (never the reported split)."""

    def decide(self, s: Signals, r: int) -> Tensor:  # (N,) bool
        raise NotImplementedError

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def readouts(self, exit_step: Tensor) -> Tensor:
        """LM-head readouts each token needs (N,): one per checked step for rules that
        read the head, else one (the emitted prediction)."""
        if expand_needs(self.needs) & HEAD_SIGNALS:
            return exit_step + 1
        return torch.ones_like(exit_step)


def replay(strategy: ExitStrategy, signals: Signals, granularity: str = "token") -> Tensor:
    """Exit step (N,) int64 in [0, R) of every token: the first step r whose decision
    on steps 0..r is True, else the last step. With `granularity="sequence"` all tokens
    of one `group` exit together, at the first step where all of them would."""
    R = signals.steps
    exit_step = torch.full((signals.n,), R - 1, dtype=torch.long)
    undecided = torch.ones(signals.n, dtype=torch.bool)
    for r in range(R - 1):
        d = strategy.decide(signals.upto(r), r).bool()
        if granularity == "sequence":
            d = _all_in_group(d, signals.group)
        take = d & undecided
        exit_step[take] = r
        undecided &= ~take
        if not undecided.any():
            break
    return exit_step


def _all_in_group(d: Tensor, group: Tensor) -> Tensor:
    _, inv = torch.unique(group, return_inverse=True)
    ok = torch.ones(int(inv.max()) + 1 if inv.numel() else 0, dtype=torch.bool)
    ok.scatter_reduce_(0, inv, d, reduce="amin")
    return ok[inv]
