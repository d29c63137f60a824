"""Tables a user plots in three lines and per-sample logs in lm-eval's format, from sweep,
eval and `ouro-lab lm-eval` alike; the README's metrics snippet run on a real run."""

import json
import re
import shutil

import pandas as pd
import pytest
import sweep_helpers
from cli_helpers import ROOT, cli, run_cli

LM_EVAL_KEYS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                "doc_hash", "prompt_hash", "target_hash"}


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    return sweep_helpers.finished_run(tmp_path_factory.getbasetemp() / "lab")


def test_metrics_columns_plot_in_three_lines(run1):
    m = pd.read_csv(run1 / "metrics.csv")
    assert not {"mode", "filter"} & set(m.columns)  # no clash with DataFrame.mode / .filter
    assert (m[m.run_mode == "replay"].run_mode == "replay").all()
    # one primary metric per task, named apart from its filter
    prim = m[m.primary].groupby("task").metric_key.unique().to_dict()
    assert {k: list(v) for k, v in prim.items()} == {"tiny_mc": ["acc"], "tiny_gen": ["exact_match,first"]}
    gen = m[m.task == "tiny_gen"]
    assert set(gen.metric) == {"exact_match"} and set(gen.filter_name) == {"first"}
    assert (m.metric_key == [k if f == "none" else f"{k},{f}" for k, f in zip(m.metric, m.filter_name,
                                                                             strict=True)]).all()
    # one numeric column per parameter beside the JSON
    for _, r in m.iterrows():
        for k, v in json.loads(r.params).items():
            assert r[f"param_{k}"] == v or (v is None and pd.isna(r[f"param_{k}"]))
    assert m.param_q.dtype.kind == "f" and m.param_step.dropna().isin([1, 2, 3, 4]).all()
    # live rows: prompt-inclusive FLOPs and measured seconds per token; replay rows have neither
    live, replay = m[m.run_mode == "live"], m[m.run_mode == "replay"]
    assert (live.flops_total_per_token >= live.flops_executed_per_token).all()
    gen = live[live.task == "tiny_gen"]
    assert (gen.flops_total_per_token > gen.flops_executed_per_token).all()  # the prompt's prefill
    assert (live.seconds_per_token > 0).all() and replay.seconds_per_token.isna().all()
    assert replay.flops_total_per_token.isna().all()


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README: one python block with {marker!r}"
    return found[0]


def test_readme_metrics_snippet_runs_on_a_real_run(run1, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    code = _readme_block("metrics.csv")
    body = [line for line in code.splitlines() if line.strip() and not line.startswith(("import", "#"))]
    assert len(body) == 3, body  # three lines, imports apart
    code = code.replace("results/demo/RUN_ID", str(run1)).replace("loop_demo_mc", "tiny_mc")
    code += f"\nplt.savefig({str(tmp_path / 'fig.png')!r})\n"
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    ax = scope["plt"].gca()
    m = pd.read_csv(run1 / "metrics.csv")
    d = m[m.primary & (m.run_mode == "replay") & (m.task == "tiny_mc")]
    assert len(ax.lines) == d.strategy.nunique() and (tmp_path / "fig.png").stat().st_size > 5000
    scope["plt"].close("all")


def test_readme_python_snippets_run_as_written(monkeypatch, tmp_path):
    """The model snippet (it defines `ids`) and the step-by-step one, from the repository root."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OURO_LAB_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(_readme_block("out.step_hidden"), "README.md", "exec"), scope)
    assert "ids" in scope and scope["out"].step_hidden.shape[0] == 4
    scope = {}
    exec(compile(_readme_block("trace_pass(model"), "README.md", "exec"), scope)
    assert {m["task"] for m in scope["metrics"]} == {"loop_demo_mc"} and scope["live"]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_sweep_writes_lm_eval_samples_per_task_and_setting(run1):
    root = run1 / "samples"
    settings = {p.name for p in (root / "replay").iterdir()}
    assert {"fixed(step=4)", "threshold(q=0.6)", "budget(mean_steps=1.5)"} <= settings
    assert "oracle()" not in settings  # composed from the fixed steps' documents: no lm-eval run of its own
    assert {p.name for p in (root / "live" / "threshold(q=0.6)").iterdir()} == {
        "samples_tiny_mc.jsonl", "samples_tiny_gen.jsonl"}
    s = pd.read_parquet(run1 / "samples.parquet")
    setting = "threshold(q=0.6)"
    for mode, task in (("replay", "tiny_mc"), ("live", "tiny_gen"), ("live", "tiny_mc")):
        lines = _lines(root / mode / setting / f"samples_{task}.jsonl")
        assert len(lines) == 8 and all(set(x) >= LM_EVAL_KEYS for x in lines)
        rows = s[(s.task == task) & (s.setting == setting) & (s.run_mode == mode)].set_index("doc_id")
        key = "acc" if task == "tiny_mc" else "exact_match"
        for x in lines:
            info = x["ouro_lab"]
            assert info["setting"] == setting and info["run_mode"] == mode and info["params"] == {"q": 0.6}
            r = rows.loc[x["doc_id"]]
            assert x[key] == r[key if task == "tiny_mc" else "exact_match,first"]
            assert info["steps_used"] == pytest.approx(r.steps_used) and info["tokens"] == r.tokens
            assert info["flops_executed_per_token"] == pytest.approx(r.flops_executed_per_token)
            if mode == "replay":
                assert len(info["exit_steps"]) == r.tokens
                assert sum(info["exit_steps"]) / r.tokens == pytest.approx(r.steps_used)
    gen = _lines(root / "live" / "threshold(q=0.6)" / "samples_tiny_gen.jsonl")[0]
    assert gen["filter"] == "first" and isinstance(gen["resps"][0][0], str)
    assert "gen_args_0" in gen["arguments"]


def test_replayed_samples_equal_lm_eval_own(run1, tmp_path):
    """The full-depth replay's JSONL says what lm-eval's own --log_samples says for the model."""
    from lm_eval.evaluator import evaluate

    from ouro_lab.lm import OuroLM
    from ouro_lab.sample_log import jsonl
    from ouro_lab.tasks import TaskSet

    lab = run1.parent
    ts = TaskSet(["tiny_mc"], include_path=[lab / "tasks"], limit=8)
    res = evaluate(lm=OuroLM(path=str(lab / "ckpt"), batch_size=16), task_dict=ts.task_dict, limit=8,
                   log_samples=True, bootstrap_iters=0)
    theirs = [json.loads(x) for x in jsonl(res["samples"]["tiny_mc"]).splitlines()]
    ours = _lines(run1 / "samples" / "replay" / "fixed(step=4)" / "samples_tiny_mc.jsonl")
    for a, b in zip(theirs, ours, strict=True):
        b.pop("ouro_lab")
        assert {k: v for k, v in a.items() if k not in ("resps", "filtered_resps")} == \
               {k: v for k, v in b.items() if k not in ("resps", "filtered_resps")}
        for ra, rb in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            assert float(ra[0]) == pytest.approx(float(rb[0]), abs=1e-5) and ra[1] == rb[1]


def test_a_missing_samples_file_is_rewritten_on_resume(run1, tmp_path):
    from ouro_lab.sweep import run_sweep

    run = tmp_path / "run"
    shutil.copytree(run1, run)
    gone = run / "samples" / "replay" / "threshold(q=0.3)" / "samples_tiny_mc.jsonl"
    before = gone.read_text()
    gone.unlink()
    run_sweep(run1.parent / "r.yaml", out=run)
    assert gone.read_text() == before


def test_eval_writes_the_sweep_columns_and_lm_eval_samples(run1, tmp_path, monkeypatch, capsys):
    lab = run1.parent
    out = run_cli(monkeypatch, capsys, "eval", lab / "ckpt", "--tasks", "tiny_mc,tiny_gen",
                  "--include_path", lab / "tasks", "--limit", "4", "--strategy", "threshold", "-p", "q=0.6",
                  "--output_path", tmp_path / "o", "--log_samples", "--threads", "1", "--seed", "7")
    assert out.returncode == 0, out.stderr
    assert "eval: trace pass over 1 loglikelihood task(s): done in" in out.stderr
    assert "tiny_mc" in out.stdout and "wrote" not in out.stdout  # results on stdout, the rest on stderr
    m = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert {"primary", "metric", "filter_name", "metric_key", "param_q"} <= set(m.columns)
    assert set(m[m.primary].metric_key) == {"acc", "exact_match,first"} and (m.param_q == 0.6).all()
    s = pd.read_parquet(tmp_path / "o" / "samples.parquet")
    assert {"task", "doc_id", "filter_name", "steps_used"} <= set(s.columns)
    for task, mode in (("tiny_mc", "replay"), ("tiny_gen", "live")):
        lines = _lines(tmp_path / "o" / f"samples_{task}.jsonl")
        assert len(lines) == 4 and all(set(x) >= LM_EVAL_KEYS for x in lines)
        assert {x["ouro_lab"]["run_mode"] for x in lines} == {mode}
        assert all(x["ouro_lab"]["strategy"] == "threshold" and x["ouro_lab"]["steps_used"] >= 1
                   for x in lines)
    bad = run_cli(monkeypatch, capsys, "eval", lab / "ckpt", "--tasks", "tiny_mc", "--log_samples")
    assert bad.returncode == 2 and "--output_path" in bad.stderr


@pytest.mark.parametrize("strategy", [None, "threshold"])
def test_sampled_documents_are_logged_by_their_file_index(run1, tmp_path, monkeypatch, capsys, strategy):
    """Under --sample, lm-eval logs a document by its index in the data file; so do our
    samples JSONL (direct, replayed and live), with our 0..n-1 numbering (samples.parquet's
    doc_id) kept in `ouro_lab.doc_id`."""
    lab = run1.parent
    more = ["--strategy", strategy, "-p", "q=0.6"] if strategy else []
    out = run_cli(monkeypatch, capsys, "eval", lab / "ckpt", "--tasks", "tiny_mc,tiny_gen", "--include_path",
                  lab / "tasks", "--sample", "3", *more, "--output_path", tmp_path / "o", "--log_samples",
                  "--threads", "1")
    assert out.returncode == 0, out.stderr
    for task in ("tiny_mc", "tiny_gen"):
        docs = [json.loads(x) for x in (lab / "tasks" / task / "test.jsonl").read_text().splitlines()]
        lines = _lines(tmp_path / "o" / f"samples_{task}.jsonl")
        assert len(lines) == 3
        assert sorted(x["ouro_lab"]["doc_id"] for x in lines) == [0, 1, 2]
        for x in lines:
            assert x["doc"] == docs[x["doc_id"]]
        assert max(x["doc_id"] for x in lines) > 2  # file indices, not 0..n-1


def test_lm_eval_reads_data_files_against_the_yaml_folder(run1, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from ouro_lab.lm_eval_cli import resolve_data_files

    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    resolve_data_files()
    tm = TaskManager(include_path=[str(run1.parent / "tasks")], include_defaults=False)
    task = tm.load(["tiny_mc"])["tasks"]["tiny_mc"]
    assert len(task.eval_docs) == 8


def test_lm_eval_samples_files_gain_compute(tmp_path):
    from ouro_lab.sample_log import annotate_lm_eval_files, record_compute

    f = tmp_path / "model" / "samples_tiny_mc_2026-01-01T00-00-00.000000.jsonl"
    f.parent.mkdir()
    f.write_text(json.dumps({"doc_id": 0, "acc": 1.0}) + "\n" + json.dumps({"doc_id": 1, "acc": 0.0}) + "\n")
    one = {"tokens": 2, "steps_used": 3, "steps_executed": 4, "flops": 10.0, "seconds": 1}
    records = {("tiny_mc", 0, 0): one, ("tiny_mc", 0, 1): {**one, "steps_used": 5, "steps_executed": 8,
                                                           "flops": 30.0}}
    annotate_lm_eval_files([f], record_compute(records), {"live": True})
    a, b = _lines(f)
    assert a["ouro_lab"] == {"live": True, "tokens": 4, "steps_used": 2.0, "steps_executed": 3.0,
                             "flops_total_per_token": 10.0, "seconds": 2} and a["acc"] == 1.0
    assert b["ouro_lab"] == {"live": True}
    # lm-eval's --samples [9, 5]: requests count the chosen documents 0..n-1, and lm-eval labels
    # the k-th of them with the k-th index given (9 for request doc 0, 5 for request doc 1)
    f.write_text(json.dumps({"doc_id": 9}) + "\n" + json.dumps({"doc_id": 5}) + "\n")
    records = {("tiny_mc", 0, 0): one, ("tiny_mc", 1, 0): {**one, "tokens": 1}}
    annotate_lm_eval_files([f], record_compute(records), {}, {"tiny_mc": [9, 5]})
    nine, five = _lines(f)
    assert (nine["ouro_lab"]["tokens"], five["ouro_lab"]["tokens"]) == (2, 1)


def test_cli_speaks_lm_eval(run1, monkeypatch, capsys):
    lab = run1.parent
    help_ = cli("sweep", "-h")
    assert help_.returncode == 0 and "<bool>" not in help_.stdout and "--output_path" in help_.stdout
    assert "--log_samples" in help_.stdout and "--include_path" in help_.stdout
    for cmd in ("eval", "inspect", "trace"):
        assert "<bool>" not in cli(cmd, "--help").stdout
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("ouro-lab 0.")
    out = run_cli(monkeypatch, capsys, "validate", lab / "r.yaml", "--json")
    plan = json.loads(out.stdout)  # stdout holds the result and nothing else
    assert plan["valid"] and plan["tasks"]["tiny_mc"]["documents"] == 8
    assert plan["settings"] == 12 and plan["replayed"] == 10  # 2 speculative settings decode only
    out = run_cli(monkeypatch, capsys, "sweep", lab / "r.yaml", "--dry-run", "--limit", "3", "--seed", "5")
    assert out.returncode == 0 and "task tiny_mc: multiple_choice, 3 of 8 documents" in out.stdout
    names = [s["name"] for s in json.loads(run_cli(monkeypatch, capsys, "strategies", "--json").stdout)]
    assert {"threshold", "kl", "oracle"} <= set(names)
    info = json.loads(run_cli(monkeypatch, capsys, "inspect", lab / "ckpt", "--json").stdout)
    assert info["steps"] == 4 and info["parameters"] > 0 and info["device"] == "cpu"
