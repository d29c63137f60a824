"""`ouro-lab report` and `ouro-lab compare`: rebuilt from files alone, numbers that agree with
metrics.csv, a self-contained HTML page."""

import json
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest
import sweep_helpers
from sweep_helpers import cli


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    return sweep_helpers.finished_run(tmp_path_factory.getbasetemp() / "lab")


@pytest.fixture
def copy(run1, tmp_path):
    """The finished run with only its tables: no plots, reports, summary or setting store."""
    dst = tmp_path / "run"
    shutil.copytree(run1, dst)
    for name in ("plots", "settings"):
        shutil.rmtree(dst / name)
    for name in ("report.md", "report.html", "summary.json", ".lock", "recipe.yaml"):
        (dst / name).unlink()
    return dst


def test_report_rebuilds_everything_from_the_tables(run1, copy):
    code, text = cli("report", copy)
    assert code == 0, text
    names = sorted(p.name for p in (copy / "plots").iterdir())
    assert names == sorted(p.name for p in (run1 / "plots").iterdir())
    assert all(p.stat().st_size > 5000 for p in (copy / "plots").iterdir())
    assert (copy / "report.md").read_text().replace(str(copy), "RUN") == \
        (run1 / "report.md").read_text().replace(str(run1), "RUN")
    assert json.loads((copy / "summary.json").read_text()) == json.loads((run1 / "summary.json").read_text())


def test_compute_saved_and_budgets_agree_with_metrics(run1):
    summary = json.loads((run1 / "summary.json").read_text())
    m = pd.read_csv(run1 / "metrics.csv")
    tol = summary["tolerance"]
    t = summary["tasks"]["tiny_mc"]
    assert t["metric"] == "acc" and t["mode"] == "replay"
    rows = m[(m.task == "tiny_mc") & (m.metric == "acc") & (m["run_mode"] == "replay")]
    full = rows[rows.is_full].iloc[0]
    assert t["full"] == pytest.approx(full.value)
    for r in t["saved"]:
        d = rows[rows.strategy == r["strategy"]]
        ok = d[d.value >= full.value - tol / 100 - 1e-12]
        if r["chosen"] is None:
            assert ok.empty
            continue
        chosen = d[d.setting == r["chosen"]].iloc[0]
        assert chosen.flops_executed_per_token == ok.flops_executed_per_token.min()  # the cheapest within
        assert r["saved"] == pytest.approx(1 - chosen.flops_rel)
        assert r["ci_low"] <= r["ci_high"]
    fixed = rows[rows.strategy == "fixed"].sort_values("flops_rel")
    assert [b["budget"] for b in t["budgets"]] == ["step 1", "step 2", "step 3", "step 4"]
    for b, (_, f) in zip(t["budgets"], fixed.iterrows(), strict=True):
        affordable = rows[(rows.flops_rel <= f.flops_rel + 1e-9) & (rows["kind"] != "select")]
        assert b["best_value"] == pytest.approx(affordable.value.max())
        assert b["best_value"] >= f.value
    curves = {c["strategy"]: c for c in t["curves"]}
    assert set(curves) == {"fixed", "threshold", "budget", "oracle"}
    assert 0 <= curves["fixed"]["auc"] <= 1 and curves["fixed"]["flops_rel_hi"] == pytest.approx(1.0)
    assert t["live"] and t["live"][0]["setting"] == "threshold(q=0.6)"
    gap = t["live"][0]
    assert gap["gap"] == pytest.approx(gap["live"] - gap["replay"])
    assert summary["tasks"]["tiny_gen"]["mode"] == "live"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.imgs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("href", "src", "data", "action"):
            if k in a and tag != "img":
                self.refs.append((tag, k, a[k]))


def test_html_is_self_contained(run1):
    p = _Refs()
    html = (run1 / "report.html").read_text()
    p.feed(html)
    assert len(p.imgs) == len(list((run1 / "plots").glob("*.png"))) >= 5
    assert all(s.startswith("data:image/png;base64,") for s in p.imgs)
    for tag, attr, ref in p.refs:  # in-page anchors and files beside the report, nothing else
        assert tag == "a" and attr == "href", (tag, attr, ref)
        assert ref.startswith("#") or (run1 / ref).exists(), ref
    assert "link" not in p.tags and p.tags.count("script") == 1 and "<script src" not in html
    assert str(run1) not in html and str(run1) not in (run1 / "report.md").read_text()  # named relatively
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    md = (run1 / "report.md").read_text()
    for line in md.splitlines():
        if line.startswith("!["):
            assert (run1 / line.split("](")[1].rstrip(")")).is_file()


def test_report_leads_with_the_answer(run1):
    """First the model, the tasks with their documents, one headline per task and the main
    plot; then the tables (most compute saved first); recipe and provenance folded away."""
    summary = json.loads((run1 / "summary.json").read_text())
    html = (run1 / "report.html").read_text()
    body = html[html.index("<body>"):]
    main = body.index('<figure id="main">')
    first = body[:main]
    assert "Model ckpt: " in first and "parameters" in first and "layers x 4 loop steps" in first
    t = summary["tasks"]["tiny_mc"]
    assert t["n_docs"] == 8 and "tiny_mc (8 documents, accuracy, replayed from one trace pass)" in first
    # the tiny random model scores below chance (25% on three choices): its headline is withdrawn
    assert t["headline"] is None and t["withdrawn"] == "baseline_broken"
    assert "</b>: no claim: full depth scores 25.0%, at or below chance." in first
    assert any(w["code"] == "baseline_broken" and w["task"] == "tiny_mc" and w["setting"] is None
               for w in summary["warnings"])
    # what a claim says: the cross-fitted figure (the in-sample one beside it)
    from ouro_lab.report import _headline
    from ouro_lab.report_page import headline

    h = _headline(t, 1.0)  # any loss tolerated: this random model's rows all qualify
    best = max((r for r in t["saved"] if r["chosen"] and r["kind"] != "select"),
               key=lambda r: r["crossfit"]["saved"])
    folds = list(dict.fromkeys(best["crossfit"]["settings"]))  # named by what the folds chose
    assert h["setting"] == (folds[0] if len(folds) == 1 else f"{best['strategy']} (per fold: "
                            f"{', '.join(best['crossfit']['settings'])})")
    assert h["saved"] == best["crossfit"]["saved"] and h["in_sample"]["saved"] == best["saved"]
    sentence = (f"{h['setting']} saves {h['saved'] * 100:.1f}% of the FLOPs per token (95% CI "
                f"{h['ci_low'] * 100:.1f} to {h['ci_high'] * 100:.1f}%) for {h['delta'] * 100:+.1f}")
    text = headline("tiny_mc", {**t, "headline": h, "withdrawn": None}, summary["tolerance"])
    assert sentence in text and "replayed from the full-depth trace" in text
    assert f"cross-fitted: chosen on other documents, scored on held-out ones (in sample " \
           f"{best['saved'] * 100:.1f}%" in text
    assert first.count("<li>") == len(summary["tasks"]) == 2
    assert body.index("<table") > main and body.index('<details id="provenance">') > body.index("<table")
    rules = [r for r in t["saved"] if r["kind"] != "select"]
    saved = [r["saved"] for r in rules if r["chosen"]]
    assert saved == sorted(saved, reverse=True)
    assert [r["chosen"] is None for r in rules] == sorted(r["chosen"] is None for r in rules)
    assert [r["kind"] == "select" for r in t["saved"]] == sorted(r["kind"] == "select" for r in t["saved"])


def test_auc_over_one_common_range(run1):
    from ouro_lab.stats import auc_common

    t = json.loads((run1 / "summary.json").read_text())["tasks"]["tiny_mc"]
    lo = {c["auc_lo"] for c in t["curves"]}
    fixed = next(c for c in t["curves"] if c["strategy"] == "fixed")
    assert lo == {fixed["flops_rel_lo"]} and t["auc_range"] == [fixed["flops_rel_lo"], 1.0]
    assert [c["auc"] for c in t["curves"]] == sorted((c["auc"] for c in t["curves"]), reverse=True)
    # a curve that only covers the expensive end no longer outranks one covering the range
    wide = auc_common([0.25, 0.5, 0.75, 1.0], [0.3, 0.6, 0.9, 1.0], 0.25, 1.0)
    narrow = auc_common([0.96, 1.0], [1.0, 1.0], 0.25, 1.0)
    assert narrow < wide and narrow == pytest.approx(0.04 / 0.75)
    assert wide == pytest.approx((0.45 + 0.75 + 0.95) * 0.25 / 0.75)
    assert auc_common([0.5], [0.8], 0.0, 1.0, floor=0.1) == pytest.approx(0.45)


def test_warnings_render_beside_what_they_concern(run1):
    from ouro_lab import report, report_page

    run = report.read_run(run1)
    summary = report.analyze(run)
    plots = [{"kind": "main", "task": "tiny_mc", "title": "t", "caption": "c",
              "path": run1 / "plots" / "tiny_mc_acc_vs_flops.png"}]
    summary["tasks"]["tiny_mc"]["withdrawn"] = None  # the tiny model is below chance: render its rows anyway
    chosen = next(r["chosen"] for r in summary["tasks"]["tiny_mc"]["saved"] if r["chosen"])
    summary["warnings"] = [{"task": "tiny_mc", "setting": None, "code": "head_limit",
                            "message": "the documents are the first 8 of the file"},
                           {"task": "tiny_mc", "setting": chosen, "code": "wide_ci",
                            "message": "CI too wide"}]
    html = report_page.render_html(run, summary, plots)
    head = html[:html.index('<figure id="main">')]
    assert "<div class=warn>the documents are the first 8 of the file</div>" in head
    row = next(r for r in html.split("<tr>") if f">{chosen}</td>" in r and "FLOPs saved" in r)
    assert "<div class=warn>CI too wide</div>" in row
    md = report_page.render_markdown(run, summary, plots)
    assert "  - warning: the documents are the first 8 of the file" in md
    assert f"- warning ({chosen}): CI too wide" in md


def test_compare_says_what_changed(run1, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    prov = json.loads((other / "provenance.json").read_text())
    prov["recipe"]["live"]["kv_policy"] = "last"
    prov["recipe"]["seed"] = 99
    prov["recipe"]["tasks"]["sample"] = 6  # a sample is another set of documents: said too
    (other / "provenance.json").write_text(json.dumps(prov))
    s = pd.read_parquet(other / "samples.parquet")
    hit = (s.task == "tiny_mc") & (s.setting == "threshold(q=0.9)") & (s["run_mode"] == "replay")
    s.loc[hit, "acc"] = 1.0  # every document right in B
    s.to_parquet(other / "samples.parquet")
    m = pd.read_csv(other / "metrics.csv")
    row = ((m.task == "tiny_mc") & (m.setting == "threshold(q=0.9)") & (m["run_mode"] == "replay")
           & (m.metric == "acc"))
    before = float(m.loc[row, "value"].iloc[0])
    m.loc[row, "value"] = s.loc[hit, "acc"].mean()
    m = m[~((m.task == "tiny_mc") & (m.setting == "budget(mean_steps=1.5)"))]
    m.to_csv(other / "metrics.csv", index=False)
    code, text = cli("compare", run1, other)
    assert code == 0, text
    config = text[text.index("## What differs in configuration"):text.index("## Summary")]
    assert '| KV policy (live) | "copy" | "last" |' in config and "| seed | 1234 | 99 |" in config
    assert "| sample | null | 6 |" in config
    assert "Settings only in A (1): tiny_mc/budget(mean_steps=1.5) (replay)" in text
    diff = (float(s.loc[hit, "acc"].mean()) - before) * 100
    assert "## Summary: 1 of " in text and f"tiny_mc/threshold(q=0.9) (replay) {diff:+.2f}" in text
    line = next(x for x in text.splitlines() if x.startswith("| threshold(q=0.9) | replay |"))
    assert f"{diff:+.2f}*" in line and "| 8 |" in line
    lines = [x for x in text.splitlines() if x.startswith("| threshold(q=")]
    names = list(dict.fromkeys(x.split("|")[1].strip() for x in lines))
    assert names[:3] == ["threshold(q=0.3)", "threshold(q=0.6)", "threshold(q=0.9)"]
    code, same = cli("compare", run1, run1)
    assert "Nothing: same model" in same and "## Summary: 0 of " in same


def test_compare_orders_parameters_as_numbers():
    from ouro_lab.compare import param_key

    params = ['{"q": 0.99}', '{"q": 0.9}', '{"q": 0.95}', '{"q": 10}', '{"q": 2}']
    assert sorted(params, key=param_key) == ['{"q": 0.9}', '{"q": 0.95}', '{"q": 0.99}', '{"q": 2}',
                                             '{"q": 10}']


def test_report_on_a_folder_without_tables(tmp_path):
    code, text = cli("report", tmp_path)
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "metrics.csv: missing" in errors[0]
    code, text = cli("compare", tmp_path / "nope", tmp_path)
    assert code == 2 and "no such run folder" in text


def test_speed_table_says_when_overhead_not_flops_sets_the_time():
    """The note is checked on the run's own rows: fixed(step=1) far below its ideal
    speed-up (0.72 on the demo model) gets the explanation; near it, no note."""
    import math

    from ouro_lab.report_page import _speed_table

    def t(speedup):
        return {"scale": 100, "metric_words": "exact match", "speed": [
            {"setting": "fixed(step=1)", "value": 0.45, "decode_s": 1e-4, "prefill_s": 1e-4,
             "speedup": speedup, "flops_saved": 0.75, "ideal": 4.0, "acceptance": math.nan}]}

    slow = _speed_table("g", t(2.0)).note
    assert "fixed(step=1) reaches 0.50 of its ideal speed-up" in slow and "bench/live_speed.py" in slow
    assert "Each setting is timed once, in one run (no interval)" in slow  # a single timing, said so
    assert "ideal speed-up" not in _speed_table("g", t(3.9)).note.split("Speculative")[1]


def test_compare_pairs_runs_over_the_documents_both_scored(run1, tmp_path):
    """B scored 5 of A's 8 documents: B - A is the paired mean over those 5, inside its own
    interval (it was the difference of whole-run means, -2.50 beside [+0.00, +0.00])."""
    other = tmp_path / "fewer"
    shutil.copytree(run1, other)
    s = pd.read_parquet(other / "samples.parquet")
    keep = s.doc_id < 5
    s[keep].to_parquet(other / "samples.parquet")
    m = pd.read_csv(other / "metrics.csv")
    for (task, setting, mode), d in s[keep & s.acc.notna()].groupby(["task", "setting", "run_mode"]):
        row = (m.task == task) & (m.setting == setting) & (m.run_mode == mode) & (m.metric == "acc")
        m.loc[row, "value"] = d.groupby("doc_id").acc.first().mean()
    m.to_csv(other / "metrics.csv", index=False)
    code, text = cli("compare", run1, other)
    assert code == 0, text
    a = pd.read_parquet(run1 / "samples.parquet")
    for line in [x for x in text.splitlines() if x.startswith("| ") and "| replay |" in x][:6]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        setting, mode, va, vb, diff, ci, docs = cells[:7]
        assert docs == "5 shared (A 8, B 5)"
        da = a[(a.task == "tiny_mc") & (a.setting == setting) & (a.run_mode == mode) & (a.doc_id < 5)]
        assert float(va) == pytest.approx(da.groupby("doc_id").acc.first().mean() * 100, abs=0.006)
        lo, hi = (float(v) for v in ci.strip("[]").split(","))
        assert lo - 1e-9 <= float(diff.rstrip("*")) <= hi + 1e-9 and float(diff.rstrip("*")) == 0


def test_headline_without_resamples_says_so():
    from ouro_lab.report_page import headline

    t = {"scale": 100.0, "metric_words": "accuracy", "full": 0.99, "mode": "replay", "headline": {
        "setting": "thr(q=0.5)", "saved": 0.25, "ci_low": None, "ci_high": None, "delta": 0.0,
        "mode": "replay", "in_sample": None, "live": None}}
    text = headline("t", t, 1.0)
    assert "n/a" not in text and "saves 25.0% of the FLOPs per token (no interval: bootstrap 0) for" in text


def test_compare_does_not_pair_a_metric_that_is_not_a_mean_over_documents():
    """Perplexity: samples.parquet holds each document's log-likelihood, not the metric; the
    A/B columns showed -35.84 for a word perplexity of 90.62, with a paired CI."""
    from ouro_lab.compare import paired

    def run(value, ll):
        m = pd.DataFrame([{"task": "ppl", "setting": "fixed(step=1)", "run_mode": "replay",
                           "metric_key": "word_perplexity", "value": value}])
        s = pd.DataFrame({"task": "ppl", "setting": "fixed(step=1)", "run_mode": "replay",
                          "doc_id": range(len(ll)), "word_perplexity": ll})
        return {"metrics": m, "samples": s}

    a, b = run(90.62, [-35.0, -36.7]), run(107.2, [-35.0, -36.7, -40.0])
    assert paired(a, b, "ppl", "word_perplexity", "fixed(step=1)", "replay", 50, 0) is None
    a, b = run(0.5, [0.0, 1.0]), run(2 / 3, [0.0, 1.0, 1.0])  # a mean: paired on the shared two
    assert paired(a, b, "ppl", "word_perplexity", "fixed(step=1)", "replay", 50, 0)[:4] == (0.0, 0.0, 0.0, 2)
    # tasks.sample: doc_id i is the file's document indices[i]; two seeds share files 5 and 7
    a, b = run(0.5, [1.0, 0.0, 1.0]), run(1 / 3, [0.0, 1.0, 0.0])
    a["provenance"] = {"tasks": {"ppl": {"how": "sample", "indices": [3, 5, 7]}}}
    b["provenance"] = {"tasks": {"ppl": {"how": "sample", "indices": [5, 7, 9]}}}
    a["metrics"].loc[0, "value"], b["metrics"].loc[0, "value"] = 2 / 3, 1 / 3
    d, lo, hi, n, va, vb, na, nb = paired(a, b, "ppl", "word_perplexity", "fixed(step=1)", "replay", 50, 0)
    assert (n, na, nb) == (2, 3, 3) and va == vb == 0.5 and d == 0.0  # files 5, 7: (0, 1) in both
    # (paired on doc_id it was three "shared" documents and B - A = -1/3)


def test_headline_when_every_cross_fitted_figure_is_refused():
    """Six documents in eight folds: the table had in-sample savings, the headline said
    "no strategy saves compute"; it now says why there is no cross-fitted figure."""
    from ouro_lab.report_page import headline

    why = "3 of 8 calibration folds hold none of the 6 documents"
    row = {"strategy": "threshold", "chosen": "threshold(q=0.3)", "kind": "skip", "saved": 0.332,
           "delta": 0.0, "crossfit": {"refused": why}}
    t = {"scale": 100.0, "metric_words": "accuracy", "full": 1.0, "mode": "replay", "headline": None,
         "saved": [row, {**row, "strategy": "oracle", "kind": "select"}]}
    assert headline("t", t, 1.0) == (f"t: no cross-fitted figure ({why}); in sample, threshold(q=0.3) "
                                     "saves 33.2% of the FLOPs per token for +0.0 points of accuracy against "
                                     "full depth (100.0%).")
    t["saved"][0] = {**row, "crossfit": {"saved": 0.1}}  # a figure exists: the usual sentence
    assert headline("t", t, 1.0).startswith("t: no strategy saves compute within 1 point")


def test_a_perplexity_task_claims_no_per_document_saving_and_ranks_the_lowest_best(tmp_path, monkeypatch):
    """Word perplexity is corpus-level: samples hold each document's log-likelihood. The report
    ran compute saved on those ("saves 74.0% ... for +2.8 units of word perplexity against full
    depth (116.6)", a log-likelihood difference), ranked AUCs higher first, and named the
    highest perplexity under each budget the best."""
    from harness_helpers import make_model_dir, make_tasks

    from ouro_lab.sweep import run_sweep

    for k, v in {"OURO_LAB_CACHE": tmp_path / "cache", "OURO_LAB_PROGRESS": "0",
                 "OURO_LAB_PLOT_FORMATS": "png", "TQDM_DISABLE": "1"}.items():  # the lab's, its own cache
        monkeypatch.setenv(k, str(v))
    make_model_dir(tmp_path / "ckpt")
    make_tasks(tmp_path / "tasks", n=8)
    (tmp_path / "ppl.yaml").write_text(
        "model: {path: ckpt, dtype: float32, device: cpu, threads: 1}\n"
        "tasks: {names: [tiny_ppl], include: [tasks], limit: 8}\n"
        "strategies:\n  - {name: threshold, grid: {q: [0.3, 0.6, 0.9]}}\n"
        "bootstrap: 50\nbatch_size: 16\nlog_samples: true\n")
    run = run_sweep(tmp_path / "ppl.yaml", out=tmp_path / "run")
    t = json.loads((run / "summary.json").read_text())["tasks"]["tiny_ppl"]
    assert t["metric"] == "word_perplexity" and t["lower_is_better"] and t["doc_mean"] is False
    assert t["saved"] == [] and t["headline"] is None and t["curves"] == []
    m = pd.read_csv(run / "metrics.csv")
    rows = m[(m.task == "tiny_ppl") & (m.metric_key == "word_perplexity") & (m.run_mode == "replay")]
    assert rows.value.nunique() > 2  # settings differ, so "best" can be told from "worst"
    for b in t["budgets"]:
        fit = rows[rows.flops_rel <= b["flops_rel"] + 1e-9]
        assert b["best_value"] == pytest.approx(fit.value.min())
    report = (run / "report.md").read_text()
    assert "word perplexity" in report and "is not a mean over documents" in report
    assert "saves" not in report.split("## ")[0] and "tiny_ppl: area under the curve" not in report
    assert "best = the setting with the lowest word perplexity (lower is better)" in report
    assert "Tolerance 1 unit;" in report  # a perplexity is not in points
    assert "Word perplexity against FLOPs" in report and "1-unit tolerance above full depth (lower" in report


def test_a_group_is_not_called_corpus_level():
    """A group's samples are its leaf tasks': with no rows of its own, whether its metric is a
    mean over documents is unknown, not false (every mmlu group read "not a mean over
    documents (a corpus-level figure)")."""
    from ouro_lab.report import _doc_mean
    from ouro_lab.report_page import headline

    samples = pd.DataFrame({"task": ["leaf", "leaf"], "setting": "fixed(step=4)", "run_mode": "replay",
                            "doc_id": [0, 1], "acc": [1.0, 0.0]})
    full = pd.Series({"setting": "fixed(step=4)", "value": 0.5})
    assert _doc_mean(samples, "group", "replay", "acc", full) is None
    assert _doc_mean(samples, "leaf", "replay", "acc", full) is True
    assert _doc_mean(samples, "leaf", "replay", "acc", full.replace(0.5, 0.7)) is False
    t = {"scale": 100.0, "metric_words": "accuracy", "full": 0.5, "mode": "replay", "headline": None,
         "saved": [], "doc_mean": None}
    assert "not a mean over documents" not in headline("group", t, 1.0)
    assert "not a mean over documents" in headline("ppl", {**t, "doc_mean": False}, 1.0)
