"""Ouro-1.4B's exact shape on this machine: a random-weight checkpoint in the published layout,
`ouro-lab inspect` on it, load time, peak resident memory and a trace pass.

    python bench/ouro_1p4b.py                         # writes $TMPDIR/ouro-lab-1p4b once (2.9 GB)
    python bench/ouro_1p4b.py --dir D --docs 3 --dtype float32 --threads 2
    python bench/ouro_1p4b.py --device cuda --dtype bfloat16 --docs 64   # a GPU: TFLOP/s vs its peak

The checkpoint (never commit it): `config.json` with the published config's fields (hub
layout: top-level `rope_theta`, `rope_scaling: null`, `torch_dtype: bfloat16`, `auto_map`;
vocab 49152, hidden 2048, intermediate 5632, 16 heads of 128, 24 layers, 4 steps, rope
theta 1e6, untied head, bos = eos = pad = 0), bfloat16 weights (seeded normal, std 0.02;
norms 1, gate bias 0) in `model-0000i-of-0000n.safetensors` shards of at most `--shard-gb`
listed by `model.safetensors.index.json` (`metadata.total_size`, `weight_map`), and a
word-level tokenizer of exactly 49,152 ids. Weights are written shard by shard: writing
never holds the whole model.

Each measurement runs in a fresh interpreter, so its peak resident memory (`ru_maxrss`) is
its own:
- inspect: `ouro-lab inspect DIR` (its output and wall time);
- load: `load_model(DIR, dtype)`: wall time and peak RSS over the bytes of the loaded
  weights (goal <= 1.2);
- trace: `trace_pass` over `--docs` MMLU-shaped documents (lm-eval's own `mmlu_anatomy`
  task on a local copy in the hub's layout: 5-shot prompts first_n from dev, questions of
  ~40 words, 4 one-token choices) at full depth in `--dtype` on CPU: tokens run through the
  model, tokens/s, achieved GFLOP/s (FLOPs of the prefix tree's tokens: `trace.meta["work"]`),
  CPU seconds (on a shared machine wall time is not the process's own), peak RSS, and the
  accuracy lm-eval scores (chance: the weights are random).

The last line is `ratio: X`, the load's peak RSS over the weights' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tokenizer and hub-layout writers the tests use

# The published Ouro-1.4B config.json, field for field (values of the official config class
# where the model card states none: initializer_range, max_window_layers, sliding_window).
PUBLISHED_CONFIG = {
    "architectures": ["OuroForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig", "AutoModel": "modeling_ouro.OuroModel",
                 "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
    "early_exit_threshold": 1.0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 65536,
    "max_window_layers": 28,
    "model_type": "ouro",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "total_ut_steps": 4,
    "transformers_version": "4.55.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 49152,
}
SPECIAL = ["<|endoftext|>", "<|im_end|>", "<unk>"]  # id 0 is bos = eos = pad, as published
TEMPLATE = ["The", "following", "are", "multiple", "choice", "questions", "(with", "answers)", "about",
            "anatomy.", "A.", "B.", "C.", "D.", "Answer:", "A", "B", "C", "D"]
N_WORDS = 4000  # question / choice vocabulary


def default_dir() -> Path:
    return Path(tempfile.gettempdir()) / "ouro-lab-1p4b"


def peak_rss() -> int:
    """Peak resident set size of this process, bytes (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def write_checkpoint(path: Path, config: dict | None = None, shard_gb: float = 1.0, seed: int = 0) -> Path:
    """A random checkpoint of `config` (default: the published 1.4B one) in the published
    layout, written shard by shard; the tokenizer has exactly `vocab_size` ids."""
    import torch
    from harness_helpers import make_tokenizer
    from safetensors.torch import save_file

    from ouro_lab.model import OuroConfig, OuroForCausalLM

    config = dict(config or PUBLISHED_CONFIG)
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in OuroForCausalLM(OuroConfig.from_dict(config)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    limit, shards, current, size, total = int(shard_gb * 2**30), [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            tmp = path / f".shard-{len(shards)}.tmp"
            save_file(current, str(tmp), metadata={"format": "pt"})
            shards.append((tmp, list(current)))
            current, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(shape)
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        t = t.to(torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if size + nbytes > limit:
            flush()
        current[name] = t
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, path / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    words = (TEMPLATE + [f"w{i}" for i in range(N_WORDS)])[:config["vocab_size"] - len(SPECIAL)]
    make_tokenizer(words, size=config["vocab_size"], special=SPECIAL).save_pretrained(str(path))
    return path


def write_mmlu_copy(root: Path, docs: int, seed: int = 0, question_words: int = 40) -> Path:
    """A local cais/mmlu copy (config anatomy): 5 dev rows (the shots) and `docs` test rows,
    questions of ~`question_words` words, choices of 3-6 words."""
    from hub_copies import write_hub_dataset

    rng = random.Random(seed)

    def text(n):
        return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(n))

    def rows(n):
        return [{"question": text(rng.randint(question_words // 2, question_words * 3 // 2)),
                 "subject": "anatomy", "choices": [text(rng.randint(3, 6)) for _ in range(4)],
                 "answer": rng.randrange(4)} for _ in range(n)]

    write_hub_dataset(root / "cais" / "mmlu", {"anatomy": {"dev": rows(5), "test": rows(docs)}})
    return root


def weights_bytes(path: Path, dtype: str) -> int:
    from ouro_lab.flops import ModelCost
    from ouro_lab.loading import read_config

    return ModelCost.from_config(read_config(path)).weight_bytes(dtype)


# --------------------------------------------------------------------------- children (fresh processes)


def child_load(path: Path, dtype: str) -> dict:
    from ouro_lab.loading import load_model

    before = peak_rss()
    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype, device="cpu")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": peak_rss(), "rss_before": before,
            "params": model.num_parameters(), "weights_bytes": weights_bytes(path, dtype)}


def child_trace(path: Path, dtype: str, docs: int, batch_size: int, device: str = "cpu") -> dict:
    import logging

    import torch

    from ouro_lab.loading import load_model, load_tokenizer
    from ouro_lab.registry import make_strategy
    from ouro_lab.scoring import score
    from ouro_lab.tasks import TaskSet
    from ouro_lab.tracing import trace_pass

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    data = write_mmlu_copy(Path(tempfile.mkdtemp(prefix="ouro-1p4b-mmlu-")), docs)
    model = load_model(path, dtype=dtype, device=device)
    tok = load_tokenizer(path)
    ts = TaskSet(["mmlu_anatomy"], data_root=data, num_fewshot=5)
    rss_loaded = peak_rss()
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    t0, c0 = time.perf_counter(), time.process_time()
    trace, units = trace_pass(model, tok, ts, batch_size=batch_size)
    sync()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    work = trace.meta["work"]
    lengths = [len(u.ctx) + len(u.cont) - 1 for u in units]
    metrics, _ = score(ts, trace, make_strategy("fixed", {"step": model.config.total_ut_steps}),
                       bootstrap_iters=0)
    acc = next(r["value"] for r in metrics if r["metric"] == "acc")
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens_run": work["tokens_run"], "requests": len(units),
            "prefix_tree_tokens": work["prefix_tree_tokens"], "requested_tokens": work["requested_tokens"],
            "scored_tokens": int(trace.request.numel()), "mean_request_tokens": sum(lengths) / len(units) + 1,
            "flops": work["flops"],
            "peak_rss": peak_rss(), "rss_loaded": rss_loaded, "acc": acc, "threads": torch.get_num_threads(),
            "device": str(model.device), "device_name": torch.cuda.get_device_name(model.device)
            if model.device.type == "cuda" else "cpu"}


def run_child(kind: str, args) -> dict:
    """One measurement in a fresh interpreter; its result comes back as a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", kind, "--result", str(result), "--dir", str(args.dir),
               "--dtype", args.dtype, "--docs", str(args.docs), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--device", args.device]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode or not result.is_file():
            raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
        return json.loads(result.read_text())


def inspect(path: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ouro_lab.cli", "inspect", str(path)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(f"ouro-lab inspect failed:\n{r.stderr[-3000:]}")
    return r.stdout.strip(), time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=default_dir(), help="checkpoint folder (written if absent)")
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16 (a GPU)")
    p.add_argument("--docs", type=int, default=3, help="MMLU-shaped test documents to trace")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="the trace pass's device (load is measured on the CPU)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak (default: known GPUs)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--child", choices=["load", "trace"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        out = (child_load(args.dir, args.dtype) if args.child == "load"
               else child_trace(args.dir, args.dtype, args.docs, args.batch_size, args.device))
        args.result.write_text(json.dumps(out))
        return out
    if not (args.dir / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(args.dir, shard_gb=args.shard_gb)
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.0f} s")
    files = sorted(args.dir.glob("model-*.safetensors"))
    gib = 2**30
    on_disk = sum(f.stat().st_size for f in files) / gib
    print(f"checkpoint: {args.dir}: {len(files)} shards, {on_disk:.2f} GiB on disk (bfloat16)")
    text, secs = inspect(args.dir)
    print(f"$ ouro-lab inspect {args.dir}   ({secs:.1f} s)\n{text}")
    load = run_child("load", args)
    ratio = load["peak_rss"] / load["weights_bytes"]
    print(f"load ({args.dtype}, cpu): {load['seconds']:.1f} s; weights {load['weights_bytes'] / gib:.2f} "
          f"GiB; peak RSS {load['peak_rss'] / gib:.2f} GiB = {ratio:.3f}x the weights (goal <= 1.2; "
          f"{load['rss_before'] / gib:.2f} GiB before loading)")
    tr = run_child("trace", args)
    print(f"trace pass ({args.dtype}, {tr['device']}, {tr['threads']} thread(s), batch {args.batch_size}): "
          f"{args.docs} MMLU-shaped documents, {tr['requests']} requests of {tr['mean_request_tokens']:.0f} "
          f"tokens on average ({tr['requested_tokens']:,} tokens one sequence per request; prefix tree "
          f"{tr['prefix_tree_tokens']:,}); {tr['tokens_run']:,} tokens run in {tr['seconds']:.1f} s = "
          f"{tr['tokens_run'] / tr['seconds']:.1f} tokens/s, {tr['flops'] / tr['seconds'] / 1e9:.1f} "
          f"GFLOP/s ({tr['cpu_seconds']:.1f} CPU s: {tr['tokens_run'] / tr['cpu_seconds']:.1f} tokens per "
          "CPU second); "
          f"peak RSS {tr['peak_rss'] / gib:.2f} GiB ({tr['rss_loaded'] / gib:.2f} after loading); "
          f"acc {tr['acc']:.3f} (random weights)")
    if tr["device"].startswith("cuda"):
        import importlib.util

        spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "bench" / "gpu_throughput.py")
        gpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu)
        peak = gpu.peak_tflops(tr["device_name"], args.peak_tflops)
        achieved = tr["flops"] / tr["seconds"] / 1e12
        print(f"{tr['device_name']}: {achieved:.1f} TFLOP/s achieved"
              + (f" = {achieved / peak:.1%} of its {peak:.0f} TFLOP/s dense peak" if peak else ""))
    print(f"ratio: {ratio:.3f}")
    return {"load": load, "trace": tr, "ratio": ratio}


if __name__ == "__main__":
    main()
