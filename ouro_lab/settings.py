"""Recipe -> settings: every fixed step plus each strategy's grid, and cross-fitting of calibrated rules.

    settings = expand_settings(recipe, src)      # Setting per (strategy, params, granularity)
    fold = folds_of(trace, units_meta, folds, seed)
    strategy = cross_fit(setting, trace, fold, folds)   # fitted on the other folds only
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ouro_lab.errors import OuroLabError
from ouro_lab.recipe import Recipe, RecipeError, RecipeSource

# --------------------------------------------------------------------------- settings


@dataclass
class Setting:
    strategy: str
    params: dict
    granularity: str
    index: int = -1          # the recipe's strategies[index] (-1: the built-in fixed steps)
    live: bool = False
    is_full: bool = False
    kind: str = "skip"
    fitted: bool = False     # calibrates on data (cross-fitted over folds)
    obj: object = field(default=None, repr=False)
    shown: tuple = ()        # the parameters the label shows (those the grid sets)
    draft_len: int | None = None  # speculative decoding (`obj` drafts): tokens drafted per round

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={self.params[k]}" for k in (self.shown or self.params))
        gran = "" if self.granularity == "token" else "/seq"
        return f"{self.strategy}({inner}){gran}"


def model_depth(recipe: Recipe) -> int:
    if recipe.model.steps:
        return recipe.model.steps
    from ouro_lab.loading import read_config

    return read_config(recipe.model.path).total_ut_steps  # checked: a broken config.json is one line


def cannot_decode(s: Setting) -> str | None:
    """Why a setting cannot decode a generation task token by token (None: it can)."""
    if s.kind == "select":
        return "it selects a step per document from the answers"
    if s.fitted:
        return "it calibrates on a trace, which generation tasks do not have"
    if s.granularity != "token":
        return "it decides once per continuation, which decoding cannot know in advance"
    return None


def past_depth(obj, R: int, recipe: Recipe, src: RecipeSource, where: tuple, errors: list, given=()) -> bool:
    """A parameter counted in loop steps (`depth_params`: `fixed`'s step, `random`'s mean
    steps, ...) past the model's depth would run, and be reported as, what the model cannot
    do: refused, naming the depth and where it comes from. `where` is the grid's location;
    only the parameters the grid gives (`given`) are checked (a default is the file's)."""
    params = obj.params()
    for p in (p for p in getattr(type(obj), "depth_params", ()) if p in given):
        v = params.get(p)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= R:
            continue
        depth = "model.steps" if recipe.model.steps else f"total_ut_steps in {recipe.model.path}/config.json"
        errors.append(src.error((*where, p), f"{p} {v:g} is past the model's {R} loop steps ({depth}); use "
                                f"1..{R}, or set model.steps to run the model deeper"))
        return True
    return False


def expand_settings(recipe: Recipe, src: RecipeSource) -> list[Setting]:
    """Every fixed step 1..R (R = full depth), then every recipe strategy's grid, in order;
    duplicates (same strategy, params, granularity) are kept once."""
    from ouro_lab.registry import expand_grid
    from ouro_lab.strategy import ExitStrategy

    try:
        R = model_depth(recipe)
    except OuroLabError as e:  # the checkpoint's config.json: one line naming the recipe's field too
        raise RecipeError([src.error(("model", "path"), str(e))]) from None
    dirs = [Path(d) for d in recipe.strategies_dirs]
    out, seen = [], {}

    def add(s: Setting):
        k = (s.strategy, s.params_json, s.granularity)
        if k not in seen:
            seen[k] = s
            out.append(s)
        else:  # listed twice: one setting, live if either asks
            seen[k].live |= s.live

    for k in range(1, R + 1):
        add(Setting("fixed", {"step": k}, "token", -1, is_full=k == R,
                    obj=expand_grid("fixed", {"step": k}, dirs)[0]))
    errors = []
    for i, spec in enumerate(recipe.strategies):
        try:
            objs = expand_grid(spec.name, spec.grid, dirs)
        except OuroLabError as e:
            errors.append(src.error(("strategies", i, "grid"), str(e)))
            continue
        for obj in objs:
            fitted = type(obj).fit is not ExitStrategy.fit
            if fitted and spec.live:
                errors.append(src.error(("strategies", i, "live"), f"{spec.name} calibrates on data; "
                                        "live runs are only for rules without calibration (set live: false)"))
                break
            if fitted and (spec.granularity or recipe.granularity) == "sequence":
                errors.append(src.error(("strategies", i, "granularity"), f"{spec.name} calibrates its "
                                        "budget per token; use granularity: token for it"))
                break
            if spec.live and type(obj).kind == "select":
                errors.append(src.error(("strategies", i, "live"), f"{spec.name} only selects a step (an "
                                        "oracle); it cannot run live (set live: false)"))
                break
            if spec.live and (spec.granularity or recipe.granularity) == "sequence":
                errors.append(src.error(("strategies", i, "live"), "live runs decide token by token; use "
                                        "granularity: token for live settings (or set live: false)"))
                break
            if past_depth(obj, R, recipe, src, ("strategies", i, "grid"), errors, spec.grid):
                break
            add(Setting(spec.name, obj.params(), spec.granularity or recipe.granularity, i, spec.live,
                        False, type(obj).kind, fitted, obj, tuple(spec.grid)))
    for i, spec in enumerate(recipe.speculative):
        for sp in _speculative(spec, i, dirs, src, errors, recipe, R):
            add(sp)
    if errors:
        raise RecipeError(errors)
    return out


def _speculative(spec, i: int, dirs, src: RecipeSource, errors: list, recipe: Recipe,
                 R: int) -> list[Setting]:
    """The settings of `speculative[i]`: every draft rule of its grid x every draft length."""
    from ouro_lab.registry import expand_grid
    from ouro_lab.strategy import ExitStrategy

    try:
        objs = expand_grid(spec.draft.name, spec.draft.grid, dirs)
    except OuroLabError as e:
        errors.append(src.error(("speculative", i, "draft"), str(e)))
        return []
    lens = spec.draft_len if isinstance(spec.draft_len, list) else [spec.draft_len]
    out = []
    for obj in objs:
        if type(obj).fit is not ExitStrategy.fit or type(obj).kind == "select":
            errors.append(src.error(("speculative", i, "draft", "name"), f"{spec.draft.name} cannot draft "
                                    "(it calibrates on data or reads the answer); use a rule that decides "
                                    "from the steps it ran, e.g. fixed or threshold"))
            return []
        if past_depth(obj, R, recipe, src, ("speculative", i, "draft", "grid"), errors, spec.draft.grid):
            return []
        draft = Setting(spec.draft.name, obj.params(), "token", shown=tuple(spec.draft.grid)).label
        for n in lens:
            params = {"draft": draft, "draft_len": n, "draft_rule": spec.draft.name,
                      **{f"draft_{k}": v for k, v in obj.params().items()}}  # flat: one param_ column each
            out.append(Setting("speculative", params, "token", i, kind="speculative", obj=obj,
                               shown=("draft", "draft_len"), draft_len=n))
    return out


def kv_policy_of(s: Setting, recipe: Recipe) -> str:
    """A live run's KV policy: the recipe's, but speculative decoding drafts under `copy`
    (its verify pass needs every step's slot)."""
    return "copy" if s.kind == "speculative" else recipe.live.kv_policy


def check_speculative(recipe: Recipe, src: RecipeSource, taskset) -> None:
    """Speculative decoding decodes: refuse it when no task generates."""
    if recipe.speculative and not taskset.names_of("generate_until"):
        raise RecipeError([src.error(("speculative",), "speculative decoding runs on generate_until tasks, "
                                     f"and none of {', '.join(recipe.tasks.names)} is one; add one or drop "
                                     "`speculative`")])


# --------------------------------------------------------------------------- cross-fitting


def folds_of(trace, units_meta: list[tuple], folds: int, seed: int):
    """(N,) fold of every trace token: a seeded hash of its (task, doc_id)
    (`stats.doc_folds`, as the report's cross-fitted savings use), so all requests of a
    document share a fold."""
    import torch

    from ouro_lab.stats import doc_folds

    doc_fold = doc_folds([u[0] for u in units_meta], [u[1] for u in units_meta], folds, seed)
    return torch.as_tensor(doc_fold, dtype=torch.long)[trace.request]


def doc_outcomes(taskset, trace, strategy):
    """For calibration: rows (trace tokens) -> outcome(exit steps of those rows) -> each of
    their documents' score under its task's primary metric, (D,) float64 in (task, doc)
    order, scored by lm-eval with every other token at full depth."""
    import numpy as np
    import torch

    from ouro_lab.scoring import _unit_meta, score
    from ouro_lab.stats import primary_metric

    meta, R = _unit_meta(trace), trace.steps

    def for_rows(rows):
        docs = sorted({(meta[u][0], int(meta[u][1])) for u in trace.request[rows].unique().tolist()})

        def outcome(exit_rows):
            e = torch.full((trace.n,), R - 1, dtype=torch.long)
            e[rows] = exit_rows.long()
            _, samples = score(taskset, trace, strategy, exit_step=e, bootstrap_iters=0)
            if "filter" in samples.columns:
                samples = samples[samples["filter"] == sorted(samples["filter"].unique(),
                                                              key=lambda f: (f != "none", f))[0]]
            got = {}
            for task, d in samples.groupby("task"):
                col = primary_metric([c for c in d.columns if c not in NOT_METRICS and d[c].notna().any()])
                _bounded_mean(taskset, task, col, d[col].to_numpy(np.float64), strategy)
                got.update({(task, int(i)): float(v) for i, v in zip(d.doc_id, d[col], strict=True)})
            return torch.tensor(np.array([got[k] for k in docs], dtype=np.float64))

        return outcome

    return for_rows


def _bounded_mean(taskset, task: str, metric: str, values, strategy) -> None:
    """A calibration outcome must be a per-document score in [0, 1] that the task averages
    (accuracy, exact match): a loss bound in those units means nothing for a perplexity,
    whose per-document values are log-likelihoods."""
    import numpy as np
    from lm_eval.api.metrics import mean

    from ouro_lab.strategy import origin

    agg = taskset.tasks[task].aggregation().get(metric) if task in taskset.tasks else None
    if agg is mean and np.all((values >= 0) & (values <= 1)):
        return
    what = (f"aggregated by {getattr(agg, '__name__', agg)}, not a mean over documents" if agg is not mean
            else "with per-document values missing or outside [0, 1]")
    raise OuroLabError(f"{origin(strategy)[0]}: calibrates on each document's score, but task {task}'s "
                        f"primary metric {metric} is {what}; use this rule on tasks scored per document "
                        "in [0, 1] (accuracy, exact match), or `budget` for the others")


NOT_METRICS = {"task", "doc_id", "filter", "difficulty", "steps_used", "steps_executed", "flops_per_token",
               "flops_executed_per_token"}


def cross_fit(setting: Setting, trace, fold, folds: int, seed: int = 0, outcomes=None):
    """A strategy made of copies, per task and fold: copy (t, k) fitted on task t's tokens
    of every other fold and deciding for task t's tokens of fold k, so no document is
    scored by a rule fitted on it. `outcomes` (`doc_outcomes`) gives calibration sets
    their per-document scores. `fitted_records()` says what each copy chose and whether
    its fit read those scores (`reads_outcomes`: then the report cannot cross-fit a choice
    among its settings, whose other-fold results were fitted on the held-out fold's answers)."""
    import copy

    import torch

    from ouro_lab.scoring import _unit_meta
    from ouro_lab.strategy import ExitStrategy, decide_checked, earliest, expand_needs, fit_checked

    meta = _unit_meta(trace)
    tasks = sorted({u[0] for u in meta})
    unit_task = torch.tensor([tasks.index(u[0]) for u in meta], dtype=torch.long)
    part = unit_task[trace.request] * folds + fold  # (N,) which copy decides for each token
    everything = trace.to_signals(seed=seed)
    fitted, records = {}, []
    for t, task in enumerate(tasks):
        for k in range(folds):
            rows = ((part // folds == t) & (fold != k)).nonzero()[:, 0]
            cal = everything.subset(rows)
            read = []
            if outcomes is not None:
                score = outcomes(rows)
                cal.outcome = lambda e, score=score, read=read: read.append(1) or score(e)
            s = copy.deepcopy(setting.obj)
            fit_checked(s, cal)
            fitted[t * folds + k] = s
            seen = (*getattr(s, "needs", ()), *getattr(s, "fit_needs", ()))  # what fit() may read
            answers = bool(expand_needs(seen) & {"target_logprob", "target_is_argmax"})
            records.append({"task": task, "fold": k, "calibration_tokens": int(rows.numel()),
                            "reads_outcomes": bool(read) or answers, **s.fitted()})
    base = setting.obj

    class CrossFitted(ExitStrategy):
        needs = type(base).needs
        kind = type(base).kind
        wrapped = base  # errors name the strategy's own file and setting

        def decide(self, s, r):
            out = torch.zeros(s.n, dtype=torch.bool)
            p = part[s.index]
            for key, strat in fitted.items():
                rows = (p == key).nonzero()[:, 0]
                if len(rows):
                    out[rows] = decide_checked(strat, s.subset(rows), r)
            return out

        def readouts(self, exit_step):
            return base.readouts(exit_step)

        def earliest(self):
            return min(earliest(s) for s in fitted.values()) if fitted else 0

        def fitted_records(self):
            return records

    cf = CrossFitted()
    cf.needs = getattr(base, "needs", type(base).needs)
    return cf


def check_folds(recipe: Recipe, src: RecipeSource, settings: list[Setting], taskset) -> None:
    """Calibrating rules are fitted per task on the other folds of its documents: refuse a
    replayed task whose folds (a seeded hash of each document, `stats.doc_folds`) leave
    one empty (some copy would be fitted on every document, or decide for none). Without
    such rules a small run is fine: the report then gives no cross-fitted figure."""
    from ouro_lab.lm import LL_TYPES
    from ouro_lab.stats import doc_folds

    if not any(s.fitted for s in settings):
        return
    folds, seed = recipe.calibration.folds, recipe.calibration.seed
    for name in taskset.names_of("multiple_choice", *LL_TYPES):
        docs = taskset.selection(name)["documents"]
        empty = folds - len(set(doc_folds([name] * docs, range(docs), folds, seed).tolist()))
        if empty and folds <= docs:
            raise RecipeError([src.error(("calibration", "folds"), f"{folds} folds of task {name}'s {docs} "
                                         f"documents leave {empty} empty (calibration.seed {seed}); use "
                                         "fewer folds, another calibration.seed, or more documents")])
        if folds > docs:
            raise RecipeError([src.error(("calibration", "folds"), f"{folds} folds, but task {name} has "
                                         f"{docs} documents; use at most {docs} folds, or more documents "
                                         "(tasks.limit or tasks.sample)")])
