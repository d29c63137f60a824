"""bench/model_throughput.py runs end to end on a tiny config (no timing asserted)."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_throughput_prints_the_ratio_last(capsys):
    bench = _load_bench("model_throughput")
    cfg = bench.bench_config(hidden=32, layers=2, steps=2, heads=4, vocab=64)
    r = bench.measure(cfg, batch=2, seq=16, reps=2, warmup=0)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio (model / bare matmul GFLOP/s): ")
    assert float(lines[-1].rsplit(" ", 1)[1]) == round(r["ratio"], 3)
    assert any(line.startswith("peak memory (ru_maxrss)") for line in lines)
    # the model's FLOPs are the causal count; the bare reference does full score matrices
    assert 0 < r["model_flops"] < r["bare_flops"]


def test_main_accepts_the_documented_flags(capsys):
    bench = _load_bench("model_throughput")
    bench.main(["--hidden", "32", "--layers", "1", "--steps", "2", "--heads", "2", "--vocab", "64",
                "--batch", "1", "--seq", "8", "--reps", "1"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio")


def test_live_speed_bench_runs_every_part_and_prints_the_ratio_last(capsys):
    """bench/live_speed.py on a tiny shape: every case, mixed depth, the speculation part on
    the demo task (its output identical to plain greedy); no timing asserted."""
    bench = _load_bench("live_speed")
    bench.main(["--shape", "tiny", "--batches", "1,2", "--prompts", "8,24", "--tokens", "2", "--reps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0
    cases = [x for x in lines if "measured/ideal" in x and "k=" in x and not x.startswith("  dispatch")]
    assert len(cases) == 2 * 2 * 2 * 3  # batches x prompts x policies x k = 1 .. R-1
    mixed = [x for x in lines if "mixed depth, batch 2" in x]
    assert len(mixed) == 2 and all(float(x.split("full / mixed, ")[1].split("x")[0]) > 1 for x in mixed)
    goals = [x for x in lines if x.startswith("    goals, on the unrounded medians: ")]
    assert len(goals) == 2 and all("of 12 cases" in x and "full depth <= 1.05x: " in x for x in goals)
    dispatch = [x for x in lines if x.startswith("  dispatch, batch ")]
    assert len(dispatch) == 2 and all(len(re.findall(r"\d ops, ", x)) == 8 and x.count("without it") == 6
                                     for x in dispatch)
    floors = [x for x in lines if x.startswith("  batch ") and "floor" in x]
    assert len(floors) == 2 and all(float(x.split("floor ")[1].split("x")[0]) > 0 for x in floors)
    merged = [x for x in lines if "a call per column / rows within" in x]
    assert len(merged) == 1 and merged[0].endswith("identical output: yes")
    verify = [x for x in lines if "a full-depth pass over T tokens per row / over one" in x]
    assert len(verify) == 2 and all(all(f"T={T} " in x for T in (2, 3, 5)) for x in verify)
    spec = [x for x in lines if "tokens/round: speed-up" in x]
    assert len(spec) == 6 and all(x.endswith("identical output: yes") for x in spec)


def test_live_speed_read_sizes_count_the_published_shapes():
    """The bytes a tick reads, from the config's shapes (not from the module's parameters):
    per layer q, k, v, o, the three MLP matrices and four norms; the head; K and V."""
    import torch

    bench = _load_bench("live_speed")
    model = bench.build_model("tiny", torch.float32, "cpu")
    c = model.config
    H, inter, hd = c.hidden_size, c.intermediate_size, c.head_dim
    layer = H * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * H * inter + 4 * H
    assert bench.read_sizes(model) == (4 * c.num_hidden_layers * layer, 4 * c.vocab_size * H,
                                       4 * 2 * c.num_hidden_layers * c.num_key_value_heads * hd)
    assert bench.read_sizes(model.to(torch.bfloat16))[1] == 2 * c.vocab_size * H


def test_live_speed_growth_floor_counts_every_slot_of_every_row():
    """The floor reads the K/V of every (step, layer) of every row over the long prompt's keys
    and adds it, at the given rate, to the rest of a short-prompt token."""
    import torch

    bench = _load_bench("live_speed")
    model = bench.build_model("tiny", torch.float32, "cpu")
    cfg = model.config
    f = bench.growth_floor(model, 3, 8, 40, 4, t_lo=0.5)
    ctx = 40 + 1 + 2
    per_token = cfg.total_ut_steps * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert f["kv_bytes"] == 3 * ctx * per_token
    assert 0 < f["attn_lo"] < 0.5 and f["rest"] == 0.5 - f["attn_lo"]
    assert bench.floor(f, 1e9) == (f["rest"] + f["kv_bytes"] / 1e9) / 0.5


# --------------------------------------------------------------------------- bench/gpu_throughput.py


def test_gpu_bench_peak_table():
    g = _load_bench("gpu_throughput")
    assert g.peak_tflops("NVIDIA H200") == g.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert g.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert g.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert g.peak_tflops("NVIDIA L40S") == 362.0 and g.peak_tflops("NVIDIA L4") == 121.0
    assert g.peak_tflops("NVIDIA A10G") == 70.0 and g.peak_tflops("NVIDIA A10") == 125.0
    assert g.peak_tflops("Some Future GPU") is None
    assert g.peak_tflops("NVIDIA H200", override=500) == 500.0


def test_gpu_bench_default_shapes_are_ouro_1_4b_and_2_6b():
    from ouro_lab.flops import OURO_1_4B, OURO_2_6B, ModelCost

    g = _load_bench("gpu_throughput")
    assert ModelCost.from_config(g.ouro_config()) == OURO_1_4B
    assert ModelCost.from_config(g.ouro_config(layers=48)) == OURO_2_6B


def test_gpu_bench_flop_accounting_matches_counted_matmuls():
    """prefill_flops / decode_flops equal torch's FlopCounterMode count of what forward and
    generate run (attention scores apart: the counter skips masked SDPA)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ouro_lab.flops import ModelCost

    g = _load_bench("gpu_throughput")
    cfg = g.ouro_config(layers=2, steps=3, vocab=64, hidden=32, intermediate=64, heads=4, max_positions=64)
    model = g.random_model(cfg, "cpu", torch.float32)
    cost = ModelCost.from_config(cfg)
    B, P, n, R = 2, 7, 5, 3
    ids = torch.randint(0, 64, (B, P))
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            model(ids).logits(-1)
        pre = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.generate(ids, max_new_tokens=n)
        gen = fc.get_total_flops()

    def attn(ctx_sum):
        return B * R * cost.attn_flops_per_ctx * ctx_sum

    assert pre == g.prefill_flops(cost, B, P, R) - attn(P * (P + 1) / 2)
    gen_prefill = pre - B * (P - 1) * cost.head_flops  # generate reads the head at the last position only
    assert gen - gen_prefill == g.decode_flops(cost, B, P, n, R) - attn(sum(P + i for i in range(1, n)))
    assert g.decode_flops(cost, 1, P, n, R) == cost.sequence_flops(n - 1, R, readouts=1, past=P)


def test_gpu_bench_measure_runs_on_any_device_and_reports(capsys):
    import torch

    g = _load_bench("gpu_throughput")
    cfg = g.ouro_config(layers=1, steps=2, vocab=64, hidden=32, intermediate=64, heads=4, max_positions=64)
    r = g.measure(g.random_model(cfg, "cpu", torch.bfloat16), batch=2, seq=8, new_tokens=3, reps=1, warmup=0)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_mem_gib"] is None
    g.report(r, 989.0)
    g.report(r, None)
    out = capsys.readouterr().out
    assert "% of the 989 TFLOP/s dense bf16 peak" in out and "pass --peak-tflops" in out


def test_gpu_bench_without_cuda_exits_with_one_line():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    g = _load_bench("gpu_throughput")
    with pytest.raises(SystemExit) as e:
        g.main([])
    assert "no CUDA device" in str(e.value) and "\n" not in str(e.value)


def test_memory_table_numbers(capsys):
    from ouro_lab.flops import OURO_1_4B

    m = _load_bench("memory_table")
    (ctx, w, kv, shared, total), = m.rows(OURO_1_4B, [4096], [1, 4])
    assert kv[4] == 3.0 and kv[1] == shared == 0.75  # 4096 tokens x 4 steps x 192 KiB = 3 GiB
    assert w == OURO_1_4B.params * 2 / 2**30 and total[4] == w + 3.0
    m.main(["--contexts", "4096", "--batch", "2"])
    out = capsys.readouterr().out
    assert "| Ouro-1.4B | 4,096 | 2.67 | 1.50 | 3.00 | 4.50 | 6.00 | 1.50 | 8.67 | 4.17 |" in out


# --------------------------------------------------------------------------- bench/trace_cost.py


def test_trace_cost_runs_and_counts_the_work(capsys):
    """Tiny shapes, one repeat: every set's work ratio is computed from an independent trie and
    the last line is the mmlu-like wall ratio (no timing asserted)."""
    bench = _load_bench("trace_cost")
    out = bench.main(["--hidden", "32", "--intermediate", "64", "--heads", "2", "--layers", "1",
                      "--steps", "2", "--vocab", "128", "--repeats", "1", "--docs", "2",
                      "--hellaswag-docs", "2", "--demo-docs", "5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"ratio: {out['mmlu-like']['wall']:.3f}"
    for name in ("mmlu-like", "hellaswag-like", "demo-mc"):
        assert 1.0 <= out[name]["work"] <= 1.05, (name, out[name])
    assert bench.prefix_tree_tokens([(1, 2, 3), (1, 2, 4), (1, 2), (5,)]) == 5


def test_live_speed_narrow_twin_dispatches_the_models_ops():
    """The dispatch part's twin (same depth and heads, next to no width) runs exactly the
    ops the model runs, method by method, GQA included; each extra loop step adds the same
    number of ops (no K/V copies under `last`), and a step's ops are most of a token's."""
    bench = _load_bench("live_speed")
    for cfg in (bench.SHAPES["tiny"], dict(bench.SHAPES["tiny"], num_key_value_heads=2)):
        model = bench.init_weights(bench.OuroForCausalLM(bench.OuroConfig(**cfg)), seed=0).eval()
        twin = bench.narrow_twin(model)
        c, t = model.config, twin.config
        assert (t.num_hidden_layers, t.total_ut_steps, t.num_attention_heads, t.num_key_value_heads) == (
            c.num_hidden_layers, c.total_ut_steps, c.num_attention_heads, c.num_key_value_heads)
        assert t.hidden_size * t.intermediate_size < c.hidden_size * c.intermediate_size
        ops = bench.op_counts(bench.decoders(model, 2, 8, 2, [1, 2, 3]), 2)
        assert ops == bench.op_counts(bench.decoders(twin, 2, 8, 2, [1, 2, 3]), 2)
        last = [ops[f"last k={k}"] for k in (1, 2, 3)]
        assert last[1] - last[0] == last[2] - last[1] > last[0] / 2
        assert ops["copy k=4 (full depth)"] > 3 * (last[1] - last[0])


def test_live_speed_dispatch_line_takes_the_twins_time_off_both_sides():
    """measured/ideal on one basis, generate's median over the case's: as timed, then with
    each side's twin time taken off, (generate - its twin) / (case - its twin) over the
    ideal; n/a where the twin took as long as the model."""
    bench = _load_bench("live_speed")
    cost = {"copy k=1": (100, 0.001), "generate": (400, 0.004)}
    line = bench.show_dispatch(cost, {"copy k=1": 0.003, "generate": 0.012}, {"copy k=1": 3.0})
    assert "copy k=1 100 ops, 1.00 ms (33% of 3.0), measured/ideal 1.333 as timed, 1.333 without it" in line
    assert "generate 400 ops, 4.00 ms (33% of 12.0)" in line and line.count("without it") == 1
    line = bench.show_dispatch(cost, {"copy k=1": 0.004, "generate": 0.012}, {"copy k=1": 3.0})
    assert "measured/ideal 1.000 as timed, 0.889 without it" in line  # 8 / 3 over 3
    slow = bench.show_dispatch(cost, {"copy k=1": 0.001, "generate": 0.012}, {"copy k=1": 3.0})
    assert "without it: n/a" in slow
