"""Self-speculative decoding equals full-depth greedy decoding token for token."""

import json
from pathlib import Path

import pytest
import torch
from harness_helpers import make_model_dir

from ouro_lab.live import live_generate
from ouro_lab.loading import load_model, load_tokenizer
from ouro_lab.registry import make_strategy
from ouro_lab.speculative import speculative_generate

ROOT = Path(__file__).resolve().parents[1]


class Ids:
    """A tokenizer whose text is the token ids: outputs compare token for token."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def demo():
    mdir = ROOT / "ouro_lab" / "builtin" / "loop-demo"
    model, tok = load_model(mdir, device="cpu"), load_tokenizer(mdir)
    lines = (ROOT / "tasks" / "data" / "loop_demo_gen.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    prompts = [tok(d["prompt"]).input_ids for d in docs[::7]]  # every difficulty, prompts of 4-12 tokens
    return model, tok, prompts


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    mdir = make_model_dir(tmp_path_factory.mktemp("spec") / "model", seed=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 30, (n,), generator=g).tolist() for n in (5, 2, 9, 3, 7)]
    return load_model(mdir), prompts


def plain_greedy(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt):].tolist()


@pytest.mark.parametrize("draft, draft_len", [(("fixed", {"step": 1}), 4), (("fixed", {"step": 2}), 3),
                                              (("threshold", {"q": 0.5}), 2)])
def test_output_is_full_depth_greedy_on_a_random_model(random_model, draft, draft_len):
    """Left-padded prompts on 2 rows (continuous batching), every draft rule: the tokens
    are full-depth greedy decoding's; drafts are partly accepted, partly not."""
    model, prompts = random_model
    texts, recs = speculative_generate(model, Ids(), prompts, make_strategy(*draft), draft_len,
                                       max_new_tokens=9, batch_size=2)
    for p, text, rec in zip(prompts, texts, recs, strict=True):
        assert text == Ids().decode(plain_greedy(model, p, 9))
        assert rec["tokens"] == 9 and rec["steps_used"] == 9 * model.config.total_ut_steps
        assert 0 <= rec["accepted"] <= rec["drafted"] == rec["rounds"] * draft_len
        assert rec["flops_decode"] > 0 and rec["decode_seconds"] > 0
    accepted = sum(r["accepted"] for r in recs) / sum(r["drafted"] for r in recs)
    assert 0 < accepted < 1


def test_output_equals_plain_greedy_on_the_demo_generation_task(demo):
    """The demo model with its tokenizer, `until` and eos as the demo task asks: the same
    texts as full-depth live decoding, with fewer rounds than tokens (drafts accepted)."""
    model, tok, prompts = demo
    kw = dict(until=["\n", "<eos>"], max_new_tokens=6, eos_token_id=model.config.eos_token_id, batch_size=4)
    plain, _ = live_generate(model, tok, prompts, None, "copy", **kw)
    texts, recs = speculative_generate(model, tok, prompts, make_strategy("fixed", {"step": 1}), 3, **kw)
    assert texts == plain and any(t.strip() for t in texts)
    assert sum(r["rounds"] for r in recs) < sum(r["tokens"] for r in recs)
    # tokens after eos / until / the cap are dropped: R steps per kept token, never more
    # (steps_used reached 6-8 per token on the demo sweep, with R = 4)
    R = model.config.total_ut_steps
    assert all(r["steps_used"] == r["tokens"] * R and r["accepted"] <= r["tokens"] for r in recs)
    assert any(r["tokens"] < 6 for r in recs)  # some stop early, inside a round
    texts, recs = speculative_generate(model, tok, prompts, make_strategy("fixed", {"step": 1}), 3,
                                       **{**kw, "max_new_tokens": 0})
    assert texts == [""] * len(prompts) and all(r["tokens"] == r["steps_used"] == 0 for r in recs)


def test_a_draft_at_full_depth_accepts_everything(random_model):
    model, prompts = random_model
    R = model.config.total_ut_steps
    texts, recs = speculative_generate(model, Ids(), prompts[:2], make_strategy("fixed", {"step": R}), 3,
                                       max_new_tokens=8)
    assert all(r["accepted"] == r["drafted"] for r in recs)
    assert texts == [Ids().decode(plain_greedy(model, p, 8)) for p in prompts[:2]]
