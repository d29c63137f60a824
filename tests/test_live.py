"""Live early exit: token-by-token decoding with KV policies, against replay and the plain model."""

import logging
import math

import pytest
from harness_helpers import make_model_dir, make_tasks

logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    from ouro_lab.harness import trace_pass
    from ouro_lab.loading import load_model, load_tokenizer
    from ouro_lab.tasks import TaskSet

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("live")
    mdir = make_model_dir(root / "model", seed=1)
    tasks = make_tasks(root / "tasks", n=8)
    ts = TaskSet(["tiny_mc", "tiny_ppl", "tiny_gen"], include_path=[tasks])
    model, tok = load_model(mdir), load_tokenizer(mdir)
    trace, _ = trace_pass(model, tok, ts, batch_size=4)
    return {"ts": ts, "model": model, "tok": tok, "trace": trace, "tasks": tasks}


def _by_key(rows):
    return {(r["task"], r["metric"]): r for r in rows}


@pytest.mark.parametrize("rule", [("threshold", {"q": 0.5}), ("confidence", {"tau": 0.5}),
                                  ("kl", {"eps": 0.05, "min_step": 3}), ("random", {"mean_steps": 2.5})])
def test_full_policy_live_matches_replay(env, rule):
    """With every step computed (`full`), a live run sees the same states as the trace:
    same exits, same metrics (up to float noise of token-by-token attention), and the
    same FLOPs used, LM-head readouts of head-reading rules included. A randomized rule
    draws the same numbers for the same (request, position) in both."""
    from ouro_lab.harness import evaluate_live, score
    from ouro_lab.registry import make_strategy

    st = make_strategy(*rule)
    replay, _ = score(env["ts"], env["trace"], st)
    live, samples = evaluate_live(env["model"], env["tok"], env["ts"], st, "full", batch_size=4,
                                  names=["tiny_mc", "tiny_ppl"])
    R = env["trace"].steps
    lv = _by_key(live)
    for r in replay:
        got = lv[(r["task"], r["metric"])]
        assert got["value"] == pytest.approx(r["value"], rel=1e-4)
        assert got["steps_used_mean"] == pytest.approx(r["steps_used_mean"])
        assert got["flops_per_token"] == pytest.approx(r["flops_per_token"])
        assert got["steps_executed_mean"] == R  # full: every step runs anyway
        assert got["flops_total_per_token"] >= got["flops_executed_per_token"]
        if r["task"] == "tiny_mc":  # prompt tokens are charged in the total
            assert got["flops_total_per_token"] > got["flops_executed_per_token"]
    assert {"steps_used", "flops_executed_per_token", "acc"} <= set(samples.columns)


def test_live_fixed_with_copy_is_the_truncated_model(env):
    """fixed k under `copy`: no token ever reads a slot deeper than k, so the run equals
    the k-step model, at k/R of the loop compute."""
    from ouro_lab.harness import OuroLM, evaluate_live, metric_rows, run_evaluate
    from ouro_lab.registry import make_strategy

    live, _ = evaluate_live(env["model"], env["tok"], env["ts"], make_strategy("fixed", {"step": 2}), "copy",
                            batch_size=3, names=["tiny_mc"])
    plain = metric_rows(run_evaluate(OuroLM(model=env["model"], tokenizer=env["tok"], steps=2), env["ts"],
                                     ["tiny_mc"]))
    assert [r["value"] for r in live] == [r["value"] for r in plain]
    assert all(r["steps_executed_mean"] == 2 for r in live)


def test_policies_differ_in_compute_and_slots(env):
    import torch

    from ouro_lab.live import LiveBatch
    from ouro_lab.registry import make_strategy

    st = make_strategy("fixed", {"step": 1})
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    runs = {}
    for pol in ("full", "copy", "last"):
        run = LiveBatch(env["model"], st, pol, batch=2)
        for t in range(3):
            run.step(ids[:, t], torch.ones(2, dtype=torch.bool))
        runs[pol] = run
    R, L = env["trace"].steps, env["model"].config.num_hidden_layers
    assert (runs["full"].steps_executed == 3 * R).all() and (runs["copy"].steps_executed == 3).all()
    assert runs["copy"].flops.sum() < runs["full"].flops.sum()
    assert set(runs["last"].cache.kv) == {(0, i) for i in range(L)}
    assert len(runs["copy"].cache.kv) == R * L
    for i in range(L):  # copy: the deeper slots hold the exit step's K/V
        assert torch.equal(runs["copy"].cache.kv[(R - 1, i)][0], runs["copy"].cache.kv[(0, i)][0])
        assert not torch.equal(runs["full"].cache.kv[(R - 1, i)][0], runs["full"].cache.kv[(0, i)][0])


@pytest.mark.parametrize("policy", ["full", "copy", "last"])
def test_counters_are_the_cost_of_what_each_token_ran(env, policy):
    """Rows exiting at different steps, decoded in ticks: each row's counters are the sum over
    its tokens of steps run x (layer + gate + attention at the token's context) + readouts x
    LM head, and the per-token results `tick` returns add up to them."""
    import torch

    from ouro_lab.live import LiveBatch
    from ouro_lab.strategy import ExitStrategy

    R = env["trace"].steps

    class ByRow(ExitStrategy):  # row b exits at step b mod R (LiveBatch.index = row id * 1_000_003 + fed)
        needs = ()

        def decide(self, s, r):
            return (s.index // 1_000_003) % R <= r

    B, T = R + 1, 3
    run = LiveBatch(env["model"], ByRow(), policy, batch=B)
    ids = torch.arange(5, 5 + B * T).view(B, T)
    fed, summed = [0] * B, {k: [0.0] * B for k in ("flops", "flops_used", "steps")}
    ready = list(range(B))
    while True:
        rows = torch.tensor([b for b in ready if fed[b] < T], dtype=torch.long)
        out = run.tick(rows, ids[rows, [fed[b] for b in rows.tolist()]] if len(rows) else None)
        for b in rows.tolist():
            fed[b] += 1
        if out is None:
            break
        ready = out["done"].tolist()
        for j, b in enumerate(ready):
            for k in summed:
                summed[k][b] += float(out[k][j])
    cost = run.cost
    for b in range(B):
        exit_step = b % R
        ran = R if policy == "full" else exit_step + 1
        flops = sum(cost.token_flops(ran, t + 1, readouts=1) for t in range(T))
        used = sum(cost.token_flops(exit_step + 1, t + 1, readouts=1) for t in range(T))
        assert run.steps_executed[b] == T * ran == summed["steps"][b]
        assert run.readouts[b] == T and run.tokens[b] == T == run.fed[b]
        assert run.flops[b] == pytest.approx(flops, rel=1e-12) == summed["flops"][b]
        assert run.flops_used[b] == pytest.approx(used, rel=1e-12) == summed["flops_used"][b]
    assert (run.next_step == -1).all()  # every row idle at the end


@pytest.mark.parametrize("policy", ["full", "copy", "last"])
@pytest.mark.parametrize("k", [2, 9])
def test_steps_before_the_earliest_exit_run_in_one_tick(env, policy, k):
    """fixed k promises no stop before step k (`earliest`), so rows in lockstep run steps
    1..k in one tick (9: past the depth, all of them). Exits, log-probs, per-step states,
    counters and the cache equal those of a run that asks after every step."""
    import torch

    from ouro_lab.live import COUNTERS, LiveBatch
    from ouro_lab.registry import make_strategy

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    R = env["trace"].steps
    got = {}
    for fused in (True, False):
        run = LiveBatch(env["model"], make_strategy("fixed", {"step": k}), policy, batch=2)
        if not fused:
            run.first_exit = 0  # the promise ignored: a decision after every step
        ticks, tick = [0], run.tick

        def counted(*a, _tick=tick, _n=ticks, **kw):
            _n[0] += 1
            return _tick(*a, **kw)

        run.tick = counted
        outs = [run.step(ids[:, t], torch.ones(2, dtype=torch.bool), keep_states=True) for t in range(4)]
        got[fused] = (run, outs, ticks[0])
    (a, oa, ta), (b, ob, tb) = got[True], got[False]
    for x, y in zip(oa, ob, strict=True):
        assert torch.equal(x["exit"], y["exit"]) and torch.equal(x["logp"], y["logp"])
        assert torch.equal(x["states"], y["states"])
    assert all((getattr(a, c) == getattr(b, c)).all() for c in COUNTERS)
    assert torch.equal(a.cache.store, b.cache.store)
    kk = min(k, R)  # a step() stops at the tick that leaves no token in flight: no empty tick
    assert ta == 4 * (1 + (R - kk if policy == "full" else 0))
    assert tb == 4 * (R if policy == "full" else kk)


@pytest.mark.parametrize("rule", [("fixed", {"step": 2}), ("confidence", {"tau": 0.5})])
def test_step_log_probs_only_where_wanted_and_shared_with_nothing(env, rule):
    """`step`'s log-probs: rows without a readout (or not alive) are NaN, the others equal a
    run that reads every row out. The batch's exit log-probs, taken whole when every row
    exits at once, share no memory with the signals' previous-step log-probs (a later
    partial write to one would change the other)."""
    import torch

    from ouro_lab.live import LiveBatch
    from ouro_lab.registry import make_strategy

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    wants = [torch.tensor([True, True, True]), torch.tensor([True, False, True]),
             torch.tensor([False, False, False]), torch.tensor([True, True, True])]
    alive = [torch.ones(3, dtype=torch.bool)] * 3 + [torch.tensor([True, False, True])]
    runs = {w: LiveBatch(env["model"], make_strategy(*rule), "copy", batch=3) for w in ("some", "all")}
    for t in range(4):
        got = runs["some"].step(ids[:, t], alive[t], readout=wants[t])
        ref = runs["all"].step(ids[:, t], alive[t])
        shown = wants[t] & alive[t]
        assert torch.isnan(got["logp"][~shown]).all()
        assert torch.equal(got["logp"][shown], ref["logp"][shown])
        assert not torch.isnan(got["logp"][shown]).any()
        for run in runs.values():
            if run.sig is not None and run.sig.logp_prev is not None:
                ptr = run.sig.logp_prev.untyped_storage().data_ptr()
                assert run.logp.untyped_storage().data_ptr() != ptr


def test_live_generate_without_exit_is_greedy_generate(env):
    """No strategy: live decoding (parallel prefill, then token by token over a padded
    batch) produces the model's own greedy continuation."""
    import torch

    from ouro_lab.live import live_generate

    model, tok = env["model"], env["tok"]
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    texts, recs = live_generate(model, tok, prompts, None, "copy", until=[], max_new_tokens=5)
    for p, text, rec in zip(prompts, texts, recs, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=5)[0, len(p):].tolist()
        assert text == tok.decode(ref, skip_special_tokens=True)
        assert rec["tokens"] == 5 and rec["steps_used"] == 5 * env["trace"].steps
        assert rec["flops"] > rec["flops_decode"] > 0
    cut, _ = live_generate(model, tok, prompts, None, "copy", until=[texts[0].split()[1]], max_new_tokens=5)
    assert cut[0] == texts[0][: texts[0].find(texts[0].split()[1])]


@pytest.mark.parametrize("rule, eos", [(None, 9), (("fixed", {"step": 2}), 10)])
def test_continuous_batching_equals_one_batch(env, rule, eos):
    """Two rows serving five prompts (a finished row takes the next prompt, its cache row
    reset and prefilled while the other row decodes) give each prompt the same text and
    compute as one batch of all five; without a rule, the model's own greedy continuation."""
    import torch

    from ouro_lab.live import live_generate
    from ouro_lab.registry import make_strategy

    model, tok = env["model"], env["tok"]
    prompts = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18]]
    st = None if rule is None else make_strategy(*rule)  # `eos` stops rows after 1-6 tokens
    kw = dict(max_new_tokens=6, eos_token_id=eos)
    one, rec1 = live_generate(model, tok, prompts, st, "copy", **kw)
    two, rec2 = live_generate(model, tok, prompts, st, "copy", batch_size=2, **kw)
    assert one == two and len({r["tokens"] for r in rec2}) > 1
    for a, b in zip(rec1, rec2, strict=True):
        assert (a["tokens"], a["steps_executed"], a["prefill_tokens"]) == (b["tokens"], b["steps_executed"],
                                                                           b["prefill_tokens"])
        assert a["flops_decode"] == pytest.approx(b["flops_decode"])
        assert b["prefill_seconds"] >= 0 and b["decode_seconds"] > 0
    if rule is None:
        for p, text, rec in zip(prompts, two, rec2, strict=True):
            ref = model.generate(torch.tensor([p]), max_new_tokens=rec["tokens"], eos_token_id=eos)
            ref = [t for t in ref[0, len(p):].tolist() if t != eos]
            assert text == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("policy", ["copy", "last"])
@pytest.mark.parametrize("rule", [("threshold", {"q": 0.4}), ("kl", {"eps": 1.0, "min_step": 1})])
def test_rows_at_different_depths_decode_as_if_alone(env, policy, rule):
    """A gate rule (threshold) or a head rule (kl, whose log-probs each tick's exits are read
    out from) gives each token its own depth; in a batch, rows run at different loop steps
    in the same tick and start their next token as soon as one exits. Every prompt gets the
    text, exits and compute it gets decoded alone."""
    from ouro_lab.live import live_generate
    from ouro_lab.registry import make_strategy

    model, tok = env["model"], env["tok"]
    prompts = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13], [14, 15]]
    st = make_strategy(*rule)
    batch, recs = live_generate(model, tok, prompts, st, policy, max_new_tokens=6, batch_size=3)
    for p, text, rec in zip(prompts, batch, recs, strict=True):
        (one,), (r1,) = live_generate(model, tok, [p], st, policy, max_new_tokens=6)
        assert text == one
        assert (rec["steps_used"], rec["steps_executed"]) == (r1["steps_used"], r1["steps_executed"])
        assert rec["flops_decode"] == pytest.approx(r1["flops_decode"])
    assert 1 < sum(r["steps_used"] for r in recs) / sum(r["tokens"] for r in recs) < env["trace"].steps


def test_rows_exiting_at_different_steps_share_one_head_readout(env):
    """Row b's tokens exit at step b (rows decoded in ticks, a row starting its next token
    as soon as one exits): ticks where rows exit at different steps read the LM head once
    for all of them, and every token's log-probs equal those of its row decoded alone."""
    import torch

    from ouro_lab.live import LiveBatch
    from ouro_lab.strategy import ExitStrategy

    class ByRow(ExitStrategy):
        needs = ()

        def decide(self, s, r):
            return s.index // 1_000_003 <= r  # the row id (see LiveBatch.index)

    model, B, n = env["model"], 3, 4
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    calls = []
    head = model.lm_head.forward

    def counted(x):
        calls.append(x.shape[0])
        return head(x)

    def decode(rows, run):  # ticks; returns {row: [log-probs of each token]} and head calls per tick
        out, fed, per_tick = {b: [] for b in rows}, {b: 0 for b in rows}, []
        ready = list(range(len(rows)))
        while True:  # until no token is in flight
            start = [i for i in ready if fed[rows[i]] < n]
            calls.clear()
            res = run.tick(torch.tensor(start, dtype=torch.long),
                           torch.tensor([int(ids[rows[i], fed[rows[i]]]) for i in start], dtype=torch.long))
            for i in start:
                fed[rows[i]] += 1
            if res is None:
                break
            per_tick.append((len(calls), len(res["done"])))
            for i in res["done"].tolist():
                out[rows[i]].append(run.logp[i].clone())
            ready = res["done"].tolist()
        return out, per_tick

    model.lm_head.forward = counted
    try:
        together, per_tick = decode([0, 1, 2], LiveBatch(model, ByRow(), "copy", batch=B))
        alone = {b: decode([b], LiveBatch(model, ByRow(), "copy", batch=1, row_ids=[b]))[0][b]
                 for b in range(B)}
    finally:
        model.lm_head.forward = head
    assert any(done > 1 for _, done in per_tick)  # rows at different steps exited in one tick
    assert all(c == (1 if done else 0) for c, done in per_tick)
    for b in range(B):
        assert len(together[b]) == n
        for x, y in zip(together[b], alone[b], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_generation_under_a_strategy_saves_compute(env):
    from ouro_lab.harness import evaluate_live
    from ouro_lab.registry import make_strategy

    rows = {}
    for pol in ("full", "copy", "last"):
        m, s = evaluate_live(env["model"], env["tok"], env["ts"], make_strategy("threshold", {"q": 0.3}), pol,
                             batch_size=4, names=["tiny_gen"], max_gen_toks=4)
        (rows[pol],) = m
        assert math.isfinite(rows[pol]["value"]) and rows[pol]["wall_s"] > 0
        assert len(s) == 8 and s.steps_used.notna().all()
    R = env["trace"].steps
    assert rows["full"]["steps_executed_mean"] == R
    assert rows["copy"]["steps_executed_mean"] < R
    assert rows["copy"]["flops_executed_per_token"] < rows["full"]["flops_executed_per_token"]


def test_oracle_cannot_decode(env):
    import torch

    from ouro_lab.live import LiveBatch, LiveError
    from ouro_lab.registry import make_strategy

    with pytest.raises(LiveError, match="composed from the fixed-step runs"):
        LiveBatch(env["model"], make_strategy("oracle", {}), "copy", batch=1)
    assert torch is not None


def test_random_draws_of_a_task_do_not_depend_on_the_others(env):
    """A request's draws are keyed by the request and the token's position, not by its place
    in the trace: tiny_ppl's random baseline is the same traced alone or with tiny_mc."""
    from ouro_lab.harness import score, trace_pass
    from ouro_lab.registry import make_strategy
    from ouro_lab.tasks import TaskSet

    alone_ts = TaskSet(["tiny_ppl"], include_path=[env["tasks"]])
    alone, _ = trace_pass(env["model"], env["tok"], alone_ts, batch_size=4)
    st = make_strategy("random", {"mean_steps": 2.5})
    a, _ = score(alone_ts, alone, st, seed=7)
    b, _ = score(env["ts"], env["trace"], st, seed=7)
    a = {r["metric"]: r for r in a}
    for r in b:
        if r["task"] == "tiny_ppl":
            assert r["steps_used_mean"] == a[r["metric"]]["steps_used_mean"]  # the same draws
            assert r["value"] == pytest.approx(a[r["metric"]]["value"], rel=1e-6)  # batched apart


def test_random_exits_differ_between_batches(env):
    """Randomized rules draw per (request, token): the same slot in two batches does not
    repeat the same exits (the live baseline's intervals would be too narrow)."""
    from ouro_lab.harness import Unit
    from ouro_lab.live import live_score_units
    from ouro_lab.registry import make_strategy

    units = [Unit((3, 4, 5), (6, 7, 8, 9, 10, 11))] * 8
    _, recs = live_score_units(env["model"], units, make_strategy("random", {"mean_steps": 2.5}), "copy",
                               batch_size=1)
    assert len({r["steps_used"] for r in recs}) > 1
