"""Data parallelism across processes: who am I, which requests are mine, gather the results.

Launch any ouro-lab entry point as lm-eval users launch data-parallel runs:

    torchrun --nproc-per-node 8 -m ouro_lab.cli sweep recipe.yaml
    accelerate launch --num_processes 8 -m ouro_lab.cli sweep recipe.yaml

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init()`
reads them and starts torch.distributed (gloo on CPU, nccl on CUDA). Without them (a
plain `python` / `ouro-lab` run) nothing is started and every function here is a
no-op: rank 0 of a world of 1 owns everything and gathers its own list.

The pattern, used by the trace pass and by live generation (SPMD: every rank runs the
same code and reaches the same collective calls in the same order):

    plan = list(batches(...))                     # the single-process batch plan
    mine = [b for i, b in enumerate(plan) if owns(i)]   # strided: ranks balance
    results = merge(per_item_results_with_None_where_not_mine)

Work is sharded by *batch of the single-process plan*, not by request: every batch
a rank runs is exactly a batch the single-process run runs (same members, same padding,
same shapes), so results are bit-identical to a single-process run on the same device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ouro_lab.errors import OuroLabError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(OuroLabError):
    """A launcher environment that cannot start torch.distributed."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, nothing initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> World:
    """This process's place: from torch.distributed when initialised, else rank 0 of 1."""
    dist = _dist()
    if dist is None:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 str(dist.get_backend()))


def rank() -> int:
    return world().rank


def world_size() -> int:
    return world().size


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files."""
    return world().is_main


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process in a world > 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init(device: str | None = None, timeout_s: float | None = None) -> World:
    """Start torch.distributed from the launcher's environment variables, once.

    `device` is the device the model will run on ("cpu", "cuda", "cuda:3"; None or
    "auto" = the best available, as `load_model` picks it): CUDA gets nccl and
    `torch.cuda.set_device(LOCAL_RANK)`, anything else gloo. Without a launcher
    (WORLD_SIZE unset or 1) nothing is started and rank 0 of 1 is returned.

    `timeout_s` (default $OURO_LAB_DIST_TIMEOUT, else 6 hours) bounds how long a rank
    waits in a collective: in a sweep the other ranks wait while rank 0 alone replays
    every setting, which on large task sets takes longer than torch's 30-minute default.
    """
    if not launched() or _dist() is not None:
        return world()
    missing = [k for k in ENV_VARS if k not in os.environ]
    if missing:
        raise DistributedError(f"environment: WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                               "unset; launch with torchrun or accelerate launch, or unset WORLD_SIZE")
    import torch
    import torch.distributed as dist

    auto = device is None or str(device) == "auto"
    cuda = torch.cuda.is_available() if auto else str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"model.device: {device!r} but no CUDA device is visible; use cpu")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            timeout=timedelta(seconds=timeout_s or _timeout_from_env()))
    return world()


def _timeout_from_env() -> float:
    raw = os.environ.get("OURO_LAB_DIST_TIMEOUT", "21600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"environment: OURO_LAB_DIST_TIMEOUT={raw!r} is not a positive number of "
                               "seconds; set e.g. OURO_LAB_DIST_TIMEOUT=21600 or unset it")
    return value


def local_device(device: str | None) -> str | None:
    """The device this rank should load its model on: in a multi-process run `cuda` (and
    None or "auto", the best available, when that is CUDA) becomes `cuda:<LOCAL_RANK>`,
    one GPU per process; anything else is returned unchanged."""
    if device not in (None, "auto", "cuda") or not launched():
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


def shutdown() -> None:
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


# --------------------------------------------------------------------------- sharding


def owns(index: int, w: World | None = None) -> bool:
    """Whether item `index` of a shared plan (a batch, a request) belongs to this rank:
    strided, so a length-sorted plan gives every rank long and short items alike."""
    w = w or world()
    return index % w.size == w.rank


def shard(lengths: Sequence[int], w: World | None = None) -> list[int]:
    """Indices of the requests this rank handles: requests sorted by length (longest
    first, ties by index) and dealt round-robin, so every rank gets a balanced share.
    Deterministic: the same on every rank; the shards partition range(len(lengths))."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return sorted(i for k, i in enumerate(order) if owns(k, w))


# --------------------------------------------------------------------------- gathering


def _to_cpu(obj: Any) -> Any:
    """Tensors (also inside lists, tuples and dicts) moved to the CPU, so that pickled
    results unpickle on any rank whatever device produced them."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def all_gather(obj: Any) -> list:
    """Every rank's `obj` (picklable; tensors come back on the CPU), in rank order, on
    every rank. A single process gets `[obj]`."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, _to_cpu(obj))
    return out


def gather(obj: Any, dst: int = 0) -> list | None:
    """Every rank's `obj` in rank order on rank `dst`; None elsewhere."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    if dist.get_backend() == "nccl":  # gather_object needs the gathering rank's device set; keep it simple
        got = all_gather(obj)
        return got if dist.get_rank() == dst else None
    dist.gather_object(_to_cpu(obj), out, dst=dst)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (e.g. a decision only rank 0 may take)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [_to_cpu(obj)]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def merge(slots: list, everywhere: bool = True) -> list | None:
    """Combine per-item results computed on different ranks: each rank passes the full
    list with its own items filled in and None in the others'. Returns the list with
    every slot filled, in the original order, on every rank (`everywhere`) or on rank 0
    only (None elsewhere). Each slot must be filled by exactly one rank."""
    w = world()
    if w.size == 1:
        return slots
    parts = all_gather(_sparse(slots)) if everywhere else gather(_sparse(slots))
    if parts is None:
        return None
    out: list = [None] * len(slots)
    filled = [False] * len(slots)
    for part in parts:
        for i, v in part:
            if filled[i]:
                raise RuntimeError(f"distributed.merge: item {i} computed by two ranks")
            out[i], filled[i] = v, True
    if not all(filled):
        raise RuntimeError(f"distributed.merge: item {filled.index(False)} computed by no rank")
    return out


def _sparse(slots: list) -> list[tuple[int, Any]]:
    return [(i, v) for i, v in enumerate(slots) if v is not None]


def gather_ordered(local: list, indices: Sequence[int], n: int, everywhere: bool = True) -> list | None:
    """Results of the requests `indices` (this rank's shard, e.g. from `shard`) back into
    one list of length `n` in the original request order (see `merge`)."""
    if len(local) != len(indices):
        raise ValueError(f"gather_ordered: {len(local)} results for {len(indices)} indices")
    slots: list = [None] * n
    for i, v in zip(indices, local, strict=True):
        slots[i] = _Box(v)
    got = merge(slots, everywhere)
    return None if got is None else [b.value for b in got]


@dataclass(frozen=True)
class _Box:
    """Wraps results so that a legitimate None result is not mistaken for a missing one."""

    value: Any


__all__ = ["World", "DistributedError", "world", "rank", "world_size", "is_main", "launched", "init",
           "local_device", "shutdown", "barrier", "owns", "shard", "all_gather", "gather", "broadcast",
           "merge", "gather_ordered"]
