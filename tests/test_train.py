"""The toy task family and the two-stage training loop, on tiny configs (seconds)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ouro_lab import toy
from ouro_lab import train as T
from ouro_lab.errors import OuroLabError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- toy family


def test_answers_compose_the_operations_mod_10():
    assert toy.Item(7, ("*3", "+3", "+3", "*7", "*7", "*7", "+3", "+3")).answer == 7  # the notes' example
    it = toy.Item(7, ("*3", "+3"))
    assert it.prompt == "7 *3 +3 =" and it.answer == 4 and it.running() == [7, 1, 4]
    for op in toy.OPS:  # every operation is a bijection of Z_10: answers are uniform, chance is 0.1
        assert sorted(toy.apply_op(op, x) for x in range(10)) == list(range(10))


def test_generator_is_deterministic_and_labels_difficulty():
    a = toy.sample_items(200, (1, 9), "train", torch.Generator().manual_seed(3))
    b = toy.sample_items(200, (1, 9), "train", torch.Generator().manual_seed(3))
    c = toy.sample_items(200, (1, 9), "train", torch.Generator().manual_seed(4))
    assert a == b and a != c
    assert {it.k for it in a} == set(range(1, 10))
    assert all(it.k == len(it.prompt.split()) - 2 for it in a)
    assert toy.test_items(20, 6, seed=5) == toy.test_items(20, 6, seed=5)


def test_held_out_splits_are_disjoint_from_training():
    for k in (2, 3, 4):
        parts = {s: {it.prompt for it in toy.all_items(k, s)} for s in toy.SPLITS}
        assert sum(len(p) for p in parts.values()) == 10 * 4 ** k  # a partition of all items
        assert not parts["train"] & parts["test"] and not parts["train"] & parts["dev"]
        assert not parts["dev"] & parts["test"]
        assert 0.08 < len(parts["test"]) / 10 / 4 ** k < 0.18  # about 1 in 8
    test = {it.prompt for it in toy.test_items(30, 8, seed=1234) if it.k > 1}
    drawn = toy.sample_items(3000, (2, 8), "train", torch.Generator().manual_seed(0))
    assert not test & {it.prompt for it in drawn}
    assert all(toy.split_of(p, len(p.split()) - 2) == "test" for p in test)


def test_encode_batch_layout():
    items = [toy.Item(7, ("*3", "+3")), toy.Item(2, ("+1",))]
    b = toy.encode_batch(items)
    tok = toy.TOKEN_ID
    assert b["input_ids"][0].tolist() == [tok["7"], tok["*3"], tok["+3"], tok["="], tok["4"], tok["<eos>"]]
    assert b["input_ids"][1].tolist() == [tok["2"], tok["+1"], tok["="], tok["3"], tok["<eos>"], tok["<pad>"]]
    assert b["answer_pos"].tolist() == [3, 2] and b["answer"].tolist() == [tok["4"], tok["3"]]
    assert b["running"][0, :3].tolist() == [tok["7"], tok["1"], tok["4"]] and b["running"][0, 3] == -100
    p = toy.encode_prompts(items)
    assert p["input_ids"].shape == (2, 4) and p["attention_mask"][1].tolist() == [1, 1, 1, 0]


# --------------------------------------------------------------------------- losses


def test_gate_targets_forward_and_paper_forms():
    L = torch.tensor([[2.0, 0.5], [0.5, 0.5], [0.5, 0.5], [0.1, 0.5]])  # (R=4, B=2)
    fwd = T.gate_targets(L, 50, 0.005, "forward", vocab_size=18)
    assert fwd.shape == (3, 2)
    # item 0: step 2 helps a lot -> keep looping at step 1; step 3 adds nothing -> lean to exit at
    # step 2 (1 - sigmoid(-0.25)); step 4 helps again -> keep looping at step 3
    assert fwd[0, 0] < 0.01 and abs(fwd[1, 0] - (1 - torch.sigmoid(torch.tensor(-0.25)))) < 1e-6
    assert fwd[2, 0] < 0.01
    assert (fwd[:, 1] > 0.5).all()  # item 1 is solved at step 1: exit there
    paper = T.gate_targets(L, 50, 0.005, "paper", vocab_size=18)
    assert (paper[0] < 0.01).all()  # step 1 always "improves" on ln V: the paper form never exits at step 1
    assert paper[1, 0] < 0.01 and paper[1, 1] > 0.5


# --------------------------------------------------------------------------- training


def tiny_recipe(tmp_path: Path, **over) -> T.TrainRecipe:
    raw = {"seed": 0, "threads": 1, "work_dir": str(tmp_path / "work"), "save_every": 4,
           "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "total_ut_steps": 3},
           "data": {"kmax_start": 2, "kmax_final": 3, "dev_per_level": 32, "test_per_level": 8},
           "stage1": {"max_steps": 40, "batch_size": 64, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10},
           "stage2": {"steps": 10, "batch_size": 64}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    return T.recipe_from_dict(raw)


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_stage1_lowers_the_loss_and_moves_the_gate(tmp_path):
    recipe = tiny_recipe(tmp_path, stage2__steps=0)
    start = T.build_model(recipe.model, recipe.seed, recipe.data.kmax_final)
    gate0 = start.model.early_exit_gate.weight.detach().clone()
    summary = T.train(recipe, progress=False)
    rows = [r for r in toy.read_jsonl(tmp_path / "work" / "training_log.jsonl") if r["stage"] == 1]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3
    assert all(abs(sum(r[f"p{t}"] for t in (1, 2, 3)) - 1) < 1e-4 for r in rows)  # exit pdf sums to 1
    state = torch.load(tmp_path / "work" / "state.pt", weights_only=True)["model"]
    assert (state["model.early_exit_gate.weight"] - gate0).abs().max() > 1e-3
    assert summary["stage1_steps"] == 40 and summary["test"]["n"] == 8 * 3


def test_stage2_changes_only_the_gate_and_training_is_seeded(tmp_path):
    a = T.train(tiny_recipe(tmp_path / "a", stage1__max_steps=12, stage2__steps=0,
                            export_dir=str(tmp_path / "a" / "out")), progress=False)
    b = T.train(tiny_recipe(tmp_path / "b", stage1__max_steps=12, stage2__steps=15,
                            export_dir=str(tmp_path / "b" / "out")), progress=False)
    wa, wb = weights(tmp_path / "a" / "out"), weights(tmp_path / "b" / "out")
    assert wa.keys() == wb.keys()
    changed = {k for k in wa if not torch.equal(wa[k], wb[k])}
    assert changed == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert a["test"]["by_difficulty"]["3"]["acc_per_step"] == b["test"]["by_difficulty"]["3"]["acc_per_step"]
    log = toy.read_jsonl(tmp_path / "b" / "work" / "training_log.jsonl")
    assert [r["step"] for r in log if r["stage"] == 2] == list(range(1, 16))
    out = tmp_path / "b" / "out"
    assert {"config.json", "model.safetensors", "tokenizer.json", "eval.json", "MODEL_CARD.md",
            "training_log.jsonl"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "eval.json").read_text())["test"] == b["test"]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = T.train(tiny_recipe(tmp_path / "s", stage1__max_steps=10, stage2__steps=6,
                                   export_dir=str(tmp_path / "s" / "out")), progress=False)
    recipe = tiny_recipe(tmp_path / "r", stage1__max_steps=10, stage2__steps=6,
                         export_dir=str(tmp_path / "r" / "out"))
    real, calls = T.make_batch, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # after 6 updates; the last saved state is at update 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "make_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        T.train(recipe, progress=False)
    monkeypatch.setattr(T, "make_batch", real)
    resumed = T.train(recipe, progress=False)
    wa, wb = weights(tmp_path / "s" / "out"), weights(tmp_path / "r" / "out")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["test"] == straight["test"]
    log = toy.read_jsonl(tmp_path / "r" / "work" / "training_log.jsonl")
    expected = [(1, i) for i in range(1, 11)] + [(2, i) for i in range(1, 7)]
    assert [(r["stage"], r["step"]) for r in log] == expected


def test_recipe_errors_name_the_file_and_every_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nstage1: {lr: -1, batch: 3}\nmodel: {hidden_size: many}\n")
    with pytest.raises(OuroLabError) as e:
        T.load_recipe(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    assert "stage1.lr" in msg and "stage1.batch: unknown field" in msg and "model.hidden_size" in msg
    with pytest.raises(OuroLabError, match="kmax_start"):
        T.recipe_from_dict({"data": {"kmax_start": 5, "kmax_final": 4}})
    with pytest.raises(OuroLabError, match="not found"):
        T.load_recipe(tmp_path / "missing.yaml")


def test_the_committed_recipe_validates_and_its_first_line_runs_it():
    path = ROOT / "recipes" / "train-demo.yaml"
    recipe = T.load_recipe(path)
    assert path.read_text().splitlines()[0] == "# ouro-lab train recipes/train-demo.yaml"
    assert recipe.export_dir == str(ROOT / "ouro_lab" / "builtin" / "loop-demo")
    assert recipe.stage2.label == "forward"
    assert recipe.work_dir == str(ROOT / "results" / "train-demo")  # the recipe's folder's, not the shell's


def test_cli_train_runs_a_recipe_and_reports_bad_ones_in_one_line(tmp_path, monkeypatch, capsys):
    from ouro_lab import cli

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "# ouro-lab train tiny.yaml\nseed: 1\nthreads: 1\nwork_dir: work\nexport_dir: out\n"
        "model: {hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32,"
        " total_ut_steps: 2}\n"
        "data: {kmax_start: 2, kmax_final: 2, dev_per_level: 16, test_per_level: 4}\n"
        "stage1: {max_steps: 3, batch_size: 16, eval_every: 2}\nstage2: {steps: 2, batch_size: 16}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative folders are the recipe's
    monkeypatch.setattr(sys, "argv", ["ouro-lab", "train", str(recipe)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code in (0, None)
    assert "held-out accuracy per step" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    recipe.write_text("stage1: {max_step: 3}\n")
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "stage1.max_step: unknown field" in err
