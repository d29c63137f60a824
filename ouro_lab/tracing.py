"""The trace pass: ONE full-depth pass over every loglikelihood request of a task set -> a Trace.

    trace, units = trace_pass(model, tok, taskset)   # cached on disk by content

The units are the taskset's `Scorer`'s requests (`ouro_lab.scoring`), encoded by
`OuroLM` and run through `ouro_lab.lm._units_forward` (each distinct prefix once:
`ouro_lab.prefix`) with every step's signals recorded (`ouro_lab.trace.step_signals`);
replay and scoring then need no model. `trace.meta["work"]` says what ran: tokens run,
the prefix tree's tokens, the tokens of one sequence per request, calls, FLOPs.

A cached trace is used only if its content checksum and key check out: a damaged one is
said in one line, recomputed and overwritten. A cache that cannot be written is said in
one line and the sweep goes on without it (`require_cache`: it stops instead).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ouro_lab import distributed
from ouro_lab.errors import OuroLabError
from ouro_lab.files import DiskFullError, human_bytes
from ouro_lab.flops import ModelCost
from ouro_lab.lm import LL_TYPES, HarnessError, OuroLM, Unit, _units_forward
from ouro_lab.scoring import _limit, scorer_for
from ouro_lab.tasks import TaskSet
from ouro_lab.trace import Trace, TraceDamagedError

# Bump when what a trace records, or how, changes: cached traces of another format are not reused.
# 2: trace files carry a content checksum
# 3: each distinct prefix computed once (ouro_lab.prefix): the same signals, computed in another
# arithmetic order (float32 values within 1e-5 relative of format 2's); work counts in meta.
TRACE_FORMAT = 4


class TraceCacheError(OuroLabError):
    """The trace cache was required (`--require-cache`) but cannot be written."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_fingerprint(model) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_units(taskset: TaskSet, lm: OuroLM) -> list[Unit]:
    """Every scored unit of every loglikelihood / rolling task of `taskset`, in lm-eval's
    request order. The requests are the taskset's Scorer's (built once, with the taskset's
    limit and reset few-shot seeds), so the trace pass and scoring share them."""
    units = []
    if taskset.chat is None:
        taskset.chat = lm.chat  # chat-formatted requests: the model's own tokenizer template
    scorer = scorer_for(taskset, ll_names(taskset))
    for name in scorer.instances:
        for inst in scorer.instances[name]:
            if inst.request_type == "loglikelihood":
                units.append(lm.unit(*inst.args, name, inst.doc_id, inst.idx))
            elif inst.request_type == "loglikelihood_rolling":
                for w, (c, x) in enumerate(lm.rolling_units(inst.args[0])):
                    units.append(Unit(tuple(c), tuple(x), name, inst.doc_id, inst.idx, w))
    return units


def _cache(trace: Trace, path: Path, say, require: bool) -> None:
    """Save the computed trace; failing to is one line, and the pass's work is kept."""
    try:
        trace.save(path)
        return
    except DiskFullError as e:
        problem = f"disk full ({human_bytes(e.free)} free)"
    except OSError as e:
        problem = f"{e.strerror or e}"
    if require:
        raise TraceCacheError(f"trace cache {path.parent}: could not write {path.name} ({problem}); free "
                              "space or point OURO_LAB_CACHE to a writable folder (required by "
                              "--require-cache)")
    say(f"trace cache {path.parent}: could not write {path.name} ({problem}); going on without caching "
        "this trace (the next run computes it again)")


def ll_names(taskset: TaskSet) -> list[str]:
    """The taskset's loglikelihood tasks (multiple choice, loglikelihood, rolling), sorted."""
    return sorted(taskset.names_of("multiple_choice", *LL_TYPES))


def trace_pass(model, tokenizer, taskset: TaskSet, batch_size: int = 8, cache_dir: str | Path | None = None,
               fingerprint: str | None = None, max_length: int | None = None, progress=None, log=None,
               require_cache: bool = False):
    """ONE full-depth pass over every loglikelihood request of every task in `taskset`,
    recording each scored token's signals at every step. Returns (Trace, units).

    Cached on disk under `cache_dir` by content (model fingerprint, dtype, steps, batch
    size, token ids of every unit): a second call with the same inputs runs no model
    pass. `fingerprint` (e.g. `ouro_lab.loading.fingerprint(path)`) saves hashing the
    weights of an in-memory model. `log(line)` hears about a damaged cached trace (it is
    recomputed and overwritten) and a trace that could not be cached (the pass goes on,
    unless `require_cache`); default: stderr."""
    say = log or _stderr
    lm = OuroLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    units = build_units(taskset, lm)
    if not units:
        raise HarnessError(f"tasks {', '.join(taskset.names)}: no loglikelihood requests to trace "
                           "(generate_until tasks run live: see ouro_lab.live)")
    content = hashlib.blake2b(digest_size=16)
    for u in units:
        content.update(json.dumps([u.task, u.doc_id, u.idx, u.window, u.ctx, u.cont]).encode())
    parts = dict(format=TRACE_FORMAT, model=fingerprint or _model_fingerprint(model), dtype=str(model.dtype),
                 steps=model.config.total_ut_steps, batch_size=lm.batch_size, max_length=lm.max_length,
                 units=content.hexdigest())
    key = Trace.key(**parts)
    path = Path(cache_dir) / f"trace-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            trace = Trace.load(path)
        except TraceDamagedError as e:
            say(f"cached trace {path}: {e.problem}; recomputing it (the file will be overwritten)")
        else:
            if trace.meta.get("key") == key:
                return trace, units
            say(f"cached trace {path}: holds trace {trace.meta.get('key')}, not {key}; recomputing it "
                "(the file will be overwritten)")
    t0 = time.perf_counter()
    work: dict = {}
    sig, unit, pos, ctx = _units_forward(model, units, model.config.total_ut_steps, lm.batch_size,
                                         lm.max_length, signals=True, progress=progress, stats=work)
    meta = dict(parts, key=key, cost=asdict(ModelCost.from_config(model.config)),
                seconds=time.perf_counter() - t0, n_units=len(units), work=work,
                units=[[u.task, u.doc_id, u.idx, u.window] for u in units])
    trace = Trace(sig, unit, pos, ctx, meta)
    if path is not None and distributed.is_main():  # rank 0 alone writes
        _cache(trace, path, say, require_cache)
    distributed.barrier()  # no rank looks for the cached file before it is complete
    return trace, units


def estimate(taskset: TaskSet, names: list[str], cost: ModelCost, steps: int) -> tuple[int, int, float]:
    """Requests, tokens and full-depth FLOPs of a trace pass over tasks `names`, before any
    model is loaded (`ouro-lab validate`): the requests' prefix tree, as the pass runs it,
    tokenized with the tokenizer bound to the task set (`TaskSet.use_tokenizer`), else over
    characters at ~4 characters a token."""
    from types import SimpleNamespace

    from ouro_lab.prefix import PrefixTree

    tok = taskset.chat.tokenizer if taskset.chat is not None else None
    encode = (lambda t: tuple(tok(t, add_special_tokens=False).input_ids)) if tok is not None else tuple
    units = []
    for name in names:
        task = taskset.tasks[name]
        task.build_all_requests(limit=_limit(task, taskset.limit), samples=taskset.samples_of(name),
                                rank=0, world_size=1, **taskset.request_kwargs())
        for inst in task.instances:
            parts = [a for a in inst.args if isinstance(a, str)]
            ctx, cont = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            units.append(SimpleNamespace(ctx=encode(ctx) or (0,), cont=encode(cont) or (0,)))
    if not units:
        return 0, 0, 0.0
    tree = PrefixTree.build(units, max_length=1 << 30)
    per = 1 if tok is not None else 4
    return len(units), tree.n_nodes // per, tree.flops(cost, steps, steps) / per
