"""Every stock task offline: hellaswag, piqa, winogrande, arc_challenge and mmlu (a subject and
a group) from tiny local copies in their hub layouts, with and without the split few-shot
examples come from; at n-shot without it, one line naming the task and the split, exit 2,
from `eval`, `validate` and `sweep` alike."""

import logging

import pytest
from cli_helpers import run_cli
from harness_helpers import make_model_dir
from hub_copies import arc_rows, hellaswag_rows, mmlu_subjects, write_hub_dataset, write_stock_copies

logging.getLogger("lm_eval").setLevel(logging.ERROR)

STOCK = ["hellaswag", "piqa", "winogrande", "arc_challenge", "mmlu_anatomy"]
# how each task's prompt separates its few-shot examples: k shots give k (or k + 1) of them
DELIM = {"hellaswag": ("\n\n", 0), "winogrande": ("\n\n", 0), "piqa": ("Question:", 1),
         "arc_challenge": ("Question:", 1), "mmlu_anatomy": ("Answer:", 1)}
FEWSHOT_SPLIT = {"hellaswag": "train", "piqa": "train", "winogrande": "train", "arc_challenge": "train",
                 "mmlu_anatomy": "dev"}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return write_stock_copies(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """The same copies without train / dev splits."""
    return write_stock_copies(tmp_path_factory.mktemp("bare"), fewshot=False, mmlu_group=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def lm(model_dir):
    import torch

    from ouro_lab.harness import OuroLM

    torch.set_num_threads(1)
    return OuroLM(path=str(model_dir), batch_size=8)


def _run(lm, ts, names):
    from ouro_lab.harness import metric_rows, run_evaluate

    res = run_evaluate(lm, ts, names, bootstrap_iters=0)
    return res, {(r["task"], r["metric"]): r["value"] for r in metric_rows(res)}


def test_every_stock_task_runs_zero_and_two_shot(full, bare, lm):
    """Full copies at 2-shot (mmlu's examples first_n from dev) and copies without
    the few-shot split at 0-shot: every task builds, scores its split, and the prompts hold
    the asked number of examples."""
    from ouro_lab.tasks import TaskSet

    for root, shots in ((full, 2), (bare, 0)):
        ts = TaskSet(STOCK, data_root=root, limit=2, num_fewshot=shots)
        res, rows = _run(lm, ts, STOCK)
        for name in STOCK:
            assert 0 <= rows[(name, "acc")] <= 1, name
            assert res["n-samples"][name]["effective"] == 2
            ctx = res["samples"][name][0]["arguments"][0][0]
            assert ctx.count(DELIM[name][0]) == shots + DELIM[name][1], (name, ctx)
        assert ts.tasks["mmlu_anatomy"].config.test_split == "test"
    # 0-shot never needed the missing splits; lm-eval was told they are absent
    hellaswag = TaskSet(["hellaswag"], data_root=bare, num_fewshot=0).tasks["hellaswag"]
    assert hellaswag.config.training_split is None


@pytest.mark.parametrize("name", STOCK)
def test_n_shot_without_the_split_is_one_line(bare, name):
    from ouro_lab.errors import OuroLabError
    from ouro_lab.tasks import TaskSet

    with pytest.raises(OuroLabError) as e:
        TaskSet([name], data_root=bare, num_fewshot=3)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}: 3-shot")
    assert f"split {FEWSHOT_SPLIT[name]!r}" in msg and "num_fewshot: 0" in msg


def test_mmlu_group_aggregates_and_names_a_missing_subject(full, lm):
    from ouro_lab.errors import OuroLabError
    from ouro_lab.tasks import TaskSet

    ts = TaskSet(["mmlu_humanities"], data_root=full, limit=1, num_fewshot=1)
    subjects = mmlu_subjects("mmlu_humanities")
    assert sorted(ts.tasks) == sorted(f"mmlu_{s}" for s in subjects)
    res, rows = _run(lm, ts, list(ts.tasks))
    group = rows[("mmlu_humanities", "acc")]
    leaves = [rows[(f"mmlu_{s}", "acc")] for s in subjects]
    assert group == pytest.approx(sum(leaves) / len(leaves))  # one doc each: size-weighted = mean
    with pytest.raises(OuroLabError, match=r"^mmlu_\w+: the local copy .* has no config '\w+'"):
        TaskSet(["mmlu"], data_root=full, limit=1)  # only humanities (and anatomy) are there


def test_copies_without_card_header(tmp_path, lm):
    """Config folders without the card's `configs:` header (files copied by hand, or the
    hub's refs/convert/parquet branch) load from their folder; the same split rules apply."""
    from ouro_lab.errors import OuroLabError
    from ouro_lab.tasks import TaskSet

    for convert in (False, True):
        root = tmp_path / f"c{int(convert)}"
        write_hub_dataset(root / "allenai" / "ai2_arc", {"ARC-Challenge": {
            "train": arc_rows(3), "validation": arc_rows(2, 10), "test": arc_rows(4, 20)}},
            header=False, convert_layout=convert)
        ts = TaskSet(["arc_challenge"], data_root=root, limit=3, num_fewshot=2)
        res, rows = _run(lm, ts, ["arc_challenge"])
        assert res["n-samples"]["arc_challenge"]["effective"] == 3
        assert res["samples"]["arc_challenge"][0]["arguments"][0][0].count("Question:") == 3
    # a task without a config (hellaswag): datasets takes the splits from the file names
    write_hub_dataset(root / "Rowan" / "hellaswag", {None: {"train": hellaswag_rows(3),
                                                            "validation": hellaswag_rows(2)}}, header=False)
    res, _ = _run(lm, TaskSet(["hellaswag"], data_root=root, num_fewshot=1), ["hellaswag"])
    assert res["n-samples"]["hellaswag"]["effective"] == 2
    with pytest.raises(OuroLabError, match=r"arc_easy: the local copy .* no config 'ARC-Easy'.*hf download"):
        TaskSet(["arc_easy"], data_root=root)
    write_hub_dataset(tmp_path / "t" / "allenai" / "ai2_arc", {"ARC-Easy": {"train": arc_rows(3)}})
    with pytest.raises(OuroLabError, match=r"arc_easy: split 'test' \(the documents it scores\) is missing"):
        TaskSet(["arc_easy"], data_root=tmp_path / "t", num_fewshot=0)


RECIPE = """# ouro-lab sweep {path}
model: {{path: {model}, threads: 1}}
tasks: {{names: [piqa], num_fewshot: 2, limit: 2{root}}}
strategies: [{{name: threshold, grid: {{q: 0.5}}}}]
"""


@pytest.mark.parametrize("command", ["eval", "validate", "sweep"])
def test_cli_refuses_n_shot_without_the_split(bare, model_dir, tmp_path, monkeypatch, capsys, command):
    """`tasks.data_root` (relative to the recipe) in validate and sweep; --data-root in eval."""
    if command == "eval":
        args = ["eval", model_dir, "--tasks", "piqa", "--num-fewshot", "2", "--data-root", bare]
    else:
        (tmp_path / "data").symlink_to(bare)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(RECIPE.format(path=recipe, model=model_dir, root=", data_root: data"))
        args = [command, recipe, f"output={tmp_path / 'out'}"]
    r = run_cli(monkeypatch, capsys, *args)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "piqa: 2-shot prompts take their examples from split 'train'" in line
    if command != "eval":
        assert "tasks.names[0]" in line


def test_recipe_data_root(full, model_dir, tmp_path, monkeypatch, capsys):
    """A recipe's data_root reaches the tasks (validate builds them and counts the requests);
    a missing folder is one line naming the field."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(path=recipe, model=model_dir, root=f", data_root: {full}"))
    r = run_cli(monkeypatch, capsys, "validate", recipe)
    assert r.returncode == 0, r.stderr
    assert "piqa" in r.stdout and "valid" in r.stdout  # validate's result goes to stdout
    recipe.write_text(RECIPE.format(path=recipe, model=model_dir, root=", data_root: nowhere"))
    r = run_cli(monkeypatch, capsys, "validate", recipe)
    assert r.returncode == 2 and "tasks.data_root" in r.stderr and "nowhere: no such folder" in r.stderr


def test_copies_with_the_same_name_never_share_a_cache(tmp_path):
    """datasets names a local folder's cache after the folder and config alone: a second copy
    called ai2_arc (another data root, or the same one rewritten) must not read the first's."""
    import os

    from ouro_lab.tasks import TaskSet

    def copy(root, n):
        write_hub_dataset(root / "allenai" / "ai2_arc", {"ARC-Easy": {"train": arc_rows(3),
                                                                      "test": arc_rows(n, 20)}})
        return root

    a, b = copy(tmp_path / "a", 3), copy(tmp_path / "b", 5)
    assert len(TaskSet(["arc_easy"], data_root=a).tasks["arc_easy"].eval_docs) == 3
    assert len(TaskSet(["arc_easy"], data_root=b).tasks["arc_easy"].eval_docs) == 5
    copy(a, 4)  # rewritten in place
    test = a / "allenai" / "ai2_arc" / "ARC-Easy" / "test-00000-of-00001.parquet"
    os.utime(test, ns=(test.stat().st_atime_ns, test.stat().st_mtime_ns + 1))
    assert len(TaskSet(["arc_easy"], data_root=a).tasks["arc_easy"].eval_docs) == 4
