"""Live early exit: decode token by token, each token stopping at the step its strategy picks.

At every new token, loop step r runs only for the rows still active; after it the
strategy reads the signals of steps 0..r (`decide_checked(strategy, signals, r)`: the
call replay makes, with the same contract checks) and exited rows stop. An exited token
never computes its deeper steps, yet later tokens attend to its KV at those steps;
`kv_policy` says what they see:

    full   every token computes every step anyway (exact; the exit only picks the step
           whose prediction is used; no savings)
    copy   the exit step's K/V is copied into the deeper steps' slots (real savings)
    last   one K/V slot per layer shared by all steps; each token leaves the K/V of the
           last step it computed (Ouro's last-step KV sharing)

The K/V live in the model's static cache (`ouro_lab.model.KVCache`), written in place;
a step that runs for a subset of rows attends over their cache rows without copying
them. FLOPs are counted as executed (`ouro_lab.flops.ModelCost`: loop steps actually run
at the token's attention context, LM-head readouts actually made) and wall time measured,
prefill and decode apart.

`live_generate` prefills all prompt tokens but the last at full depth in one parallel
pass, then feeds the last prompt token and every generated token live; with more prompts
than `batch_size` rows, a finished row takes the next prompt (continuous batching).
`live_score_units` (lm-eval loglikelihood requests) runs every token live, prompt
included, so the gap to one-pass replay (which assumes earlier tokens' deeper steps exist)
can be measured.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ouro_lab import distributed
from ouro_lab.errors import OuroLabError
from ouro_lab.flops import ModelCost
from ouro_lab.model import KVCache
from ouro_lab.strategy import HEAD_SIGNALS, Signals, allowed_signals, decide_checked, expand_needs
from ouro_lab.trace import head_signals, unit_results

KV_POLICIES = ("full", "copy", "last")
TARGET_SIGNALS = frozenset({"target_logprob", "target_is_argmax"})
GATE_SIGNALS = frozenset({"gate_logit", "exit_pdf", "exit_cdf"})
COUNTERS = ("flops", "flops_used", "steps_executed", "readouts", "tokens")


class LiveError(OuroLabError):
    """A strategy or setting that cannot run live."""


class _StepSignals:
    """The signals one token's active rows have read so far, defined exactly as
    `ouro_lab.trace.step_signals`. Compact: row i is the i-th row still active; `keep`
    drops the rows that exited."""

    def __init__(self, needs: set[str], steps: int, targets: Tensor | None):
        self.needs, self.R, self.tgt = needs, steps, targets
        self.hist: dict[str, list[Tensor]] = {k: [] for k in needs}
        self.remaining = self.running = self.h_prev = self.logp_prev = None

    def add(self, model, r: int, h: Tensor) -> Tensor | None:
        """Signals of step r from the rows' states h (n, H); returns the step's log-probs
        (n, V) when the rule reads the head."""
        vals: dict[str, Tensor] = {}
        if self.needs & GATE_SIGNALS:
            gate = model.gate(h).float()
            lam = torch.sigmoid(gate)
            if self.remaining is None:
                self.remaining, self.running = torch.ones_like(lam), torch.zeros_like(lam)
            pdf = lam * self.remaining if r < self.R - 1 else self.remaining
            self.remaining = self.remaining * (1 - lam)
            self.running = self.running + pdf
            cdf = self.running.clamp(max=1.0) if r < self.R - 1 else torch.ones_like(pdf)
            vals.update(gate_logit=gate, exit_pdf=pdf, exit_cdf=cdf)
        if "hidden_delta" in self.needs:
            h32 = h.float()
            vals["hidden_delta"] = (torch.full_like(h32[:, 0], math.inf) if self.h_prev is None else
                                    (h32 - self.h_prev).norm(dim=-1) / h32.norm(dim=-1))
            self.h_prev = h32
        logp = None
        if self.needs & HEAD_SIGNALS:  # the one definition of the head signals: replay = live
            head, logp = head_signals(model.lm_head(h), self.logp_prev, self.tgt)
            vals.update(head)
            self.logp_prev = logp
        for k in self.needs:
            self.hist[k].append(vals[k])
        return logp

    def keep(self, idx: Tensor) -> None:
        """Keep rows `idx` (positions among the current rows)."""
        self.hist = {k: [v[idx] for v in vs] for k, vs in self.hist.items()}
        for name in ("remaining", "running", "h_prev", "logp_prev", "tgt"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[idx])

    def data(self) -> dict[str, Tensor]:
        return {k: torch.stack(v) for k, v in self.hist.items()}


class LiveBatch:
    """The decoding state of B rows: the static KV cache, positions and the compute counters.

    `step(tokens, alive, ...)` feeds one token per row (rows with `alive` False are
    padding: masked out, nothing computed) and returns each row's exit step and, where
    asked, the exit step's log-probabilities. Counters (B,) on the CPU: `flops`,
    `flops_used`, `steps_executed`, `readouts` (LM-head projections), `tokens` (tokens fed).
    `capacity` preallocates the cache for that many tokens per row (else it grows)."""

    def __init__(self, model, strategy=None, kv_policy: str = "copy", steps: int | None = None,
                 batch: int = 1, seed: int = 0, row_ids=None, capacity: int = 0):
        if kv_policy not in KV_POLICIES:
            raise LiveError(f"kv_policy {kv_policy!r} unknown; use one of {', '.join(KV_POLICIES)}")
        self.model, self.strategy, self.policy = model, strategy, kv_policy
        self.R = steps or model.config.total_ut_steps
        self.cost = ModelCost.from_config(model.config)
        self.needs = expand_needs(strategy.needs) if strategy is not None else set()
        self.allowed = allowed_signals(strategy) if strategy is not None else frozenset()
        self.cache = KVCache(shared=kv_policy == "last", steps=self.R)
        if capacity:
            self.cache.allocate(model.config, batch, capacity, model.dtype, model.device)
        self.B, self.seed = batch, seed
        # stable ids of the rows' requests: randomized rules draw per (request, token), so
        # the same slot in two batches does not repeat the same draws
        self.row_ids = torch.arange(batch) if row_ids is None else torch.as_tensor(row_ids).long().clone()
        self.fed = torch.zeros(batch, dtype=torch.long)  # tokens fed per row (live draws' index)
        self.flops = torch.zeros(batch, dtype=torch.float64)
        # FLOPs the exit steps alone would cost (what replay charges): steps up to the exit
        # at the token's context plus the readouts made; equals `flops` unless policy "full"
        self.flops_used = torch.zeros(batch, dtype=torch.float64)
        self.steps_executed = torch.zeros(batch, dtype=torch.long)
        self.readouts = torch.zeros(batch, dtype=torch.long)
        self.tokens = torch.zeros(batch, dtype=torch.long)

    def _ctx_lengths(self) -> Tensor:
        """Keys each row's latest token attends to, itself included (positions count real tokens)."""
        return self.cache.next_pos.cpu()

    def start(self, rows: Tensor, request_ids) -> None:
        """Empty `rows` for new requests: cache rows, counters, draw ids."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.cache.store is not None:
            self.cache.reset(rows)
        for name in COUNTERS + ("fed",):
            getattr(self, name)[rows] = 0
        self.row_ids[rows] = torch.as_tensor(request_ids, dtype=torch.long)

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor, rows: Tensor | None = None) -> None:
        """All tokens of left-padded `ids` (n, T) at full depth in one parallel pass, into
        cache rows `rows` (default all). Under `last` each step overwrites the one slot, so
        the last step's K/V remain."""
        if ids.shape[1] == 0:
            return
        self.model(ids.to(self.model.device), mask, self.R, None, self.cache, rows)
        rows = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        lengths = mask.sum(1).cpu()
        flops = torch.tensor([self.cost.sequence_flops(int(n), self.R, readouts=0) for n in lengths],
                             dtype=torch.float64)
        self.flops[rows] += flops
        self.flops_used[rows] += flops
        self.steps_executed[rows] += lengths * self.R
        self.tokens[rows] += lengths
        self.fed[rows] += lengths

    @torch.no_grad()
    def step(self, tokens: Tensor, alive: Tensor, targets: Tensor | None = None,
             readout: Tensor | None = None, keep_states: bool = False) -> dict:
        """Feed one token per row. `targets` (B,) the next token (for target signals and
        scoring), `readout` (B,) bool: rows whose prediction is wanted (default: alive).

        Returns {exit (B,) 0-based, logp (B, V) float32 of the exit step for readout rows
        (NaN elsewhere), target_logprob (B,), target_is_argmax (B,) if targets; with
        `keep_states`, states: (R, B, H) each row's state after every step it ran}."""
        model, R, dev, B = self.model, self.R, self.model.device, tokens.shape[0]
        alive = alive.cpu().bool()
        readout = alive if readout is None else (readout.cpu().bool() & alive)
        if self.needs & TARGET_SIGNALS and targets is None:
            raise LiveError(f"strategy {type(self.strategy).__module__} reads the target token, "
                            "which decoding does not know; it can only be replayed")
        tgt = None if targets is None else targets.to(dev).long()
        x, ctx = model.prepare(tokens.to(dev)[:, None], alive[:, None], None, self.cache)
        ctx_len = self._ctx_lengths()
        step_cost = (self.cost.layer_flops + self.cost.gate_flops
                     + self.cost.attn_flops_per_ctx * ctx_len.double())
        exit_step = torch.full((B,), R - 1, dtype=torch.long)
        decided = torch.zeros(B, dtype=torch.bool)
        exit_logp = torch.full((B, model.config.vocab_size), math.nan, device=dev)
        H = model.config.hidden_size
        states = torch.zeros(R, B, H, dtype=x.dtype, device=dev) if keep_states else None
        readouts_before = self.readouts.clone()
        A = alive.nonzero()[:, 0]  # the rows still computing; h, sig are compact over them
        sig = _StepSignals(self.needs, R, None if tgt is None else tgt[A.to(dev)]) if self.needs else None
        index = self.row_ids * 1_000_003 + self.fed
        h = x if len(A) == B else x[A.to(dev)]
        for r in range(R):
            if len(A) == 0:
                break
            h = model.loop_step(h, r, ctx if len(A) == B else ctx.select(A))
            self.flops[A] += step_cost[A]
            self.steps_executed[A] += 1
            if states is not None:
                states[r, A.to(dev)] = h[:, 0]
            logp = sig.add(model, r, h[:, 0]) if sig is not None else None
            if logp is not None:
                self.readouts[A] += 1
                self.flops[A] += self.cost.head_flops
            stop = self._decide(r, A, sig, index, ctx_len)
            done = (stop & ~decided[A]).nonzero()[:, 0]  # positions among A of the rows exiting now
            if len(done):
                exit_step[A[done]] = r
                decided[A[done]] = True
                want = done[readout[A[done]]]
                if len(want):
                    exit_logp[A[want].to(dev)] = (logp[want.to(dev)] if logp is not None
                                                  else self._read_head(A[want], h[want.to(dev), 0]))
            if self.policy != "full" and len(done):
                keep = (~stop).nonzero()[:, 0]
                A, h = A[keep], h[keep.to(dev)]
                if sig is not None:
                    sig.keep(keep.to(dev))
        if self.policy == "copy":
            self._copy_deeper(exit_step, alive)
        self._account(exit_step, alive, step_cost, readouts_before)
        out = {"exit": exit_step, "logp": exit_logp}
        if tgt is not None:
            out["target_logprob"] = exit_logp.gather(1, tgt.clamp(min=0)[:, None])[:, 0].cpu()
            top1 = exit_logp.topk(min(2, exit_logp.shape[-1]), dim=-1).indices[:, 0]  # as head_signals
            out["target_is_argmax"] = (top1 == tgt).cpu()
        if states is not None:
            out["states"] = states
        return out

    def _decide(self, r: int, A: Tensor, sig: _StepSignals | None, index: Tensor, ctx_len: Tensor) -> Tensor:
        """(len(A),) CPU bool: which active rows exit at step r (the last step always)."""
        if r == self.R - 1 or self.strategy is None:
            return torch.full((len(A),), r == self.R - 1, dtype=torch.bool)
        dev = self.model.device
        ids = index[A].to(dev)
        s = Signals(sig.data() if sig is not None else {}, self.R, ids, ids, self.seed,
                    ctx_len[A].to(dev), self.cost, len(A)).only(self.allowed)
        return decide_checked(self.strategy, s, r).cpu()  # the contract, as replay enforces it

    def _read_head(self, rows: Tensor, h: Tensor) -> Tensor:
        """The exit step's log-probs of `rows` (a readout only where a prediction is wanted)."""
        self.readouts[rows] += 1
        self.flops[rows] += self.cost.head_flops
        return F.log_softmax(self.model.lm_head(h).float(), dim=-1)

    def _copy_deeper(self, exit_step: Tensor, alive: Tensor) -> None:
        """`copy` policy: the deeper slots of a token that exited at step e get its K/V of step e."""
        cols = self.cache.lengths - 1  # the column each row's token was just written to
        for e in range(self.R - 1):
            rows = (alive & (exit_step == e)).nonzero()[:, 0]
            if len(rows):
                self.cache.copy_deeper(e, rows, cols[rows])

    def _account(self, exit_step: Tensor, alive: Tensor, step_cost: Tensor, readouts_before: Tensor) -> None:
        # "used" = what the exits alone need (what replay charges): steps up to the exit and the
        # rule's readouts there; under policy "full" the executed count also has the steps after
        need = (self.strategy.readouts(exit_step) if self.strategy is not None
                else self.readouts - readouts_before)
        used = (exit_step + 1).double() * step_cost + need.double() * self.cost.head_flops
        self.flops_used += torch.where(alive, used, 0.0)
        self.tokens += alive.long()
        self.fed += alive.long()

    def record(self, row: int) -> dict:
        """The compute counters of one row (its request since `start`)."""
        return {name: getattr(self, name)[row].item() for name in COUNTERS}


def _left_pad(seqs: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            ids[j, T - len(s):] = torch.tensor(s)
            mask[j, T - len(s):] = 1
    return ids, mask


class Generation:
    """Greedy generation of many prompts on a batch of rows (continuous batching).

    Rows take prompts in order; a row stops at its first `until` string (the text is cut
    there), at `eos_token_id` or after `max_new_tokens` predictions, and the next prompt
    takes it. `texts` and `records` (per prompt) fill as rows finish; wall time is
    measured apart for prefill (per row, by its share of the call's prompt tokens) and
    decode (each call shared by the rows it fed)."""

    def __init__(self, tokenizer, prompts: list[list[int]], rows: int, until, max_new_tokens: int,
                 eos_token_id: int | None, request_ids=None):
        self.tok, self.prompts, self.B = tokenizer, prompts, rows
        self.ids = list(range(len(prompts))) if request_ids is None else list(request_ids)
        self.until = [u for u in (until or []) if u]
        self.max_new, self.eos = max_new_tokens, eos_token_id
        self.queue = list(range(len(prompts)))[::-1]  # next prompt last
        self.owner = [-1] * rows  # prompt held by each row (-1: free)
        self.gen: list[list[int]] = [[] for _ in prompts]
        self.texts = [""] * len(prompts)
        self.records: list[dict] = [{"tokens": 0, "steps_used": 0, "prefill_seconds": 0.0,
                                     "decode_seconds": 0.0, "prefill_tokens": 0} for _ in prompts]
        self.cur = torch.zeros(rows, dtype=torch.long)  # the token each row feeds next

    @property
    def alive(self) -> Tensor:
        return torch.tensor([o >= 0 for o in self.owner], dtype=torch.bool)

    def admit(self, run: LiveBatch) -> None:
        """Free rows take the next prompts: all but the last token prefilled at full depth
        (one left-padded pass when every row is free, else row by row)."""
        free = [b for b in range(self.B) if self.owner[b] < 0][:len(self.queue)]
        if not free:
            return
        take = [(b, self.queue.pop()) for b in free]
        for b, i in take:
            self.owner[b] = i
            self.cur[b] = self.prompts[i][-1]
        run.start(torch.tensor(free), [self.ids[i] for _, i in take])
        groups = [take] if len(take) == self.B else [[t] for t in take]
        for group in groups:
            t0 = time.perf_counter()
            ids, mask = _left_pad([self.prompts[i][:-1] for _, i in group])
            run.prefill(ids, mask, None if len(group) == self.B else torch.tensor([b for b, _ in group]))
            n = max(int(mask.sum()), 1)
            dt = time.perf_counter() - t0
            for b, i in group:  # the call's time shared by prompt tokens
                self.records[i]["prefill_seconds"] += dt * (len(self.prompts[i]) - 1) / n
                self.records[i]["prefill_tokens"] += len(self.prompts[i]) - 1
                self.records[i]["_prefill"] = run.record(b)

    def emit(self, b: int, tokens: list[int], seconds: float, steps_used: int = 0) -> bool:
        """Row b's new tokens (greedy predictions in order) and its share of the decode
        time. Returns True when the row stopped."""
        i = self.owner[b]
        rec = self.records[i]
        rec["decode_seconds"] += seconds
        rec["steps_used"] += steps_used
        stopped = False
        for t in tokens:
            rec["tokens"] += 1
            if self.eos is not None and t == self.eos:
                stopped = True
                break
            self.gen[i].append(t)
            text = self.tok.decode(self.gen[i], skip_special_tokens=True)
            cut = min((text.find(u) for u in self.until if u in text), default=-1)
            self.texts[i] = text[:cut] if cut >= 0 else text
            if cut >= 0 or rec["tokens"] >= self.max_new:
                stopped = True
                break
        self.cur[b] = tokens[-1] if tokens else self.cur[b]
        return stopped

    def finish(self, b: int, run: LiveBatch) -> None:
        """Row b's prompt is done: its compute counters join its record and the row is free."""
        i = self.owner[b]
        rec, now = self.records[i], run.record(b)
        pre = rec.pop("_prefill")
        rec.update(flops=now["flops"], flops_decode=now["flops"] - pre["flops"],
                   flops_used_decode=now["flops_used"] - pre["flops_used"],
                   steps_executed=int(now["steps_executed"] - pre["steps_executed"]),
                   seconds=rec["prefill_seconds"] + rec["decode_seconds"])
        self.owner[b] = -1

    def active(self) -> bool:
        return bool(self.queue) or any(o >= 0 for o in self.owner)


@torch.no_grad()
def live_generate(model, tokenizer, prompts: list[list[int]], strategy=None, kv_policy: str = "copy",
                  until: list[str] | None = None, max_new_tokens: int = 32, steps: int | None = None,
                  eos_token_id: int | None = None, seed: int = 0, row_ids=None,
                  batch_size: int | None = None) -> tuple[list[str], list[dict]]:
    """Greedy decoding of prompts (token id lists) with live early exit, `batch_size` rows
    at a time (default: all at once) with continuous batching.

    Each prompt stops at its first `until` string (the text is cut there), at `eos_token_id`
    or after `max_new_tokens`; finished rows compute nothing until the next prompt takes
    them. Returns the texts and per-prompt records: tokens (predictions made), steps_used
    (sum of 1-based exit steps), steps_executed, flops (prefill included), flops_decode,
    flops_used_decode, prefill_seconds / prefill_tokens (the prompt but its last token),
    decode_seconds and seconds (both)."""
    B = max(1, min(batch_size or len(prompts), len(prompts)))
    run = LiveBatch(model, strategy, kv_policy, steps, B, seed,
                    capacity=max((len(p) for p in prompts), default=1) + max_new_tokens)
    gen = Generation(tokenizer, prompts, B, until, max_new_tokens, eos_token_id, row_ids)
    while gen.active():
        gen.admit(run)
        alive = gen.alive
        t0 = time.perf_counter()
        out = run.step(gen.cur, alive)
        nxt = out["logp"].argmax(-1).cpu()
        share = (time.perf_counter() - t0) / max(int(alive.sum()), 1)
        for b in alive.nonzero()[:, 0].tolist():
            if gen.emit(b, [int(nxt[b])], share, int(out["exit"][b]) + 1):
                gen.finish(b, run)
    return gen.texts, gen.records


@torch.no_grad()
def live_score_units(model, units, strategy=None, kv_policy: str = "copy", batch_size: int = 8,
                     max_length: int = 4096, steps: int | None = None, seed: int = 0):
    """Loglikelihood of `units` (ouro_lab.lm.Unit) with every token, prompt included,
    really stopping at its exit step. Returns per-unit (logprob, is_greedy) and records:
    tokens (scored), steps_used / steps_executed (sums over scored tokens), flops (all
    tokens, prompt included), flops_scored, tokens_all, seconds (= decode_seconds: every
    token is decoded live)."""
    results: list = [None] * len(units)
    records: list = [None] * len(units)
    order = sorted(range(len(units)), key=lambda i: (-len(units[i].ctx) - len(units[i].cont), i))
    for s in range(0, len(order), batch_size):
        if not distributed.owns(s // batch_size):  # data parallel: whole batches of this plan per rank
            continue
        idx = order[s:s + batch_size]
        res, recs = _score_batch(model, [units[i] for i in idx], idx, strategy, kv_policy, max_length,
                                 steps, seed)
        for j, i in enumerate(idx):
            results[i], records[i] = res[j], recs[j]
    return distributed.merge(results), distributed.merge(records)  # no-op in one process


def _score_batch(model, units, row_ids, strategy, kv_policy, max_length, steps, seed):
    """One batch of `live_score_units`: every token fed live, the continuation's scored."""
    t0 = time.perf_counter()
    wholes = [(list(u.ctx) + list(u.cont))[-(max_length + 1):] for u in units]
    n_scored = [min(len(u.cont), len(w) - 1) for u, w in zip(units, wholes, strict=True)]
    ids, mask = _left_pad([w[:-1] for w in wholes])
    tgts, _ = _left_pad([w[1:] for w in wholes], pad=-1)
    B, T = ids.shape
    scored = torch.zeros(B, T, dtype=torch.bool)
    for j, n in enumerate(n_scored):
        scored[j, T - n:] = True
    run = LiveBatch(model, strategy, kv_policy, steps, B, seed, row_ids, capacity=T)
    lp, greedy = torch.zeros(B, T), torch.ones(B, T, dtype=torch.bool)
    sums = {k: torch.zeros(B, dtype=torch.float64) for k in ("used", "execd", "flops", "flops_used")}
    for t in range(T):
        before = (run.flops.clone(), run.steps_executed.clone(), run.flops_used.clone())
        out = run.step(ids[:, t], mask[:, t].bool(), targets=tgts[:, t], readout=scored[:, t])
        sc = scored[:, t]
        lp[sc, t] = out["target_logprob"][sc]
        greedy[sc, t] = out["target_is_argmax"][sc]
        sums["used"] += torch.where(sc, out["exit"] + 1, 0)
        sums["execd"] += torch.where(sc, run.steps_executed - before[1], 0)
        sums["flops"] += torch.where(sc, run.flops - before[0], 0)
        sums["flops_used"] += torch.where(sc, run.flops_used - before[2], 0)
    seconds = (time.perf_counter() - t0) / B
    res = [unit_results(lp[j, scored[j]], greedy[j, scored[j]], [int(scored[j].sum())])[0] for j in range(B)]
    recs = [{"tokens": n_scored[j], "steps_used": int(sums["used"][j]),
             "steps_executed": int(sums["execd"][j]),
             "flops": float(run.flops[j]), "flops_scored": float(sums["flops"][j]),
             "flops_used_scored": float(sums["flops_used"][j]), "tokens_all": int(mask[j].sum()),
             "seconds": seconds, "decode_seconds": seconds} for j in range(B)]
    return res, recs


__all__ = ["KV_POLICIES", "Generation", "LiveBatch", "LiveError", "live_generate", "live_score_units"]
