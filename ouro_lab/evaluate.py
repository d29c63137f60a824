"""What `ouro-lab eval` runs: a checkpoint on lm-eval tasks, directly, by replay or live.

    metrics, samples = evaluate_tasks("ckpt/", "loop_demo_mc", strategy="threshold", params={"q": 0.5})
    live, live_samples = evaluate_live(model, tok, tasks, strategy, "copy")   # true early exit
    gap(metrics, live)                                                         # replay versus live

Without a strategy: a plain lm-eval run of `OuroLM` (cut to `steps`). With one:
loglikelihood tasks from one cached trace pass (`ouro_lab.tracing`) + replay
(`ouro_lab.scoring.score`), or a true early-exit run (`evaluate_live`); generation tasks live.
"""

from __future__ import annotations

import math

from ouro_lab import distributed
from ouro_lab.lm import LL_TYPES, HarnessError, OuroLM, resolve_batch_size
from ouro_lab.scoring import metric_rows, run_evaluate, sample_rows, score
from ouro_lab.tasks import TaskSet, leaf_members
from ouro_lab.tracing import trace_pass


def evaluate_live(model, tokenizer, taskset: TaskSet, strategy=None, kv_policy: str = "copy",
                  batch_size: int = 8, names: list[str] | None = None, bootstrap_iters: int = 1000,
                  max_gen_toks: int | None = None, seed: int = 0, log: list | None = None):
    """A true early-exit run of `strategy` under `kv_policy` over `names` (default: every
    task of the taskset, generation included), scored by `lm_eval.evaluator.evaluate`.

    Loglikelihood requests run token by token, prompt included (`live_score_units`);
    generate_until requests decode live (`live_generate`). Returns (metrics, samples)
    shaped as `score`'s, the compute columns measured: steps_used_mean /
    steps_executed_mean per scored or generated token, flops_per_token (exit steps only)
    / flops_executed_per_token (what ran), flops_total_per_token (prompt included, per
    scored or generated token) and wall_s (seconds of model work for the task). `log`, a
    list, receives lm-eval's results for `ouro_lab.sample_log`."""
    import pandas as pd

    names = names or list(taskset.tasks)
    lm = OuroLM(model=model, tokenizer=tokenizer, strategy=strategy, kv_policy=kv_policy, live=True,
                batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed)
    results = run_evaluate(lm, taskset, names, bootstrap_iters)
    if log is not None:
        log.append({"results": results, "tasks": taskset.tasks, "run_mode": "live",
                    "file_index": taskset.samples})
    rows = []
    for (task, doc_id, _), rec in lm.records.items():
        rows.append({"task": task, "doc_id": int(doc_id), "tokens": rec.get("tokens", 0),
                     "steps_used": rec.get("steps_used", 0), "steps_executed": rec.get("steps_executed", 0),
                     "flops_used": rec.get("flops_used_scored", 0) + rec.get("flops_used_decode", 0),
                     "flops_executed": rec.get("flops_scored", 0) + rec.get("flops_decode", 0),
                     "flops_total": rec.get("flops", 0), "seconds": rec.get("seconds", 0)})
    rec = pd.DataFrame(rows, columns=["task", "doc_id", "tokens", "steps_used", "steps_executed",
                                      "flops_used", "flops_executed", "flops_total", "seconds"])

    def summarize(frame):
        n = max(float(frame.tokens.sum()), 1.0)
        return {"steps_used_mean": frame.steps_used.sum() / n,
                "steps_executed_mean": frame.steps_executed.sum() / n,
                "flops_per_token": frame.flops_used.sum() / n,
                "flops_executed_per_token": frame.flops_executed.sum() / n,
                "flops_total_per_token": frame.flops_total.sum() / n, "wall_s": float(frame.seconds.sum()),
                "seconds_per_token": float(frame.seconds.sum()) / n}

    metrics = []
    for row in metric_rows(results):
        members = leaf_members(results.get("group_subtasks", {}), row["task"])  # nested groups too
        sub = rec[rec.task.isin(members)]
        if len(sub):
            row.update({k: float(v) for k, v in summarize(sub).items()})
        metrics.append(row)
    per_doc = (rec.groupby(["task", "doc_id"]).apply(lambda f: pd.Series(summarize(f)), include_groups=False)
               .reset_index()
               .rename(columns={"steps_used_mean": "steps_used", "steps_executed_mean": "steps_executed"}))
    samples = pd.DataFrame(sample_rows(results, taskset))
    if len(samples) and len(per_doc):
        samples = samples.merge(per_doc, on=["task", "doc_id"], how="left")
    return metrics, samples


def gap(replay_metrics: list[dict], live_metrics: list[dict]) -> list[dict]:
    """Replay versus live, metric by metric: task, metric, filter, replay, live,
    diff (live - replay), and both runs' FLOPs per token (used and executed)."""
    live = {(r["task"], r["metric"], r["filter"]): r for r in live_metrics}
    out = []
    for r in replay_metrics:
        k = (r["task"], r["metric"], r["filter"])
        if k not in live:
            continue
        lv = live[k]
        out.append({"task": k[0], "metric": k[1], "filter": k[2], "replay": r["value"], "live": lv["value"],
                    "diff": lv["value"] - r["value"],
                    "replay_flops_per_token": r.get("flops_per_token", math.nan),
                    "live_flops_per_token": lv.get("flops_per_token", math.nan),
                    "replay_flops_executed_per_token": r.get("flops_executed_per_token", math.nan),
                    "live_flops_executed_per_token": lv.get("flops_executed_per_token", math.nan),
                    "live_flops_total_per_token": lv.get("flops_total_per_token", math.nan)})
    return out


def evaluate_tasks(model_dir, tasks, include_path=None, data_root=None, limit=None, num_fewshot=None,
                   steps=None, strategy=None, params=None, kv_policy: str = "copy", live: bool = False,
                   batch_size: int = 8, dtype=None, device=None, cache_dir=None,
                   max_gen_toks: int | None = None, seed: int = 1234, log: list | None = None,
                   console=None, strategies_dirs=(), sample: int | None = None, chat: dict | None = None):
    """`ouro-lab eval`: lm-eval metrics of a checkpoint on `tasks` (names or a comma list).

    Without `strategy`: a plain lm-eval run of the model (cut to `steps`). With one:
    loglikelihood tasks from one cached trace pass + replay (or a true early-exit run
    with `live`), generation tasks live under `kv_policy`; `strategies_dirs` are extra
    folders of strategy files; `sample` scores a random subset of that many documents per
    task (drawn with `seed`) where `limit` takes the first ones. `seed` also seeds few-shot
    sampling and randomized rules; each stage says on `console` (stderr) how long it took;
    `log`, a list, receives each part's lm-eval results for `ouro_lab.sample_log`. `chat`:
    lm-eval's chat switches (apply_chat_template, system_instruction, fewshot_as_multiturn)
    and `chat_template` (an override of the tokenizer's: a Jinja file or text). Returns
    (metrics, samples)."""
    import pandas as pd

    from ouro_lab.loading import fingerprint, load_model, load_tokenizer
    from ouro_lab.progress import stage, stderr_console

    distributed.init(device)  # under torchrun / accelerate launch: shard batches over the ranks
    console = console or stderr_console(quiet=not distributed.is_main())
    chat = dict(chat or {})
    override = chat.pop("chat_template", None)
    with stage(console, "eval: tasks and model", announce=False):
        ts = TaskSet(tasks, include_path=include_path, data_root=data_root, limit=limit,
                     num_fewshot=num_fewshot, fewshot_seed=seed, sample=sample, sample_seed=seed, **chat)
        tok = load_tokenizer(model_dir)
        ts.use_tokenizer(tok, override, model_dir)  # a missing chat template: one line before the model
        model = load_model(model_dir, dtype=dtype, device=distributed.local_device(device))
        batch_size = resolve_batch_size(batch_size, model)  # "auto": found once, logged
    if strategy is None:
        lm = OuroLM(model=model, tokenizer=tok, steps=steps, batch_size=batch_size, max_gen_toks=max_gen_toks,
                    seed=seed)
        with stage(console, f"eval: {len(ts.tasks)} task(s) at {lm.steps} loop steps"):
            res = run_evaluate(lm, ts, list(ts.tasks))
        if log is not None:
            log.append({"results": res, "tasks": ts.tasks, "run_mode": "direct", "file_index": ts.samples,
                        "compute": {"steps_used": lm.steps, "steps_executed": lm.steps}})
        return metric_rows(res), pd.DataFrame(sample_rows(res, ts))
    if steps is not None:
        raise HarnessError("eval: give either --steps or --strategy, not both")
    from ouro_lab.registry import make_strategy

    st = make_strategy(strategy, params or {}, strategies_dirs) if isinstance(strategy, str) else strategy
    from ouro_lab.strategy import ExitStrategy

    if type(st).fit is not ExitStrategy.fit:
        name = strategy if isinstance(strategy, str) else type(st).__name__
        raise HarnessError(f"eval: strategy {name} calibrates on a "
                           "held-out split; run it with `ouro-lab sweep` (cross-fitted calibration)")
    ll = ts.names_of("multiple_choice", *LL_TYPES)
    gen = ts.names_of("generate_until")
    metrics, samples = [], []
    if ll and not live:
        with stage(console, f"eval: trace pass over {len(ll)} loglikelihood task(s)"):
            trace, _ = trace_pass(model, tok, ts, batch_size=batch_size, cache_dir=cache_dir,
                                  fingerprint=fingerprint(model_dir))
        with stage(console, "eval: replay and scoring"):
            part: dict = {}
            m, s = score(ts, trace, st, seed=seed, log=part if log is not None else None)
        if log is not None:
            log.append({**part, "run_mode": "replay", "samples": s})
        metrics += m
        samples.append(s)
    live_names = gen + (ll if live else [])
    _say_groups_apart(ts, [[] if live else ll, live_names], console)
    if live_names:
        with stage(console, f"eval: live run of {len(live_names)} task(s) ({kv_policy} KV)"):
            m, s = evaluate_live(model, tok, ts, st, kv_policy, batch_size=batch_size, names=live_names,
                                 max_gen_toks=max_gen_toks, seed=seed, log=log)
        if log is not None:
            log[-1]["samples"] = s
        metrics += m
        samples.append(s)
    return metrics, pd.concat(samples, ignore_index=True) if samples else pd.DataFrame()


def _say_groups_apart(ts, together: list, console) -> None:
    from ouro_lab.progress import log

    for g in ts.groups_apart(together):
        log(console, f"eval: group {g}: its tasks are scored apart (replayed and live), so lm-eval's group "
                     "aggregate is not reported; each task's rows are (--live scores them together)")


def write_outputs(metrics: list[dict], samples, out, strategy=None, params=None, steps=None,
                  logs: list | None = None) -> list:
    """`ouro-lab eval --output_path`: metrics.csv with the sweep's column names (metric
    and filter_name apart, metric_key, primary, param_<name>), samples.parquet, and with
    `logs` lm-eval's samples_<task>.jsonl per task. Returns the paths written."""
    import json
    from pathlib import Path

    import pandas as pd

    from ouro_lab.sample_log import lm_eval_samples, write_samples
    from ouro_lab.stats import primary_metric
    from ouro_lab.store import atomic_frame
    from ouro_lab.tables import _measure, param_columns

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if strategy is not None:
        name, p = str(strategy), dict(params or {})
    else:
        name, p = ("fixed", {"step": steps}) if steps else ("full depth", {})
    m = pd.DataFrame(metrics).rename(columns={"filter": "filter_name"})
    if len(m):
        m.insert(0, "params", json.dumps(p, sort_keys=True))
        m.insert(0, "strategy", name)
        m.insert(3, "metric_key", [_measure(a, b) for a, b in zip(m.metric, m.filter_name, strict=True)])
        main = {t: primary_metric(d.metric_key) for t, d in m.groupby("task")}
        m.insert(3, "primary", m.metric_key == m.task.map(main))
        m = param_columns(m)
    written = [out / "metrics.csv", out / "samples.parquet"]
    atomic_frame(m, written[0])
    atomic_frame(samples.rename(columns={"filter": "filter_name"}) if len(samples) else samples, written[1])
    for part in logs or []:
        extra = {"strategy": name, "params": p, "run_mode": part["run_mode"], **part.get("compute", {})}
        lines = lm_eval_samples(part["results"], part["tasks"], part.get("requests"), part.get("samples"),
                                extra, part.get("exit_steps"), part.get("file_index"))
        written += write_samples(out, lines)
    return written
