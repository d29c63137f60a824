"""Choosing the next token: greedy, or sampled as a task's `generation_kwargs` ask, reproducibly.

    s = Sampling.from_gen_kwargs({"do_sample": True, "temperature": 0.7, "top_p": 0.95}, seed=1234)
    next_ids = s.pick(logp, keys)    # logp (B, V) of each row's exit step; keys: (request, position)

Sampling follows transformers' semantics: `temperature` divides the logits, `top_k` keeps the
k most likely tokens, `top_p` the smallest set whose probability reaches p (always one at
least); it samples when `do_sample` is true, or when it is unset and `temperature` > 0 (a task
that asks for a temperature asks for sampling). Each draw is a function of the seed, the
request and the position alone (a uniform number from a hash of the three): the same text
whatever the batch, the batch size, the number of processes or the exit strategy's other
rows, and a live early-exit run samples from its exit step's distribution.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ouro_lab.errors import OuroLabError


class SamplingError(OuroLabError):
    """Generation arguments that cannot be honoured."""


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @classmethod
    def from_gen_kwargs(cls, gk: dict, seed: int = 0) -> Sampling:
        """From a task's generation kwargs (the sampling keys are consumed, others stay)."""
        do_sample = gk.pop("do_sample", None)
        temperature = gk.pop("temperature", None)
        top_p, top_k = gk.pop("top_p", None), gk.pop("top_k", None)
        t = 0.0 if temperature is None else float(temperature)
        sample = bool(do_sample) if do_sample is not None else t > 0
        if not sample:
            return cls(seed=seed)
        if t <= 0 and temperature is not None:
            raise SamplingError(f"generation_kwargs: do_sample with temperature {temperature}; give a "
                                "temperature > 0 (or do_sample: false for greedy decoding)")
        p = 1.0 if top_p is None else float(top_p)
        k = 0 if top_k is None else int(top_k)
        if not 0 < p <= 1 or k < 0:
            raise SamplingError(f"generation_kwargs: top_p must be in (0, 1] and top_k >= 0, got top_p "
                                f"{top_p}, top_k {top_k}")
        return cls(True, t if temperature is not None else 1.0, p, k, int(seed))

    def uniform(self, key) -> float:
        """A number in [0, 1) that depends on the seed and `key` alone."""
        h = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
        return (int.from_bytes(h, "little") >> 11) / float(1 << 53)

    def pick(self, logp: Tensor, keys: list) -> Tensor:
        """Next token of each row: logp (B, V) log-probs, keys[b] the row's (request, position).
        Greedy: the argmax; sampling: inverse-CDF of the filtered distribution at the row's
        uniform number. Returns (B,) int64 on the CPU."""
        if not self.do_sample:
            return logp.argmax(-1).cpu()
        z = logp.float().cpu() / self.temperature
        if self.top_k and self.top_k < z.shape[-1]:
            kth = z.topk(self.top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        probs = z.softmax(-1)
        if self.top_p < 1.0:
            sp, order = probs.sort(-1, descending=True)
            drop = (sp.cumsum(-1) - sp) >= self.top_p  # tokens after the set reaching top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sp)
        cdf = probs.cumsum(-1)
        u = torch.tensor([self.uniform(k) for k in keys], dtype=cdf.dtype)[:, None] * cdf[:, -1:]
        return (cdf <= u).sum(-1).clamp(max=cdf.shape[-1] - 1)


__all__ = ["Sampling", "SamplingError"]
