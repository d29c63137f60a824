"""The `ouro-lab` command line: thin typer commands that import heavy libraries lazily.

Each command parses its arguments, imports what it needs inside its body and calls one
library function. User mistakes (`OuroLabError`) print one line and exit 2; set
`OURO_LAB_DEBUG=1` for the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adaptive computation in looped language models: accuracy versus FLOPs.")


@app.callback()
def _root() -> None:
    """Adaptive computation in looped language models: accuracy versus FLOPs."""


@app.command()
def inspect(model_dir: Path = typer.Argument(..., help="checkpoint folder (config.json + model.safetensors)"),
            dtype: str = typer.Option(None, help="float32, bfloat16, ... (default: the checkpoint's)"),
            device: str = typer.Option("cpu", help="cpu, cuda or mps"),
            text: str = typer.Option(None, help="run this text (ids if no tokenizer) through every step")):
    """Load a checkpoint, print its shape, parameters and per-step compute."""
    from ouro_lab.flops import ModelCost
    from ouro_lab.loading import load_model

    model = load_model(model_dir, dtype=dtype, device=device)
    cfg = model.config
    cost = ModelCost.from_config(cfg)
    typer.echo(f"{model_dir}: Ouro, {cfg.num_hidden_layers} layers x {cfg.total_ut_steps} steps, "
               f"hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
               f"vocab {cfg.vocab_size}, {model.dtype}")
    typer.echo(f"parameters: {model.num_parameters():,}")
    typer.echo(f"per token and step: {cost.step_flops(0) / 1e6:,.2f} MFLOP matmuls + "
               f"{cost.attn_flops_per_ctx:,} x ctx attention; LM-head readout "
               f"{cost.head_flops / 1e6:,.2f} MFLOP; KV cache {cost.kv_bytes_per_step(model.dtype):,} B")
    if text is not None:
        import torch

        from ouro_lab.model import exit_distribution

        try:
            from ouro_lab.loading import load_tokenizer
            tok = load_tokenizer(model_dir)
            ids = tok(text, return_tensors="pt").input_ids
        except Exception:
            ids = torch.tensor([[int(t) for t in text.split()]])
        with torch.no_grad():
            out = model(ids.to(model.device))
        pdf, _ = exit_distribution(out.gate_logits)
        for r in range(out.steps):
            top = out.logits(r)[0, -1].argmax().item()
            typer.echo(f"step {r + 1}: exit p {pdf[r, 0, -1].item():.3f}  next-token argmax {top}")


@app.command()
def strategies(strategies_dir: list[Path] = typer.Option(None, "--strategies-dir",
                                                         help="extra folder of strategy files (repeatable)"),
               check: bool = typer.Option(False, "--check", help="also build each one with its defaults and "
                                          "run fit/decide on synthetic signals, every step (loads torch)")):
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
          device: str = typer.Option("cpu", help="cpu, cuda or mps"),
          out: Path = typer.Option(Path("traces"), help="folder for the trace file and the heatmap")):
    """Trace one text through every loop step: per-token table, heatmap PNG, trace file."""
    if (text is None) == (ids is None):
        from ouro_lab.errors import OuroLabError
        raise OuroLabError("trace: give exactly one of --text '...' or --ids '1 2 3'")
    if steps is not None and steps < 1:
        from ouro_lab.errors import OuroLabError
        raise OuroLabError(f"trace: --steps must be >= 1, got {steps}")
    from rich.console import Console

    from ouro_lab.loading import fingerprint, load_model, load_tokenizer
    from ouro_lab.trace import render_table, save_heatmap, token_labels, trace_text

    model = load_model(model_dir, dtype=dtype, device=device)
    has_tok = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(model_dir) if has_tok else None
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
    png = save_heatmap(tr, labels, out / f"{stem}.png")
    typer.echo(f"trace: {path}\nheatmap: {png}")


@app.command()
def sweep(recipe: Path = typer.Argument(..., help="recipe YAML (see recipes/demo.yaml)"),
          overrides: list[str] = typer.Argument(None, help="key=value overrides: tasks.limit=20"),
          out: Path = typer.Option(None, "--out", help="run folder (default results/<recipe>/<run-id>)"),
          dry_run: bool = typer.Option(False, "--dry-run", help="validate, print grid and cost, stop"),
          require_cache: bool = typer.Option(False, "--require-cache",
                                             help="stop at once if the trace cache ($OURO_LAB_CACHE) cannot "
                                                  "be written (default: run without caching, saying so)")):
    """Run a recipe end to end: trace pass, replay every setting, live runs, tables, plots, report."""
    from ouro_lab.sweep import run_sweep

    run_sweep(recipe, overrides or [], out=out, dry_run=dry_run, require_cache=require_cache)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             overrides: list[str] = typer.Argument(None, help="key=value overrides")):
    """Check a recipe (every error at once) and print its expanded grid and estimated cost."""
    from ouro_lab.sweep import run_sweep

    run_sweep(recipe, overrides or [], dry_run=True)


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
    from ouro_lab.report import compare as compare_runs

    typer.echo(compare_runs(run_a, run_b))


@app.command()
def schema(out: Path = typer.Option(Path("recipes/recipe.schema.json"), "--out",
                                    help="where to write the recipe JSON schema")):
    """Export the recipe format as a JSON schema (for editor completion and checking)."""
    from ouro_lab.recipe import write_json_schema

    typer.echo(f"schema: {write_json_schema(out)}")


@app.command()
def train(recipe: Path = typer.Argument(..., help="training recipe YAML (see recipes/train-demo.yaml)"),
          fresh: bool = typer.Option(False, "--fresh", help="ignore a saved state in work_dir, start over")):
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
          include_path: list[Path] = typer.Option(None, "--include-path",
                                                  help="folder(s) of task YAMLs (default: tasks/)"),
          data_root: Path = typer.Option(None, "--data-root", help="local dataset copies for standard tasks "
                                         "(<root>/<hub id>; default $OURO_LAB_DATA)"),
          limit: float = typer.Option(None, "--limit", help="first docs of each file (fraction if < 1)"),
          sample: int = typer.Option(None, "--sample", help="a seeded random subset of N docs per task"),
          num_fewshot: int = typer.Option(None, "--num-fewshot", help="override every task's few-shot count"),
          steps: int = typer.Option(None, "--steps", help="run the model cut to this many loop steps"),
          strategy: str = typer.Option(None, "--strategy", help="exit strategy (see `ouro-lab strategies`)"),
          strategies_dir: list[Path] = typer.Option(None, "--strategies-dir",
                                                    help="extra folder of strategy files (repeatable)"),
          param: list[str] = typer.Option(None, "--param", "-p",
                                          help="strategy parameter key=value, repeatable"),
          kv_policy: str = typer.Option("copy", "--kv-policy", help="live runs: full, copy or last"),
          live: bool = typer.Option(False, "--live", help="loglikelihood tasks as a true early-exit run too "
                                    "(default: one trace pass + replay)"),
          batch_size: str = typer.Option("8", "--batch-size", help="rows a call, or auto (CUDA: the largest "
                                         "that fits, found by trying)"),
          dtype: str = typer.Option(None, help="float32, bfloat16, ... (default: the checkpoint's)"),
          device: str = typer.Option(None, help="cpu, cuda or mps (default: best available)"),
          out: Path = typer.Option(None, "--out", help="folder for metrics.csv and samples.csv"),
          cache_dir: Path = typer.Option(None, "--cache-dir",
                                         help="trace cache (default: $OURO_LAB_CACHE)"),
          apply_chat_template: bool = typer.Option(False, "--apply-chat-template",
                                                   help="render requests with the tokenizer's chat template"),
          system_instruction: str = typer.Option(None, "--system-instruction", help="system message"),
          fewshot_as_multiturn: bool = typer.Option(False, "--fewshot-as-multiturn",
                                                    help="few-shot examples as chat turns"),
          chat_template: str = typer.Option(None, "--chat-template",
                                            help="chat template file (or text) overriding the tokenizer's")):
    """lm-eval metrics of a checkpoint, plain or under an exit strategy (with compute columns)."""
    from ouro_lab.errors import OuroLabError
    from ouro_lab.evaluate import evaluate_tasks
    from ouro_lab.store import trace_cache

    cache_dir = trace_cache(log=lambda m: typer.echo(m, err=True), path=cache_dir)  # checked before any pass
    params = {}
    for p in param or []:
        if "=" not in p:
            raise OuroLabError(f"--param {p!r}: expected key=value, e.g. --param q=0.7")
        k, v = p.split("=", 1)
        params[k.strip()] = v.strip()
    metrics, samples = evaluate_tasks(model_dir, tasks, include_path=include_path or None,
                                      data_root=data_root, limit=limit, num_fewshot=num_fewshot,
                                      steps=steps, strategy=strategy,
                                      params=params, kv_policy=kv_policy, live=live, batch_size=batch_size,
                                      dtype=dtype, device=device, cache_dir=cache_dir,
                                      strategies_dirs=strategies_dir or (), sample=sample,
                                      chat={"apply_chat_template": apply_chat_template,
                                            "system_instruction": system_instruction,
                                            "fewshot_as_multiturn": fewshot_as_multiturn,
                                            "chat_template": chat_template})
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
        import pandas as pd

        out.mkdir(parents=True, exist_ok=True)
        from ouro_lab.files import atomic_path

        for name, frame in (("metrics.csv", pd.DataFrame(metrics)), ("samples.csv", samples)):
            with atomic_path(out / name) as tmp:
                frame.to_csv(tmp, index=False)
        typer.echo(f"wrote {out / 'metrics.csv'} and {out / 'samples.csv'}")


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
    try:
        app()
    except OuroLabError as e:
        if os.environ.get("OURO_LAB_DEBUG") == "1":
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
