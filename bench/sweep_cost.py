"""What a strategy sweep costs next to one plain lm-eval evaluation, measured side by side.

    python bench/sweep_cost.py                      # demo model + loop_demo_mc
    python bench/sweep_cost.py --model ckpt --tasks loop_demo_mc --limit 200 --threads 1

In one process, on the same prebuilt task objects:

1. plain: one full-depth `lm_eval.evaluator.evaluate` of `OuroLM` over the loglikelihood
   tasks (request building, model, metrics: everything lm-eval does);
2. sweep: one trace pass (`trace_pass`, no cache) + `score` for >= 40 strategy settings,
   each scored by lm-eval's own metric code;
3. re-running lm-eval per setting instead: fixed-k settings measured as k-step
   `evaluate` runs; every other setting needs a real early-exit run, measured for a
   few settings with `evaluate_live` and extrapolated to the grid (printed as such). The
   gap between replay and those live runs is printed too;
4. peak memory of the trace pass versus a plain forward + scoring of the same requests (all
   of them, `--mem-batch` rows a call): each in a fresh subprocess, the rise of the
   process's peak RSS (`ru_maxrss`) over its level after loading and a warm-up, one thread
   (CPU: torch keeps no allocator statistics there), with glibc told to serve blocks >= 64
   KiB by mmap and return freed memory at once, so that RSS follows live tensor memory.

The plain side is no straw man: `OuroLM` runs each distinct prefix of the requests once
(`ouro_lab.prefix`), the same plan the trace pass runs; the tokens it runs are printed
beside those lm-eval's own `HFLM` would run on the same requests (one sequence per
distinct context for one-token continuations), and must not exceed them
(`bench/trace_cost.py` times the two side by side).

What each side pays, so the ratio stays fair: both tokenize every request with the same
`OuroLM.encode_request`, render lm-eval's templates once (`evaluate` builds its requests; the
sweep builds them once in its `Scorer`, inside the timed trace pass), and run the same
full-depth forward on the same plan (each distinct prefix once). The plain side then reads the last
step's log-probs and lets lm-eval compute the metrics; the sweep reads every step's signals
(`step_signals`) and, per setting, replays the strategy, sums each request's log-prob at its
tokens' exit steps, and has lm-eval's `process_results` and aggregation compute the metrics,
plus the per-doc samples frame. `process_results` is skipped for a doc only when that doc's
exact responses were already scored earlier in the same sweep (it is a pure function of
them), and a whole setting is reused only when its exit steps equal an earlier one's. The
Scorer is rebuilt for every repeat. Python's cyclic GC is off for both sides alike.

The last line is the cost ratio sweep / plain (target <= 1.15). Without `--model` the demo
checkpoint ouro_lab/builtin/loop-demo is used; if it is missing, a randomly initialised
model of the same shape with the demo tokenizer (timings do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GRID = [("fixed", {"step": [1, 2, 3, 4]}),
        ("threshold", {"q": [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]}),
        ("confidence", {"tau": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]}),
        ("kl", {"eps": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]}),
        ("hidden_delta", {"eps": [0.01, 0.02, 0.05, 0.1, 0.2], "min_step": 1}),
        ("patience", {"n": [1, 2, 3]}),
        ("random", {"mean_steps": [1.5, 2.0, 2.5, 3.0]})]  # the oracle is composed by sweeps, not replayed
LIVE_SAMPLES = [("threshold", {"q": 0.5}), ("kl", {"eps": 0.01})]


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    demo = ROOT / "ouro_lab" / "builtin" / "loop-demo"
    if (demo / "config.json").is_file():
        return demo
    import torch

    from ouro_lab import toy
    from ouro_lab.loading import save_model
    from ouro_lab.model import OuroConfig, OuroForCausalLM, init_weights

    print("(demo checkpoint missing: a random model of the demo's shape stands in)", file=sys.stderr)
    cfg = OuroConfig(vocab_size=len(toy.VOCAB), hidden_size=128, intermediate_size=352,
                     num_hidden_layers=2, num_attention_heads=4, total_ut_steps=4, tie_word_embeddings=True,
                     max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="ouro-bench-")) / "model"
    model = init_weights(OuroForCausalLM(cfg), std=0.1, seed=0)
    return save_model(model, path, tokenizer=toy.build_tokenizer())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def memory_probe(args) -> None:
    """Subprocess: peak-RSS rise of one trace pass or one plain pass over the first batch."""
    import torch

    from ouro_lab.lm import OuroLM, _units_forward
    from ouro_lab.loading import load_model, load_tokenizer
    from ouro_lab.tasks import TaskSet
    from ouro_lab.tracing import build_units

    torch.set_num_threads(1)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    ts = TaskSet(args.tasks.split(","), limit=args.limit)
    units = build_units(ts, OuroLM(model=model, tokenizer=tok))
    R, L = model.config.total_ut_steps, model.config.max_position_embeddings
    with torch.no_grad():
        _units_forward(model, units[:1], R, 1, L, signals=True)  # warm-up: kernels, allocator arenas
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stats: dict = {}
        sig = _units_forward(model, units, R, args.mem_batch, L, signals=args.memory_probe == "trace",
                             stats=stats)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del sig
    print(json.dumps({"rise_kib": peak - base, "batch": [len(units), stats["tokens_run"]]}))


def run_probe(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", which, "--model", str(args.model),
           "--tasks", args.tasks, "--mem-batch", str(args.mem_batch)]
    cmd += ["--limit", str(args.limit)] if args.limit else []
    # large blocks straight from mmap and back to the OS on free: RSS then follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tasks", default="loop_demo_mc")
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side; the fastest counts")
    ap.add_argument("--mem-batch", type=int, default=2048)
    ap.add_argument("--live-samples", type=int, default=len(LIVE_SAMPLES),
                    help="live runs to extrapolate from")
    ap.add_argument("--memory-probe", choices=["plain", "trace"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.memory_probe:
        return memory_probe(args)

    import torch

    from ouro_lab.evaluate import evaluate_live, gap
    from ouro_lab.lm import OuroLM
    from ouro_lab.loading import load_model, load_tokenizer
    from ouro_lab.registry import expand_grid, make_strategy
    from ouro_lab.scoring import metric_rows, run_evaluate, score
    from ouro_lab.tasks import TaskSet
    from ouro_lab.tracing import trace_pass

    torch.set_num_threads(args.threads)
    args.model = model_dir(args.model)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    R = model.config.total_ut_steps
    t_build, ts = timed(lambda: TaskSet(args.tasks.split(","), limit=args.limit))
    names = ts.names_of("multiple_choice", "loglikelihood", "loglikelihood_rolling")
    settings = [st for name, grid in GRID for st in expand_grid(name, grid)]
    print(f"model {args.model} ({R} steps), tasks {names}, task objects built once in {t_build:.2f} s")
    model(torch.tensor([[1, 2]]))  # warm-up

    plain_lm = OuroLM(model=model, tokenizer=tok, batch_size=args.batch_size)
    # each side twice, alternating, the faster run counts (the machine is shared and noisy);
    # Python's cyclic GC is off for both sides alike (score() turns it off for itself anyway)
    import gc

    gc.disable()
    t_plain = t_trace = t_score = float("inf")
    for _ in range(args.repeats):
        t, res = timed(lambda: run_evaluate(plain_lm, ts, names))
        t_plain = min(t_plain, t)
        ts.scorers.clear()  # the sweep pays for building its Scorer every time
        t, (trace, _) = timed(lambda: trace_pass(model, tok, ts, batch_size=args.batch_size))
        t_trace = min(t_trace, t)
        t, scored = timed(lambda tr=trace: [score(ts, tr, st) for st in settings])
        t_score = min(t_score, t)
    gc.enable()
    plain = metric_rows(res)
    t_sweep = t_trace + t_score
    full = next(m for st, (m, _) in zip(settings, scored, strict=True)
                if type(st).__module__.endswith("fixed") or "_fixed_" in type(st).__module__
                if st.step == R)
    assert [r["value"] for r in full] == [r["value"] for r in plain], "replay at full depth != plain run"
    print(f"plain full-depth lm-eval run: {t_plain:.2f} s ({trace.n} scored tokens)")
    from ouro_lab.prefix import PrefixTree
    from ouro_lab.tracing import build_units

    units = build_units(ts, plain_lm)
    tree = PrefixTree.build(units, plain_lm.max_length)
    tree.plan(args.batch_size)
    inputs = {(u.ctx + u.cont)[-(plain_lm.max_length + 1):][:-1] for u in units}
    hf_tokens = sum(map(len, inputs))  # HFLM: one sequence per distinct context + continuation[:-1]
    ours = tree.n_nodes + tree.padding
    print(f"plain side's work: {ours:,} tokens run (each distinct prefix once, row padding included); "
          f"lm-eval's HFLM runs {hf_tokens:,} on the same requests; one sequence per request "
          f"{tree.requested:,}")
    assert ours <= hf_tokens, "the plain side must be at least as efficient as HFLM"
    print(f"sweep: trace pass {t_trace:.2f} s + {len(settings)} settings scored by lm-eval in "
          f"{t_score:.2f} s ({1000 * t_score / len(settings):.1f} ms each) = {t_sweep:.2f} s")

    # re-running lm-eval per setting instead
    fixed = [st for st in settings if hasattr(st, "step")]
    t_fixed = sum(timed(lambda st=st: run_evaluate(OuroLM(model=model, tokenizer=tok, steps=st.step,
                                                          batch_size=args.batch_size), ts, names))[0]
                  for st in fixed)
    live_times, gaps = [], []
    for name, params in LIVE_SAMPLES[: args.live_samples]:
        st = make_strategy(name, params)
        t, (lm_rows, _) = timed(lambda st=st: evaluate_live(model, tok, ts, st, "copy",
                                                            batch_size=args.batch_size, names=names))
        live_times.append(t)
        replay_rows = score(ts, trace, st)[0]
        for g in gap(replay_rows, lm_rows):
            gaps.append((f"{name} {params}", g))
    n_dyn = len(settings) - len(fixed)
    if not live_times:
        print(f"re-running lm-eval per setting: {len(fixed)} fixed-k runs measured {t_fixed:.2f} s "
              f"({t_fixed / t_plain:.1f}x the plain run); early-exit settings not measured "
              "(--live-samples 0)")
    else:
        t_rerun = t_fixed + n_dyn * sum(live_times) / len(live_times)
        print(f"re-running lm-eval per setting: {len(fixed)} fixed-k runs measured {t_fixed:.2f} s + "
              f"{n_dyn} early-exit settings x {sum(live_times) / len(live_times):.2f} s (mean of "
              f"{len(live_times)} live runs measured) = {t_rerun:.1f} s, "
              f"{t_rerun / t_plain:.1f}x the plain run")
    for label, g in gaps:
        print(f"replay vs live ({label}, kv copy) {g['task']} {g['metric']}: replay {g['replay']:.4f} "
              f"live {g['live']:.4f} (diff {g['diff']:+.4f}); FLOPs/token used: replay "
              f"{g['replay_flops_per_token']:,.0f}, live {g['live_flops_per_token']:,.0f}; live executed "
              f"{g['live_flops_executed_per_token']:,.0f}, live incl. prompt "
              f"{g['live_flops_total_per_token']:,.0f}")

    mem = {w: run_probe(args, w) for w in ("plain", "trace")}
    rise = {w: m["rise_kib"] / 1024 for w, m in mem.items()}
    ratio_mem = (f"ratio {rise['trace'] / rise['plain']:.2f} (target <= 1.3)" if rise["plain"] >= 1 else
                 "both below the 1 MiB this measurement resolves: no ratio")
    print(f"peak memory (RSS rise over a warmed-up process, {mem['plain']['batch'][0]} requests, "
          f"{mem['plain']['batch'][1]} tokens run, {args.mem_batch} rows a call): plain "
          f"{rise['plain']:.1f} MiB, trace {rise['trace']:.1f} MiB, {ratio_mem}")
    print(f"sweep/plain cost ratio: {t_sweep / t_plain:.3f} ({len(settings)} settings; target <= 1.15)")


if __name__ == "__main__":
    main()
