"""Recipes: schema, line-numbered errors (all at once), overrides, JSON schema export, stats."""

import json
from pathlib import Path

import numpy as np
import pytest

from ouro_lab import stats
from ouro_lab.recipe import RecipeError, json_schema, load_recipe, recipe_hash

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path, tiny_config):
    from ouro_lab.loading import save_model
    from ouro_lab.model import OuroForCausalLM, init_weights

    return save_model(init_weights(OuroForCausalLM(tiny_config), seed=0), tmp_path / "ckpt")


def write(tmp_path, text, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """# ouro-lab sweep r.yaml
model: {path: ckpt, dtype: float32}
tasks: {names: [t1], limit: 5}
strategies:
  - name: threshold
    grid: {q: [0.3, 0.5]}
"""


def test_good_recipe_resolves_paths_and_defaults(tmp_path, ckpt):
    recipe, _ = load_recipe(write(tmp_path, GOOD))
    assert recipe.model.path == str(ckpt.resolve())
    assert recipe.tasks.names == ["t1"] and recipe.tasks.limit == 5
    assert recipe.seed == 1234 and recipe.granularity == "token" and recipe.bootstrap == 1000
    assert recipe.strategies[0].grid == {"q": [0.3, 0.5]}


def test_task_list_shorthand(tmp_path, ckpt):
    recipe, _ = load_recipe(write(tmp_path, GOOD.replace("{names: [t1], limit: 5}", "[t1, t2]")))
    assert recipe.tasks.names == ["t1", "t2"] and recipe.tasks.limit is None


def test_every_error_at_once_with_file_line_and_field(tmp_path, ckpt):
    bad = """model:
  path: ckpt
  dtyp: float32
  device: gpu
tasks:
  names: [t1]
  limit: ten
strategies:
  - name: treshold
  - name: threshold
    grid: {qq: [0.5]}
seed: abc
granularity: word
"""
    f = write(tmp_path, bad)
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    lines = e.value.errors
    assert all(line.startswith(f"{f}:") for line in lines), lines
    text = "\n".join(lines)
    assert f"{f}:3: model.dtyp: unknown key; did you mean 'dtype'?" in text
    assert "(allowed: path, dtype, device, steps, threads, chat_template)" in text
    assert f"{f}:4: model.device: 'gpu' is not allowed (allowed: cpu, cuda" in text
    assert f"{f}:7: tasks.limit:" in text and "'ten'" in text
    assert f"{f}:9: strategies[0].name: unknown strategy 'treshold'; did you mean 'threshold'?" in text
    assert f"{f}:11: strategies[1].grid:" in text and "did you mean 'q'?" in text
    assert f"{f}:12: seed:" in text
    assert f"{f}:13: granularity: 'word' is not allowed (allowed: 'token' or 'sequence')" in text
    assert len(lines) == 7


def test_speculative_settings_and_their_errors(tmp_path, ckpt):
    """speculative: a draft rule's grid x draft lengths, one setting each (the label names
    both); bad lengths, unknown or unfit draft rules are one line each, file:line:field."""
    from ouro_lab.settings import expand_settings

    spec = "speculative:\n  - {draft: {name: fixed, grid: {step: [1, 2]}}, draft_len: [2, 4]}\n"
    recipe, src = load_recipe(write(tmp_path, GOOD + spec))
    got = [s for s in expand_settings(recipe, src) if s.kind == "speculative"]
    assert [s.label for s in got] == [f"speculative(draft=fixed(step={k}),draft_len={n})"
                                      for k in (1, 2) for n in (2, 4)]
    assert [s.draft_len for s in got] == [2, 4, 2, 4] and got[0].obj.step == 1
    bad = GOOD + ("speculative:\n  - {draft: {name: fixd}, draft_len: 0}\n"
                  "  - {draft: {name: fixed, grid: {stp: 1}}, draft_len: [3, 99]}\n  - {draft_len: 2}\n")
    f = write(tmp_path, bad)
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    text = "\n".join(e.value.errors)
    assert f"{f}:8: speculative[0].draft_len:" in text and "1..64" in text
    assert f"{f}:8: speculative[0].draft.name: unknown strategy 'fixd'; did you mean 'fixed'?" in text
    assert f"{f}:9: speculative[1].draft_len:" in text and "got 99" in text
    assert f"{f}:9: speculative[1].draft.grid:" in text and "did you mean 'step'?" in text
    assert f"{f}:10: speculative[2].draft: required field missing" in text
    assert len(e.value.errors) == 5
    recipe, src = load_recipe(write(tmp_path, GOOD + "speculative:\n  - {draft: {name: oracle}}\n"))
    with pytest.raises(RecipeError, match=r"r.yaml:8: speculative\[0\].draft.name: oracle cannot draft"):
        expand_settings(recipe, src)


def test_wrong_type_of_grid_parameter(tmp_path, ckpt):
    f = write(tmp_path, GOOD.replace("[0.3, 0.5]", "[0.3, high]"))
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert e.value.errors == [f"{f}:6: strategies[0].grid: strategies/threshold.py: parameter q must be "
                              "float, got 'high'"]


def test_missing_model_folder_and_yaml_syntax(tmp_path):
    f = write(tmp_path, GOOD)
    with pytest.raises(RecipeError, match=r"r.yaml:2: model.path: .*ckpt: no such folder"):
        load_recipe(f)
    f = write(tmp_path, "model: {path: x\ntasks: [a]\n", "broken.yaml")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: not valid YAML"):
        load_recipe(f)
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_dotted_keys_and_their_errors(tmp_path, ckpt, monkeypatch):
    f = write(tmp_path, GOOD)
    recipe, _ = load_recipe(f, ["tasks.limit=3", "model.dtype=bfloat16", "strategies.0.grid.q=[0.9]",
                                "seed=7", "tasks.names=[a,b]"])
    assert (recipe.tasks.limit, recipe.model.dtype, recipe.seed) == (3, "bfloat16", 7)
    assert recipe.strategies[0].grid == {"q": [0.9]} and recipe.tasks.names == ["a", "b"]
    with pytest.raises(RecipeError) as e:
        load_recipe(f, ["tasks.limit=-2", "batch_sise=4"])
    assert f"{f}: override tasks.limit=-2: tasks.limit: Input should be greater than or equal to 1" \
        in e.value.errors
    assert any("override batch_sise=4: batch_sise: unknown key; did you mean 'batch_size'?" in x
               for x in e.value.errors)
    # a path given on the command line resolves against the working directory
    monkeypatch.chdir(tmp_path / "ckpt")
    recipe, _ = load_recipe(f, ["model.path=."])
    assert recipe.model.path == str(ckpt.resolve())
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(f, ["justakey"])


@pytest.mark.parametrize("override, words", [
    ("tasks.names.0.foo=1", "tasks.names[0]: is a string, not a mapping or list"),
    ("tasks.names.0.x.y=1", "tasks.names[0]: is a string, not a mapping or list"),
    ("model.path.x=1", "model.path: is a string, not a mapping or list"),
    ("strategies.0.grid.q.0.z=3", "strategies[0].grid.q[0]: is a number, not a mapping or list"),
    ("tasks.names.5.x=1", "tasks.names[5]: no such list item (the list has 1)"),
])
def test_override_through_a_scalar_is_one_line_naming_the_file(tmp_path, ckpt, override, words):
    f = write(tmp_path, GOOD)
    with pytest.raises(RecipeError) as e:
        load_recipe(f, [override])
    assert e.value.errors == [f"{f}: override {override}: {words}" + e.value.errors[0].split(words, 1)[1]]


def test_strategies_dirs_as_one_string_is_a_one_item_list(tmp_path, ckpt):
    f = write(tmp_path, GOOD)
    with pytest.raises(RecipeError) as e:
        load_recipe(f, ["strategies_dirs=/nonexistent"])
    assert e.value.errors == [f"{f}: override strategies_dirs=/nonexistent: strategies_dirs[0]: "
                              "/nonexistent: no such folder"]
    (tmp_path / "mine").mkdir()
    recipe, _ = load_recipe(write(tmp_path, GOOD + "strategies_dirs: mine\n"))
    assert recipe.strategies_dirs == [str((tmp_path / "mine").resolve())]


@pytest.mark.parametrize("value, words", [
    (".nan", "strategies/threshold.py: parameter q must be a finite number, got nan"),
    (".inf", "strategies/threshold.py: parameter q must be a finite number, got inf"),
    ("-.inf", "strategies/threshold.py: parameter q must be a finite number, got -inf"),
    ("1e400", "parameter q must be a finite number, got '1e400'"),  # YAML 1.1: a string, parsed later
    ("nan", "parameter q must be a finite number, got 'nan'"),
])
def test_non_finite_grid_values_are_refused(tmp_path, ckpt, value, words):
    f = write(tmp_path, GOOD.replace("q: [0.3, 0.5]", f"q: [0.3, {value}]"))
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith(f"{f}:6: strategies[0].grid: ")
    assert words in e.value.errors[0]


@pytest.mark.parametrize("line, words", [
    ("batch_size: true", "batch_size: True is not allowed (allowed: a positive integer, or auto)"),
    ("tolerance: .inf", "tolerance: Input should be a finite number"),
])
def test_a_flag_or_an_infinity_where_a_number_belongs(tmp_path, ckpt, line, words):
    """YAML's `true` read as batch 1 and an infinite tolerance passed (everything "within" it)."""
    f = write(tmp_path, GOOD + line + "\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert len(e.value.errors) == 1 and words in e.value.errors[0]


def test_fixed_step_past_the_models_depth_is_refused(tmp_path, ckpt):
    from ouro_lab.settings import expand_settings

    text = (GOOD + "  - {name: fixed, grid: {step: [2, 9]}}\n"
            "speculative:\n  - draft: {name: fixed, grid: {step: 5}}\n")
    f = write(tmp_path, text)
    recipe, src = load_recipe(f)
    with pytest.raises(RecipeError) as e:
        expand_settings(recipe, src)
    depth = (f"4 loop steps (total_ut_steps in {ckpt.resolve()}/config.json); use 1..4, or set model.steps "
             "to run the model deeper")
    assert e.value.errors == [f"{f}:7: strategies[1].grid.step: step 9 is past the model's {depth}",
                              f"{f}:9: speculative[0].draft.grid.step: step 5 is past the model's {depth}"]
    recipe, src = load_recipe(f, ["model.steps=9"])  # extrapolating: the bound is model.steps
    assert {s.label for s in expand_settings(recipe, src)} >= {"fixed(step=9)", "fixed(step=2)"}
    recipe, src = load_recipe(f, ["model.steps=6"])
    with pytest.raises(RecipeError, match=r"step 9 is past the model's 6 loop steps \(model.steps\)"):
        expand_settings(recipe, src)


def test_recipe_hash_ignores_output_only(tmp_path, ckpt):
    f = write(tmp_path, GOOD)
    a, _ = load_recipe(f)
    b, _ = load_recipe(f, ["output=elsewhere"])
    c, _ = load_recipe(f, ["seed=1"])
    assert recipe_hash(a) == recipe_hash(b) != recipe_hash(c)


def test_exported_json_schema_is_current():
    committed = json.loads((ROOT / "recipes" / "recipe.schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema()))
    assert set(committed["properties"]) >= {"model", "tasks", "strategies", "seed", "output"}
    assert committed["additionalProperties"] is False


def test_demo_recipe_is_valid_and_starts_with_its_command():
    demo = ROOT / "recipes" / "demo.yaml"
    assert demo.read_text().splitlines()[0] == "# ouro-lab sweep recipes/demo.yaml"
    if not (ROOT / "ouro_lab" / "builtin" / "loop-demo" / "config.json").is_file():
        pytest.skip("demo checkpoint not built yet")
    recipe, _ = load_recipe(demo)
    from ouro_lab.registry import list_strategies

    assert {s.name for s in recipe.strategies} >= {i.name for i in list_strategies()} - {"fixed"}


# --------------------------------------------------------------------------- stats


def test_bootstrap_is_deterministic_and_paired():
    idx = stats.bootstrap_indices(50, 200, seed=3)
    assert idx.shape == (200, 50) and np.array_equal(idx, stats.bootstrap_indices(50, 200, seed=3))
    x = np.r_[np.ones(30), np.zeros(20)]
    lo, hi = stats.mean_ci(x, idx)
    assert lo < 0.6 < hi and lo > 0.4 and hi < 0.8
    lo, hi = stats.mean_ci(x - x, idx)  # a setting compared with itself: no spread at all
    assert lo == hi == 0.0


def test_pareto_front_and_auc():
    cost = np.array([1.0, 2.0, 3.0, 2.5, 4.0])
    acc = np.array([0.5, 0.7, 0.9, 0.6, 0.9])
    assert stats.pareto_front(cost, acc).tolist() == [True, True, True, False, False]
    a, lo, hi = stats.auc([0.25, 0.5, 1.0], [0.2, 0.6, 1.0])
    assert (lo, hi) == (0.25, 1.0)
    assert a == pytest.approx((0.25 * 0.4 + 0.5 * 0.8) / 0.75)
    assert stats.auc([0.5], [0.7]) == (0.7, 0.5, 0.5)


def test_compute_saved_picks_cheapest_within_tolerance():
    rng = np.random.default_rng(0)
    n = 400
    full = (rng.random(n) < 0.8).astype(float)
    cheap = full.copy()
    cheap[:40] = 0  # loses 10 points where full was right
    mid = full.copy()
    mid[np.flatnonzero(full)[:2]] = 0  # loses 0.5 point
    tokens = np.ones(n)
    flops = np.stack([np.full(n, 25.0), np.full(n, 50.0)])
    res = stats.compute_saved(np.stack([cheap, mid]), flops, tokens, full, np.full(n, 100.0),
                              stats.bootstrap_indices(n, 300, 0), tolerance=0.01)
    assert res["setting"] == 1 and res["saved"] == pytest.approx(0.5)
    assert res["delta"] == pytest.approx(-2 / n)
    assert res["ci_low"] <= 0.5 <= res["ci_high"]
    none = stats.compute_saved(cheap[None], flops[:1], tokens, full, np.full(n, 100.0),
                               stats.bootstrap_indices(n, 50, 0), tolerance=0.01)
    assert none["setting"] == -1 and none["saved"] == 0.0


def test_best_at_budgets():
    pts = [{"setting": "a", "value": 0.5, "flops_rel": 0.3}, {"setting": "b", "value": 0.7, "flops_rel": 0.6},
           {"setting": "c", "value": 0.6, "flops_rel": 0.5}]
    best = stats.best_at_budgets(pts, [0.2, 0.5, 1.0])
    assert best[0] is None and best[1]["setting"] == "c" and best[2]["setting"] == "b"
