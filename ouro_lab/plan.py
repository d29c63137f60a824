"""What a recipe will run and what it costs, before anything runs (`validate`, `sweep --dry-run`).

    p = plan(recipe, settings, taskset)     # plain data: settings per strategy, tasks, passes, FLOPs
    describe(p, console)                    # the same as a table and a few lines

Reads the checkpoint's config.json and the tasks' requests; loads no model.
"""

from __future__ import annotations

import json

from ouro_lab.recipe import Recipe
from ouro_lab.settings import Setting, model_depth


def _cost(recipe: Recipe):
    from ouro_lab.flops import ModelCost
    from ouro_lab.loading import read_config

    cfg = read_config(recipe.model.path)  # checked: a broken config.json is one line
    cfg.total_ut_steps = model_depth(recipe)
    return ModelCost.from_config(cfg)


def plan(recipe: Recipe, settings: list[Setting], taskset=None) -> dict:
    """The expanded grid (per recipe strategy: its settings), the tasks with their documents
    and output types, and the model passes the sweep needs, with the trace pass's cost."""
    R = model_depth(recipe)
    cost = _cost(recipe)
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        groups.setdefault(f"{s.strategy}#{s.index}", []).append(s)
    out = {"settings": len(settings), "steps": R,
           "replayed": sum(s.kind != "speculative" for s in settings),  # speculative ones only decode
           "strategies": [{"strategy": ss[0].strategy, "settings": len(ss), "params": [s.params for s in ss],
                           "labels": [s.label for s in ss], "granularity": ss[0].granularity,
                           "live": ss[0].live} for ss in groups.values()],
           "flops_per_token_full": cost.token_flops(R, ctx=0), "flops_per_step": cost.step_flops(0),
           "attn_flops_per_ctx": cost.attn_flops_per_ctx, "tasks": {}}
    if taskset is None:
        return out
    ll = taskset.names_of("multiple_choice", "loglikelihood", "loglikelihood_rolling")
    gen = taskset.names_of("generate_until")
    decodable = [s for s in settings if s.kind != "select" and not s.fitted and s.granularity == "token"]
    from ouro_lab.tracing import estimate

    requests, tokens, flops = estimate(taskset, ll, cost, R)  # the requests' prefix tree, as the pass runs it
    out["tasks"] = {name: {"output_type": taskset.tasks[name].OUTPUT_TYPE, **taskset.selection(name)}
                    for name in recipe.tasks.names}
    out["passes"] = {"trace_passes": 1 if ll else 0, "trace_requests": requests, "trace_tokens": tokens,
                     "trace_flops": flops, "live_loglikelihood_runs": sum(s.live for s in settings) * len(ll),
                     "live_generation_runs": len(decodable) * len(gen)}
    return out


def describe(p: dict, console) -> None:
    """The plan as a table of settings per strategy and a few lines (console: stdout for
    `validate` and `--dry-run`, where it is the result)."""
    from rich.table import Table

    t = Table(title=f"{p['settings']} settings over {len(p['tasks']) or 'the'} task(s): "
                    f"{', '.join(p['tasks'])}")
    for col in ("strategy", "settings", "params", "granularity", "live"):
        t.add_column(col, overflow="fold")
    for g in p["strategies"]:
        params = [json.dumps(x, sort_keys=True) for x in g["params"]]
        shown = "; ".join(params[:6]) + (" ..." if len(params) > 6 else "")
        t.add_row(g["strategy"], str(g["settings"]), shown, g["granularity"], "yes" if g["live"] else "-")
    console.print(t)
    console.print(f"FLOPs per token at full depth ({p['steps']} steps, context 0): "
                  f"{p['flops_per_token_full'] / 1e6:,.3f} MFLOP; per step {p['flops_per_step'] / 1e6:,.3f} "
                  f"MFLOP + {p['attn_flops_per_ctx']:,} x ctx", highlight=False)
    for name, t in p["tasks"].items():
        console.print(f"task {name}: {t['output_type']}, {t['documents']} of {t['of']} documents "
                      f"({SELECTION[t['how']]})", highlight=False)
    if "passes" in p:
        q = p["passes"]
        live = f"{q['live_loglikelihood_runs']} live loglikelihood run(s)"
        console.print(f"model passes: {q['trace_passes']} full-depth trace pass ({q['trace_requests']} "
                      f"requests, ~{q['trace_tokens']:,} distinct prefix tokens, "
                      f"~{q['trace_flops'] / 1e9:,.2f} GFLOP; 0 if a cached trace matches) + {live} + "
                      f"{q['live_generation_runs']} live generation run(s); replaying {p['replayed']} "
                      "settings needs no model", highlight=False)


SELECTION = {"all": "all", "limit": "the first ones: tasks.limit", "sample": "a seeded random sample"}
