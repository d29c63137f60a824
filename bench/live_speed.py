"""Live early-exit decoding speed against plain full-depth `generate`, side by side in one run.

    .venv/bin/python bench/live_speed.py                      # random mid-size Ouro, float32, CPU
    .venv/bin/python bench/live_speed.py --quick              # fewer cases, a smoke run
    python bench/live_speed.py --device cuda --dtype bfloat16 --shape 1.4b

For every batch (1, 8) and prompt length (128, 2048) the prompt is prefilled once into a
static cache (one row, expanded to the batch), then each method decodes `--tokens` tokens
from it: plain `model.generate` at full depth, live decoding with every token exiting at
step k = 1 .. R-1 under `copy` and `last`, and live decoding at full depth. The cache is
rolled back to the prompt between runs, so every run decodes the same positions. Noise
on these machines comes and goes within seconds, so each method is timed in pairs with
`generate` at the same prompt, the two runs back to back (which goes first alternates),
`--reps` pairs per method, all pairs of a batch interleaved in a fresh seeded order each
rep. A ratio is the median over its pairs (range printed as `pairs`); the ratio of the two
sides' fastest runs is printed beside it. The goals are checked on the medians.

Printed per case: decode tokens/s, the measured speed-up over `generate`, the ideal
speed-up (the FLOPs ratio at the mean decode context, LM head included:
`ModelCost.token_flops(R, ctx) / token_flops(k, ctx)`) and measured / ideal. Then:
live at full depth over `generate`; per-token decode time at the longest prompt over the
shortest, beside the FLOPs ratio (attending to a longer context is real work) and an
estimated floor from what must be read: ops run one after another, so a full-depth token at
the longest prompt takes at least the rest of a token at the shortest (its time less its
attention, timed alone) plus reading the K/V of every (step, layer) at the machine's best
read rate (the fastest 256 MiB sum of the run); mixed depth
at the widest batch (rows alternating step 1 and full depth, decoded in ticks: measured
speed-up over the FLOPs ratio of the tokens made, and over the ratio of bytes read, counted
per tick); per-token dispatch at the shortest prompt (ATen ops per token, counted, and the
time per token of a twin of the model with the same layers, steps and heads at next to no
width: it runs the same ops with next to no arithmetic, so its time is what issuing a token's
work costs: the Python around the ops, their dispatch, on a GPU their launches; its share
of the model's token, and each case's measured / ideal on one basis, `generate`'s median
over the case's, as timed and with each side's twin time taken off); self-speculative
decoding (drafts at step 1 or 2, 1-4 per round, verified at full depth) over plain greedy
on the demo generation task, its output checked identical, and what one masked attention
call for rows at different cache columns saves it over a call per column (on 16-token
continuations of the same prompts, where rows roll back by different amounts). The last line
is the worst measured / ideal over the uniform early-exit cases (k = 1 .. R-1, both
policies, every batch and prompt): `ratio: X`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model_throughput import bench_config  # noqa: E402

from ouro_lab.flops import ModelCost  # noqa: E402
from ouro_lab.live import LiveBatch  # noqa: E402
from ouro_lab.model import OuroConfig, OuroForCausalLM, init_weights  # noqa: E402
from ouro_lab.registry import make_strategy  # noqa: E402
from ouro_lab.strategy import ExitStrategy  # noqa: E402

SHAPES = {"mid": None, "tiny": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, total_ut_steps=4, max_position_embeddings=256),
          "1.4b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632,
                                    num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                    head_dim=128, total_ut_steps=4, rope_theta=1e6,
                                    max_position_embeddings=65536)}


def build_model(shape: str, dtype: torch.dtype, device: str) -> OuroForCausalLM:
    cfg = bench_config() if SHAPES[shape] is None else OuroConfig(**SHAPES[shape])
    with torch.device(device):
        model = OuroForCausalLM(cfg)
    return init_weights(model, seed=0).to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prefilled(model, prompt: torch.Tensor, batch: int, capacity: int, shared: bool):
    """A cache holding `prompt` (1, P) at full depth, its row repeated `batch` times."""
    run = LiveBatch(model, None, "last" if shared else "copy", batch=1, capacity=capacity)
    run.prefill(prompt, torch.ones_like(prompt))
    return run.cache.select(torch.zeros(batch, dtype=torch.long))


def methods(model, caches, prompt_len: int, batch: int, tokens: int, ks: list[int]):
    """name -> a closure decoding `tokens` tokens from the prefilled caches (rolled back first)."""
    last_tok = torch.zeros(batch, dtype=torch.long, device=model.device)
    keep = torch.full((batch,), prompt_len, dtype=torch.long)

    def plain():
        cache = caches["generate"]  # its own copy: a cache another method just warmed would favour it
        cache.truncate(keep)
        model.generate(last_tok[:, None], max_new_tokens=tokens, cache=cache)

    def live(policy, k):
        run = LiveBatch(model, make_strategy("fixed", {"step": k}), policy, batch=batch)
        run.cache = caches[policy == "last"]
        alive = torch.ones(batch, dtype=torch.bool)

        def go():
            run.cache.truncate(keep)
            cur = last_tok
            for _ in range(tokens):
                cur = run.step(cur, alive)["logp"].argmax(-1)
        return go

    R = model.config.total_ut_steps
    out = {"generate": plain}
    for policy in ("copy", "last"):
        for k in ks:
            out[f"{policy} k={k}"] = live(policy, k)
    out[f"copy k={R} (full depth)"] = live("copy", R)
    return out


def time_pairs(fns: dict, pairs: list[tuple], reps: int, device: str) -> dict:
    """Every pair (a, b) of methods run back to back once per rep (a first in even reps, b in
    odd ones), the pairs in a fresh (seeded) order each rep. Noise here comes and goes
    within seconds, so only runs made next to each other compare fairly; a fixed order
    biased whichever pair sat at the rep boundary (there `generate` ran twice in a row,
    and the pair listed first, `copy` k=1, read 3% below `last` k=1 over 20 pairs; listed
    second, level with it).
    Returns (a, b) -> ([seconds of a per rep], [seconds of b per rep])."""
    for fn in fns.values():  # warm-up
        fn()
    out: dict = {pair: ([], []) for pair in pairs}
    shuffle = random.Random(0).shuffle
    for rep in range(reps):
        order = list(pairs)
        shuffle(order)
        for pair in order:
            for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
                sync(device)
                t0 = time.perf_counter()
                fns[pair[side]]()
                sync(device)
                out[pair][side].append(time.perf_counter() - t0)
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """a / b from runs made back to back: the median over reps (the figure the goals are
    checked on), then the ratio of each side's fastest run, and the range over reps."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(r), min(a) / min(b), min(r), max(r)


def show(r: tuple[float, float, float, float], digits: int = 2, unit: str = "x") -> str:
    """`paired`'s result as printed: the median pair, its range, the fastest runs' ratio."""
    f = f"{{:.{digits}f}}"
    return (f"{f.format(r[0])}{unit} (pairs {f.format(r[2])}-{f.format(r[3])}; fastest runs "
            f"{f.format(r[1])})")


def bench_batch(model, batch: int, prompt_lens: list[int], args, ks: list[int]) -> tuple[list[dict], dict]:
    """Rows of every prompt length at one batch: each method timed in pairs with `generate`
    at the same prompt, all pairs of both lengths interleaved. Also {prompt: full-depth live /
    generate (`paired`)} and the decode time at the longest prompt over the
    shortest (`generate` and full-depth live, each paired with itself)."""
    cost = ModelCost.from_config(model.config)
    R = model.config.total_ut_steps
    full_name = f"copy k={R} (full depth)"
    fns, pairs = {}, []
    for prompt_len in prompt_lens:
        g = torch.Generator().manual_seed(prompt_len)
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(model.device)
        capacity = prompt_len + args.tokens + 2
        caches = {shared: prefilled(model, prompt, batch, capacity, shared) for shared in (False, True)}
        caches["generate"] = caches[False].select(torch.arange(batch))  # generate's own copy
        for name, fn in methods(model, caches, prompt_len, batch, args.tokens, ks).items():
            fns[(prompt_len, name)] = fn
            if name != "generate":
                pairs.append(((prompt_len, "generate"), (prompt_len, name)))
    lo, hi = prompt_lens[0], prompt_lens[-1]
    if len(prompt_lens) > 1:
        pairs += [((lo, m), (hi, m)) for m in ("generate", full_name)]
    timed = time_pairs(fns, pairs, args.reps, args.device)
    rows, summary = [], {}
    for prompt_len in prompt_lens:
        gen, ts_full = timed[((prompt_len, "generate"), (prompt_len, full_name))]
        med = statistics.median(gen) / args.tokens
        full = summary[prompt_len] = paired(ts_full, gen)
        summary["seconds", prompt_len] = {"generate": med,
                                          full_name: statistics.median(ts_full) / args.tokens}
        fast, slow = min(gen) / args.tokens * 1e3, max(gen) / args.tokens * 1e3
        print(f"  batch {batch}, prompt {prompt_len}: generate {batch / med:.1f} tok/s ({med * 1e3:.1f} "
              f"ms/token; runs {fast:.1f}-{slow:.1f}); live at full depth / generate: {show(full, 3, '')}",
              flush=True)
        ctx = prompt_len + 1 + args.tokens / 2  # mean keys attended while decoding
        for (a, (p, name)), (tg, ts) in timed.items():
            if a != (prompt_len, "generate") or p != prompt_len or name in ("generate", full_name):
                continue
            k = int(name.split("=")[1])
            speedup = paired(tg, ts)
            ideal = cost.token_flops(R, ctx) / cost.token_flops(k, ctx)
            rows.append({"batch": batch, "prompt": prompt_len, "method": name, "ratio": speedup[0] / ideal,
                         "fastest_ratio": speedup[1] / ideal, "ideal": ideal,
                         "seconds": statistics.median(ts) / args.tokens})
            print(f"    {name:<8} {batch * args.tokens / statistics.median(ts):8.1f} tok/s  speed-up "
                  f"{show(speedup)}  ideal {ideal:5.2f}x  measured/ideal {speedup[0] / ideal:.3f} "
                  f"(fastest runs {speedup[1] / ideal:.3f})", flush=True)
    if len(prompt_lens) > 1:
        summary["growth"] = {m: paired(timed[((lo, m), (hi, m))][1], timed[((lo, m), (hi, m))][0])
                             for m in ("generate", full_name)}
        summary["flops_growth"] = cost.token_flops(R, hi + 1 + args.tokens / 2) / cost.token_flops(
            R, lo + 1 + args.tokens / 2)
        t_lo = statistics.median(timed[((lo, "generate"), (hi, "generate"))][0]) / args.tokens
        summary["floor"] = growth_floor(model, batch, lo, hi, args.tokens, t_lo)
    return rows, summary


_BEST_RATE = [0.0]  # the best read rate seen in this run, bytes/s (noise only ever lowers it)


def read_bandwidth(device: str, mib: int = 256, reps: int = 5) -> float:
    """The machine's best streaming read rate so far, bytes/s: the fastest of `reps` sums
    over a `mib` MiB float32 tensor (8x this machine's L3, so it streams from memory),
    against every earlier call's (noise only slows a sum, so the fastest seen is the truest)."""
    x = torch.ones(mib * 2**18, device=device)
    x.sum()
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        _BEST_RATE[0] = max(_BEST_RATE[0], x.numel() * 4 / (time.perf_counter() - t0))
    return _BEST_RATE[0]


def attention_seconds(model, batch: int, ctx: int, reps: int = 5) -> float:
    """Median seconds of one full-depth token's attention alone at `ctx` keys: R x layers
    SDPA calls of `batch` one-token queries over a (batch, kv heads, ctx, head_dim) cache."""
    cfg, dev = model.config, model.device
    R, L = cfg.total_ut_steps, cfg.num_hidden_layers
    q = torch.randn(batch, cfg.num_attention_heads, 1, cfg.head_dim, dtype=model.dtype, device=dev)
    kv = torch.randn(2, R * L, batch, cfg.num_key_value_heads, ctx, cfg.head_dim, dtype=model.dtype,
                     device=dev)
    gqa = cfg.num_key_value_heads != cfg.num_attention_heads

    def token():
        for i in range(R * L):  # a distinct (step, layer) cache each call, as decoding reads them
            torch.nn.functional.scaled_dot_product_attention(q, kv[0, i], kv[1, i], enable_gqa=gqa)
    token()
    times = []
    for _ in range(reps):
        sync(model.device.type)
        t0 = time.perf_counter()
        token()
        sync(model.device.type)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def growth_floor(model, batch: int, lo: int, hi: int, tokens: int, t_lo: float) -> dict:
    """An estimated lower bound on full-depth decode time at prompt `hi` over prompt `lo`: ops
    run one after another, so a token at `hi` takes at least the rest of a token at `lo` (its
    measured time `t_lo` less its attention, timed alone: `rest`) plus reading the K/V of
    every (step, layer) over `hi` keys (`kv_bytes`) at the machine's best read rate. The
    rate is the best over the whole run (`floor`, once every batch is timed). Estimated:
    it assumes attention costs inside the model what it costs alone, and takes a 2-thread
    sum's rate for the machine's peak."""
    cost = ModelCost.from_config(model.config)
    read_bandwidth(model.device.type)  # one more chance at the true rate
    ctx_lo, ctx_hi = lo + 1 + tokens // 2, hi + 1 + tokens // 2
    attn_lo = attention_seconds(model, batch, ctx_lo)
    return {"kv_bytes": batch * cost.kv_bytes(ctx_hi, dtype=model.dtype), "t_lo": t_lo,
            "rest": t_lo - attn_lo, "attn_lo": attn_lo, "attn_hi": attention_seconds(model, batch, ctx_hi)}


def floor(f: dict, rate: float) -> float:
    """`growth_floor`'s bound at read rate `rate` (bytes/s)."""
    return (f["rest"] + f["kv_bytes"] / rate) / f["t_lo"]


class OpCount(TorchDispatchMode):
    """Counts the ATen ops dispatched while active (after autograd and decomposition: the
    kernels a CPU runs, views included; on a GPU each non-view op is a kernel launch or more)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def narrow_twin(model) -> OuroForCausalLM:
    """The model's stack at next to no width: as many layers, loop steps, attention and KV
    heads, head_dim 4, MLP width 8 per head, vocab 64. Decoding it runs the same ops in the
    same order as the model (the same code paths), with next to no arithmetic, so its time
    per token is what issuing a token's work costs: the Python around the ops, dispatching
    them and, on a GPU, launching their kernels."""
    c = model.config
    cfg = OuroConfig(vocab_size=64, hidden_size=4 * c.num_attention_heads,
                     intermediate_size=8 * c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
                     num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                     head_dim=4, total_ut_steps=c.total_ut_steps, rope_theta=c.rope_theta,
                     max_position_embeddings=c.max_position_embeddings,
                     tie_word_embeddings=c.tie_word_embeddings)
    with torch.device(model.device):
        twin = OuroForCausalLM(cfg)
    return init_weights(twin, seed=0).to(model.dtype).eval()


def decoders(model, batch: int, prompt_len: int, tokens: int, ks: list[int]) -> dict:
    """`methods` over a prompt of zeros prefilled into fresh caches, each run warmed up once."""
    prompt = torch.zeros(1, prompt_len, dtype=torch.long, device=model.device)
    capacity = prompt_len + tokens + 2
    caches = {shared: prefilled(model, prompt, batch, capacity, shared) for shared in (False, True)}
    caches["generate"] = caches[False].select(torch.arange(batch))
    fns = methods(model, caches, prompt_len, batch, tokens, ks)
    for fn in fns.values():
        fn()
    return fns


def op_counts(fns: dict, tokens: int) -> dict:
    """{name: ATen ops dispatched per decoded token} (a run's cache rollback included)."""
    out = {}
    for name, fn in fns.items():
        with OpCount() as count:
            fn()
        out[name] = count.n / tokens
    return out


def dispatch_cost(model, batch: int, prompt_len: int, args, ks: list[int]) -> dict:
    """Per decoded token of each method (as `methods`): ATen ops dispatched, and seconds per
    token of the model's `narrow_twin` (the same ops, next to no arithmetic), the runs
    interleaved, `args.reps` of each. {name: (ops per token, twin seconds per token)}."""
    fns = decoders(narrow_twin(model), batch, prompt_len, args.tokens, ks)
    ops, times = op_counts(fns, args.tokens), {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append((time.perf_counter() - t0) / args.tokens)
    return {name: (ops[name], statistics.median(times[name])) for name in fns}


def show_dispatch(cost: dict, seconds: dict, ideal: dict, ref: str = "generate") -> str:
    """`dispatch_cost`'s figures beside the model's median seconds per token (`seconds`,
    same names), and each early-exit case's measured / ideal on one basis: `ref`'s median
    over the case's, as timed, then with each side's twin time taken off (on a CPU, issuing
    work and doing it take turns on one thread). Medians of all runs, not the paired
    medians the goals are checked on."""
    parts = []
    for name, (ops, t) in cost.items():
        share = t / seconds[name]
        part = f"{name} {ops:.0f} ops, {t * 1e3:.2f} ms ({share:.0%} of {seconds[name] * 1e3:.1f})"
        if name in ideal:  # (not where the twin took as long as the model: no arithmetic left to compare)
            left = seconds[name] - t, seconds[ref] - cost[ref][1]
            part += f", measured/ideal {seconds[ref] / seconds[name] / ideal[name]:.3f} as timed, " + (
                f"{left[1] / left[0] / ideal[name]:.3f} without it" if min(left) > 0
                else "without it: n/a (the twin took as long)")
        parts.append(part)
    return "; ".join(parts)


class AlternateRows(ExitStrategy):
    """Even rows exit at the first step, odd rows run every step (mixed depth in one batch)."""

    needs = ()

    def decide(self, s, r):
        return (s.index // 1_000_003) % 2 == 0  # the row id (see LiveBatch.index)


def read_sizes(model) -> tuple[int, int, int]:
    """Bytes a decode tick reads: the weights of one pass of the layer stack, the LM head's,
    and the K and V of one cache column over every layer (per step run)."""
    cfg, size = model.config, model.lm_head.weight.element_size()
    w_step = sum(p.numel() for p in model.model.layers.parameters()) * size
    kv_col = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size
    return w_step, model.lm_head.weight.numel() * size, kv_col


def bench_mixed(model, batch: int, prompt_len: int, args) -> dict:
    """Mixed depth in one batch: even rows exit at step 1, odd rows at full depth, decoded
    in ticks (an exited row starts its next token at once). Measured seconds per token of
    full-depth live decoding over mixed, divided by the FLOPs ratio of the tokens made, and
    by the ratio of bytes read, counted per tick: a tick reads the weights of each step it
    runs once, whatever its rows, the LM head once if a row exits, and every busy row's K/V
    at each step it runs (decoding at small batch is bound by those reads, not by FLOPs)."""
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(model.device)
    n = batch * args.tokens
    cache = prefilled(model, prompt, batch, prompt_len + 4 * n // batch + 8, False)
    keep = torch.full((batch,), prompt_len, dtype=torch.long)
    runs = {"mixed": LiveBatch(model, AlternateRows(), "copy", batch=batch),
            "full": LiveBatch(model, None, "copy", batch=batch)}
    made: dict[str, list] = {k: [] for k in runs}
    plan: dict[str, tuple] = {}  # tokens, ticks, ticks winding down (the same every rep)
    R = model.config.total_ut_steps
    w_step, w_head, kv_col = read_sizes(model)

    def decode(run):  # ticks until `n` tokens are made; rows that exit early simply make more
        cache.truncate(keep)
        run.cache = cache
        cur, ready, tokens, read = torch.zeros(batch, dtype=torch.long), list(range(batch)), 0, 0
        ticks = [0, 0]  # ticks, and those of them after the n-th token (no new token starts)
        f0 = run.flops.sum().item()
        per_tick = R if run.first_exit == R - 1 else 1  # steps a tick runs: all R back to back, or one
        out = run.tick(torch.tensor(ready, dtype=torch.long), cur[ready])
        while out is not None:
            busy = out["busy"].numpy()
            ticks[0] += 1
            ticks[1] += tokens >= n
            read += per_tick * (w_step + kv_col * int(run.ctx_len[busy].sum()))
            read += w_head if len(out["done"]) else 0
            tokens += len(out["done"])
            ready = out["done"].tolist() if tokens < n else []  # past n: no new tokens, the rest finish
            cur[out["done"]] = run.logp[out["done"].to(run.logp.device)].argmax(-1).cpu()
            out = run.tick(torch.tensor(ready, dtype=torch.long), cur[ready]) if ready else run.tick()
        return tokens, run.flops.sum().item() - f0, read, ticks

    for run in runs.values():  # warm-up
        decode(run)
    for rep in range(args.reps):
        for name, run in (runs.items() if rep % 2 == 0 else list(runs.items())[::-1]):
            sync(args.device)
            t0 = time.perf_counter()
            tokens, flops, read, ticks = decode(run)
            sync(args.device)
            made[name].append(((time.perf_counter() - t0) / tokens, flops / tokens, read / tokens))
            plan[name] = (tokens, *ticks)
    fpt = {k: statistics.median(f for _, f, _ in v) for k, v in made.items()}
    bpt = {k: statistics.median(b for _, _, b in v) for k, v in made.items()}
    speedup = paired([t for t, _, _ in made["full"]], [t for t, _, _ in made["mixed"]])  # seconds per token
    ideal, by_bytes = fpt["full"] / fpt["mixed"], bpt["full"] / bpt["mixed"]
    print(f"  mixed depth, batch {batch}, prompt {prompt_len} (rows alternate step 1 / full depth): "
          f"speed-up {show(speedup)}, ideal {ideal:.2f}x, measured/ideal {speedup[0] / ideal:.3f}; "
          f"bytes read per token, full / mixed, {by_bytes:.2f}x "
          f"(measured / that {speedup[0] / by_bytes:.3f}); "
          + ", ".join(f"{k} {t} tokens in {a} ticks, the last {b} winding down"
                      for k, (t, a, b) in plan.items()),
          flush=True)
    return {"speedup": speedup[0], "ideal": ideal, "bytes": by_bytes}


def verify_cost(model, batch: int, prompt_len: int, reps: int, device: str, sizes=(2, 3, 5)) -> dict:
    """What parallel verification costs: a full-depth pass over T new tokens per row against
    one over a single token, both from the same prefilled cache (rolled back between runs),
    timed in adjacent pairs. {T: (median ratio, ...) as `paired`}."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, V, (1, prompt_len), generator=g).to(model.device)
    cache = prefilled(model, prompt, batch, prompt_len + max(sizes) + 1, False)
    keep = torch.full((batch,), prompt_len, dtype=torch.long)
    ids = torch.randint(0, V, (batch, max(sizes)), generator=g).to(model.device)

    def run(T):
        def go():
            cache.truncate(keep)
            with torch.no_grad():
                model(ids[:, :T], cache=cache)
        return go
    fns = {T: run(T) for T in (1, *sizes)}
    timed = time_pairs(fns, [(T, 1) for T in sizes], reps, device)
    return {T: paired(*timed[(T, 1)]) for T in sizes}


def split_vs_merged(fn, reps: int, device: str, label: str) -> None:
    """`fn` with rows at different cache columns attending in one masked SDPA call (within
    `RAGGED_COLUMNS`) against a call per column (`RAGGED_COLUMNS` = 0), in adjacent pairs."""
    from ouro_lab import cache

    default = cache.RAGGED_COLUMNS

    def split():
        cache.RAGGED_COLUMNS = 0
        try:
            return fn()
        finally:
            cache.RAGGED_COLUMNS = default
    timed = time_pairs({"split": split, "merged": fn}, [("split", "merged")], reps, device)
    same = split()[0] == fn()[0]
    print(f"  {label}: a call per column / rows within {default} columns in one masked call: "
          f"{show(paired(*timed[('split', 'merged')]))}, identical output: {'yes' if same else 'NO'}",
          flush=True)


def bench_speculation(args) -> None:
    """Self-speculative decoding against plain full-depth greedy live decoding on the demo
    generation task (all 80 prompts, its until strings and token cap), same batch plan;
    the texts must be identical."""
    import json

    from ouro_lab.live import live_generate
    from ouro_lab.loading import load_model, load_tokenizer
    from ouro_lab.speculative import speculative_generate

    mdir = ROOT / "ouro_lab" / "builtin" / "loop-demo"
    model, tok = load_model(mdir, device=args.device), load_tokenizer(mdir)
    task = (ROOT / "tasks" / "data" / "loop_demo_gen.jsonl").read_text().splitlines()
    prompts = [tok(json.loads(line)["prompt"]).input_ids for line in task]
    kw = dict(until=["\n", "<eos>"], max_new_tokens=4, eos_token_id=model.config.eos_token_id, batch_size=16)
    settings = [(k, n) for k in (1, 2) for n in (1, 2, 4)]
    fns = {"plain": lambda: live_generate(model, tok, prompts, None, "copy", **kw)}
    for k, n in settings:
        draft = make_strategy("fixed", {"step": k})
        fns[(k, n)] = (lambda d=draft, n=n: speculative_generate(model, tok, prompts, d, n, **kw))
    plain = fns["plain"]()[0]
    timed = time_pairs(fns, [("plain", key) for key in settings], args.reps, args.device)
    base = statistics.median(t for key in settings for t in timed[("plain", key)][0])
    print(f"speculation on the demo generation task ({len(prompts)} prompts, batch 16; plain greedy "
          f"{base * 1e3:.0f} ms):", flush=True)
    for k, n in settings:
        texts, recs = fns[(k, n)]()
        acc = sum(r["accepted"] for r in recs) / max(sum(r["drafted"] for r in recs), 1)
        per_round = sum(r["tokens"] for r in recs) / max(sum(r["rounds"] for r in recs), 1)
        print(f"  draft step {k}, {n} tokens/round: speed-up {show(paired(*timed[('plain', (k, n))]))}, "
              f"drafts accepted {acc:.0%}, {per_round:.2f} tokens per round, "
              f"identical output: {'yes' if texts == plain else 'NO'}", flush=True)
    long = dict(kw, until=None, max_new_tokens=16, eos_token_id=None)  # rows diverge: rollbacks differ
    draft = make_strategy("fixed", {"step": 1})
    split_vs_merged(lambda: speculative_generate(model, tok, prompts, draft, 2, **long), args.reps,
                    args.device, "16-token continuations (no stop), draft step 1, 2 tokens/round")
    prompt_len = max(len(p) for p in prompts)
    cost = verify_cost(model, kw["batch_size"], prompt_len, args.reps, args.device)
    print(f"  a full-depth pass over T tokens per row / over one (demo model, batch {kw['batch_size']}, "
          f"prompt {prompt_len}): " + ", ".join(f"T={T} {show(r)}" for T, r in cost.items()), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", default="mid", choices=sorted(SHAPES),
                    help="mid: hidden 512, 4 layers, 4 steps, vocab 8192; 1.4b: Ouro-1.4B; tiny: tests")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--tokens", type=int, default=8, help="decode tokens per timed run")
    ap.add_argument("--reps", type=int, default=8, help="reps (even: each order as often)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--no-speculation", action="store_true", help="skip the demo speculation part")
    ap.add_argument("--quick", action="store_true", help="batch 1, prompt 128, k=1, 2 reps")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("live_speed: --device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.prompts, args.reps = "1", "128", 2
    model = build_model(args.shape, getattr(torch, args.dtype), args.device)
    rate = read_bandwidth(args.device)
    R = model.config.total_ut_steps
    ks = [1] if args.quick else list(range(1, R))
    print(f"live_speed: shape {args.shape}, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.tokens} tokens x {args.reps} runs per method, each paired with a generate run next to it "
          f"(medians over pairs; the fastest runs' ratio beside); read rate {rate / 1e9:.1f} GB/s "
          "(a 256 MiB sum; measured again after each batch, the best kept)", flush=True)
    rows, summaries = [], {}
    prompt_lens = sorted(map(int, args.prompts.split(",")))
    for batch in map(int, args.batches.split(",")):
        case, summaries[batch] = bench_batch(model, batch, prompt_lens, args, ks)
        rows += case
        lo = prompt_lens[0]
        here = [r for r in case if r["prompt"] == lo]
        seconds = {**summaries[batch]["seconds", lo], **{r["method"]: r["seconds"] for r in here}}
        cost = dispatch_cost(model, batch, lo, args, ks)
        ideal = {r["method"]: r["ideal"] for r in here}
        print(f"  dispatch, batch {batch}, prompt {lo}, per token: ATen ops, and the time of a twin of "
              "the same depth at next to no width (what issuing the token's work costs: Python, "
              "dispatch, on a GPU launches; its share of the measured token): "
              + show_dispatch(cost, seconds, ideal), flush=True)
    print("goals: measured/ideal >= 0.9 at batch 1, >= 0.85 at batch 8; full depth <= 1.05x generate; "
          "decode time at the longest prompt <= 1.3x the shortest")
    rate = read_bandwidth(args.device)  # the best over the run
    for batch, summ in summaries.items():
        worst = min(r["ratio"] for r in rows if r["batch"] == batch)
        worst_fast = min(r["fastest_ratio"] for r in rows if r["batch"] == batch)
        full = max(summ[p][0] for p in prompt_lens)
        full_fast = max(summ[p][1] for p in prompt_lens)
        line = (f"  batch {batch}: worst measured/ideal {worst:.3f} (fastest runs {worst_fast:.3f}); "
                f"full depth / generate (worst) {full:.3f} (fastest runs {full_fast:.3f})")
        if "growth" in summ:
            g, f = summ["growth"].values()
            fl = summ["floor"]
            line += (f"; decode time prompt {prompt_lens[-1]} / {prompt_lens[0]}: generate {show(g)}, "
                     f"live full depth {show(f)}; FLOPs per token {summ['flops_growth']:.2f}x; "
                     f"floor {floor(fl, rate):.2f}x (the K/V read per token at {prompt_lens[-1]}, "
                     f"{fl['kv_bytes'] / 1e9:.2f} GB, takes >= {fl['kv_bytes'] / rate * 1e3:.1f} ms at "
                     f"{rate / 1e9:.1f} GB/s, beside {fl['rest'] * 1e3:.1f} ms for the rest of a token at "
                     f"{prompt_lens[0]}; attention alone measured {fl['attn_lo'] * 1e3:.1f} -> "
                     f"{fl['attn_hi'] * 1e3:.1f} ms)")
        goal = 0.9 if batch == 1 else 0.85
        met = sum(r["ratio"] >= goal for r in rows if r["batch"] == batch)
        verdict = [f"measured/ideal >= {goal} in {met} of {sum(r['batch'] == batch for r in rows)} cases "
                   f"(worst {worst:.4f})", f"full depth <= 1.05x: {'met' if full <= 1.05 else 'missed'}"]
        if "growth" in summ:
            live = list(summ["growth"].values())[1][0]  # live decoding at full depth
            verdict.append(f"live decode growth <= 1.3x: {'met' if live <= 1.3 else 'missed'}")
        print(line + "\n    goals, on the unrounded medians: " + "; ".join(verdict), flush=True)
    widest = max(map(int, args.batches.split(",")))
    if not args.quick and widest > 1:
        for prompt_len in map(int, args.prompts.split(",")):
            bench_mixed(model, widest, prompt_len, args)
    if not args.no_speculation:
        batch, prompt_len = min(map(int, args.batches.split(","))), prompt_lens[0]
        cost = verify_cost(model, batch, prompt_len, args.reps, args.device)
        print(f"verification cost: a full-depth pass over T tokens per row / over one ({args.shape} shape, "
              f"batch {batch}, prompt {prompt_len}): "
              + ", ".join(f"T={T} {show(r)}" for T, r in cost.items()), flush=True)
        bench_speculation(args)
    print(f"ratio: {min(r['ratio'] for r in rows):.4f}")


if __name__ == "__main__":
    main()
