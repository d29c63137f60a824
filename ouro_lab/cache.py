"""The attention context of one model call and the static KV cache that decoding writes in place.

`OuroForCausalLM.prepare` builds a `Context` per call: rope tables, the attention mask
and, with a cache, where the call's tokens sit in it. Every layer's attention then either
attends over the call's own tokens (`attention`) or writes its K/V into the `KVCache` and
attends over the rows' cached keys (`KVCache.attend`), in place.
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



@dataclass(frozen=True)
class Context:
    """What every layer of one call shares: rope tables (n, T, hd) of the call's n rows, the
    attention mask and, for a cached call, where the call's tokens sit in the cache.

    The call's rows are cache rows `span` = [a, b) (`pick` None), or the rows a + pick of
    that span (`pick` (n,) sorted, not contiguous: their queries are spread over the span,
    attend over it in place, and the other rows' outputs are dropped). `mask` (span rows,
    1, T, width) bool, or None (see `attention`). `cols`: the first column the call writes
    (every row alike) or the (n, T) columns of each row."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    cache: KVCache | None = None
    span: tuple[int, int] = (0, 0)
    pick: Tensor | None = None
    cols: int | Tensor = 0
    width: int = 0

    def select(self, rows: Tensor) -> Context:
        """The context of a subset of this call's rows: `rows` (m,) sorted CPU indices."""
        if self.cache is None:
            return replace(self, cos=self.cos[rows], sin=self.sin[rows],
                           mask=None if self.mask is None else self.mask[rows])
        cols = self.cols if isinstance(self.cols, int) else self.cols[rows]
        pick = rows if self.pick is None else self.pick[rows]
        a, n = int(pick[0]), len(pick)
        if int(pick[-1]) - a + 1 == n:  # contiguous: narrow everything to views
            lo = self.span[0] + a
            return replace(self, cos=self.cos[rows], sin=self.sin[rows], span=(lo, lo + n), pick=None,
                           mask=None if self.mask is None else self.mask[a:a + n], cols=cols)
        return replace(self, cos=self.cos[rows], sin=self.sin[rows], pick=pick, cols=cols)


class KVCache:
    """Keys and values of every (slot, layer), preallocated and written in place.

    `store` (2, slots, layers, B, n_kv, capacity, head_dim) holds K and V of slot s, layer i,
    row b, column c. A slot is a loop step (step r reads and writes slot r) or, with
    `shared=True`, one slot all steps share (Ouro's last-step KV sharing: a token leaves the
    K/V of the last step it ran). Attention reads the filled columns in place: nothing is
    concatenated per token and no row subset is copied.

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

    # -- one call: reserve columns, then every (step, layer) writes and attends
    def append(self, real: Tensor, rows: Tensor | None, padded: Tensor | None) -> tuple:
        """Reserve T columns in each row fed (`rows` (n,) sorted CPU cache rows, None = all);
        `real` (n, T) bool marks real tokens, `padded` (n,) CPU bool the rows with padding
        among them (None: no padding).
        Returns (span, pick, cols, width, mask) for the call's `Context`."""
        n, T = real.shape
        if rows is None:
            rows = torch.arange(self.batch)
        starts = self.lengths[rows]
        need = int(starts.max()) + T
        if need > self.capacity:
            self._grow(max(need, 2 * self.capacity))
        uniform = bool((starts == starts[0]).all())
        a, b = int(rows[0]), int(rows[-1]) + 1
        pick = None if b - a == n else rows - a
        dev = real.device
        if uniform and pick is None:
            cols = int(starts[0])
            self.real[a:b, cols:cols + T] = real
        else:
            cols = starts[:, None] + torch.arange(T)  # (n, T)
            self.real[rows.to(dev)[:, None], cols.to(dev)] = real
        self.lengths[rows] = starts + T
        if padded is not None:
            self.padded[rows] |= padded
        if uniform and pick is None and not self.padded[a:b].any() and (T == 1 or need == T):
            return (a, b), None, cols, need, None  # nothing to mask: all keys (T = 1) or plain causal
        q = (self.lengths[a:b, None] - T + torch.arange(T)).to(dev)[:, :, None]  # (span, T, 1) query columns
        k = torch.arange(need, device=dev)
        # a query sees the real keys up to its own column, and always itself (padded queries
        # never get an empty softmax row, whose NaN would poison the row's later tokens)
        mask = ((k <= q) & self.real[a:b, None, :need]) | (k == q)
        return (a, b), pick, cols, need, mask[:, None]

    def attend(self, ctx: Context, slot: tuple[int, int], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write this call's k, v (n, nkv, T, hd) at slot (step, layer), then attend q over
        the span's cached keys in place. Returns (n, T, nh * hd)."""
        step, layer = slot
        s = 0 if self.shared else step
        if s >= self.store.shape[1]:  # more steps than the cache has slots (extrapolation)
            self._grow(self.capacity, slots=s + 1)
        (a, b), T = ctx.span, k.shape[2]
        store = self.store
        if isinstance(ctx.cols, int) and ctx.pick is None:
            store[0, s, layer, a:b, :, ctx.cols:ctx.cols + T] = k
            store[1, s, layer, a:b, :, ctx.cols:ctx.cols + T] = v
        else:  # (row, column) pairs: index (n, 1) x (n, T) puts those dims first, (n, T, nkv, hd)
            rows = (torch.arange(b - a) if ctx.pick is None else ctx.pick).to(k.device)[:, None] + a
            cols = (ctx.cols if torch.is_tensor(ctx.cols) else ctx.cols + torch.arange(T)[None]).to(k.device)
            store[0, s, layer, rows, :, cols] = k.transpose(1, 2)
            store[1, s, layer, rows, :, cols] = v.transpose(1, 2)
        keys, values = store[0, s, layer, a:b, :, :ctx.width], store[1, s, layer, a:b, :, :ctx.width]
        if ctx.pick is None:
            return attention(q, keys, values, ctx.mask)
        spread = q.new_zeros(b - a, *q.shape[1:])  # the call's queries at their span rows
        spread[ctx.pick.to(q.device)] = q
        return attention(spread, keys, values, ctx.mask)[ctx.pick.to(q.device)]

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

    def copy_deeper(self, step: int, rows: Tensor, cols: int | Tensor) -> None:
        """Fill the slots after `step` of `rows` at columns `cols` (int or (n,)) with the K/V
        of `step` (live `copy` policy: a token that exited at `step` never ran the deeper ones)."""
        by_col = self.store.permute(3, 5, 0, 1, 2, 4, 6)  # (B, C, 2, slots, layers, nkv, hd) view
        dev = self.store.device
        rows = rows.to(dev)
        cols = cols.to(dev) if torch.is_tensor(cols) else torch.full_like(rows, cols)
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


__all__ = ["Context", "KVCache", "attention"]
