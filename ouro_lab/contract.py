"""The self-check of a strategy: what `ouro-lab strategies --check` runs on every
strategy it finds, and the test suite on every strategy file.

    check_contract(make_strategy("threshold", {}))   # raises ContractError naming file and setting

It feeds the rule synthetic signals of every name (`synthetic_signals`), fits it if it
calibrates, asks `decide` at every step through the same checked call replay and live
decoding make, and checks causality: changing the steps after r never changes a
decision at steps <= r.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ouro_lab.strategy import (
    ContractError,
    ExitStrategy,
    Signals,
    _raised,
    _what,
    allowed_signals,
    decide_checked,
    fit_checked,
    origin,
    replay,
)


def synthetic_signals(steps: int = 4, n: int = 200, seed: int = 0, doc_size: int = 4) -> Signals:
    """Self-consistent random signals of every name, with attention contexts, a tiny
    model's cost and an `outcome` (a document of `doc_size` consecutive tokens scores the
    share of its targets that are the top-1 at their exit step): what `check_contract`
    feeds a rule."""
    from ouro_lab.flops import ModelCost
    from ouro_lab.trace import random_signals

    data = random_signals(steps, n, seed)
    g = torch.Generator().manual_seed(seed + 7)
    data["doc_correct"] = torch.rand(steps, n, generator=g) < 0.4  # a select rule's per-document view
    ctx = torch.randint(1, 64, (n,), generator=g)
    cost = ModelCost(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=2, head_dim=16, vocab=16,
                     steps=steps)
    doc = torch.arange(n) // doc_size
    hit = data["target_is_argmax"]

    def outcome(exit_step: Tensor) -> Tensor:
        ok = hit.gather(0, exit_step[None])[0].double()
        return torch.zeros(int(doc.max()) + 1, dtype=torch.float64).index_add(0, doc, ok) / doc_size

    return Signals(data, steps, torch.arange(n), doc, seed, ctx, cost, n, outcome)


def check_contract(strategy, steps: int = 4, n: int = 200) -> None:
    """Run `strategy` as replay and live do, on synthetic signals: fit on a calibration
    set (if it calibrates), decide at every step, replay by token and by sequence, count
    readouts, and check causality (changing steps after r never changes a decision at
    steps <= r). Raises ContractError naming the file, the setting and what broke."""
    src, label = origin(strategy)

    def fail(what: str):
        raise ContractError(f"{src}: {label}: {what}")

    if type(strategy).fit is not ExitStrategy.fit:
        fit_checked(strategy, synthetic_signals(steps, 4 * n, seed=99))
    s = synthetic_signals(steps, n, seed=1)
    view = s.only(allowed_signals(strategy))
    first = [decide_checked(strategy, view.upto(r), r) for r in range(steps)]
    e = replay(strategy, s)
    if not (e.dtype == torch.long and e.shape == (n,) and int(e.min()) >= 0 and int(e.max()) < steps):
        fail(f"replay gave exit steps outside [0, {steps})")
    try:
        ro = strategy.readouts(e)
    except Exception as err:
        raise _raised(strategy, "readouts(exit_step)", err) from err
    if not (isinstance(ro, Tensor) and ro.shape == (n,) and int(ro.min()) >= 1 and int(ro.max()) <= steps):
        fail(f"readouts(exit_step) must give (N,) counts in [1, {steps}], got {_what(ro)}")
    for r in range(steps - 1):
        other = synthetic_signals(steps, n, seed=50 + r)._data
        mixed = Signals({k: torch.cat((v[: r + 1], other[k][r + 1:])) for k, v in s._data.items()}, steps,
                        s.index, s.group, s.seed, s.ctx, s.cost, n, draw=s.draw).only(view._allowed)
        for q in range(r + 1):
            if not torch.equal(first[q], decide_checked(strategy, mixed.upto(q), q)):
                fail(f"decide(s, r={q}) changed when steps after {r + 1} changed: a decision may read "
                     "steps 0..r only (keep no state between calls that depends on later steps)")
    group = torch.arange(n) // 10
    sg = Signals(dict(s._data), steps, s.index, group, s.seed, s.ctx, s.cost, n, draw=s.draw)
    es = replay(strategy, sg, granularity="sequence")
    same = torch.zeros(int(group.max()) + 1, dtype=es.dtype).scatter_reduce(0, group, es, "amax",
                                                                             include_self=False)
    if not (torch.equal(same[group], es) and bool((es >= replay(strategy, sg)).all())):
        fail("granularity sequence must give one exit per sequence, never before any of its tokens")
