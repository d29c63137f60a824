"""lm-eval-harness for looped models: one trace pass, every strategy scored by lm-eval itself.

    lm = OuroLM(path="ckpt/", steps=2)                       # a plain lm-eval LM (k steps)
    tasks = TaskSet(["loop_demo_mc"], limit=200)             # task objects, built once
    trace, units = trace_pass(model, tok, tasks)             # ONE full-depth pass, cached on disk
    metrics, samples = score(tasks, trace, strategy)         # per setting: no model, lm-eval metrics
    live, live_samples = evaluate_live(model, tok, tasks, strategy, "copy")   # true early exit
    gap(metrics, live)                                       # replay versus live, per metric

`score` replays the strategy over the trace (each scored token exits at a step), turns
that into each request's log-likelihood (sum of the target log-prob at each token's exit
step) and greedy flag (every target is the argmax at its exit step), and answers lm-eval
from those arrays (`ReplayLM`): lm-eval's filters, `process_results` and aggregation
compute acc, acc_norm, perplexity and the rest. The requests are built once per task set
(`Scorer`, shared with the trace pass) instead of once per setting as
`lm_eval.evaluator.evaluate` would; tests pin the Scorer's results to `evaluate`'s. lm-eval's
response cache is never used. Replay assumes earlier tokens' deeper steps exist (they did,
in the trace pass); `evaluate_live` measures a true early-exit run.

Fixed step k replays to exactly (bit for bit) what `OuroLM(steps=k)` scores: both run
the same batches through the same code (`_units_forward`), and the k-step model's hidden
states are the first k of the full-depth model's.

Compute columns: `steps_used_mean` (mean exit step, 1-based), `steps_executed_mean` (what
a real early-exit run executes: = used for kind "skip", = R for kind "select"),
`flops_per_token` / `flops_executed_per_token` (`ouro_lab.flops.ModelCost`, attention
context from the trace, LM-head readouts from `strategy.readouts`). Per scored
(continuation) token; prompt tokens are not charged in replay.

Relies on two lm-eval internals (pinned lm-eval < 0.5, tested on 0.4.13):
`lm_eval.evaluator_utils._process_results` (aggregation) and `TaskManager._factory`
(building a task with overrides, in `ouro_lab.tasks`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM, TemplateLM
from torch import Tensor

from ouro_lab import distributed
from ouro_lab.errors import OuroLabError
from ouro_lab.tasks import TaskSet

LL_TYPES = ("loglikelihood", "loglikelihood_rolling")


# Bump when what a trace records, or how, changes: cached traces of another format are not reused.
TRACE_FORMAT = 1

class HarnessError(OuroLabError):
    """Bad arguments to the lm-eval integration (model args, task mix, strategy)."""


# --------------------------------------------------------------------------- scoring units


@dataclass(frozen=True)
class Unit:
    """One scored token sequence: `ctx` + `cont` token ids, the `cont` tokens scored.
    A loglikelihood request is one unit, a rolling request one unit per window."""

    ctx: tuple[int, ...]
    cont: tuple[int, ...]
    task: str = ""
    doc_id: int = -1
    idx: int = 0
    window: int = -1  # window number of a rolling request, -1 for a plain loglikelihood one


def _head_scores(model, h: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
    """Target log-prob and greedy flag of hidden states h (N, H) — the very arithmetic of
    `ouro_lab.trace.step_signals` (same chunks, same float32 log-softmax, same topk), so a
    plain k-step run and a replay of the trace at step k agree bit for bit."""
    from ouro_lab.trace import CHUNK_ELEMENTS

    N, V = h.shape[0], model.config.vocab_size
    lp = torch.empty(N, dtype=torch.float32, device=h.device)
    greedy = torch.empty(N, dtype=torch.bool, device=h.device)
    chunk = max(1, CHUNK_ELEMENTS // max(V, 1))
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        logp = F.log_softmax(model.lm_head(h[a:b]).float(), dim=-1)
        lp[a:b] = logp.gather(1, tgt[a:b, None])[:, 0]
        greedy[a:b] = logp.topk(min(2, V), dim=-1).indices[:, 0] == tgt[a:b]
    return lp.cpu(), greedy.cpu()


def _unit_results(lp: Tensor, greedy: Tensor, lengths: list[int]) -> list[tuple[float, bool]]:
    """Per-unit (sum of log-probs in float64, all greedy) from per-token values laid out
    unit after unit. Every path (plain OuroLM, replay, live) sums through `_unit_sums`."""
    import numpy as np

    if not lengths:
        return []
    sums, alls = _unit_sums(lp, greedy, np.concatenate(([0], np.cumsum(lengths)[:-1])))
    return list(zip(sums.tolist(), alls.tolist(), strict=True))


def _unit_sums(lp: Tensor, greedy: Tensor, starts):
    """Segment sums of per-token log-probs (float64) and segment all() of greedy flags, for
    units starting at `starts` (numpy int array, non-empty units): two numpy arrays."""
    import numpy as np

    return np.add.reduceat(lp.double().numpy(), starts), np.logical_and.reduceat(greedy.numpy(), starts)


def _batches(units: list[Unit], batch_size: int, max_length: int):
    """Length-sorted batches (longest first, as lm-eval's Collator): yields the unit indices
    and the right-padded batch (ids, attention mask, targets, scored mask)."""
    order = sorted(range(len(units)), key=lambda i: (-len(units[i].ctx) - len(units[i].cont), i))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        seqs, scored = [], []
        for i in idx:
            u = units[i]
            if not u.cont:
                raise HarnessError("a request has an empty continuation; nothing to score")
            whole = (list(u.ctx) + list(u.cont))[-(max_length + 1):]  # left truncation
            seqs.append(whole)
            scored.append(min(len(u.cont), len(whole) - 1))
        T = max(len(w) for w in seqs) - 1
        ids = torch.tensor([w[:-1] + [0] * (T + 1 - len(w)) for w in seqs], dtype=torch.long)
        tgt = torch.tensor([w[1:] + [-1] * (T + 1 - len(w)) for w in seqs], dtype=torch.long)
        lengths = torch.tensor([len(w) - 1 for w in seqs])
        n = torch.tensor(scored)
        col = torch.arange(T)[None]
        attn = (col < lengths[:, None]).long()
        smask = (col < lengths[:, None]) & (col >= (lengths - n)[:, None])
        yield idx, ids, attn, tgt, smask


@torch.no_grad()
def _units_forward(model, units: list[Unit], steps: int, batch_size: int, max_length: int,
                   signals: bool, progress=None):
    """Run every unit through `steps` loop steps, batch by batch. With `signals`, return
    every step's signals of every scored token (`step_signals`, (R, N)); else only the
    last step's target log-prob and greedy flag. Tokens come back unit after unit, in
    unit order; also returned: each token's unit, position and attention context."""
    from ouro_lab.trace import step_signals

    dev = model.device
    chunks = []
    for b, (idx, ids, attn, tgt, smask) in enumerate(_batches(units, batch_size, max_length)):
        if not distributed.owns(b):  # data parallel (torchrun): each rank runs whole batches of this plan
            continue
        out = model(ids.to(dev), attn.to(dev), steps=steps)
        if signals:
            sig = step_signals(model, out, tgt, smask)
        else:
            m = smask.to(dev)
            lp, greedy = _head_scores(model, out.step_hidden[-1][m], tgt.to(dev)[m])
            sig = {"target_logprob": lp[None], "target_is_argmax": greedy[None]}
        rows_cols = smask.nonzero()  # row-major, as step_signals lays tokens out
        chunks.append((sig, torch.tensor(idx)[rows_cols[:, 0]], rows_cols[:, 1]))
        if progress is not None:
            progress(len(idx))
    chunks = [c for part in distributed.all_gather(chunks) for c in part]  # every rank, every batch
    if not chunks:
        empty = torch.zeros(0, dtype=torch.long)
        return {}, empty, empty, empty
    unit = torch.cat([c[1] for c in chunks])
    pos = torch.cat([c[2] for c in chunks])
    order = torch.sort(unit, stable=True).indices  # unit order; positions stay in order within a unit
    sig = {k: torch.cat([c[0][k] for c in chunks], 1)[:, order] for k in chunks[0][0]}
    unit, pos = unit[order], pos[order]
    return sig, unit, pos, pos + 1  # ctx: keys attended = position + 1 (itself included)


# --------------------------------------------------------------------------- the lm-eval LM


class OuroLM(TemplateLM):
    """lm-eval `LM` for ouro-lab checkpoints.

    Build from a checkpoint folder (`path=`, lm-eval's `pretrained=` also works) or from a
    loaded `model` + `tokenizer`. `steps` truncates the loop (default: the model's depth);
    `strategy` (an `ExitStrategy`, or a name with `strategy_params`) runs every request
    live with early exit (`ouro_lab.live`) under `kv_policy` ("full", "copy", "last"); a
    `fixed` strategy is the same as `steps=k` unless `live=True` (then it too runs token
    by token, with its compute recorded). Requests are scored in length-sorted
    batches of `batch_size`, left-truncated to `max_length` (default: the model's
    `max_position_embeddings`). `generate_until` is greedy, cuts at the `until` strings
    itself and honours `max_gen_toks`. `loglikelihood_rolling` returns bare floats.

    Live runs keep per-request compute in `self.records` (keyed by (task, doc_id, idx)).
    """

    def __init__(self, path: str | None = None, pretrained: str | None = None, model=None, tokenizer=None,
                 steps: int | None = None, strategy=None, strategy_params: dict | None = None,
                 kv_policy: str = "copy", live: bool | None = None, batch_size: int | str = 8,
                 device: str | None = None, dtype: str | None = None, max_length: int | None = None,
                 max_gen_toks: int | None = None, seed: int = 0, **kwargs):
        super().__init__()
        self.seed = int(seed)  # the run's seed, for randomized exit rules
        from ouro_lab.loading import load_model, load_tokenizer

        path = path or pretrained
        if model is None:
            if path is None:
                raise HarnessError("model_args: give path=<checkpoint folder> "
                                   "(or pass model= and tokenizer=)")
            model = load_model(path, dtype=dtype, device=device)
        if tokenizer is None:
            if path is None:
                raise HarnessError("OuroLM: pass tokenizer= with model=")
            tokenizer = load_tokenizer(path)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.path = str(path) if path else None
        R = model.config.total_ut_steps
        if isinstance(strategy, str):
            from ouro_lab.registry import make_strategy
            params = dict(strategy_params or {})
            params.update({k: v for k, v in kwargs.items()})
            strategy = make_strategy(strategy, params)
        elif kwargs:
            raise HarnessError(f"model_args: unknown argument(s) {', '.join(sorted(kwargs))}; known: path, "
                               "steps, strategy, kv_policy, live, batch_size, device, dtype, max_length, "
                               "max_gen_toks, seed")
        if not live and _is_fixed(strategy):
            steps, strategy = min(int(strategy.step), R), None  # fixed k = the model truncated to k steps
        self.steps = R if steps is None else int(steps)
        # live: loglikelihood requests run token by token with early exit (ouro_lab.live)
        if isinstance(live, str):
            live = live.strip().lower() in ("1", "true", "yes")
        self.live = bool(live) if live is not None else strategy is not None
        if self.steps < 1:
            raise HarnessError(f"model_args: steps must be >= 1, got {steps}")
        self.strategy = strategy
        from ouro_lab.live import KV_POLICIES
        if kv_policy not in KV_POLICIES:
            raise HarnessError(f"model_args: kv_policy {kv_policy!r} unknown; "
                               f"use one of {', '.join(KV_POLICIES)}")
        self.kv_policy = kv_policy
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        # the task's own max_gen_toks rules; given here, it caps the task's (default 256 if neither)
        self.max_gen_cap = None if max_gen_toks is None else int(max_gen_toks)
        self.max_gen_toks = self.max_gen_cap or 256
        self.records: dict[tuple, dict] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`--model_args path=ckpt,steps=2` or `path=ckpt,strategy=threshold,q=0.7,kv_policy=copy`
        (parameters that are not OuroLM's go to the strategy)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """Model args as a dict (what lm-eval's CLI passes); lm-eval's batch_size and device
        apply unless model_args set them (its default device cuda:0 falls back to the best
        available one)."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in
                 ("batch_size", "device") and k not in args}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            extra.pop("device")
        return cls(**args, **extra)

    # -- lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        return eos[0] if isinstance(eos, list) else int(eos)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "ouro")).replace("/", "__")

    @property
    def device(self):
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) exactly as lm-eval's TemplateLM.loglikelihood splits them."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if not cont:
                return [self.prefix_token_id], []
            return (([self.prefix_token_id], cont) if self.prefix_token_id != cont[0]
                    else (cont[:1], cont[1:]))
        return self._encode_pair(context, continuation)

    def rolling_units(self, string: str) -> list[tuple[list[int], list[int]]]:
        """Disjoint windows of a rolling-loglikelihood text, as lm-eval's HFLM makes them."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)]

    # -- the three request types
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        units = [Unit(tuple(c), tuple(x)) for _, c, x in requests]
        return self._score_units(units, [None] * len(units))

    def _score_units(self, units: list[Unit], keys: list) -> list[tuple[float, bool]]:
        if self.live:
            from ouro_lab.live import live_score_units
            res, recs = live_score_units(self.model, units, self.strategy, self.kv_policy,
                                         self.batch_size, self.max_length, self.steps, self.seed)
            for k, rec in zip(keys, recs, strict=True):
                if k is not None:
                    self.records.setdefault(k, _empty_record()).update_add(rec)
            return res
        if self.strategy is not None:  # never score full depth under a strategy's name
            raise HarnessError("model_args: a strategy on loglikelihood requests needs live=true (a true "
                               "early-exit run); `ouro-lab eval` and `ouro-lab sweep` replay it from a trace")
        sig, unit, _, _ = _units_forward(self.model, units, self.steps, self.batch_size,
                                         self.max_length, signals=False)
        lengths = torch.bincount(unit, minlength=len(units)).tolist()
        return _unit_results(sig["target_logprob"][-1], sig["target_is_argmax"][-1], lengths)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        units, keys = [], []
        for req in requests:
            c, x = self.encode_request(*req.args)
            units.append(Unit(tuple(c), tuple(x)))
            keys.append((req.task_name, req.doc_id, req.idx))
        return self._score_units(units, keys)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        units, owner, keys = [], [], []
        for i, req in enumerate(requests):
            for c, x in self.rolling_units(req.args[0]):
                units.append(Unit(tuple(c), tuple(x)))
                owner.append(i)
                keys.append((req.task_name, req.doc_id, req.idx))
        res = self._score_units(units, keys)
        total = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, res, strict=True):
            total[i] += lp
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ouro_lab.live import live_generate

        out: list[str | None] = [None] * len(requests)
        # group by generation kwargs, then length-sorted batches
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            gk = dict(req.args[1] if len(req.args) > 1 else {})
            until = gk.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(gk.pop("max_gen_toks", self.max_gen_toks))
            if self.max_gen_cap is not None:
                max_new = min(max_new, self.max_gen_cap)
            if gk.get("do_sample") or (gk.get("temperature") or 0) > 0:
                raise HarnessError("generate_until: only greedy decoding is supported "
                                   "(set do_sample: false, temperature: 0)")
            groups[(tuple(until), max_new)].append(i)
        done: list = [None] * len(requests)  # (text, record) per request
        plan: list[int] = []  # requests in the order their batches run (records keep it)
        n_batch = 0
        for (until, max_new), idx in groups.items():
            enc = {i: self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in idx}
            idx = sorted(idx, key=lambda i: (-len(enc[i]), i))
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                plan.extend(b)
                n_batch += 1
                if not distributed.owns(n_batch - 1):  # data parallel: whole batches per rank
                    continue
                prompts = [enc[i][-(self.max_length - max_new):] if max_new < self.max_length
                           else enc[i][-1:] for i in b]
                texts, recs = live_generate(self.model, self.tokenizer, prompts, self.strategy,
                                            self.kv_policy, until=list(until), max_new_tokens=max_new,
                                            steps=self.steps, eos_token_id=self.eot_token_id, seed=self.seed,
                                            row_ids=b)
                for i, t, rec in zip(b, texts, recs, strict=True):
                    done[i] = (t, rec)
        done = distributed.merge(done)  # every rank gets every request (no-op in one process)
        for i in plan:
            out[i], rec = done[i]
            r = requests[i]
            self.records.setdefault((r.task_name, r.doc_id, r.idx), _empty_record()).update_add(rec)
        return out


def _is_fixed(strategy) -> bool:
    """The `fixed` strategy (exit every token at step k), however the registry named its module."""
    mod = type(strategy).__module__ if strategy is not None else ""
    return hasattr(strategy, "step") and (mod.endswith("fixed") or "_fixed_" in mod)


class _Record(dict):
    """Per-request compute of a live run: tokens, sum of exit steps (1-based), steps
    executed, FLOPs executed (prefill included for loglikelihood), wall seconds."""

    def update_add(self, other: dict) -> None:
        for k, v in other.items():
            self[k] = self.get(k, 0) + v


def _empty_record() -> _Record:
    return _Record()


# --------------------------------------------------------------------------- one trace pass


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


def _limit(task, limit):
    from lm_eval.evaluator_utils import get_sample_size

    return get_sample_size(task, limit)


def trace_pass(model, tokenizer, taskset: TaskSet, batch_size: int = 8, cache_dir: str | Path | None = None,
               fingerprint: str | None = None, max_length: int | None = None, progress=None):
    """ONE full-depth pass over every loglikelihood request of every task in `taskset`,
    recording each scored token's signals at every step. Returns (Trace, units).

    Cached on disk under `cache_dir` by content (model fingerprint, dtype, steps, batch
    size, token ids of every unit): a second call with the same inputs runs no model
    pass. `fingerprint` (e.g. `ouro_lab.loading.fingerprint(path)`) saves hashing the
    weights of an in-memory model."""
    from ouro_lab.flops import ModelCost
    from ouro_lab.trace import Trace

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


# --------------------------------------------------------------------------- scoring


class ReplayLM(LM):
    """An lm-eval LM that answers loglikelihood requests from precomputed arrays:
    `answers[(task, doc_id, idx)]` = (logprob, is_greedy) or, for rolling, a float."""

    def __init__(self, answers, positional: dict | None = None):
        super().__init__()
        self._answers = answers  # a dict, or a function that makes it (when first needed)
        # task -> answers in the Scorer's instance order: a list of (logprob, is_greedy), or
        # two numpy arrays (float64 log-probs, bool greedy flags)
        self.positional = positional or {}

    @property
    def answers(self) -> dict:
        if callable(self._answers):
            self._answers = self._answers()
        return self._answers

    def _get(self, req):
        key = (req.task_name, req.doc_id, req.idx)
        if key not in self.answers:
            raise HarnessError(f"task {req.task_name} doc {req.doc_id}: request not in the trace; "
                               "trace again with the same tasks, limit and num_fewshot")
        return self.answers[key]

    def _all(self, requests):
        a = self.answers
        try:
            return [a[(r.task_name, r.doc_id, r.idx)] for r in requests]
        except KeyError:
            return [self._get(r) for r in requests]  # names the missing request

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._all(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._all(requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise HarnessError("generate_until tasks cannot be replayed from a trace; run them live "
                           "(ouro_lab.live / evaluate_live)")


def _unit_meta(trace) -> list[tuple]:
    cached = getattr(trace, "_unit_meta", None)
    if cached is not None:
        return cached
    units = trace.meta.get("units")
    if not units:
        raise HarnessError("this trace has no unit table in its meta; make it with trace_pass")
    trace._unit_meta = [tuple(u) for u in units]
    return trace._unit_meta


def exit_steps(trace, strategy, granularity: str = "token", seed: int = 0) -> Tensor:
    """Replay `strategy` over the trace: exit step (N,) 0-based. `granularity="sequence"`
    exits all tokens of one request (unit) together; `seed` is the run's seed (randomized rules)."""
    from ouro_lab.strategy import replay

    return replay(strategy, trace.to_signals(seed=seed), granularity)


def trace_units(trace) -> int:
    return len(_unit_meta(trace))


def _unit_layout(trace) -> tuple:
    """Per trace, once: each unit's first token (numpy), the request keys, and whether
    every unit is a plain loglikelihood request (no rolling windows)."""
    import numpy as np

    lay = getattr(trace, "_unit_layout", None)
    if lay is None:
        meta = _unit_meta(trace)
        lengths = torch.bincount(trace.request, minlength=len(meta)).numpy()
        if (lengths == 0).any():
            raise HarnessError("a unit of this trace has no scored token; trace again with trace_pass")
        lay = trace._unit_layout = (np.concatenate(([0], np.cumsum(lengths)[:-1])),
                                    [(u[0], u[1], u[2]) for u in meta], all(u[3] < 0 for u in meta))
    return lay


def unit_arrays(trace, exit_step: Tensor):
    """Per unit of the trace (its request order): the sum of target log-probs at each
    token's exit step (float64) and whether every target is the argmax there (bool), as
    two numpy arrays. What `OuroLM` computes for a model cut to those steps."""
    sig = trace.signals
    lp = sig["target_logprob"].gather(0, exit_step[None])[0]
    greedy = sig["target_is_argmax"].gather(0, exit_step[None])[0]
    return _unit_sums(lp, greedy, _unit_layout(trace)[0])


def answers_from_exits(trace, exit_step: Tensor, arrays=None) -> dict:
    """lm-eval answers per request from per-token exit steps (see `ReplayLM`); `arrays`:
    `unit_arrays(trace, exit_step)` when already computed."""
    meta = _unit_meta(trace)
    _, keys, plain = _unit_layout(trace)
    sums, alls = unit_arrays(trace, exit_step) if arrays is None else arrays
    res = list(zip(sums.tolist(), alls.tolist(), strict=True))
    if plain:  # loglikelihood requests only: one unit each
        return dict(zip(keys, res, strict=True))
    answers: dict = {}
    for (task, doc_id, idx, window), r in zip(meta, res, strict=True):
        key = (task, doc_id, idx)
        if window < 0:
            answers[key] = r
        else:  # rolling: a bare float, summed over the request's windows
            answers[key] = answers.get(key, 0.0) + r[0]
    return answers


def run_evaluate(lm, taskset: TaskSet, names: list[str], bootstrap_iters: int = 1000):
    """`lm_eval.evaluator.evaluate` over the prebuilt tasks `names`, seeds reset first,
    no request cache. Returns lm-eval's results dict."""
    from lm_eval.evaluator import evaluate

    taskset.reset_seeds()
    return evaluate(lm=lm, task_dict=taskset.subset(names), limit=taskset.limit,
                    bootstrap_iters=bootstrap_iters, log_samples=True, cache_requests=False)


class Scorer:
    """lm-eval's evaluation of requests built ONCE, answered many times.

    `lm_eval.evaluator.evaluate` rebuilds every request (rendering and compiling Jinja
    templates doc by doc) on each call: a few hundred ms even for a small task, which
    would dwarf a tiny model's forward pass across a 40-setting sweep. A Scorer builds
    the requests once (few-shot seeds reset), and each call runs the rest of `evaluate`
    as lm-eval does it for one process: answers into `resps`, the task's filters,
    `task.process_results` per doc, then lm-eval's aggregation and stderr
    (`lm_eval.evaluator_utils._process_results`). Template outputs of the cached docs
    are memoized during a call (rendering is a pure function of the doc), and so is
    `process_results` per doc on its exact responses, across calls: a sweep's settings
    mostly give a doc answers some earlier setting gave it. With default-filter tasks and
    answers as arrays (`score`), a doc's memo key is the bytes of its answers. Tests pin
    its results to `evaluate`'s, value for value."""

    MEMO = ("doc_to_choice", "doc_to_target", "doc_to_text")

    def __init__(self, taskset: TaskSet, names: list[str]):
        taskset.reset_seeds()
        self.task_dict = taskset.subset(names)
        self.instances, self.docs, self.by_doc, self.memo, self.results_memo = {}, {}, {}, {}, {}
        self.by_type: dict = {}
        self.doc_pos: dict = {}  # task -> doc_id -> positions of its requests in instances
        self.spans: dict = {}    # task -> [(doc_id, doc, start, stop)] where those positions are runs
        self.doc_ids: dict = {}  # task -> ids of its doc objects (the template memo's keys)
        self.single: dict = {}   # task -> every request answered once (repeats == 1)
        self._aligned: dict = {}  # trace key -> its units are this Scorer's requests, in order
        self.results_cache: dict = {}
        for name, task in self.task_dict["tasks"].items():
            lim = _limit(task, taskset.limit)
            task.build_all_requests(limit=lim, rank=0, world_size=1)
            self.instances[name] = list(task.instances)
            self.docs[name] = list(task.doc_iterator(rank=0, limit=lim, world_size=1))
            by = defaultdict(list)
            for inst in self.instances[name]:
                by[inst.doc_id].append(inst)
            for v in by.values():
                v.sort(key=lambda x: x.idx)
            self.by_doc[name] = by
            self.single[name] = all(r.repeats == 1 for r in self.instances[name])
            where = {id(inst): i for i, inst in enumerate(self.instances[name])}
            self.doc_pos[name] = {d: [where[id(r)] for r in v] for d, v in by.items()}
            self.spans[name] = self._spans(name)
            self.doc_ids[name] = {id(d) for _, d in self.docs[name]}
            self.memo[name] = {m: {} for m in self.MEMO}
            self.by_type[name] = defaultdict(list)
            for inst in self.instances[name]:
                self.by_type[name][inst.request_type].append(inst)

    def keys(self) -> set[tuple]:
        return {(i.task_name, i.doc_id, i.idx) for v in self.instances.values() for i in v}

    def positional(self, trace, *res) -> dict | None:
        """Per task, the unit results `res` (a list, or arrays: `unit_arrays`) of a trace made
        from this Scorer's requests (plain loglikelihood units, same order), else None."""
        key = trace.meta.get("key")
        if key not in self._aligned:
            keys = [(u[0], u[1], u[2]) for u in _unit_meta(trace)]
            mine = [(i.task_name, i.doc_id, i.idx) for v in self.instances.values() for i in v]
            self._aligned[key] = keys == mine and all(u[3] < 0 for u in _unit_meta(trace))
        if not self._aligned[key]:
            return None
        out, a = {}, 0
        for name, insts in self.instances.items():
            part = tuple(r[a:a + len(insts)] for r in res)
            out[name] = part if len(part) > 1 else part[0]
            a += len(insts)
        return out

    def _spans(self, name) -> list | None:
        """(doc_id, doc, start, stop) per doc when each doc's requests sit side by side in
        the instance list (lm-eval builds them so), else None."""
        spans = []
        for doc_id, doc in self.docs[name]:
            p = self.doc_pos[name].get(doc_id)
            if not p or p != list(range(p[0], p[0] + len(p))):
                return None
            spans.append((doc_id, doc, p[0], p[0] + len(p)))
        return spans

    def _doc_resps(self, name, filter_key, answers):
        """(doc_id, doc, filtered responses) per doc, in lm-eval's doc order: from `answers`
        (responses in instance order) or, when None, from the instances' filtered_resps."""
        if isinstance(answers, tuple):  # (log-probs, greedy flags) arrays
            answers = list(zip(answers[0].tolist(), answers[1].tolist(), strict=True))
        if answers is None:
            by = self.by_doc[name]
            return ((d, doc, [r.filtered_resps[filter_key] for r in by[d]]) for d, doc in self.docs[name])
        if self.spans[name] is not None:
            return ((d, doc, answers[a:b]) for d, doc, a, b in self.spans[name])
        pos = self.doc_pos[name]
        return ((d, doc, [answers[i] for i in pos[d]]) for d, doc in self.docs[name])

    def _examples_from_arrays(self, name, task, memo, ll, greedy) -> list[dict]:
        """`_example` of every doc (filter "none"), answers given as per-request arrays:
        the memo key of a doc is the bytes of its slice of the arrays (equal bytes, equal
        answers), and the (logprob, is_greedy) responses are only made for new answers."""
        lb, gb = ll.astype("<f8", copy=False).tobytes(), greedy.astype(bool, copy=False).tobytes()
        out = []
        for doc_id, doc, a, b in self.spans[name]:
            key = (doc_id, lb[8 * a:8 * b] + gb[a:b])
            ex = memo.get(key)
            if ex is None:
                resps = list(zip(ll[a:b].tolist(), greedy[a:b].tolist(), strict=True))
                ex = memo[key] = _new_example(task, "none", doc_id, doc, resps)
            out.append(ex)
        return out

    def _example(self, memo, task, filter_key, doc_id, doc, resps) -> dict:
        """`_new_example` memoized on the exact responses: process_results is a pure function
        of them, and many settings of a sweep give a doc the very same answers. The sample
        dicts are shared between calls: read-only."""
        try:
            key = (doc_id, tuple(resps))
            ex = memo.get(key)
        except TypeError:  # unhashable responses: no memo
            key = ex = None
        if ex is None:
            ex = _new_example(task, filter_key, doc_id, doc, resps)
            if key is not None:
                memo[key] = ex
        return ex

    def _install_memo(self, name, task):
        ids = self.doc_ids[name]
        for m in self.MEMO:
            fn, memo = getattr(task, m), self.memo[name][m]

            def wrapped(doc, *a, _fn=fn, _memo=memo, **k):
                if a or k or id(doc) not in ids:
                    return _fn(doc, *a, **k)
                if id(doc) not in _memo:
                    _memo[id(doc)] = _fn(doc)
                return _memo[id(doc)]
            setattr(task, m, wrapped)

    def __call__(self, lm, bootstrap_iters: int = 1000) -> dict:
        """lm-eval's results dict (results, groups, samples, ...) for answers from `lm`."""
        from lm_eval.evaluator_utils import _process_results

        acc_all = {}
        for name, task in self.task_dict["tasks"].items():
            insts = self.instances[name]
            task._instances = insts  # an evaluate() in between may have replaced them
            # Fast path: lm-eval's default filter ("none" = take the first response) and
            # answers known by key: a doc's filtered responses are its requests' answers,
            # read straight from the table without writing them into every Instance.
            direct = isinstance(lm, ReplayLM) and _only_take_first(task) and self.single[name]
            if not direct:
                for rtype, reqs in self.by_type[name].items():
                    cloned = [r for r in reqs for _ in range(r.repeats)]  # as evaluate() sends them
                    for r in reqs:
                        r.resps, r.filtered_resps = [], {}
                    for x, r in zip(getattr(lm, rtype)(cloned), cloned, strict=True):
                        r.resps.append(x)
            acc = {"task": task, "raw_metrics": defaultdict(list), "logged_samples": []}
            self._install_memo(name, task)
            try:
                if not direct:
                    task.apply_filters()
                    filter_keys, answers = list(insts[0].filtered_resps), None
                else:
                    filter_keys, answers = ["none"], lm.positional.get(name) or lm._all(insts)
                for filter_key in filter_keys:
                    memo = self.results_memo.setdefault((name, filter_key), {})
                    if isinstance(answers, tuple) and self.spans[name] is not None:
                        examples = self._examples_from_arrays(name, task, memo, *answers)
                    else:
                        examples = [self._example(memo, task, filter_key, d, doc, resps)
                                    for d, doc, resps in self._doc_resps(name, filter_key, answers)]
                    acc["logged_samples"] += examples
                    # raw metrics in doc order, keys in first-seen order, as evaluate() appends them
                    raw = acc["raw_metrics"]
                    first = examples[0]["metrics"] if examples else []
                    if all(ex["metrics"] == first for ex in examples):
                        for metric in first:
                            raw[(metric, filter_key)] += [ex[metric] for ex in examples]
                    else:
                        for ex in examples:
                            for metric in ex["metrics"]:
                                raw[(metric, filter_key)].append(ex[metric])
            finally:
                for m in self.MEMO:
                    task.__dict__.pop(m, None)
            acc_all[name] = acc
        res = _process_results(acc_all, self.task_dict.get("groups", {}), bootstrap_iters)
        return res._to_eval_results(samples=res.samples)


def _new_example(task, filter_key, doc_id, doc, resps) -> dict:
    """lm-eval's `task.process_results(doc, resps)` as a logged sample with the fields
    sample_rows reads (evaluate also logs prompts, hashes, target)."""
    metrics = task.process_results(doc, resps)
    return {"doc_id": doc_id, "doc": doc, "filter": filter_key, "metrics": list(metrics), **metrics}


def _only_take_first(task) -> bool:
    """The task's only filter is lm-eval's default ("none": take_first)."""
    from lm_eval.filters.selection import TakeFirstFilter

    filters = getattr(task, "_filters", None) or []
    if len(filters) != 1 or filters[0].name != "none" or len(filters[0].filters) != 1:
        return False
    f = filters[0].filters[0]
    return getattr(f, "func", f) is TakeFirstFilter and not getattr(f, "keywords", None)


def metric_rows(results: dict) -> list[dict]:
    """lm-eval's `results` section as tidy rows: task, metric, filter, value, stderr."""
    rows = []
    for task, res in results["results"].items():
        for key, value in res.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if not isinstance(value, (int, float)):
                continue
            se = res.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(se) if isinstance(se, (int, float)) else math.nan})
    return rows


def sample_rows(results: dict, taskset: TaskSet | None = None) -> dict[str, list]:
    """lm-eval's per-doc samples as columns (task, doc_id, filter, each scalar metric,
    difficulty where docs carry one), ready for `pandas.DataFrame`."""
    from itertools import chain

    cols: dict[str, list] = defaultdict(list)
    n = 0
    plain = (bool, int, float)

    def scalar(v):
        if isinstance(v, plain):
            return float(v)
        if isinstance(v, (tuple, list)) and v and isinstance(v[0], (int, float)):
            return float(v[0])  # perplexity-style (loglikelihood, weight) pairs
        return None

    for task, samples in (results.get("samples") or {}).items():
        if not samples:
            continue
        names = list(dict.fromkeys(chain.from_iterable(s.get("metrics", ()) for s in samples)))
        block = {"task": [task] * len(samples), "doc_id": [int(s["doc_id"]) for s in samples],
                 "filter": [s.get("filter", "none") for s in samples]}
        for m in names:
            block[m] = [float(v) if type(v) in plain else scalar(v) for v in (s.get(m) for s in samples)]
        diff = [s["doc"].get("difficulty") if isinstance(s.get("doc"), dict) else None for s in samples]
        if any(d is not None for d in diff):
            block["difficulty"] = diff
        for k in set(cols) - set(block):
            cols[k].extend([None] * len(samples))
        for k, v in block.items():
            if k not in cols:
                cols[k] = [None] * n
            cols[k].extend(v)
        n += len(samples)
    return dict(cols)


def _token_compute(trace, strategy, exit_step: Tensor, executed: Tensor):
    """FLOPs used / executed per token (N,) from the trace's attention contexts."""
    cost = trace.cost()
    ctx = trace.ctx.double()
    step = cost.layer_flops + cost.gate_flops + cost.attn_flops_per_ctx * ctx
    readouts = strategy.readouts(exit_step).double()
    used = (exit_step + 1).double() * step + readouts * cost.head_flops
    run = executed.double() * step + readouts * cost.head_flops
    return used, run


def scorer_for(taskset: TaskSet, names) -> Scorer:
    """The Scorer of tasks `names` (or of a trace's tasks), built once per taskset and kept on it."""
    if not isinstance(names, (list, tuple)):
        trace = names
        names = getattr(trace, "_task_names", None)
        if names is None:
            names = trace._task_names = sorted({u[0] for u in _unit_meta(trace)})
    key = tuple(sorted(names))
    if key not in taskset.scorers:
        taskset.scorers[key] = Scorer(taskset, list(key))
    return taskset.scorers[key]


def _doc_index(trace) -> dict:
    """Per-token task and doc codes of a trace (cached on the trace object)."""
    import numpy as np

    cached = getattr(trace, "_doc_index", None)
    if cached is not None:
        return cached
    meta = _unit_meta(trace)
    pairs = sorted({(u[0], int(u[1])) for u in meta})
    code = {p: i for i, p in enumerate(pairs)}
    unit_code = np.array([code[(u[0], int(u[1]))] for u in meta], dtype=np.int64)
    tok = unit_code[trace.request.numpy()]
    tasks = sorted({p[0] for p in pairs})
    task_of_doc = np.array([tasks.index(p[0]) for p in pairs], dtype=np.int64)
    idx = {"pairs": pairs, "tok_doc": tok, "tasks": tasks, "tok_task": task_of_doc[tok],
           "n_doc": np.bincount(tok, minlength=len(pairs)).astype(float), "select": {}, "frames": {}}
    trace._doc_index = idx
    return idx


def score(taskset: TaskSet, trace, strategy, granularity: str = "token", bootstrap_iters: int = 1000,
          seed: int = 0, exit_step: Tensor | None = None):
    """Metrics of one strategy setting from the trace, computed by lm-eval.

    Returns (metrics, samples): metrics a list of dicts (task, metric, filter, value,
    stderr, steps_used_mean, steps_executed_mean, flops_per_token,
    flops_executed_per_token); samples a pandas DataFrame, one row per task x doc (x
    filter) with lm-eval's per-doc metric values, steps used / executed (token means,
    1-based), FLOPs per token used / executed, and `difficulty` where docs carry one.
    Group rows (e.g. mmlu) get the token means of all their member tasks. `exit_step`:
    the strategy's replayed exits (`exit_steps(...)`) when the caller already has them."""
    import gc

    # the scoring loop allocates a great many small objects while the trace, the docs and
    # lm-eval's instances are alive: cyclic GC passes would dominate its cost (3x measured)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _score(taskset, trace, strategy, granularity, bootstrap_iters, seed, exit_step)
    finally:
        if enabled:
            gc.enable()


def _score(taskset, trace, strategy, granularity, bootstrap_iters, seed=0, exit_step=None):
    import numpy as np
    import pandas as pd

    R = trace.steps
    if exit_step is None:
        exit_step = exit_steps(trace, strategy, granularity, seed)
    kind = getattr(strategy, "kind", "skip")
    executed = (exit_step + 1) if kind == "skip" else torch.full_like(exit_step, R)
    flops_used, flops_run = _token_compute(trace, strategy, exit_step, executed)
    scorer = scorer_for(taskset, trace)
    # settings that exit every token at the same step get the same answers: lm-eval's
    # results (and the per-doc metric columns read from them) are a deterministic
    # function of them, computed once
    key = (trace.meta.get("key"), bootstrap_iters,
           hashlib.blake2b(exit_step.numpy().tobytes(), digest_size=16).hexdigest())
    hit = scorer.results_cache.get(key)
    if hit is None:
        arrays = unit_arrays(trace, exit_step)
        lm = ReplayLM(lambda: answers_from_exits(trace, exit_step, arrays), scorer.positional(trace, *arrays))
        results = scorer(lm, bootstrap_iters)
        hit = scorer.results_cache[key] = (results, sample_rows(results))
    results, sample_cols = hit
    ix = _doc_index(trace)
    cols = {"steps_used": (exit_step + 1).double().numpy(), "steps_executed": executed.double().numpy(),
            "flops_per_token": flops_used.numpy(), "flops_executed_per_token": flops_run.numpy()}
    names = {"steps_used": "steps_used_mean", "steps_executed": "steps_executed_mean",
             "flops_per_token": "flops_per_token", "flops_executed_per_token": "flops_executed_per_token"}
    metrics = []
    for row in metric_rows(results):
        members = tuple(results.get("group_subtasks", {}).get(row["task"]) or [row["task"]])
        sel = ix["select"].get(members)
        if sel is None:  # the trace's tokens of these tasks: every token (None) or a mask
            sel = np.isin(ix["tok_task"], [ix["tasks"].index(t) for t in members if t in ix["tasks"]])
            sel = ix["select"][members] = None if sel.all() else sel
        if sel is None or sel.any():
            row.update({names[k]: float((v if sel is None else v[sel]).mean()) for k, v in cols.items()})
        metrics.append(row)
    if not sample_cols.get("doc_id"):
        return metrics, pd.DataFrame(sample_cols)
    # the columns that only depend on which docs the samples are (every setting scored from
    # this trace has the same) as pandas-ready arrays, worked out once; the metric columns
    # (floats or None) as float arrays: the frame pandas would build from the lists
    doc_key = tuple(tuple(sample_cols[k]) for k in ("task", "doc_id", "filter"))
    const = ix["frames"].get(doc_key)
    if const is None:
        code = {p: i for i, p in enumerate(ix["pairs"])}
        pairs = zip(sample_cols["task"], sample_cols["doc_id"], strict=True)
        fixed = {k: pd.Series(sample_cols[k]).array for k in ("task", "doc_id", "filter", "difficulty")
                 if k in sample_cols}
        const = ix["frames"][doc_key] = (np.array([code.get(p, -1) for p in pairs]), fixed)
    rows, fixed = const
    frame = {k: fixed[k] if k in fixed else
             np.array(v, dtype=np.float64) if any(x is not None for x in v) else v
             for k, v in sample_cols.items()}
    for k, v in cols.items():
        per_doc = np.bincount(ix["tok_doc"], weights=v, minlength=len(ix["pairs"])) / ix["n_doc"]
        frame[k] = np.where(rows >= 0, per_doc[rows], np.nan)
    return metrics, pd.DataFrame(frame)


def evaluate_live(model, tokenizer, taskset: TaskSet, strategy=None, kv_policy: str = "copy",
                  batch_size: int = 8, names: list[str] | None = None, bootstrap_iters: int = 1000,
                  max_gen_toks: int | None = None):
    """A true early-exit run of `strategy` under `kv_policy` over `names` (default: every
    task of the taskset, generation included), scored by `lm_eval.evaluator.evaluate`.

    Loglikelihood requests run token by token, prompt included (`live_score_units`);
    generate_until requests decode live (`live_generate`). Returns (metrics, samples)
    shaped as `score`'s, the compute columns measured: steps_used_mean /
    steps_executed_mean per scored or generated token, flops_per_token (exit steps only)
    / flops_executed_per_token (what ran), flops_total_per_token (prompt included, per
    scored or generated token) and wall_s (seconds of model work for the task)."""
    import pandas as pd

    names = names or list(taskset.tasks)
    lm = OuroLM(model=model, tokenizer=tokenizer, strategy=strategy, kv_policy=kv_policy, live=True,
                batch_size=batch_size, max_gen_toks=max_gen_toks)
    results = run_evaluate(lm, taskset, names, bootstrap_iters)
    rows = []
    for (task, doc_id, _), rec in lm.records.items():
        rows.append({"task": task, "doc_id": int(doc_id), "tokens": rec.get("tokens", 0),
                     "steps_used": rec.get("steps_used", 0), "steps_executed": rec.get("steps_executed", 0),
                     "flops_used": rec.get("flops_used_scored", 0) + rec.get("flops_used_decode", 0),
                     "flops_executed": rec.get("flops_scored", 0) + rec.get("flops_decode", 0),
                     "flops_total": rec.get("flops", 0), "seconds": rec.get("seconds", 0)})
    rec = pd.DataFrame(rows, columns=["task", "doc_id", "tokens", "steps_used", "steps_executed",
                                      "flops_used", "flops_executed", "flops_total", "seconds"])

    def summarize(frame):
        n = max(float(frame.tokens.sum()), 1.0)
        return {"steps_used_mean": frame.steps_used.sum() / n,
                "steps_executed_mean": frame.steps_executed.sum() / n,
                "flops_per_token": frame.flops_used.sum() / n,
                "flops_executed_per_token": frame.flops_executed.sum() / n,
                "flops_total_per_token": frame.flops_total.sum() / n, "wall_s": float(frame.seconds.sum())}

    metrics = []
    for row in metric_rows(results):
        members = results.get("group_subtasks", {}).get(row["task"]) or [row["task"]]
        sub = rec[rec.task.isin(members)]
        if len(sub):
            row.update({k: float(v) for k, v in summarize(sub).items()})
        metrics.append(row)
    per_doc = (rec.groupby(["task", "doc_id"]).apply(lambda f: pd.Series(summarize(f)), include_groups=False)
               .reset_index()
               .rename(columns={"steps_used_mean": "steps_used", "steps_executed_mean": "steps_executed"}))
    samples = pd.DataFrame(sample_rows(results, taskset))
    if len(samples) and len(per_doc):
        samples = samples.merge(per_doc, on=["task", "doc_id"], how="left")
    return metrics, samples


def gap(replay_metrics: list[dict], live_metrics: list[dict]) -> list[dict]:
    """Replay versus live, metric by metric: task, metric, filter, replay, live,
    diff (live - replay), and both runs' FLOPs per token (used and executed)."""
    live = {(r["task"], r["metric"], r["filter"]): r for r in live_metrics}
    out = []
    for r in replay_metrics:
        k = (r["task"], r["metric"], r["filter"])
        if k not in live:
            continue
        lv = live[k]
        out.append({"task": k[0], "metric": k[1], "filter": k[2], "replay": r["value"], "live": lv["value"],
                    "diff": lv["value"] - r["value"],
                    "replay_flops_per_token": r.get("flops_per_token", math.nan),
                    "live_flops_per_token": lv.get("flops_per_token", math.nan),
                    "replay_flops_executed_per_token": r.get("flops_executed_per_token", math.nan),
                    "live_flops_executed_per_token": lv.get("flops_executed_per_token", math.nan),
                    "live_flops_total_per_token": lv.get("flops_total_per_token", math.nan)})
    return out


def evaluate_tasks(model_dir, tasks, include_path=None, data_root=None, limit=None, num_fewshot=None,
                   steps=None, strategy=None, params=None, kv_policy: str = "copy", live: bool = False,
                   batch_size: int = 8, dtype=None, device=None, cache_dir=None,
                   max_gen_toks: int | None = None):
    """`ouro-lab eval`: lm-eval metrics of a checkpoint on `tasks` (names or a comma list).

    Without `strategy`: a plain lm-eval run of the model (cut to `steps`). With one:
    loglikelihood tasks from one cached trace pass + replay (or a true early-exit run
    with `live`), generation tasks live under `kv_policy`. Returns (metrics, samples)."""
    import pandas as pd

    from ouro_lab.loading import fingerprint, load_model, load_tokenizer

    distributed.init(device)  # under torchrun / accelerate launch: shard batches over the ranks
    ts = TaskSet(tasks, include_path=include_path, data_root=data_root, limit=limit, num_fewshot=num_fewshot)
    model = load_model(model_dir, dtype=dtype, device=distributed.local_device(device))
    tok = load_tokenizer(model_dir)
    if strategy is None:
        lm = OuroLM(model=model, tokenizer=tok, steps=steps, batch_size=batch_size, max_gen_toks=max_gen_toks)
        res = run_evaluate(lm, ts, list(ts.tasks))
        return metric_rows(res), pd.DataFrame(sample_rows(res, ts))
    if steps is not None:
        raise HarnessError("eval: give either --steps or --strategy, not both")
    from ouro_lab.registry import make_strategy

    st = make_strategy(strategy, params or {}) if isinstance(strategy, str) else strategy
    from ouro_lab.strategy import ExitStrategy

    if type(st).fit is not ExitStrategy.fit:
        name = strategy if isinstance(strategy, str) else type(st).__name__
        raise HarnessError(f"eval: strategy {name} calibrates on a "
                           "held-out split; run it with `ouro-lab sweep` (cross-fitted calibration)")
    ll = ts.names_of("multiple_choice", *LL_TYPES)
    gen = ts.names_of("generate_until")
    metrics, samples = [], []
    if ll and not live:
        trace, _ = trace_pass(model, tok, ts, batch_size=batch_size, cache_dir=cache_dir,
                              fingerprint=fingerprint(model_dir))
        m, s = score(ts, trace, st)
        metrics += m
        samples.append(s)
    live_names = gen + (ll if live else [])
    if live_names:
        m, s = evaluate_live(model, tok, ts, st, kv_policy, batch_size=batch_size, names=live_names,
                             max_gen_toks=max_gen_toks)
        metrics += m
        samples.append(s)
    return metrics, pd.concat(samples, ignore_index=True) if samples else pd.DataFrame()


__all__ = ["OuroLM", "ReplayLM", "Scorer", "TaskSet", "Unit", "trace_pass", "score", "exit_steps",
           "answers_from_exits", "run_evaluate", "metric_rows", "sample_rows", "build_units", "evaluate_live",
           "gap", "scorer_for", "evaluate_tasks"]
