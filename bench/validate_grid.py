"""How long `ouro-lab validate` takes on a large grid: 100 versus 10,000 threshold settings
on a tiny random model, side by side in one process (imports warmed first), and one cold
`ouro-lab validate` of the 10,000-setting recipe as a user runs it.

    python bench/validate_grid.py [--settings 10000] [--reps 3]

Before issue 15 every setting rescanned the strategy folders and entry points (10,000
settings: over 300 s); now each grid discovers its strategy once.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    from rich.console import Console
    from sweep_helpers import lab

    from ouro_lab.sweep import run_sweep

    root = lab(Path(tempfile.mkdtemp(prefix="validate-grid-")))
    recipes = {}
    for n in (100, args.settings):
        qs = [round(i / n, 6) for i in range(n)]
        p = root / f"grid{n}.yaml"
        p.write_text(f"model: {{path: ckpt, dtype: float32, device: cpu, threads: 1}}\n"
                     f"tasks: {{names: [tiny_mc], include: [tasks], limit: 8}}\n"
                     f"strategies:\n  - {{name: threshold, grid: {{q: {qs}}}}}\n")
        recipes[n] = p
    run_sweep(recipes[100], dry_run=True, console=Console(file=io.StringIO()))  # warm the imports
    times: dict[int, list[float]] = {n: [] for n in recipes}
    for _ in range(args.reps):
        for n, p in recipes.items():
            t = time.perf_counter()
            run_sweep(p, dry_run=True, console=Console(file=io.StringIO()))
            times[n].append(time.perf_counter() - t)
    for n, ts in times.items():
        print(f"validate, {n:>6,} settings (warm, in process): median {statistics.median(ts):.3f} s "
              f"(runs {', '.join(f'{t:.3f}' for t in ts)})")
    big, small = statistics.median(times[args.settings]), statistics.median(times[100])
    print(f"ratio {args.settings:,} / 100 settings: {big / small:.2f}x; per extra setting "
          f"{(big - small) / (args.settings - 100) * 1e6:.1f} us")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for n, p in recipes.items():
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ouro_lab.cli", "validate", str(p)], cwd=root, env=env,
                           capture_output=True, text=True)
        print(f"cold `ouro-lab validate`, {n:>6,} settings: {time.perf_counter() - t:.2f} s "
              f"(exit {r.returncode}; imports of torch and lm-eval included)")


if __name__ == "__main__":
    main()
