"""Per-sample logs in lm-eval's own format: one samples JSONL per task and setting.

Every line is what `lm_eval --log_samples` writes (doc_id, doc, target, arguments,
resps, filtered_resps, filter, metrics, doc_hash, prompt_hash, target_hash and each
metric's value, sanitized as lm-eval sanitizes them), so lm-eval's tooling and error
analysis read them, plus one key of ours, `ouro_lab`: the setting, the run mode and that
document's compute (exit steps used and executed per token, FLOPs per token, tokens;
replayed settings also list every scored token's exit step).

    lines = lm_eval_samples(results, tasks, requests, compute)   # {task: [sample, ...]}
    write_samples(run_dir / "samples" / "replay" / "threshold(q=0.5)", lines)
    # -> samples_<task>.jsonl per task

`ouro-lab sweep --log_samples` writes them under `samples/<run_mode>/<setting>/`, `ouro-lab
eval --log_samples` under its output folder, and `ouro-lab lm-eval --log_samples` adds
`ouro_lab` to the files lm-eval writes itself (`annotate_lm_eval_files`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ouro_lab.files import atomic_write

COMPUTE = ("steps_used", "steps_executed", "flops_per_token", "flops_executed_per_token", "tokens",
           "flops_executed", "flops_total_per_token", "seconds")


def safe_name(name: str) -> str:
    """A setting's label as a folder name: 'hidden_delta(eps=0.1)/seq' -> 'hidden_delta(eps=0.1)_seq'."""
    return "".join(c if c.isalnum() or c in "-_.=(),+" else "_" for c in name)


def _example(task, ex: dict, requests) -> dict:
    """A logged sample completed as lm-eval's evaluator builds it (replayed settings log
    only doc, filter, filtered responses and metrics: the rest comes from the requests)."""
    from lm_eval.utils import handle_non_serializable, hash_string

    if "arguments" in ex:
        return dict(ex)
    doc, filtered = ex["doc"], list(ex.get("filtered_resps") or [])
    target = task.doc_to_target(doc)
    out = {"doc_id": ex["doc_id"], "doc": doc, "target": target, "arguments": [r.args for r in requests],
           "resps": [[x] for x in filtered], "filtered_resps": filtered, "filter": ex.get("filter", "none"),
           "metrics": list(ex["metrics"]),
           "doc_hash": hash_string(json.dumps(requests[0].doc if requests else doc, indent=2,
                                              default=handle_non_serializable, ensure_ascii=False)),
           "prompt_hash": hash_string(requests[0].arguments[0]) if requests else "",
           "target_hash": hash_string(str(target))}
    out.update({m: ex[m] for m in ex["metrics"]})
    return out


def _number(v):
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else (int(f) if f.is_integer() and abs(f) < 2 ** 53 else f)


def lm_eval_samples(results: dict, tasks: dict, requests: dict | None = None, compute=None,
                    extra: dict | None = None, exits: dict | None = None,
                    file_index: dict | None = None) -> dict[str, list[dict]]:
    """Per task, lm-eval's sample records of `results` (lm-eval's results dict with
    `samples`), each with `ouro_lab` = `extra` + that document's row of `compute` (a
    DataFrame with task, doc_id and COMPUTE columns) + its tokens' exit steps from `exits`
    ({(task, doc_id): [step, ...]}). `tasks`: {name: lm-eval Task}; `requests`:
    {name: {doc_id: [Instance]}} for records that lack them (replayed settings).
    `file_index` ({name: [file index, ...]}, a `sample` run's draw): a line's doc_id is
    then the document's index in its file, as lm-eval logs it (ours count 0..n-1)."""
    rows = {}
    if compute is not None and len(compute):
        cols = [c for c in COMPUTE if c in compute.columns]
        for r in compute.drop_duplicates(["task", "doc_id"]).to_dict("records"):
            rows[(r["task"], int(r["doc_id"]))] = {c: _number(r[c]) for c in cols}
    out: dict[str, list[dict]] = {}
    for name, samples in (results.get("samples") or {}).items():
        task, reqs = tasks.get(name), (requests or {}).get(name, {})
        lines = []
        for ex in samples:
            line = _example(task, ex, reqs.get(ex["doc_id"], []))
            key = (name, int(ex["doc_id"]))
            info = dict(extra or {})
            info.update(rows.get(key, {}))
            if exits and key in exits:
                info["exit_steps"] = exits[key]
            line["ouro_lab"] = info
            index = (file_index or {}).get(name)
            if index:  # lm-eval's doc_id: the file's; ours (samples.parquet's) stays in `ouro_lab`
                line["doc_id"] = index[int(ex["doc_id"])]
                info["doc_id"] = int(ex["doc_id"])
            lines.append(line)
        out[name] = lines
    return out


def _sanitized(sample: dict) -> dict:
    """A sample as lm-eval's EvaluationTracker writes it: arguments as {gen_args_i: {arg_j}},
    responses sanitized, the target as a string."""
    from lm_eval.utils import sanitize_list

    s = dict(sample)
    s["arguments"] = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                      for i, arg in enumerate(sample["arguments"])}
    s["resps"] = sanitize_list(sample["resps"])
    s["filtered_resps"] = sanitize_list(sample["filtered_resps"])
    s["target"] = str(sample["target"])
    return s


def jsonl(samples: list[dict]) -> str:
    from lm_eval.utils import handle_non_serializable

    return "".join(json.dumps(_sanitized(s), default=handle_non_serializable, ensure_ascii=False) + "\n"
                   for s in samples)


def write_samples(folder: Path, per_task: dict[str, list[dict]]) -> list[Path]:
    """`samples_<task>.jsonl` per task in `folder`, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, samples in per_task.items():
        p = folder / f"samples_{task}.jsonl"
        atomic_write(p, jsonl(samples))
        paths.append(p)
    return paths


def requests_by_doc(task_dict: dict) -> dict:
    """{task: {doc_id: [Instance sorted by idx]}} of built lm-eval tasks."""
    out = {}
    for name, task in task_dict.items():
        by: dict = {}
        for inst in getattr(task, "instances", None) or []:
            by.setdefault(inst.doc_id, []).append(inst)
        out[name] = {d: sorted(v, key=lambda x: x.idx) for d, v in by.items()}
    return out


def record_compute(records: dict) -> dict:
    """An OuroLM's per-request `records` summed per (task, doc_id): tokens, steps used and
    executed per token, FLOPs per token (prompt prefill included) and seconds."""
    per: dict = {}
    for (task, doc_id, _idx), rec in records.items():
        d = per.setdefault((task, int(doc_id)), {"tokens": 0, "steps_used": 0, "steps_executed": 0,
                                                 "flops": 0.0, "seconds": 0.0})
        for k in d:
            d[k] += rec.get(k, 0)
    out = {}
    for key, d in per.items():
        n = max(d["tokens"], 1)
        out[key] = {"tokens": d["tokens"], "steps_used": d["steps_used"] / n,
                    "steps_executed": d["steps_executed"] / n, "flops_total_per_token": d["flops"] / n,
                    "seconds": d["seconds"]}
    return out


def annotate_lm_eval_files(files: list[Path], compute: dict, extra: dict,
                           file_index: dict | None = None) -> None:
    """Add `ouro_lab` (extra + the doc's compute) to every line of lm-eval's own samples
    files (`samples_<task>_<date>.jsonl`); the task is read from the file name. Under
    lm-eval's `--samples` ({task: [file index, ...]} as `file_index`) requests (and
    `compute`) count the chosen documents 0..n-1 in file order, and lm-eval labels the k-th
    one with the k-th index as given (`evaluator.evaluate`): a label is read back the same way."""
    for f in files:
        lines = []
        task = Path(f).name.removeprefix("samples_").rsplit("_", 1)[0]
        chosen = list((file_index or {}).get(task) or [])
        position = {d: k for k, d in enumerate(chosen)}
        for line in Path(f).read_text().splitlines():
            if not line.strip():
                continue
            s = json.loads(line)
            doc = position.get(int(s["doc_id"]), -1) if chosen else int(s["doc_id"])
            s["ouro_lab"] = {**extra, **compute.get((task, doc), {})}
            lines.append(json.dumps(s, ensure_ascii=False) + "\n")
        atomic_write(Path(f), "".join(lines))
