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


def main() -> None:
    from ouro_lab.errors import OuroLabError

    try:
        app()
    except OuroLabError as e:
        if os.environ.get("OURO_LAB_DEBUG") == "1":
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: files already written are kept", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
