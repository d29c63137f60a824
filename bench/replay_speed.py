"""How long replaying 100 strategy settings over 100,000 traced tokens (R=4) takes.

    .venv/bin/python bench/replay_speed.py [--tokens 100000] [--repeat 3]

Signals are synthetic (ouro_lab.trace.random_signals) with the shapes and dtypes of a
real trace; the grid mixes threshold, kl, confidence, hidden_delta and random. Prints
the wall time of one full pass (exit steps and LM-head readouts for every setting).
"""

from __future__ import annotations

import argparse
import time

import torch

from ouro_lab.registry import expand_grid
from ouro_lab.strategy import Signals, replay
from ouro_lab.trace import random_signals


def grid() -> list:
    lin = lambda a, b, n: [a + (b - a) * i / (n - 1) for i in range(n)]
    return (expand_grid("threshold", {"q": lin(0.05, 0.99, 25)})
            + expand_grid("kl", {"eps": [10 ** -(i / 4) for i in range(25)]})
            + expand_grid("confidence", {"tau": lin(0.1, 0.99, 25)})
            + expand_grid("hidden_delta", {"eps": lin(0.05, 0.95, 15)})
            + expand_grid("random", {"mean_steps": lin(1.0, 4.0, 10)}))


def run(strategies, s: Signals) -> float:
    t0 = time.perf_counter()
    for st in strategies:
        st.readouts(replay(st, s))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: replay is "
                    "memory-bound and many small ops; more threads mostly add sync)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = Signals(random_signals(args.steps, args.tokens, seed=0), args.steps)
    strategies = grid()
    times = [run(strategies, s) for _ in range(args.repeat)]
    print(f"replay: {len(strategies)} settings x {args.tokens:,} tokens (R={args.steps}): "
          f"{min(times):.3f} s best of {args.repeat} (first {times[0]:.3f} s; "
          f"{torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
