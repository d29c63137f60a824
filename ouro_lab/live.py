"""Live early exit: decode token by token, each token stopping at the step its strategy picks.

Decoding advances in ticks: one tick runs one loop step for every busy row of the batch,
each row at its own step (the steps share their weights, so rows at different steps share
one matmul; each reads and writes its own KV slot). After its step a row's strategy reads
the signals of steps 0..r (`decide_checked(strategy, signals, r)`: the call replay makes,
with the same contract checks); a row whose token exits starts its next token in the next
tick. So a batch of mixed depths costs its rows' own steps, not its deepest row's. Rows in
lockstep under a rule that reads no signals run the steps before its `earliest()` promise
(`fixed` k: k - 1; full depth: R - 1) in one tick, as plain decoding would.

An exited token never computes its deeper steps, yet later tokens attend to its KV at
those steps; `kv_policy` says what they see:

    full   every token computes every step anyway (exact; the exit only picks the step
           whose prediction is used; no savings)
    copy   the exit step's K/V is copied into the deeper steps' slots (real savings)
    last   one K/V slot per layer shared by all steps; each token leaves the K/V of the
           last step it computed (Ouro's last-step KV sharing)

The K/V live in the static cache (`ouro_lab.cache.KVCache`), written in place. FLOPs are
counted as executed (`ouro_lab.flops.ModelCost`: loop steps actually run at the token's
attention context, LM-head readouts actually made) and wall time measured, prefill and
decode apart.

`live_generate` prefills all prompt tokens but the last at full depth in one parallel
pass, then feeds the last prompt token and every generated token live; a finished row
takes the next prompt (continuous batching). `live_score_units` (lm-eval loglikelihood
requests) runs every token live, prompt included, so the gap to one-pass replay (which
assumes earlier tokens' deeper steps exist) can be measured.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ouro_lab import distributed
from ouro_lab.cache import KVCache
from ouro_lab.errors import OuroLabError
from ouro_lab.flops import ModelCost
from ouro_lab.generation import Generation
from ouro_lab.strategy import (
    HEAD_SIGNALS,
    TOKEN_STRIDE,
    Signals,
    allowed_signals,
    decide_checked,
    earliest,
    expand_needs,
    request_keys,
)
from ouro_lab.trace import head_signals, unit_results

KV_POLICIES = ("full", "copy", "last")
TARGET_SIGNALS = frozenset({"target_logprob", "target_is_argmax"})
GATE_SIGNALS = frozenset({"gate_logit", "exit_pdf", "exit_cdf"})
COUNTERS = ("flops", "flops_used", "steps_executed", "readouts", "tokens", "fed")
# Live runs take requests in chunks of this many batches, `batch_size` rows each, with
# continuous batching inside a chunk (a finished row takes the chunk's next request).
# Chunks, not ranks, fix the schedule, so data-parallel runs compute what one process does.
CONTINUOUS_BATCHES = 4


class LiveError(OuroLabError):
    """A strategy or setting that cannot run live."""


def chunks(order: list[int], batch_size: int) -> list[list[int]]:
    """`order` cut into the chunks live runs schedule (see CONTINUOUS_BATCHES)."""
    n = batch_size * CONTINUOUS_BATCHES
    return [order[s:s + n] for s in range(0, len(order), n)]


class _RowSignals:
    """The signals each row's current token has read so far, every row at its own step,
    defined exactly as `ouro_lab.trace.step_signals` (so replay and live decide alike)."""

    def __init__(self, needs: set[str], steps: int, batch: int, device):
        self.needs, self.R = needs, steps
        dtypes = {"argmax": torch.long, "target_is_argmax": torch.bool}
        self.hist = {k: torch.zeros(steps, batch, dtype=dtypes.get(k, torch.float32), device=device)
                     for k in needs}
        self.remaining = torch.ones(batch, device=device)
        self.running = torch.zeros(batch, device=device)
        self.h_prev = self.logp_prev = None

    def start(self, rows: Tensor) -> None:
        self.remaining[rows] = 1.0
        self.running[rows] = 0.0

    def add(self, model, rows: Tensor, steps: Tensor, h: Tensor, targets: Tensor | None) -> Tensor | None:
        """Signals of `rows` (device) at their `steps` (device) from states h (n, H); returns
        the log-probs (n, V) when the rule reads the head."""
        first, last = steps == 0, steps == self.R - 1
        vals: dict[str, Tensor] = {}
        if self.needs & GATE_SIGNALS:
            gate = model.gate(h).float()
            lam, rem = torch.sigmoid(gate), self.remaining[rows]
            pdf = torch.where(last, rem, lam * rem)
            self.remaining[rows] = rem * (1 - lam)
            run = self.running[rows] + pdf
            self.running[rows] = run
            vals.update(gate_logit=gate, exit_pdf=pdf, exit_cdf=torch.where(last, 1.0, run.clamp(max=1.0)))
        if "hidden_delta" in self.needs:
            h32 = h.float()
            if self.h_prev is None:
                self.h_prev = torch.zeros(self.remaining.shape[0], h.shape[-1], device=h.device)
            delta = (h32 - self.h_prev[rows]).norm(dim=-1) / h32.norm(dim=-1)
            vals["hidden_delta"] = torch.where(first, math.inf, delta)
            self.h_prev[rows] = h32
        logp = None
        if self.needs & HEAD_SIGNALS:  # the one definition of the head signals: replay = live
            prev = None if self.logp_prev is None else self.logp_prev[rows]
            head, logp = head_signals(model.lm_head(h), prev, targets)
            head["kl_prev"] = torch.where(first, math.inf, head["kl_prev"])
            if self.logp_prev is None:
                self.logp_prev = torch.zeros(self.remaining.shape[0], logp.shape[-1], device=h.device)
            self.logp_prev[rows] = logp
            vals.update(head)
        for k in self.needs:
            self.hist[k][steps, rows] = vals[k]
        return logp

    def upto(self, r: int, rows: Tensor) -> dict[str, Tensor]:
        return {k: v[:r + 1, rows] for k, v in self.hist.items()}


class LiveBatch:
    """The decoding state of B rows: the static KV cache, each row's token in flight and
    the compute counters (B,) numpy arrays: `flops`, `flops_used`, `steps_executed`,
    `readouts` (LM-head projections), `tokens` (tokens decoded), `fed` (tokens fed). A
    token's compute joins the counters when it finishes.

    `tick(rows, tokens)` starts new tokens in idle rows and runs one loop step for every
    busy row; `step(tokens, alive)` feeds one token per alive row and ticks until all have
    exited. `capacity` preallocates the cache for that many tokens per row (it grows if full).

    The per-row bookkeeping is numpy, not torch: a tick makes a few dozen operations on
    (B,) arrays, each ~1 us in numpy and 5-10 us as a CPU tensor, which at one loop step
    per tick was most of the gap to the ideal speed-up (`bench/live_speed.py`)."""

    def __init__(self, model, strategy=None, kv_policy: str = "copy", steps: int | None = None,
                 batch: int = 1, seed: int = 0, row_ids=None, capacity: int = 0):
        if kv_policy not in KV_POLICIES:
            raise LiveError(f"kv_policy {kv_policy!r} unknown; use one of {', '.join(KV_POLICIES)}")
        if getattr(strategy, "kind", "skip") == "select":
            raise LiveError(f"strategy {type(strategy).__module__} is a select rule (an oracle): it is "
                            "composed from the fixed-step runs per document and cannot decode")
        self.model, self.strategy, self.policy = model, strategy, kv_policy
        cfg, dev = model.config, model.device
        self.dev = dev
        self.R = steps or cfg.total_ut_steps
        self.cost = ModelCost.from_config(cfg)
        self.needs = expand_needs(strategy.needs) if strategy is not None else set()
        # the first step any token may stop at: the rule's promise (`earliest`); full depth: the last
        self.first_exit = self.R - 1 if strategy is None else min(earliest(strategy), self.R - 1)
        self.allowed = allowed_signals(strategy) if strategy is not None else frozenset()
        # allocated for all B rows now (a first call for some rows must not size it); grows if full
        self.cache = KVCache(shared=kv_policy == "last", steps=self.R).allocate(cfg, batch, capacity or 16,
                                                                               model.dtype, dev)
        self.B, self.seed = batch, seed
        # stable ids of the rows' requests: randomized rules draw per (request, token), so
        # the same slot in two batches does not repeat the same draws
        self.row_ids = np.arange(batch) if row_ids is None else np.array(row_ids, dtype=np.int64)
        for name in COUNTERS:
            setattr(self, name, np.zeros(batch, dtype=np.float64 if "flops" in name else np.int64))
        # the token in flight in each row: next step to run (-1: idle), cache column, decided
        # exit (-1: not yet), readout wanted, draw index, keys attended, cost of one step,
        # steps run and LM-head readouts made so far
        self.next_step, self.exit_at = np.full(batch, -1, dtype=np.int64), np.full(batch, -1, dtype=np.int64)
        self.col, self.index, self.ctx_len = (np.zeros(batch, dtype=np.int64) for _ in range(3))
        self.want, self.step_cost = np.zeros(batch, dtype=bool), np.zeros(batch)
        self.ran, self.read = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)
        H, hd = cfg.hidden_size, cfg.head_dim
        self.h = torch.zeros(batch, 1, H, dtype=model.dtype, device=dev)
        self.cos, self.sin = (torch.zeros(batch, 1, hd, dtype=model.dtype, device=dev) for _ in range(2))
        self.tgt = torch.full((batch,), -1, dtype=torch.long, device=dev)
        self.logp = torch.full((batch, cfg.vocab_size), math.nan, device=dev)  # exit log-probs
        self.sig = _RowSignals(self.needs, self.R, batch, dev) if self.needs else None
        self.states: Tensor | None = None  # (R, B, H) per-step states, when `step` keeps them
        # the attention context of the last tick, reused while the same rows run at one step
        # and no token has started (a token's ticks all attend at the same columns)
        self._ctx_key: bytes | None = None
        self._ctx = None
        self._none, self._all = torch.zeros(0, dtype=torch.long), torch.arange(batch)

    def start(self, rows, request_ids) -> None:
        """Empty `rows` for new requests: cache rows, counters, draw ids."""
        rows = _np(rows)
        self._ctx_key = None  # the cache's rows change under any reused context
        self.cache.reset(torch.from_numpy(rows))
        for name in COUNTERS:
            getattr(self, name)[rows] = 0
        self.row_ids[rows] = np.asarray(request_ids, dtype=np.int64)

    def record(self, row: int) -> dict:
        """The compute counters of one row (its request since `start`)."""
        return {name: getattr(self, name)[row].item() for name in COUNTERS}

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor, rows: Tensor | None = None) -> None:
        """All tokens of left-padded `ids` (n, T) at full depth in one parallel pass, into
        cache rows `rows` (default all). Under `last` each step overwrites the one slot, so
        the last step's K/V remain."""
        if ids.shape[1] == 0:
            return
        self._ctx_key = None
        self.model(ids.to(self.model.device), mask, self.R, None, self.cache, rows)
        at = slice(None) if rows is None else _np(rows)
        lengths = mask.sum(1).cpu().numpy()
        flops = np.array([self.cost.sequence_flops(int(n), self.R, readouts=0) for n in lengths])
        self.flops[at] += flops
        self.flops_used[at] += flops
        self.steps_executed[at] += lengths * self.R
        self.tokens[at] += lengths
        self.fed[at] += lengths

    def _start_tokens(self, rows: Tensor, tokens: Tensor, targets: Tensor | None,
                      readout: Tensor | None) -> None:
        """New tokens (m,) in idle `rows` (m,) sorted CPU: embedded, placed in the cache, at step 0."""
        if self.needs & TARGET_SIGNALS and targets is None:
            raise LiveError(f"strategy {type(self.strategy).__module__} reads the target token, "
                            "which decoding does not know; it can only be replayed")
        dev, every = self.dev, len(rows) == self.B
        # the context of these rows at step 0, which the first tick reuses if they run alone; it
        # keeps its rows, so a copy: a caller's later change to `rows` cannot reach it
        x, ctx = self.model.prepare(tokens.to(dev)[:, None], None, None, self.cache,
                                    None if every else rows.clone())
        self._ctx_key, self._ctx = _np(rows).tobytes(), ctx
        sel, at = (slice(None), slice(None)) if every else (rows.numpy(), rows.to(dev))
        if every:  # fresh tensors of the whole batch: taken, not copied
            self.h, self.cos, self.sin = x, ctx.cos, ctx.sin
        else:
            self.h[at], self.cos[at], self.sin[at] = x, ctx.cos, ctx.sin
        self.tgt[at] = -1 if targets is None else targets.to(dev).long()
        self.col[sel], self.next_step[sel], self.exit_at[sel] = ctx.cols.numpy(), 0, -1
        self.want[sel] = True if readout is None else readout.numpy().astype(bool)
        self.index[sel] = self.row_ids[sel] * TOKEN_STRIDE + self.fed[sel]  # as replay draws
        self.ctx_len[sel] = self.cache.next_pos[at].cpu().numpy()  # keys attended, the token's own included
        self.step_cost[sel] = (self.cost.layer_flops + self.cost.gate_flops
                               + self.cost.attn_flops_per_ctx * self.ctx_len[sel])
        self.ran[sel], self.read[sel] = 0, 0
        if self.sig is not None:
            self.sig.start(at)

    @torch.no_grad()
    def tick(self, rows: Tensor | None = None, tokens: Tensor | None = None, targets: Tensor | None = None,
             readout: Tensor | None = None) -> dict | None:
        """Start `tokens` in idle `rows` (CPU, sorted; `targets`, `readout` (m,) optional),
        then run one loop step for every busy row. Returns None if no row was busy, else
        {busy: rows that ran, done: rows whose token finished, exit: their 0-based exit
        steps, steps / flops / flops_used: what each finished token cost} (CPU tensors) and
        idle: True when no token is left in flight.
        A finished row's exit log-probs (readout rows) are in `self.logp`."""
        if rows is not None and len(rows):
            self._start_tokens(rows, tokens, targets, readout)
        busy = np.flatnonzero(self.next_step >= 0)
        if not len(busy):
            return None
        model, dev, R = self.model, self.dev, self.R
        every = len(busy) == self.B  # then slices, not index tensors: the lockstep case stays cheap
        sel = slice(None) if every else busy
        busy_t = torch.from_numpy(busy)
        at = slice(None) if every else busy_t.to(dev)
        steps = self.next_step[sel].copy()
        uniform = bool((steps == steps[0]).all())
        key = busy.tobytes() if uniform else None
        if key is not None and key == self._ctx_key and self.cache is self._ctx.cache:
            ctx = self._ctx
        else:
            ctx = self.cache.context(self.cos[at], self.sin[at], busy_t, torch.from_numpy(self.col[busy]),
                                     None if uniform else torch.from_numpy(steps))
            self._ctx_key, self._ctx = key, ctx
        # rows in lockstep under a rule that reads no signals and promises no stop before step
        # e (`earliest`) run their steps up to e back to back: one tick, no decisions between
        first = last = int(steps[0])
        if uniform and self.sig is None and self.first_exit > first and bool((self.exit_at[busy] < 0).all()):
            last = self.first_exit
        h = self.h[at]
        for r in range(first, last + 1):
            h = model.loop_step(h, r, ctx)
            if self.states is not None:  # each row's state after the step it ran
                self.states[r if uniform else torch.from_numpy(steps).to(dev), busy_t.to(dev)] = h[:, 0]
        if every:
            self.h = h
        else:
            self.h[at] = h
        self.ran[sel] += last - first + 1
        steps += last - first  # the step each row ran last
        steps_t = None
        if self.sig is not None:
            steps_t = torch.from_numpy(steps).to(dev)
        logp = None
        if self.sig is not None:
            tgt = None if not self.needs & TARGET_SIGNALS else self.tgt[at]
            logp = self.sig.add(model, busy_t.to(dev), steps_t, h[:, 0], tgt)
        if logp is not None:
            self.read[sel] += 1
        self._decide_all(busy, steps, h[:, 0], logp, uniform)
        done = self.exit_at[sel] >= 0
        if self.policy == "full":  # every token runs every step; the exit only picks the prediction
            done &= steps == R - 1
        finished = busy[done]
        self.next_step[sel] = steps + 1
        self.next_step[finished] = -1
        out = self._finish(busy_t.clone(), finished)  # a copy: the context keeps busy_t
        out["idle"] = len(finished) == len(busy)  # no token left in flight
        return out

    def _decide_all(self, busy: np.ndarray, steps: np.ndarray, h: Tensor, logp: Tensor | None,
                    uniform: bool) -> None:
        """Exit decisions of the busy rows that have not exited, grouped by their step; the
        rows that exit, at whatever step, are read out in one LM-head call (a call reads the
        head's weights once, whatever its rows)."""
        undecided = self.exit_at[busy] < 0
        if uniform and undecided.all():  # one group: every busy row at one step
            groups = [(int(steps[0]), np.arange(len(busy)))]
        else:
            groups = [(int(r), np.flatnonzero(undecided & (steps == r))) for r in np.unique(steps[undecided])]
        exits = []  # positions among busy of the rows that exit now
        for r, pos in groups:
            stop = self._decide(r, busy[pos])
            self.exit_at[busy[pos[stop]]] = r
            exits.append(pos[stop])
        pos = np.sort(np.concatenate(exits)) if len(exits) > 1 else exits[0] if exits else exits
        if not len(pos):
            return
        new, want, dev = busy[pos], self.want[busy[pos]], self.dev
        if want.all() and len(new) == self.B:  # the whole batch, in order: taken, not copied
            self.logp = logp if logp is not None else self._read_head(new, h)
        elif want.any():
            rd, pd = torch.from_numpy(new[want]).to(dev), torch.from_numpy(pos[want]).to(dev)
            self.logp[rd] = logp[pd] if logp is not None else self._read_head(new[want], h[pd])
        if not want.all():  # no prediction wanted: none given
            self.logp[torch.from_numpy(new[~want]).to(dev)] = math.nan

    def _decide(self, r: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) bool: which of `rows` (all at step r) exit there (the last step always)."""
        if r == self.R - 1 or self.strategy is None:
            return np.full(len(rows), r == self.R - 1)
        dev = self.dev
        ids = torch.from_numpy(self.index[rows]).to(dev)
        data = self.sig.upto(r, torch.from_numpy(rows).to(dev)) if self.sig is not None else {}
        s = Signals(data, self.R, ids, ids, self.seed, torch.from_numpy(self.ctx_len[rows]).to(dev),
                    self.cost, len(rows)).only(self.allowed)
        return decide_checked(self.strategy, s, r).cpu().numpy()  # the contract, as replay enforces it

    def _read_head(self, rows: np.ndarray, h: Tensor) -> Tensor:
        """The exit step's log-probs of `rows` (a readout only where a prediction is wanted)."""
        self.read[rows] += 1
        return F.log_softmax(self.model.lm_head(h).float(), dim=-1)

    def _finish(self, busy: Tensor, rows: np.ndarray) -> dict:
        """Finished tokens: `copy` fills their deeper slots; their compute joins the
        counters: executed (steps run, readouts made) and "used" (what replay charges: steps
        up to the exit and the rule's readouts there; under `full` the executed count also
        has the steps after) FLOPs, steps and token counts."""
        if not len(rows):
            none = self._none
            return {"busy": busy, "done": none, "exit": none, "flops": none.double(),
                    "flops_used": none.double(), "steps": none}
        at = slice(None) if len(rows) == self.B else rows  # all rows: slices, not index arrays
        exit_step = self.exit_at[at]
        lo, hi = int(exit_step.min()), int(exit_step.max())
        if self.policy == "copy" and lo < self.R - 1:
            for e in ([lo] if lo == hi else np.unique(exit_step[exit_step < self.R - 1]).tolist()):
                pick = rows if lo == hi else rows[exit_step == e]
                self.cache.copy_deeper(e, torch.from_numpy(pick), torch.from_numpy(self.col[pick]))
        ran, read, cost = self.ran[at], self.read[at], self.step_cost[at]
        need = (self.strategy.readouts(torch.from_numpy(exit_step)).numpy() if self.strategy is not None
                else read)
        flops = ran * cost + read * self.cost.head_flops
        used = (exit_step + 1) * cost + need * self.cost.head_flops
        self.flops[at] += flops
        self.flops_used[at] += used
        self.steps_executed[at] += ran
        self.readouts[at] += read
        self.tokens[at] += 1
        self.fed[at] += 1
        return {"busy": busy, "done": torch.from_numpy(rows), "exit": torch.from_numpy(exit_step.copy()),
                "flops": torch.from_numpy(flops), "flops_used": torch.from_numpy(used),
                "steps": torch.from_numpy(ran.copy())}

    @torch.no_grad()
    def step(self, tokens: Tensor, alive: Tensor, targets: Tensor | None = None,
             readout: Tensor | None = None, keep_states: bool = False) -> dict:
        """Feed one token per alive row and tick until every one has exited. `targets` (B,)
        the next tokens (for target signals and scoring), `readout` (B,) bool: rows whose
        prediction is wanted (default: alive). Returns {exit (B,) 0-based, logp (B, V)
        float32 of the exit step for readout rows (NaN elsewhere), target_logprob (B,),
        target_is_argmax (B,) if targets; with `keep_states`, states: (R, B, H) each row's
        state after every step it ran}."""
        alive = alive.cpu().bool()
        every = bool(alive.all())
        rows = self._all if every else alive.nonzero()[:, 0]
        pick = (lambda t: None if t is None else t.cpu() if every else t.cpu()[rows])
        self.states = (torch.zeros(self.R, self.B, self.h.shape[-1], dtype=self.h.dtype, device=self.h.device)
                       if keep_states else None)
        exit_step = torch.full((self.B,), self.R - 1, dtype=torch.long)
        out = self.tick(rows, pick(tokens), pick(targets), pick(readout))
        while out is not None:
            if len(out["done"]):
                exit_step[out["done"]] = out["exit"]
            out = None if out["idle"] else self.tick()
        logp = torch.where(alive.to(self.logp.device)[:, None], self.logp, math.nan)
        res = {"exit": exit_step, "logp": logp}
        if targets is not None:
            tgt = targets.to(logp.device).long()
            res["target_logprob"] = logp.gather(1, tgt.clamp(min=0)[:, None])[:, 0].cpu()
            top1 = logp.argmax(-1)  # as head_signals
            res["target_is_argmax"] = (top1 == tgt).cpu()
        if keep_states:
            res["states"], self.states = self.states, None
        return res


@torch.no_grad()
def warm_up(model) -> None:
    """A few untimed live decoding steps before timed live runs (no model forward call: a
    sweep's counted calls stay its plan's)."""
    run = LiveBatch(model, batch=1, capacity=4)
    for _ in range(3):
        run.step(torch.zeros(1, dtype=torch.long, device=model.device), torch.ones(1, dtype=torch.bool))


def _np(rows) -> np.ndarray:
    """Row indices (a CPU tensor, list or array) as an int64 numpy array."""
    return rows.numpy() if isinstance(rows, Tensor) else np.asarray(rows, dtype=np.int64)


@torch.no_grad()
def live_generate(model, tokenizer, prompts: list[list[int]], strategy=None, kv_policy: str = "copy",
                  until: list[str] | None = None, max_new_tokens: int = 32, steps: int | None = None,
                  eos_token_id: int | list[int] | None = None, seed: int = 0, row_ids=None,
                  batch_size: int | None = None, sampling=None) -> tuple[list[str], list[dict]]:
    """Greedy decoding of prompts (token id lists) with live early exit, on `batch_size`
    rows (default: all prompts at once) with continuous batching; `sampling`
    (`ouro_lab.sampling.Sampling`) samples from each token's exit-step distribution instead,
    seeded per request and position.

    Each prompt stops at its first `until` string (the text is cut there), at `eos_token_id`
    or after `max_new_tokens`; a finished row computes nothing until the next prompt takes
    it. Returns the texts and per-prompt records: tokens (predictions made), steps_used
    (sum of 1-based exit steps), steps_executed, flops (prefill included), flops_decode,
    flops_used_decode, prefill_seconds / prefill_tokens (the prompt but its last token),
    decode_seconds and seconds (both)."""
    B = max(1, min(batch_size or len(prompts), len(prompts)))
    run = LiveBatch(model, strategy, kv_policy, steps, B, seed,
                    capacity=max((len(p) for p in prompts), default=1) + max_new_tokens)
    gen = Generation(tokenizer, prompts, B, until, max_new_tokens, eos_token_id, row_ids)
    ready: list[int] = []  # rows holding a token to feed
    while gen.active():
        ready = sorted(ready + gen.admit(run))
        t0 = time.perf_counter()
        rows = torch.tensor(ready, dtype=torch.long)
        out = run.tick(rows, gen.cur[rows])
        if out is None:  # nothing in flight (every prompt admitted has stopped)
            continue
        logp = run.logp[out["done"].to(run.logp.device)]
        if sampling is not None and sampling.do_sample:  # reproducible draws (ouro_lab.sampling)
            keys = [(gen.ids[gen.owner[b]], gen.records[gen.owner[b]]["tokens"])
                    for b in out["done"].tolist()]
            nxt = sampling.pick(logp, keys)
        else:
            nxt = logp.argmax(-1).cpu()
        gen.charge(out["busy"], time.perf_counter() - t0)
        ready = []
        for b, e, t in zip(out["done"].tolist(), out["exit"].tolist(), nxt.tolist(), strict=True):
            if gen.emit(b, [t], e + 1):
                gen.finish(b, run)
            else:
                ready.append(b)
    return gen.texts, gen.records


@torch.no_grad()
def live_score_units(model, units, strategy=None, kv_policy: str = "copy", batch_size: int = 8,
                     max_length: int = 4096, steps: int | None = None, seed: int = 0):
    """Loglikelihood of `units` (ouro_lab.lm.Unit) with every token, prompt included,
    really stopping at its exit step, on `batch_size` rows with continuous batching.
    Returns per-unit (logprob, is_greedy) and records: tokens (scored), steps_used /
    steps_executed (sums over scored tokens), flops (all tokens, prompt included),
    flops_scored, flops_used_scored, tokens_all, seconds (= decode_seconds: every token
    is decoded live, each tick's time shared by the rows it ran)."""
    results: list = [None] * len(units)
    records: list = [None] * len(units)
    order = sorted(range(len(units)), key=lambda i: (-len(units[i].ctx) - len(units[i].cont), i))
    keys = request_keys(units)  # randomized rules draw per (request, position), as replay does
    for c, part in enumerate(chunks(order, batch_size)):
        if not distributed.owns(c):  # data parallel: whole chunks of this plan per rank
            continue
        wholes = [(list(units[i].ctx) + list(units[i].cont))[-(max_length + 1):] for i in part]
        run = LiveBatch(model, strategy, kv_policy, steps, min(batch_size, len(part)), seed,
                        capacity=max(len(w) for w in wholes))
        res, recs = _score_chunk(model, wholes, [len(units[i].cont) for i in part],
                                 [keys[i] for i in part], run)
        for i, r, rec in zip(part, res, recs, strict=True):
            results[i], records[i] = r, rec
    return distributed.merge(results), distributed.merge(records)  # no-op in one process


def _score_chunk(model, wholes: list[list[int]], conts: list[int], ids: list[int], run: LiveBatch):
    """Every token of every sequence in `wholes` fed live, the last `conts` scored; a row
    that finishes a sequence takes the next one."""
    n = len(wholes)
    scored = [min(c, len(w) - 1) for c, w in zip(conts, wholes, strict=True)]
    queue = [k for k in range(n) if len(wholes[k]) > 1][::-1]  # a 1-token sequence feeds nothing
    lp = [[] for _ in range(n)]
    greedy = [[] for _ in range(n)]
    recs = [{"tokens": scored[k], "steps_used": 0, "steps_executed": 0, "flops_scored": 0.0,
             "flops_used_scored": 0.0, "tokens_all": len(wholes[k]) - 1, "seconds": 0.0} for k in range(n)]
    owner, pos = [-1] * run.B, [0] * run.B
    while queue or any(o >= 0 for o in owner):
        free = [b for b in range(run.B) if owner[b] < 0 and pos[b] == 0][:len(queue)]
        if free:
            for b in free:
                owner[b] = queue.pop()
            run.start(torch.tensor(free), [ids[owner[b]] for b in free])
        ready = [b for b in range(run.B) if owner[b] >= 0 and run.next_step[b] < 0]
        feed = [(wholes[owner[b]], pos[b], scored[owner[b]]) for b in ready]  # (sequence, position, scored)
        t0 = time.perf_counter()
        out = run.tick(torch.tensor(ready, dtype=torch.long), torch.tensor([w[i] for w, i, _ in feed]),
                       torch.tensor([w[i + 1] for w, i, _ in feed]),
                       torch.tensor([i >= len(w) - 1 - m for w, i, m in feed], dtype=torch.bool))
        dt = time.perf_counter() - t0
        for b in out["busy"].tolist():
            recs[owner[b]]["seconds"] += dt / len(out["busy"])
        _score_done(run, out, owner, pos, wholes, scored, lp, greedy, recs)
    res = [unit_results(torch.tensor(lp[k]), torch.tensor(greedy[k], dtype=torch.bool), [len(lp[k])])[0]
           for k in range(n)]
    for r in recs:
        r["decode_seconds"] = r["seconds"]
    return res, recs


def _score_done(run: LiveBatch, out: dict, owner, pos, wholes, scored, lp, greedy, recs) -> None:
    """Book the tokens a tick finished: scored ones' log-probs and compute; a row at the end
    of its sequence is freed."""
    done = out["done"]
    if not len(done):
        return
    dev = run.logp.device
    tgt = run.tgt[done.to(dev)]
    logp = run.logp[done.to(dev)]
    tlp = logp.gather(1, tgt.clamp(min=0)[:, None])[:, 0].cpu()
    top1 = (logp.argmax(-1) == tgt).cpu()  # as head_signals
    for j, b in enumerate(done.tolist()):
        k = owner[b]
        if run.want[b]:
            lp[k].append(float(tlp[j]))
            greedy[k].append(bool(top1[j]))
            rec = recs[k]
            rec["steps_used"] += int(out["exit"][j]) + 1
            rec["steps_executed"] += int(out["steps"][j])
            rec["flops_scored"] += float(out["flops"][j])
            rec["flops_used_scored"] += float(out["flops_used"][j])
        pos[b] += 1
        if pos[b] == len(wholes[k]) - 1:
            recs[k]["flops"] = float(run.flops[b])
            owner[b], pos[b] = -1, 0


__all__ = ["CONTINUOUS_BATCHES", "KV_POLICIES", "Generation", "LiveBatch", "LiveError", "chunks",
           "live_generate", "live_score_units", "warm_up"]
