"""Generation as tasks ask for it: do_sample / temperature / top_p / top_k from gen_kwargs, seeded
and reproducible (whatever the batch), also under live early exit; long generations within the KV
cache bench/memory_table.py predicts."""

import logging

import pytest
import torch

from ouro_lab.sampling import Sampling

logging.getLogger("lm_eval").setLevel(logging.ERROR)


def test_gen_kwargs_semantics():
    from ouro_lab.errors import OuroLabError

    assert not Sampling.from_gen_kwargs({}).do_sample
    assert not Sampling.from_gen_kwargs({"do_sample": False, "temperature": 0.0}).do_sample
    assert not Sampling.from_gen_kwargs({"do_sample": False, "temperature": 0.7}).do_sample
    gk = {"temperature": 0.7, "top_p": 0.9, "until": ["."]}
    s = Sampling.from_gen_kwargs(gk, seed=3)
    assert s == Sampling(True, 0.7, 0.9, 0, 3) and gk == {"until": ["."]}  # sampling keys consumed
    assert Sampling.from_gen_kwargs({"do_sample": True}).temperature == 1.0
    for bad in ({"do_sample": True, "temperature": 0}, {"do_sample": True, "top_p": 0},
                {"do_sample": True, "top_k": -1}):
        with pytest.raises(OuroLabError, match="generation_kwargs"):
            Sampling.from_gen_kwargs(dict(bad))


def test_draws_follow_the_filtered_distribution():
    """Frequencies over 4,000 keys match the tempered, top-k / top-p filtered probabilities
    (within 4 standard errors); top_k=1 and a tiny top_p are greedy."""
    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]), -1)
    n = 4000
    for s, keep in ((Sampling(True, 1.0), 5), (Sampling(True, 0.5), 5), (Sampling(True, 1.0, top_k=2), 2),
                    (Sampling(True, 1.0, top_p=0.8), 2)):
        z = (logp[0] / s.temperature)
        p = z.softmax(-1)
        p[keep:] = 0
        p = p / p.sum()
        got = torch.bincount(s.pick(logp.expand(n, -1), [("r", i) for i in range(n)]), minlength=5) / n
        assert ((got - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (s, got, p)
    for s in (Sampling(True, 1.0, top_k=1), Sampling(True, 2.0, top_p=1e-6)):
        assert (s.pick(logp.expand(50, -1), list(range(50))) == 0).all()
    a, b = Sampling(True, seed=1), Sampling(True, seed=2)
    keys = [("q", i) for i in range(200)]
    assert torch.equal(a.pick(logp.expand(200, -1), keys), a.pick(logp.expand(200, -1), keys))
    assert not torch.equal(a.pick(logp.expand(200, -1), keys), b.pick(logp.expand(200, -1), keys))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from harness_helpers import make_model_dir

    from ouro_lab.loading import load_model, load_tokenizer

    path = make_model_dir(tmp_path_factory.mktemp("s") / "m", std=0.3)
    return load_model(path), load_tokenizer(path)


def _prompts(n=5):
    return [[1 + (3 * i + j) % 25 for j in range(3 + i % 4)] for i in range(n)]


@pytest.mark.parametrize("strategy", [None, "threshold"])
def test_sampled_generation_is_reproducible_whatever_the_batch(tiny, strategy):
    """Full depth and live early exit (sampling from the exit step's distribution): the same
    texts at batch sizes 1, 2 and 5 and on a rerun; another seed gives other texts; top_k=1
    is the greedy output."""
    from ouro_lab.live import live_generate
    from ouro_lab.registry import make_strategy

    model, tok = tiny
    st = make_strategy("threshold", {"q": 0.5}) if strategy else None
    s = Sampling(True, temperature=1.5, top_p=0.95, seed=7)

    def run(batch, sampling):
        return live_generate(model, tok, _prompts(), st, "copy", max_new_tokens=12, batch_size=batch,
                             row_ids=list(range(5)), sampling=sampling)[0]

    ref = run(5, s)
    assert run(1, s) == ref == run(2, s) == run(5, s)
    assert run(5, Sampling(True, temperature=1.5, top_p=0.95, seed=8)) != ref
    assert run(3, Sampling(True, top_k=1, seed=7)) == run(3, None)  # greedy
    assert len({t for t in ref}) > 1


def test_lm_eval_generation_with_sampling_kwargs(tiny, tmp_path):
    """A generate_until task asking for sampling runs through lm-eval, reproducibly; settings
    it cannot honour are one line."""
    from harness_helpers import make_tasks

    from ouro_lab.lm import HarnessError, OuroLM
    from ouro_lab.scoring import run_evaluate
    from ouro_lab.tasks import TaskSet

    model, tok = tiny
    make_tasks(tmp_path, n=6)
    yaml = tmp_path / "tiny_gen" / "tiny_gen.yaml"
    yaml.write_text(yaml.read_text().replace("do_sample: false", "do_sample: true\n  temperature: 1.3\n"
                                             "  top_k: 5"))
    ts = TaskSet(["tiny_gen"], include_path=[tmp_path], limit=6)

    def texts(batch, seed):
        lm = OuroLM(model=model, tokenizer=tok, batch_size=batch, seed=seed)
        res = run_evaluate(lm, ts, ["tiny_gen"], 0)
        return [s["resps"][0][0] for s in res["samples"]["tiny_gen"]]

    assert texts(2, 5) == texts(6, 5) != texts(6, 6)  # the run's seed draws, not the batch
    yaml.write_text(yaml.read_text().replace("top_k: 5", "num_beams: 4"))
    with pytest.raises(HarnessError, match="num_beams=4 is not supported"):
        run_evaluate(OuroLM(model=model, tokenizer=tok), TaskSet(["tiny_gen"], include_path=[tmp_path],
                                                                 limit=2), ["tiny_gen"], 0)


def test_long_generation_stays_in_the_predicted_cache(tiny, monkeypatch):
    """1,500 generated tokens: the cache is preallocated once for prompt + max_new_tokens and
    never grows; its bytes are what ModelCost.kv_bytes (bench/memory_table.py) predicts."""
    from ouro_lab import live
    from ouro_lab.flops import ModelCost

    model, tok = tiny
    model.config.max_position_embeddings = 4096
    runs = []

    class Spy(live.LiveBatch):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            runs.append(self)

    monkeypatch.setattr(live, "LiveBatch", Spy)
    prompts = _prompts(2)
    n = 1500
    texts, recs = live.live_generate(model, tok, prompts, None, "copy", max_new_tokens=n, eos_token_id=None)
    assert [r["tokens"] for r in recs] == [n, n]
    cache = runs[0].cache
    capacity = max(map(len, prompts)) + n
    cost = ModelCost.from_config(model.config)
    assert cache.capacity == capacity  # allocated once, never grown
    assert cache.store.numel() * cache.store.element_size() == 2 * cost.kv_bytes(capacity, dtype="float32")
