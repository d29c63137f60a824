"""Tokens per second and achieved TFLOP/s of OuroForCausalLM on a CUDA GPU, in bfloat16,
against the device's dense bfloat16 peak.

    python bench/gpu_throughput.py                       # random Ouro-1.4B-shaped model
    python bench/gpu_throughput.py --layers 48           # Ouro-2.6B-shaped
    python bench/gpu_throughput.py --checkpoint ckpt/    # a real checkpoint folder
    python bench/gpu_throughput.py --peak-tflops 989     # a device missing from PEAK_TFLOPS

Two measurements, each the median of `--reps` timed runs after `--warmup` untimed ones:

* prefill: one full-depth forward of `--batch` x `--seq` tokens plus the LM-head readout
  of the last step for every token; FLOPs = `ModelCost.sequence_flops` (causal attention:
  token t attends to t keys; the masked half of the score matrix is not credited).
* decode: greedy generation of `--new-tokens` tokens per row with the static per-(step,
  layer) KV cache (`model.generate`), its time minus that of its own prefill (a forward
  and the readout of the last position, which gives the first token); FLOPs =
  `ModelCost.token_flops` of the n - 1 tokens fed after the prompt (`decode_flops`).

Achieved TFLOP/s = FLOPs / median seconds; utilisation = achieved / peak. Peak memory is
`torch.cuda.max_memory_allocated`. Without a CUDA device the script exits at once with
one line saying so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ouro_lab.flops import OURO_1_4B, ModelCost  # noqa: E402

# Dense bfloat16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets,
# matched against torch.cuda.get_device_name() in this order (specific names first).
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),    # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak of a device by name (`--peak-tflops` wins); None if unknown."""
    if override:
        return float(override)
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def ouro_config(layers: int = OURO_1_4B.layers, steps: int = OURO_1_4B.steps, vocab: int = OURO_1_4B.vocab,
                hidden: int = OURO_1_4B.hidden, intermediate: int = OURO_1_4B.intermediate,
                heads: int = OURO_1_4B.heads, max_positions: int = 4096):
    """Ouro-1.4B's shape by default (24 layers; 48 is Ouro-2.6B's)."""
    from ouro_lab.model import OuroConfig

    return OuroConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      total_ut_steps=steps, max_position_embeddings=max_positions)


def prefill_flops(cost: ModelCost, batch: int, seq: int, steps: int) -> float:
    """One full-depth forward of batch x seq tokens with one LM-head readout per token."""
    return batch * cost.sequence_flops(seq, steps=steps, readouts=1)


def decode_flops(cost: ModelCost, batch: int, prompt: int, new_tokens: int, steps: int) -> float:
    """What `model.generate(max_new_tokens=n)` runs after its prefill (whose readout of the
    last position gives the first token): n - 1 one-token forwards at full depth, token i
    (1-based) at context prompt + i (itself included), each with a readout."""
    return batch * cost.sequence_flops(new_tokens - 1, steps, readouts=1, past=prompt)


def random_model(cfg, device, dtype, seed: int = 0):
    """A random model built directly on `device` (no CPU copy of 1.4B float32 weights)."""
    import torch

    from ouro_lab.model import OuroForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = OuroForCausalLM(cfg)
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def _timed(fn, sync, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, batch: int, seq: int, new_tokens: int, reps: int = 5, warmup: int = 2,
            seed: int = 0) -> dict:
    """Prefill and decode timings and FLOPs of `model` on its own device (any device)."""
    import torch

    dev = model.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = model.config
    cost = ModelCost.from_config(cfg)
    R = cfg.total_ut_steps
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev)

    def prefill():
        with torch.inference_mode():
            model(ids).logits(-1)

    def generate_prefill():  # what generate runs before its first decode step
        with torch.inference_mode():
            model.lm_head(model(ids, cache=model.new_cache(batch, seq + new_tokens)).step_hidden[-1][:, -1])

    def generate():
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, use_cache=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_pre = _timed(prefill, sync, reps, warmup)
    t_gen = _timed(generate, sync, max(1, reps // 2), 1)
    t_dec = max(t_gen - _timed(generate_prefill, sync, max(1, reps // 2), 1), 1e-9)
    f_pre = prefill_flops(cost, batch, seq, R)
    f_dec = decode_flops(cost, batch, seq, new_tokens, R)
    out = {"prefill_s": t_pre, "prefill_tokens_per_s": batch * seq / t_pre, "prefill_flops": f_pre,
           "prefill_tflops": f_pre / t_pre / 1e12, "decode_s": t_dec,
           "decode_tokens_per_s": batch * (new_tokens - 1) / t_dec, "decode_flops": f_dec,
           "decode_tflops": f_dec / t_dec / 1e12}
    out["peak_mem_gib"] = (torch.cuda.max_memory_allocated(dev) / 2**30) if dev.type == "cuda" else None
    return out


def report(r: dict, peak: float | None, echo=print) -> None:
    def util(tf):
        return f" = {100 * tf / peak:.1f}% of the {peak:g} TFLOP/s dense bf16 peak" if peak else \
            " (peak unknown for this device: pass --peak-tflops)"

    echo(f"prefill: {r['prefill_tokens_per_s']:,.0f} tokens/s, {r['prefill_s'] * 1e3:.1f} ms, "
         f"{r['prefill_flops'] / 1e12:.2f} TFLOP -> {r['prefill_tflops']:.1f} TFLOP/s"
         f"{util(r['prefill_tflops'])}")
    echo(f"decode:  {r['decode_tokens_per_s']:,.0f} tokens/s (KV cache, greedy), "
         f"{r['decode_tflops']:.2f} TFLOP/s{util(r['decode_tflops'])}")
    if r.get("peak_mem_gib") is not None:
        echo(f"peak memory (torch.cuda.max_memory_allocated): {r['peak_mem_gib']:.2f} GiB")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a random model)")
    p.add_argument("--layers", type=int, default=OURO_1_4B.layers, help="24: Ouro-1.4B, 48: Ouro-2.6B")
    p.add_argument("--steps", type=int, default=OURO_1_4B.steps)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, TFLOP/s")
    a = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_throughput: no CUDA device (torch.cuda.is_available() is False); "
                 "run it on a machine with an NVIDIA GPU")
    dtype = getattr(torch, a.dtype)
    name = torch.cuda.get_device_name(0)
    if a.checkpoint:
        from ouro_lab.loading import load_model

        model = load_model(a.checkpoint, dtype=a.dtype, device="cuda").eval()
        what = a.checkpoint
    else:
        model = random_model(ouro_config(layers=a.layers, steps=a.steps,
                                         max_positions=max(4096, a.seq + a.new_tokens)), "cuda", dtype)
        what = f"random Ouro ({a.layers} layers)"
    if a.steps != model.config.total_ut_steps:
        model.config.total_ut_steps = a.steps
    print(f"{name}: {what}, {model.num_parameters() / 1e9:.3f} B parameters, {a.steps} steps, {a.dtype}, "
          f"batch {a.batch} x {a.seq} tokens, {a.new_tokens} new tokens; torch {torch.__version__}")
    report(measure(model, a.batch, a.seq, a.new_tokens, a.reps, a.warmup), peak_tflops(name, a.peak_tflops))


if __name__ == "__main__":
    main()
