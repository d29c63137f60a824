"""Exit strategies: the contract for every strategy file found, the semantics of each
built-in, the fixture check for `threshold`, discovery, packaging and bad input."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, run_cli

from ouro_lab.contract import check_contract
from ouro_lab.registry import (
    StrategyError,
    builtin_dir,
    expand_grid,
    list_strategies,
    load_strategy,
    make_strategy,
)
from ouro_lab.strategy import SIGNALS, ContractError, Signals, replay
from ouro_lab.trace import random_signals

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {"fixed", "threshold", "kl", "budget", "hidden_delta", "confidence", "patience", "oracle",
            "random"}
ALL = [i.name for i in list_strategies()]

# The README's example: a complete strategy in one file.
EXAMPLE = '''\
"""Exit at the first step whose entropy is below max_nats, once the exit gate agrees (cdf >= q)."""

from dataclasses import dataclass
from typing import ClassVar

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
    max_nats: float = 1.0
    q: float = 0.2
    needs: ClassVar[tuple[str, ...]] = ("entropy", "exit_cdf")  # entropy reads the LM head

    def decide(self, s: Signals, r: int):
        return (s.entropy[r] < self.max_nats) & (s.exit_cdf[r] >= self.q)
'''


def sig(steps=4, n=64, seed=0, **override) -> Signals:
    data = random_signals(steps, n, seed)
    data.update(override)
    return Signals(data, steps)


def hand(steps: int, **rows) -> Signals:
    """Signals from per-token step lists: hand(3, exit_cdf=[[.1, .6, 1], ...])."""
    data = {k: torch.tensor(v).T.contiguous() for k, v in rows.items()}
    return Signals(data, steps)


def test_every_builtin_is_found_without_torch():
    assert set(ALL) >= BUILTINS
    code = ("import sys; from ouro_lab.registry import list_strategies; "
            "infos = list_strategies(); assert 'torch' not in sys.modules, 'torch imported'; "
            "print(len(infos))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    infos = {i.name: i for i in list_strategies()}
    assert [p.name for p in infos["kl"].params] == ["eps", "min_step"]
    assert infos["kl"].params[0].type == "float" and infos["kl"].params[0].default == "0.01"
    assert infos["oracle"].kind == "select" and infos["threshold"].kind == "skip"
    for name in BUILTINS:  # first docstring line states the rule
        assert len(infos[name].doc) > 20 and infos[name].source == f"strategies/{name}.py" or \
            infos[name].source.endswith(f"strategies/{name}.py")


@pytest.mark.parametrize("name", ALL)
def test_contract(name):
    """Shape, dtype, range, causality and sequence granularity, for every strategy found,
    built with its defaults: what `ouro-lab strategies --check` runs."""
    check_contract(make_strategy(name, {}))


def test_every_strategy_declares_known_signals():
    from ouro_lab.strategy import expand_needs

    for name in ALL:
        expand_needs(load_strategy(name).needs)


# --------------------------------------------------------------------------- semantics


def test_fixed_is_one_based_and_clamps():
    s = sig(4, 10)
    assert replay(make_strategy("fixed", {"step": 2}), s).tolist() == [1] * 10
    assert replay(make_strategy("fixed", {"step": 1}), s).tolist() == [0] * 10
    assert replay(make_strategy("fixed", {"step": 9}), s).tolist() == [3] * 10
    with pytest.raises(StrategyError, match="strategies/fixed.py: parameter step must be >= 1"):
        make_strategy("fixed", {"step": 0})
    assert make_strategy("fixed", {"step": 2}).readouts(torch.tensor([1])).tolist() == [1]


def test_threshold_first_step_reaching_q():
    s = hand(3, exit_cdf=[[0.1, 0.6, 1.0], [0.5, 0.7, 1.0], [0.2, 0.3, 1.0]])
    assert replay(make_strategy("threshold", {"q": 0.5}), s).tolist() == [1, 0, 2]
    assert replay(make_strategy("threshold", {"q": 0.05}), s).tolist() == [0, 0, 0]
    assert replay(make_strategy("threshold", {"q": 1}), s).tolist() == [2, 2, 2]  # int accepted as float


@pytest.mark.parametrize("prefix", ["", "pad_"])
def test_threshold_reproduces_the_parity_fixture(fixture_dir, expected, prefix):
    from ouro_lab.loading import load_model
    from ouro_lab.trace import step_signals

    model = load_model(fixture_dir, dtype="float32", device="cpu")
    ids, mask = expected[prefix + "input_ids"], expected[prefix + "attention_mask"].bool()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    targets = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -1)), 1)
    s = Signals(step_signals(model, out, targets, mask), out.steps)
    for tag, q in {"0p25": 0.25, "0p5": 0.5, "0p75": 0.75, "0p9": 0.9, "0p99": 0.99}.items():
        want = expected[f"{prefix}exit_steps_threshold_{tag}"][mask].long()
        got = replay(make_strategy("threshold", {"q": q}), s)
        assert torch.equal(got, want), tag


def test_kl_waits_for_min_step_and_charges_readouts():
    inf = math.inf
    s = hand(4, kl_prev=[[inf, 0.001, 0.5, 0.0], [inf, 0.5, 0.001, 0.0], [inf, 0.5, 0.5, 0.5]])
    assert replay(make_strategy("kl", {"eps": 0.01}), s).tolist() == [1, 2, 3]
    st = make_strategy("kl", {"eps": 0.01, "min_step": 3})
    e = replay(st, s)
    assert e.tolist() == [3, 2, 3]
    # live decoding reads the head at every step it runs, so replay charges the same
    assert st.readouts(e).tolist() == [4, 3, 4]
    assert make_strategy("kl", {}).readouts(torch.tensor([0, 1, 3])).tolist() == [1, 2, 4]


def test_hidden_delta():
    inf = math.inf
    s = hand(3, hidden_delta=[[inf, 0.01, 0.0], [inf, 0.2, 0.04], [inf, 0.2, 0.2]])
    st = make_strategy("hidden_delta", {"eps": 0.05})
    e = replay(st, s)
    assert e.tolist() == [1, 2, 2]
    assert st.readouts(e).tolist() == [1, 1, 1]  # no LM head needed to decide


def test_confidence_max_prob_and_margin():
    s = hand(3, max_prob=[[0.5, 0.95, 0.9], [0.2, 0.5, 0.8]], margin=[[0.1, 0.92, 0.0], [0.0, 0.6, 0.7]])
    st = make_strategy("confidence", {"tau": 0.9})
    e = replay(st, s)
    assert e.tolist() == [1, 2]
    assert st.readouts(e).tolist() == [2, 3]  # a readout at every step checked
    assert replay(make_strategy("confidence", {"tau": 0.6, "signal": "margin"}), s).tolist() == [1, 1]
    with pytest.raises(StrategyError, match="strategies/confidence.py: parameter signal must be one of"):
        make_strategy("confidence", {"signal": "entropy"})


def test_patience_counts_unchanged_steps():
    s = hand(5, argmax=[[3, 3, 7, 7, 7], [1, 2, 3, 4, 5], [9, 9, 9, 9, 9], [1, 2, 2, 2, 5]])
    assert replay(make_strategy("patience", {"n": 1}), s).tolist() == [1, 4, 1, 2]
    assert replay(make_strategy("patience", {"n": 2}), s).tolist() == [4, 4, 2, 3]


def test_oracle_is_a_labelled_bound():
    """Per document (its `doc_correct` view, composed from the fixed steps): the earliest
    step that is right, else full depth; labelled a bound (on accuracy and on one depth per
    document, not on per-token rules' FLOPs)."""
    s = hand(3, doc_correct=[[False, True, True], [True, False, True], [False, False, False]])
    st = make_strategy("oracle", {})
    assert replay(st, s).tolist() == [1, 0, 2]
    assert st.kind == "select"
    assert {i.name: i for i in list_strategies()}["oracle"].doc.lower().startswith("a bound, not a rule")


def test_random_matches_its_budget_and_is_deterministic():
    R, N = 4, 40_000
    s = Signals({}, R, n=N)
    for mean in (1.0, 1.7, 2.5, 4.0):
        e = replay(make_strategy("random", {"mean_steps": mean}), s)
        assert abs((e.float() + 1).mean().item() - mean) < 0.02
    st = make_strategy("random", {"mean_steps": 2.0})
    a, b = replay(st, s), replay(st, s)
    assert torch.equal(a, b)
    rows = torch.arange(0, N, 7)
    assert torch.equal(replay(st, s.subset(rows)), a[rows])  # a function of (seed, token index) only
    assert not torch.equal(a, replay(make_strategy("random", {"mean_steps": 2.0, "seed": 1}), s))
    assert not torch.equal(a, replay(st, Signals({}, R, n=N, seed=1)))
    assert st.readouts(a).eq(1).all()
    with pytest.raises(ContractError, match="mean_steps must be in"):
        replay(make_strategy("random", {"mean_steps": 5.0}), s)


def test_budget_calibrates_on_fit_only():
    st = make_strategy("budget", {"mean_steps": 2.0, "signal": "exit_cdf"})
    with pytest.raises(ContractError, match="raised RuntimeError: budget: call fit"):
        replay(st, sig(4, 10))
    calib, report = sig(4, 20_000, seed=3), sig(4, 20_000, seed=4)
    st.fit(calib)
    t = st.threshold
    mean_calib = (replay(st, calib).float() + 1).mean().item()
    assert mean_calib <= 2.0 and mean_calib > 1.95
    assert abs((replay(st, report).float() + 1).mean().item() - 2.0) < 0.05
    assert st.threshold == t  # replaying the reported split never re-calibrates
    # the same rule written as a threshold on the calibrated value gives the same exits
    same = make_strategy("threshold", {"q": t})
    assert torch.equal(replay(same, report), replay(st, report))


@pytest.mark.parametrize("signal", ["kl_prev", "max_prob", "hidden_delta", "entropy"])
def test_budget_on_other_signals(signal):
    st = make_strategy("budget", {"mean_steps": 2.5, "signal": signal})
    calib = sig(4, 5_000, seed=5)
    st.fit(calib)
    m = (replay(st, calib).float() + 1).mean().item()
    assert 2.3 < m <= 2.5
    st = make_strategy("budget", {"mean_steps": 4, "signal": signal})
    st.fit(calib)
    assert replay(st, calib).eq(3).all()


def test_budget_meets_its_target_when_a_signal_is_nan():
    """A NaN signal passes no threshold in decide(), so fit() must not count NaN tokens as
    exiting: the replayed mean stays within the target, and a target only NaN-free exits
    could meet is refused."""
    calib = sig(4, 4_000, seed=7)
    calib._data["max_prob"][:, :1_000] = math.nan  # a quarter of the tokens never pass
    for target in (1.75, 2.0, 2.5):
        st = make_strategy("budget", {"mean_steps": target, "signal": "max_prob"})
        st.fit(calib)
        assert target - 0.1 < (replay(st, calib).float() + 1).mean().item() <= target
    with pytest.raises(ValueError, match="cheapest possible 1.75"):
        make_strategy("budget", {"mean_steps": 1.5, "signal": "max_prob"}).fit(calib)


def test_budget_flops_target():
    from ouro_lab.flops import ModelCost

    cost = ModelCost(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_dim=16, vocab=256,
                     steps=4)
    N = 4_000
    ctx = torch.randint(1, 100, (N,))
    data = random_signals(4, N, seed=6)
    calib = Signals(data, 4, ctx=ctx, cost=cost)

    def mean_flops(st, s):
        e = replay(st, s)
        return (cost.token_flops((e + 1).double(), ctx.double(), st.readouts(e).double())).mean().item()

    full = cost.token_flops(4, ctx.double(), 1).mean().item()
    for signal in ("exit_cdf", "max_prob"):  # max_prob pays a head readout at every step
        st = make_strategy("budget", {"flops": 0.6 * full, "signal": signal})
        st.fit(calib)
        f = mean_flops(st, calib)
        assert 0.55 * full < f <= 0.6 * full, (signal, f / full)
    with pytest.raises(ValueError, match="cheapest"):
        make_strategy("budget", {"flops": 10.0}).fit(calib)
    with pytest.raises(ValueError, match="cost"):
        make_strategy("budget", {"flops": 1e9}).fit(Signals(data, 4))


def test_budget_parameter_errors():
    with pytest.raises(StrategyError, match="set only one of the parameters mean_steps and flops"):
        make_strategy("budget", {"mean_steps": 2, "flops": 1e9})
    with pytest.raises(StrategyError, match="parameter signal must be one of"):
        make_strategy("budget", {"mean_steps": 2, "signal": "target_logprob"})  # would read the answer


# --------------------------------------------------------------------------- registry


def test_parameter_names_and_types_are_checked():
    with pytest.raises(StrategyError) as e:
        make_strategy("kl", {"eps": "abc"})
    assert str(e.value) == "strategies/kl.py: parameter eps must be float, got 'abc'"
    with pytest.raises(StrategyError, match="parameter min_step must be int, got 2.5"):
        make_strategy("kl", {"min_step": 2.5})
    with pytest.raises(StrategyError, match="unknown parameter 'epsilon'; did you mean 'eps'"):
        make_strategy("kl", {"epsilon": 0.1})
    with pytest.raises(StrategyError, match="parameter step must be int, got True"):
        make_strategy("fixed", {"step": True})
    with pytest.raises(StrategyError, match="did you mean 'threshold'"):
        make_strategy("treshold", {})
    assert make_strategy("kl", {"eps": "0.5", "min_step": "3"}).params() == {"eps": 0.5, "min_step": 3}
    assert make_strategy("budget", {"mean_steps": 2, "signal": "kl_prev"}).params() == {
        "signal": "kl_prev", "mean_steps": 2.0, "flops": None}


def test_expand_grid():
    grid = expand_grid("kl", {"eps": [0.1, 0.01], "min_step": [2, 3, 4]})
    assert len(grid) == 6 and grid[1].params() == {"eps": 0.1, "min_step": 3}
    assert [g.params() for g in expand_grid("threshold", {"q": 0.5})] == [{"q": 0.5}]
    assert len(expand_grid("oracle")) == 1
    with pytest.raises(StrategyError, match="empty"):
        expand_grid("threshold", {"q": []})


def test_readme_example_from_a_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "calm_gate.py").write_text(EXAMPLE)
    infos = {i.name: i for i in list_strategies([tmp_path])}
    assert infos["calm_gate"].doc.startswith("Exit at the first step whose entropy is below max_nats")
    assert [(p.name, p.type, p.default) for p in infos["calm_gate"].params] == [
        ("max_nats", "float", "1.0"), ("q", "float", "0.2")]
    with pytest.raises(StrategyError, match="unknown strategy 'calm_gate'"):
        make_strategy("calm_gate", {})
    st = make_strategy("calm_gate", {"max_nats": 0.5}, dirs=[tmp_path])
    s = hand(3, entropy=[[0.2, 0.1, 3.0], [2.0, 0.3, 0.1]], exit_cdf=[[0.1, 0.5, 1.0], [0.5, 0.9, 1.0]])
    e = replay(st, s)
    assert e.tolist() == [1, 1]
    assert st.readouts(e).tolist() == [2, 2]  # entropy is read from the LM head at every step
    out = run_cli(monkeypatch, capsys, "strategies", "--strategies-dir", tmp_path, "--check")
    assert out.returncode == 0 and "calm_gate" in out.stdout, out.stderr


def test_entry_point_strategies(tmp_path, monkeypatch):
    (tmp_path / "third_party_rule.py").write_text(EXAMPLE)
    dist = tmp_path / "third_party-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ouro_lab.strategies]\nthird = third_party_rule\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    infos = {i.name: i for i in list_strategies()}
    assert infos["third"].params[0].name == "max_nats" and "entry point" in infos["third"].source
    st = make_strategy("third", {"q": 0.3})
    assert st.params() == {"max_nats": 1.0, "q": 0.3}


def test_a_name_defined_twice_is_an_error(tmp_path):
    (tmp_path / "kl.py").write_text(EXAMPLE)
    with pytest.raises(StrategyError, match="'kl' is defined twice"):
        list_strategies([tmp_path])


BAD = {
    "broken_import": ("import not_a_module_anywhere\n", "failed to import (ModuleNotFoundError"),
    "no_class": ('"""Nothing here."""\nX = 1\n', "defines no class Strategy"),
    "not_contract": ('"""Wrong base."""\nclass Strategy:\n    pass\n', "must subclass"),
    "syntax": ('"""Oops."""\ndef f(:\n', "line 2: syntax error"),
    "bad_needs": (EXAMPLE.replace('("entropy", "exit_cdf")', '("entropopy",)'), "needs: unknown signal"),
}


@pytest.mark.parametrize("stem", sorted(BAD))
def test_bad_strategy_files_fail_in_one_line(tmp_path, monkeypatch, capsys, stem):
    text, msg = BAD[stem]
    (tmp_path / f"{stem}.py").write_text(text)
    with pytest.raises(StrategyError, match=msg.replace("(", r"\(")) as e:
        list_strategies([tmp_path]) and load_strategy(stem, [tmp_path])
    assert str(e.value).startswith(str(tmp_path / f"{stem}.py")) and "\n" not in str(e.value)
    out = run_cli(monkeypatch, capsys, "strategies", "--strategies-dir", tmp_path, "--check")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and f"{stem}.py" in out.stderr and msg in out.stderr


def test_cli_lists_strategies_and_rejects_a_missing_folder(tmp_path, monkeypatch, capsys):
    out = cli("strategies")  # the real console entry, in a fresh process
    assert out.returncode == 0
    for name in BUILTINS:
        assert name in out.stdout
    out = run_cli(monkeypatch, capsys, "strategies", "--strategies-dir", tmp_path / "nope")
    assert out.returncode == 2 and out.stderr.startswith("error: ")
    assert "strategies folder not found" in out.stderr


# --------------------------------------------------------------------------- packaging


def test_pyproject_ships_every_package():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkgs = set(cfg["packages"])
    assert cfg["package-dir"]["ouro_lab_strategies"] == "strategies"
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ouro_lab").rglob("__init__.py")}
    assert found <= pkgs, f"add {sorted(found - pkgs)} to [tool.setuptools] packages in pyproject.toml"


def test_installed_layout_finds_the_builtins(tmp_path):
    """What a wheel installs: ouro_lab/ and ouro_lab_strategies/ side by side, no checkout."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "ouro_lab", site / "ouro_lab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(builtin_dir(), site / "ouro_lab_strategies", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from ouro_lab.registry import builtin_dir, list_strategies, make_strategy; "
            "print(builtin_dir()); print(sorted(i.name for i in list_strategies())); "
            "print(make_strategy('threshold', {'q': 0.5}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(site / "ouro_lab_strategies")
    assert set(eval(lines[1])) >= BUILTINS


@pytest.mark.slow
def test_wheel_contains_the_builtins(tmp_path):
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(tmp_path)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    for name in BUILTINS:
        assert f"ouro_lab_strategies/{name}.py" in names


def test_signals_cover_every_recorded_name():
    assert set(random_signals(3, 5)) == set(SIGNALS)
