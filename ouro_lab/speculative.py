"""Lossless self-speculative decoding: draft at shallow depth, verify at full depth in one pass.

A round, for every row of the batch: draft `draft_len` = D tokens live at shallow depth
(the draft rule: `fixed` step k, or any exit strategy), each fed back as the next input,
then feed the last draft too; the D + 1 fed tokens' K/V stay in the cache (`copy`
policy). One parallel pass then runs steps m..R-1 for those D + 1 tokens, starting from
their draft states after step m - 1 (m = 1 + the shallowest exit of the round), and
reads the head at the last step: the full-depth greedy prediction after each fed token.
The longest prefix of drafts that equals those predictions is accepted, plus the
full-depth prediction after it (a + 1 tokens for a accepted drafts); the rejected
columns are rolled back (`KVCache.truncate`).

Why this is exactly full-depth greedy decoding: step r of a token reads its own step r-1
and slot r of the earlier tokens. Earlier rounds' tokens hold full-depth K/V in every
slot. Within a round, every fed token ran steps 0..m-1 exactly (their slots < m are exact,
because m - 1 is below every draft exit of the round), and the verify pass computes
steps m..R-1 of all of them causally, overwriting the copied slots. So every prediction
of the verify pass is the full-depth one for that prefix; a draft is kept only where it
equals it. Up to float rounding: the verify pass multiplies D + 1 tokens at once, plain
decoding one, so a near-tie could in principle flip (tests check token identity).

Compute: every fed token runs all R steps once (draft steps + verify steps) and the head
is read at each draft exit and each verified position, so FLOPs per generated token are
at least full depth's; what drops is the number of sequential full-depth passes, which
is what wall time pays for when decoding is bound by memory or per-call overhead.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ouro_lab.generation import Generation
from ouro_lab.live import LiveBatch


def _draft(run: LiveBatch, cur: Tensor, alive: Tensor, D: int):
    """D + 1 shallow tokens per alive row: cur, then D drafts fed back. Returns the fed
    tokens (B, D + 1), the drafts (B, D), their states (D + 1, R, B, H) and exits (D + 1, B)."""
    fed, drafts, states, exits = [cur], [], [], []
    tok = cur
    for j in range(D + 1):
        out = run.step(tok, alive, readout=alive if j < D else torch.zeros_like(alive), keep_states=True)
        states.append(out["states"])
        exits.append(out["exit"])
        if j < D:
            tok = torch.where(alive, out["logp"].argmax(-1).cpu(), 0)
            drafts.append(tok)
            fed.append(tok)
    return torch.stack(fed, 1), torch.stack(drafts, 1), torch.stack(states), torch.stack(exits)


def _verify(run: LiveBatch, fed: Tensor, states: Tensor, exits: Tensor, rows: Tensor, base: Tensor) -> Tensor:
    """Steps m..R-1 of the fed tokens of `rows` in one parallel pass from their states after
    step m - 1; returns the full-depth greedy predictions (n, D + 1) (CPU)."""
    model, R, dev = run.model, run.R, run.model.device
    at = rows.numpy()  # the counters' rows (numpy)
    m = 1 + int(exits[:, rows].min())
    h = states[:, m - 1][:, rows.to(dev)].transpose(0, 1)  # (n, D + 1, H)
    if m < R:
        run.cache.truncate(base)  # the same columns again, for the deeper slots
        _, ctx = model.prepare(fed[rows].to(dev), None, None, run.cache, rows)
        for r in range(m, R):
            h = model.loop_step(h, r, ctx)
        n, T = fed[rows].shape
        ctx_len = (run.cache.next_pos[rows.to(dev)].cpu()[:, None] - T + 1 + torch.arange(T)).double()
        run.flops[at] += ((R - m) * (T * (run.cost.layer_flops + run.cost.gate_flops)
                                     + run.cost.attn_flops_per_ctx * ctx_len.sum(1))).numpy()
        run.steps_executed[at] += (R - m) * T
    run.flops[at] += fed.shape[1] * run.cost.head_flops
    run.readouts[at] += fed.shape[1]
    return model.lm_head(h).argmax(-1).cpu()


def speculative_round(run: LiveBatch, cur: Tensor, alive: Tensor, draft_len: int):
    """One round for the alive rows. Returns (tokens (B, D + 1), emitted (B,) how many of
    them each row emits = accepted drafts + 1, drafted (B,)); rejected columns rolled back."""
    base = run.cache.lengths.clone()
    fed, drafts, states, exits = _draft(run, cur, alive, draft_len)
    rows = alive.nonzero()[:, 0]
    full = torch.zeros(run.B, draft_len + 1, dtype=torch.long)
    full[rows] = _verify(run, fed, states, exits, rows, base)
    agree = (drafts == full[:, :draft_len]).long().cumprod(1).sum(1)  # accepted drafts per row
    keep = torch.where(alive, base + agree + 1, run.cache.lengths)
    run.cache.truncate(keep)
    return full, torch.where(alive, agree + 1, 0), torch.where(alive, draft_len, 0)


@torch.no_grad()
def speculative_generate(model, tokenizer, prompts: list[list[int]], draft, draft_len: int = 4,
                         until: list[str] | None = None, max_new_tokens: int = 32, steps: int | None = None,
                         eos_token_id: int | list[int] | None = None, seed: int = 0, row_ids=None,
                         batch_size: int | None = None) -> tuple[list[str], list[dict]]:
    """Greedy decoding that equals full-depth decoding token for token, drafting with the
    exit strategy `draft` (e.g. `fixed` step 1) `draft_len` tokens at a time, on
    `batch_size` rows with continuous batching. Stops as `live_generate` does. Records as
    `live_generate`'s (steps_used = R per token: the output is full depth's), plus
    drafted, accepted (drafts kept) and rounds."""
    B = max(1, min(batch_size or len(prompts), len(prompts)))
    run = LiveBatch(model, draft, "copy", steps, B, seed,
                    capacity=max((len(p) for p in prompts), default=1) + max_new_tokens + draft_len + 1)
    gen = Generation(tokenizer, prompts, B, until, max_new_tokens, eos_token_id, row_ids)
    for rec in gen.records:
        rec.update(drafted=0, accepted=0, rounds=0)
    while gen.active():
        gen.admit(run)
        alive = torch.tensor([o >= 0 for o in gen.owner], dtype=torch.bool)
        t0 = time.perf_counter()
        tokens, emitted, drafted = speculative_round(run, gen.cur, alive, draft_len)
        gen.charge(alive.nonzero()[:, 0], time.perf_counter() - t0)
        for b in alive.nonzero()[:, 0].tolist():
            rec = gen.records[gen.owner[b]]
            n, before = int(emitted[b]), rec["tokens"]
            stopped = gen.emit(b, tokens[b, :n].tolist(), run.R)
            kept = rec["tokens"] - before  # tokens after a stop (eos, until, max) are dropped
            rec.update(drafted=rec["drafted"] + int(drafted[b]), accepted=rec["accepted"] + min(kept, n - 1),
                       rounds=rec["rounds"] + 1)
            if stopped:
                gen.finish(b, run)
    for rec in gen.records:  # every step ran was needed: the output is full depth's
        rec["flops_used_decode"] = rec["flops_decode"]
    return gen.texts, gen.records


__all__ = ["speculative_generate", "speculative_round"]
