"""The strategy contract, enforced the same way in replay and live decoding, and
`ouro-lab strategies --check`: every case of issue 11's "what was seen" is refused in
one line naming the file, the setting and what came back."""

import os
import re
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from ouro_lab.contract import check_contract, synthetic_signals
from ouro_lab.registry import StrategyError, check_strategy, load_strategy, make_strategy
from ouro_lab.strategy import ContractError, replay, signals_markdown

ROOT = Path(__file__).resolve().parents[1]

HEAD = '''"""A test rule."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from ouro_lab.strategy import ExitStrategy, Signals


@dataclass
class Strategy(ExitStrategy):
'''
GOOD = HEAD + '''    q: float = 0.5
    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= self.q
'''

# stem -> (class body, message the refusal contains)
BROKEN = {
    "reads_undeclared": ('''    q: float = 0.5
    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return (s.entropy[r] < 1.0) & (s.exit_cdf[r] >= self.q)
''', "reads_undeclared(q=0.5): decide(s, r=0) read signal 'entropy', which needs = ('gate',) does "
     "not declare; add 'entropy' to needs"),
    "float_back": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r]
''', "float_back(): decide(s, r=0) must return an (N,) bool tensor (N = 200), got a float32 tensor of "
     "shape (200,)"),
    "column_back": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return (s.exit_cdf[r] > 0.5)[:, None]
''', "got a bool tensor of shape (200, 1)"),
    "short_back": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return (s.exit_cdf[r] > 0.5)[1:]
''', "got a bool tensor of shape (199,)"),
    "python_bool": ('''    needs: ClassVar[tuple[str, ...]] = ()

    def decide(self, s: Signals, r: int):
        return r >= 1
''', "got a Python bool (False)"),
    "raises": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= 1 / 0
''', "raises(): decide(s, r=0) raised ZeroDivisionError: division by zero"),
    "fit_raises": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def fit(self, calibration):
        raise ValueError("no budget")

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= 0.5
''', "fit_raises(): fit(calibration) raised ValueError: no budget"),
    "breaks_promise": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def earliest(self) -> int:  # promises no stop before step 2 (0-based)
        return 2

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= 0.0
''', "breaks_promise(): decide(s, r=0) stopped tokens before step 2, the earliest() it promises"),
    "earliest_raises": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def earliest(self) -> int:  # reads state that only fit() would set
        return self._k

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= 0.5
''', "earliest_raises(): earliest() raised AttributeError"),
    "earliest_not_int": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def earliest(self):
        return 1.5

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= 0.5
''', "earliest_not_int(): earliest() must return an int (a 0-based step), got float"),
    "peeks_ahead": ('''    needs: ClassVar[tuple[str, ...]] = ("gate",)
    _deepest: ClassVar[dict] = {}

    def decide(self, s: Signals, r: int):  # remembers the deepest step it was ever shown
        best = self._deepest.get(id(s.index))
        if best is None or best.shape[0] < r + 1:
            best = self._deepest[id(s.index)] = s.exit_cdf
        return best[-1] >= 0.5
''', "peeks_ahead(): decide(s, r=0) changed when steps after 1 changed"),
}


def write(folder: Path, stem: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{stem}.py"
    p.write_text(HEAD + body)
    return p


@pytest.mark.parametrize("stem", sorted(BROKEN))
def test_broken_rules_are_refused_in_replay_and_by_check(tmp_path, monkeypatch, capsys, stem):
    body, msg = BROKEN[stem]
    path = write(tmp_path, stem, body)
    with pytest.raises(ContractError) as e:
        check_strategy(stem, [tmp_path])
    text = str(e.value)
    assert text.startswith(str(path) + ": ") and msg in text and "\n" not in text, text
    if stem not in ("fit_raises", "peeks_ahead"):  # replay gives the same line as the check
        with pytest.raises(ContractError, match=re.escape(msg)):
            replay(make_strategy(stem, {}, [tmp_path]), synthetic_signals(4, 200, seed=1))
    out = run_cli(monkeypatch, capsys, "strategies", "--strategies-dir", tmp_path, "--check")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and msg in out.stderr, out.stderr
    if stem == "raises":  # the cause stays chained for OURO_LAB_DEBUG=1
        assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_check_lists_every_broken_file_and_passes_good_ones(tmp_path, monkeypatch, capsys):
    write(tmp_path, "fine", GOOD.removeprefix(HEAD))
    out = run_cli(monkeypatch, capsys, "strategies", "--strategies-dir", tmp_path, "--check")
    assert out.returncode == 0 and "fine" in out.stdout, out.stderr
    for stem in ("float_back", "raises"):
        write(tmp_path, stem, BROKEN[stem][0])
    out = run_cli(monkeypatch, capsys, "strategies", "--strategies-dir", tmp_path, "--check")
    assert out.returncode == 2 and out.stderr.count("error: ") == 2, out.stderr


def test_undeclared_signal_is_the_same_error_live(tmp_path):
    """Live decoding read `s.entropy` through an AttributeError traceback; now it is the
    replay's line (a rule reading the head is charged for it only once it declares it)."""
    from harness_helpers import make_model_dir

    from ouro_lab.live import live_generate
    from ouro_lab.loading import load_model, load_tokenizer

    write(tmp_path / "rules", "reads_undeclared", BROKEN["reads_undeclared"][0])
    mdir = make_model_dir(tmp_path / "m")
    model, tok = load_model(mdir), load_tokenizer(mdir)
    st = make_strategy("reads_undeclared", {}, [tmp_path / "rules"])
    with pytest.raises(ContractError, match=re.escape(BROKEN["reads_undeclared"][1])):
        live_generate(model, tok, [[3, 4, 5]], st, max_new_tokens=2)
    declared = BROKEN["reads_undeclared"][0].replace('("gate",)', '("gate", "entropy")')
    write(tmp_path / "rules", "declares", declared)
    fixed = make_strategy("declares", {}, [tmp_path / "rules"])
    texts, recs = live_generate(model, tok, [[3, 4, 5]], fixed, max_new_tokens=2)
    assert recs[0]["tokens"] == 2
    e = replay(fixed, synthetic_signals())
    assert torch.equal(fixed.readouts(e), e + 1)  # entropy reads the LM head at every step checked


def test_untyped_parameter_is_flagged(tmp_path, monkeypatch, capsys):
    write(tmp_path, "untyped", '''    q = 0.5
    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= self.q
''')
    with pytest.raises(StrategyError, match=re.escape("untyped.py: class attribute q = 0.5 has no type, so "
                                                      "it is not a parameter; write `q: float = 0.5`")):
        check_strategy("untyped", [tmp_path])
    with pytest.raises(StrategyError, match=re.escape("unknown parameter 'q'; q = 0.5 has no type")):
        make_strategy("untyped", {"q": 0.7}, [tmp_path])  # was: "it takes no parameters"
    out = run_cli(monkeypatch, capsys, "strategies", "--strategies-dir", tmp_path, "--check")
    assert out.returncode == 2 and "has no type" in out.stderr


@pytest.mark.parametrize("decl,shown", [("q: float = 'high'", "parameter q: float has default 'high', "
                                          "which is not a float"),
                                         ("q: int = 0.5", "parameter q: int has default 0.5"),
                                         ("q: float = '0.5'", "default '0.5', which is not a float")])
def test_wrong_typed_default_is_refused_at_load(tmp_path, decl, shown):
    write(tmp_path, "wrongdefault", f'''    {decl}
    needs: ClassVar[tuple[str, ...]] = ("gate",)

    def decide(self, s: Signals, r: int):
        return s.exit_cdf[r] >= 0.5
''')
    with pytest.raises(StrategyError, match=re.escape(shown)) as e:
        load_strategy("wrongdefault", [tmp_path])
    assert str(e.value).startswith(str(tmp_path / "wrongdefault.py"))


def test_every_builtin_passes_the_check():
    from ouro_lab.registry import list_strategies

    for info in list_strategies():
        check_strategy(info.name)


def test_check_contract_accepts_the_readme_example():
    check_contract(make_strategy("threshold", {"q": 0.3}))
    check_contract(make_strategy("budget", {}))  # builds with its defaults (a 2.0 mean-step budget)
    assert make_strategy("budget", {}).params()["mean_steps"] == 2.0
    with pytest.raises(StrategyError, match="set only one of the parameters mean_steps and flops"):
        make_strategy("budget", {"mean_steps": 2.0, "flops": 1e6})


def _readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {name}: begin.*?-->\n(.*?)\n<!-- {name}: end -->", text, re.S)
    assert m, f"README.md has no <!-- {name}: begin --> ... <!-- {name}: end --> block"
    return m.group(1)


def test_readme_lists_every_signal_and_alias_from_the_code():
    want = signals_markdown()
    assert _readme_block("signals") == want, "paste this into README.md's signals block:\n" + want


def test_readme_states_the_entry_point_format():
    from ouro_lab.registry import ENTRY_POINT_GROUP

    block = _readme_block("entry-points")
    assert f'[project.entry-points."{ENTRY_POINT_GROUP}"]' in block
    assert re.search(r'^\w+ = "[\w.]+"', block, re.M) and re.search(r'^\w+ = "[\w.]+:\w+"', block, re.M)


def test_entry_point_with_a_class_name(tmp_path, monkeypatch):
    """The README's second entry-point form, `module:Class`, loads that class."""
    (tmp_path / "ep_rule.py").write_text(GOOD.replace("class Strategy(", "class MyRule("))
    dist = tmp_path / "ep-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ouro_lab.strategies]\nmyrule = ep_rule:MyRule\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_strategy("myrule", {"q": 0.25}).params() == {"q": 0.25}
    check_strategy("myrule")


def test_debug_env_keeps_the_traceback(tmp_path):
    import subprocess
    import sys

    write(tmp_path, "raises", BROKEN["raises"][0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OURO_LAB_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-m", "ouro_lab.cli", "strategies", "--strategies-dir", tmp_path,
                          "--check"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ZeroDivisionError" in out.stderr


def test_eval_takes_strategies_dir(tmp_path, monkeypatch, capsys):
    """`ouro-lab eval --strategy NAME` found no file outside strategies/, though its own
    error said to pass --strategies-dir."""
    from harness_helpers import make_model_dir, make_tasks

    mdir, tasks = make_model_dir(tmp_path / "m"), make_tasks(tmp_path / "tasks", n=4)
    write(tmp_path / "rules", "fine", GOOD.removeprefix(HEAD))
    base = ["eval", mdir, "--tasks", "tiny_mc", "--include-path", tasks, "--strategy", "fine",
            "--cache-dir", tmp_path / "cache", "-p", "q=0.4"]
    out = run_cli(monkeypatch, capsys, *base)
    assert out.returncode == 2 and "unknown strategy 'fine'" in out.stderr
    assert "--strategies-dir" in out.stderr
    out = run_cli(monkeypatch, capsys, *base, "--strategies-dir", tmp_path / "rules", "--limit", "3")
    assert out.returncode == 0 and "tiny_mc" in out.stdout and "acc" in out.stdout, out.stderr
    assert "--limit scores the first documents of each file, not a sample" in out.stderr
