"""Recipe -> settings: every fixed step plus each strategy's grid, and cross-fitting of calibrated rules.

    settings = expand_settings(recipe, src)      # Setting per (strategy, params, granularity)
    fold = folds_of(trace, units_meta, folds, seed)
    strategy = cross_fit(setting, trace, fold, folds)   # fitted on the other folds only
"""

from __future__ import annotations

import hashlib
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
    cfg = json.loads((Path(recipe.model.path) / "config.json").read_text())
    return int(cfg.get("total_ut_steps", 4))


def expand_settings(recipe: Recipe, src: RecipeSource) -> list[Setting]:
    """Every fixed step 1..R (R = full depth), then every recipe strategy's grid, in order;
    duplicates (same strategy, params, granularity) are kept once."""
    from ouro_lab.registry import expand_grid
    from ouro_lab.strategy import ExitStrategy

    R = model_depth(recipe)
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
            add(Setting(spec.name, obj.params(), spec.granularity or recipe.granularity, i, spec.live,
                        False, type(obj).kind, fitted, obj, tuple(spec.grid)))
    if errors:
        raise RecipeError(errors)
    return out


# --------------------------------------------------------------------------- cross-fitting


def folds_of(trace, units_meta: list[tuple], folds: int, seed: int):
    """(N,) fold of every trace token: a seeded hash of its (task, doc_id), so all
    requests of a document share a fold."""
    import torch

    doc_fold = []
    for task, doc_id, *_ in units_meta:
        h = hashlib.blake2b(f"{seed}:{task}:{doc_id}".encode(), digest_size=8).digest()
        doc_fold.append(int.from_bytes(h, "little") % folds)
    return torch.tensor(doc_fold, dtype=torch.long)[trace.request]


def cross_fit(setting: Setting, trace, fold, folds: int):
    """A strategy made of `folds` copies, copy k fitted on the tokens of every other fold
    and deciding for the tokens of fold k: no document is scored by a rule fitted on it."""
    import copy

    from ouro_lab.strategy import ExitStrategy

    fitted = []
    for k in range(folds):
        s = copy.deepcopy(setting.obj)
        rows = (fold != k).nonzero()[:, 0]
        s.fit(trace.subset(rows).to_signals())
        fitted.append(s)
    base = setting.obj

    class CrossFitted(ExitStrategy):
        needs = type(base).needs
        kind = type(base).kind

        def decide(self, s, r):
            import torch

            out = torch.zeros(s.n, dtype=torch.bool)
            f = fold[s.index]
            for k, strat in enumerate(fitted):
                rows = (f == k).nonzero()[:, 0]
                if len(rows):
                    out[rows] = strat.decide(s.subset(rows), r).bool()
            return out

        def readouts(self, exit_step):
            return base.readouts(exit_step)

    cf = CrossFitted()
    cf.needs = getattr(base, "needs", type(base).needs)
    return cf
