"""ouro_lab.distributed: sharding and ordered gathering, single-process no-ops, and a real
2-process gloo world on localhost (spawned, a free port)."""

from __future__ import annotations

import os
import socket

import pytest

from ouro_lab import distributed as D


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
