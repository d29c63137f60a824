"""bench/model_throughput.py runs end to end on a tiny config (no timing asserted)."""

import importlib.util
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
