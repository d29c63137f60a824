"""The `ouro-lab` command line: thin typer commands that import heavy libraries lazily.

Each command parses its arguments, imports what it needs inside its body and calls one
library function. Results go to stdout, progress and diagnostics to stderr. Options
speak lm-eval's dialect too (`--include_path`, `--output_path`, `--log_samples`). User
mistakes (`OuroLabError`) print one line and exit 2; set `OURO_LAB_DEBUG=1` for the
traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Adaptive computation in looped language models: accuracy versus FLOPs.")

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (the best available: cuda, then mps, then cpu)"


def _device():
    return typer.Option("auto", "--device", help=DEVICE_HELP, callback=_check_device)


def _check_device(value: str) -> str:
    """Checked as the command line is parsed: before any model or task is loaded."""
    from ouro_lab.errors import check_device

    check_device(value)
    return value


def _check_count(name: str):
    """A callback for a count of documents: a whole number >= 1, else one line (typer's own
    refusal is a usage block; lm-eval reads a float < 1 as a fraction and 1.0 as one document)."""

    def check(value: float | None) -> int | None:
        if value is None:
            return None
        if not float(value).is_integer() or value < 1:
            from ouro_lab.errors import OuroLabError
            raise OuroLabError(f"{name} {value:g}: give a whole number of documents, >= 1")
        return int(value)

    return check


def _flag(help: str, *names: str):
    """A switch: present or absent, no value."""
    return typer.Option(False, *names, help=help)


# eval's chat switches, in lm-eval's spelling and ours, and its batch size
_CHAT = {"apply": _flag("render requests with the tokenizer's chat template (or --chat-template)",
                        "--apply_chat_template", "--apply-chat-template"),
         "system": typer.Option(None, "--system_instruction", "--system-instruction", help="system message"),
         "multiturn": _flag("few-shot examples as chat turns", "--fewshot_as_multiturn",
                            "--fewshot-as-multiturn"),
         "template": typer.Option(None, "--chat-template", help="chat template (a Jinja file, or its text) "
                                  "overriding the tokenizer's")}
_BATCH = typer.Option("8", "--batch-size", help="rows a model call, or auto (CUDA: the largest that fits, "
                      "found by trying; 8 elsewhere)")


def _print_json(obj) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, default=str))


def _version(value: bool) -> None:
    if value:
        from ouro_lab import __version__

        typer.echo(f"ouro-lab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Adaptive computation in looped language models: accuracy versus FLOPs."""


@app.command()
def inspect(model_dir: Path = typer.Argument(..., help="checkpoint folder (config.json + model.safetensors)"),
            dtype: str = typer.Option(None, help="float32, bfloat16, ... (default: the checkpoint's)"),
            device: str = _device(),
            text: str = typer.Option(None, help="run this text (ids if no tokenizer) through every step"),
            as_json: bool = _flag("print one JSON object instead of text", "--json")):
    """Load a checkpoint, print its shape, parameters and per-step compute."""
    from ouro_lab.flops import ModelCost
    from ouro_lab.loading import load_model

    model = load_model(model_dir, dtype=dtype, device=device)
    cfg = model.config
    cost = ModelCost.from_config(cfg)
    steps = _inspect_text(model, model_dir, text) if text is not None else None
    if as_json:
        _print_json({"path": str(model_dir), "layers": cfg.num_hidden_layers, "steps": cfg.total_ut_steps,
                     "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                     "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
                     "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                     "parameters": model.num_parameters(), "step_flops_per_token": cost.step_flops(0),
                     "attn_flops_per_ctx": cost.attn_flops_per_ctx, "head_flops": cost.head_flops,
                     "kv_bytes_per_step": cost.kv_bytes_per_step(model.dtype), "text_steps": steps})
        return
    typer.echo(f"{model_dir}: Ouro, {cfg.num_hidden_layers} layers x {cfg.total_ut_steps} steps, "
               f"hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
               f"vocab {cfg.vocab_size}, {model.dtype}")
    typer.echo(f"parameters: {model.num_parameters():,}")
    typer.echo(f"per token and step: {cost.step_flops(0) / 1e6:,.2f} MFLOP matmuls + "
               f"{cost.attn_flops_per_ctx:,} x ctx attention; LM-head readout "
               f"{cost.head_flops / 1e6:,.2f} MFLOP; KV cache {cost.kv_bytes_per_step(model.dtype):,} B")
    for r in steps or []:
        typer.echo(f"step {r['step']}: exit p {r['exit_p']:.3f}  next-token argmax {r['argmax']}")


def _inspect_text(model, model_dir: Path, text: str) -> list[dict]:
    """Per step, for the last token of `text`: exit probability and the next-token argmax."""
    import torch

    from ouro_lab.errors import OuroLabError
    from ouro_lab.loading import has_tokenizer, load_tokenizer
    from ouro_lab.model import exit_distribution

    if has_tokenizer(model_dir):
        ids = list(load_tokenizer(model_dir)(text, add_special_tokens=False).input_ids)  # as trace --text
    else:  # no tokenizer: the text is token ids
        try:
            ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise OuroLabError(f"--text {text!r}: {model_dir} has no tokenizer, so --text takes token ids "
                               "like '1 2 3'") from None
    V = model.config.vocab_size
    if not ids or not all(0 <= t < V for t in ids):
        raise OuroLabError(f"--text {text!r}: " + ("no tokens to inspect" if not ids else
                           f"token id {next(t for t in ids if not 0 <= t < V)} is out of the vocabulary "
                           f"(0..{V - 1})"))
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model(ids.to(model.device))
    pdf, _ = exit_distribution(out.gate_logits)
    return [{"step": r + 1, "exit_p": pdf[r, 0, -1].item(), "argmax": out.logits(r)[0, -1].argmax().item()}
            for r in range(out.steps)]


@app.command()
def strategies(strategies_dir: list[Path] = typer.Option(None, "--strategies-dir",
                                                         help="extra folder of strategy files (repeatable)"),
               check: bool = _flag("also build each one with its defaults and run fit/decide on synthetic "
                                   "signals, every step (loads torch)", "--check"),
               as_json: bool = _flag("print a JSON list instead of a table", "--json")):
    """List every exit strategy: name, its rule (first docstring line), parameters."""
    from rich.console import Console
    from rich.table import Table

    from ouro_lab.errors import OuroLabError
    from ouro_lab.registry import check_strategy, list_strategies

    infos = list_strategies(strategies_dir or ())
    if check:
        failed = []
        for i in infos:
            try:
                check_strategy(i.name, strategies_dir or ())
            except OuroLabError as e:
                failed.append(e)
        if failed:  # every broken strategy, one line each
            if os.environ.get("OURO_LAB_DEBUG") == "1":
                raise failed[0]
            for e in failed:
                typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
    if as_json:
        _print_json([{"name": i.name, "kind": i.kind, "rule": i.doc, "source": i.source,
                      "params": [{"name": p.name, "type": p.type, "default": p.default} for p in i.params]}
                     for i in infos])
        return
    t = Table(title=f"{len(infos)} exit strategies", show_lines=False)
    for col in ("name", "rule", "parameters", "from"):
        t.add_column(col, overflow="fold")
    for i in infos:
        params = ", ".join(f"{p.name}: {p.type} = {p.default}" if p.default else f"{p.name}: {p.type}"
                           for p in i.params)
        t.add_row(i.name + (" (select)" if i.kind == "select" else ""), i.doc, params or "-", i.source)
    Console(width=max(120, Console().width)).print(t)


@app.command()
def trace(model_dir: Path = typer.Argument(..., help="checkpoint folder (config.json + model.safetensors)"),
          text: str = typer.Option(None, help="text to trace (needs a tokenizer in MODEL_DIR)"),
          ids: str = typer.Option(None, help="token ids instead, e.g. '1 2 3' (no tokenizer needed)"),
          steps: int = typer.Option(None, help="loop steps (default: the checkpoint's total_ut_steps)"),
          dtype: str = typer.Option(None, help="float32, bfloat16, ... (default: the checkpoint's)"),
          device: str = _device(),
          out: Path = typer.Option(Path("results/traces"), "--out", "--output_path", metavar="DIR",
                                   help="folder for the trace file and heatmap (results/ is git-ignored)")):
    """Trace one text through every loop step: per-token table, heatmap PNG, trace file."""
    if (text is None) == (ids is None):
        from ouro_lab.errors import OuroLabError
        raise OuroLabError("trace: give exactly one of --text '...' or --ids '1 2 3'")
    if steps is not None and steps < 1:
        from ouro_lab.errors import OuroLabError
        raise OuroLabError(f"trace: --steps must be >= 1, got {steps}")
    _check_out(out)
    from rich.console import Console

    from ouro_lab.loading import fingerprint, has_tokenizer, load_model, load_tokenizer
    from ouro_lab.plots import trace_heatmap
    from ouro_lab.trace import render_table, token_labels, trace_text

    model = load_model(model_dir, dtype=dtype, device=device)
    tok = load_tokenizer(model_dir) if has_tokenizer(model_dir) else None
    tr = trace_text(model, tok, text, steps=steps, ids=ids,
                    meta={"model": fingerprint(model_dir), "model_dir": str(model_dir)})
    ids_list = tr.meta["ids"]
    labels = token_labels(tok, ids_list)
    argmax = tr.signals["argmax"]  # (R, N)
    predict = token_labels(tok, argmax.reshape(-1).tolist())
    predict = [repr(p)[1:-1] for p in predict]
    Console(width=max(120, Console().width)).print(render_table(tr, labels, predict))
    stem = f"trace-{tr.meta['key'][:12]}"
    path = tr.save(out / f"{stem}.safetensors")
    png = trace_heatmap(tr, labels, out / f"{stem}.png", decode=lambda ids: token_labels(tok, ids))
    typer.echo(f"trace: {path}\nheatmap: {png}")


@app.command()
def sweep(recipe: Path = typer.Argument(..., help="recipe YAML (see recipes/demo.yaml)"),
          overrides: list[str] = typer.Argument(None, help="key=value overrides: tasks.limit=20"),
          out: Path = typer.Option(None, "--out", "--output_path", metavar="DIR",
                                   help="run folder (default results/<recipe>/<run-id>)"),
          include_path: list[Path] = typer.Option(None, "--include_path", "--include-path", metavar="DIR",
                                                  help="folder of task YAMLs, repeatable (tasks.include)"),
          limit: float = typer.Option(None, "--limit", metavar="N", callback=_check_count("--limit"),
                                      help="the first N documents of each task's file (tasks.limit)"),
          seed: int = typer.Option(None, "--seed", help="seed of randomized rules and the bootstrap (seed)"),
          log_samples: bool = _flag("also write lm-eval's samples JSONL per task and setting (log_samples)",
                                    "--log_samples", "--log-samples"),
          dry_run: bool = _flag("validate, print grid and cost, stop", "--dry-run"),
          require_cache: bool = _flag("stop at once if the trace cache ($OURO_LAB_CACHE) cannot be written "
                                      "(default: run without caching, saying so)", "--require-cache")):
    """Run a recipe end to end: trace pass, replay every setting, live runs, tables, plots, report."""
    from ouro_lab.sweep import run_sweep

    run_sweep(recipe, _recipe_overrides(overrides, include_path, limit, seed, log_samples), out=out,
              dry_run=dry_run, require_cache=require_cache)


def _check_eval_flags(kv_policy: str, steps: int | None, num_fewshot: int | None) -> None:
    """`eval`'s flags, checked before the model loads (one line naming the flag)."""
    from ouro_lab.errors import OuroLabError
    from ouro_lab.live import KV_POLICIES

    if kv_policy not in KV_POLICIES:
        raise OuroLabError(f"eval: --kv-policy {kv_policy!r} unknown; use one of {', '.join(KV_POLICIES)}")
    for flag, v, low in (("--steps", steps, 1), ("--num-fewshot", num_fewshot, 0)):
        if v is not None and v < low:
            raise OuroLabError(f"eval: {flag} {v}: give a whole number >= {low}")


def _check_out(folder: Path, what: str = "--out") -> None:
    """An output folder that cannot be written is refused before any work (creating nothing)."""
    from ouro_lab.store import check_output

    check_output(folder, what)


def _recipe_overrides(overrides, include_path=None, limit=None, seed=None, log_samples=False) -> list[str]:
    """key=value overrides, with the lm-eval style options turned into theirs."""
    import json

    out = list(overrides or [])
    if log_samples:
        out.append("log_samples=true")
    if include_path:
        out.append("tasks.include=" + json.dumps([str(p) for p in include_path]))
    if limit is not None:
        out.append(f"tasks.limit={limit}")
    if seed is not None:
        out.append(f"seed={seed}")
    return out


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             overrides: list[str] = typer.Argument(None, help="key=value overrides"),
             as_json: bool = _flag("print the plan as one JSON object", "--json")):
    """Check a recipe (every error at once) and print its expanded grid and estimated cost."""
    from ouro_lab.sweep import run_sweep

    run_sweep(recipe, overrides or [], dry_run=True, as_json=as_json)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a sweep's run folder")):
    """Rebuild plots/, report.md and report.html of a run from its files alone."""
    from ouro_lab.report import build_report

    res = build_report(run_dir)
    typer.echo(f"report: {res['report_md']}\nreport: {res['report_html']}\nplots: {len(res['plots'])} in "
               f"{run_dir / 'plots'}")


@app.command()
def compare(run_a: Path = typer.Argument(..., help="first run folder"),
            run_b: Path = typer.Argument(..., help="second run folder")):
    """Set two runs side by side: every shared row with both scores, the difference and FLOPs."""
    from ouro_lab.compare import compare as compare_runs

    typer.echo(compare_runs(run_a, run_b))


@app.command()
def schema(out: Path = typer.Option(Path("recipes/recipe.schema.json"), "--out",
                                    help="where to write the recipe JSON schema")):
    """Export the recipe format as a JSON schema (for editor completion and checking)."""
    from ouro_lab.recipe import write_json_schema

    if out.is_dir():
        from ouro_lab.errors import OuroLabError
        raise OuroLabError(f"schema --out: {out} is a folder; give a file path, e.g. "
                           f"{out / 'recipe.schema.json'}")
    _check_out(out.parent, "schema --out")
    out.parent.mkdir(parents=True, exist_ok=True)  # the README's default, run outside a checkout
    typer.echo(f"schema: {write_json_schema(out)}")


@app.command()
def train(recipe: Path = typer.Argument(..., help="training recipe YAML (see recipes/train-demo.yaml)"),
          fresh: bool = _flag("ignore a saved state in work_dir, start over", "--fresh")):
    """Train a looped model on the toy task family (Stage I, then Stage II gate-only); resumable."""
    import json

    from ouro_lab.train import main as train_main

    summary = train_main(recipe, resume=not fresh)
    test = summary["test"]
    typer.echo(f"trained in {summary['train_time_s']:.0f} s ({summary['stage1_steps']} + "
               f"{summary['stage2_steps']} updates); held-out accuracy per step "
               f"{json.dumps(test['acc_per_step'])}, mean exit step {test['mean_exit_step']:.2f} "
               f"(q={test['q']})")


@app.command(name="eval")
def eval_(model_dir: Path = typer.Argument(..., help="checkpoint folder (config, weights, tokenizer)"),
          tasks: str = typer.Option(..., "--tasks", help="comma-separated lm-eval task names"),
          include_path: list[Path] = typer.Option(None, "--include_path", "--include-path", metavar="DIR",
                                                  help="folder of task YAMLs, repeatable (default: tasks/)"),
          data_root: Path = typer.Option(None, "--data-root", help="local dataset copies for standard tasks "
                                         "(<root>/<hub id>; default $OURO_LAB_DATA)"),
          limit: float = typer.Option(None, "--limit", metavar="N", callback=_check_count("--limit"),
                                      help="the first N documents of each task's file"),
          sample: float = typer.Option(None, "--sample", metavar="N", callback=_check_count("--sample"),
                                       help="a seeded random subset of N docs per task"),
          num_fewshot: int = typer.Option(None, "--num-fewshot", help="override every task's few-shot count"),
          steps: int = typer.Option(None, "--steps", help="run the model cut to this many loop steps"),
          strategy: str = typer.Option(None, "--strategy", help="exit strategy (see `ouro-lab strategies`)"),
          strategies_dir: list[Path] = typer.Option(None, "--strategies-dir",
                                                    help="extra folder of strategy files (repeatable)"),
          param: list[str] = typer.Option(None, "--param", "-p",
                                          help="strategy parameter key=value, repeatable"),
          kv_policy: str = typer.Option("copy", "--kv-policy", help="live runs: full, copy or last"),
          live: bool = _flag("loglikelihood tasks as a true early-exit run too (default: one trace pass + "
                             "replay)", "--live"),
          batch_size: str = _BATCH,
          dtype: str = typer.Option(None, help="float32, bfloat16, ... (default: the checkpoint's)"),
          device: str = _device(),
          out: Path = typer.Option(None, "--out", "--output_path", metavar="DIR",
                                   help="folder for metrics.csv and samples.parquet"),
          seed: int = typer.Option(1234, "--seed", help="seed of few-shot sampling and randomized rules"),
          threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: half the "
                                      "cores this process may use, at most 8: no stall on a busy machine)"),
          log_samples: bool = _flag("also write lm-eval's samples JSONL per task (needs --output_path)",
                                    "--log_samples", "--log-samples"),
          cache_dir: Path = typer.Option(None, "--cache-dir",
                                         help="trace cache (default: $OURO_LAB_CACHE)"),
          apply_chat_template: bool = _CHAT["apply"], system_instruction: str = _CHAT["system"],
          fewshot_as_multiturn: bool = _CHAT["multiturn"], chat_template: str = _CHAT["template"]):
    """lm-eval metrics of a checkpoint, plain or under an exit strategy (with compute columns)."""
    from ouro_lab.errors import OuroLabError

    if log_samples and out is None:
        raise OuroLabError("eval: --log_samples writes files: give the folder with --output_path DIR")
    _check_eval_flags(kv_policy, steps, num_fewshot)
    if out is not None:
        _check_out(out)
    params = _strategy_params(param, strategy)
    _set_threads(threads)
    from ouro_lab.evaluate import evaluate_tasks
    from ouro_lab.store import trace_cache

    cache_dir = trace_cache(log=lambda m: typer.echo(m, err=True), path=cache_dir)  # checked before any pass
    logs: list | None = [] if log_samples else None
    metrics, samples = evaluate_tasks(model_dir, tasks, include_path=include_path or None,
                                      data_root=data_root, limit=limit, num_fewshot=num_fewshot,
                                      steps=steps, strategy=strategy,
                                      params=params, kv_policy=kv_policy, live=live, batch_size=batch_size,
                                      dtype=dtype, device=device, cache_dir=cache_dir, seed=seed, log=logs,
                                      strategies_dirs=strategies_dir or (), sample=sample,
                                      chat=dict(apply_chat_template=apply_chat_template,
                                                chat_template=chat_template,
                                                system_instruction=system_instruction,
                                                fewshot_as_multiturn=fewshot_as_multiturn))
    from ouro_lab import distributed

    if not distributed.is_main():
        return  # data parallel: every rank holds every result; rank 0 alone prints and writes
    if limit is not None:
        typer.echo("warning: --limit scores the first documents of each file, not a sample; pass "
                   "--sample N for a seeded random subset", err=True)
    for r in metrics:
        extra = (f"  steps {r['steps_used_mean']:.2f} used / {r['steps_executed_mean']:.2f} run, "
                 f"{r['flops_executed_per_token'] / 1e6:,.3f} MFLOP/token" if "steps_used_mean" in r else "")
        typer.echo(f"{r['task']:<24} {r['metric']:<16} {r['filter']:<16} {r['value']:.4f} "
                   f"± {r['stderr']:.4f}{extra}")
    if out is not None:
        from ouro_lab.evaluate import write_outputs

        written = write_outputs(metrics, samples, out, strategy=strategy, params=params, steps=steps,
                                logs=logs)
        typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


def _strategy_params(param: list[str] | None, strategy: str | None) -> dict:
    """eval's `--param key=value` options as a dict (each needs `--strategy`)."""
    from ouro_lab.errors import OuroLabError

    params = {}
    for p in param or []:
        if "=" not in p:
            raise OuroLabError(f"--param {p!r}: expected key=value, e.g. --param q=0.7")
        k, v = p.split("=", 1)
        params[k.strip()] = v.strip()
    if params and strategy is None:
        raise OuroLabError(f"--param {param[0]}: --param needs --strategy (e.g. --strategy threshold "
                           "--param q=0.7; see `ouro-lab strategies`)")
    return params


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads: as asked, else half the cores this process may use (at most 8):
    torch's default, every core, stalls when other work shares the machine."""
    n = threads or max(1, min(8, len(os.sched_getaffinity(0)) // 2 if hasattr(os, "sched_getaffinity")
                              else (os.cpu_count() or 2) // 2))
    import torch

    torch.set_num_threads(n)


@app.command(name="lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                               "help_option_names": []})
def lm_eval_(ctx: typer.Context):
    """lm-eval's own CLI with `--model ouro-lab` registered (all arguments go to lm-eval)."""
    from ouro_lab.lm_eval_cli import main as lm_eval_main

    lm_eval_main(list(ctx.args))


def main() -> None:
    import signal

    from ouro_lab.errors import OuroLabError

    def interrupted(signum, frame):  # typer swallows KeyboardInterrupt (exit 130): say it here
        typer.echo("interrupted: files already written are kept; rerun the command to resume", err=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    try:  # newer typer carries its own copy of click; its exceptions are that copy's
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors
    try:
        rv = app(standalone_mode=False, prog_name="ouro-lab")  # refusals come here: one line each
    except click_errors.NoArgsIsHelpError as e:  # bare `ouro-lab`: the help, as before
        e.show()
        sys.exit(2)
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "ouro-lab"
        typer.echo(f"error: {where}: {e.format_message()} (see `{where} --help`)", err=True)
        sys.exit(2)
    except OuroLabError as e:
        if os.environ.get("OURO_LAB_DEBUG") == "1":
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # a path the file system refuses (a special folder, a dead mount): one line
        if os.environ.get("OURO_LAB_DEBUG") == "1":
            raise
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{e.strerror or e}; choose another path (OURO_LAB_DEBUG=1 shows the "
                   "traceback)", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # click's or typer's Abort (their names differ across versions): Ctrl-C
        if type(e).__name__ != "Abort":
            raise
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
