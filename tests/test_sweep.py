"""`ouro-lab sweep` end to end on a tiny random model and tiny tasks: outputs, determinism,
trace reuse, resume after kill -9, the lock, and every bad input (one line, exit 2)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import sweep_helpers
from sweep_helpers import RECIPE, SPECULATIVE, cli

from ouro_lab.sweep import COLUMNS, RunLock, run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return sweep_helpers.lab(tmp_path_factory.getbasetemp() / "lab")


@pytest.fixture(scope="module")
def run1(lab, tmp_path_factory):
    return sweep_helpers.finished_run(lab)


def test_sweep_writes_every_output(run1):
    for f in ("metrics.csv", "samples.parquet", "exits.csv", "provenance.json", "report.md", "report.html",
              "summary.json", "recipe.yaml"):
        assert (run1 / f).is_file(), f
    m = pd.read_csv(run1 / "metrics.csv")
    params = [c for c in m.columns if c.startswith("param_")]
    assert [c for c in m.columns if c not in params] == COLUMNS
    assert params == ["param_draft", "param_draft_len", "param_draft_rule", "param_draft_step", "param_flops",
                      "param_mean_steps", "param_q", "param_signal", "param_step"]
    at = list(m.columns).index("params")
    assert list(m.columns)[at + 1:at + 1 + len(params)] == params
    for t in ("tiny_mc", "tiny_gen"):
        fixed = m[(m.task == t) & (m.strategy == "fixed")]
        assert sorted(fixed.params.map(lambda p: json.loads(p)["step"]).unique()) == [1, 2, 3, 4]
        full = m[(m.task == t) & m.is_full]
        assert len(full) and (full.delta_vs_full.abs() < 1e-12).all()
        assert (full.flops_rel.round(12) == 1.0).all()
    mc = m[(m.task == "tiny_mc") & (m.metric == "acc")]
    assert set(mc.strategy) == {"fixed", "threshold", "budget", "oracle"}
    assert set(mc["run_mode"]) == {"replay", "live"}  # threshold also ran live
    assert (mc.ci_low <= mc.value + 1e-12).all() and (mc.value <= mc.ci_high + 1e-12).all()
    f = mc[(mc.strategy == "fixed") & (mc["run_mode"] == "replay")].sort_values("flops_rel")
    assert f.steps_used_mean.tolist() == [1, 2, 3, 4] and f.flops_rel.is_monotonic_increasing
    oracle = mc[mc.strategy == "oracle"].iloc[0]  # per document the best fixed step, charged its FLOPs
    assert oracle.steps_executed_mean == oracle.steps_used_mean <= 4 and oracle.value >= f.value.max()
    gen = m[(m.task == "tiny_gen")]
    assert set(gen["run_mode"]) == {"live"} and "exact_match,first" in set(gen.metric_key)
    assert "oracle" in set(gen.strategy)  # composed from the live fixed-step runs
    s = pd.read_parquet(run1 / "samples.parquet")
    assert {"task", "setting", "run_mode", "doc_id", "acc", "steps_used", "flops_executed", "tokens",
            "difficulty"} <= set(s.columns)
    assert len(s[(s.task == "tiny_mc") & (s.setting == "fixed(step=1)") & (s["run_mode"] == "replay")]) == 8
    plots = {p.name for p in (run1 / "plots").iterdir()}
    assert {"tiny_mc_acc_vs_flops.png", "tiny_mc_exit_hist.png", "tiny_mc_by_difficulty.png",
            "accuracy_by_step.png", "tiny_gen_acc_vs_flops.png"} <= plots
    prov = json.loads((run1 / "provenance.json").read_text())
    assert prov["recipe"]["seed"] == 1234 and prov["dtype"] == "float32" and prov["device"] == "cpu"
    assert {"torch", "lm_eval", "python"} <= set(prov["versions"]) and prov["model_fingerprint"]
    assert "git_sha" in prov
    md = (run1 / "report.md").read_text()
    for heading in ("best strategy at each budget", "compute saved at <= 1 point loss",
                    "area under the curve", "replay versus live", "Provenance"):
        assert heading in md


def test_exits_count_from_one_and_cover_generation(run1, tmp_path):
    """exits.csv counts steps from 1, as steps_used and fixed's `step` do (it wrote fixed(step=1)
    as step 0), and generation tasks, decoded live, have counts too (they had none: their
    histogram was an empty frame under a legend of seven settings)."""
    from ouro_lab.report import read_run

    e = pd.read_csv(run1 / "exits.csv")
    assert list(e.columns) == ["task", "setting", "strategy", "run_mode", "exit_step", "count"]
    assert e.exit_step.between(1, 4).all()
    s = pd.read_parquet(run1 / "samples.parquet")
    for task, mode in (("tiny_mc", "replay"), ("tiny_gen", "live")):
        for k in (1, 4):
            d = e[(e.task == task) & (e.setting == f"fixed(step={k})") & (e.run_mode == mode)]
            assert d.exit_step.tolist() == [k], (task, k)
    live = e[(e.task == "tiny_gen") & (e.setting == "threshold(q=0.6)")]
    docs = s[(s.task == "tiny_gen") & (s.setting == "threshold(q=0.6)") & (s.run_mode == "live")]
    assert len(live) and live["count"].sum() == docs.drop_duplicates("doc_id").tokens.sum() > 0
    m = pd.read_csv(run1 / "metrics.csv")
    row = m[(m.task == "tiny_gen") & (m.setting == "threshold(q=0.6)") & (m.run_mode == "live")].iloc[0]
    assert (live.exit_step * live["count"]).sum() / live["count"].sum() == pytest.approx(row.steps_used_mean)
    assert (run1 / "plots" / "tiny_gen_exit_hist.png").is_file()
    import shutil

    copy = shutil.copytree(run1, tmp_path / "old_run")  # a run written before: steps from 0
    e.drop(columns="exit_step").assign(step=e.exit_step - 1).to_csv(copy / "exits.csv", index=False)
    assert read_run(copy, verify=False)["exits"].exit_step.tolist() == e.exit_step.tolist()


def test_live_rows_carry_measured_seconds_and_speculative_rows_equal_full_depth(run1, monkeypatch):
    """Every live generation row has decode and prefill seconds per token (same batch plan)
    and its measured speed-up over full depth; speculative settings score exactly what full
    depth scores, at >= R steps per token, with their acceptance; the report and a plot
    put the measured speed beside the FLOPs."""
    m = pd.read_csv(run1 / "metrics.csv")
    live = m[(m.task == "tiny_gen") & (m.run_mode == "live")]
    assert live[live.kind == "select"].decode_s_per_token.isna().all()  # composed (the oracle): not run
    gen = live[live.kind != "select"]
    assert (gen.decode_s_per_token > 0).all() and (gen.prefill_s_per_token > 0).all()
    assert gen.decode_speedup.notna().all() and m[m.run_mode == "replay"].decode_s_per_token.isna().all()
    full = gen[gen.is_full.astype(bool)]
    assert (full.decode_speedup.round(12) == 1).all()
    spec = gen[gen.strategy == "speculative"]
    labels = [f"speculative(draft=fixed(step=1),draft_len={n})" for n in (2, 3)]
    assert sorted(spec.setting.unique()) == labels
    assert (spec.kind == "speculative").all() and (spec.kv_policy == "copy").all()
    for metric, d in spec.groupby("metric_key"):
        assert (d.value == full[full.metric_key == metric].value.iloc[0]).all()  # lossless
    assert spec.acceptance.between(0, 1).all() and (spec.steps_used_mean == 4).all()
    assert (spec.steps_executed_mean >= 4).all() and (spec.flops_rel >= 1).all()
    assert "speculative" not in set(m[m.task == "tiny_mc"].strategy)
    report = (run1 / "report.md").read_text()
    assert "tiny_gen: measured speed (live decoding)" in report and labels[0] in report
    # lossless and dearer in FLOPs: no "compute saved" row (it showed -91.7% on the demo), its
    # measured speed-up on a line of the result instead
    summary = json.loads((run1 / "summary.json").read_text())
    gen_t = summary["tasks"]["tiny_gen"]
    saved = {r["strategy"] for r in gen_t["saved"]}
    assert saved and "speculative" not in saved
    assert {r["setting"] for r in gen_t["speed"]} >= set(labels)
    assert "speculative" not in {c["strategy"] for c in gen_t["curves"]}  # no AUC over 100-400% FLOPs
    import io

    from rich.console import Console

    from ouro_lab import sweep

    buf = io.StringIO()
    monkeypatch.setattr(sweep, "stdout_console", lambda: Console(file=buf, width=200))
    sweep._summary(summary, run1)
    lines = [x for x in buf.getvalue().splitlines() if x.startswith(labels[0])]
    assert len(lines) == 1 and "output identical to full depth; measured decode speed-up" in lines[0]
    assert (run1 / "plots" / "tiny_gen_acc_vs_seconds.png").is_file()


def test_new_strategies_reuse_the_trace_and_same_recipe_twice_gives_identical_metrics(lab, run1):
    new = "  - {name: kl, grid: {eps: [0.05]}}\n  - {name: random, grid: {mean_steps: 2}}"
    (lab / "mc.yaml").write_text(RECIPE.format(name="mc.yaml").replace("  - {name: oracle}", new)
                                 .replace("tiny_mc, tiny_gen", "tiny_mc").replace(SPECULATIVE.format(), ""))
    a = run_sweep(lab / "mc.yaml", out=lab / "mc_a")
    prov = json.loads((a / "provenance.json").read_text())
    assert prov["trace"]["reused"] and prov["model_forward_calls"] == 0  # run1 traced these tasks
    assert json.loads((run1 / "provenance.json").read_text())["trace"]["forward_calls"] > 0
    assert {"kl", "random"} <= set(pd.read_csv(a / "metrics.csv").strategy)
    b = run_sweep(lab / "mc.yaml", out=lab / "mc_b")
    pd.testing.assert_frame_equal(sweep_helpers.untimed(a / "metrics.csv"),
                                  sweep_helpers.untimed(b / "metrics.csv"))
    wall = ["seconds"]  # wall-clock time of live runs is the one thing that may differ
    pd.testing.assert_frame_equal(pd.read_parquet(a / "samples.parquet").drop(columns=wall),
                                  pd.read_parquet(b / "samples.parquet").drop(columns=wall))


def test_a_changed_seed_or_task_reruns_what_it_changes_in_place(lab, run1, tmp_path):
    """Stored settings are keyed by what they were computed from: an interrupted run resumed
    with a new seed (random exits, the bootstrap), or a finished one rerun after its task was
    edited (its requests), gives what a fresh folder gives (the old rows came back before:
    provenance said seed 7 over seed-1234 rows). A finished run of another recipe is not
    replaced: one line."""
    import shutil

    shutil.copytree(lab / "tasks", tmp_path / "tasks")
    recipe = tmp_path / "s.yaml"
    recipe.write_text(f"""model: {{path: {lab / 'ckpt'}, dtype: float32, device: cpu, threads: 1}}
tasks: {{names: [tiny_mc, tiny_gen], include: [tasks], limit: 8}}
strategies:
  - {{name: random, grid: {{mean_steps: 2}}, live: true}}
bootstrap: 50
""")
    def metrics(d):
        return sweep_helpers.untimed(d / "metrics.csv")

    a = run_sweep(recipe, out=tmp_path / "a")
    before = (a / "metrics.csv").read_bytes()
    code, text = cli("sweep", recipe, "--out", a, "seed=7")
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "holds a finished run of another recipe (seed 1234 -> 7)" in lines[0]
    code, text = cli("sweep", recipe, "--out", a, "strategies.0.grid.mean_steps=[2, 3]")
    assert code == 2 and "(strategies.0.grid.mean_steps 2 -> [2, 3])" in text  # inside the list
    assert (a / "metrics.csv").read_bytes() == before
    (a / "provenance.json").unlink()  # as a run interrupted before its tables were written
    run_sweep(recipe, ["seed=7"], out=tmp_path / "a")
    fresh = run_sweep(recipe, ["seed=7"], out=tmp_path / "b")
    pd.testing.assert_frame_equal(metrics(a), metrics(fresh))
    first = run_sweep(recipe, out=tmp_path / "c")
    rnd = metrics(first).merge(metrics(fresh), on=["task", "setting", "run_mode", "metric_key"])
    rnd = rnd[rnd.strategy_x == "random"]
    assert len(rnd) and (rnd.steps_used_mean_x != rnd.steps_used_mean_y).any()  # the seed matters
    gen_yaml = tmp_path / "tasks" / "tiny_gen" / "tiny_gen.yaml"
    text = gen_yaml.read_text()
    gen_yaml.write_text(text.replace('doc_to_text: "{{question}}"', 'doc_to_text: "Q {{question}}"'))
    run_sweep(recipe, ["seed=7"], out=tmp_path / "a")
    edited = run_sweep(recipe, ["seed=7"], out=tmp_path / "d")
    pd.testing.assert_frame_equal(metrics(a), metrics(edited))
    # the answers alone (same requests, same trace): every score changes, nothing was reused
    for name, key in (("tiny_mc", "label"), ("tiny_gen", "answer")):
        f = tmp_path / "tasks" / name / "test.jsonl"
        docs = [json.loads(x) for x in f.read_text().splitlines()]
        for d in docs:
            d[key] = (d[key] + 1) % 3 if key == "label" else "one"
        f.write_text("".join(json.dumps(d) + "\n" for d in docs))
    run_sweep(recipe, ["seed=7"], out=tmp_path / "a")
    answers = run_sweep(recipe, ["seed=7"], out=tmp_path / "e")
    pd.testing.assert_frame_equal(metrics(a), metrics(answers))
    assert not metrics(answers)["value"].equals(metrics(edited)["value"])


def test_rerun_in_place_skips_finished_settings(lab, run1):
    before = {p.name: p.stat().st_mtime_ns for p in (run1 / "settings").iterdir()}
    run_sweep(lab / "r.yaml", out=run1)
    after = {p.name: p.stat().st_mtime_ns for p in (run1 / "settings").iterdir()}
    assert before == after  # nothing recomputed or rewritten
    assert json.loads((run1 / "provenance.json").read_text())["model_forward_calls"] == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_resume_after_interruption(lab, run1, sig):
    out = lab / f"stopped-{sig.name}"
    env = dict(os.environ, OURO_LAB_PROGRESS="0", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "ouro_lab.cli", "sweep", str(lab / "r.yaml"), "--out", str(out),
           "bootstrap=200"]
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if len(list((out / "settings").glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the sweep finished before it could be interrupted"
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:  # Ctrl-C: one line, exit 130, no traceback
        assert p.returncode == 130, err[-2000:]
        assert "interrupted" in err and "Traceback" not in err
    assert not (out / "metrics.csv").exists()
    done = len(list((out / "settings").glob("*.json")))
    assert done >= 3
    kept = {p.name: p.read_bytes() for p in (out / "settings").glob("[!.]*.json")}
    # the lock died with the process: the rerun takes it, skips what finished, completes
    code, text = cli("sweep", lab / "r.yaml", "--out", out, "bootstrap=200")
    assert code == 0, text[-2000:]
    assert "reused cached trace" in text
    assert all((out / "settings" / k).read_bytes() == v for k, v in kept.items())  # not redone
    pd.testing.assert_frame_equal(sweep_helpers.untimed(out / "metrics.csv"),
                                  sweep_helpers.untimed(run1 / "metrics.csv"))


def test_two_sweeps_on_one_folder_do_not_mix(lab, run1):
    with RunLock(run1):
        code, text = cli("sweep", lab / "r.yaml", "--out", run1)
    assert code == 2 and "another sweep" in text and str(run1) in text
    assert (run1 / "metrics.csv").is_file()


def test_dry_run_and_validate_print_grid_and_cost(lab, run1):
    code, text = cli("validate", lab / "r.yaml", "tasks.limit=3")
    assert code == 0, text
    assert "12 settings" in text and "threshold" in text and "MFLOP" in text and "valid" in text
    assert "replaying 10 settings" in text  # the 2 speculative ones decode, they replay nothing
    code, text = cli("sweep", lab / "r.yaml", "--dry-run", "--out", lab / "never")
    assert code == 0 and not (lab / "never").exists()
    assert "task tiny_mc: multiple_choice, 8 of 8 documents (all)" in text
    assert "1 full-depth trace pass" in text
    # the estimate is the requests' prefix tree, what the trace pass really runs (issue 13)
    est = int(re.search(r"~([\d,]+) distinct prefix tokens", text).group(1).replace(",", ""))
    work = json.loads((run1 / "provenance.json").read_text())["trace"]["work"]
    assert abs(est - work["prefix_tree_tokens"]) <= 0.05 * work["prefix_tree_tokens"]
    code, text = cli("validate", lab / "r.yaml", "tasks.names=[tiny_mc, nope]")
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and errors == [f"error: {lab / 'r.yaml'}: override tasks.names=[tiny_mc, nope]: "
                                    f"tasks.names[1]: task 'nope' not found in {lab / 'tasks'}; add its YAML "
                                    "folder to include_path"]


def test_default_run_folder_is_results_recipe_runid(lab, run1, tmp_path):
    from ouro_lab.recipe import load_recipe, recipe_hash
    from ouro_lab.sweep import default_run_dir

    recipe, src = load_recipe(lab / "r.yaml")
    assert default_run_dir(recipe, src) == Path("results") / "r" / recipe_hash(recipe)


# --------------------------------------------------------------------------- bad input


def _bad(lab, tmp_path, text: str, *extra):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    keep = tmp_path / "keep"
    keep.mkdir(exist_ok=True)
    (keep / "metrics.csv").write_text("earlier results\n")
    code, out = cli("sweep", f, "--out", keep, *extra)
    assert (keep / "metrics.csv").read_text() == "earlier results\n"  # nothing written earlier lost
    lines = [x for x in out.strip().splitlines() if x.startswith("error:")]
    return code, lines, f


def good(lab) -> str:
    return RECIPE.format(name="bad.yaml").replace("path: ckpt", f"path: {lab / 'ckpt'}").replace(
        "include: [tasks]", f"include: [{lab / 'tasks'}]")


@pytest.mark.parametrize("edit, field, words", [
    (("dtype: float32", "dtpye: float32"), ":2: model.dtpye:", "did you mean 'dtype'?"),
    (("batch_size: 16", "batch_size: many"), ":12: batch_size:", "a positive integer, or auto"),
    (("draft_len: [2, 3]", "draft_len: [2, 0]"), ":10: speculative[0].draft_len:", "must be 1..64 tokens"),
    (("tiny_mc, tiny_gen", "tiny_mc"), ":9: speculative:", "generate_until tasks, and none of tiny_mc"),
    (("name: budget", "name: budjet"), ":7: strategies[2].name:", "did you mean 'budget'?"),
    (("tiny_mc, tiny_gen", "tiny_mc, tiny_gem"), ":3: tasks.names[1]:", "did you mean"),
    (("q: 0.6}, live: true}", "q: 0.6}, live: true, granularity: sequence}"), ":6: strategies[1].live:",
     "live runs decide token by token"),
    (("mean_steps: [1.5, 2.5]}}", "mean_steps: [1.5, 2.5]}, granularity: sequence}"),
     ":7: strategies[2].granularity:", "calibrates its budget per token"),
])
def test_bad_recipe_one_line_exit_2(lab, tmp_path, edit, field, words):
    code, lines, f = _bad(lab, tmp_path, good(lab).replace(*edit))
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {f}{field}") and words in lines[0]


def test_unreadable_model_folder(lab, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((lab / "ckpt" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    code, lines, f = _bad(lab, tmp_path, good(lab).replace(str(lab / "ckpt"), str(broken)))
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {f}:2: model.path:") and "safetensors" in lines[0]


def test_empty_task_data(lab, tmp_path):
    import shutil

    tasks = tmp_path / "tasks"
    shutil.copytree(lab / "tasks" / "tiny_mc", tasks / "tiny_mc")
    (tasks / "tiny_mc" / "test.jsonl").write_text("")
    text = (good(lab).replace(str(lab / "tasks"), str(tasks)).replace("tiny_mc, tiny_gen", "tiny_mc")
            .replace(SPECULATIVE.format(), ""))
    code, lines, f = _bad(lab, tmp_path, text)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {f}:3: tasks.names[0]:") and "tiny_mc" in lines[0]


def test_unwritable_output_folder(lab, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    f = tmp_path / "r.yaml"
    f.write_text(good(lab))
    code, text = cli("sweep", f, "--out", blocker / "run")
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --out: ")
    assert "not writable" in lines[0]
    code, text = cli("sweep", f, f"output={blocker / 'run'}")
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {f}: override output=") and "output" in lines[0]
    assert blocker.read_text() == "not a folder"


# --------------------------------------------------------------------------- the demo


def test_demo_recipe_end_to_end_on_the_demo_model(tmp_path, monkeypatch):
    """recipes/demo.yaml on the trained demo checkpoint, cut down by overrides (the first 24
    documents of each task are the easiest ones, so no depth effect is asserted here)."""
    demo = ROOT / "recipes" / "demo.yaml"
    if not (ROOT / "ouro_lab" / "builtin" / "loop-demo" / "model.safetensors").is_file():
        pytest.skip("demo checkpoint not present")
    monkeypatch.setenv("OURO_LAB_CACHE", str(tmp_path / "cache"))
    strategies = ("strategies=[{name: threshold, grid: {q: [0.5, 0.9]}}, "
                  "{name: confidence, grid: {tau: 0.9}}, {name: threshold, grid: {q: 0.5}, live: true}]")
    out = run_sweep(demo, ["tasks.limit=24", "bootstrap=200", strategies], out=tmp_path / "demo")
    m = pd.read_csv(out / "metrics.csv")
    mc = m[(m.task == "loop_demo_mc") & (m.metric == "acc") & (m["run_mode"] == "replay")]
    assert set(mc.strategy) == {"fixed", "threshold", "confidence"}
    fixed = mc[mc.strategy == "fixed"].sort_values("steps_used_mean")
    assert fixed.steps_used_mean.tolist() == [1, 2, 3, 4] and fixed.flops_rel.is_monotonic_increasing
    assert fixed.value.iloc[-1] >= 0.9  # the trained model solves its own easy items at full depth
    conf = mc[mc.strategy == "confidence"].iloc[0]
    assert conf.steps_used_mean < 4 and conf.flops_rel < 1
    gen = m[m.task == "loop_demo_gen"]
    assert set(gen["run_mode"]) == {"live"} and "exact_match,strip" in set(gen.metric_key)
    assert (m[m.task == "loop_demo_mc"]["run_mode"] == "live").any()
    for f in ("report.html", "plots/loop_demo_mc_acc_vs_flops.png", "plots/loop_demo_mc_by_difficulty.png",
              "plots/loop_demo_gen_acc_vs_flops.png"):
        assert (out / f).is_file(), f


def test_the_requests_key_is_content_not_where_the_files_are(lab, tmp_path):
    """A copied or touched task folder (same documents) keeps every stored setting's key:
    the task config's paths and its datasets cache name (made from file mtimes) are left out."""
    import shutil

    from ouro_lab.keys import requests_hash
    from ouro_lab.tasks import TaskSet

    def key(folder):
        ts = TaskSet(names=["tiny_mc", "tiny_gen"], include_path=[str(folder)], limit=8)
        return [requests_hash(ts, n) for n in ("tiny_mc", "tiny_gen")]

    here = key(lab / "tasks")
    shutil.copytree(lab / "tasks", tmp_path / "moved")
    for f in (tmp_path / "moved").rglob("*.jsonl"):
        os.utime(f, (f.stat().st_atime + 100, f.stat().st_mtime + 100))
    assert key(tmp_path / "moved") == here
    f = tmp_path / "moved" / "tiny_gen" / "test.jsonl"
    f.write_text(f.read_text().replace('"answer": "', '"answer": "x', 1))  # one answer: a new key
    moved = key(tmp_path / "moved")
    assert moved[0] == here[0] and moved[1] != here[1]


def _one_task_recipe(path: Path, lab: Path, task: str, extra: str = "") -> Path:
    """A recipe over the lab's model and `task` (4 documents), threshold q=0.5 only."""
    path.write_text(f"""model: {{path: {lab / 'ckpt'}, dtype: float32, device: cpu, threads: 1}}
tasks: {{names: [{task}], include: [{lab / 'tasks'}], limit: 4}}
strategies:
  - {{name: threshold, grid: {{q: 0.5}}}}
bootstrap: 0
""" + extra)
    return path


def test_live_settings_timed_under_another_batch_plan_are_not_reused(lab, tmp_path):
    """A live setting's seconds (and decode_speedup between settings) hold for one batch plan
    and thread count: an interrupted run resumed with batch_size 2 reused all 10 settings
    timed at batch 16, and provenance said batch_size 2."""
    recipe = _one_task_recipe(tmp_path / "g.yaml", lab, "tiny_gen", "batch_size: 4\n")
    a = run_sweep(recipe, out=tmp_path / "a")
    first = {p.name for p in (a / "settings").glob("*.json")}
    (a / "provenance.json").unlink()  # as a run interrupted before its tables were written
    run_sweep(recipe, ["batch_size=2"], out=a)
    second = {p.name for p in (a / "settings").glob("*.json")} - first
    assert len(first) == len(second) > 0  # every live setting run again, none reused
    run_sweep(recipe, ["batch_size=2"], out=tmp_path / "b")
    assert {p.name for p in (tmp_path / "b" / "settings").glob("*.json")} == second
    (a / "provenance.json").unlink()
    run_sweep(recipe, ["batch_size=2", "model.threads=2"], out=a)  # torch's threads: timed anew too
    third = {p.name for p in (a / "settings").glob("*.json")} - first - second
    assert len(third) == len(first)


def test_settings_reused_from_other_code_are_named(lab, tmp_path, monkeypatch):
    """Rerun after a code change, a folder's stored settings come back (keyed by inputs, not
    code) while provenance records the new git SHA: each stored setting now carries the code
    that computed it, and reused ones from other code are listed and warned of per task."""
    import ouro_lab
    import ouro_lab.sweep as sweep_mod

    recipe = _one_task_recipe(tmp_path / "c.yaml", lab, "tiny_mc")
    monkeypatch.setenv("OURO_LAB_CACHE", str(tmp_path / "cache"))  # its trace apart from the lab's
    monkeypatch.setattr(sweep_mod, "git_sha", lambda: "a" * 40)
    a = run_sweep(recipe, out=tmp_path / "a")
    assert json.loads((a / "provenance.json").read_text())["other_code"] == []
    (a / "provenance.json").unlink()  # as a run interrupted before its tables were written
    monkeypatch.setattr(sweep_mod, "git_sha", lambda: "b" * 40 + "-dirty")
    run_sweep(recipe, out=a)
    prov = json.loads((a / "provenance.json").read_text())
    other = prov["other_code"]
    assert len(other) == 5 and {o["code"]["git_sha"] for o in other} == {"a" * 40}  # fixed 1-4, threshold
    assert all(o["tasks"] == ["tiny_mc"] for o in other)
    warn = [w for w in json.loads((a / "summary.json").read_text())["warnings"] if w["code"] == "other_code"]
    assert len(warn) == 1 and warn[0]["task"] == "tiny_mc"
    v = ouro_lab.__version__
    assert warn[0]["message"].startswith(f"5 of its stored settings were computed by other code (ouro-lab "
                                         f"{v} at {'a' * 12}) than this run (ouro-lab {v} at "
                                         f"{'b' * 12}-dirty); they were reused")
    assert warn[0]["message"] in (a / "report.md").read_text()


def test_git_sha_is_ouro_labs_own_checkout_or_none(tmp_path):
    """Installed into a project's .venv, `git -C site-packages` found the user's project and
    provenance recorded its commit (and `other_code` fired after each of the user's commits)."""
    import importlib.util
    import shutil

    def sha_from(root: Path):
        (root / "ouro_lab").mkdir(parents=True)
        shutil.copy(Path(__file__).parents[1] / "ouro_lab" / "store.py", root / "ouro_lab" / "store.py")
        spec = importlib.util.spec_from_file_location("store_copy", root / "ouro_lab" / "store.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.git_sha()

    project = tmp_path / "project"
    project.mkdir()
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (project / "a.txt").write_text("a\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    assert sha_from(project / ".venv" / "site-packages") is None  # the project's repo, not ouro-lab's
    assert sha_from(tmp_path / "elsewhere") is None  # no repository at all
    own = sha_from(project)  # ouro-lab's own checkout: its commit (an untracked file is not dirt)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert own == head


def test_a_group_scored_apart_is_said_and_recorded(lab, run1, tmp_path, capsys):
    """A group of a replayed and a generation task has no lm-eval aggregate in a sweep (its
    tasks are scored in different calls): the sweep says so and provenance lists it."""
    import shutil

    shutil.copytree(lab / "tasks", tmp_path / "tasks")
    (tmp_path / "tasks" / "tiny_mix.yaml").write_text("group: tiny_mix\ntask: [tiny_mc, tiny_gen]\n")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"# ouro-lab sweep {recipe}\nmodel: {{path: {lab / 'ckpt'}, dtype: float32, "
                      "device: cpu, threads: 1}\ntasks: {names: [tiny_mix], include: [tasks], limit: 2}\n"
                      "strategies:\n  - {name: threshold, grid: {q: 0.5}}\nbootstrap: 20\n")
    run = run_sweep(recipe, out=tmp_path / "run")
    assert json.loads((run / "provenance.json").read_text())["groups_apart"] == ["tiny_mix"]
    assert "group tiny_mix: its tasks are scored apart" in " ".join(capsys.readouterr().err.split())
    assert set(pd.read_csv(run / "metrics.csv").task) == {"tiny_mc", "tiny_gen"}


def test_samples_of_settings_not_in_the_run_are_said_and_listed(lab, run1, tmp_path):
    """An unfinished run of one recipe resumed by another: the first one's samples JSONL of
    settings the second lacks stay (nothing is deleted) but are said and listed."""
    a = RECIPE.format(name="a.yaml").replace("tiny_mc, tiny_gen", "tiny_mc").replace(SPECULATIVE.format(), "")
    (lab / "a.yaml").write_text(a)
    (lab / "b.yaml").write_text(a.replace("  - {name: budget, grid: {mean_steps: [1.5, 2.5]}}\n", ""))
    run = run_sweep(lab / "a.yaml", out=tmp_path / "run")
    (run / "provenance.json").unlink()  # as if interrupted before its end
    run_sweep(lab / "b.yaml", out=run)
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["stray_samples"] == ["replay/budget(mean_steps=1.5)", "replay/budget(mean_steps=2.5)"]
    assert (run / "samples" / "replay" / "budget(mean_steps=1.5)" / "samples_tiny_mc.jsonl").is_file()
    assert not pd.read_csv(run / "metrics.csv").strategy.eq("budget").any()
