"""The trace pass: ONE full-depth pass over every loglikelihood request of a task set -> a Trace.

    trace, units = trace_pass(model, tok, taskset)   # cached on disk by content

The units are the taskset's `Scorer`'s requests (`ouro_lab.scoring`), encoded by
`OuroLM` and run through `ouro_lab.lm._units_forward` with every step's signals
recorded (`ouro_lab.trace.step_signals`); replay and scoring then need no model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ouro_lab import distributed
from ouro_lab.flops import ModelCost
from ouro_lab.lm import LL_TYPES, HarnessError, OuroLM, Unit, _units_forward
from ouro_lab.scoring import scorer_for
from ouro_lab.tasks import TaskSet
from ouro_lab.trace import Trace

# Bump when what a trace records, or how, changes: cached traces of another format are not reused.
TRACE_FORMAT = 1


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
    scorer = scorer_for(taskset, ll_names(taskset))
    for name in scorer.instances:
        for inst in scorer.instances[name]:
            if inst.request_type == "loglikelihood":
                c, x = lm.encode_request(*inst.args)
                units.append(Unit(tuple(c), tuple(x), name, inst.doc_id, inst.idx, -1))
            elif inst.request_type == "loglikelihood_rolling":
                for w, (c, x) in enumerate(lm.rolling_units(inst.args[0])):
                    units.append(Unit(tuple(c), tuple(x), name, inst.doc_id, inst.idx, w))
    return units


def ll_names(taskset: TaskSet) -> list[str]:
    """The taskset's loglikelihood tasks (multiple choice, loglikelihood, rolling), sorted."""
    return sorted(taskset.names_of("multiple_choice", *LL_TYPES))


def trace_pass(model, tokenizer, taskset: TaskSet, batch_size: int = 8, cache_dir: str | Path | None = None,
               fingerprint: str | None = None, max_length: int | None = None, progress=None):
    """ONE full-depth pass over every loglikelihood request of every task in `taskset`,
    recording each scored token's signals at every step. Returns (Trace, units).

    Cached on disk under `cache_dir` by content (model fingerprint, dtype, steps, batch
    size, token ids of every unit): a second call with the same inputs runs no model
    pass. `fingerprint` (e.g. `ouro_lab.loading.fingerprint(path)`) saves hashing the
    weights of an in-memory model."""
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
        trace = Trace.load(path)
        if trace.meta.get("key") == key:
            return trace, units
    t0 = time.perf_counter()
    sig, unit, pos, ctx = _units_forward(model, units, model.config.total_ut_steps, lm.batch_size,
                                         lm.max_length, signals=True, progress=progress)
    meta = dict(parts, key=key, cost=asdict(ModelCost.from_config(model.config)),
                seconds=time.perf_counter() - t0, n_units=len(units),
                units=[[u.task, u.doc_id, u.idx, u.window] for u in units])
    trace = Trace(sig, unit, pos, ctx, meta)
    if path is not None and distributed.is_main():  # rank 0 alone writes
        trace.save(path)
    distributed.barrier()  # no rank looks for the cached file before it is complete
    return trace, units
