"""Each distinct prefix computed once (ouro_lab.prefix): the tree, the plan, and results equal to
the per-request plan's (one sequence per request, `lm._batches`).

Which equality holds: a token's attention runs over a cached path plus a packed row instead of
its own padded sequence, so the matmuls see other shapes and sum in another order.
* float64 model: every signal (float32, as traces store them) is bit-identical, even on a
  deliberately chaotic random model (init std 0.3, where rounding is amplified most), but
  the exit pdf / cdf, within one float32 ulp (their float32 sigmoid runs over a call's
  tokens, vectorized differently for other token counts: the per-request plan's results
  also move by that much with the batch composition);
* float32 model, standard init (std 0.02): within 1e-5 relative (measured <= 7e-7), every
  discrete signal (argmax, greedy) identical. (On the chaotic model float32 rounding is
  amplified to ~2e-5 relative through 4 steps: the arithmetic, not the plan, see float64.)
The plain k-step run and the trace share the plan and agree bit for bit."""

import random

import pytest
import torch

from ouro_lab.lm import Unit, _batches, _units_forward
from ouro_lab.prefix import PrefixTree
from ouro_lab.trace import step_signals


@pytest.fixture(scope="module")
def model(tiny_config):
    from ouro_lab.model import OuroForCausalLM, init_weights

    return init_weights(OuroForCausalLM(tiny_config), std=0.02, seed=0).eval()


def _check(sig, unit, pos, ref, exact=False):
    for j, key in enumerate(zip(unit.tolist(), pos.tolist(), strict=True)):
        for k, v in sig.items():
            got, want = v[:, j], ref[key][k]
            if exact and k in ("exit_pdf", "exit_cdf"):
                assert (got - want).abs().max() <= 6e-8, (k, got, want)  # one ulp at 1.0
            elif got.dtype.is_floating_point and not exact:
                fin = torch.isfinite(want)
                assert torch.equal(torch.isfinite(got), fin), k
                assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5), (k, got, want)
            else:
                assert torch.equal(got, want), (k, key, got, want)


def _units(seed=0, vocab=64, max_len=128):
    """MMLU-like (two few-shot prefixes sharing a head, one-token choices and a multi-token
    request per doc), HellaSwag-like (multi-token endings), duplicates, and one unit
    longer than max_length (left-truncated)."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    head = toks(12)
    units = []
    for shots in (head + toks(20), head + toks(25)):
        for _ in range(6):
            q = toks(rng.randint(2, 8))
            units += [Unit(tuple(shots + q), (3 + c,)) for c in range(4)]
            units.append(Unit(tuple(shots + q), tuple(toks(rng.randint(1, 4)))))
    for _ in range(4):
        ctx = toks(rng.randint(3, 10))
        units += [Unit(tuple(ctx), tuple(toks(rng.randint(1, 6)))) for _ in range(4)]
    units += [units[0], units[-1]]  # duplicate requests
    units.append(Unit(tuple(toks(max_len + 20)), (5, 6)))
    return units


def _reference(model, units, batch_size, max_length):
    """Per (unit, position): every signal, from the per-request plan."""
    res = {}
    for idx, ids, attn, tgt, smask in _batches(units, batch_size, max_length):
        sig = step_signals(model, model(ids, attn), tgt, smask)
        for j, (r, c) in enumerate(smask.nonzero().tolist()):
            res[(idx[r], c)] = {k: v[:, j] for k, v in sig.items()}
    return res


def test_tree_is_the_set_of_distinct_prefixes():
    units = _units()
    tree = PrefixTree.build(units, 128)
    inputs = [(u.ctx + u.cont)[-129:][:-1] for u in units]
    prefixes = {s[:i + 1] for s in inputs for i in range(len(s))}
    assert tree.n_nodes == len(prefixes) < tree.requested == sum(map(len, inputs))
    assert (tree.size[tree.depth == 0].sum()) == tree.n_nodes  # preorder: subtrees are id ranges
    for n in range(tree.n_nodes):  # a node's children lie inside its range
        kids = (tree.parent == n).nonzero()[0]
        assert all(n < k < n + tree.size[n] for k in kids)
        assert tree.size[n] == 1 + tree.size[kids].sum()
    # every scored pair sits on its unit's path, predicting the next token
    for u, pos, node, target in zip(tree.pair_unit, tree.pair_pos, tree.pair_node, tree.pair_target,
                                    strict=True):
        seq = inputs[u] + ((units[u].ctx + units[u].cont)[-1],)
        path = []
        n = node
        while n >= 0:
            path.append(int(tree.token[n]))
            n = tree.parent[n]
        assert tuple(reversed(path)) == seq[:pos + 1] and target == seq[pos + 1]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_plan_runs_every_node_once(batch_size):
    """Every node's outputs come from exactly one place; a light row holds each of its nodes'
    ancestors (or finds them on the cached path, above the node's light root); heavy runs
    extend the path in order. Rows of 16 and 10 tokens force heavy paths and fragments."""
    tree = PrefixTree.build(_units(), 128)
    for row in (None, 16, 10):
        owned, computed = [], 0
        for ops in tree.plan(batch_size, row=row):
            path = []
            for op, arg in ops:
                if op == "truncate":
                    path = path[:arg]
                elif op == "extend":
                    assert tree.parent[arg[0]] == (path[-1] if path else -1)
                    assert all(tree.parent[b] == a for a, b in zip(arg, arg[1:], strict=False))
                    path += list(arg)
                    owned += list(arg)
                    computed += len(arg)
                else:
                    assert len(arg) <= batch_size
                    T = max(len(r[0]) for r in arg)
                    computed += T * len(arg)
                    for nodes, top, own in arg:
                        assert len(set(nodes.tolist())) == len(nodes)
                        have = set(nodes.tolist())
                        for n, t in zip(nodes.tolist(), top.tolist(), strict=True):
                            p = tree.parent[n]
                            while p >= 0 and tree.depth[p] >= t:  # inside the light subtree: in the row
                                assert p in have
                                p = tree.parent[p]
                            assert p == -1 or (tree.depth[p] < len(path) and path[tree.depth[p]] == p)
                        owned += nodes[own].tolist()
        assert sorted(owned) == list(range(tree.n_nodes))
        assert computed == tree.n_nodes + tree.padding


def test_fragments_bound_the_padding():
    """Subtrees of more than half a row cannot share rows: split into fragments (each repeating
    its few ancestors), the tokens run stay within 1.05x the tree where whole subtrees would
    pad ~40% (the demo task's shape: ten first-token subtrees of 120-180 tokens, rows of 256)."""
    rng = random.Random(0)
    units = []
    for first in range(10):
        for _ in range(rng.randint(18, 26)):
            ctx = (3 + first, *(rng.randrange(3, 13) for _ in range(rng.randint(4, 8))))
            units += [Unit(ctx, (40 + c,)) for c in range(10)]
    tree = PrefixTree.build(units, 128)
    tree.plan(8, row=256)
    assert tree.padding <= 0.05 * tree.n_nodes, (tree.padding, tree.n_nodes)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_results_equal_the_per_request_plan(model, batch_size):
    units = _units()
    stats = {}
    sig, unit, pos, ctx = _units_forward(model, units, 4, batch_size, 128, signals=True, stats=stats)
    ref = _reference(model, units, batch_size, 128)
    assert len(ref) == len(unit) and torch.equal(ctx, pos + 1)
    assert stats["prefix_tree_tokens"] <= stats["tokens_run"] < stats["requested_tokens"] / 2
    assert stats["calls"] < len(units)
    _check(sig, unit, pos, ref)
    plain, *_ = _units_forward(model, units, 4, batch_size, 128, signals=False)
    assert torch.equal(plain["target_logprob"][0], sig["target_logprob"][-1])  # bit for bit
    assert torch.equal(plain["target_is_argmax"][0], sig["target_is_argmax"][-1])


def test_float64_model_bit_identical(tiny_config):
    """In float64 the two plans' states differ by ~1e-16: the float32 signals a trace stores
    come out bit-identical, with shared prefixes, small rows and branching heavy paths."""
    from ouro_lab.model import OuroForCausalLM, init_weights

    m = init_weights(OuroForCausalLM(tiny_config), std=0.3, seed=1).double().eval()
    for seed, row in ((3, None), (5, 10)):
        units = _units(seed=seed)
        sig, unit, pos, _ = _units_forward(m, units, 4, 4, 128, signals=True, row=row)
        _check(sig, unit, pos, _reference(m, units, 4, 128), exact=True)


def test_branching_heavy_paths_and_small_rows(model):
    """Rows smaller than the shared prefixes: heavy runs branch, the cache is truncated and
    extended again, and the results still equal the per-request plan's."""
    units = _units(seed=5)
    tree = PrefixTree.build(units, 128)
    plan = [x for prog in tree.plan(2, row=10) for x in prog]
    ops = [op for op, _ in plan]
    assert ops.count("truncate") >= 1 and ops.count("extend") >= 3
    sig, unit, pos, _ = _units_forward(model, units, 4, 2, 128, signals=True, row=10)
    _check(sig, unit, pos, _reference(model, units, 2, 128))


def test_fragments_equal_the_per_request_plan(model):
    """Subtrees split into fragments (repeated ancestors, outputs taken once) give the same
    results as one sequence per request."""
    rng = random.Random(1)
    units = []
    for first in range(6):
        for _ in range(rng.randint(4, 6)):
            ctx = (3 + first, *(rng.randrange(3, 13) for _ in range(rng.randint(3, 6))))
            units += [Unit(ctx, (40 + c,)) for c in range(3)] + [Unit(ctx, (20, 21))]
    plan = [x for prog in PrefixTree.build(units, 128).plan(4, row=40) for x in prog]
    assert any((~own).any() for op, rows in plan if op == "light" for _, _, own in rows)
    sig, unit, pos, _ = _units_forward(model, units, 4, 4, 128, signals=True, row=40)
    _check(sig, unit, pos, _reference(model, units, 4, 128))
