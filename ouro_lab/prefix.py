"""Each distinct prefix computed once: the prefix tree of a set of scoring units, and the plan
that runs it through the model.

Requests share prefixes: every choice of a multiple-choice document shares its context,
and the documents of a few-shot task share the few-shot examples. A causal model's state at
position t depends on tokens 0..t only, so each node of the units' prefix tree (a distinct
prefix: one token at one position) needs computing once:

    tree = PrefixTree.build(units, max_length)   # nodes in preorder, scored (unit, position) pairs
    plan = tree.plan(batch_size)                 # programs of model calls
    for out in run_plan(model, tree, plan, steps): ...   # per call: hidden states of its scored nodes

* The units' input sequences (context + continuation without its last token, left-truncated
  to `max_length` + 1 tokens as lm-eval does) are sorted, which numbers the tree's nodes in
  preorder: the subtree of node n is the id range [n, n + size[n]).
* A subtree of at most `row` tokens (`row`: the longest input sequence, at least `ROW_MIN`)
  is *light*: light subtrees are packed into rows of at most `row` tokens, up to
  `batch_size` rows a call (for long inputs, the per-request plan's largest batch), each
  token attending to its ancestors only: a tree mask inside the row, and the cached path's
  columns above its subtree's root. Short requests (a few tokens each) share rows: a call
  never holds fewer tokens than `batch_size` x `ROW_MIN` allows.
* Nodes with bigger subtrees (*heavy*: a few-shot prefix shared by many documents) form a
  tree walked depth first: each run of heavy nodes is appended to a one-row KV cache that the
  light subtrees hanging below it attend to, read-only (expanded per layer, never copied into
  the cache); the cache is truncated when the walk goes back up.

A scored token is a (unit, position) pair with its node and target. Pairs that share a node
(the one-token choices of one context) share its hidden states and LM-head readouts; only
the target log-prob and greedy flag are per pair. Work: every node once, plus the padding of
the rows (`PrefixTree.padding`), against lm-eval's per-request plan, which runs every
request's whole sequence (one per context for one-token continuations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

ROW_MIN = 256  # tokens a packed row may hold even when every input is shorter
PAD_TOLERANCE = 0.03  # padding share above which light subtrees are split into fragments


def _lcp(a: tuple, b: tuple) -> int:
    """Length of the longest common prefix of two token tuples (binary search on slice equality:
    the comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class PrefixTree:
    """The prefix tree of units' input sequences, nodes in preorder.

    token, depth (= position), parent (-1: a first token), size (subtree, itself included):
    (n_nodes,) arrays. Scored pairs in unit order, positions ascending within a unit:
    pair_unit, pair_pos, pair_node, pair_target (the token the node should predict)."""

    token: np.ndarray
    depth: np.ndarray
    parent: np.ndarray
    size: np.ndarray
    pair_unit: np.ndarray
    pair_pos: np.ndarray
    pair_node: np.ndarray
    pair_target: np.ndarray
    n_units: int
    requested: int  # input tokens of the units, one sequence each (the per-request plan's work)
    row: int = 0    # tokens per row: the longest input sequence, at least ROW_MIN
    padding: int = field(default=0)  # padding positions the plan computes (set by plan())

    @property
    def n_nodes(self) -> int:
        return len(self.token)

    def flops(self, cost, steps: int, readouts: int) -> float:
        """Matmul FLOPs of running every node `steps` steps (`cost`: `ouro_lab.flops.ModelCost`),
        each attending to its ancestors and itself, plus `readouts` LM-head readouts per scored
        node (padding excluded)."""
        ctx_sum = float((self.depth + 1).sum())
        per_node = cost.layer_flops + cost.gate_flops
        scored = len(np.unique(self.pair_node))
        layers = steps * (self.n_nodes * per_node + cost.attn_flops_per_ctx * ctx_sum)
        return layers + scored * readouts * cost.head_flops

    @classmethod
    def build(cls, units, max_length: int) -> PrefixTree:
        """`units`: objects with `ctx` and `cont` token tuples (non-empty `cont`)."""
        inputs, scored = [], []
        for u in units:
            whole = (tuple(u.ctx) + tuple(u.cont))[-(max_length + 1):]  # left truncation, as lm-eval
            inputs.append(whole[:-1])
            n = min(len(u.cont), len(whole) - 1)
            scored.append((whole[len(whole) - n:], n))
        distinct = sorted(set(inputs))  # lexicographic = preorder of the tree (a prefix first)
        seq_of = {s: i for i, s in enumerate(distinct)}
        need = np.zeros(len(distinct), dtype=np.int64)  # scored positions at each sequence's end
        for s, (_, n) in zip(inputs, scored, strict=True):
            need[seq_of[s]] = max(need[seq_of[s]], n)
        token, depth, parent, size = [], [], [], []
        path: list[int] = []  # node ids of the previous sequence, by depth
        tails: list[list[int]] = []  # per distinct sequence: node ids of its last need[i] positions
        prev: tuple = ()
        for i, s in enumerate(distinct):
            keep = _lcp(prev, s)
            for d in range(keep, len(path)):  # nodes leaving the path: their subtrees are complete
                size[path[d]] = len(token) - path[d]
            del path[keep:]
            for d in range(keep, len(s)):
                path.append(len(token))
                token.append(s[d])
                depth.append(d)
                parent.append(path[d - 1] if d else -1)
                size.append(0)
            tails.append(path[len(s) - int(need[i]):])
            prev = s
        for n in path:
            size[n] = len(token) - n
        pu, pp, pn, pt = [], [], [], []
        for u, (s, (targets, n)) in enumerate(zip(inputs, scored, strict=True)):
            tail = tails[seq_of[s]]
            nodes = tail[len(tail) - n:]
            pu += [u] * n
            pp += range(len(s) - n, len(s))
            pn += nodes
            pt += targets
        arr = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return cls(arr(token), arr(depth), arr(parent), arr(size), arr(pu), arr(pp), arr(pn), arr(pt),
                   len(units), sum(len(s) for s in inputs), max(ROW_MIN, *(len(s) for s in inputs)))

    # ----------------------------------------------------------------------- the plan

    def plan(self, batch_size: int, row: int | None = None) -> list[list[tuple]]:
        """Programs (independent lists of model calls, each starting from an empty cache):
        ("extend", nodes) appends a path of heavy nodes to the cache; ("light", rows) runs
        up to `batch_size` rows of packed light subtrees over the cache, each row (nodes in
        preorder, the depth of each node's light root, whether its outputs count: a repeated
        ancestor's count once); ("truncate", depth) drops the cache's columns from `depth` on."""
        row = max(1, row or self.row)
        heavy = self.size > row
        heavy_children: dict[int, list[int]] = {}
        light_children: dict[int, list[int]] = {}
        for n in np.flatnonzero(heavy | (self.parent < 0) | heavy[np.maximum(self.parent, 0)]).tolist():
            p = int(self.parent[n])
            if p >= 0 and not heavy[p]:
                continue  # inside a light subtree
            (heavy_children if heavy[n] else light_children).setdefault(p, []).append(n)
        self.padding = 0
        programs: list[list[tuple]] = []
        roots = light_children.get(-1, [])
        if roots:  # light subtrees of the (empty) root: no cache, one program per call
            programs += [[op] for op in self._pack(roots, batch_size, row)]
        for h in heavy_children.get(-1, []):
            ops: list[tuple] = []
            pending: list[int] = []
            stack = [(h, None)]  # (heavy node to walk from, depth to truncate to first)
            while stack:
                n, back = stack.pop()
                if back is not None:
                    ops += self._pack(pending, batch_size, row)
                    pending = []
                    ops.append(("truncate", back))
                run = [n]
                while True:  # a run: heavy nodes down to a branch of heavy children (or none)
                    pending += light_children.get(run[-1], [])
                    kids = heavy_children.get(run[-1], [])
                    if len(kids) != 1:
                        break
                    run.append(kids[0])
                ops += [("extend", run[a:a + row]) for a in range(0, len(run), row)]
                if sum(int(self.size[r]) for r in pending) >= batch_size * row:
                    ops += self._pack(pending, batch_size, row)
                    pending = []
                end = int(self.depth[run[-1]]) + 1
                kids = heavy_children.get(run[-1], [])
                # children in order: the first walks on from this run, later ones after a truncate
                stack += [(k, end if i else None) for i, k in reversed(list(enumerate(kids)))]
            ops += self._pack(pending, batch_size, row)
            programs.append(ops)
        return programs

    def _pack(self, roots: list[int], batch_size: int, row: int) -> list[tuple]:
        """Light subtrees packed into rows of <= `row` tokens, calls of <= `batch_size` rows of
        similar length (a call pads its rows to the longest). Whole subtrees first; when their
        sizes leave more than PAD_TOLERANCE of padding (subtrees of half a row cannot pair up),
        they are split into fragments of <= row / 2, 4 or 8 tokens below their roots instead,
        each fragment repeating its path from the subtree's root (a few tokens), if that runs
        fewer tokens in all. `self.padding` counts the padding and the repeated tokens."""
        if not roots:
            return []
        total = sum(int(self.size[r]) for r in roots)
        whole = [(np.arange(r, r + self.size[r]), np.full(int(self.size[r]), self.depth[r]),
                  np.ones(int(self.size[r]), dtype=bool)) for r in roots]
        ops, extra = self._bins(whole, batch_size, row)
        for f in (row // 2, row // 4, row // 8):  # fragment sizes to try; the fewest tokens win
            if extra <= PAD_TOLERANCE * total or f < 2:
                break
            claimed: set[int] = set()
            parts = [x for r in roots for x in self._split(r, [], f, int(self.depth[r]), claimed)]
            split_ops, split_extra = self._bins(parts, batch_size, row)
            if split_extra < extra:
                ops, extra = split_ops, split_extra
        self.padding += extra
        return ops

    def _split(self, n: int, path: list[int], f: int, top: int, claimed: set) -> list[tuple]:
        """Fragments (nodes, top, owned) of the subtree of `n` with at most ~f tokens of
        subtrees each, every one led by `path` + n (their ancestors from the light root: owned
        by the first fragment that holds them)."""
        if self.size[n] <= f:
            nodes = np.concatenate([np.asarray(path, dtype=np.int64), np.arange(n, n + self.size[n])])
            return [self._fragment(nodes, top, len(path), claimed)]
        lead = path + [n]
        out, group, load = [], [], 0
        c = n + 1
        while c < n + self.size[n]:  # children in preorder: each the next id after the last subtree
            k = int(self.size[c])
            if k > f:
                out += self._split(c, lead, f, top, claimed)
            else:
                if group and load + k > f:
                    out.append(self._group(lead, group, top, claimed))
                    group, load = [], 0
                group.append(c)
                load += k
            c += k
        if group or not out:
            out.append(self._group(lead, group, top, claimed))
        return out

    def _group(self, lead: list[int], kids: list[int], top: int, claimed: set) -> tuple:
        ranges = [np.arange(c, c + self.size[c]) for c in kids]
        nodes = np.concatenate([np.asarray(lead, dtype=np.int64), *ranges])
        return self._fragment(nodes, top, len(lead), claimed)

    def _fragment(self, nodes: np.ndarray, top: int, lead: int, claimed: set) -> tuple:
        own = np.ones(len(nodes), dtype=bool)
        for i in range(lead):  # a repeated ancestor: computed by every fragment, output by one
            own[i] = int(nodes[i]) not in claimed
            claimed.add(int(nodes[i]))
        return nodes, np.full(len(nodes), top), own

    def _bins(self, parts: list[tuple], batch_size: int, row: int) -> tuple[list[tuple], int]:
        """Fragments into as few rows of <= `row` tokens as fit, filled evenly (biggest first
        into the emptiest row; a node two fragments of a row share is run once), rows into
        calls. Returns the ops and the positions run beyond the tree's nodes."""
        import heapq

        order = sorted(range(len(parts)), key=lambda i: -len(parts[i][0]))
        m = max(1, -(-sum(len(x[0]) for x in parts) // row))
        while True:
            heap = [(0, k) for k in range(m)]
            rows: list[list[int]] = [[] for _ in range(m)]
            for i in order:
                load, k = heapq.heappop(heap)
                rows[k].append(i)
                heapq.heappush(heap, (load + len(parts[i][0]), k))
            merged = [self._merge([parts[i] for i in x]) for x in rows if x]
            used = [len(x[0]) for x in merged]
            if max(used) <= row or m >= len(parts):
                break
            m += 1
        by_len = sorted(range(len(merged)), key=lambda k: -used[k])
        ops, extra = [], sum(used) - sum(int(x[2].sum()) for x in merged)  # repeated ancestors
        for a in range(0, len(by_len), batch_size):
            call = by_len[a:a + batch_size]
            extra += sum(used[call[0]] - used[k] for k in call)
            ops.append(("light", [merged[k] for k in call]))
        return ops, extra

    @staticmethod
    def _merge(frags: list[tuple]) -> tuple:
        """One row's fragments as (nodes sorted, top, owned), each node once."""
        nodes = np.concatenate([f[0] for f in frags])
        top = np.concatenate([f[1] for f in frags])
        own = np.concatenate([f[2] for f in frags])
        uniq, first = np.unique(nodes, return_index=True)
        owned = np.zeros(len(uniq), dtype=bool)
        np.logical_or.at(owned, np.searchsorted(uniq, nodes), own)
        return uniq, top[first], owned


# --------------------------------------------------------------------------- running a plan


class _PackedRows:
    """`ouro_lab.cache.KVCache`'s protocol (`open` gives the call's Context, `attend` runs
    each layer's attention) for a call of packed rows: every row's queries attend to the
    heavy path's cached keys (cache row 0, read in place and broadcast to the rows, never
    copied into the cache) and to their own row's keys under the plan's tree mask. Nothing
    is written: light subtrees are never attended to again."""

    def __init__(self, path, length: int, rows: int, mask: Tensor):
        self.path, self.length, self.rows, self.tree_mask = path, length, rows, mask
        self.store = ()  # "allocated": prepare() allocates nothing
        self.next_pos = None

    def open(self, real: Tensor, rows, padded, cos: Tensor, sin: Tensor):
        from ouro_lab.cache import Context

        return Context(cos, sin, self.tree_mask, self)

    def attend(self, ctx, slot: tuple[int, int], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from ouro_lab.cache import attention

        if self.length:
            step, layer = slot
            s = 0 if self.path.shared else step
            store = self.path.store
            pk = store[0, s, layer, :1, :, :self.length].expand(self.rows, -1, -1, -1)
            pv = store[1, s, layer, :1, :, :self.length].expand(self.rows, -1, -1, -1)
            k, v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
        return attention(q, k, v, ctx.mask)


@dataclass
class CallOutput:
    """One model call's scored nodes: `nodes` (n,) ids and the LoopOutput of the call with
    `mask` (B, T) marking where those nodes sit (row-major order = `nodes` order)."""

    nodes: np.ndarray
    out: object
    mask: Tensor


@torch.no_grad()
def run_plan(model, tree: PrefixTree, programs: list[list[tuple]], steps: int, owns=lambda i: True):
    """Run the programs `owns(i)` accepts; yields a `CallOutput` per call holding scored nodes.
    Every call is a model call (`model(...)`: forward hooks see it)."""
    dev = model.device
    scored = np.zeros(tree.n_nodes, dtype=bool)
    scored[tree.pair_node] = True
    for i, ops in enumerate(programs):
        if not owns(i):
            continue
        path = model.new_cache(1, max(tree.row, 1))  # the heavy path: one row, written in place
        for op, arg in ops:
            P = int(path.lengths[0])
            if op == "truncate":
                path.truncate(torch.tensor([arg]))
                continue
            if op == "extend":  # a path: plain causal attention after the cached columns
                nodes = np.asarray(arg)
                ids = torch.as_tensor(tree.token[nodes])[None].to(dev)
                pos = torch.as_tensor(tree.depth[nodes])[None].to(dev)
                out = model(ids, None, steps, pos, path)
                yield CallOutput(nodes[scored[nodes]], out, torch.as_tensor(scored[nodes])[None])
                continue
            B, T = len(arg), max(len(r[0]) for r in arg)
            nodes = np.full((B, T), -1, dtype=np.int64)
            top = np.zeros((B, T), dtype=np.int64)
            mine = np.zeros((B, T), dtype=bool)  # the copy of a node whose outputs count
            for b, (r, t, o) in enumerate(arg):
                nodes[b, :len(r)], top[b, :len(r)], mine[b, :len(r)] = r, t, o
            real = nodes >= 0
            safe = np.where(real, nodes, 0)
            ids = torch.as_tensor(np.where(real, tree.token[safe], 0)).to(dev)
            pos = torch.as_tensor(np.where(real, tree.depth[safe], 0)).to(dev)
            # j is an ancestor of i (or i itself): pre(j) <= pre(i) < pre(j) + size(j)
            pre = torch.as_tensor(np.where(real, nodes, -1)).to(dev)
            end = torch.as_tensor(np.where(real, safe + tree.size[safe], -1)).to(dev)
            own = (pre[:, None, :] <= pre[:, :, None]) & (pre[:, :, None] < end[:, None, :])
            own |= torch.eye(T, dtype=torch.bool, device=dev)[None]  # padding sees itself (no NaN rows)
            if P:
                # the cached path's column c is an ancestor of i when c < depth of i's light subtree root
                above = torch.arange(P, device=dev)[None, None] < torch.as_tensor(top).to(dev)[:, :, None]
                own = torch.cat((above, own), 2)
            out = model(ids, None, steps, pos, _PackedRows(path, P, B, own[:, None]))
            where = torch.as_tensor(real & scored[safe] & mine)
            yield CallOutput(nodes[where.numpy()], out, where)
