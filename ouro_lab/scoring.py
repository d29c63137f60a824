"""Replay scoring: each strategy setting's exits over the trace, scored by lm-eval's own metric code.

    exit_step = exit_steps(trace, strategy)                  # (N,) per scored token, no model
    metrics, samples = score(taskset, trace, strategy)       # lm-eval metrics + compute columns

`score` replays the strategy over the trace (each scored token exits at a step), turns
that into each request's log-likelihood (sum of the target log-prob at each token's exit
step) and greedy flag (every target is the argmax at its exit step), and answers lm-eval
from those arrays (`ReplayLM`): lm-eval's filters, `process_results` and aggregation
compute acc, acc_norm, perplexity and the rest. The requests are built once per task set
(`Scorer`, shared with the trace pass) instead of once per setting as
`lm_eval.evaluator.evaluate` would; tests pin the Scorer's results to `evaluate`'s. lm-eval's
response cache is never used. Replay assumes earlier tokens' deeper steps exist (they did,
in the trace pass); `ouro_lab.evaluate.evaluate_live` measures a true early-exit run.

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
import math
from collections import defaultdict

import torch
from lm_eval.api.model import LM
from torch import Tensor

from ouro_lab.lm import HarnessError
from ouro_lab.tasks import TaskSet, leaf_members
from ouro_lab.trace import unit_sums

# --------------------------------------------------------------------------- replay answers


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
    if getattr(strategy, "kind", "skip") == "select":
        from ouro_lab.strategy import origin

        raise HarnessError(f"{origin(strategy)[0]}: a select rule (an oracle) picks a step per document, "
                           "composed from the fixed-step runs by `ouro-lab sweep`, not replayed per token")
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
    return unit_sums(lp, greedy, _unit_layout(trace)[0])


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


# --------------------------------------------------------------------------- requests built once


def _limit(task, limit):
    from lm_eval.evaluator_utils import get_sample_size

    return get_sample_size(task, limit)


def run_evaluate(lm, taskset: TaskSet, names: list[str], bootstrap_iters: int = 1000):
    """`lm_eval.evaluator.evaluate` over the prebuilt tasks `names`, seeds reset first,
    no request cache. Returns lm-eval's results dict."""
    from lm_eval.evaluator import evaluate

    taskset.reset_seeds()
    if taskset.chat is None:
        taskset.chat = getattr(lm, "chat", None)
    chat = taskset.request_kwargs()
    if chat.get("apply_chat_template") and hasattr(lm, "chat"):
        lm.chat = taskset.chat  # the task set's template renders its requests, for every LM alike
    samples = None if taskset.samples is None else {n: taskset.samples_of(n) for n in names}
    results = evaluate(lm=lm, task_dict=taskset.subset(names), limit=taskset.limit, samples=samples,
                       bootstrap_iters=bootstrap_iters, log_samples=True, cache_requests=False,
                       system_instruction=taskset.system_instruction,
                       apply_chat_template=taskset.apply_chat_template,
                       fewshot_as_multiturn=taskset.fewshot_as_multiturn)
    for name, logged in (results.get("samples") or {}).items() if samples else ():
        where = {f: i for i, f in enumerate(samples.get(name) or [])}  # lm-eval logs file indices here,
        for ex in logged:                                              # its requests count 0..n-1
            ex["doc_id"] = where.get(ex["doc_id"], ex["doc_id"])
    return results


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
        chat = taskset.request_kwargs()  # lm-eval's chat switches, as run_evaluate passes them
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
            lim, chosen = _limit(task, taskset.limit), taskset.samples_of(name)
            task.build_all_requests(limit=lim, samples=chosen, rank=0, world_size=1, **chat)
            self.instances[name] = list(task.instances)
            self.docs[name] = list(task.doc_iterator(rank=0, limit=lim, samples=chosen, world_size=1))
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
    sample_rows reads and the filtered responses (`ouro_lab.sample_log` completes it with
    the prompts, target and hashes evaluate also logs)."""
    metrics = task.process_results(doc, resps)
    return {"doc_id": doc_id, "doc": doc, "filter": filter_key, "filtered_resps": resps,
            "metrics": list(metrics), **metrics}


def _only_take_first(task) -> bool:
    """The task's only filter is lm-eval's default ("none": take_first)."""
    from lm_eval.filters.selection import TakeFirstFilter

    filters = getattr(task, "_filters", None) or []
    if len(filters) != 1 or filters[0].name != "none" or len(filters[0].filters) != 1:
        return False
    f = filters[0].filters[0]
    return getattr(f, "func", f) is TakeFirstFilter and not getattr(f, "keywords", None)


# --------------------------------------------------------------------------- lm-eval's results as tidy rows


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


# --------------------------------------------------------------------------- one setting, scored


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
          seed: int = 0, exit_step: Tensor | None = None, log: dict | None = None):
    """Metrics of one strategy setting from the trace, computed by lm-eval.

    Returns (metrics, samples): metrics a list of dicts (task, metric, filter, value,
    stderr, steps_used_mean, steps_executed_mean, flops_per_token,
    flops_executed_per_token); samples a pandas DataFrame, one row per task x doc (x
    filter) with lm-eval's per-doc metric values, steps used / executed (token means,
    1-based), FLOPs per token used / executed, and `difficulty` where docs carry one.
    Group rows (e.g. mmlu) get the token means of all their member tasks. `exit_step`:
    the strategy's replayed exits (`exit_steps(...)`) when the caller already has them.
    `log`, a dict, receives lm-eval's results (`results`, per-doc samples included), the
    requests by doc (`requests`) and the exit step of every scored token (`exit_steps`,
    {(task, doc_id): [1-based step, ...]}), for `ouro_lab.sample_log`."""
    import gc

    # the scoring loop allocates a great many small objects while the trace, the docs and
    # lm-eval's instances are alive: cyclic GC passes would dominate its cost (3x measured)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _score(taskset, trace, strategy, granularity, bootstrap_iters, seed, exit_step, log)
    finally:
        if enabled:
            gc.enable()


def _score(taskset, trace, strategy, granularity, bootstrap_iters, seed=0, exit_step=None, log=None):
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
    if log is not None:
        tok = ix["tok_doc"]
        steps = (exit_step + 1).tolist()
        per: dict = {}
        for i, d in enumerate(tok.tolist()):
            per.setdefault(ix["pairs"][d], []).append(steps[i])
        log.update(results=results, requests=scorer.by_doc, exit_steps=per, tasks=scorer.task_dict["tasks"],
                   file_index=taskset.samples)
    cols = {"steps_used": (exit_step + 1).double().numpy(), "steps_executed": executed.double().numpy(),
            "flops_per_token": flops_used.numpy(), "flops_executed_per_token": flops_run.numpy()}
    names = {"steps_used": "steps_used_mean", "steps_executed": "steps_executed_mean",
             "flops_per_token": "flops_per_token", "flops_executed_per_token": "flops_executed_per_token"}
    metrics = []
    for row in metric_rows(results):
        members = tuple(leaf_members(results.get("group_subtasks", {}), row["task"]))  # nested groups too
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
