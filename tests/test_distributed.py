"""ouro_lab.distributed: sharding and ordered gathering, single-process no-ops, and a real
2-process gloo world on localhost (spawned, a free port)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ouro_lab import distributed as D

ROOT = Path(__file__).resolve().parents[1]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, nprocs: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    D.init("cpu", timeout_s=120)
    try:
        fn(*args)
    finally:
        D.shutdown()


def run_world(fn, *args, nprocs: int = 2) -> None:
    """Run `fn(*args)` in `nprocs` spawned processes forming a gloo world, as torchrun
    would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A failure in any
    process fails the caller."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)


# --------------------------------------------------------------------------- single process


def test_single_process_is_rank_0_of_1_and_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init("cpu") == D.World(0, 1, 0, None)
    assert D.world().is_main and D.is_main() and D.rank() == 0 and D.world_size() == 1
    assert D.shard([3, 1, 2]) == [0, 1, 2]
    assert D.all_gather("x") == ["x"] and D.gather("x") == ["x"] and D.broadcast(5) == 5
    assert D.gather_ordered(["a", None, "c"], [0, 1, 2], 3) == ["a", None, "c"]
    D.barrier()
    D.shutdown()


def test_shard_partitions_and_balances_by_length():
    lengths = [5, 50, 7, 49, 1, 30, 31, 2, 8]
    shards = [D.shard(lengths, D.World(r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in s) for s in shards]
    assert max(totals) - min(totals) <= max(lengths) - min(lengths)
    assert [len(s) for s in shards] == [3, 3, 3]
    # strided over the longest-first order: rank 0 gets the longest, rank 1 the second, ...
    assert 1 in shards[0] and 3 in shards[1] and 6 in shards[2]
    assert D.owns(4, D.World(1, 3)) and not D.owns(4, D.World(0, 3))


def test_init_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(D.DistributedError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset"):
        D.init("cpu")


def test_init_refuses_cuda_without_a_gpu(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(D.DistributedError, match="no CUDA device"):
        D.init("cuda")
    assert D.local_device("cpu") == "cpu"


# --------------------------------------------------------------------------- two processes


def _collectives_worker(out_path: str) -> None:
    import json

    import torch

    w = D.world()
    assert (w.size, w.backend) == (2, "gloo") and w.rank == int(os.environ["RANK"])
    lengths = [9, 3, 7, 1, 5, 8]
    mine = D.shard(lengths)
    results = [f"r{i}" if i != 4 else None for i in mine]  # a real None result survives
    ordered = D.gather_ordered(results, mine, len(lengths))
    assert ordered == [f"r{i}" if i != 4 else None for i in range(6)]
    on_main = D.gather_ordered(results, mine, len(lengths), everywhere=False)
    assert (on_main == ordered) if w.is_main else on_main is None
    # tensors come back on the CPU, in the original order
    slots = [torch.full((2,), float(i)) if D.owns(i) else None for i in range(5)]
    merged = D.merge(slots)
    assert all(torch.equal(t, torch.full((2,), float(i))) for i, t in enumerate(merged))
    assert D.broadcast(w.rank + 10) == 10
    assert D.gather(w.rank) == ([0, 1] if w.is_main else None)
    assert D.all_gather(w.rank) == [0, 1]
    try:
        D.merge([1, None])  # both ranks fill item 0
    except RuntimeError as e:
        assert "two ranks" in str(e)
    else:
        raise AssertionError("a doubly computed item was not detected")
    D.barrier()
    if w.is_main:
        with open(out_path, "w") as f:
            json.dump({"mine0": mine, "ordered": ordered}, f)


def test_two_gloo_processes_shard_and_gather_in_order(tmp_path):
    import json

    out = tmp_path / "out.json"
    run_world(_collectives_worker, str(out))
    got = json.loads(out.read_text())
    assert got["mine0"] == D.shard([9, 3, 7, 1, 5, 8], D.World(0, 2)) == [0, 1, 2]
    assert got["ordered"][:4] == ["r0", "r1", "r2", "r3"]


# --------------------------------------------------------------------------- a sweep on 2 processes


def test_sweep_on_two_gloo_processes_equals_one_process(tmp_path, monkeypatch):
    """The demo model and tasks (loop_demo_mc: trace pass + replay + a live early-exit run;
    loop_demo_gen: every setting decoded live) swept by `torchrun --nproc-per-node 2 -m
    ouro_lab.cli sweep` and by one process: identical metrics.csv (byte for byte, every
    metric and compute column), exit counts and per-sample rows (wall seconds apart).
    Exact, no tolerance: each rank runs whole batches of the single-process batch plan,
    so every number comes from the same arithmetic on the same shapes."""
    import json
    import signal
    import subprocess
    import sys

    import pandas as pd

    from ouro_lab.sweep import run_sweep

    mdir = ROOT / "ouro_lab" / "builtin" / "loop-demo"
    tasks = tmp_path / "tasks"  # the demo task YAMLs over every k-th document (all difficulties)
    (tasks / "data").mkdir(parents=True)
    for name, k in (("loop_demo_mc", 45), ("loop_demo_gen", 2)):  # gen: 40 docs, 3 chunks of 4 batches
        (tasks / f"{name}.yaml").write_text((ROOT / "tasks" / f"{name}.yaml").read_text())
        docs = (ROOT / "tasks" / "data" / f"{name}.jsonl").read_text().splitlines()[::k]
        (tasks / "data" / f"{name}.jsonl").write_text("\n".join(docs) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "# ouro-lab sweep recipe.yaml\n"
        f"model: {{path: {mdir}, dtype: float32, device: cpu}}\n"
        f"tasks: {{names: [loop_demo_mc, loop_demo_gen], include: [{tasks}]}}\n"
        "strategies:\n"
        "  - {name: threshold, grid: {q: [0.5]}, live: true}\n"
        "  - {name: confidence, grid: {tau: [0.9]}}\n"
        "live: {kv_policy: copy}\nseed: 1\nbootstrap: 100\nbatch_size: 4\n")
    env = dict(os.environ, OURO_LAB_CACHE=str(tmp_path / "cache2"), OURO_LAB_PROGRESS="0",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "ouro_lab.cli", "sweep", str(recipe),
           "--out", str(tmp_path / "two")]
    two = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # its own group: killed whole below
    try:  # the single-process run meanwhile, here
        monkeypatch.setenv("OURO_LAB_CACHE", str(tmp_path / "cache1"))
        monkeypatch.setenv("OURO_LAB_PROGRESS", "0")
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        one = run_sweep(recipe, out=tmp_path / "one")
        log, _ = two.communicate(timeout=300)
    finally:
        if two.poll() is None:  # a failure here or a hang: stop torchrun and its workers
            os.killpg(two.pid, signal.SIGKILL)
            two.wait()
    assert two.returncode == 0, log[-3000:]
    two_dir = tmp_path / "two"
    from ouro_lab.tables import TIMING

    m1, m2 = pd.read_csv(one / "metrics.csv"), pd.read_csv(two_dir / "metrics.csv")
    assert m1[list(TIMING)].notna().any().all()  # live rows measure their time, so only these may differ
    pd.testing.assert_frame_equal(m1.drop(columns=list(TIMING)), m2.drop(columns=list(TIMING)),
                                  check_exact=True)
    assert (one / "exits.csv").read_bytes() == (two_dir / "exits.csv").read_bytes()
    s1, s2 = pd.read_parquet(one / "samples.parquet"), pd.read_parquet(two_dir / "samples.parquet")
    cols = [c for c in s1.columns if c != "seconds"]
    pd.testing.assert_frame_equal(s1[cols], s2[cols], check_exact=True)
    m = pd.read_csv(one / "metrics.csv")
    assert {"loop_demo_mc", "loop_demo_gen"} <= set(m.task) and {"replay", "live"} <= set(m["run_mode"])
    assert m.value.nunique() > 1 and len(s1) > 50  # real, varied numbers were compared
    # the work was really split: rank 0 ran about half the batches, in the trace pass and live
    p1, p2 = (json.loads((d / "provenance.json").read_text()) for d in (one, two_dir))
    work = p1["trace"]["work"]  # 9 docs x 10 one-token choices: each context runs once
    assert p1["trace"]["forward_calls"] == work["calls"] == p2["trace"]["work"]["calls"]
    assert work["prefix_tree_tokens"] * 9 < work["requested_tokens"]
    # rank 0 runs its share of the plan's programs (here the whole tree fits in one call)
    n1, n2 = p1["trace"]["forward_calls"], p2["trace"]["forward_calls"]
    assert 0 < n2 <= n1 and (n1 == 1 or n2 < n1)
    live1 = p1["model_forward_calls"] - p1["trace"]["forward_calls"]
    live2 = p2["model_forward_calls"] - p2["trace"]["forward_calls"]
    assert 0 < live2 < live1
    # rank 0 alone wrote: the same files in both run folders, one cached trace
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list((tmp_path / "cache2").glob("trace-*"))) == 1


def test_collective_timeout_from_env(monkeypatch):
    monkeypatch.delenv("OURO_LAB_DIST_TIMEOUT", raising=False)
    assert D._timeout_from_env() == 21600.0
    monkeypatch.setenv("OURO_LAB_DIST_TIMEOUT", "90")
    assert D._timeout_from_env() == 90.0
    monkeypatch.setenv("OURO_LAB_DIST_TIMEOUT", "soon")
    with pytest.raises(D.DistributedError, match="OURO_LAB_DIST_TIMEOUT='soon'"):
        D._timeout_from_env()


def test_local_device_is_one_gpu_per_rank(monkeypatch):
    """(CUDA faked: only the mapping is tested.) In a launched world `cuda`, `auto` and None
    become cuda:<LOCAL_RANK>; explicit devices stay; a single process changes nothing."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.local_device("cuda") == "cuda" and D.local_device(None) is None
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert D.local_device("cuda") == D.local_device("auto") == D.local_device(None) == "cuda:1"
    assert D.local_device("cuda:3") == "cuda:3" and D.local_device("cpu") == "cpu"
