"""The model side of lm-eval: `OuroLM` (lm-eval's LM interface) and the scoring units it runs.

    lm = OuroLM(path="ckpt/", steps=2)        # a plain lm-eval LM (the loop cut to k steps)
    lm = OuroLM(path="ckpt/", strategy="threshold", strategy_params={"q": 0.7})  # live early exit

A request becomes one or more `Unit`s (context + continuation token ids); `_units_forward`
runs each distinct prefix of the units once (`ouro_lab.prefix`: shared contexts and
few-shot prefixes) and returns per scored token either every step's signals (the trace
pass, `ouro_lab.tracing`) or the last step's target log-prob and greedy flag (a plain
k-step run). `_batches` is the per-request plan (one sequence per unit), kept as the
reference that tests and benchmarks compare with.

Fixed step k replays to what `OuroLM(steps=k)` scores through the same code
(`_units_forward`; the k-step model's hidden states are the first k of the full-depth
model's): bit for bit when both plan the same units, to float rounding (~1e-6 in a
log-prob) when they do not (the trace plans every task's units in one tree, lm-eval
sends loglikelihood and rolling requests apart, so the batches differ).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from torch import Tensor

from ouro_lab import distributed
from ouro_lab.errors import OuroLabError
from ouro_lab.live import KV_POLICIES, chunks, live_generate, live_score_units
from ouro_lab.sampling import Sampling
from ouro_lab.speculative import speculative_generate
from ouro_lab.strategy import request_keys
from ouro_lab.trace import CHUNK_ELEMENTS, step_signals, unit_results

LL_TYPES = ("loglikelihood", "loglikelihood_rolling")  # request types scored from log-probs
# generation kwargs that change the output and are not implemented: the values that are harmless
UNSUPPORTED_GEN = {"num_beams": (1, None), "repetition_penalty": (1, 1.0, None), "min_p": (0, 0.0, None),
                   "typical_p": (1, 1.0, None), "num_return_sequences": (1, None)}


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
    """Target log-prob and greedy flag of hidden states h (N, H) for targets `tgt` (N,) or
    (N, K) (K targets per state, one readout) — the very arithmetic of
    `ouro_lab.trace.step_signals` (same chunks, same float32 log-softmax, same argmax), so a
    plain k-step run and a replay of the trace at step k agree bit for bit on one plan (the
    module docstring says when plans differ)."""
    N, V = h.shape[0], model.config.vocab_size
    lp = torch.empty(tgt.shape, dtype=torch.float32, device=h.device)
    greedy = torch.empty(tgt.shape, dtype=torch.bool, device=h.device)
    chunk = max(1, CHUNK_ELEMENTS // max(V, 1))
    many = tgt.dim() == 2
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        logp = F.log_softmax(model.lm_head(h[a:b]).float(), dim=-1)
        t = tgt[a:b] if many else tgt[a:b, None]
        top = logp.argmax(-1, keepdim=True)  # the first of tied maxima, as head_signals
        got, hit = logp.gather(1, t.clamp(min=0)), top == t
        lp[a:b], greedy[a:b] = (got, hit) if many else (got[:, 0], hit[:, 0])
    return lp.cpu(), greedy.cpu()


def _batches(units: list[Unit], batch_size: int, max_length: int):
    """The per-request plan (lm-eval's HFLM without its context grouping): length-sorted
    batches, longest first, one right-padded sequence per unit. Yields the unit indices and
    (ids, attention mask, targets, scored mask). `_units_forward` does not use it (it runs
    each distinct prefix once); it is the reference tests and benchmarks compare with."""
    order = sorted(range(len(units)), key=lambda i: (-len(units[i].ctx) - len(units[i].cont), i))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        seqs, scored = [], []
        for i in idx:
            u = units[i]
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
                   signals: bool, progress=None, stats: dict | None = None, row: int | None = None):
    """Run every unit through `steps` loop steps, each distinct prefix once
    (`ouro_lab.prefix`: the units' prefix tree, packed rows over a cached shared path). With
    `signals`, return every step's signals of every scored token (`step_signals`, (R, N));
    else only the last step's target log-prob and greedy flag. Tokens come back unit after
    unit, in unit order; also returned: each token's unit, position and attention context.
    `stats` (a dict) receives the work done: tokens_run (tree nodes + row padding),
    prefix_tree_tokens, requested_tokens (one sequence per unit), calls, and flops (the
    matmul FLOPs of every tree node's steps and of the LM-head readouts, padding excluded)."""
    import numpy as np

    from ouro_lab.prefix import PrefixTree, run_plan

    for u in units:
        if not u.cont:
            raise HarnessError("a request has an empty continuation; nothing to score")
    tree = PrefixTree.build(units, max_length)
    programs = tree.plan(batch_size, row)  # row: tokens per packed row (default: the longest unit's)
    # pairs (scored tokens) grouped by node: a call's nodes -> their pairs, K per node at most
    by_node = np.argsort(tree.pair_node, kind="stable")
    starts = np.searchsorted(tree.pair_node[by_node], np.arange(tree.n_nodes + 1))
    remaining = np.bincount(tree.pair_unit, minlength=len(units))
    dev = model.device
    chunks = []
    for call in run_plan(model, tree, programs, steps, owns=distributed.owns):
        a, b = starts[call.nodes], starts[call.nodes + 1]
        K = int((b - a).max()) if len(a) else 1
        pidx = np.full((len(a), K), -1, dtype=np.int64)
        for k in range(K):
            have = a + k < b
            pidx[have, k] = by_node[a[have] + k]
        valid = pidx >= 0
        tgt = torch.as_tensor(np.where(valid, tree.pair_target[np.maximum(pidx, 0)], -1))
        node_of_pair = torch.as_tensor(np.nonzero(valid)[0])
        flat = torch.as_tensor(valid.reshape(-1))
        if signals:
            full = torch.full((*call.mask.shape, K), -1, dtype=torch.long)
            full[call.mask] = tgt
            sig = step_signals(model, call.out, full, call.mask)
            sig = {k: (v.flatten(1)[:, flat] if v.dim() == 3 else v[:, node_of_pair]) for k, v in sig.items()}
        else:
            lp, greedy = _head_scores(model, call.out.step_hidden[-1][call.mask.to(dev)], tgt.to(dev))
            sig = {"target_logprob": lp.reshape(-1)[flat][None],
                   "target_is_argmax": greedy.reshape(-1)[flat][None]}
        pairs = pidx[valid]
        chunks.append((sig, torch.as_tensor(pairs)))
        if progress is not None:
            before = int((remaining == 0).sum())
            np.subtract.at(remaining, tree.pair_unit[pairs], 1)
            progress(int((remaining == 0).sum()) - before)
    if stats is not None:
        from ouro_lab.flops import ModelCost

        flops = tree.flops(ModelCost.from_config(model.config), steps, steps if signals else 1)
        stats.update(tokens_run=int(tree.n_nodes + tree.padding), prefix_tree_tokens=int(tree.n_nodes),
                     requested_tokens=int(tree.requested), calls=sum(len(p) for p in programs),
                     flops=float(flops))
    chunks = [c for part in distributed.all_gather(chunks) for c in part]  # every rank, every call
    unit = torch.as_tensor(tree.pair_unit)
    pos = torch.as_tensor(tree.pair_pos)
    if not chunks:
        empty = torch.zeros(0, dtype=torch.long)
        return {}, empty, empty, empty
    order = torch.cat([c[1] for c in chunks])
    sig = {}
    for k in chunks[0][0]:
        vals = torch.cat([c[0][k] for c in chunks], 1)
        out = torch.empty((vals.shape[0], len(unit)), dtype=vals.dtype)
        out[:, order] = vals
        sig[k] = out
    return sig, unit, pos, pos + 1  # ctx: keys attended = position + 1 (itself included)


# --------------------------------------------------------------------------- the lm-eval LM


def _truthy(v) -> bool:
    """A model_args flag: a bool, or its text from `--model_args` ("true", "1", "yes")."""
    return v.strip().lower() in ("1", "true", "yes") if isinstance(v, str) else bool(v)


class OuroLM(TemplateLM):
    """lm-eval `LM` for ouro-lab checkpoints.

    Build from a checkpoint folder (`path=`, lm-eval's `pretrained=` also works) or from a
    loaded `model` + `tokenizer`. `steps` truncates the loop (default: the model's depth);
    `strategy` (an `ExitStrategy`, or a name with `strategy_params`) runs every request
    live with early exit (`ouro_lab.live`) under `kv_policy` ("full", "copy", "last"); a
    `fixed` strategy is the same as `steps=k` unless `live=True` (then it too runs token
    by token, with its compute recorded). Requests are scored each distinct prefix once
    (`ouro_lab.prefix`), `batch_size` rows a call, left-truncated to `max_length` (default:
    the model's `max_position_embeddings`). `generate_until` decodes greedily or samples as
    the task's generation kwargs ask (do_sample, temperature, top_p, top_k: seeded by
    `seed`, per request and position: `ouro_lab.sampling`), cuts at the `until` strings
    itself, honours `max_gen_toks` and stops at every `stop_ids` id (the end-of-text token
    and the checkpoint's generation_config eos ids, as HF's `generate` does).
    `loglikelihood_rolling` returns bare floats.
    `chat_template` overrides the tokenizer's chat template (`ouro_lab.chat`).

    Live runs keep per-request compute in `self.records` (keyed by (task, doc_id, idx)).
    """

    def __init__(self, path: str | None = None, pretrained: str | None = None, model=None, tokenizer=None,
                 steps: int | None = None, strategy=None, strategy_params: dict | None = None,
                 kv_policy: str = "copy", live: bool | None = None, batch_size: int | str = 8,
                 device: str | None = None, dtype: str | None = None, max_length: int | None = None,
                 max_gen_toks: int | None = None, seed: int = 0, chat_template: str | None = None,
                 draft_len: int | None = None, add_bos_token: bool | None = None, **kwargs):
        super().__init__()
        # as HFLM's: None keeps the tokenizer's own default for special tokens
        self.add_bos_token = None if add_bos_token in (None, "") else _truthy(add_bos_token)
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
        from ouro_lab.chat import ChatTemplate

        # lm-eval's chat interface; `chat_template` (a Jinja file or text) overrides the tokenizer's
        self.chat = ChatTemplate(tokenizer, chat_template,
                                 source=f"tokenizer of {path}" if path else "the tokenizer")
        R = model.config.total_ut_steps
        if isinstance(strategy, str):
            from ouro_lab.registry import make_strategy
            params = dict(strategy_params or {})
            params.update({k: v for k, v in kwargs.items()})
            strategy = make_strategy(strategy, params)
        elif kwargs:
            raise HarnessError(f"model_args: unknown argument(s) {', '.join(sorted(kwargs))}; known: path, "
                               "steps, strategy, kv_policy, live, batch_size, device, dtype, max_length, "
                               "max_gen_toks, seed, chat_template, draft_len, add_bos_token")
        # draft_len: generate_until decodes speculatively (ouro_lab.speculative), `strategy` drafting
        self.draft_len = None if draft_len in (None, "") else int(draft_len)
        if self.draft_len is not None and (strategy is None or self.draft_len < 1):
            raise HarnessError("model_args: draft_len (speculative decoding) needs a draft strategy "
                               "(strategy=fixed,step=1) and a value >= 1")
        if not live and _is_fixed(strategy) and self.draft_len is None:  # fixed k = the model truncated
            steps, strategy = min(int(strategy.step), R if steps is None else int(steps)), None  # to k steps
        self.steps = R if steps is None else int(steps)
        # live: loglikelihood requests run token by token with early exit (ouro_lab.live)
        self.live = _truthy(live) if live is not None else strategy is not None
        if self.steps < 1:
            raise HarnessError(f"model_args: steps must be >= 1, got {steps}")
        self.strategy = strategy
        if kv_policy not in KV_POLICIES:
            raise HarnessError(f"model_args: kv_policy {kv_policy!r} unknown; "
                               f"use one of {', '.join(KV_POLICIES)}")
        self.kv_policy = kv_policy
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.batch_size = resolve_batch_size(batch_size, model, self.max_length)
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
    def stop_ids(self) -> list[int]:
        """The ids that end a generation, as HF's `generate` stops: the end-of-text token and
        every `eos_token_id` of the checkpoint's generation_config.json and config.json."""
        if getattr(self, "_stop_ids", None) is None:
            import contextlib
            import json
            from pathlib import Path

            found = [self.eot_token_id, self.model.config.eos_token_id]
            gc = Path(self.path) / "generation_config.json" if self.path else None
            if gc is not None and gc.is_file():
                with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: eot still stops
                    found.append(json.loads(gc.read_text()).get("eos_token_id"))
            flat = [t for f in found for t in (f if isinstance(f, list) else [f])]
            self._stop_ids = sorted({t for t in flat if isinstance(t, int) and not isinstance(t, bool)})
        return self._stop_ids

    @property
    def tokenizer_name(self) -> str:
        return self.chat.tokenizer_name

    # -- lm-eval's chat-template interface (--apply_chat_template, --system_instruction,
    #    --fewshot_as_multiturn): `ouro_lab.chat.ChatTemplate`
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.chat.chat_template(chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.chat.apply_chat_template(chat_history, add_generation_prompt)

    @property
    def device(self):
        return self.model.device

    @property
    def prefix_token_id(self) -> int:
        """What an empty context or a rolling window starts from, as lm-eval's HFLM: the
        tokenizer's BOS token, else its end-of-text token."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids, as HFLM encodes: `add_special_tokens=None` keeps the tokenizer's default
        (a Llama-style tokenizer adds its BOS) unless `add_bos_token` was given, and adds
        nothing to a text that already starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.decode([self.prefix_token_id])
            if bos and string.startswith(bos):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": bool(add_special_tokens)}
        return list(self.tokenizer(string, **kw).input_ids)

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

    def unit(self, context: str, continuation: str, task=None, doc_id=None, idx: int = 0) -> Unit:
        """A loglikelihood request as a Unit. A continuation longer than `max_length` is
        refused, as HFLM refuses it: its score would be that of its last tokens only."""
        c, x = self.encode_request(context, continuation)
        if len(x) > self.max_length:
            raise HarnessError(f"task {task or '?'}, document {doc_id}: its continuation has {len(x)} "
                               f"tokens, more than the {self.max_length} the model reads (max_length); drop "
                               "the task or shorten its continuations")
        return Unit(tuple(c), tuple(x), task or "", -1 if doc_id is None else doc_id, idx)

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
        if self.draft_len is not None:
            raise HarnessError("model_args: draft_len (speculative decoding) is for generate_until tasks; "
                               "loglikelihood requests are scored at full depth in one parallel pass already")
        if self.live:
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
        return unit_results(sig["target_logprob"][-1], sig["target_is_argmax"][-1], lengths)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        units, keys = [], []
        for req in requests:
            units.append(self.unit(*req.args, req.task_name, req.doc_id, req.idx))
            keys.append((req.task_name, req.doc_id, req.idx))
        return self._score_units(units, keys)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        units, owner, keys = [], [], []
        for i, req in enumerate(requests):
            for w, (c, x) in enumerate(self.rolling_units(req.args[0])):
                units.append(Unit(tuple(c), tuple(x), req.task_name, req.doc_id, req.idx, w))
                owner.append(i)
                keys.append((req.task_name, req.doc_id, req.idx))
        res = self._score_units(units, keys)
        total = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, res, strict=True):
            total[i] += lp
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
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
            # lm-eval's names for the cap, in its order of priority (`normalize_gen_kwargs`)
            caps = [gk.pop(k, None) for k in ("max_gen_toks", "max_new_tokens", "max_tokens",
                                              "max_completion_tokens")]
            max_new = int(next((c for c in caps if c is not None), self.max_gen_toks))
            if self.max_gen_cap is not None:
                max_new = min(max_new, self.max_gen_cap)
            if max_new >= self.max_length:  # no room for the prompt (HFLM refuses too)
                raise HarnessError(f"generate_until: {requests[i].task_name or 'a task'} asks for {max_new} "
                                   f"new tokens, not below max_length {self.max_length}; cap them with the "
                                   "task's max_gen_toks or the recipe's live.max_gen_toks (lm-eval: "
                                   "model_args max_gen_toks=N)")
            sampling = Sampling.from_gen_kwargs(gk, self.seed)  # greedy unless the task asks to sample
            bad = {k: v for k, v in gk.items() if k in UNSUPPORTED_GEN and v not in UNSUPPORTED_GEN[k]}
            if bad:
                raise HarnessError(f"generate_until: {', '.join(f'{k}={v}' for k, v in bad.items())} is not "
                                   "supported (greedy, or do_sample with temperature, top_p, top_k)")
            groups[(tuple(until), max_new, sampling)].append(i)
        seen: dict = defaultdict(int)
        clone = []  # each request's occurrence among identical ones (lm-eval's `repeats`)
        for r in requests:
            clone.append(seen[(r.task_name, r.doc_id, r.idx)])
            seen[(r.task_name, r.doc_id, r.idx)] += 1
        done: list = [None] * len(requests)  # (text, record) per request
        plan: list[int] = []  # requests in the order their chunks run (records keep it)
        n_chunk = 0
        for (until, max_new, sampling), idx in groups.items():
            if self.draft_len is not None and sampling.do_sample:
                raise HarnessError("generate_until: speculative decoding (draft_len) reproduces greedy "
                                   "full-depth decoding; this task samples (do_sample / temperature > 0)")
            enc = {i: self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in idx}
            idx = sorted(idx, key=lambda i: (-len(enc[i]), i))
            for part in chunks(idx, self.batch_size):  # batch_size rows; a finished row takes the next
                plan.extend(part)
                n_chunk += 1
                if not distributed.owns(n_chunk - 1):  # data parallel: whole chunks per rank
                    continue
                prompts = [enc[i][-(self.max_length - max_new):] for i in part]
                # draws (random rules, sampling) keyed by request, not by place in this call;
                # lm-eval's `repeats` clones of one request draw apart (their occurrence)
                ids = request_keys([(requests[i].task_name, requests[i].doc_id, requests[i].idx, clone[i])
                                    for i in part])
                kw = dict(until=list(until), max_new_tokens=max_new, steps=self.steps, seed=self.seed,
                          eos_token_id=self.stop_ids, row_ids=ids, batch_size=self.batch_size)
                m, tok, st = self.model, self.tokenizer, self.strategy
                texts, recs = (live_generate(m, tok, prompts, st, self.kv_policy, sampling=sampling, **kw)
                               if self.draft_len is None else
                               speculative_generate(m, tok, prompts, st, self.draft_len, **kw))
                for i, t, rec in zip(part, texts, recs, strict=True):
                    done[i] = (t, rec)
        done = distributed.merge(done)  # every rank gets every request (no-op in one process)
        for i in plan:
            out[i], rec = done[i]
            r = requests[i]
            self.records.setdefault((r.task_name, r.doc_id, r.idx), _empty_record()).update_add(rec)
        return out


CPU_BATCH = 8         # `batch_size: auto` off CUDA: larger batches barely help a CPU
PROBE_TOKENS = 2048   # the longest sequence an auto batch is sized for (at most max_length)


def resolve_batch_size(batch_size: int | str, model, max_length: int | None = None, max_batch: int = 64,
                       log=None) -> int:
    """An int as it is; "auto": on CUDA the largest batch (up to `max_batch`) whose full-depth
    forward of min(max_length, PROBE_TOKENS) tokens a row fits in memory, found by trying
    (halving from `max_batch`, then bisecting), elsewhere CPU_BATCH. Logged either way (one
    line on stderr, or to `log`)."""
    import sys

    if not str(batch_size).startswith("auto"):
        try:
            n = int(batch_size)
        except ValueError:
            n = 0
        if n < 1:
            raise HarnessError(f"batch_size {batch_size!r}: give a positive integer or auto")
        return n
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dev = model.device
    if dev.type != "cuda":
        log(f"batch_size auto: {CPU_BATCH} on {dev.type} (no memory probe off CUDA; give a number to "
            "change it)")
        return CPU_BATCH
    T = min(max_length or PROBE_TOKENS, PROBE_TOKENS)

    def fits(b: int) -> bool:
        try:
            with torch.no_grad():
                out = model(torch.zeros(b, T, dtype=torch.long, device=dev))
                ids = torch.zeros(b, T, dtype=torch.long)
                step_signals(model, out, ids, torch.ones(b, T, dtype=torch.bool))
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    n = largest_fitting(fits, max_batch)
    if n == 0:
        raise HarnessError(f"batch_size auto: not even one sequence of {T} tokens fits on {dev}; lower "
                           "max_length or use a smaller dtype")
    log(f"batch_size auto: {n} (the largest of <= {max_batch} whose full-depth pass of {T} tokens a row "
        f"fits on {dev})")
    return n


def largest_fitting(fits, start: int) -> int:
    """The largest n in 1..start with fits(n), assuming fits is monotone: halve from `start`
    until one fits, then bisect up to the smallest that did not (0 if none fits)."""
    hi, lo = start + 1, 0  # fits(lo) (0: vacuously), not fits(hi)
    n = start
    while n >= 1 and not fits(n):
        hi, n = n, n // 2
    if n < 1:
        return 0
    lo = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _is_fixed(strategy) -> bool:
    """The built-in `fixed` strategy (exit every token at step k): its class, not a name that
    looks like it (a user's `fixed_then_kl` with a `step` field is a rule of its own)."""
    from ouro_lab.registry import load_strategy

    if strategy is None:
        return False
    try:
        return type(strategy) is load_strategy("fixed")
    except OuroLabError:  # the registry cannot load it (a broken entry point): not the built-in, then
        return False


class _Record(dict):
    """Per-request compute of a live run: tokens, sum of exit steps (1-based), steps
    executed, FLOPs executed (prefill included for loglikelihood), wall seconds; for
    generation, `exits` {step used (1-based): generated tokens}."""

    def update_add(self, other: dict) -> None:
        for k, v in other.items():
            if isinstance(v, dict):  # counts by key
                mine = self.setdefault(k, {})
                for key, n in v.items():
                    mine[key] = mine.get(key, 0) + n
            else:
                self[k] = self.get(k, 0) + v


def _empty_record() -> _Record:
    return _Record()
