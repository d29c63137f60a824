"""Bad input on the command line: one line naming the file, the field and the fix, exit 2,
no traceback, and (output folders, counts) refused before any work."""

import json
from pathlib import Path

import pytest
from cli_helpers import cli, run_cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "ouro_lab" / "builtin" / "loop-demo"
TASKS = ROOT / "tasks"
DEVICE_FIX = "use cpu, cuda, cuda:N, mps or auto"


def one_line(out, *words):
    """The command failed with exit 2 and one `error:` line holding every word."""
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def blocker(tmp_path):
    """A plain file where a folder is expected (permissions would not stop root)."""
    f = tmp_path / "a-file"
    f.write_text("not a folder\n")
    return f


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("cmd", [["inspect"], ["trace", "--ids", "1 2 3"],
                                 ["eval", "--tasks", "loop_demo_mc", "--limit", "2"]])
@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_unknown_device_is_one_line(monkeypatch, capsys, cmd, device):
    out = run_cli(monkeypatch, capsys, cmd[0], DEMO, *cmd[1:], "--device", device)
    one_line(out, f"device {device!r}: {DEVICE_FIX}")


def test_unknown_device_in_the_library_and_lm_eval_model_args():
    from ouro_lab.errors import OuroLabError
    from ouro_lab.lm import OuroLM
    from ouro_lab.loading import load_model

    with pytest.raises(OuroLabError, match=f"^device 'tpu': {DEVICE_FIX}$"):
        load_model(DEMO, device="tpu")
    with pytest.raises(OuroLabError, match=f"^device 'gpu0': {DEVICE_FIX}$"):
        OuroLM(path=str(DEMO), device="gpu0")  # what `--model_args path=...,device=gpu0` builds


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("cmd, under", [
    (["trace", DEMO, "--text", "7 =", "--out"], ""),
    (["trace", DEMO, "--text", "7 =", "--out"], "sub"),
    (["schema", "--out"], "x.json"),
    (["eval", DEMO, "--tasks", "loop_demo_mc", "--include_path", TASKS, "--limit", "3", "--out"], "sub"),
])
def test_output_path_through_a_file_is_refused_before_any_work(monkeypatch, capsys, blocker, cmd, under):
    import ouro_lab.loading as loading

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(loading, "load_model", no_model)
    out = run_cli(monkeypatch, capsys, *cmd, blocker / under if under else blocker)
    one_line(out, "--out: ", f"{blocker} is a file, not a folder", "choose another folder with --out")


def test_schema_out_that_is_a_folder(monkeypatch, capsys, tmp_path):
    out = run_cli(monkeypatch, capsys, "schema", "--out", tmp_path)
    one_line(out, f"schema --out: {tmp_path} is a folder; give a file path")
    assert run_cli(monkeypatch, capsys, "schema", "--out", tmp_path / "s.json").returncode == 0
    assert json.loads((tmp_path / "s.json").read_text())["title"] == "ouro-lab sweep recipe"


# --------------------------------------------------------------------------- counts and flags


@pytest.mark.parametrize("args, words", [
    (["sweep", "r.yaml", "--seed", "abc"], "error: ouro-lab sweep: Invalid value for '--seed'"),
    (["sweep"], "error: ouro-lab sweep: Missing argument 'recipe'. (see `ouro-lab sweep --help`)"),
    (["nope"], "error: ouro-lab: No such command 'nope'."),
])
def test_the_cli_parsers_own_refusals_are_one_line(monkeypatch, capsys, args, words):
    """typer's usage block (usage, a hint, a boxed error) is one line too, exit 2."""
    one_line(run_cli(monkeypatch, capsys, *args), words)
    assert run_cli(monkeypatch, capsys, "sweep", "--help").returncode == 0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc")
def test_a_path_the_file_system_refuses_is_one_line(monkeypatch, capsys):
    """/proc passes the writability check (root may write there) but refuses new folders."""
    out = run_cli(monkeypatch, capsys, "trace", DEMO, "--ids", "1 2 3", "--out", "/proc/ouro-lab-test")
    one_line(out, "error: /proc/ouro-lab-test: No such file or directory; choose another path")


def test_schema_default_folder_is_made(monkeypatch, capsys, tmp_path):
    """The README's `ouro-lab schema` from a folder without recipes/ (it crashed)."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(monkeypatch, capsys, "schema").returncode == 0
    assert (tmp_path / "recipes" / "recipe.schema.json").is_file()


@pytest.mark.parametrize("text, words", [
    ("", "--text '': no tokens to inspect"),
    ("abc", "has no tokenizer, so --text takes token ids like '1 2 3'"),
    ("1 2 99", "token id 99 is out of the vocabulary (0..17)"),
])
def test_inspect_text_is_one_line(monkeypatch, capsys, tmp_path, text, words):
    import shutil

    bare = tmp_path / "bare"  # the demo checkpoint without its tokenizer
    shutil.copytree(DEMO, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    vocab = json.loads((bare / "config.json").read_text())["vocab_size"]
    out = run_cli(monkeypatch, capsys, "inspect", bare, "--text", text.replace("99", str(vocab)))
    one_line(out, words.replace("99", str(vocab)).replace("17", str(vocab - 1)))


@pytest.mark.parametrize("edit, words", [
    ("{not json", "config.json: not valid JSON"),
    ("[1, 2]", "config.json: must hold a JSON object"),
    (None, "field total_ut_steps must be a positive integer, got 'four'"),
])
def test_a_broken_config_is_one_line_in_validate(monkeypatch, capsys, tmp_path, edit, words):
    import shutil

    ck = shutil.copytree(DEMO, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(edit if edit else json.dumps({**cfg, "total_ut_steps": "four"}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace(str(DEMO), str(ck)))
    one_line(run_cli(monkeypatch, capsys, "validate", recipe), "model.path", words)


@pytest.mark.parametrize("grid, words", [
    ("{name: random, grid: {mean_steps: 9}}", "strategies[0].grid.mean_steps: mean_steps 9 is past the "
                                              "model's 4 loop steps"),
    ("{name: kl, grid: {min_step: 7}}", "strategies[0].grid.min_step: min_step 7 is past"),
    ("{name: budget, grid: {mean_steps: 0.5}}", "parameter mean_steps must be >= 1 (1-based), got 0.5"),
    ("{name: threshold, grid: {q: [0.5, 1.5]}}", "parameter q is a probability: use 0..1, got 1.5"),
    ("{name: confidence, grid: {tau: -1}}", "parameter tau is a probability: use 0..1, got -1"),
    ("{name: hidden_delta, grid: {min_step: -3}}", "parameter min_step must be >= 1 (1-based), got -3"),
])
def test_parameters_out_of_range_are_refused_by_validate(monkeypatch, capsys, tmp_path, grid, words):
    """They passed validate, then failed after the trace pass (random, budget) or ran as
    nonsense (a threshold above 1 never exits)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("{name: threshold, grid: {q: [0.5]}}", grid))
    one_line(run_cli(monkeypatch, capsys, "validate", recipe), words)


def test_a_default_counted_in_steps_is_not_refused(monkeypatch, capsys, tmp_path):
    """Only what the grid gives is checked against the depth: kl's default min_step 2 on a
    model cut to one step runs (to full depth), it is not refused at a field the YAML lacks."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace(f"{{path: {DEMO}}}", f"{{path: {DEMO}, steps: 1}}")
                      .replace("{name: threshold, grid: {q: [0.5]}}", "{name: kl}"))
    out = run_cli(monkeypatch, capsys, "validate", recipe)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args, words", [
    (["--kv-policy", "nope"], "eval: --kv-policy 'nope' unknown; use one of full, copy, last"),
    (["--steps", "0"], "eval: --steps 0: give a whole number >= 1"),
    (["--num-fewshot", "-1"], "eval: --num-fewshot -1: give a whole number >= 0"),
    (["--sample", "0"], "--sample 0: give a whole number of documents, >= 1"),
    (["--sample", "2.5"], "--sample 2.5: give a whole number of documents, >= 1"),
    (["--limit", "0.5"], "--limit 0.5: give a whole number of documents, >= 1"),
    (["--limit", "0"], "--limit 0: give a whole number of documents, >= 1"),
    (["--limit", "5", "--param", "q=1"], "--param q=1: --param needs --strategy"),
])
def test_eval_counts_and_params(monkeypatch, capsys, args, words):
    out = run_cli(monkeypatch, capsys, "eval", DEMO, "--tasks", "loop_demo_mc", "--include_path", TASKS,
                  *args)
    one_line(out, words)


def test_sweep_limit_is_a_whole_number_and_its_help_says_so(monkeypatch, capsys):
    out = run_cli(monkeypatch, capsys, "sweep", ROOT / "recipes" / "demo.yaml", "--dry-run", "--limit", "0.5")
    one_line(out, "--limit 0.5: give a whole number of documents, >= 1")
    for cmd in ("sweep", "eval"):
        out = run_cli(monkeypatch, capsys, cmd, "--help")
        assert "fraction" not in out.stdout and "the first N documents" in " ".join(out.stdout.split())


def test_taskset_sample_below_one_is_refused():
    from ouro_lab.tasks import TaskError, TaskSet

    with pytest.raises(TaskError, match="sample must be a whole number >= 1"):
        TaskSet(["loop_demo_mc"], include_path=[TASKS], sample=0)  # sample([]) would score every document


# --------------------------------------------------------------------------- task files


RECIPE = f"""# ouro-lab sweep r.yaml
model: {{path: {DEMO}}}
tasks: {{names: [loop_demo_mc], include: [{TASKS}]}}
strategies:
  - {{name: threshold, grid: {{q: [0.5]}}}}
"""


def _task_folder(tmp_path) -> Path:
    """One broken task of each kind, made from the demo task's YAML."""
    d = tmp_path / "tasks"
    d.mkdir()
    src = (TASKS / "loop_demo_mc.yaml").read_text()
    good = "".join((TASKS / "data" / "loop_demo_mc.jsonl").read_text().splitlines(True)[:3])
    (d / "good.jsonl").write_text(good)
    (d / "broken.jsonl").write_text(good + '{"prompt": oops}\n')
    (d / "bad_yaml.yaml").write_text(src.replace("loop_demo_mc", "bad_yaml")
                                     .replace("test_split: test", "test_split: a: b"))
    (d / "no_field.yaml").write_text(src.replace("task: loop_demo_mc", "task: no_field")
                                     .replace("data/loop_demo_mc.jsonl", "good.jsonl")
                                     .replace("{{prompt}}", "{{question}}"))
    (d / "bad_jsonl.yaml").write_text(src.replace("task: loop_demo_mc", "task: bad_jsonl")
                                      .replace("data/loop_demo_mc.jsonl", "broken.jsonl"))
    (d / "label.jsonl").write_text(good.replace('"label": 1,', '"label": 42,'))  # past the 10 choices
    (d / "bad_label.yaml").write_text(src.replace("task: loop_demo_mc", "task: bad_label")
                                      .replace("data/loop_demo_mc.jsonl", "label.jsonl"))
    return d


@pytest.fixture
def no_bars():
    """datasets' "Generating split" bars: a fresh `ouro-lab` process has them off (TQDM_DISABLE,
    read when tqdm is imported); in this process an earlier test imported tqdm first."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def test_broken_task_files_name_the_file_and_the_fix(monkeypatch, capsys, tmp_path, no_bars):
    recipe, d = tmp_path / "r.yaml", _task_folder(tmp_path)
    recipe.write_text(RECIPE)
    src_line = (TASKS / "loop_demo_mc.yaml").read_text().splitlines().index("test_split: test") + 1
    cases = {
        "bad_yaml": f"task 'bad_yaml' not found in {d}; {d / 'bad_yaml.yaml'}:{src_line}: not valid YAML",
        "no_field": "its template reads the field 'question', which its documents lack; fix the YAML's "
                    "doc_to_text",
        "bad_jsonl": f"data file {d / 'broken.jsonl'}:4: not valid JSON Lines",
        "bad_label": "its documents do not build (IndexError: list index out of range); check the data "
                     "against its YAML (doc_to_text, doc_to_target, doc_to_choice), or drop the task",
    }
    for name, words in cases.items():
        out = run_cli(monkeypatch, capsys, "validate", recipe, f"tasks.names=[{name}]",
                      f"tasks.include=[{d}]")
        msg = one_line(out, f"{recipe}: override tasks.names=[{name}]: tasks.names[0]: ", words)
        assert "add documents or drop the task" not in msg
    # a task missing from a folder where an unrelated YAML is broken: that file is not blamed
    out = run_cli(monkeypatch, capsys, "validate", recipe, "tasks.names=[nope]", f"tasks.include=[{d}]")
    assert "bad_yaml.yaml" not in one_line(out, "task 'nope' not found")


# --------------------------------------------------------------------------- lm-eval


def test_lm_eval_unknown_task_is_one_line():
    # a subprocess: lm-eval's CLI sets up logging handlers on the stderr of the moment
    out = cli("lm-eval", "--model", "ouro-lab", "--model_args", f"path={DEMO}", "--tasks", "nope_task",
              "--include_path", TASKS)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    err = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert err == [f"error: --tasks nope_task: no such task in lm-eval's tasks or --include_path {TASKS}; "
                   f"check the name with `ouro-lab lm-eval ls tasks --include_path {TASKS}`, or add the "
                   "folder holding its YAML with --include_path DIR"]


def test_sweep_without_a_tokenizer_or_with_a_too_long_out_is_one_line(monkeypatch, capsys, tmp_path, no_bars):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(DEMO, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = run_cli(monkeypatch, capsys, "sweep", recipe, f"model.path={bare}", "--out", tmp_path / "a")
    one_line(out, "model.path: ", "no tokenizer.json or tokenizer_config.json; a sweep's tasks are text: add "
                  "the checkpoint's tokenizer files")
    out = run_cli(monkeypatch, capsys, "sweep", recipe, "--out", tmp_path / ("a" * 300))
    one_line(out, "not usable as an output folder (File name too long)")


def test_settings_that_cannot_decode_generation_are_said(monkeypatch, capsys, tmp_path, no_bars):
    """On a generation task, a per-continuation, calibrated or oracle setting cannot run: the
    sweep says which and why (they were dropped without a word)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("loop_demo_mc", "loop_demo_gen").replace(
        "{name: threshold, grid: {q: [0.5]}}", "{name: threshold, grid: {q: [0.5]}, granularity: sequence}\n"
        "  - {name: oracle}") + "bootstrap: 10\n")
    monkeypatch.setenv("OURO_LAB_CACHE", str(tmp_path / "cache"))
    out = run_cli(monkeypatch, capsys, "sweep", recipe, "tasks.limit=2", "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr
    err = " ".join(out.stderr.split())
    said = "not run on loop_demo_gen (generation decodes live, and it"
    assert f"threshold(q=0.5)/seq: {said} decides once per continuation" in err
    assert f"oracle(): {said} selects a step per document" in err
