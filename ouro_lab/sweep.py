"""`ouro-lab sweep`, the orchestration: a recipe in; tidy tables, plots and a report out.

    recipe -> settings (every fixed step + each strategy's grid)
           -> load model, build tasks                      (errors name recipe file, line, field)
           -> ONE trace pass over loglikelihood tasks      (cached by content: reruns skip it)
           -> replay every setting, scored by lm-eval      (no model)
           -> live runs (generate_until tasks; `live: true` settings)
           -> metrics.csv, samples.parquet, exits.csv, provenance.json, plots/, report.md/html

The run folder is `results/<recipe-stem>/<run-id>/` (run-id: a hash of the resolved
recipe, so rerunning a recipe finds its folder) unless `--out` says otherwise. Every
finished setting is stored at once under `settings/` (one file pair, written atomically),
so a sweep stopped by Ctrl-C or kill -9 resumes where it stopped; a lock file
(`flock`, released by the kernel even on kill -9) keeps two sweeps off one folder.

Nothing damaged is used: a stored setting that fails its checksums is said in one line
and redone, a damaged cached trace recomputed. A full disk anywhere is one line (what was
being written, free space, rerun to resume) and exit 2; temporaries left by a killed run
are removed when the next one starts. An unwritable trace cache is found before the
trace pass: the sweep runs without it and says so (`--require-cache`: it stops).

This module is the orchestration only; each step lives in its own: settings
(`ouro_lab.settings`), the trace pass (`ouro_lab.tracing`), replay scoring
(`ouro_lab.scoring`), live runs (`ouro_lab.lm.OuroLM` with a strategy), the run folder
(`ouro_lab.store`), the tables (`ouro_lab.tables`), plots and report (`ouro_lab.report`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ouro_lab import distributed
from ouro_lab.errors import OuroLabError
from ouro_lab.files import DamagedFileError, atomic_write, file_digest, sweep_temporaries
from ouro_lab.keys import content_hash, requests_hash, source_hash
from ouro_lab.plan import describe, plan
from ouro_lab.progress import log, stderr_console, stdout_console
from ouro_lab.progress import progress as progress_bars
from ouro_lab.recipe import Recipe, RecipeError, RecipeSource, canonical, load_recipe, recipe_hash
from ouro_lab.settings import (
    Setting,
    cannot_decode,
    check_folds,
    check_speculative,
    cross_fit,
    doc_outcomes,
    expand_settings,
    folds_of,
    kv_policy_of,
)
from ouro_lab.store import (
    RunLock,
    SettingStore,
    SweepError,
    atomic_frame,
    cache_dir,
    check_output,
    check_same_recipe,
    check_writable,
    default_run_dir,
    git_sha,
    jsonable,
    resumable_on_full_disk,
    run_dir_for,
    stray_samples,
    timing_context,
    trace_cache,
    versions,
)
from ouro_lab.tables import COLUMNS, LIVE_SUMS, assemble, compose_selects, live_per_doc, live_row, tag_samples

__all__ = ["run_sweep", "load_tasks", "describe", "git_sha", "versions", "Setting", "expand_settings",
           "SweepError", "RunLock", "SettingStore", "cache_dir", "default_run_dir", "COLUMNS"]


# --------------------------------------------------------------------------- the sweep


def run_sweep(recipe_file: str | Path, overrides: list[str] = (), out: str | Path | None = None,
              dry_run: bool = False, console=None, require_cache: bool = False,
              as_json: bool = False) -> Path | None:
    """Run (or with `dry_run`, only validate and describe, on stdout: the plan as JSON with
    `as_json`) a recipe. Returns the run folder.

    `require_cache`: stop at once if the trace cache cannot be written (default: run
    without caching and say so)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-call bars; ours are on stderr
    console = console or stderr_console()
    recipe, src = load_recipe(recipe_file, list(overrides))
    settings = expand_settings(recipe, src)
    run_dir, what = run_dir_for(recipe, src, out)
    if dry_run:  # everything the sweep checks before it starts, creating nothing
        check_output(run_dir, what)
        check_same_recipe(run_dir, recipe, what)
        taskset = load_tasks(recipe, src)
        check_folds(recipe, src, settings, taskset)
        check_speculative(recipe, src, taskset)
        p = plan(recipe, settings, taskset)
        if as_json:
            print(json.dumps({"recipe": str(src.file), "valid": True, **p}, indent=2, default=jsonable))
        else:
            result = stdout_console()  # the result: on stdout
            describe(p, result)
            log(result, f"{src.file}: valid")
        return None
    distributed.init(recipe.model.device)  # under torchrun / accelerate launch: join the group
    if not distributed.is_main():
        console = stderr_console(quiet=True)  # rank 0 alone reports, locks and writes
    with resumable_on_full_disk(run_dir):  # a full disk anywhere: one line, finished settings kept
        check_same_recipe(run_dir, recipe, what)
        check_writable(run_dir, what)
        lock = RunLock(run_dir) if distributed.is_main() else contextlib.nullcontext()
        with lock, _threads(recipe.model.threads):
            if distributed.is_main():
                stale = sweep_temporaries(run_dir)
                if stale:
                    log(console, f"{run_dir}: removed {len(stale)} temporary file(s) left by an interrupted "
                                  "run")
            return _run(recipe, src, settings, run_dir, console, require_cache)


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's CPU threads for the sweep (restored after)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load(recipe: Recipe, src: RecipeSource):
    """Model, tokenizer and tasks; each failure becomes one line naming the recipe field."""
    from ouro_lab.loading import fingerprint, has_tokenizer, load_model, load_tokenizer

    try:
        model = load_model(recipe.model.path, dtype=recipe.model.dtype,
                           device=distributed.local_device(recipe.model.device))  # cuda:LOCAL_RANK
        fp = fingerprint(recipe.model.path)
    except OuroLabError as e:
        raise RecipeError([src.error(("model", "path"), str(e))]) from None
    except OSError as e:
        msg = f"{recipe.model.path}: unreadable ({e.strerror or e})"
        raise RecipeError([src.error(("model", "path"), msg)]) from None
    if recipe.model.steps:
        model.config.total_ut_steps = recipe.model.steps
    if recipe.batch_size == "auto":  # once, for the trace pass and every live run alike (logged)
        from ouro_lab.lm import resolve_batch_size
        recipe.batch_size = resolve_batch_size("auto", model)
    try:  # lm-eval's tasks are text: the checkpoint's tokenizer reads them
        if not has_tokenizer(recipe.model.path):
            raise OuroLabError(f"{recipe.model.path}: no tokenizer.json or tokenizer_config.json; a sweep's "
                               "tasks are text: add the checkpoint's tokenizer files")
        tok = load_tokenizer(recipe.model.path)
    except OuroLabError as e:
        raise RecipeError([src.error(("model", "path"), str(e))]) from None
    return model, tok, load_tasks(recipe, src, tok), fp


def load_tasks(recipe: Recipe, src: RecipeSource, tok=None):
    """The recipe's TaskSet (no model needed); unknown names and bad data name their field."""
    from ouro_lab.tasks import TaskSet

    chat_field = ("model", "chat_template") if recipe.model.chat_template else ("tasks",
                                                                                "apply_chat_template")
    try:
        taskset = TaskSet(list(recipe.tasks.names), include_path=recipe.tasks.include or None,
                          data_root=recipe.tasks.data_root, limit=recipe.tasks.limit,
                          num_fewshot=recipe.tasks.num_fewshot, fewshot_seed=recipe.seed,
                          sample=recipe.tasks.sample, sample_seed=recipe.seed,
                          system_instruction=recipe.tasks.system_instruction,
                          apply_chat_template=recipe.tasks.apply_chat_template,
                          fewshot_as_multiturn=recipe.tasks.fewshot_as_multiturn)
        taskset.use_tokenizer(tok, recipe.model.chat_template, recipe.model.path)
    except OuroLabError as e:
        field = chat_field if "chat" in str(e) else _task_field(recipe, str(e))  # chat: from ouro_lab.chat
        raise RecipeError([src.error(field, str(e))]) from None
    except Exception as e:  # datasets / lm-eval failing on the task data itself
        raise RecipeError([_task_data_error(recipe, src, e)]) from None
    for i, name in enumerate(recipe.tasks.names):
        task = taskset.tasks.get(name)
        if task is not None and not len(task.eval_docs):
            raise RecipeError([src.error(("tasks", "names", i), f"task {name}: its data has no documents "
                                         "(empty file or split); add documents or drop the task")])
    return taskset


def _task_data_error(recipe: Recipe, src: RecipeSource, first: Exception) -> str:
    """Find which task's data breaks the build (one at a time) and say so in one line."""
    from ouro_lab.tasks import TaskSet

    for i, name in enumerate(recipe.tasks.names):
        try:
            TaskSet([name], include_path=recipe.tasks.include or None, data_root=recipe.tasks.data_root,
                    limit=recipe.tasks.limit)
        except Exception as e:  # noqa: BLE001 (any failure of the data is the user's to fix)
            first_line = str(e).splitlines()[0] if str(e) else ""
            what = "its data file is empty; add documents" if isinstance(e, StopIteration) else \
                (f"its documents do not build ({type(e).__name__}: {first_line}); check the data against "
                 "its YAML (doc_to_text, doc_to_target, doc_to_choice)")
            return src.error(("tasks", "names", i), f"task {name}: {what}, or drop the task")
    return src.error(("tasks", "names"), f"the tasks cannot be built ({type(first).__name__}: {first})")


def _task_field(recipe: Recipe, msg: str) -> tuple:
    for i, name in enumerate(recipe.tasks.names):
        if (f"'{name}'" in msg or f"task {name} " in msg or msg.startswith(f"{name}:")
                or f"task {name}:" in msg):
            return ("tasks", "names", i)
    return ("tasks", "include") if "include" in msg else ("tasks", "names")


@dataclass
class _Run:
    """What the stages of one running sweep share: inputs, the store, the progress bars,
    the forward-call counter, provenance, and the finished settings gathered so far."""

    recipe: Recipe
    settings: list[Setting]
    model: object
    tok: object
    taskset: object
    fp: str
    store: SettingStore
    console: object
    progress: object
    calls: list  # [model forward calls so far] (a forward pre-hook counts them)
    prov: dict
    cache: Path | None = None   # the trace cache (None: not writable, run without it)
    require_cache: bool = False
    run_dir: Path | None = None
    records: list = field(default_factory=list)  # (Setting, mode, stored record)
    frames: list = field(default_factory=list)   # their per-document samples, tagged
    _sources: dict = field(default_factory=dict)

    @property
    def dirs(self) -> list[Path]:
        return [Path(d) for d in self.recipe.strategies_dirs]

    def source_hash(self, name: str) -> str:
        """The strategy file's content hash (one read per strategy, not per setting)."""
        if name not in self._sources:
            self._sources[name] = source_hash(name, self.dirs)
        return self._sources[name]

    @property
    def code(self) -> dict:
        """The code that computes this run's settings (stored with each, checked on reuse)."""
        return {"ouro_lab": self.prov["versions"].get("ouro-lab"), "git_sha": self.prov.get("git_sha")}

    def save(self, key: str, rec: dict, samples, label: str) -> None:
        """A finished setting into the store, with the code that computed it."""
        self.store.save(key, {**rec, "code": self.code}, samples, label)

    def stored(self, s: Setting, mode: str, key: str):
        """The finished setting from the store, checked; None if it is not there or is
        damaged (said in one line: the caller redoes it and the files are overwritten)."""
        if not self.store.has(key):
            return None
        try:
            return self.store.load(key)
        except DamagedFileError as e:
            log(self.console, f"{e}; redoing setting {s.label} ({mode})")
            return None

    def samples_dir(self, s: Setting, mode: str) -> Path:
        """Where a setting's lm-eval samples JSONL go (`log_samples`)."""
        from ouro_lab.sample_log import safe_name

        return self.run_dir / "samples" / mode / safe_name(s.label)

    def logged(self, s: Setting, mode: str, tasks: list[str]) -> bool:
        """Nothing to log, or the setting's samples files are all there."""
        d = self.samples_dir(s, mode)
        return not self.recipe.log_samples or all((d / f"samples_{t}.jsonl").is_file() for t in tasks)

    def log_samples(self, s: Setting, mode: str, log: dict, samples) -> None:
        """Write a finished setting's lm-eval samples JSONL (rank 0, `log_samples` only)."""
        from ouro_lab.sample_log import lm_eval_samples, write_samples

        if not self.recipe.log_samples or not distributed.is_main():
            return
        lines = lm_eval_samples(log["results"], log["tasks"], log.get("requests"), samples,
                                {"setting": s.label, "strategy": s.strategy, "params": s.params,
                                 "run_mode": mode}, log.get("exit_steps"), log.get("file_index"))
        write_samples(self.samples_dir(s, mode), lines)

    def keep(self, s: Setting, mode: str, key: str, found=None) -> None:
        """A finished setting as the store holds it (what every later table is made from)."""
        rec, samples = found if found is not None else self.store.load(key)
        self.records.append((s, mode, rec))
        self.frames.append(tag_samples(samples, s, mode))


def _run(recipe: Recipe, src: RecipeSource, settings: list[Setting], run_dir: Path, console,
         require_cache: bool = False) -> Path:
    import torch

    from ouro_lab.lm import LL_TYPES

    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    if distributed.is_main():
        atomic_write(run_dir / "recipe.yaml", src.file.read_text(), "a copy of the recipe")
    prov = {"run_id": run_dir.name, "recipe_file": str(src.file), "recipe_name": src.file.stem,
            "recipe": canonical(recipe), "recipe_hash": recipe_hash(recipe), "git_sha": git_sha(),
            "versions": versions(), "seed": recipe.seed, "device": recipe.model.device,
            "dtype": recipe.model.dtype, "argv": sys.argv[1:], "cwd": os.getcwd(), "host": platform.node(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model, tok, taskset, fp = _load(recipe, src)
    check_folds(recipe, src, settings, taskset)
    check_speculative(recipe, src, taskset)
    ll_tasks = taskset.names_of("multiple_choice", *LL_TYPES)
    cache = trace_cache(require_cache, lambda m: log(console, m)) if ll_tasks else None  # before the pass
    prov["model_fingerprint"] = fp
    prov["device"] = str(model.device)
    cfg = model.config
    prov["model"] = {"name": Path(recipe.model.path).name, "parameters": model.num_parameters(),
                     "layers": cfg.num_hidden_layers, "steps": recipe.model.steps or cfg.total_ut_steps,
                     "hidden": cfg.hidden_size}
    prov["tasks"] = {n: {**taskset.selection(n), "chance": _round(taskset.chance(n)),  # documents, chance
                         "output_type": taskset.output_type(n)} for n in taskset.tasks}
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    gen_tasks = taskset.names_of("generate_until")
    apart = taskset.sweep_groups_apart(ll_tasks, gen_tasks, any(s.live for s in settings))  # no aggregate
    prov["groups_apart"] = sorted(apart)
    for g in prov["groups_apart"]:
        log(console, apart[g])
    store = SettingStore(run_dir)
    with progress_bars(console) as progress:
        run = _Run(recipe, settings, model, tok, taskset, fp, store, console, progress, calls, prov, cache,
                   require_cache, run_dir)
        if ll_tasks:
            _replay_all(run, _trace(run))
        _live_all(run, ll_tasks, gen_tasks)
    hook.remove()
    if not distributed.is_main():
        return run_dir  # rank 0 alone writes results
    chosen, chosen_frames = compose_selects(settings, run.records, run.frames)  # the oracle
    metrics, samples, exits = assemble(run.records + chosen, run.frames + chosen_frames, recipe)
    tables = {"metrics.csv": metrics, "samples.parquet": samples, "exits.csv": exits}
    for name, frame in tables.items():
        atomic_frame(frame, run_dir / name, f"the {name} table")
    prov.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                wall_s=round(time.perf_counter() - t_start, 2), settings=len(settings),
                model_forward_calls=calls[0],
                stray_samples=stray_samples(run_dir, {run.samples_dir(s, m) for s, m, _ in run.records},
                                            console),
                fitted={s.label: rec["fitted"] for s, _, rec in run.records if rec.get("fitted")},  # per fold
                # stored settings reused from a run of other code (None: stored before code was recorded)
                other_code=[{"setting": s.label, "run_mode": mode, "code": rec.get("code"),
                             "tasks": sorted({m["task"] for m in rec.get("metrics", [])})}
                            for s, mode, rec in run.records if rec.get("code") != run.code],
                files={n: {"checksum": file_digest(run_dir / n), "bytes": (run_dir / n).stat().st_size}
                       for n in tables})  # `ouro-lab report` refuses a table that no longer matches
    atomic_write(run_dir / "provenance.json", json.dumps(prov, indent=2, default=jsonable) + "\n",
                 "the provenance record")
    from ouro_lab.report import build_report

    res = build_report(run_dir)
    _summary(res["summary"], run_dir)
    return run_dir


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 12)


def _trace(run: _Run):
    """The one trace pass over the loglikelihood tasks (a cached trace is reused)."""
    from ouro_lab.tracing import trace_pass

    progress, calls = run.progress, run.calls
    bar = progress.add_task("trace pass (loglikelihood tasks)", total=None)
    t0 = time.perf_counter()
    trace, _units = trace_pass(run.model, run.tok, run.taskset, batch_size=run.recipe.batch_size,
                               cache_dir=run.cache, fingerprint=run.fp,
                               progress=lambda n: progress.advance(bar, n),
                               log=lambda m: log(run.console, m), require_cache=run.require_cache)
    done = progress.tasks[bar].completed or 1
    progress.update(bar, total=done, completed=done)
    reused = calls[0] == 0
    run.prov["trace"] = {"key": trace.meta.get("key"), "tokens": trace.n, "reused": reused,
                         "forward_calls": calls[0], "seconds": round(time.perf_counter() - t0, 3),
                         "work": trace.meta.get("work")}  # what the pass ran (ouro_lab.prefix)
    log(run.console, f"trace pass: {'reused cached trace' if reused else 'computed trace'} "
                      f"{trace.meta.get('key')} ({trace.n} tokens, {calls[0]} model forward calls)")
    return trace


def _replay_all(run: _Run, trace) -> None:
    """Every setting replayed over the trace and scored (no model; rank 0 alone), each
    stored as soon as it is done; settings already in the store are read back."""
    from ouro_lab.lm import LL_TYPES
    from ouro_lab.scoring import _unit_meta

    recipe = run.recipe
    replayed = run.taskset.names_of("multiple_choice", *LL_TYPES)
    meta = _unit_meta(trace)
    fold = folds_of(trace, meta, recipe.calibration.folds, recipe.calibration.seed)
    tok_task = [meta[i][0] for i in trace.request.tolist()]
    bar = run.progress.add_task("replay settings", total=sum(s.kind != "speculative" for s in run.settings))
    for s in (run.settings if distributed.is_main() else []):  # no model: rank 0 alone
        if s.kind == "speculative":  # a way to decode, not an exit rule: nothing to replay
            continue
        if s.kind == "select":  # composed from the fixed steps once they are all scored
            run.progress.advance(bar)
            continue
        key = content_hash("replay", trace.meta.get("key"), s.strategy, s.params_json, s.granularity,
                    run.source_hash(s.strategy), s.fitted and canonical(recipe)["calibration"],
                    recipe.bootstrap, recipe.seed, [requests_hash(run.taskset, t) for t in replayed])
        found = run.stored(s, "replay", key)
        if found is None or not run.logged(s, "replay", replayed):
            found = None
            strat = (cross_fit(s, trace, fold, recipe.calibration.folds, recipe.seed,
                               doc_outcomes(run.taskset, trace, s.obj)) if s.fitted else s.obj)
            log: dict = {}
            rec, samples = _replay(run.taskset, trace, strat, s, recipe, tok_task, log)
            run.log_samples(s, "replay", log, samples)
            if s.fitted:
                rec["fitted"] = strat.fitted_records()  # what each task x fold copy chose
            run.save(key, rec, samples, f"setting {s.label}, replay")
        run.keep(s, "replay", key, found)
        run.progress.advance(bar)


def _live_all(run: _Run, ll_tasks: list[str], gen_tasks: list[str]) -> None:
    """The live runs: `live: true` settings on loglikelihood tasks, and every rule that can
    decode token by token on generation tasks; each stored as soon as it is done."""
    recipe, settings = run.recipe, run.settings
    live = [s for s in settings if s.live] if ll_tasks else []
    # generation runs live for every rule that can decode token by token: no oracles (they
    # read the answer), no calibrated rules (no held-out trace), no per-sequence exits
    jobs = [(s, t) for s in live for t in ll_tasks] + [
        (s, t) for s in settings for t in gen_tasks if not cannot_decode(s)]
    for s in (s for s in settings if gen_tasks and cannot_decode(s)):  # said, not dropped unseen
        log(run.console, f"{s.label}: not run on {', '.join(gen_tasks)} (generation decodes live, and "
                         f"{cannot_decode(s)})")
    if not jobs:
        return
    bar = run.progress.add_task(f"live runs ({recipe.live.kv_policy} KV)", total=len(jobs))
    from ouro_lab.live import warm_up

    warm_up(run.model)  # so the first setting's measured seconds carry no one-time costs
    for s, task in jobs:
        key = content_hash("live", run.fp, recipe.model.dtype, recipe.model.steps, task, recipe.tasks.limit,
                    recipe.tasks.sample and (recipe.tasks.sample, recipe.seed),
                    recipe.tasks.num_fewshot, s.strategy, s.params_json, s.granularity,
                    run.source_hash(s.params.get("draft_rule", s.strategy)), kv_policy_of(s, recipe),
                    recipe.live.max_gen_toks, recipe.bootstrap, recipe.seed,
                    requests_hash(run.taskset, task),
                    # its measured seconds, and the speed-ups between settings, hold for one batch plan
                    # on one machine: a setting timed under another is not reused
                    recipe.batch_size, timing_context(run.model))
        found = run.stored(s, f"live, {task}", key) if distributed.is_main() else None
        if found is not None and not run.logged(s, "live", [task]):
            found = None  # its samples JSONL is missing: run it again
        if not distributed.broadcast(found is not None):  # rank 0 decides; every rank runs it
            got: dict = {}
            rec, samples = _live(run.model, run.tok, run.taskset, task, s, recipe, got)
            if distributed.is_main():
                run.log_samples(s, "live", got, samples)
                run.save(key, rec, samples, f"setting {s.label}, live on {task}")
        if not distributed.is_main():
            continue
        run.keep(s, "live", key, found)
        run.progress.advance(bar)


def _replay(taskset, trace, strat, s: Setting, recipe: Recipe, tok_task: list[str], log: dict | None = None):
    import pandas as pd

    from ouro_lab.scoring import exit_steps, score

    steps = exit_steps(trace, strat, s.granularity, recipe.seed)  # replayed once, used twice
    rows, samples = score(taskset, trace, strat, s.granularity, bootstrap_iters=recipe.bootstrap,
                          seed=recipe.seed, exit_step=steps, log=log if recipe.log_samples else None)
    counts = pd.DataFrame({"task": tok_task, "step": steps.numpy()}).value_counts().reset_index()
    tokens = pd.Series(tok_task).value_counts()
    return {"metrics": rows, "exits": counts.to_dict("records"), "tokens": tokens.to_dict()}, \
        _with_tokens(samples, trace)


def _with_tokens(samples, trace):
    """Add `tokens` (scored tokens per document) and FLOPs summed over them."""
    import pandas as pd

    from ouro_lab.scoring import _unit_meta

    meta = _unit_meta(trace)
    per = pd.DataFrame({"task": [meta[i][0] for i in trace.request.tolist()],
                        "doc_id": [meta[i][1] for i in trace.request.tolist()]})
    n = per.value_counts().rename("tokens").reset_index()
    samples = samples.merge(n, on=["task", "doc_id"], how="left")
    samples["flops"] = samples.flops_per_token * samples.tokens
    samples["flops_executed"] = samples.flops_executed_per_token * samples.tokens
    return samples


def _live(model, tok, taskset, task: str, s: Setting, recipe: Recipe, log: dict | None = None):
    """One setting run live on one task through lm-eval (`OuroLM(strategy=..., live=True)`):
    generate_until decodes token by token (or speculatively, `s.draft_len`); loglikelihood
    really stops every token (prompt included) at its exit step. Compute per scored /
    generated token and measured seconds per decoded and per prefilled token, from the
    run's records (every setting runs the same batch plan)."""
    import math

    import pandas as pd

    from ouro_lab.lm import OuroLM
    from ouro_lab.scoring import metric_rows, run_evaluate, sample_rows

    lm = OuroLM(model=model, tokenizer=tok, strategy=s.obj, kv_policy=kv_policy_of(s, recipe),
                seed=recipe.seed, live=True, batch_size=recipe.batch_size,
                max_gen_toks=recipe.live.max_gen_toks, draft_len=s.draft_len)
    results = run_evaluate(lm, taskset, [task], recipe.bootstrap)
    if log is not None:
        log.update(results=results, tasks=taskset.tasks, file_index=taskset.samples)
    comp = live_per_doc(lm.records, task)
    tot = comp[list(LIVE_SUMS)].sum() if len(comp) else None
    rows = [{**row, **(live_row(tot) if tot is not None else {})} for row in metric_rows(results)
            if row["task"] == task]
    samples = pd.DataFrame(sample_rows(results, taskset))
    if len(samples) and len(comp):
        tokens = comp.tokens.clip(lower=1)
        comp = comp.assign(steps_used=comp.steps_used / tokens, steps_executed=comp.steps_executed / tokens,
                           flops_per_token=comp.flops_used / tokens,
                           flops_executed_per_token=comp.flops / tokens,
                           flops_executed=comp.flops, flops_total_per_token=comp.flops_total / tokens)
        keep = ["task", "doc_id", "tokens", "steps_used", "steps_executed", "flops", "flops_used",
                "flops_total", "seconds", "flops_per_token", "flops_executed_per_token", "flops_executed",
                "flops_total_per_token"]
        samples = samples.merge(comp[keep], on=["task", "doc_id"], how="left")  # per-request timing apart
    rows = [{k: (v if not (isinstance(v, float) and math.isnan(v)) else None) for k, v in r.items()}
            for r in rows]
    ntok = int(tot["tokens"]) if tot is not None else 0
    exits: dict[int, int] = {}  # generated tokens by step used (loglikelihood runs record none)
    for (t, _doc, _idx), rec in lm.records.items():
        for k, n in (rec.get("exits") or {}).items() if t == task else ():
            exits[int(k)] = exits.get(int(k), 0) + int(n)
    return {"metrics": rows, "exits": [{"task": task, "step": k - 1, "count": n}  # 0-based, as replay's
                                       for k, n in sorted(exits.items())],
            "tokens": {task: ntok}}, samples


def _summary(summary: dict, run_dir: Path) -> None:
    """The result, on stdout: per task its headline and the compute-saved table (cells
    wrap, never cut), then where the run folder and the report are."""
    from rich.table import Table

    from ouro_lab.report_page import headline, refused_words

    console = stdout_console()
    for task, t in summary["tasks"].items():
        sc = t["scale"]
        log(console, headline(task, t, summary["tolerance"]))
        tab = Table(title=f"{task}: {t['metric_words']} (full depth {t['full'] * sc:.1f}); compute saved at "
                          f"<= {summary['tolerance']:g} point loss")
        for col in ("strategy", "setting", "FLOPs saved", "95% CI", "score change", "cross-fitted",
                    "warnings"):
            tab.add_column(col, overflow="fold")
        for r in t["saved"] if not t.get("withdrawn") else []:  # broken baseline: nothing claimed
            cf = r.get("crossfit") or {}
            tab.add_row(r["strategy"], r["chosen"] or "none within tolerance",
                        f"{r['saved'] * 100:.1f}%" if r["chosen"] else "-",
                        f"[{r['ci_low'] * 100:.1f}, {r['ci_high'] * 100:.1f}]",
                        "-" if r["chosen"] is None else f"{r['delta'] * sc:+.2f}",
                        f"none ({refused_words(cf)})" if cf.get("refused") else
                        f"{cf.get('saved', 0) * 100:.1f}% ({cf.get('delta', 0) * sc:+.2f})" if cf else "-",
                        "; ".join(w["code"] for w in summary["warnings"]
                                  if w["task"] == task and w["setting"] == (r["chosen"] or r["strategy"])))
        console.print(tab)
        for r in t.get("speed") or []:
            if r.get("kind") == "speculative":  # lossless: its saving is time, not FLOPs
                log(console, f"{r['setting']}: output identical to full depth; measured decode speed-up "
                             f"{r['speedup']:.2f}x over full-depth live decoding, "
                             f"{r['acceptance'] * 100:.0f}% of drafts accepted, "
                             f"{-r['flops_saved'] * 100:.1f}% more FLOPs per token")
        for w in summary["warnings"]:  # each beside its task, the setting named
            if w["task"] == task:
                log(console, f"warning [{w['code']}] {w['setting'] or task}: {w['message']}")
    log(console, f"run folder: {run_dir}\nreport: {run_dir / 'report.html'}")
