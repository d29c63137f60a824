"""lm-eval task objects built once, offline, from YAML folders and local dataset copies.

`TaskSet(names, include_path=..., data_root=..., limit=..., num_fewshot=...)` indexes only
the folders it is given (lm-eval's `TaskManager(include_path=..., include_defaults=False)`:
no 7-9 s scan of lm-eval's 10k task files), builds each task object once and keeps it.
Two things lm-eval does not do on its own, this module does:

* **Relative `data_files` resolve against the YAML's folder** (lm-eval resolves them
  against the working directory), so `tasks/loop_demo_mc/loop_demo_mc.yaml` can say
  `data_files: {test: test.jsonl}` and run from anywhere.
* **Standard tasks from local copies.** arc_easy, arc_challenge, hellaswag, piqa,
  winogrande, mmlu and gsm8k use lm-eval's own YAMLs (indexed from that task's folder
  only), with `dataset_path` pointed at a local folder `<data_root>/<hub id>` holding
  the dataset in the hub's own layout, e.g.

      hf download allenai/ai2_arc --repo-type dataset --local-dir $DATA/allenai/ai2_arc
      hf download openai/gsm8k    --repo-type dataset --local-dir $DATA/openai/gsm8k

  (on a machine with network; copy `$DATA` over). `datasets.load_dataset(<folder>,
  <config>)` then reads the folder's README `configs:` header and parquet files with
  the hub unreachable (`HF_DATASETS_OFFLINE=1`, `HF_HUB_OFFLINE=1`). `data_root`
  defaults to `$OURO_LAB_DATA`.

Per-doc metadata (a `difficulty` field, for instance) is read from the docs themselves:
`TaskSet.doc_meta(task, doc_id, key)`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ouro_lab.errors import OuroLabError

ROOT = Path(__file__).resolve().parents[1]
PROJECT_TASKS = ROOT / "tasks"

# name -> (folder under lm_eval/tasks holding its YAML, hub dataset id its YAML names)
STANDARD: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc", "allenai/ai2_arc"),
    "arc_challenge": ("arc", "allenai/ai2_arc"),
    "hellaswag": ("hellaswag", "Rowan/hellaswag"),
    "piqa": ("piqa", "baber/piqa"),
    "winogrande": ("winogrande", "allenai/winogrande"),
    "mmlu": ("mmlu/default", "cais/mmlu"),
    "gsm8k": ("gsm8k", "openai/gsm8k"),
}


class TaskError(OuroLabError):
    """A task name, YAML or local dataset that cannot be used."""


def _offline_env() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _absolute_data_files(data_files, folder: Path):
    """data_files (str | list | {split: str | list}) with relative paths made absolute."""
    def fix(p):
        return p if "://" in str(p) or Path(p).is_absolute() else str((folder / p).resolve())

    if isinstance(data_files, dict):
        return {k: [fix(p) for p in v] if isinstance(v, list) else fix(v) for k, v in data_files.items()}
    if isinstance(data_files, list):
        return [fix(p) for p in data_files]
    return fix(data_files)


@dataclass
class TaskSet:
    """lm-eval tasks built once. `names` are task or group names found in `include_path`
    (default: the project's `tasks/` folder) or standard task names (see module doc).

    `task_dict` is lm-eval's `{"tasks", "groups", "group_map"}` dict, ready for
    `lm_eval.evaluator.evaluate`; `limit` follows lm-eval (an int, or a fraction < 1;
    1.0 means one document); `num_fewshot` overrides every task's; `fewshot_seed` is
    re-applied by `reset_seeds()` before every evaluation so that each call samples
    the same few-shot examples."""

    names: list[str]
    include_path: list[str | Path] | None = None
    data_root: str | Path | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    fewshot_seed: int = 1234
    task_dict: dict = field(init=False, repr=False)
    scorers: dict = field(init=False, repr=False, default_factory=dict)  # harness.Scorer cache

    def __post_init__(self):
        _offline_env()
        if isinstance(self.names, str):
            self.names = [n for n in self.names.split(",") if n]
        if not self.names:
            raise TaskError("tasks: no task names given; name at least one (e.g. loop_demo_mc)")
        self.task_dict = build_task_dict(self.names, self.include_path, self.data_root)
        for task in self.tasks.values():
            if self.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        self.reset_seeds()

    @property
    def tasks(self) -> dict:
        """Leaf task objects by name."""
        return self.task_dict["tasks"]

    def output_type(self, task: str) -> str:
        return self.tasks[task].OUTPUT_TYPE

    def names_of(self, *output_types: str) -> list[str]:
        """Leaf task names whose output type is one of `output_types`."""
        return [n for n, t in self.tasks.items() if t.OUTPUT_TYPE in output_types]

    def subset(self, names: list[str]) -> dict:
        """A task_dict holding only the leaf tasks `names` (groups whose members are all
        kept stay, so group aggregates are still computed)."""
        keep = set(names)
        groups = {g: obj for g, obj in self.task_dict.get("groups", {}).items()
                  if set(self.task_dict["group_map"].get(g, [])) <= keep}
        return {"tasks": {n: t for n, t in self.tasks.items() if n in keep}, "groups": groups,
                "group_map": {g: self.task_dict["group_map"][g] for g in groups}}

    def reset_seeds(self) -> None:
        """Re-seed few-shot sampling (lm-eval's `simple_evaluate` does this once per run;
        we evaluate many times over the same task objects)."""
        for task in self.tasks.values():
            task.set_fewshot_seed(seed=self.fewshot_seed)

    def doc_meta(self, task: str, doc_id: int, key: str):
        docs = self.tasks[task].eval_docs
        doc = docs[int(doc_id)]
        return doc.get(key) if isinstance(doc, dict) else None


def build_task_dict(names: list[str], include_path=None, data_root=None) -> dict:
    """lm-eval's task dict for `names`: see the module docstring for the lookup rules."""
    from lm_eval.tasks import TaskManager

    _offline_env()
    paths = [Path(p) for p in (include_path or [PROJECT_TASKS])]
    for p in paths:
        if not p.exists():
            raise TaskError(f"include_path {p}: no such folder; point it at a folder of task YAMLs")
    std = [n for n in names if n in STANDARD]
    lm_dir = _lm_eval_tasks_dir()
    paths += sorted({lm_dir / STANDARD[n][0] for n in std})
    tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    root = Path(data_root or os.environ.get("OURO_LAB_DATA") or "data")
    built = []
    for name in names:
        entry = tm.task_index.get(name)
        if entry is None:
            hint = difflib.get_close_matches(name, list(tm.all_tasks) + list(STANDARD), n=3)
            raise TaskError(f"task {name!r} not found in {', '.join(str(p) for p in paths)}"
                            + (f"; did you mean {', '.join(hint)}?" if hint else
                               "; add its YAML folder to include_path"))
        overrides = {}
        if name in STANDARD:
            local = root / STANDARD[name][1]
            if not local.is_dir():
                raise TaskError(f"{name}: no local copy of {STANDARD[name][1]} at {local}; download it "
                                f"there in the hub's layout (hf download {STANDARD[name][1]} --repo-type "
                                f"dataset --local-dir {local}) or set data_root / OURO_LAB_DATA")
            overrides["dataset_path"] = str(local.resolve())
        elif entry.yaml_path is not None:
            overrides.update(_yaml_overrides(Path(entry.yaml_path)))
        try:
            # lm-eval's factory merges overrides into the YAML's config (and into every member
            # of a group); TaskManager.load() then flattens the built objects.
            obj = tm._factory.build(entry, overrides=overrides or None, registry=tm._index)
        except (FileNotFoundError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TaskError(f"task {name} ({entry.yaml_path}): cannot load its dataset ({msg})") from None
        built.extend(obj if isinstance(obj, list) else [obj])
    return tm.load(built)


def _yaml_overrides(yaml_path: Path) -> dict:
    """`dataset_kwargs` with relative `data_files` resolved against the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=False)
    kwargs = cfg.get("dataset_kwargs") or {}
    if "data_files" not in kwargs:
        return {}
    return {"dataset_kwargs": {**kwargs, "data_files": _absolute_data_files(kwargs["data_files"],
                                                                              yaml_path.parent)}}
