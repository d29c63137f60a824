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

FLOPs are counted as executed (`ouro_lab.flops.ModelCost`: loop steps actually run at
the token's attention context, LM-head readouts actually made) and wall time measured.

`live_generate` prefills all prompt tokens but the last at full depth in one parallel
pass, then feeds the last prompt token and every generated token live. `live_score_units`
(lm-eval loglikelihood requests) runs every token live, prompt included, so the gap to
one-pass replay (which assumes earlier tokens' deeper steps exist) can be measured.
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


class LiveError(OuroLabError):
    """A strategy or setting that cannot run live."""


class LiveBatch:
    """The decoding state of B rows: KV slots, positions and the compute counters.

    `step(tokens, alive, ...)` feeds one token per row (rows with `alive` False are
    padding: masked out, nothing computed) and returns each row's exit step and, where
    asked, the exit step's log-probabilities. Counters (B,): `flops`, `steps_executed`,
    `readouts` (LM-head projections), `tokens` (tokens fed)."""

    def __init__(self, model, strategy=None, kv_policy: str = "copy", steps: int | None = None,
                 batch: int = 1, seed: int = 0, row_ids=None):
        if kv_policy not in KV_POLICIES:
            raise LiveError(f"kv_policy {kv_policy!r} unknown; use one of {', '.join(KV_POLICIES)}")
        self.model, self.strategy, self.policy = model, strategy, kv_policy
        self.R = steps or model.config.total_ut_steps
        self.cost = ModelCost.from_config(model.config)
        self.needs = expand_needs(strategy.needs) if strategy is not None else set()
        self.allowed = allowed_signals(strategy) if strategy is not None else frozenset()
        self.head_each_step = bool(self.needs & HEAD_SIGNALS)
        self.cache = KVCache()
        self.B = batch
        self.seed = seed
        # stable ids of the rows' requests: randomized rules draw per (request, token), so
        # the same slot in two batches does not repeat the same draws
        self.row_ids = torch.arange(batch) if row_ids is None else torch.as_tensor(row_ids).long()
        self.pos = torch.zeros(batch, dtype=torch.long, device=model.device)
        self.flops = torch.zeros(batch, dtype=torch.float64)
        self.steps_executed = torch.zeros(batch, dtype=torch.long)
        self.readouts = torch.zeros(batch, dtype=torch.long)
        self.tokens = torch.zeros(batch, dtype=torch.long)
        # FLOPs the exit steps alone would cost (what replay charges): steps up to the exit
        # at the token's context plus the readouts made; equals `flops` unless policy "full"
        self.flops_used = torch.zeros(batch, dtype=torch.float64)
        self.n_fed = 0

    def _slot(self, r: int) -> int:
        return 0 if self.policy == "last" else r

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor) -> None:
        """All tokens of left-padded `ids` (B, T) at full depth in one parallel pass."""
        if ids.shape[1] == 0:
            return
        dev = self.model.device
        mask = mask.to(dev).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.model(ids.to(dev), mask, self.R, pos, self.cache)
        if self.policy == "last":  # keep the last step's K/V as the one shared slot
            L = self.model.config.num_hidden_layers
            self.cache.kv = {(0, i): self.cache.kv[(self.R - 1, i)] for i in range(L)}
        self.pos = mask.sum(1)
        lengths = mask.sum(1).cpu()
        for b, n in enumerate(lengths.tolist()):
            self.flops[b] += self.cost.sequence_flops(n, self.R, readouts=0)
            self.flops_used[b] += self.cost.sequence_flops(n, self.R, readouts=0)
        self.steps_executed += lengths * self.R
        self.tokens += lengths
        self.n_fed += ids.shape[1]

    # over the layout test's function budget: split by issue 14's rewrite
    @torch.no_grad()
    def step(self, tokens: Tensor, alive: Tensor, targets: Tensor | None = None,
             readout: Tensor | None = None) -> dict:
        """Feed one token per row. `targets` (B,) the next token (for target signals and
        scoring), `readout` (B,) bool: rows whose prediction is wanted (default: alive).

        Returns {exit (B,) 0-based, logp (B, V) float32 of the exit step for readout
        rows (NaN elsewhere), target_logprob (B,), target_is_argmax (B,) if targets}."""
        model, R, dev = self.model, self.R, self.model.device
        alive = alive.to(dev).bool()
        readout = alive if readout is None else (readout.to(dev).bool() & alive)
        B = tokens.shape[0]
        x, (cos, sin, mask) = model.prepare(tokens.to(dev)[:, None], alive[:, None].long(),
                                            self.pos[:, None], self.cache)
        self.pos = self.pos + alive.long()
        ctx = self.cache.mask.sum(1)  # keys each token attends to, itself included (B,)
        V = model.config.vocab_size
        cfg = model.config
        slots = 1 if self.policy == "last" else R
        cols = {(s, i): (torch.zeros(B, cfg.num_key_value_heads, 1, cfg.head_dim, dtype=x.dtype, device=dev),
                         torch.zeros(B, cfg.num_key_value_heads, 1, cfg.head_dim, dtype=x.dtype, device=dev))
                for s in range(slots) for i in range(cfg.num_hidden_layers)}
        hist = {k: torch.full((R, B), math.nan, device=dev) for k in self.needs
                if k not in ("argmax", "target_is_argmax")}
        if "argmax" in self.needs:
            hist["argmax"] = torch.zeros(R, B, dtype=torch.long, device=dev)
        if "target_is_argmax" in self.needs:
            hist["target_is_argmax"] = torch.zeros(R, B, dtype=torch.bool, device=dev)
        if self.needs & TARGET_SIGNALS and targets is None:
            raise LiveError(f"strategy {type(self.strategy).__module__} reads the target token, "
                            "which decoding does not know; it can only be replayed")
        tgt = targets.to(dev).long() if targets is not None else None

        computing, decided = alive.clone(), ~alive
        exit_step = torch.full((B,), R - 1, dtype=torch.long, device=dev)
        exit_logp = torch.full((B, V), math.nan, device=dev)
        h = x
        remaining = torch.ones(B, device=dev)
        running = torch.zeros(B, device=dev)
        h_prev32 = None
        logp_prev = None
        index = (self.row_ids * 1_000_003 + self.n_fed).to(dev)
        step_cost = (self.cost.layer_flops + self.cost.gate_flops
                     + self.cost.attn_flops_per_ctx * ctx.double().cpu())
        readouts_before = self.readouts.clone()
        for r in range(R):
            A = computing.nonzero()[:, 0]
            if A.numel() == 0:
                break
            slot = self._slot(r)
            xa = h[A]
            for i, layer in enumerate(model.model.layers):
                past = self.cache.kv.get((slot, i))
                kv = None if past is None else (past[0][A], past[1][A])
                xa, (k, v) = layer(xa, cos[A], sin[A], None if mask is None else mask[A], kv)
                cols[(slot, i)][0][A] = k[:, :, -1:]
                cols[(slot, i)][1][A] = v[:, :, -1:]
            xa = model.model.norm(xa)  # (n, 1, H)
            h = h.clone()
            h[A] = xa
            gate = model.gate(xa)[:, 0].float()  # (n,)
            Acpu = A.cpu()
            self.flops[Acpu] += step_cost[Acpu]
            self.steps_executed[Acpu] += 1

            # signals of step r for rows A, defined exactly as ouro_lab.trace.step_signals
            lam = torch.sigmoid(gate)
            pdf = lam * remaining[A] if r < R - 1 else remaining[A]
            remaining[A] = remaining[A] * (1 - lam)
            running[A] = running[A] + pdf
            cdf = running[A].clamp(max=1.0) if r < R - 1 else torch.ones_like(pdf)
            vals = {"gate_logit": gate, "exit_pdf": pdf, "exit_cdf": cdf}
            h32 = xa[:, 0].float()
            if "hidden_delta" in self.needs:
                vals["hidden_delta"] = (torch.full_like(gate, math.inf) if r == 0 else
                                        (h32 - h_prev32[A]).norm(dim=-1) / h32.norm(dim=-1))
            h_prev_full = torch.zeros(B, h32.shape[-1], device=dev) if h_prev32 is None else h_prev32.clone()
            h_prev_full[A] = h32
            h_prev32 = h_prev_full
            logp = None
            if self.head_each_step:
                # the one definition of the head signals, shared with traces: replay = live
                head, logp = head_signals(model.lm_head(xa[:, 0]), None if r == 0 else logp_prev[A],
                                          None if tgt is None else tgt[A])
                self.readouts[Acpu] += 1
                self.flops[Acpu] += self.cost.head_flops
                vals.update(head)
                lp_full = torch.zeros(B, V, device=dev) if logp_prev is None else logp_prev.clone()
                lp_full[A] = logp
                logp_prev = lp_full
            for k in hist:
                hist[k][r, A] = vals[k]

            if r == R - 1 or self.strategy is None:
                d = torch.full((A.numel(),), r == R - 1, dtype=torch.bool, device=dev)
            else:
                s = Signals({k: v[: r + 1, A] for k, v in hist.items()}, R, index[A], index[A],
                            self.seed, ctx[A], self.cost, A.numel()).only(self.allowed)
                d = decide_checked(self.strategy, s, r).to(dev)  # the contract, as replay enforces it
            new = A[d & ~decided[A]]
            if new.numel():
                exit_step[new] = r
                decided[new] = True
                want = new[readout[new]]
                if want.numel():
                    if logp is not None:
                        exit_logp[want] = logp[(A[:, None] == want[None]).int().argmax(0)]
                    else:  # read the head only now, for the rows that need a prediction
                        rows = (A[:, None] == want[None]).int().argmax(0)
                        exit_logp[want] = F.log_softmax(model.lm_head(xa[rows, 0]).float(), dim=-1)
                        self.readouts[want.cpu()] += 1
                        self.flops[want.cpu()] += self.cost.head_flops
            if self.policy != "full":
                computing &= ~decided
        if self.policy == "copy":  # deeper slots of an exited token hold its exit step's K/V
            for e in range(R - 1):
                rows = (alive & (exit_step == e)).nonzero()[:, 0]
                if rows.numel():
                    for r in range(e + 1, R):
                        for i in range(cfg.num_hidden_layers):
                            cols[(r, i)][0][rows] = cols[(e, i)][0][rows]
                            cols[(r, i)][1][rows] = cols[(e, i)][1][rows]
        for key, (k, v) in cols.items():
            past = self.cache.kv.get(key)
            self.cache.kv[key] = (k, v) if past is None else (torch.cat((past[0], k), 2),
                                                              torch.cat((past[1], v), 2))
        self.tokens += alive.long().cpu()
        self.n_fed += 1
        alive_c = alive.cpu()
        # "used" = what the exits alone need (what replay charges): steps up to the exit and the
        # rule's readouts there; under policy "full" the executed count also has the steps after
        need = (self.strategy.readouts(exit_step.cpu()) if self.strategy is not None
                else self.readouts - readouts_before)
        used = (exit_step.cpu() + 1).double() * step_cost + need.double() * self.cost.head_flops
        self.flops_used += torch.where(alive_c, used, 0.0)
        out = {"exit": exit_step.cpu(), "logp": exit_logp}
        if tgt is not None:
            out["target_logprob"] = exit_logp.gather(1, tgt.clamp(min=0)[:, None])[:, 0].cpu()
            out["target_is_argmax"] = (exit_logp.topk(min(2, V), dim=-1).indices[:, 0] == tgt).cpu()
        return out


def _left_pad(seqs: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            ids[j, T - len(s):] = torch.tensor(s)
            mask[j, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def live_generate(model, tokenizer, prompts: list[list[int]], strategy=None, kv_policy: str = "copy",
                  until: list[str] | None = None, max_new_tokens: int = 32, steps: int | None = None,
                  eos_token_id: int | None = None, seed: int = 0,
                  row_ids=None) -> tuple[list[str], list[dict]]:
    """Greedy decoding of a batch of prompts (token id lists) with live early exit.

    Each row stops at its first `until` string (the text is cut there), at `eos_token_id`
    or after `max_new_tokens`; finished rows compute nothing more. Returns the texts and
    per-row records: tokens (predictions made), steps_used (sum of 1-based exit steps),
    steps_executed, flops (prefill included), seconds (the batch's wall time / rows)."""
    t0 = time.perf_counter()
    B = len(prompts)
    until = [u for u in (until or []) if u]
    run = LiveBatch(model, strategy, kv_policy, steps, B, seed, row_ids)
    ids, mask = _left_pad([p[:-1] for p in prompts])
    run.prefill(ids, mask)
    prefill_flops, prefill_used = run.flops.clone(), run.flops_used.clone()
    prefill_exec = run.steps_executed.clone()
    cur = torch.tensor([p[-1] for p in prompts])
    alive = torch.ones(B, dtype=torch.bool)
    gen: list[list[int]] = [[] for _ in range(B)]
    texts = [""] * B
    used = torch.zeros(B, dtype=torch.long)
    preds = torch.zeros(B, dtype=torch.long)
    for _ in range(max_new_tokens):
        if not alive.any():
            break
        out = run.step(cur, alive)
        nxt = out["logp"].argmax(-1).cpu()
        used += torch.where(alive, out["exit"] + 1, 0)
        preds += alive.long()
        for b in alive.nonzero()[:, 0].tolist():
            t = int(nxt[b])
            if eos_token_id is not None and t == eos_token_id:
                alive[b] = False
                continue
            gen[b].append(t)
            text = tokenizer.decode(gen[b], skip_special_tokens=True)
            cut = min((text.find(u) for u in until if u in text), default=-1)
            if cut >= 0:
                texts[b] = text[:cut]
                alive[b] = False
            else:
                texts[b] = text
        cur = torch.where(alive, nxt, cur)
    seconds = (time.perf_counter() - t0) / max(B, 1)
    recs = [{"tokens": int(preds[b]), "steps_used": int(used[b]),
             "steps_executed": int(run.steps_executed[b] - prefill_exec[b]),
             "flops": float(run.flops[b]), "flops_decode": float(run.flops[b] - prefill_flops[b]),
             "flops_used_decode": float(run.flops_used[b] - prefill_used[b]),
             "seconds": seconds} for b in range(B)]
    return texts, recs


@torch.no_grad()
def live_score_units(model, units, strategy=None, kv_policy: str = "copy", batch_size: int = 8,
                     max_length: int = 4096, steps: int | None = None, seed: int = 0):
    """Loglikelihood of `units` (ouro_lab.lm.Unit) with every token, prompt included,
    really stopping at its exit step. Returns per-unit (logprob, is_greedy) and records:
    tokens (scored), steps_used / steps_executed (sums over scored tokens), flops (all
    tokens, prompt included), flops_scored, tokens_all, seconds."""
    results: list = [None] * len(units)
    records: list = [None] * len(units)
    order = sorted(range(len(units)), key=lambda i: (-len(units[i].ctx) - len(units[i].cont), i))
    for s in range(0, len(order), batch_size):
        if not distributed.owns(s // batch_size):  # data parallel: whole batches of this plan per rank
            continue
        t0 = time.perf_counter()
        idx = order[s:s + batch_size]
        wholes = [(list(units[i].ctx) + list(units[i].cont))[-(max_length + 1):] for i in idx]
        n_scored = [min(len(units[i].cont), len(w) - 1) for i, w in zip(idx, wholes, strict=True)]
        ids, mask = _left_pad([w[:-1] for w in wholes])
        tgts, _ = _left_pad([w[1:] for w in wholes], pad=-1)
        T = ids.shape[1]
        B = len(idx)
        scored = torch.zeros(B, T, dtype=torch.bool)
        for j, n in enumerate(n_scored):
            scored[j, T - n:] = True
        run = LiveBatch(model, strategy, kv_policy, steps, B, seed, idx)
        lp = torch.zeros(B, T)
        greedy = torch.ones(B, T, dtype=torch.bool)
        used = torch.zeros(B, dtype=torch.long)
        execd = torch.zeros(B, dtype=torch.long)
        flops_scored = torch.zeros(B, dtype=torch.float64)
        used_scored = torch.zeros(B, dtype=torch.float64)
        for t in range(T):
            before_f, before_e = run.flops.clone(), run.steps_executed.clone()
            before_u = run.flops_used.clone()
            out = run.step(ids[:, t], mask[:, t].bool(), targets=tgts[:, t], readout=scored[:, t])
            sc = scored[:, t]
            lp[sc, t] = out["target_logprob"][sc]
            greedy[sc, t] = out["target_is_argmax"][sc]
            used += torch.where(sc, out["exit"] + 1, 0)
            execd += torch.where(sc, run.steps_executed - before_e, 0)
            flops_scored += torch.where(sc, run.flops - before_f, 0)
            used_scored += torch.where(sc, run.flops_used - before_u, 0)
        seconds = (time.perf_counter() - t0) / B
        for j, i in enumerate(idx):
            row_lp = lp[j, scored[j]]
            row_g = greedy[j, scored[j]]
            results[i] = unit_results(row_lp, row_g, [row_lp.shape[0]])[0]
            records[i] = {"tokens": n_scored[j], "steps_used": int(used[j]), "steps_executed": int(execd[j]),
                          "flops": float(run.flops[j]), "flops_scored": float(flops_scored[j]),
                          "flops_used_scored": float(used_scored[j]),
                          "tokens_all": int(mask[j].sum()), "seconds": seconds}
    return distributed.merge(results), distributed.merge(records)  # no-op in one process


__all__ = ["KV_POLICIES", "LiveBatch", "LiveError", "live_generate", "live_score_units"]
