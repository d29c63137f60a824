"""Memory Ouro-1.4B and Ouro-2.6B need: weights plus the KV cache, per loop-step count and
context length, from `ouro_lab.flops.ModelCost` (nothing is measured; it is arithmetic).

    python bench/memory_table.py                       # bfloat16, batch 1
    python bench/memory_table.py --batch 8 --contexts 2048 4096 --dtype float32

The KV cache holds one (K, V) slot per (loop step, layer): 2 x layers x kv_heads x
head_dim values per token and step, so it grows with the step count. Under `last`
sharing (one slot per layer shared by every step, `kv_policy: last` in live runs) it is
the size of a single step's cache whatever the step count. Activations are left out: a
forward holds every step's normed state (R x tokens x hidden, 64 MiB per 4k-token
sequence at R = 4 in bfloat16) plus one layer's temporaries, small next to the cache at
long contexts; the trace pass projects the LM head in chunks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ouro_lab.flops import OURO_1_4B, OURO_2_6B, ModelCost  # noqa: E402

GiB = 2**30
MODELS = {"Ouro-1.4B": OURO_1_4B, "Ouro-2.6B": OURO_2_6B}


def rows(cost: ModelCost, contexts: list[int], steps: list[int], batch: int = 1, dtype: str = "bfloat16"):
    """(context, weights GiB, {steps: KV GiB}, shared KV GiB, {steps: total GiB}) per context."""
    w = cost.weight_bytes(dtype) / GiB
    for ctx in contexts:
        kv = {r: batch * cost.kv_bytes(ctx, steps=r, dtype=dtype) / GiB for r in steps}
        shared = batch * cost.kv_bytes(ctx, dtype=dtype, shared=True) / GiB
        yield ctx, w, kv, shared, {r: w + kv[r] for r in steps}


def table(contexts: list[int], steps: list[int], batch: int = 1, dtype: str = "bfloat16") -> str:
    head = (["model", "context", "weights"] + [f"KV, {r} step{'s' if r > 1 else ''}" for r in steps]
            + ["KV, `last` shared", f"total at {steps[-1]} steps", "total, `last` shared"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cost in MODELS.items():
        for ctx, w, kv, shared, total in rows(cost, contexts, steps, batch, dtype):
            cells = [name, f"{ctx:,}", f"{w:.2f}"] + [f"{kv[r]:.2f}" for r in steps]
            cells += [f"{shared:.2f}", f"{total[steps[-1]]:.2f}", f"{w + shared:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--batch", type=int, default=1, help="sequences held at once")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args(argv)
    per = {n: c.kv_bytes_per_step(a.dtype) for n, c in MODELS.items()}
    print(f"GiB, {a.dtype}, batch {a.batch}; KV cache per token and step: "
          + ", ".join(f"{n} {b / 1024:.0f} KiB" for n, b in per.items()))
    print()
    print(table(a.contexts, sorted(a.steps), a.batch, a.dtype))


if __name__ == "__main__":
    main()
