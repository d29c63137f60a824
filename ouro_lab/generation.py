"""Greedy generation of many prompts on the rows of a live batch (continuous batching).

`Generation` holds the prompts, which row holds which, the tokens made, the stop rules
(`until` strings, eos, a token cap) and per-prompt records with measured prefill and decode
seconds. `ouro_lab.live.live_generate` and `ouro_lab.speculative.speculative_generate`
drive it, one token or one verified round at a time.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor


def _left_pad(seqs: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Token lists as left-padded ids and mask (n, longest)."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            ids[j, T - len(s):] = torch.tensor(s)
            mask[j, T - len(s):] = 1
    return ids, mask


class Generation:
    """Greedy generation of many prompts on the rows of a `ouro_lab.live.LiveBatch` `run`
    (continuous batching).

    Rows take prompts in order; a row stops at its first `until` string (the text is cut
    there), at `eos_token_id` (an id, or a list of them) or after `max_new_tokens`
    predictions, and the next prompt takes it. `texts` and `records` (per prompt) fill as
    rows finish; wall time is measured apart for prefill (each call shared by its prompt
    tokens) and decode (each tick shared by the rows it ran)."""

    def __init__(self, tokenizer, prompts: list[list[int]], rows: int, until, max_new_tokens: int,
                 eos_token_id: int | list[int] | None, request_ids=None):
        self.tok, self.prompts, self.B = tokenizer, prompts, rows
        self.ids = list(range(len(prompts))) if request_ids is None else list(request_ids)
        self.until = [u for u in (until or []) if u]
        self.max_new = max_new_tokens
        # the ids that end a sequence (one, or several, as a generation config may list)
        self.eos = set() if eos_token_id is None else (
            {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id})
        self.queue = list(range(len(prompts)))[::-1]  # next prompt last
        self.owner = [-1] * rows  # prompt held by each row (-1: free)
        self.gen: list[list[int]] = [[] for _ in prompts]
        self.texts = [""] * len(prompts)
        self.records: list[dict] = [{"tokens": 0, "steps_used": 0, "prefill_seconds": 0.0,
                                     "decode_seconds": 0.0, "prefill_tokens": 0, "exits": {}}
                                    for _ in prompts]  # exits: {step used (1-based): tokens}
        self.cur = torch.zeros(rows, dtype=torch.long)  # the token each row feeds next

    def admit(self, run) -> list[int]:
        """Free rows take the next prompts: all but their last token prefilled at full depth
        in one left-padded pass. Returns the rows."""
        free = [b for b in range(self.B) if self.owner[b] < 0][:len(self.queue)]
        if not free:
            return []
        take = [(b, self.queue.pop()) for b in free]
        for b, i in take:
            self.owner[b] = i
            self.cur[b] = self.prompts[i][-1]
        run.start(torch.tensor(free), [self.ids[i] for _, i in take])
        t0 = time.perf_counter()
        ids, mask = _left_pad([self.prompts[i][:-1] for _, i in take])  # prompts come longest first
        run.prefill(ids, mask, None if len(take) == self.B else torch.tensor(free))
        n, dt = max(int(mask.sum()), 1), time.perf_counter() - t0
        for b, i in take:  # the call's time shared by prompt tokens
            self.records[i]["prefill_seconds"] += dt * (len(self.prompts[i]) - 1) / n
            self.records[i]["prefill_tokens"] += len(self.prompts[i]) - 1
            self.records[i]["_prefill"] = run.record(b)
        return free

    def charge(self, rows: Tensor, seconds: float) -> None:
        """A tick's decode time, shared by the rows it ran."""
        for b in rows.tolist():
            self.records[self.owner[b]]["decode_seconds"] += seconds / len(rows)

    def emit(self, b: int, tokens: list[int], steps_per_token: int = 0) -> bool:
        """Row b's new tokens (greedy predictions in order), each kept one charged
        `steps_per_token` steps used; those after a stop are dropped. Returns True when it stopped."""
        i = self.owner[b]
        rec = self.records[i]
        for t in tokens:
            if rec["tokens"] >= self.max_new:  # max_new_tokens 0: nothing is kept
                return True
            rec["tokens"] += 1
            rec["steps_used"] += steps_per_token
            rec["exits"][steps_per_token] = rec["exits"].get(steps_per_token, 0) + 1
            if t in self.eos:
                return True
            self.gen[i].append(t)
            text = self.tok.decode(self.gen[i], skip_special_tokens=True)
            cut = min((text.find(u) for u in self.until if u in text), default=-1)
            self.texts[i] = text[:cut] if cut >= 0 else text
            if cut >= 0 or rec["tokens"] >= self.max_new:
                return True
        self.cur[b] = tokens[-1] if tokens else self.cur[b]
        return False

    def finish(self, b: int, run) -> None:
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


__all__ = ["Generation"]
