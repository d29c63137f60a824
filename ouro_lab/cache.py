"""The attention context of one model call and the static KV cache that decoding writes in place.

`OuroForCausalLM.prepare` builds a `Context` per call: rope tables, the attention mask
and, with a cache, where the call's tokens sit in it. Every layer's attention then either
attends over the call's own tokens (`attention`) or writes its K/V into the `KVCache` and
attends over the rows' cached keys in place (`KVCache.attend`).

The cache serves every path: `generate`, prefill, live early exit (rows at different loop
steps in one call: each row names its own slot), speculative verification (rows rolled
back by different amounts) and prefix reuse (a prefix prefilled once, its row copied to
a batch, continuations run against it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention, q (B, nh, T, hd) over k, v (B, nkv, S, hd) -> (B, T, nh * hd).
    `mask` (B, 1, T, S) bool, True = may attend; None = causal over this call's own tokens
    (T > 1: SDPA's fused causal kernel skips the masked half) or everything (T = 1)."""
    B, nh, T, hd = q.shape
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                       enable_gqa=k.shape[1] != nh)
    return y.transpose(1, 2).reshape(B, T, nh * hd)


def _one_block(rows: list[int], cols: list[int]) -> bool:
    """Cache rows consecutive and ascending, all at one column: slices can address them."""
    return cols.count(cols[0]) == len(cols) and rows == list(range(rows[0], rows[0] + len(rows)))


# Rows at one slot (adjacent, or evenly spaced) whose first columns differ by at most this
# many attend in one SDPA call, each masked to its own columns: a separate call per column costs more than
# reading a few dozen masked columns (rows rolled back by different amounts after
# speculative verification, or decoded a few tokens apart).
RAGGED_COLUMNS = 64


@dataclass(frozen=True)
class Run:
    """Call rows i, i + e, ... (< j) that attend in one SDPA call: cache rows a, a + d, ...
    (< b), all at the same slot and first columns at most `RAGGED_COLUMNS` apart, over
    columns [0, width), with `mask` (n, 1, T, width) or None (all at one column, no
    padding). Strides above 1 let rows interleaved with rows at another slot (a batch of
    mixed depths) share a call: strided views, nothing copied."""

    i: int
    j: int
    a: int
    slot: int | None  # None: the loop step being run
    width: int
    mask: Tensor | None
    e: int = 1  # call-row stride
    d: int = 1  # cache-row stride

    @property
    def b(self) -> int:
        return self.a + (len(range(self.i, self.j, self.e)) - 1) * self.d + 1


@dataclass(frozen=True)
class Context:
    """What every layer of one call shares: rope tables (n, T, hd) of the call's n rows and
    the attention mask; for a cached call, the cache rows (n,) CPU, sorted, the first column
    each row writes (`cols`, T columns from there), optionally each row's own slot
    (`slots`: rows at different loop steps in one call) and the `runs` of rows that attend
    together. Without a cache, `mask` is (n, 1, T, T) or None (plain causal)."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    cache: KVCache | None = None
    rows: Tensor | None = None
    cols: Tensor | None = None
    slots: Tensor | None = None
    runs: tuple[Run, ...] = ()
    one_block: bool = False  # one run, every row at one column and the step's slot: slices

    def select(self, idx: Tensor) -> Context:
        """The context of a subset of this call's rows: `idx` (m,) sorted CPU positions."""
        mask = None if self.mask is None else self.mask[idx.to(self.mask.device)]
        if self.cache is None:
            return replace(self, cos=self.cos[idx], sin=self.sin[idx], mask=mask)
        return self.cache.context(self.cos[idx], self.sin[idx], self.rows[idx], self.cols[idx],
                                  None if self.slots is None else self.slots[idx], mask)


class KVCache:
    """Keys and values of every (slot, layer), preallocated and written in place.

    `store` (2, slots, layers, B, n_kv, capacity, head_dim) holds K and V of slot s, layer i,
    row b, column c. A slot is a loop step (step r reads and writes slot r) or, with
    `shared=True`, one slot all steps share (Ouro's last-step KV sharing: a token leaves the
    K/V of the last step it ran). Attention reads the filled columns in place: nothing is
    concatenated per token and no row is copied.

    Every row is its own sequence: `lengths[b]` (CPU) columns used, `real` (B, capacity)
    marks the columns holding a real token (not padding), `next_pos[b]` is the position id of
    the row's next token. A call appends T columns to each row it feeds (padding included,
    masked), so left-padded batches and rows of different lengths decode correctly.

    `KVCache()` takes its sizes from the first call and doubles its capacity when full;
    `OuroForCausalLM.new_cache(batch, capacity)` preallocates. For prefix reuse and
    continuous batching: `select(rows)` copies rows (repeated rows expand a shared prefix to a
    batch), `reset(rows)` empties rows for new sequences, `truncate(lengths)` rolls rows back.
    """

    def __init__(self, shared: bool = False, steps: int | None = None):
        self.shared, self.steps = shared, steps
        self.store: Tensor | None = None
        self.real: Tensor | None = None
        self.next_pos: Tensor | None = None
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.padded = torch.zeros(0, dtype=torch.bool)  # (B,) CPU: the row holds a padding column

    # -- allocation
    def allocate(self, cfg, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str) -> KVCache:
        """Zeroed storage for `batch` rows of `capacity` columns, shaped by `cfg` (an
        `OuroConfig`). Zeros: masked columns must hold finite values, since attention
        multiplies them by a zero weight."""
        slots = 1 if self.shared else (self.steps or cfg.total_ut_steps)
        self.store = torch.zeros(2, slots, cfg.num_hidden_layers, batch, cfg.num_key_value_heads,
                                 capacity, cfg.head_dim, dtype=dtype, device=device)
        self.real = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.padded = torch.zeros(batch, dtype=torch.bool)
        return self

    @property
    def batch(self) -> int:
        return 0 if self.store is None else self.store.shape[3]

    @property
    def capacity(self) -> int:
        return 0 if self.store is None else self.store.shape[5]

    def _grow(self, capacity: int, slots: int | None = None) -> None:
        old, old_real = self.store, self.real
        shape = list(old.shape)
        shape[1], shape[5] = slots or shape[1], capacity
        self.store = old.new_zeros(shape)
        self.store[:, :old.shape[1], :, :, :, :old.shape[5]] = old
        self.real = old_real.new_zeros(old_real.shape[0], capacity)
        self.real[:, :old_real.shape[1]] = old_real

    # -- one call: `open` (reserve columns, build the Context), then every (step, layer) `attend`s.
    # These two are the protocol `OuroForCausalLM.prepare` and the layers use: another object
    # with `store` (not None), `next_pos`, `open` and `attend` can stand in for a cache.
    def open(self, real: Tensor, rows: Tensor, padded: Tensor | None, cos: Tensor, sin: Tensor) -> Context:
        """The `Context` of a call feeding `rows` (n,) sorted CPU cache rows: T new columns
        per row reserved (`append`), the mask built only where one is needed."""
        T = real.shape[1]
        new_padding = padded is not None and bool(padded.any())
        cols = self.append(real, rows, padded)
        fresh = not new_padding and not cols.any() and not self.padded[rows].any()
        plain = fresh or (T == 1 and not new_padding)  # causal, or one token over its row's keys
        return self.context(cos, sin, rows, cols, None, None if plain else self.call_mask(rows, cols, T))

    def append(self, real: Tensor, rows: Tensor, padded: Tensor | None) -> Tensor:
        """Reserve T columns in each of `rows` (n,) sorted CPU cache rows for a call whose
        real tokens are `real` (n, T) bool; `padded` (n,) CPU the rows with padding among
        them (None: none). Returns the first column of each row (n,) CPU."""
        n, T = real.shape
        starts = self.lengths[rows]
        st, rs = starts.tolist(), rows.tolist()  # plain ints: cheaper than tensor ops per token
        need = max(st) + T
        if need > self.capacity:
            self._grow(max(need, 2 * self.capacity))
        a = rs[0]
        if _one_block(rs, st):
            c = st[0]
            self.real[a:a + n, c:c + T] = real
        else:
            dev = real.device
            self.real[rows.to(dev)[:, None], (starts[:, None] + torch.arange(T)).to(dev)] = real
        self.lengths[rows] = starts + T
        if padded is not None:
            self.padded[rows] |= padded
        return starts

    def call_mask(self, rows: Tensor, cols: Tensor, T: int) -> Tensor:
        """(n, 1, T, width) bool: a query sees the real keys of its row up to its own column,
        and always itself (a padded query never gets an empty softmax row, whose NaN would
        poison the row's later tokens)."""
        dev = self.real.device
        width = int(cols.max()) + T
        q = (cols[:, None] + torch.arange(T)).to(dev)[:, :, None]  # (n, T, 1) query columns
        k = torch.arange(width, device=dev)
        return (((k <= q) & self.real[rows.to(dev)][:, None, :width]) | (k == q))[:, None]

    def context(self, cos: Tensor, sin: Tensor, rows: Tensor, cols: Tensor, slots: Tensor | None = None,
                mask: Tensor | None = None) -> Context:
        """The `Context` of a call feeding cache `rows` at columns `cols` (both (n,) CPU),
        each row at slot `slots` (n,) (None: the step run), with the call's `mask` or None:
        then T = 1 (padded rows read their `real` mask in place; a run of rows at different
        columns gets each row's own, `_ragged_mask`) or a fresh, unpadded causal call."""
        T = cos.shape[1]
        r, c = rows.tolist(), cols.tolist()
        s = [None] * len(r) if slots is None else slots.tolist()
        by_slot: dict = {}  # a shared cache has one slot, whatever step each row runs
        for p, sl in enumerate(s):
            by_slot.setdefault(None if self.shared else sl, []).append(p)
        runs = []
        for ps in by_slot.values():  # each slot's rows, in order, cut into runs of constant strides
            k = 0
            while k < len(ps):
                first = ps[k]
                members, e, d, lo, hi = [first], 1, 1, c[first], c[first]
                for p in ps[k + 1:]:
                    step, gap = p - members[-1], r[p] - r[members[-1]]
                    strides_differ = len(members) > 1 and (step, gap) != (e, d)
                    if gap <= 0 or strides_differ or max(hi, c[p]) - min(lo, c[p]) > RAGGED_COLUMNS:
                        break
                    e, d = step, gap
                    members.append(p)
                    lo, hi = min(lo, c[p]), max(hi, c[p])
                k += len(members)
                i, j, a, n, width = first, members[-1] + 1, r[first], len(members), hi + T
                b = a + (n - 1) * d + 1
                m = (mask[i:j:e, :, :, :width] if mask is not None else
                     self._ragged_mask(a, b, d, [c[p] for p in members], width) if lo < hi else
                     self.real[a:b:d, None, None, :width] if self.padded[a:b:d].any() else None)
                runs.append(Run(i, j, a, s[first], width, m, e, d))
        runs.sort(key=lambda run: run.i)
        one_block = len(runs) == 1 and slots is None and _one_block(r, c)
        return Context(cos, sin, mask, self, rows, cols, slots, tuple(runs), one_block)

    def _ragged_mask(self, a: int, b: int, d: int, cols: list[int], width: int) -> Tensor:
        """(n, 1, 1, width) for one-token queries of cache rows a, a + d, ... (< b) at `cols`:
        each sees the real keys up to its own column (later ones may hold rolled-back tokens)."""
        dev = self.real.device
        k = torch.arange(width, device=dev)
        q = torch.tensor(cols, device=dev)[:, None]
        return (((k <= q) & self.real[a:b:d, :width]) | (k == q))[:, None, None]

    def attend(self, ctx: Context, slot: tuple[int, int], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write this call's k, v (n, nkv, T, hd) at (step, layer) `slot` (or each row's own
        slot), then attend q over each run's cached keys in place. Returns (n, T, nh * hd)."""
        step, layer = slot
        top = step if ctx.slots is None else int(ctx.slots.max())
        if not self.shared and top >= self.store.shape[1]:  # more steps than slots (extrapolation)
            self._grow(self.capacity, slots=top + 1)
        T, store = k.shape[2], self.store
        s = 0 if self.shared else step
        if ctx.one_block:  # one block of rows and columns: slices
            a, n, c = ctx.runs[0].a, k.shape[0], int(ctx.cols[0])
            store[0, s, layer, a:a + n, :, c:c + T] = k
            store[1, s, layer, a:a + n, :, c:c + T] = v
        else:  # (slot, row, column) triples: index (n, 1) x (n, 1) x (n, T) gives (n, T, nkv, hd)
            dev = k.device
            slots = (torch.full((k.shape[0],), s) if ctx.slots is None or self.shared else ctx.slots)
            sl, rows = slots.to(dev)[:, None], ctx.rows.to(dev)[:, None]
            cols = (ctx.cols[:, None] + torch.arange(T)).to(dev)
            store[0, :, layer][sl, rows, :, cols] = k.transpose(1, 2)
            store[1, :, layer][sl, rows, :, cols] = v.transpose(1, 2)
        out = []
        for run in ctx.runs:
            rs = s if run.slot is None or self.shared else run.slot
            kv = store[:, rs, layer, run.a:run.b:run.d, :, :run.width]
            out.append(attention(q[run.i:run.j:run.e], kv[0], kv[1], run.mask))
        if len(out) == 1:
            return out[0]
        if all(run.e == 1 for run in ctx.runs):  # consecutive call rows, in order
            return torch.cat(out)
        y = out[0].new_empty(q.shape[0], *out[0].shape[1:])
        for run, o in zip(ctx.runs, out, strict=True):  # interleaved runs: each to its call rows
            y[run.i:run.j:run.e] = o
        return y

    # -- rows
    def __len__(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def get(self, step: int, layer: int) -> tuple[Tensor, Tensor] | None:
        """The filled (k, v) of a (step, layer), each (B, nkv, len, hd) views, or None."""
        s = 0 if self.shared else step
        if self.store is None or s >= self.store.shape[1]:
            return None
        return self.store[0, s, layer, :, :, :len(self)], self.store[1, s, layer, :, :, :len(self)]

    @property
    def kv(self) -> dict[tuple[int, int], tuple[Tensor, Tensor]]:
        """{(slot, layer): (k, v)} views of the filled columns (slot = step, or 0 when shared)."""
        if self.store is None:
            return {}
        slots, layers = self.store.shape[1:3]
        return {(s, i): self.get(s, i) for s in range(slots) for i in range(layers)}

    @property
    def mask(self) -> Tensor | None:
        """(B, len) bool: the real tokens of the filled columns."""
        return None if self.real is None else self.real[:, :len(self)]

    def copy_deeper(self, step: int, rows: Tensor, cols: Tensor) -> None:
        """Fill the slots after `step` of `rows` at columns `cols` (both (n,)) with the K/V
        of `step` (live `copy` policy: a token that exited at `step` never ran the deeper ones)."""
        r, c = rows.tolist(), cols.tolist()
        if not r:
            return
        if _one_block(r, c):
            st, a = self.store, r[0]
            st[:, step + 1:, :, a:a + len(r), :, c[0]] = st[:, step:step + 1, :, a:a + len(r), :, c[0]]
            return
        by_col = self.store.permute(3, 5, 0, 1, 2, 4, 6)  # (B, C, 2, slots, layers, nkv, hd) view
        rows, cols = rows.to(self.store.device), cols.to(self.store.device)
        by_col[rows, cols, :, step + 1:] = by_col[rows, cols, :, step:step + 1]

    def select(self, rows: Tensor) -> KVCache:
        """A new cache holding copies of `rows` (repeats allowed: one prefix, many rows)."""
        out = KVCache(self.shared, self.steps)
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.store is not None:
            dev = self.store.device
            out.store = self.store[:, :, :, rows.to(dev)].clone()
            out.real, out.next_pos = self.real[rows.to(dev)], self.next_pos[rows.to(dev)]
            out.lengths, out.padded = self.lengths[rows].clone(), self.padded[rows].clone()
        return out

    def reset(self, rows: Tensor) -> None:
        """Empty `rows`: their next call starts a new sequence at column 0, position 0."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        self.lengths[rows] = 0
        self.padded[rows] = False
        self.next_pos[rows.to(self.next_pos.device)] = 0

    def truncate(self, lengths: Tensor) -> None:
        """Roll every row back to `lengths` (B,) CPU columns (<= its length; rejected
        speculative tokens); positions go back by the real tokens dropped."""
        lengths = torch.minimum(torch.as_tensor(lengths, dtype=torch.long), self.lengths)
        dev = self.real.device
        c = torch.arange(len(self), device=dev)
        dropped = (c >= lengths.to(dev)[:, None]) & (c < self.lengths.to(dev)[:, None]) & self.mask
        self.next_pos -= dropped.sum(1)
        self.lengths = lengths


__all__ = ["RAGGED_COLUMNS", "Context", "KVCache", "Run", "attention"]
