"""A tiny lab (random model, tiny tasks, a recipe) and one finished sweep, made once per
test session and shared by test_sweep.py, test_report.py and test_report_browser.py."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

# speculative decoding runs on the generation task (a recipe without tiny_gen drops it)
SPECULATIVE = """speculative:
  - {{draft: {{name: fixed, grid: {{step: 1}}}}, draft_len: [2, 3]}}
"""
RECIPE = """# ouro-lab sweep {name}
model: {{path: ckpt, dtype: float32, device: cpu, threads: 1}}
tasks: {{names: [tiny_mc, tiny_gen], include: [tasks], limit: 8}}
strategies:
  - {{name: threshold, grid: {{q: [0.3, 0.6, 0.9]}}}}
  - {{name: threshold, grid: {{q: 0.6}}, live: true}}
  - {{name: budget, grid: {{mean_steps: [1.5, 2.5]}}}}
  - {{name: oracle}}
""" + SPECULATIVE + """bootstrap: 200
batch_size: 16
log_samples: true
"""

_made: dict[str, Path] = {}


def lab(root: Path) -> Path:
    """Model, tasks and recipe under `root` (made once); traces cached under root/cache."""
    from harness_helpers import make_model_dir, make_tasks

    if "lab" not in _made:
        make_model_dir(root / "ckpt")
        make_tasks(root / "tasks", n=8)
        (root / "r.yaml").write_text(RECIPE.format(name="r.yaml"))
        _made["lab"] = root
    os.environ["OURO_LAB_CACHE"] = str(_made["lab"] / "cache")
    os.environ["OURO_LAB_PROGRESS"] = "0"
    os.environ["OURO_LAB_PLOT_FORMATS"] = "png"  # SVG and PDF twins are tested in test_plots.py
    os.environ["TQDM_DISABLE"] = "1"
    return _made["lab"]


def finished_run(root: Path) -> Path:
    """The recipe swept once into <lab>/run1 (the same folder for every caller)."""
    from ouro_lab.sweep import run_sweep

    root = lab(root)
    if "run1" not in _made:
        _made["run1"] = run_sweep(root / "r.yaml", out=root / "run1")
    return _made["run1"]


def untimed(path):
    """metrics.csv without its wall-clock columns (the only ones identical runs may differ in)."""
    import pandas as pd

    from ouro_lab.tables import TIMING

    return pd.read_csv(path).drop(columns=list(TIMING))


def cli(*args, cwd=None):
    """`ouro-lab ARGS` in-process through `main()`: (exit code, stdout + stderr)."""
    from ouro_lab import cli as cli_mod

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["ouro-lab", *map(str, args)]
    cwd0 = os.getcwd()
    code = 0
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_mod.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
        os.chdir(cwd0)
    return code, out.getvalue() + err.getvalue()
