"""lm-eval integration end to end on a tiny random model: OuroLM, one trace pass, replay scoring."""

import logging
import math

import pytest
from harness_helpers import make_model_dir, make_tasks

logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    from ouro_lab.loading import load_model, load_tokenizer

    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared machine
    from ouro_lab.tasks import TaskSet

    root = tmp_path_factory.mktemp("h")
    mdir = make_model_dir(root / "model")
    tasks = make_tasks(root / "tasks")
    ts = TaskSet(["tiny_mc", "tiny_ppl", "tiny_gen"], include_path=[tasks])
    return {"root": root, "mdir": mdir, "ts": ts, "model": load_model(mdir), "tok": load_tokenizer(mdir)}


@pytest.fixture(scope="module")
def traced(env):
    from ouro_lab.harness import trace_pass

    return trace_pass(env["model"], env["tok"], env["ts"], batch_size=4, cache_dir=env["root"] / "cache")


def _values(rows):
    return {(r["task"], r["metric"], r["filter"]): (r["value"], repr(r["stderr"])) for r in rows}


def test_replay_fixed_equals_direct_lm_eval_bit_for_bit(env, traced):
    """Replaying `fixed` at step k gives exactly lm-eval's metrics for the model cut to k steps."""
    from ouro_lab.harness import OuroLM, metric_rows, run_evaluate, score
    from ouro_lab.registry import make_strategy

    trace, _ = traced
    seen = set()
    for k in (1, 2, 4):
        metrics, samples = score(env["ts"], trace, make_strategy("fixed", {"step": k}))
        lm = OuroLM(model=env["model"], tokenizer=env["tok"], steps=k, batch_size=4)
        direct = metric_rows(run_evaluate(lm, env["ts"], ["tiny_mc", "tiny_ppl"]))
        assert _values(metrics) == _values(direct)  # exact equality, no tolerance
        assert {m["steps_used_mean"] for m in metrics} == {float(k)}
        seen.add(tuple(sorted(_values(metrics).items())))
        assert len(samples) == 24 and set(samples.columns) >= {"acc", "acc_norm", "steps_used", "difficulty",
                                                               "flops_per_token", "steps_executed"}
    assert len(seen) == 3  # the steps really differ on this model


def test_scorer_equals_lm_eval_evaluate(env, traced):
    """The build-once Scorer behind `score` returns what lm_eval.evaluator.evaluate returns."""
    from ouro_lab.harness import ReplayLM, answers_from_exits, exit_steps, metric_rows, run_evaluate, score
    from ouro_lab.registry import make_strategy

    trace, _ = traced
    for name, params in (("threshold", {"q": 0.3}), ("threshold", {"q": 0.9}), ("kl", {})):
        st = make_strategy(name, params)
        metrics, samples = score(env["ts"], trace, st)
        lm = ReplayLM(answers_from_exits(trace, exit_steps(trace, st)))
        direct = run_evaluate(lm, env["ts"], ["tiny_mc", "tiny_ppl"])
        assert _values(metrics) == _values(metric_rows(direct))
        got = samples[samples.task == "tiny_mc"].set_index("doc_id")
        for s in direct["samples"]["tiny_mc"]:
            row = got.loc[s["doc_id"]]
            assert row["acc"] == s["acc"] and row["acc_norm"] == s["acc_norm"]


def test_trace_is_cached_by_content(env, traced, monkeypatch):
    import ouro_lab.tracing as h

    trace, units = traced
    monkeypatch.setattr(h, "_units_forward", lambda *a, **k: pytest.fail("ran the model again"))
    again, _ = h.trace_pass(env["model"], env["tok"], env["ts"], batch_size=4,
                            cache_dir=env["root"] / "cache")
    assert again.meta["key"] == trace.meta["key"] and again.n == trace.n
    assert trace.n == sum(len(u.cont) for u in units)


def test_score_compute_columns(env, traced):
    from ouro_lab.harness import score
    from ouro_lab.registry import make_strategy

    trace, _ = traced
    m_thr, s_thr = score(env["ts"], trace, make_strategy("threshold", {"q": 0.5}))
    mc = next(r for r in m_thr if r["task"] == "tiny_mc" and r["metric"] == "acc")
    assert 1 <= mc["steps_used_mean"] <= 4 and mc["steps_executed_mean"] == mc["steps_used_mean"]
    assert mc["flops_per_token"] == mc["flops_executed_per_token"] > 0
    from ouro_lab.lm import HarnessError

    with pytest.raises(HarnessError, match="composed from the fixed-step runs"):  # per document
        score(env["ts"], trace, make_strategy("oracle", {}))
    assert set(s_thr.difficulty.dropna().unique()) == {1, 2, 3}
    ppl = [r for r in m_thr if r["task"] == "tiny_ppl"]
    assert {r["metric"] for r in ppl} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(r["value"]) for r in ppl)


def test_a_fractional_limit_counts_documents_as_lm_eval_does(env):
    """limit 0.35 of 12 documents: lm-eval scores ceil(4.2) = 5; provenance must say 5."""
    from ouro_lab.harness import OuroLM, build_units
    from ouro_lab.tasks import TaskSet

    ts = TaskSet(["tiny_mc"], include_path=[env["root"] / "tasks"], limit=0.35)
    n = len(ts.tasks["tiny_mc"].eval_docs)
    scored = {u.doc_id for u in build_units(ts, OuroLM(model=env["model"], tokenizer=env["tok"]))}
    assert ts.selection("tiny_mc") == {"how": "limit", "documents": math.ceil(0.35 * n), "of": n}
    assert len(scored) == ts.selection("tiny_mc")["documents"] and 0.35 * n % 1
    # a "sample" of more documents than the task has is the whole task, and is called so
    every = TaskSet(["tiny_mc"], include_path=[env["root"] / "tasks"], sample=10 * n)
    assert every.selection("tiny_mc") == {"how": "all", "documents": n, "of": n}


def test_generate_until_cuts_and_caps(env):
    from lm_eval.api.instance import Instance

    from ouro_lab.harness import OuroLM

    lm = OuroLM(model=env["model"], tokenizer=env["tok"], batch_size=3)
    reqs = [Instance("generate_until", {}, ("what is one plus two", {"until": ["."], "max_gen_toks": n}), 0,
                     ("t", i, 1)) for i, n in enumerate((1, 3, 6))]
    outs = lm.generate_until(reqs)
    assert all("." not in o for o in outs)
    assert [len(o.split()) <= n for o, n in zip(outs, (1, 3, 6), strict=True)] == [True] * 3
    # the same prompt decoded alone gives the same text (padding does not leak)
    alone = lm.generate_until(reqs[2:])
    assert alone[0] == outs[2]
    # an explicit max_gen_toks caps what the task asks for
    cap = OuroLM(model=env["model"], tokenizer=env["tok"], batch_size=3, max_gen_toks=2)
    capped = cap.generate_until(reqs)
    assert capped[0] == outs[0] and all(len(o.split()) <= 2 for o in capped)


def test_generate_until_reads_lm_evals_cap_aliases_and_refuses_no_room(env):
    """lm-eval's own names for the token cap (max_new_tokens, max_tokens, max_completion_tokens)
    cap as max_gen_toks does; a cap leaving no room for the prompt is refused, as HFLM does
    (it used to keep only the prompt's last token)."""
    from lm_eval.api.instance import Instance

    from ouro_lab.harness import HarnessError, OuroLM

    lm = OuroLM(model=env["model"], tokenizer=env["tok"], batch_size=2, max_length=64)

    def gen(**gk):
        args = ("what is one plus two", {"until": ["<x>"], **gk})
        return lm.generate_until([Instance("generate_until", {}, args, 0, ("t", 0, 1))])[0]

    two = gen(max_gen_toks=2)
    assert two and len(env["tok"](two).input_ids) <= 2 and gen(max_gen_toks=6) != two
    for alias in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        assert gen(**{alias: 2}) == two, alias
    assert gen(max_gen_toks=2, max_new_tokens=5) == two  # lm-eval's priority: max_gen_toks first
    with pytest.raises(HarnessError, match="asks for 64 new tokens, not below max_length 64"):
        gen(max_gen_toks=64)


def test_generation_stops_at_every_eos_id_of_the_generation_config(env, tmp_path):
    """HF's `generate` (and so lm-eval's HFLM) stops at any id of generation_config.json's
    `eos_token_id` list, not only at the tokenizer's end-of-text token."""
    import json
    import shutil

    from lm_eval.api.instance import Instance

    from ouro_lab.harness import OuroLM

    def gen(path):
        lm = OuroLM(path=str(path), batch_size=2)
        args = ("what is one plus two", {"until": ["<x>"], "max_gen_toks": 6})
        return lm, lm.generate_until([Instance("generate_until", {}, args, 0, ("t", 0, 1))])[0]

    import torch

    lm, text = gen(env["mdir"])
    assert lm.stop_ids == [lm.eot_token_id]
    ids = lm.model.generate(torch.tensor([lm.tok_encode("what is one plus two")]), max_new_tokens=6)[0, -6:]
    ids = ids.tolist()
    assert env["tok"].decode(ids, skip_special_tokens=True) == text  # greedy: the same tokens
    k = next(i for i in range(1, 6) if ids[i] not in ids[:i])  # a later token, new there
    ck = shutil.copytree(env["mdir"], tmp_path / "ck")
    (ck / "generation_config.json").write_text(json.dumps({"eos_token_id": [lm.eot_token_id, ids[k]]}))
    lm, cut = gen(ck)
    assert lm.stop_ids == sorted({lm.eot_token_id, ids[k]})
    assert cut == env["tok"].decode(ids[:k], skip_special_tokens=True) != text


def test_random_generation_draws_per_request_not_per_batch_place(env):
    """A randomized rule's draws in generation are keyed by the request (task, document,
    index): a request decodes the same alone or behind other requests (other tasks)."""
    from lm_eval.api.instance import Instance

    from ouro_lab.harness import OuroLM

    prompts = ["what is one plus two", "one two", "what is two plus two plus one", "two"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 6}), 0, ("t", i, 1))
            for i, p in enumerate(prompts)]

    def run(rs):
        lm = OuroLM(model=env["model"], tokenizer=env["tok"], batch_size=2, strategy="random",
                    strategy_params={"mean_steps": 2.0})
        return lm.generate_until(rs), lm.records

    texts, recs = run(reqs)
    # lm-eval's `repeats` clones of one sampled request (self-consistency) draw apart
    lm = OuroLM(model=env["model"], tokenizer=env["tok"], batch_size=2)
    gk = {"until": ["."], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0}
    sampled = Instance("generate_until", {}, (prompts[0], gk), 0, ("t", 0, 4))
    assert len(set(lm.generate_until([sampled] * 4))) > 1
    alone, alone_recs = run(reqs[3:])
    assert alone[0] == texts[3]
    assert alone_recs[("t", 3, 0)]["steps_used"] == recs[("t", 3, 0)]["steps_used"]
    assert recs[("t", 3, 0)]["steps_used"] < 4 * recs[("t", 3, 0)]["tokens"]  # it did exit early


def _bos_tokenizer(add_bos: bool):
    """A word-level tokenizer with a BOS token distinct from its EOS, adding it by default
    (Llama style) or not (Ouro-Thinking style: BOS 0, turns end with another id)."""
    from harness_helpers import WORDS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<bos>", "<unk>", "<eos>"] + WORDS)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")
    if add_bos:
        t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_encoding_is_lm_evals_hflm_with_a_bos_token(env, adds_bos):
    """The ids lm-eval's HFLM makes (its own methods, run on the same tokenizer): the BOS
    token as the prefix of empty contexts and rolling windows, and the tokenizer's default
    special tokens unless `add_bos_token` says otherwise (a text starting with BOS gets none)."""
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    from ouro_lab.harness import OuroLM

    tok = _bos_tokenizer(adds_bos)
    for add_bos in (None, False, True):
        lm = OuroLM(model=env["model"], tokenizer=tok, add_bos_token=add_bos)
        ref = SimpleNamespace(tokenizer=tok, add_bos_token=add_bos, custom_prefix_token_id=None)
        ref.prefix_token_id = HFLM.prefix_token_id.fget(ref)
        assert lm.prefix_token_id == ref.prefix_token_id == 0 != lm.eot_token_id
        for text in ("one two", "<bos> one two", "three"):
            for special in (None, False, True):
                assert lm.tok_encode(text, special) == HFLM.tok_encode(ref, text, special), (text, special)
        assert lm.rolling_units("one two three")[0][0] == [0]  # the first window starts from BOS
    lm = OuroLM(model=env["model"], tokenizer=tok)
    assert lm.encode_request("", "one two") == ([0], lm.tok_encode("one two", add_special_tokens=False))
    assert lm.encode_request("one", " two")[0][:1] == ([0] if adds_bos else [lm.tok_encode("one")[0]])


def test_a_strategy_is_never_scored_at_full_depth_under_its_name(env):
    from lm_eval.api.instance import Instance

    from ouro_lab.harness import HarnessError, OuroLM

    lm = OuroLM(model=env["model"], tokenizer=env["tok"], strategy="threshold", strategy_params={"q": 0.1},
                live=False)
    with pytest.raises(HarnessError, match="needs live=true"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("what is one", " plus two"), 0, ("t", 0, 1))])


def test_left_truncation_to_max_length(env):
    from ouro_lab.harness import OuroLM

    lm = OuroLM(model=env["model"], tokenizer=env["tok"], max_length=8)
    long_ctx = " ".join(["one two"] * 20)
    ids, three = lm.tok_encode(long_ctx), lm.tok_encode("three")
    (lp_long, _), = lm._loglikelihood_tokens([(("", ""), ids, three)])
    (lp_cut, _), = lm._loglikelihood_tokens([(("", ""), ids[-8:], three)])
    assert lp_long == lp_cut and math.isfinite(lp_long)
    # a continuation longer than max_length would be scored on its last tokens only: refused, as HFLM does
    from lm_eval.api.instance import Instance

    from ouro_lab.harness import HarnessError

    with pytest.raises(HarnessError, match=r"^task t, document 3: its continuation has 9 tokens, more than"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("one", " two" * 9), 0, ("t", 3, 1))])


def test_bad_model_args_are_one_line_errors(env):
    from ouro_lab.errors import OuroLabError
    from ouro_lab.harness import OuroLM

    with pytest.raises(OuroLabError, match="kv_policy"):
        OuroLM.create_from_arg_string(f"path={env['mdir']},strategy=threshold,kv_policy=nope")
    with pytest.raises(OuroLabError, match="unknown argument"):
        OuroLM.create_from_arg_string(f"path={env['mdir']},stepz=2")
    lm = OuroLM.create_from_arg_string(f"path={env['mdir']},strategy=fixed,step=2")
    assert lm.steps == 2 and lm.strategy is None and not lm.live


def test_cli_eval_plain_and_with_strategy(env, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from ouro_lab.cli import app

    tasks = str(env["root"] / "tasks")
    base = ["eval", str(env["mdir"]), "--tasks", "tiny_mc,tiny_gen", "--include-path", tasks, "--limit", "4",
            "--batch-size", "4"]
    r = CliRunner().invoke(app, [*base, "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "tiny_mc" in r.output and "acc" in r.output and "tiny_gen" in r.output
    r = CliRunner().invoke(app, [*base, "--strategy", "threshold", "-p", "q=0.5", "--kv-policy", "last",
                                 "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    m = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert set(m.task) == {"tiny_mc", "tiny_gen"} and m.steps_used_mean.between(1, 4).all()
    assert len(pd.read_parquet(tmp_path / "o" / "samples.parquet")) == 8  # the sweep's format
    assert any((tmp_path / "c").glob("trace-*.safetensors"))
    r = CliRunner().invoke(app, [*base, "--strategy", "threshold", "-p", "q"])
    assert r.exit_code != 0


def test_eval_refuses_a_calibrating_strategy_in_one_line(env):
    from ouro_lab.harness import HarnessError, evaluate_tasks

    with pytest.raises(HarnessError, match="budget calibrates on a held-out split; run it with `ouro-lab"):
        evaluate_tasks(env["mdir"], "tiny_mc", include_path=[env["root"] / "tasks"], limit=2,
                       strategy="budget", params={"mean_steps": 2.0})


def test_ouro_lab_is_registered_with_lm_eval(env):
    from lm_eval.api.registry import get_model

    from ouro_lab.harness import OuroLM
    from ouro_lab.lm_eval_cli import register

    register()
    cls = get_model("ouro-lab")
    assert cls is OuroLM
    lm = cls.create_from_arg_string(f"path={env['mdir']},strategy=threshold,q=0.7,kv_policy=last",
                                    {"batch_size": 2, "device": "cuda:0" if not _cuda() else "cpu"})
    assert lm.live and lm.strategy.q == 0.7 and lm.kv_policy == "last" and lm.batch_size == 2


def _cuda():
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow  # lm-eval's CLI always indexes its ~10k bundled task files (about 30 s here)
def test_lm_eval_cli_wrapper_registers_ouro_lab(env, monkeypatch, capsys, tmp_path):
    """`lm-eval --model ouro-lab` through the wrapper, lm-eval's own CLI doing the rest, from a
    folder that is not the YAML's (relative data_files resolve against the YAML's folder);
    --log_samples files gain each document's compute under `ouro_lab`."""
    import json

    from ouro_lab.lm_eval_cli import main

    monkeypatch.chdir(tmp_path)
    main(["--model", "ouro-lab", "--model_args", f"path={env['mdir']},steps=2", "--tasks", "tiny_mc",
          "--include_path", str(env["root"] / "tasks"), "--limit", "3", "--batch_size", "2",
          "--output_path", str(tmp_path / "out"), "--log_samples"])
    out = capsys.readouterr().out
    assert "tiny_mc" in out and "acc" in out and "ouro-lab" in out
    files = list((tmp_path / "out").rglob("samples_tiny_mc_*.jsonl"))
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert len(files) == 1 and len(lines) == 3
    assert all(x["ouro_lab"]["steps_used"] == 2 and x["ouro_lab"]["live"] is False for x in lines)


def test_lm_eval_cli_samples_files_name_each_documents_compute(env, monkeypatch, tmp_path):
    """Under lm-eval's --samples (here unsorted: [5, 1]) requests count the chosen documents
    0..n-1 in file order and lm-eval labels the k-th one with the k-th index given: each
    line still gets the compute of the document it holds (tiny_ppl's texts differ in length:
    its tokens are its text's tokens)."""
    import json

    from ouro_lab.lm_eval_cli import MADE, main

    monkeypatch.chdir(tmp_path)
    main(["--model", "ouro-lab", "--model_args", f"path={env['mdir']},strategy=threshold,q=0.5",
          "--tasks", "tiny_ppl", "--include_path", str(env["root"] / "tasks"), "--samples",
          json.dumps({"tiny_ppl": [5, 1]}), "--batch_size", "2", "--output_path", str(tmp_path / "out"),
          "--log_samples"])
    (f,) = (tmp_path / "out").rglob("samples_tiny_ppl_*.jsonl")
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    assert sorted(x["doc_id"] for x in lines) == [1, 5]
    lm = MADE[-1]
    sizes = [len(lm.tok_encode(x["doc"]["text"])) for x in lines]
    assert len(set(sizes)) == 2  # the two documents can be told apart by their compute
    for x, n in zip(lines, sizes, strict=True):
        assert x["ouro_lab"]["tokens"] == n, x["doc_id"]


def test_scorer_generic_path_matches_fast_path(env, traced):
    """Answers from any LM object go through lm-eval's own filters; ReplayLM answers take
    the inline default-filter path: same results."""
    from ouro_lab.harness import ReplayLM, answers_from_exits, exit_steps, metric_rows, scorer_for
    from ouro_lab.registry import make_strategy

    class Answers:  # not a ReplayLM
        def __init__(self, a):
            self.a = a

        def loglikelihood(self, reqs):
            return [self.a[(r.task_name, r.doc_id, r.idx)] for r in reqs]

        loglikelihood_rolling = loglikelihood

    trace, _ = traced
    answers = answers_from_exits(trace, exit_steps(trace, make_strategy("threshold", {"q": 0.6})))
    sc = scorer_for(env["ts"], trace)
    assert _values(metric_rows(sc(ReplayLM(answers)))) == _values(metric_rows(sc(Answers(answers))))


def test_score_memo_and_caches_change_nothing(env, traced):
    """Scored after many other settings (per-doc memo, result and frame caches warm) or on a
    freshly built Scorer, a setting gets the same metrics and the same samples frame."""
    import pandas as pd

    from ouro_lab.harness import score
    from ouro_lab.registry import make_strategy

    trace, _ = traced
    settings = [make_strategy("fixed", {"step": k}) for k in (1, 2, 3, 4)] + \
               [make_strategy("threshold", {"q": q}) for q in (0.2, 0.5, 0.8)] + [make_strategy("kl", {})]
    warm = [score(env["ts"], trace, st) for st in settings + settings[::-1]]
    for i, st in enumerate(settings):
        env["ts"].scorers.clear()
        trace.__dict__.pop("_doc_index", None)  # the per-trace frame caches too
        cold = score(env["ts"], trace, st)
        for m, s in (warm[i], warm[-1 - i]):
            assert _values(m) == _values(cold[0])
            assert [r["steps_used_mean"] for r in m] == [r["steps_used_mean"] for r in cold[0]]
            pd.testing.assert_frame_equal(s, cold[1], check_exact=True)
    cold[1].loc[0, "task"] = "changed"  # a returned frame is the caller's to change
    assert (score(env["ts"], trace, settings[-1])[1].task != "changed").all()


def test_only_the_builtin_fixed_rule_becomes_a_truncated_model(env, tmp_path):
    """OuroLM runs the built-in `fixed` k as the model truncated to k steps. It matched on the
    module's name, so a user's `fixed_then_kl` (a `step` field and rules of its own) was
    silently replaced by a 2-step model; and the shortcut clamped k to the checkpoint's depth,
    ignoring `steps` (steps=2 with step=4 ran 4 steps; live ran 2)."""
    from ouro_lab.lm import OuroLM
    from ouro_lab.registry import make_strategy

    (tmp_path / "fixed_then_kl.py").write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\nimport torch\n"
        "from ouro_lab.strategy import ExitStrategy\n\n\n@dataclass\nclass Strategy(ExitStrategy):\n"
        "    step: int = 2\n    eps: float = 0.1\n    needs: ClassVar[tuple[str, ...]] = ('kl_prev',)\n\n"
        "    def decide(self, s, r):\n"
        "        return (s['kl_prev'] < self.eps) & torch.tensor(r + 1 >= self.step)\n")
    mine = make_strategy("fixed_then_kl", {"step": 2}, dirs=[tmp_path])
    lm = OuroLM(model=env["model"], tokenizer=env["tok"], strategy=mine)
    assert lm.strategy is mine and lm.steps == env["model"].config.total_ut_steps
    fixed = make_strategy("fixed", {"step": 4})
    for steps, want in ((None, 4), (2, 2), (6, 4)):
        lm = OuroLM(model=env["model"], tokenizer=env["tok"], strategy=fixed, steps=steps, live=False)
        assert (lm.strategy, lm.steps) == (None, want)
    six = make_strategy("fixed", {"step": 6})
    lm = OuroLM(model=env["model"], tokenizer=env["tok"], strategy=six, steps=6)
    assert (lm.strategy, lm.steps) == (None, 6)


def test_nested_groups_keep_their_aggregate_and_compute(env, tmp_path):
    """A group of groups (mmlu: its four category groups over 57 subjects) kept no row: a
    group stayed only if its direct members were all leaf tasks, and a nested group's
    compute columns averaged only its direct leaf members (none: NaN). Replay and live."""
    import shutil

    from ouro_lab.evaluate import evaluate_live
    from ouro_lab.harness import trace_pass
    from ouro_lab.scoring import score
    from ouro_lab.tasks import TaskError, TaskSet

    tasks = shutil.copytree(env["root"] / "tasks", tmp_path / "tasks")
    (tasks / "tiny_mc" / "tiny_mc2.yaml").write_text("include: tiny_mc.yaml\ntask: tiny_mc2\n")
    (tasks / "tiny_mc" / "tiny_mc3.yaml").write_text(  # longer contexts: more FLOPs per token
        'include: tiny_mc.yaml\ntask: tiny_mc3\ndoc_to_text: "one two three four five six {{question}}"\n')
    agg = "aggregate_metric_list:\n  - {metric: acc, aggregation: mean, weight_by_size: true}\n"
    (tasks / "tiny_inner.yaml").write_text("group: tiny_inner\ntask: [tiny_mc, tiny_mc2]\n" + agg)
    (tasks / "tiny_outer.yaml").write_text("group: tiny_outer\ntask: [tiny_inner, tiny_mc3]\n" + agg)
    with pytest.raises(TaskError, match=r"^tasks: Duplicate task 'tiny_mc3'.*; name it once"):
        TaskSet(["tiny_outer", "tiny_mc3"], include_path=[tasks], limit=4)  # one line, not a traceback
    ts = TaskSet(["tiny_outer"], include_path=[tasks], limit=4)
    assert sorted(ts.tasks) == ["tiny_mc", "tiny_mc2", "tiny_mc3"]
    assert set(ts.subset(list(ts.tasks))["groups"]) == {"tiny_inner", "tiny_outer"}
    assert set(ts.subset(["tiny_mc", "tiny_mc2"])["groups"]) == {"tiny_inner"}
    trace, _ = trace_pass(env["model"], env["tok"], ts, batch_size=4, cache_dir=tmp_path / "cache")
    from ouro_lab.registry import make_strategy

    for rows in (score(ts, trace, make_strategy("fixed", {"step": 2}), bootstrap_iters=0)[0],
                 evaluate_live(env["model"], env["tok"], ts, make_strategy("fixed", {"step": 2}),
                               batch_size=4, bootstrap_iters=0)[0]):
        acc = {r["task"]: r for r in rows if r["metric"] == "acc"}
        assert set(acc) == {"tiny_mc", "tiny_mc2", "tiny_mc3", "tiny_inner", "tiny_outer"}
        leaves = [acc[t]["value"] for t in ("tiny_mc", "tiny_mc2", "tiny_mc3")]
        assert acc["tiny_outer"]["value"] == pytest.approx(sum(leaves) / 3)  # 4 documents each
        flops = {t: r["flops_per_token"] for t, r in acc.items()}
        assert all(acc[g]["steps_used_mean"] == pytest.approx(2.0) for g in ("tiny_inner", "tiny_outer"))
        assert flops["tiny_inner"] == pytest.approx(flops["tiny_mc"]) and flops["tiny_mc"] < flops["tiny_mc3"]
        assert flops["tiny_mc"] < flops["tiny_outer"] < flops["tiny_mc3"]  # all three leaves' tokens


def test_a_group_scored_apart_is_said_not_left_out(env, tmp_path, capsys):
    """A group of a multiple-choice and a generation task under a strategy: the one is
    replayed, the other decoded live, so lm-eval computes no aggregate; eval says so."""
    import shutil

    from ouro_lab.evaluate import evaluate_tasks
    from ouro_lab.progress import stderr_console
    from ouro_lab.tasks import TaskSet

    tasks = shutil.copytree(env["root"] / "tasks", tmp_path / "tasks")
    (tasks / "tiny_mix.yaml").write_text("group: tiny_mix\ntask: [tiny_mc, tiny_gen]\n")
    ts = TaskSet(["tiny_mix"], include_path=[tasks], limit=2)
    assert ts.groups_apart([["tiny_mc"], ["tiny_gen"]]) == ["tiny_mix"]
    assert ts.groups_apart([["tiny_mc", "tiny_gen"]]) == []
    (tasks / "tiny_ll.yaml").write_text("group: tiny_ll\ntask: [tiny_mc, tiny_ppl]\n")  # replayed together
    ll = TaskSet(["tiny_ll"], include_path=[tasks], limit=2)
    assert ll.sweep_groups_apart(["tiny_mc", "tiny_ppl"], [], live=False) == {}
    assert "live settings score its tasks one at a time" in \
        ll.sweep_groups_apart(["tiny_mc", "tiny_ppl"], [], live=True)["tiny_ll"]
    m, _ = evaluate_tasks(env["mdir"], "tiny_mix", include_path=[tasks], limit=2, batch_size=4,
                          strategy="threshold", params={"q": 0.5}, console=stderr_console(),
                          cache_dir=tmp_path / "cache")
    assert {r["task"] for r in m} == {"tiny_mc", "tiny_gen"}
    err = capsys.readouterr().err
    said = "group tiny_mix: its tasks are scored apart (replayed and live), so lm-eval's group aggregate"
    assert said in " ".join(err.split())
