"""Full-depth forward throughput of OuroForCausalLM against bare matmuls of the same shapes.

    .venv/bin/python bench/model_throughput.py            # hidden 512, 4 layers, 4 steps, 1 x 2048 tokens
    .venv/bin/python bench/model_throughput.py --batch 4 --seq 512

One forward runs every loop step over all tokens and reads the LM head once (last step),
so its FLOPs are `ModelCost.sequence_flops(seq, steps, readouts=1) * batch`, which counts
causal attention (token t attends to t keys): the masked half of the score matrix is
work the model does but not useful FLOPs, so it is not credited.

The reference runs, in the same process and interleaved with the model (model, bare,
model, bare, ...), the bare matmuls one forward is made of: every Linear weight shape of
every layer and step applied to all tokens, the gate and the LM head, and per layer and
step the two attention-score matmuls (Q K^T and P V) at full (T x T) size, credited with
the FLOPs they really do. The last line is the ratio of the medians' GFLOP/s.

Peak memory is the process's peak resident set size (`resource.getrusage` ru_maxrss),
printed together with the growth over the RSS before the first forward.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ouro_lab.flops import ModelCost  # noqa: E402
from ouro_lab.model import OuroConfig, OuroForCausalLM, init_weights  # noqa: E402


def bench_config(hidden: int = 512, layers: int = 4, steps: int = 4, heads: int = 8,
                 intermediate: int | None = None, vocab: int = 8192) -> OuroConfig:
    """A random mid-size Ouro: intermediate = 2.75 x hidden (Ouro-1.4B's 5632 / 2048)."""
    return OuroConfig(vocab_size=vocab, hidden_size=hidden,
                      intermediate_size=intermediate or int(2.75 * hidden),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      total_ut_steps=steps, max_position_embeddings=8192)


def bare_matmuls(cfg: OuroConfig, batch: int, seq: int, dtype: torch.dtype):
    """Operands and a closure running the matmuls of one forward, plus their true FLOP count."""
    n = batch * seq
    x_h = torch.randn(n, cfg.hidden_size, dtype=dtype)
    x_i = torch.randn(n, cfg.intermediate_size, dtype=dtype)
    hd, nh = cfg.head_dim, cfg.num_attention_heads
    shapes = [(nh * hd, cfg.hidden_size), (cfg.num_key_value_heads * hd, cfg.hidden_size),
              (cfg.num_key_value_heads * hd, cfg.hidden_size), (cfg.hidden_size, nh * hd),
              (cfg.intermediate_size, cfg.hidden_size), (cfg.intermediate_size, cfg.hidden_size),
              (cfg.hidden_size, cfg.intermediate_size)]
    weights = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
    gate = torch.randn(1, cfg.hidden_size, dtype=dtype)
    head = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=dtype) * 0.02
    q = torch.randn(batch * nh, seq, hd, dtype=dtype)
    k = torch.randn(batch * nh, hd, seq, dtype=dtype)
    p = torch.randn(batch * nh, seq, seq, dtype=dtype)
    v = torch.randn(batch * nh, seq, hd, dtype=dtype)
    R, L = cfg.total_ut_steps, cfg.num_hidden_layers

    def run():
        for _ in range(R):
            for _ in range(L):
                for w in weights:
                    inp = x_i if w.shape[1] == cfg.intermediate_size else x_h
                    torch.mm(inp, w.t())
                torch.bmm(q, k)
                torch.bmm(p, v)
            torch.mm(x_h, gate.t())
        torch.mm(x_h, head.t())

    flops = R * L * (sum(2 * n * o * i for o, i in shapes) + 2 * (2 * batch * nh * seq * seq * hd))
    flops += R * 2 * n * cfg.hidden_size + 2 * n * cfg.hidden_size * cfg.vocab_size
    return run, flops


def measure(cfg: OuroConfig, batch: int = 1, seq: int = 2048, reps: int = 5, warmup: int = 1,
            dtype: torch.dtype = torch.float32, seed: int = 0, echo=print) -> dict:
    """Time the model and the bare matmuls, interleaved; print and return the figures."""
    torch.manual_seed(seed)
    model = init_weights(OuroForCausalLM(cfg), seed=seed).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    cost = ModelCost.from_config(cfg)
    model_flops = batch * cost.sequence_flops(seq, steps=cfg.total_ut_steps, readouts=1)
    bare, bare_flops = bare_matmuls(cfg, batch, seq, dtype)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def forward():
        with torch.inference_mode():
            out = model(ids)
            out.logits(-1)

    t_model, t_bare = [], []
    for i in range(warmup + reps):
        for fn, times in ((forward, t_model), (bare, t_bare)):
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tm, tb = statistics.median(t_model), statistics.median(t_bare)
    r = {"model_gflops": model_flops / tm / 1e9, "bare_gflops": bare_flops / tb / 1e9,
         "model_s": tm, "bare_s": tb, "model_flops": model_flops, "bare_flops": bare_flops,
         "peak_rss_mib": peak_kib / 1024, "rss_growth_mib": (peak_kib - rss_before) / 1024}
    r["ratio"] = r["model_gflops"] / r["bare_gflops"]
    echo(f"config: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
         f"{cfg.num_hidden_layers} layers, {cfg.total_ut_steps} steps, {cfg.num_attention_heads} heads, "
         f"vocab {cfg.vocab_size}; batch {batch} x {seq} tokens, {str(dtype).removeprefix('torch.')}, "
         f"cpu, {torch.get_num_threads()} threads; median of {reps} interleaved reps")
    echo(f"model forward: {tm * 1e3:.1f} ms, {model_flops / 1e9:.2f} GFLOP (causal attention) "
         f"-> {r['model_gflops']:.2f} GFLOP/s")
    echo(f"bare matmuls:  {tb * 1e3:.1f} ms, {bare_flops / 1e9:.2f} GFLOP (full score matrices) "
         f"-> {r['bare_gflops']:.2f} GFLOP/s")
    echo(f"peak memory (ru_maxrss): {r['peak_rss_mib']:.0f} MiB, "
         f"{r['rss_growth_mib']:.0f} MiB above the RSS before the first forward")
    echo(f"ratio (model / bare matmul GFLOP/s): {r['ratio']:.3f}")
    return r


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = bench_config(a.hidden, a.layers, a.steps, a.heads, vocab=a.vocab)
    measure(cfg, a.batch, a.seq, a.reps)


if __name__ == "__main__":
    main()
