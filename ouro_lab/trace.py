"""Step traces: from one full-depth pass, the per-token, per-step scalars exit rules read.

    out = model(ids, attention_mask=mask)                 # LoopOutput, every step
    sig = step_signals(model, out, targets, score_mask)   # {name: (R, N)} for N scored tokens
    trace = Trace(sig, request, position, ctx, meta)      # small; save() / load()
    exit_step = replay(strategy, trace.to_signals())      # any rule, any parameters, no model

The LM head is applied one step at a time and only at scored positions, in chunks of
tokens, so memory stays at O(chunk x V) and never reaches (R, B, T, V). Everything is
computed in float32 from the model's own logits (so `argmax` is what the model emits).
`unit_sums` / `unit_results` turn per-token values into per-request ones: every scoring
path (plain OuroLM, replay, live) sums through them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ouro_lab.errors import OuroLabError
from ouro_lab.files import atomic_path
from ouro_lab.strategy import SIGNALS, Signals

CHUNK_ELEMENTS = 1 << 25  # tokens x vocab per LM-head chunk (128 MiB of float32 logits)


class TraceError(OuroLabError):
    """A trace file that cannot be read, or traces that cannot be combined."""


class TraceDamagedError(TraceError):
    """A trace file whose bytes are not what was written: unreadable, truncated, or its
    content no longer matches the checksum stored with it. Never use it: recompute it."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}; delete it and rerun to recompute it")


@torch.no_grad()
def step_signals(model, out, targets: Tensor, mask: Tensor,
                 chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, Tensor]:
    """Every signal of `ouro_lab.strategy.SIGNALS`, each (R, N) on the CPU.

    `out` is the `LoopOutput` of `model` on a (B, T) batch, `targets` (B, T) the token
    each position should predict (a negative id = unknown: NaN log-prob, not a match),
    `mask` (B, T) bool the positions to score; N = mask.sum(), in row-major order.
    Step 0's `kl_prev` and `hidden_delta` are +inf. `argmax` is int64,
    `target_is_argmax` bool, the rest float32. `targets` (B, T, K) scores K targets per
    position (one LM-head readout for all): target_logprob and target_is_argmax are then
    (R, N, K).
    """
    from ouro_lab.model import exit_distribution

    dev = out.step_hidden.device
    R = out.steps
    flat = mask.to(dev).bool().reshape(-1).nonzero()[:, 0]  # scored positions, row-major
    gate = out.gate_logits.flatten(1).index_select(1, flat).float()  # (R, N)
    pdf, cdf = exit_distribution(gate)
    hid = out.step_hidden.flatten(1, 2).index_select(1, flat)  # (R, N, H) model dtype
    tgt = targets.to(dev).reshape(-1, *targets.shape[2:]).index_select(0, flat).long()  # (N,) or (N, K)
    N, V = hid.shape[1], model.config.vocab_size

    inf = torch.full((1, N), math.inf, device=dev)
    if hid.dtype == torch.float32:  # all steps at once: no float32 copies to bound
        delta = (hid[1:] - hid[:-1]).norm(dim=-1) / hid[1:].norm(dim=-1)
    else:  # one step at a time: float32 copies of two steps, not of all R
        delta = torch.stack([(hid[r].float() - hid[r - 1].float()).norm(dim=-1) / hid[r].float().norm(dim=-1)
                             for r in range(1, R)]) if R > 1 else inf[:0]
    sig = {"hidden_delta": torch.cat((inf, delta)), "gate_logit": gate, "exit_pdf": pdf, "exit_cdf": cdf}

    # The head runs on the same token chunks as lm._head_scores (same matmul shapes:
    # a plain k-step run and the trace agree bit for bit); the signals of as many steps as
    # fit in `chunk_elements` are then computed together, as (steps, tokens, V) tensors.
    chunk = max(1, chunk_elements // max(V, 1))
    pieces = []
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        group = max(1, min(R, chunk_elements // max((b - a) * V, 1)))
        prev = None
        for r0 in range(0, R, group):
            r1 = min(R, r0 + group)
            logits = torch.stack([model.lm_head(hid[r, a:b]) for r in range(r0, r1)])  # (S, n, V)
            vals, prev = steps_head_signals(logits, prev, tgt[a:b])
            pieces.append((r0, r1, a, b, vals))
    if len(pieces) == 1 and N > 0:  # one chunk, every step: the values are the signals
        sig.update(pieces[0][-1])
    else:
        for k in ("entropy", "max_prob", "margin", "kl_prev", "target_logprob", "argmax", "target_is_argmax"):
            dtype = torch.long if k == "argmax" else torch.bool if k == "target_is_argmax" else torch.float32
            sig[k] = torch.empty(R, N, *(tgt.shape[1:] if k.startswith("target") else ()),
                                 dtype=dtype, device=dev)
        for r0, r1, a, b, vals in pieces:
            for k, v in vals.items():
                sig[k][r0:r1, a:b] = v
    return {k: sig[k].cpu() for k in SIGNALS}


def head_signals(logits: Tensor, prev_logp: Tensor | None = None,
                 target: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """The LM-head signals of one step for n tokens: logits (n, V) -> ({name: (n,)}, logp).

    Pass the returned log-probs as `prev_logp` of the next step (None at step 0: KL is
    +inf). `target` (n,) adds target_logprob / target_is_argmax (negative id = unknown).
    The one definition of these numbers: traces and live decoding should both call it,
    so that a replayed decision and a live one agree bit for bit.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (n, V) float32
    p = logp.exp()
    top = logp.topk(min(2, logp.shape[-1]), dim=-1)
    tp = top.values.exp()
    am = logp.argmax(-1)  # the first of tied maxima, as lm-eval's HFLM decides is_greedy
    out = {"entropy": -(p * logp).sum(-1), "max_prob": tp[:, 0],
           "margin": tp[:, 0] - tp[:, 1] if tp.shape[-1] > 1 else tp[:, 0], "argmax": am,
           "kl_prev": (torch.full_like(tp[:, 0], math.inf) if prev_logp is None
                       else (p * (logp - prev_logp)).sum(-1))}
    if target is not None:
        known = target >= 0
        tlp = logp.gather(1, target.clamp(min=0)[:, None])[:, 0]
        out["target_logprob"] = torch.where(known, tlp, torch.nan)
        out["target_is_argmax"] = known & (am == target)
    return out, logp


def steps_head_signals(logits: Tensor, prev_logp: Tensor | None = None,
                       target: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """`head_signals` of S consecutive steps at once: logits (S, n, V) -> ({name: (S, n)},
    log-probs (n, V) of the last step). `prev_logp` is the step before the first (None: the
    first is step 0, KL +inf). Row by row the same float32 operations as `head_signals`,
    so the numbers are the same bit for bit; only the Python-level op count drops. A
    `target` (n, K) gives K targets per token: target signals (S, n, K)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (S, n, V) float32
    p = logp.exp()
    top = logp.topk(min(2, logp.shape[-1]), dim=-1)
    tp = top.values.exp()
    am = logp.argmax(-1)  # the first of tied maxima, as head_signals
    kl = torch.empty_like(tp[..., 0])
    kl[0] = math.inf if prev_logp is None else (p[0] * (logp[0] - prev_logp)).sum(-1)
    if logp.shape[0] > 1:
        kl[1:] = (p[1:] * (logp[1:] - logp[:-1])).sum(-1)
    out = {"entropy": -(p * logp).sum(-1), "max_prob": tp[..., 0],
           "margin": tp[..., 0] - tp[..., 1] if tp.shape[-1] > 1 else tp[..., 0], "argmax": am,
           "kl_prev": kl}
    if target is not None and target.dim() == 2:  # K targets per token: (S, n, K)
        known = target >= 0
        idx = target.clamp(min=0)[None].expand(logp.shape[0], -1, -1)
        out["target_logprob"] = torch.where(known, logp.gather(2, idx), torch.nan)
        out["target_is_argmax"] = known & (am[..., None] == target)
    elif target is not None:
        known = target >= 0
        idx = target.clamp(min=0)[None, :, None].expand(logp.shape[0], -1, 1)
        out["target_logprob"] = torch.where(known, logp.gather(2, idx)[..., 0], torch.nan)
        out["target_is_argmax"] = known & (am == target)
    return out, logp[-1]


def unit_results(lp: Tensor, greedy: Tensor, lengths: list[int]) -> list[tuple[float, bool]]:
    """Per-unit (sum of log-probs in float64, all greedy) from per-token values laid out
    unit after unit. Every path (plain OuroLM, replay, live) sums through `unit_sums`."""
    import numpy as np

    if not lengths:
        return []
    sums, alls = unit_sums(lp, greedy, np.concatenate(([0], np.cumsum(lengths)[:-1])))
    return list(zip(sums.tolist(), alls.tolist(), strict=True))


def unit_sums(lp: Tensor, greedy: Tensor, starts):
    """Segment sums of per-token log-probs (float64) and segment all() of greedy flags, for
    units starting at `starts` (numpy int array, non-empty units): two numpy arrays."""
    import numpy as np

    return np.add.reduceat(lp.double().numpy(), starts), np.logical_and.reduceat(greedy.numpy(), starts)


def random_signals(steps: int, n: int, seed: int = 0, vocab: int = 16) -> dict[str, Tensor]:
    """Synthetic but self-consistent signals (R, N) for tests and benchmarks: exit pdf and
    cdf from random gate logits, inf at step 0 where the definition says so."""
    from ouro_lab.model import exit_distribution

    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(steps, n, generator=g) * 2
    pdf, cdf = exit_distribution(gate)
    logits = torch.randn(steps, n, vocab, generator=g) * 3
    logp = logits.log_softmax(-1)
    p = logp.exp()
    top = p.topk(2, dim=-1)
    target = torch.randint(vocab, (n,), generator=g)
    kl = torch.cat((torch.full((1, n), math.inf), (p[1:] * (logp[1:] - logp[:-1])).sum(-1)))
    hd = torch.cat((torch.full((1, n), math.inf), torch.rand(steps - 1, n, generator=g)))
    return {"gate_logit": gate, "exit_pdf": pdf, "exit_cdf": cdf, "hidden_delta": hd,
            "argmax": top.indices[..., 0], "entropy": -(p * logp).sum(-1),
            "max_prob": top.values[..., 0], "margin": top.values[..., 0] - top.values[..., 1],
            "kl_prev": kl, "target_logprob": logp.gather(-1, target.expand(steps, n)[..., None])[..., 0],
            "target_is_argmax": top.indices[..., 0] == target}


def checksum(tensors: dict[str, Tensor], meta_json: str) -> str:
    """Content hash of a trace file: every tensor's name, dtype, shape and bytes, and the
    meta JSON. Stored in the file's header; `Trace.load` recomputes and compares it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(meta_json.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"\0{k}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "blake2b-128:" + h.hexdigest()


def _hash(obj) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(obj, sort_keys=True, default=_jsonable).encode())
    return h.hexdigest()


def _jsonable(x):
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, (Path, torch.dtype)):
        return str(x)
    raise TypeError(f"cannot hash {type(x).__name__}")


@dataclass
class Trace:
    """Per-token step signals plus where each token came from.

    signals: {name: (R, N)}; request (N,) index of the request a token belongs to;
    position (N,) its position in that request's token sequence; ctx (N,) keys it
    attends to (itself included, for FLOPs); meta: JSON-able provenance (model
    fingerprint, steps, dtype, tokenizer, request hashes, `cost` = ModelCost fields, key).
    """

    signals: dict[str, Tensor]
    request: Tensor
    position: Tensor
    ctx: Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.request.shape[0]
        for name, v in self.signals.items():
            if v.dim() != 2 or v.shape[1] != n:
                raise TraceError(f"signal {name}: shape {tuple(v.shape)}, expected (R, {n})")
        if self.position.shape[0] != n or self.ctx.shape[0] != n:
            raise TraceError(f"request, position and ctx must all have {n} entries")

    @property
    def steps(self) -> int:
        return next(iter(self.signals.values())).shape[0]

    @property
    def n(self) -> int:
        return self.request.shape[0]

    @staticmethod
    def key(**parts) -> str:
        """Content hash of everything that produced a trace (model fingerprint, steps,
        dtype, request texts, token ids, ...): same parts, same key; any change, new key."""
        return _hash(parts)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (meta as JSON and a content checksum in its header),
        atomically and durably."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"signal.{k}": v.contiguous().cpu() for k, v in self.signals.items()}
        tensors.update(request=self.request.long().contiguous().cpu(),
                       position=self.position.long().contiguous().cpu(),
                       ctx=self.ctx.long().contiguous().cpu())
        meta = json.dumps(self.meta, default=_jsonable)
        with atomic_path(path, "a trace") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "ouro-lab-trace", "meta": meta,
                                                   "checksum": checksum(tensors, meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by `save`. A file that cannot be read, or whose content no
        longer matches its checksum, raises `TraceDamagedError`; it is never returned."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise TraceDamagedError(path, f"not a readable trace ({str(e).splitlines()[0]}): "
                                          "truncated or damaged") from None
        if header.get("format") != "ouro-lab-trace" or "request" not in tensors:
            raise TraceError(f"{path}: a safetensors file but not an ouro-lab trace")
        stored = header.get("checksum")
        if stored is None:
            raise TraceDamagedError(path, "a trace without a content checksum (written by an older "
                                          "ouro-lab), so it cannot be checked")
        if checksum(tensors, header.get("meta", "{}")) != stored:
            raise TraceDamagedError(path, "damaged trace: its content does not match the checksum "
                                          "stored with it")
        try:
            meta = json.loads(header.get("meta", "{}"))
            signals = {k.removeprefix("signal."): v for k, v in tensors.items() if k.startswith("signal.")}
            return cls(signals, tensors["request"], tensors["position"], tensors["ctx"], meta)
        except (ValueError, KeyError, TraceError) as e:
            raise TraceDamagedError(path, f"damaged trace: {str(e).splitlines()[0]}") from None

    @classmethod
    def cat(cls, traces: list[Trace]) -> Trace:
        """Tokens of several traces in one (request indices kept as they are: number
        requests globally when tracing batch by batch). Meta values that agree are kept;
        ones that differ become lists. Steps and signal names must match."""
        if not traces:
            raise TraceError("Trace.cat: no traces to concatenate")
        names, steps = set(traces[0].signals), traces[0].steps
        for t in traces[1:]:
            if set(t.signals) != names or t.steps != steps:
                raise TraceError("Trace.cat: traces record different signals or steps; "
                                 "trace them with the same model settings")
        meta = {}
        for k in dict.fromkeys(k for t in traces for k in t.meta):
            vals = [t.meta.get(k) for t in traces]
            meta[k] = vals[0] if all(v == vals[0] for v in vals) else vals
        return cls({k: torch.cat([t.signals[k] for t in traces], 1) for k in traces[0].signals},
                   torch.cat([t.request for t in traces]), torch.cat([t.position for t in traces]),
                   torch.cat([t.ctx for t in traces]), meta)

    def subset(self, rows: Tensor) -> Trace:
        return Trace({k: v[:, rows] for k, v in self.signals.items()}, self.request[rows],
                     self.position[rows], self.ctx[rows], dict(self.meta))

    def cost(self):
        """The model's `ModelCost` if the trace recorded it (meta['cost']), else None."""
        from ouro_lab.flops import ModelCost

        c = self.meta.get("cost")
        return ModelCost(**c) if isinstance(c, dict) else None

    def to_signals(self, seed: int = 0, group: Tensor | None = None, cost=None) -> Signals:
        """Signals for `replay`: token index 0..N-1, grouped by request (one exit per
        request with granularity="sequence") unless `group` says otherwise. A token's draw
        key is its request's key and its position (`ouro_lab.strategy.TOKEN_STRIDE`), as live
        decoding draws; a trace without a unit table draws by token index."""
        from ouro_lab.strategy import TOKEN_STRIDE, request_keys

        units, draw = self.meta.get("units"), getattr(self, "_draw", None)
        table = units and all(isinstance(u, (list, tuple)) and len(u) == 4 and isinstance(u[0], str)
                              for u in units)
        if draw is None and table:  # a unit table (not Trace.cat's list of them, which draws by index)
            keys = torch.tensor(request_keys(units), dtype=torch.long)
            draw = self._draw = keys[self.request.long()] * TOKEN_STRIDE + self.position.long()  # once
        return Signals(dict(self.signals), self.steps, torch.arange(self.n),
                       self.request if group is None else group, seed, self.ctx,
                       cost if cost is not None else self.cost(), self.n, draw=draw)


# --------------------------------------------------------------------------- one text


def encode(tokenizer, text: str | None, ids: str | list[int] | None) -> list[int]:
    """Token ids from text (with the tokenizer) or from `ids` ("1 2 3" or a list)."""
    if ids is not None:
        if isinstance(ids, str):
            try:
                return [int(t) for t in ids.replace(",", " ").split()]
            except ValueError:
                raise OuroLabError(f"--ids {ids!r}: expected space-separated integers like '1 2 3'") from None
        return [int(t) for t in ids]
    if tokenizer is None:
        raise OuroLabError("this checkpoint has no tokenizer: pass token ids with --ids '1 2 3' "
                           "instead of --text")
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@torch.no_grad()
def trace_text(model, tokenizer, text: str | None = None, steps: int | None = None,
               ids: str | list[int] | None = None, meta: dict | None = None) -> Trace:
    """Trace every token of one text: position t's target is token t+1 (the last
    position has none: NaN log-prob). Text needs a tokenizer; `ids` does not.
    `meta["next_top"]` holds, per step, the top candidates [id, p] for the token after
    the text."""
    from dataclasses import asdict

    from ouro_lab.flops import ModelCost

    tok_ids = encode(tokenizer, text, ids)
    V = model.config.vocab_size
    if not tok_ids:
        raise OuroLabError("nothing to trace: the text has no tokens")
    bad = [t for t in tok_ids if not 0 <= t < V]
    if bad:
        raise OuroLabError(f"token id {bad[0]} out of range: the vocabulary has {V} ids (0..{V - 1})")
    x = torch.tensor([tok_ids], device=model.device)
    out = model(x, steps=steps)
    targets = torch.cat((x[:, 1:], torch.full_like(x[:, :1], -1)), 1)
    sig = step_signals(model, out, targets, torch.ones_like(x, dtype=torch.bool))
    # what comes after the text, per step: the top candidates for the next token
    k = min(NEXT_TOP, V)
    top = [torch.topk(out.logits(r)[0, -1].float().softmax(-1), k) for r in range(out.steps)]
    next_top = [[[int(i), round(float(p), 6)] for p, i in zip(t.values, t.indices, strict=True)] for t in top]
    T = len(tok_ids)
    meta = dict(meta or {})
    meta.update(steps=out.steps, dtype=str(model.dtype).removeprefix("torch."),
                tokenizer=getattr(tokenizer, "name_or_path", None), text=text, ids=tok_ids,
                cost=asdict(ModelCost.from_config(model.config)), next_top=next_top)
    meta["key"] = Trace.key(**{k: meta.get(k) for k in ("model", "steps", "dtype", "tokenizer", "ids")})
    return Trace(sig, torch.zeros(T, dtype=torch.long), torch.arange(T), torch.arange(1, T + 1), meta)


NEXT_TOP = 5  # next-token candidates per step that trace_text keeps


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def render_table(trace: Trace, labels: list[str], predict: list[str]):
    """A rich table: one row per token with exit pdf, top-1 prediction and KL per step."""
    from rich.table import Table

    R = trace.steps
    s = trace.signals
    t = Table(title=f"{trace.n} tokens x {R} steps  (pred: top-1 next token, * = matches the next "
                    "token; KL to the step before)")
    t.add_column("pos", justify="right")
    t.add_column("token")
    t.add_column("exit pdf by step")
    for r in range(R):
        t.add_column(f"step {r + 1} pred")
    t.add_column("KL by step (2..R)")
    for i in range(trace.n):
        pdf = " ".join(f"{s['exit_pdf'][r, i]:.2f}" for r in range(R))
        preds = [predict[r * trace.n + i] + ("*" if s["target_is_argmax"][r, i] else "") for r in range(R)]
        kl = " ".join(f"{s['kl_prev'][r, i]:.3f}" for r in range(1, R))
        t.add_row(str(int(trace.position[i])), repr(labels[i])[1:-1], pdf, *preds, kl)
    return t


__all__ = ["step_signals", "head_signals", "steps_head_signals", "Trace", "TraceError", "TraceDamagedError",
           "checksum", "trace_text", "random_signals", "encode", "render_table", "token_labels"]
