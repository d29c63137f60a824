"""Tasks offline: YAML folders with relative data files, and standard lm-eval tasks run from
local copies of their datasets in the hub's layout (README `configs:` header + parquet);
the other stock tasks are in test_stock_tasks.py."""

import logging

import pytest
from harness_helpers import make_model_dir, make_tasks
from hub_copies import arc_rows, gsm_rows, write_hub_dataset

logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_hub_dataset(root / "allenai" / "ai2_arc", {"ARC-Easy": {
        "train": arc_rows(3), "validation": arc_rows(2, 10), "test": arc_rows(5, 20)}})
    write_hub_dataset(root / "openai" / "gsm8k", {"main": {"train": gsm_rows(7), "test": gsm_rows(3)}})
    return root


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    import torch

    from ouro_lab.harness import OuroLM

    torch.set_num_threads(1)
    return OuroLM(path=str(make_model_dir(tmp_path_factory.mktemp("m") / "model")), batch_size=4,
                  max_gen_toks=6)


def test_standard_tasks_from_local_copies_offline(data_root, lm, monkeypatch):
    """arc_easy (multiple choice) and gsm8k (generation, 5-shot) with the hub unreachable."""
    from ouro_lab.harness import metric_rows, run_evaluate
    from ouro_lab.tasks import TaskSet

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ts = TaskSet(["arc_easy", "gsm8k"], data_root=data_root, limit=3)
    assert ts.output_type("arc_easy") == "multiple_choice" and ts.output_type("gsm8k") == "generate_until"
    assert ts.tasks["gsm8k"].config.num_fewshot == 5  # lm-eval's own YAML, only the data path moved
    res = run_evaluate(lm, ts, ["arc_easy", "gsm8k"])
    rows = {(r["task"], r["metric"], r["filter"]): r["value"] for r in metric_rows(res)}
    assert 0 <= rows[("arc_easy", "acc", "none")] <= 1
    gsm_keys = {("gsm8k", "exact_match", "strict-match"), ("gsm8k", "exact_match", "flexible-extract")}
    assert gsm_keys <= set(rows)
    assert res["n-samples"]["arc_easy"]["effective"] == 3
    gsm = res["samples"]["gsm8k"][0]
    assert gsm["arguments"][0][0].count("Question:") == 6  # five shots from the local train split


def test_missing_local_copy_says_how_to_get_it(tmp_path):
    from ouro_lab.errors import OuroLabError
    from ouro_lab.tasks import TaskSet

    with pytest.raises(OuroLabError, match=r"hf download allenai/ai2_arc --repo-type dataset"):
        TaskSet(["arc_easy"], data_root=tmp_path)


def test_unknown_task_suggests_names(tmp_path):
    from ouro_lab.errors import OuroLabError
    from ouro_lab.tasks import TaskSet

    make_tasks(tmp_path)
    with pytest.raises(OuroLabError, match="did you mean tiny_mc"):
        TaskSet(["tiny_mcc"], include_path=[tmp_path])
    with pytest.raises(OuroLabError, match="no such folder"):
        TaskSet(["tiny_mc"], include_path=[tmp_path / "nope"])


def test_relative_data_files_resolve_against_the_yaml(tmp_path, monkeypatch):
    from ouro_lab.tasks import TaskSet

    make_tasks(tmp_path / "t", n=5)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # lm-eval alone would look for ./test.jsonl here
    ts = TaskSet(["tiny_mc", "tiny_gen"], include_path=[tmp_path / "t"], limit=2, num_fewshot=0)
    assert len(ts.tasks["tiny_mc"].eval_docs) == 5
    assert ts.doc_meta("tiny_mc", 1, "difficulty") == 2
    assert ts.names_of("generate_until") == ["tiny_gen"]
