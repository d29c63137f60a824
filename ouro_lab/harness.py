"""The lm-eval integration's public names in one place (compatibility: each lives in its own module).

    from ouro_lab.harness import OuroLM, trace_pass, score   # still works, as before

    lm = OuroLM(path="ckpt/", steps=2)                       # ouro_lab.lm: a plain lm-eval LM (k steps)
    tasks = TaskSet(["loop_demo_mc"], limit=200)             # ouro_lab.tasks: task objects, built once
    trace, units = trace_pass(model, tok, tasks)             # ouro_lab.tracing: ONE full-depth pass, cached
    metrics, samples = score(tasks, trace, strategy)         # ouro_lab.scoring: per setting, lm-eval metrics
    live, live_samples = evaluate_live(model, tok, tasks, strategy, "copy")   # ouro_lab.evaluate: live
    gap(metrics, live)                                       # ouro_lab.evaluate: replay versus live

The data flows lm (units, batches, `OuroLM`) -> tracing (the trace pass) -> scoring
(replay through lm-eval's metric code) -> evaluate (`ouro-lab eval`). New code should
import from those modules; this one only re-exports them (lm-eval registration and
older scripts import `ouro_lab.harness.OuroLM`).
"""

from __future__ import annotations

from ouro_lab.evaluate import evaluate_live, evaluate_tasks, gap
from ouro_lab.lm import LL_TYPES, HarnessError, OuroLM, Unit
from ouro_lab.scoring import (
    ReplayLM,
    Scorer,
    answers_from_exits,
    exit_steps,
    metric_rows,
    run_evaluate,
    sample_rows,
    score,
    scorer_for,
    trace_units,
    unit_arrays,
)
from ouro_lab.tasks import TaskSet
from ouro_lab.tracing import TRACE_FORMAT, build_units, ll_names, trace_pass

__all__ = ["OuroLM", "ReplayLM", "Scorer", "TaskSet", "Unit", "trace_pass", "score", "exit_steps",
           "answers_from_exits", "run_evaluate", "metric_rows", "sample_rows", "build_units", "evaluate_live",
           "gap", "scorer_for", "evaluate_tasks", "HarnessError", "LL_TYPES", "TRACE_FORMAT", "ll_names",
           "trace_units", "unit_arrays"]
