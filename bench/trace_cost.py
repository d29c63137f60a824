"""The trace pass's work and wall time against lm-eval's own HFLM over the same requests, side by side.

    python bench/trace_cost.py                       # hidden 512, 4 layers x 4 steps, batch 8, 1 thread
    python bench/trace_cost.py --repeats 5 --batch-size 16 --threads 2

Three request sets, as lm-eval builds their token ids:
- mmlu-like: `--subjects` subjects x `--docs` documents; every prompt is a description and
  five shots (first_n from dev, as mmlu samples them: the same for every document of a
  subject) then the question, choices and "Answer:"; four one-token choices A-D;
- hellaswag-like: 0-shot contexts of 30-60 tokens, four endings of 8-30 tokens each;
- demo-mc: lm-eval's own requests of tasks/loop_demo_mc (all 363 documents, ten one-token
  choices) with the demo tokenizer.

Models, random weights, float32, CPU: an Ouro of hidden 512, intermediate 1408, 8 heads,
4 layers x 4 steps, vocab 8192, and a `transformers` LlamaForCausalLM of 16 layers of the
same widths (untied head, SDPA attention): one token costs both the same layer matmuls.

- ours: the trace pass's model work, `ouro_lab.lm._units_forward(signals=True)` (each
  distinct prefix once, every step's signals of every scored token), on the requests as units;
- HFLM: `lm_eval.models.huggingface.HFLM(pretrained=<the Llama>)._loglikelihood_tokens` on
  the same (context, continuation) token ids, at the same batch size (its Collator runs a
  context once for one-token continuations), full logits, log-softmax, greedy check.

Printed per set: (a) tokens run through the model / distinct tokens of the requests' prefix
tree (the work limit; goal <= 1.05), with HFLM's tokens (one sequence per distinct input) and
one sequence per request beside; (b) ours / HFLM wall time, the median over `--repeats`
interleaved runs (goal <= 0.5 on mmlu-like, <= 1.0 on the others), with the spread of the
per-run ratios. The last line is `ratio: X`, the mmlu-like wall-time ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def mmlu_like(rng: random.Random, vocab: int, subjects: int, docs: int) -> list[tuple[list, list]]:
    """(context, continuation) token ids: per subject one description + 5 shots, then each
    document's question; choices are the tokens of ' A'..' D' (ids 5..8)."""
    def text(lo, hi):
        return [rng.randrange(16, vocab) for _ in range(rng.randint(lo, hi))]

    def item(answer=None):  # question, four choices, "Answer:" (+ the answer letter for a shot)
        q = text(30, 90)
        for c in range(4):
            q += [9 + c, 13] + text(3, 12)  # "\nA." ... choice text
        q += [14]  # "\nAnswer:"
        return q + ([5 + answer, 15] if answer is not None else [])

    out = []
    for _ in range(subjects):
        prefix = text(12, 16) + sum((item(rng.randrange(4)) for _ in range(5)), [])
        for _ in range(docs):
            ctx = prefix + item()
            out += [(ctx, [5 + c]) for c in range(4)]
    return out


def hellaswag_like(rng: random.Random, vocab: int, docs: int) -> list[tuple[list, list]]:
    out = []
    for _ in range(docs):
        ctx = [rng.randrange(16, vocab) for _ in range(rng.randint(30, 60))]
        out += [(ctx, [rng.randrange(16, vocab) for _ in range(rng.randint(8, 30))]) for _ in range(4)]
    return out


def demo_mc(limit: int) -> tuple[list[tuple[list, list]], object]:
    """lm-eval's requests of the demo multiple-choice task, tokenized as OuroLM does."""
    from ouro_lab.lm import OuroLM
    from ouro_lab.loading import load_model, load_tokenizer
    from ouro_lab.tasks import TaskSet
    from ouro_lab.tracing import build_units

    demo = ROOT / "ouro_lab" / "builtin" / "loop-demo"
    tok = load_tokenizer(demo)
    lm = OuroLM(model=load_model(demo), tokenizer=tok)
    units = build_units(TaskSet(["loop_demo_mc"], limit=limit or None), lm)
    return [(list(u.ctx), list(u.cont)) for u in units], tok


def prefix_tree_tokens(inputs: list[tuple]) -> int:
    """Distinct prefixes of the input sequences (a dict trie: independent of ouro_lab.prefix)."""
    root: dict = {}
    n = 0
    for s in inputs:
        node = root
        for t in s:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                n += 1
            node = nxt
    return n


def models(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ouro_lab.model import OuroConfig, OuroForCausalLM, init_weights

    H, inter, heads, L, R, V = args.hidden, args.intermediate, args.heads, args.layers, args.steps, args.vocab
    ouro = init_weights(OuroForCausalLM(OuroConfig(
        vocab_size=V, hidden_size=H, intermediate_size=inter, num_hidden_layers=L, num_attention_heads=heads,
        total_ut_steps=R, max_position_embeddings=4096)), std=0.02, seed=0).eval()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=inter, num_hidden_layers=R * L,
        num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=4096, tie_word_embeddings=False,
        attn_implementation="sdpa")).eval()
    return ouro, llama


def hflm(llama, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=llama, tokenizer=tokenizer, batch_size=batch_size, max_length=4096, device="cpu")


def measure(name, requests, ouro, lm, args) -> dict:
    import torch

    from ouro_lab.lm import Unit, _units_forward

    units = [Unit(tuple(c), tuple(x)) for c, x in requests]
    inputs = [tuple(c + x)[:-1] for c, x in requests]
    distinct = prefix_tree_tokens(inputs)
    hf_tokens = sum(len(s) for s in set(inputs))  # HFLM: one sequence per distinct context+cont[:-1]
    per_request = sum(len(s) for s in inputs)
    hf_requests = [(("", ""), c, x) for c, x in requests]
    ours_t, hf_t = [], []
    stats: dict = {}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved: ours, HFLM, ours, HFLM, ...
            t0 = time.perf_counter()
            _units_forward(ouro, units, args.steps, args.batch_size, 4096, signals=True, stats=stats)
            ours_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lm._loglikelihood_tokens(hf_requests, disable_tqdm=True)
            hf_t.append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(ours_t, hf_t, strict=True)]
    work = stats["tokens_run"] / distinct
    wall = statistics.median(ours_t) / statistics.median(hf_t)
    print(f"{name}: {len(requests)} requests; prefix tree {distinct:,} tokens; ours ran "
          f"{stats['tokens_run']:,} in {stats['calls']} calls (work ratio {work:.3f}, goal <= 1.05); "
          f"HFLM runs {hf_tokens:,}; one sequence per request {per_request:,}")
    print(f"{name}: wall ours {statistics.median(ours_t):.2f} s vs HFLM {statistics.median(hf_t):.2f} s "
          f"(medians of {args.repeats}): ratio {wall:.3f} (per run {min(ratios):.3f}-{max(ratios):.3f})")
    return {"work": work, "wall": wall, "ratios": ratios}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--docs", type=int, default=8, help="documents per mmlu-like subject")
    p.add_argument("--hellaswag-docs", type=int, default=16)
    p.add_argument("--demo-docs", type=int, default=0, help="documents of loop_demo_mc (0: all 363)")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    demo, tok = demo_mc(args.demo_docs)
    ouro, llama = models(args)
    lm = hflm(llama, tok, args.batch_size)
    print(f"Ouro hidden {args.hidden}, {args.layers} layers x {args.steps} steps vs Llama "
          f"{args.layers * args.steps} layers; vocab {args.vocab}; batch {args.batch_size}; "
          f"{args.threads} thread(s); float32 CPU")
    sets = {"mmlu-like": mmlu_like(rng, args.vocab, args.subjects, args.docs),
            "hellaswag-like": hellaswag_like(rng, args.vocab, args.hellaswag_docs), "demo-mc": demo}
    out = {name: measure(name, reqs, ouro, lm, args) for name, reqs in sets.items()}
    print(f"ratio: {out['mmlu-like']['wall']:.3f}")
    return out


if __name__ == "__main__":
    main()
