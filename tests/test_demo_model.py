"""The committed demo checkpoint (ouro_lab/builtin/loop-demo) and the demo lm-eval tasks.

The per-step accuracies and exit steps are recomputed here from the weights, through
transformers' AutoTokenizer and the model alone, and compared with what the model card
and eval.json record."""

import json
from pathlib import Path

import pytest
import torch

from ouro_lab import toy
from ouro_lab.loading import load_model
from ouro_lab.model import exit_distribution

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "ouro_lab" / "builtin" / "loop-demo"
TASKS = ROOT / "tasks"


@pytest.fixture(scope="module")
def model():
    return load_model(BUILTIN, device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUILTIN), local_files_only=True)


@pytest.fixture(scope="module")
def recorded():
    return json.loads((BUILTIN / "eval.json").read_text())


@pytest.fixture(scope="module")
def mc_docs():
    return toy.read_jsonl(TASKS / "data" / "loop_demo_mc.jsonl")


@pytest.fixture(scope="module")
def measured(model, tokenizer, mc_docs):
    """Per difficulty: correct (R, n) at the answer position per step and the exit step under
    Ouro's threshold rule q = 0.5 (1-based), from one unpadded batch per level."""
    out = {}
    for k in sorted({d["difficulty"] for d in mc_docs}):
        docs = [d for d in mc_docs if d["difficulty"] == k]
        enc = tokenizer([d["prompt"] for d in docs], return_tensors="pt")
        assert enc.input_ids.shape[1] == k + 2  # same length within a level: no padding
        answers = torch.tensor(tokenizer.convert_tokens_to_ids([d["answer"] for d in docs]))
        with torch.no_grad():
            lo = model(enc.input_ids)
            preds = torch.stack([lo.logits(r)[:, -1].argmax(-1) for r in range(lo.steps)])
            _, cdf = exit_distribution(lo.gate_logits[:, :, -1])
        out[k] = {"correct": (preds == answers[None]).float(),
                  "exit": (cdf >= 0.5).float().argmax(0).float() + 1}
    return out


def test_checkpoint_layout_size_and_tied_embeddings(model):
    from safetensors import safe_open

    names = {p.name for p in BUILTIN.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "eval.json",
            "MODEL_CARD.md", "training_log.jsonl"} <= names
    assert sum(p.stat().st_size for p in BUILTIN.iterdir()) <= 20 * 2 ** 20
    cfg = json.loads((BUILTIN / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["total_ut_steps"] == 4
    assert cfg["vocab_size"] == len(toy.VOCAB) and cfg["eos_token_id"] == toy.TOKEN_ID[toy.EOS]
    with safe_open(str(BUILTIN / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tokenizer_is_the_toy_vocabulary(tokenizer):
    assert tokenizer.get_vocab() == toy.TOKEN_ID
    assert tokenizer.eos_token == toy.EOS and tokenizer.pad_token == toy.PAD
    item = toy.Item(7, ("*3", "+3", "*7"))
    assert tokenizer(item.prompt).input_ids == toy.encode_prompts([item])["input_ids"][0].tolist()
    assert tokenizer(" 4").input_ids == [toy.TOKEN_ID["4"]]  # an MC continuation is one token
    assert tokenizer.decode([toy.TOKEN_ID["4"], toy.TOKEN_ID[toy.EOS]], skip_special_tokens=True) == "4"


def test_recorded_per_step_accuracy_and_exit_steps_reproduce(measured, recorded):
    by_k = recorded["test"]["by_difficulty"]
    assert sorted(map(int, by_k)) == sorted(measured)
    for k, m in measured.items():
        rec = by_k[str(k)]
        assert rec["n"] == m["correct"].shape[1]
        acc = m["correct"].mean(1).tolist()
        assert acc == pytest.approx(rec["acc_per_step"], abs=1e-6), f"k={k}"
        assert float(m["exit"].mean()) == pytest.approx(rec["mean_exit_step"], abs=1e-6), f"k={k}"
    card = (BUILTIN / "MODEL_CARD.md").read_text()
    hardest = by_k[str(max(measured))]
    assert f"| {max(measured)} | {hardest['n']} | " + " | ".join(
        f"{a:.3f}" for a in hardest["acc_per_step"]) in card


def test_the_demo_model_meets_the_issue_criteria(measured):
    easy, hard = min(measured), max(measured)
    acc = {k: m["correct"].mean(1) for k, m in measured.items()}
    exit_ = {k: float(m["exit"].mean()) for k, m in measured.items()}
    assert acc[hard][3] - acc[hard][0] >= 0.20          # loops matter on the hardest level
    assert max(acc[easy][0], acc[easy][1]) >= 0.95       # the easiest level is right by step 1 or 2
    assert exit_[easy] < exit_[hard]                     # the gate exits easy items earlier
    ks = sorted(measured)
    lower, upper = ks[: len(ks) // 2], ks[len(ks) // 2:]
    assert sum(exit_[k] for k in lower) / len(lower) < sum(exit_[k] for k in upper) / len(upper)


def test_greedy_generation_answers_then_stops(model, tokenizer, measured):
    docs = toy.read_jsonl(TASKS / "data" / "loop_demo_gen.jsonl")
    for k in sorted({d["difficulty"] for d in docs}):
        level = [d for d in docs if d["difficulty"] == k]
        enc = tokenizer([d["prompt"] for d in level], return_tensors="pt")
        ids = model.generate(enc.input_ids, max_new_tokens=2, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        hits = torch.tensor([t.strip() == d["answer"] for t, d in zip(texts, level, strict=True)]).float()
        # generation reads the last step: same hits as step-4 argmax on the same items
        step4 = measured[k]["correct"][-1, : len(level)]
        assert torch.equal(hits, step4), f"k={k}"
        assert (ids[:, -1] == tokenizer.eos_token_id).float().mean() >= 0.9  # it stops after the answer


def test_task_data_is_held_out_and_regenerates(tmp_path, mc_docs):
    mc, gen = toy.write_demo_tasks(tmp_path)
    assert mc.read_text() == (TASKS / "data" / "loop_demo_mc.jsonl").read_text()
    assert gen.read_text() == (TASKS / "data" / "loop_demo_gen.jsonl").read_text()
    for d in mc_docs:
        item = toy.items_from_docs([d])[0]
        assert item.answer == d["label"] == int(d["answer"]) and item.k == d["difficulty"]
        assert item.k == 1 or item.split == "test"
    assert len(mc_docs) <= 450 and len({d["prompt"] for d in mc_docs}) == len(mc_docs)


def test_lm_eval_builds_the_demo_tasks_offline(monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    assert {"loop_demo_mc", "loop_demo_gen"} <= set(tm.all_tasks)
    monkeypatch.chdir(TASKS)  # data_files are relative to the YAMLs' folder
    tasks = get_task_dict(["loop_demo_mc", "loop_demo_gen"], tm)
    mc, gen = tasks["loop_demo_mc"], tasks["loop_demo_gen"]
    mc_docs, gen_docs = list(mc.test_docs()), list(gen.test_docs())
    assert len(mc_docs) >= 300 and 60 <= len(gen_docs) <= 100
    assert all("difficulty" in d for d in mc_docs + gen_docs)
    assert mc.OUTPUT_TYPE == "multiple_choice" and gen.OUTPUT_TYPE == "generate_until"
    assert mc.doc_to_choice(mc_docs[0]) == [str(d) for d in range(10)]
    assert mc.doc_to_target(mc_docs[5]) == mc_docs[5]["label"]
    mc.build_all_requests(limit=2, rank=0, world_size=1)
    assert [i.args for i in mc.instances[:2]] == [(mc_docs[0]["prompt"], " 0"), (mc_docs[0]["prompt"], " 1")]
    gen.build_all_requests(limit=1, rank=0, world_size=1)
    context, kwargs = gen.instances[0].args
    assert context == gen_docs[0]["prompt"] and kwargs["max_gen_toks"] <= 4 and "\n" in kwargs["until"]
