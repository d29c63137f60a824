"""The exit-strategy contract: one small base class and the replay that applies it.

A strategy is one file in a strategies folder defining a dataclass `Strategy` that
subclasses `ExitStrategy`. Its first docstring line states its rule. Its fields are
its parameters (typed, with defaults). It declares the signals it reads in `needs`
and answers one question, vectorized over tokens:

    decide(signals, r) -> (N,) bool   # exit at step r (0-based)?

`signals` holds steps 0..r only, so a decision can never read the future: the same
file drives offline replay over a trace and live, token-by-token decoding.

The contract is enforced identically in replay and live decoding (`decide_checked`,
`fit_checked`): a rule sees only the signals its `needs` declares (reading another is
a `ContractError` naming the file and the signal), `decide` must return an (N,) bool
tensor, and an exception inside `decide` or `fit` becomes one line naming the file and
the setting. `ouro_lab.contract.check_contract` runs a strategy on synthetic signals
over every step (`ouro-lab strategies --check`, and the tests for every strategy file).

    @dataclass
    class Strategy(ExitStrategy):
        '''Exit at the first step whose cumulative exit probability reaches q (Ouro's Q-exit).'''
        q: float = 0.5
        needs: ClassVar[tuple[str, ...]] = ("gate",)

        def decide(self, s: Signals, r: int) -> Tensor:
            return s.exit_cdf[r] >= self.q
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ouro_lab.errors import OuroLabError

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
    "target_logprob": "log-probability of the target token (scoring only: it reads the answer)",
    "target_is_argmax": "the target is the top-1 token (scoring only: it reads the answer)",
}
# Per-document signals (R, D) of kind "select" rules (the oracle): composed from the fixed-step
# runs' lm-eval results after they are scored, never recorded in a trace or run live.
SELECT_SIGNALS: dict[str, str] = {
    "doc_correct": "(select rules only) per document: the fixed-step run at this step scores the document's "
                   "best score, above zero (multiple choice: its lm-eval decision is right)",
}
# Signals that need the LM head's full-vocabulary logits at the step they are read.
HEAD_SIGNALS = frozenset({"argmax", "entropy", "max_prob", "margin", "kl_prev",
                          "target_logprob", "target_is_argmax"})
# The direction in which each thresholdable signal means "ready to exit": +1 exit when the
# signal is at least the threshold, -1 at most (budget and risk fold the sign in).
DIRECTION = {"exit_cdf": 1, "exit_pdf": 1, "gate_logit": 1, "max_prob": 1, "margin": 1,
             "entropy": -1, "kl_prev": -1, "hidden_delta": -1}
# `needs` may use these short names.
ALIASES = {"gate": ("gate_logit", "exit_pdf", "exit_cdf"), "kl": ("kl_prev",),
           "hidden": ("hidden_delta",), "confidence": ("max_prob", "margin"),
           "target": ("target_logprob", "target_is_argmax")}


class ContractError(OuroLabError):
    """A strategy that breaks the contract: one line naming its file and setting."""


class UndeclaredSignal(LookupError):
    """A rule read a signal its `needs` does not declare (not an AttributeError, so
    `getattr(s, name, default)` cannot hide it)."""

    def __init__(self, name: str, allowed):
        super().__init__(name)
        self.name, self.allowed = name, tuple(sorted(allowed))


def expand_needs(needs) -> set[str]:
    out: set[str] = set()
    for n in needs:
        out.update(ALIASES.get(n, (n,)))
    unknown = out - set(SIGNALS) - set(SELECT_SIGNALS)
    if unknown:
        known = sorted({**SIGNALS, **SELECT_SIGNALS})
        raise ValueError(f"unknown signal(s) {sorted(unknown)}; known: {known}")
    return out


# A token's draw key (`Signals.draw`) is request_key * TOKEN_STRIDE + its position in
# the request's input sequence: replay and live decoding draw alike, and a request draws
# the same whatever else the run holds (other tasks, limits, batch sizes).
TOKEN_STRIDE = 1_000_003  # above any position; keys have 43 bits, so no int64 overflow


def request_keys(units) -> list[int]:
    """A stable 43-bit key per request: units (objects with task, doc_id, idx, window, or
    [task, doc_id, idx, window] lists) keyed by what they are; one without a document
    (doc_id < 0) by its place in the list."""
    import hashlib
    import json

    out = []
    for i, u in enumerate(units):
        task, doc, idx, window = (u.task, u.doc_id, u.idx, u.window) if hasattr(u, "doc_id") else u
        what = [task, doc, idx, window] if doc is not None and doc >= 0 else ["#", i]
        digest = hashlib.blake2b(json.dumps(what).encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") >> 21)
    return out


class Signals:
    """Per-step signals for N tokens, steps 0..r (attribute access: `s.exit_cdf[r]`).

    `steps` is the model's full depth R (the last step always exits), `seed` a per-run
    seed for randomized rules, `index` (N,) the tokens' indices in the trace in replay
    (cross-fitting reads which fold each one is in; live decoding passes its draw keys),
    `draw` (N,) their draw keys (stable ids for
    deterministic randomness, the same in replay and live: see TOKEN_STRIDE; default
    `index`), `group` (N,) the sequence each token belongs to.
    Optional, for rules with a FLOPs budget: `ctx` (N,) keys each token attends to and
    `cost` (an `ouro_lab.flops.ModelCost`). `n` gives N even when `data` is empty.
    Calibration sets may carry `outcome`: a function from exit steps (N,) to each
    document's score under the task's own metric, (D,) floats (see `risk`).
    """

    def __init__(self, data: dict[str, Tensor], steps: int, index: Tensor | None = None,
                 group: Tensor | None = None, seed: int = 0, ctx: Tensor | None = None,
                 cost=None, n: int | None = None, outcome=None, draw: Tensor | None = None):
        self._data = data
        self._allowed: frozenset | None = None  # set by only(): the signals a rule may read
        self.steps = steps
        if n is None:
            n = (next(iter(data.values())).shape[1] if data else
                 next(t.shape[0] for t in (index, group, ctx) if t is not None))
        self.index = torch.arange(n) if index is None else index
        self.draw = self.index if draw is None else draw
        self.group = self.index if group is None else group
        self.seed = seed
        self.ctx = ctx
        self.cost = cost
        self.outcome = outcome

    def __getattr__(self, name: str) -> Tensor:
        if name.startswith("__"):
            raise AttributeError(name)
        data = self.__dict__.get("_data", {})
        if name in data:
            return data[name]
        allowed = self.__dict__.get("_allowed")
        if allowed is not None and name not in allowed and (name in SIGNALS or name in SELECT_SIGNALS):
            raise UndeclaredSignal(name, allowed)
        raise AttributeError(f"signal {name!r} not recorded; declare it in `needs` "
                             f"(known: {sorted(SIGNALS)})")

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def only(self, names, outcome: bool = False) -> Signals:
        """The view a rule gets: the signals `names` only (others raise UndeclaredSignal);
        `outcome` only where asked (calibration: decisions never see the answer)."""
        names = frozenset(names)
        out = Signals({k: v for k, v in self._data.items() if k in names}, self.steps, self.index,
                      self.group, self.seed, self.ctx, self.cost, self.n, self.outcome if outcome else None,
                      self.draw)
        out._allowed = names
        return out

    @property
    def n(self) -> int:
        return self.index.shape[0]

    def upto(self, r: int) -> Signals:
        """The view a causal decision at step r may read: steps 0..r."""
        out = Signals({k: v[: r + 1] for k, v in self._data.items()}, self.steps,
                      self.index, self.group, self.seed, self.ctx, self.cost, self.n, self.outcome, self.draw)
        out._allowed = self._allowed
        return out

    def subset(self, rows: Tensor) -> Signals:
        out = Signals({k: v[:, rows] for k, v in self._data.items()}, self.steps,
                      self.index[rows], self.group[rows], self.seed,
                      None if self.ctx is None else self.ctx[rows], self.cost, draw=self.draw[rows])
        out._allowed = self._allowed
        return out


@dataclass
class ExitStrategy:
    """Base of every strategy: subclass it as a dataclass named `Strategy`."""

    needs: ClassVar[tuple[str, ...]] = ("gate",)
    # signals fit() may also read on the calibration split (it may read the answer there:
    # calibration is offline, so these set no compute charge)
    fit_needs: ClassVar[tuple[str, ...]] = ()
    # "select": picks, per document, which fixed-step run to take (an oracle / upper bound),
    # reading SELECT_SIGNALS only; "skip": a real exit rule whose skipped steps need not run.
    kind: ClassVar[str] = "skip"
    # parameters counted in loop steps (1-based): a value past the model's depth is refused
    # before any compute (`ouro-lab validate`), naming the depth
    depth_params: ClassVar[tuple[str, ...]] = ()

    def fit(self, calibration: Signals) -> None:
        """Optional: set internal state from calibration data (never the reported split)."""

    def decide(self, s: Signals, r: int) -> Tensor:  # (N,) bool
        raise NotImplementedError

    def fitted(self) -> dict:
        """What fit() chose, for the record (the sweep stores it per task and fold)."""
        return {}

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def earliest(self) -> int:
        """Optional: the first step (0-based) at which `decide` may stop any token. Live
        decoding runs the steps before it back to back without asking; replay checks the
        promise (a stop before it is a contract error). Default 0: no promise."""
        return 0

    def readouts(self, exit_step: Tensor) -> Tensor:
        """LM-head readouts each token needs (N,): one per checked step for rules that
        read the head, else one (the emitted prediction)."""
        if expand_needs(self.needs) & HEAD_SIGNALS:
            return exit_step + 1
        return torch.ones_like(exit_step)


# --------------------------------------------------------------------------- enforcement


def origin(strategy) -> tuple[str, str]:
    """(the file shown in messages, the setting's label) of a strategy instance;
    wrappers (cross-fitting) name the strategy they wrap (`wrapped`)."""
    import inspect

    from ouro_lab.files import display_path

    base = getattr(strategy, "wrapped", strategy)
    try:
        path = inspect.getsourcefile(type(base)) or ""
    except TypeError:
        path = ""
    name = Path(path).stem if path else type(base).__module__
    params = base.params() if isinstance(base, ExitStrategy) else {}
    label = f"{name}({','.join(f'{k}={v}' for k, v in params.items())})"
    return (display_path(Path(path)) if path else type(base).__module__), label


def allowed_signals(strategy) -> frozenset:
    """The signals `decide` may read: its `needs`, expanded."""
    return frozenset(expand_needs(getattr(strategy, "needs", ())))


def _what(x) -> str:
    if isinstance(x, Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    if isinstance(x, bool):
        return f"a Python bool ({x})"
    return f"{type(x).__module__}.{type(x).__qualname__}".removeprefix("builtins.") + (
        f" of shape {tuple(x.shape)}" if hasattr(x, "shape") else "")


def _raised(strategy, call: str, e: BaseException) -> ContractError:
    src, label = origin(strategy)
    if isinstance(e, UndeclaredSignal):
        return ContractError(f"{src}: {label}: {call} read signal {e.name!r}, which needs = "
                             f"{tuple(getattr(strategy, 'needs', ()))} does not declare; add {e.name!r} to "
                             "needs (what a rule reads sets its compute charge)")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
    return ContractError(f"{src}: {label}: {call} raised {type(e).__name__}: {msg} "
                         "(OURO_LAB_DEBUG=1 shows the traceback)")


def decide_checked(strategy, s: Signals, r: int) -> Tensor:
    """`strategy.decide(s, r)` under the contract: `s` restricted to the declared signals
    (callers pass `s.only(allowed_signals(strategy))`), an (N,) bool tensor back, any
    exception one line naming the file and the setting. Replay and live both call this."""
    try:
        d = strategy.decide(s, r)
    except ContractError:
        raise
    except Exception as e:  # any failure of user code: one line, the cause chained
        raise _raised(strategy, f"decide(s, r={r})", e) from e
    if not (isinstance(d, Tensor) and d.dtype == torch.bool and d.shape == (s.n,)):
        src, label = origin(strategy)
        raise ContractError(f"{src}: {label}: decide(s, r={r}) must return an (N,) bool tensor "
                            f"(N = {s.n}), got {_what(d)}; e.g. `return s.exit_cdf[r] >= self.q`")
    first = earliest(strategy)
    if r < first and bool(d.any()):
        src, label = origin(strategy)
        raise ContractError(f"{src}: {label}: decide(s, r={r}) stopped tokens before step {first}, the "
                            f"earliest() it promises (live decoding would not ask); lower earliest()")
    return d


def earliest(strategy) -> int:
    """The strategy's `earliest()` promise (0 when it makes none), as an int >= 0; a failing
    or non-integer `earliest()` is one line naming the file and the setting."""
    fn = getattr(strategy, "earliest", None)
    if not callable(fn):
        return 0
    try:
        e = fn()
    except Exception as err:  # user code: one line, the cause chained
        raise _raised(strategy, "earliest()", err) from err
    if isinstance(e, bool) or not isinstance(e, numbers.Integral):
        src, label = origin(strategy)
        raise ContractError(f"{src}: {label}: earliest() must return an int (a 0-based step), got {_what(e)}")
    return max(int(e), 0)


def fit_checked(strategy, calibration: Signals) -> None:
    """`strategy.fit(calibration)` under the contract: `needs` and `fit_needs` readable,
    any exception one line naming the file and the setting."""
    view = calibration.only(allowed_signals(strategy) | expand_needs(getattr(strategy, "fit_needs", ())),
                            outcome=True)
    try:
        strategy.fit(view)
    except OuroLabError:  # a contract breach, or the calibration's own refusal (one line each)
        raise
    except Exception as e:
        raise _raised(strategy, "fit(calibration)", e) from e


def replay(strategy: ExitStrategy, signals: Signals, granularity: str = "token") -> Tensor:
    """Exit step (N,) int64 in [0, R) of every token: the first step r whose decision
    on steps 0..r is True, else the last step. With `granularity="sequence"` all tokens
    of one `group` exit together, at the first step where all of them would."""
    R = signals.steps
    view = signals.only(allowed_signals(strategy))
    exit_step = torch.full((signals.n,), R - 1, dtype=torch.long)
    undecided = torch.ones(signals.n, dtype=torch.bool)
    for r in range(R - 1):
        d = decide_checked(strategy, view.upto(r), r)
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


def signals_markdown() -> str:
    """The README's list of signal names and `needs` aliases, generated from this module."""
    lines = ["| signal | what it is | reads the LM head |", "|---|---|---|"]
    lines += [f"| `{k}` | {v} | {'yes' if k in HEAD_SIGNALS else 'no'} |" for k, v in SIGNALS.items()]
    lines += [f"| `{k}` | {v} | no (composed) |" for k, v in SELECT_SIGNALS.items()]
    lines += ["", "Aliases in `needs`: " + "; ".join(
        f"`{a}` = {', '.join(f'`{x}`' for x in v)}" for a, v in ALIASES.items()) + "."]
    return "\n".join(lines)
