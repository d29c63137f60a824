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
    rows = m[(m.task == "tiny_mc") & (m.metric == "acc") & (m["mode"] == "replay")]
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
    p.feed((run1 / "report.html").read_text())
    assert len(p.imgs) == len(list((run1 / "plots").iterdir())) >= 5
    assert all(s.startswith("data:image/png;base64,") for s in p.imgs)
    assert p.refs == [] and "link" not in p.tags and "script" not in p.tags
    md = (run1 / "report.md").read_text()
    for line in md.splitlines():
        if line.startswith("!["):
            assert (run1 / line.split("](")[1].rstrip(")")).is_file()


def test_compare_two_runs(run1, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    m = pd.read_csv(other / "metrics.csv")
    m.loc[0, "value"] += 0.25
    m.drop(index=len(m) - 1).to_csv(other / "metrics.csv", index=False)
    code, text = cli("compare", run1, other)
    assert code == 0, text
    assert "| B - A |" in text or "B - A" in text
    assert "0.2500" in text
    assert f"{len(m) - 1} rows in both, 1 only in A, 0 only in B." in text


def test_report_on_a_folder_without_tables(tmp_path):
    code, text = cli("report", tmp_path)
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "metrics.csv: missing" in errors[0]
    code, text = cli("compare", tmp_path / "nope", tmp_path)
    assert code == 2 and "no such run folder" in text
