"""The static KV cache: written in place, padding-correct, rows copied, reset, rolled back, ragged."""

import pytest
import torch

from ouro_lab.model import KVCache, OuroForCausalLM, init_weights

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def model(tiny_config):
    return init_weights(OuroForCausalLM(tiny_config), std=0.1, seed=4).eval()


def alone(model, ids: list[int]) -> torch.Tensor:
    """Every step's states of one sequence run by itself, without a cache: (R, T, H)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).step_hidden[:, 0]


def test_preallocated_cache_is_written_in_place_and_decodes_exactly(model):
    """A left-padded batch decoded token by token equals each row run alone, and the
    storage is never reallocated: no concatenation per token."""
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
    ids = torch.tensor([[0, 0] + seqs[0][:4], seqs[1][:6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    cache = model.new_cache(2, 12)
    ptr = cache.store.data_ptr()
    with torch.no_grad():
        pre = model(ids, mask, cache=cache).step_hidden
        steps = [model(torch.tensor([[seqs[0][4 + t]], [seqs[1][6 + t]]]), cache=cache).step_hidden
                 for t in range(3)]
    assert cache.store.data_ptr() == ptr and len(cache) == 9 and cache.capacity == 12
    torch.testing.assert_close(pre[:, 0, 2:], alone(model, seqs[0])[:, :4], **TOL)
    torch.testing.assert_close(pre[:, 1], alone(model, seqs[1])[:, :6], **TOL)
    for t, out in enumerate(steps):
        torch.testing.assert_close(out[:, 0, 0], alone(model, seqs[0])[:, 4 + t], **TOL)
        torch.testing.assert_close(out[:, 1, 0], alone(model, seqs[1])[:, 6 + t], **TOL)
    assert cache.mask[0].tolist() == [False, False] + [True] * 7
    assert cache.next_pos.tolist() == [7, 9]


def test_lazy_cache_grows_and_reports_its_slots(model, tiny_config):
    cache = KVCache()
    seq = list(range(3, 23))
    with torch.no_grad():
        model(torch.tensor([seq[:2]]), cache=cache)
        last = [model(torch.tensor([[t]]), cache=cache).step_hidden[:, 0, 0] for t in seq[2:]]
    torch.testing.assert_close(torch.stack(last, 1), alone(model, seq)[:, 2:], **TOL)
    assert cache.capacity >= 20 and len(cache) == 20
    R, L = tiny_config.total_ut_steps, tiny_config.num_hidden_layers
    assert set(cache.kv) == {(r, i) for r in range(R) for i in range(L)}
    assert cache.get(R - 1, 1)[0].shape == (1, tiny_config.num_key_value_heads, 20, tiny_config.head_dim)


def test_a_prefix_computed_once_serves_a_batch_of_continuations(model):
    """Prefill a shared prefix once, expand it to three rows (`select`), then run three
    continuations of different lengths as one left-padded batch: each equals the prefix and
    its continuation run alone (padding between prefix and continuation is masked)."""
    prefix = [7, 8, 9, 10, 11]
    conts = [[20, 21, 22], [30], [40, 41]]
    base = KVCache()
    with torch.no_grad():
        model(torch.tensor([prefix]), cache=base)
        cache = base.select(torch.zeros(3, dtype=torch.long))
        ids = torch.tensor([[20, 21, 22], [0, 0, 30], [0, 40, 41]])
        mask = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
        out = model(ids, mask, cache=cache).step_hidden
    assert len(base) == 5  # the prefix's own cache is untouched
    for j, c in enumerate(conts):
        torch.testing.assert_close(out[:, j, 3 - len(c):], alone(model, prefix + c)[:, len(prefix):], **TOL)


def test_reset_row_takes_a_new_sequence_while_the_other_row_decodes(model):
    """Continuous batching: row 1 is emptied and prefilled with a new prompt (`rows=`)
    while row 0 keeps decoding; both equal their sequences run alone."""
    a, b, c = [3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(torch.tensor([a[:3], b]), cache=cache)
        cache.reset([1])
        x, ctx = model.prepare(torch.tensor([c[:4]]), cache=cache, rows=torch.tensor([1]))
        for r in range(model.config.total_ut_steps):
            x = model.loop_step(x, r, ctx)
        torch.testing.assert_close(x[0], alone(model, c)[-1, :4], **TOL)
        outs = [model(torch.tensor([[a[3 + t]], [c[4 + t]]]), cache=cache).step_hidden for t in range(1)]
        outs += [model(torch.tensor([[a[4 + t]], [3 + t]]), cache=cache).step_hidden for t in range(2)]
    assert cache.lengths.tolist() == [6, 7]
    torch.testing.assert_close(outs[0][:, 0, 0], alone(model, a)[:, 3], **TOL)
    torch.testing.assert_close(outs[0][:, 1, 0], alone(model, c)[:, 4], **TOL)
    torch.testing.assert_close(outs[2][:, 0, 0], alone(model, a)[:, 5], **TOL)
    torch.testing.assert_close(outs[2][:, 1, 0], alone(model, c + [3, 4])[:, 6], **TOL)


def test_truncate_rolls_rows_back_to_different_lengths(model):
    """Rejected speculative tokens: roll rows back by different amounts, then decode on;
    the ragged rows equal their accepted sequences run alone."""
    seqs = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    cache = model.new_cache(2, 12)
    with torch.no_grad():
        model(torch.tensor(seqs), cache=cache)
        cache.truncate(torch.tensor([4, 2]))
        assert cache.next_pos.tolist() == [4, 2] and len(cache) == 4
        out = model(torch.tensor([[30, 31], [40, 41]]), cache=cache).step_hidden
    torch.testing.assert_close(out[:, 0], alone(model, seqs[0][:4] + [30, 31])[:, 4:], **TOL)
    torch.testing.assert_close(out[:, 1], alone(model, seqs[1][:2] + [40, 41])[:, 2:], **TOL)


@pytest.mark.parametrize("rows, runs", [([0, 2, 3], 2), ([1, 2], 1), ([3], 1)])
def test_a_subset_of_rows_attends_over_its_cache_rows_in_place(model, rows, runs):
    """`Context.select`: a step run for some rows of a call (live early exit) equals those
    rows run alone; each run of evenly spaced rows attends over views of its cache rows."""
    seqs = [[3 + i, 4 + i, 5 + i, 6 + i] for i in range(4)]
    cache = model.new_cache(4, 8)
    with torch.no_grad():
        model(torch.tensor([s[:3] for s in seqs]), cache=cache)
        x, ctx = model.prepare(torch.tensor([[s[3]] for s in seqs]), cache=cache)
        sub = ctx.select(torch.tensor(rows))
        h = model.loop_step(x[rows], 0, sub)
    assert len(sub.runs) == runs
    for j, b in enumerate(rows):
        torch.testing.assert_close(h[j, 0], alone(model, seqs[b])[0, 3], **TOL)


@pytest.mark.parametrize("ragged, runs", [(64, 1), (1, 2)])
def test_rows_at_different_columns_attend_in_one_masked_call(model, monkeypatch, ragged, runs):
    """Rows rolled back by different amounts (stale K/V left beyond their lengths) decode
    one token each in one call: within `RAGGED_COLUMNS` they share one SDPA call, each row
    masked to its own columns; further apart, a call each. Both equal each row alone."""
    import ouro_lab.cache as cache_module

    monkeypatch.setattr(cache_module, "RAGGED_COLUMNS", ragged)
    seqs = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        model(torch.tensor(seqs), cache=cache)
        cache.truncate(torch.tensor([5, 2]))  # columns 5 and 2-5 now hold rolled-back tokens
        x, ctx = model.prepare(torch.tensor([[20], [21]]), cache=cache)
        h = model.loop_step(x, 0, ctx)
    assert ctx.cols.tolist() == [5, 2] and len(ctx.runs) == runs and not ctx.one_block
    if runs == 1:
        assert ctx.runs[0].mask[:, 0, 0].tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    torch.testing.assert_close(h[0, 0], alone(model, seqs[0][:5] + [20])[0, 5], **TOL)
    torch.testing.assert_close(h[1, 0], alone(model, seqs[1][:2] + [21])[0, 2], **TOL)


def test_rows_at_different_loop_steps_share_one_call(model):
    """One call, each row at its own step (`slots`): row 0 runs step 2 of its token while
    row 1 runs step 1 of a token one position later; both equal their sequences alone."""
    a, b = [3, 4, 5, 6], [7, 8, 9, 10, 11]
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        model(torch.tensor([a[:3], b[:3]]), cache=cache)
        x, ctx = model.prepare(torch.tensor([[a[3]], [b[3]]]), cache=cache)
        h0 = model.loop_step(x, 0, ctx)
        h1 = model.loop_step(h0, 1, ctx)  # row 0 at step 2 next; row 1 finishes its token at step 1
        x1, ctx1 = model.prepare(torch.tensor([[b[4]]]), cache=cache, rows=torch.tensor([1]))
        h1b = model.loop_step(x1, 0, ctx1)  # row 1's next token, step 0
        both = torch.cat((h1[:1], h1b))
        mixed = cache.context(torch.cat((ctx.cos[:1], ctx1.cos)), torch.cat((ctx.sin[:1], ctx1.sin)),
                              torch.tensor([0, 1]), torch.tensor([3, 4]), torch.tensor([2, 1]))
        h = model.loop_step(both, 0, mixed)
    assert len(mixed.runs) == 2
    torch.testing.assert_close(h[0, 0], alone(model, a)[2, 3], **TOL)
    torch.testing.assert_close(h[1, 0], alone(model, b)[1, 4], **TOL)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("busy, strides", [([0, 1, 2, 3], (2, 2)), ([0, 2, 3, 5], (2, 3))])
def test_rows_interleaved_at_two_slots_attend_in_two_strided_calls(model, busy, strides, ragged):
    """Mixed depths in one tick: the busy rows alternate between step 0 (slot 0) and step 1
    (slot 1). Each slot's rows attend in one SDPA call over strided views of their cache
    rows (call-row and cache-row strides), and every row gets what the lockstep step gives;
    with a left-padded row, and (`ragged`) with rows rolled back to different columns, so
    each strided run reads its own rows' masks."""
    seqs = [[3 + i, 4 + i, 5 + i, 6 + i] for i in range(6)]
    cache = model.new_cache(6, 8)
    rows = torch.tensor(busy)
    mask = torch.ones(6, 3, dtype=torch.long)
    mask[busy[1], 0] = 0  # one row's first column is padding
    with torch.no_grad():
        model(torch.tensor([q[:3] for q in seqs]), mask, cache=cache)
        if ragged:  # the last two busy rows roll back a column: runs span columns 2 and 3
            cache.truncate(torch.tensor([2 if b in busy[2:] else 3 for b in range(6)]))
        x, ctx = model.prepare(torch.tensor([[q[3]] for q in seqs]), cache=cache)
        h0 = model.loop_step(x, 0, ctx)  # every row, step 0
        h1 = model.loop_step(h0, 1, ctx)  # every row, step 1
        slots = torch.tensor([0, 1, 0, 1])
        inp = torch.where((slots == 1)[:, None, None], h0[rows], x[rows])
        mixed = cache.context(ctx.cos[rows], ctx.sin[rows], rows, ctx.cols[rows], slots)
        h = model.loop_step(inp, 0, mixed)
    assert [(r.i, r.e, r.a, r.d, r.slot) for r in mixed.runs] == [(0, strides[0], busy[0], strides[1], 0),
                                                                   (1, strides[0], busy[1], strides[1], 1)]
    # the padded row's run reads its rows' padding; rolled-back rows mask their stale columns
    assert mixed.runs[1].mask is not None and (mixed.runs[0].mask is not None) == ragged
    want = torch.where((slots == 1)[:, None, None], h1[rows], h0[rows])
    torch.testing.assert_close(h, want, **TOL)


def test_shared_slot_keeps_the_last_step_and_copy_deeper_fills_slots(model, tiny_config):
    ids = torch.tensor([[3, 4, 5, 6]])
    full, shared = model.new_cache(1, 6), KVCache(shared=True)
    with torch.no_grad():
        a = model(ids, cache=full).step_hidden
        b = model(ids, cache=shared).step_hidden
    R = tiny_config.total_ut_steps
    torch.testing.assert_close(a, b)  # prompt tokens see their own step's K/V either way
    assert set(shared.kv) == {(0, i) for i in range(tiny_config.num_hidden_layers)}
    assert torch.equal(shared.get(0, 1)[0], full.get(R - 1, 1)[0])
    full.copy_deeper(0, torch.tensor([0]), torch.tensor([2]))
    assert torch.equal(full.get(R - 1, 1)[0][:, :, 2], full.get(0, 1)[0][:, :, 2])
    assert not torch.equal(full.get(R - 1, 1)[0][:, :, 1], full.get(0, 1)[0][:, :, 1])


def test_copy_deeper_fills_the_same_slots_by_slices_and_by_index(model):
    """A block of rows at one column is copied with slices, any other set by index; both
    fill exactly the deeper slots of the named (row, column)s with the step's K/V."""
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]])
    cache = model.new_cache(3, 6)
    with torch.no_grad():
        model(ids, cache=cache)
    # a block, rows not adjacent, columns that differ, one row, rows descending
    for step, rows, cols in ((1, [1, 2], [2, 2]), (0, [0, 2], [3, 3]), (0, [0, 1], [1, 3]), (1, [2], [0]),
                             (0, [2, 1], [1, 1])):
        got = cache.select(torch.arange(3))
        expected = got.store.clone()
        for row, col in zip(rows, cols, strict=True):
            expected[:, step + 1:, :, row, :, col] = expected[:, step:step + 1, :, row, :, col]
        assert not torch.equal(expected, got.store)
        got.copy_deeper(step, torch.tensor(rows), torch.tensor(cols))
        assert torch.equal(got.store, expected)
    before = cache.store.clone()
    cache.copy_deeper(0, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))  # no rows
    assert torch.equal(cache.store, before)


def test_generate_from_a_prefilled_cache_equals_generate_on_the_whole_prompt(model):
    prompt = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    ref = model.generate(prompt, max_new_tokens=6)
    cache = model.new_cache(2, 12)
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache)
    out = model.generate(prompt[:, -1:], max_new_tokens=6, cache=cache)
    assert torch.equal(out[:, 1:], ref[:, 5:])
    assert torch.equal(model.generate(prompt, max_new_tokens=6, use_cache=False), ref)
