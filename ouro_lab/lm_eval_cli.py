"""lm-eval's own command line with ouro-lab models registered as `--model ouro-lab`.

    python -m ouro_lab.lm_eval_cli --model ouro-lab --model_args path=ckpt,steps=2 \
        --tasks loop_demo_mc --include_path tasks --batch_size 8
    ouro-lab lm-eval --model ouro-lab --model_args path=ckpt,strategy=threshold,q=0.7 ...

Every argument goes to lm-eval unchanged (`lm-eval run --help`). Model args are
`ouro_lab.lm.OuroLM`'s: path, steps, strategy (+ its parameters), kv_policy, live,
batch_size, device, dtype, max_length, max_gen_toks, seed. Two things differ from plain
lm-eval, as in `ouro-lab eval`: a task YAML's relative `data_files` resolve against the
YAML's folder (lm-eval resolves them against the working directory), and with
`--log_samples` every line of lm-eval's samples files gains `ouro_lab`: the model args and
that document's compute (loop steps; for live runs also FLOPs and seconds per token).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

NAME = "ouro-lab"
MADE: list = []  # the OuroLM objects lm-eval's CLI built in this process


def register() -> None:
    """Register `OuroLM` with lm-eval's model registry under the name `ouro-lab`."""
    from lm_eval.api.registry import get_model, register_model

    from ouro_lab.lm import OuroLM

    try:
        if get_model(NAME) is OuroLM:
            return
    except (KeyError, ValueError):
        pass
    register_model(NAME)(OuroLM)


def resolve_data_files() -> None:
    """Make lm-eval read a task YAML's relative `data_files` against the YAML's folder."""
    from lm_eval.tasks import _factory

    from ouro_lab.tasks import _absolute_data_files

    load = _factory.load_yaml
    if getattr(load, "ouro_lab", False):
        return

    def load_yaml(path, *a, **k):
        cfg = load(path, *a, **k)
        kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            files = _absolute_data_files(kwargs["data_files"], Path(path).parent)
            cfg["dataset_kwargs"] = {**kwargs, "data_files": files}
        return cfg

    load_yaml.ouro_lab = True
    _factory.load_yaml = load_yaml


def _track_models() -> None:
    from ouro_lab.lm import OuroLM

    if getattr(OuroLM.__init__, "ouro_lab_tracked", False):
        return
    init = OuroLM.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        MADE.append(self)

    tracked.ouro_lab_tracked = True
    OuroLM.__init__ = tracked


def _option(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def annotate(argv: list[str], since: float) -> list[Path]:
    """Add `ouro_lab` to the samples files this run wrote under --output_path."""
    from ouro_lab.sample_log import annotate_lm_eval_files, record_compute

    out = _option(argv, "--output_path", "-o")
    if not MADE or out is None or not any(a in ("--log_samples", "-s") for a in argv):
        return []
    root = Path(out)
    root = root.parent if root.suffix == ".json" else root
    files = [p for p in root.rglob("samples_*.jsonl") if p.stat().st_mtime >= since - 1]
    lm = MADE[-1]
    compute = record_compute(lm.records)
    extra = {"model_args": _option(argv, "--model_args", "--model-args"), "steps": lm.steps,
             "strategy": type(lm.strategy).__module__.rsplit(".", 1)[-1] if lm.strategy is not None else None,
             "live": lm.live}
    if not lm.live:  # no per-request records: every token ran the model cut to `steps`
        extra.update(steps_used=lm.steps, steps_executed=lm.steps)
    annotate_lm_eval_files(files, compute, extra, _samples_arg(_option(argv, "--samples", "-E")))
    return files


def _samples_arg(value: str | None) -> dict | None:
    """lm-eval's `--samples` ({task: [file index, ...]}: JSON text, or a JSON file's path)."""
    if not value:
        return None
    try:
        path = Path(value)
        got = json.loads(path.read_text() if not value.lstrip().startswith("{") and path.is_file() else value)
    except (OSError, ValueError):
        return None  # lm-eval itself has refused it by now
    return got if isinstance(got, dict) else None


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    register()
    resolve_data_files()
    _track_models()
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["lm-eval", *argv]
    t0 = time.time()
    try:
        cli_evaluate()
    except ValueError as e:  # lm-eval's own traceback for a mistyped task name
        if not str(e).startswith("Tasks not found:"):
            raise
        raise _tasks_not_found(str(e).split(":", 1)[1].strip(), argv) from None
    annotate(argv, t0)


def _tasks_not_found(missing: str, argv: list[str]):
    """One line naming the task(s) lm-eval did not find and how to see the names it knows."""
    from ouro_lab.lm import HarnessError

    inc = _option(argv, "--include_path", "--include-path")
    where = f"lm-eval's tasks or --include_path {inc}" if inc else "lm-eval's tasks (no --include_path given)"
    listing = f"ouro-lab lm-eval ls tasks{f' --include_path {inc}' if inc else ''}"
    return HarnessError(f"--tasks {missing}: no such task in {where}; check the name with `{listing}`, or "
                        "add the folder holding its YAML with --include_path DIR")


if __name__ == "__main__":
    main()
