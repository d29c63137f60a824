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
  defaults to `$OURO_LAB_DATA`. A copy whose card lacks the header (files copied by
  hand, or the hub's `refs/convert/parquet` branch) still loads when the config's
  folder holds its splits: `<config>/<split>-*.parquet` or `<config>/<split>/*.parquet`.

  Splits are checked before lm-eval builds a task (it reads the few-shot split even
  at 0-shot): the split a task scores must exist; a missing few-shot split is fine at
  0-shot (lm-eval is told it is absent) and at n-shot is one line naming the task and
  the split. mmlu's subjects (`mmlu_anatomy`, ...) and groups (`mmlu`, `mmlu_stem`,
  ...) come from the same folder; every subject must be a config of the local copy.

Per-doc metadata (a `difficulty` field, for instance) is read from the docs themselves:
`TaskSet.doc_meta(task, doc_id, key)`.
"""

from __future__ import annotations

import contextlib
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


def standard_source(name: str) -> tuple[str, str] | None:
    """(folder under lm_eval/tasks, hub dataset id) of a standard task, mmlu's subjects and
    groups included (`mmlu_anatomy`, `mmlu_stem`), else None."""
    if name in STANDARD:
        return STANDARD[name]
    if name.startswith("mmlu_"):
        return STANDARD["mmlu"]
    return None


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


def leaf_members(group_map: dict, name: str) -> list[str]:
    """The leaf tasks under group `name`, through nested groups (lm-eval's `group_map` or
    results' `group_subtasks`: group -> direct members, [] for a task); a task is its own leaf."""
    if not group_map.get(name):
        return [name]
    return list(dict.fromkeys(t for m in group_map[name] for t in leaf_members(group_map, m)))


@dataclass
class TaskSet:
    """lm-eval tasks built once. `names` are task or group names found in `include_path`
    (default: the project's `tasks/` folder) or standard task names (see module doc).

    `task_dict` is lm-eval's `{"tasks", "groups", "group_map"}` dict, ready for
    `lm_eval.evaluator.evaluate`; `limit` follows lm-eval (an int, or a fraction < 1;
    1.0 means one document); `num_fewshot` overrides every task's; `fewshot_seed` is
    re-applied by `reset_seeds()` before every evaluation so that each call samples
    the same few-shot examples. `sample` (instead of `limit`, which takes the head of
    the file) draws that many documents per task at random with `sample_seed`; lm-eval
    numbers them 0..n-1 in file order, `samples[task]` lists their indices in the file.
    `system_instruction`, `apply_chat_template` and `fewshot_as_multiturn` are lm-eval's
    chat switches; the requests are then rendered with `chat` (`ouro_lab.chat.ChatTemplate`
    of the model's tokenizer), the same for the trace pass, every replayed setting and
    every live run."""

    names: list[str]
    include_path: list[str | Path] | None = None
    data_root: str | Path | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    fewshot_seed: int = 1234
    sample: int | None = None
    sample_seed: int = 0
    system_instruction: str | None = None
    apply_chat_template: bool | str = False  # a string: one of the tokenizer's named templates
    fewshot_as_multiturn: bool = False
    chat: object = field(default=None, repr=False)  # ouro_lab.chat.ChatTemplate: set with the model
    task_dict: dict = field(init=False, repr=False)
    samples: dict | None = field(init=False, repr=False, default=None)  # task -> file indices
    scorers: dict = field(init=False, repr=False, default_factory=dict)  # scoring.Scorer cache
    request_keys: dict = field(init=False, repr=False, default_factory=dict)  # keys.requests_hash cache

    def __post_init__(self):
        _offline_env()
        if isinstance(self.names, str):
            self.names = [n for n in self.names.split(",") if n]
        if not self.names:
            raise TaskError("tasks: no task names given; name at least one (e.g. loop_demo_mc)")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise TaskError("tasks: fewshot_as_multiturn needs apply_chat_template (the shots become chat "
                            "turns); set apply_chat_template: true")
        if self.sample is not None and (isinstance(self.sample, bool) or not isinstance(self.sample, int)
                                        or self.sample < 1):  # sample([]) is no sample: every document
            raise TaskError(f"tasks: sample must be a whole number >= 1 (documents per task), got "
                            f"{self.sample!r}")
        self.task_dict = build_task_dict(self.names, self.include_path, self.data_root, self.num_fewshot)
        for task in self.tasks.values():
            if self.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        if self.sample is not None:
            if self.limit is not None:
                raise TaskError("tasks: give either limit (the first documents) or sample (a random "
                                "subset), not both")
            import random

            sizes = {n: len(t.eval_docs) for n, t in self.tasks.items()}
            self.samples = {n: sorted(random.Random(f"{self.sample_seed}:{n}").sample(range(k),
                                                                                   min(self.sample, k)))
                            for n, k in sizes.items()}
        self.reset_seeds()

    def samples_of(self, task: str) -> list[int] | None:
        """The file indices `sample` drew for `task` (None: no sample)."""
        return None if self.samples is None else self.samples[task]

    def selection(self, task: str) -> dict:
        """Which documents of `task` a run scores: how chosen, how many, out of how many."""
        n = len(self.tasks[task].eval_docs)
        if self.samples is not None and len(self.samples[task]) < n:  # a sample of them all is them all
            return {"how": "sample", "documents": len(self.samples[task]), "of": n, "seed": self.sample_seed,
                    "indices": self.samples[task]}  # doc_id i is the file's document indices[i]
        from lm_eval.evaluator_utils import get_sample_size  # lm-eval's own count (0.3 of 10: 3)

        k = n if not self.limit else min(n, get_sample_size(self.tasks[task], self.limit))
        if k < n:
            return {"how": "limit", "documents": k, "of": n}
        return {"how": "all", "documents": n, "of": n}

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
        """A task_dict holding only the leaf tasks `names` (groups whose leaf tasks are all
        kept stay, nested ones too, e.g. mmlu over its four category groups, so group
        aggregates are still computed)."""
        keep = set(names)
        group_map = self.task_dict["group_map"]
        groups = {g: obj for g, obj in self.task_dict.get("groups", {}).items()
                  if set(leaf_members(group_map, g)) <= keep}
        return {"tasks": {n: t for n, t in self.tasks.items() if n in keep}, "groups": groups,
                "group_map": {g: self.task_dict["group_map"][g] for g in groups}}

    def groups_apart(self, together: list[list[str]]) -> list[str]:
        """Groups whose leaf tasks are not all in one of the `together` task lists (each list
        one lm-eval scoring call: replayed tasks, a live task): lm-eval computes no aggregate
        for them, so callers say so rather than leave the group's row out unnoticed."""
        group_map = self.task_dict["group_map"]
        return sorted(g for g in self.task_dict.get("groups", {})
                      if not any(set(leaf_members(group_map, g)) <= set(t) for t in together))

    def sweep_groups_apart(self, ll: list[str], gen: list[str], live: bool) -> dict[str, str]:
        """{group: the line saying why} for a sweep: replayed loglikelihood tasks are scored in
        one call, generation tasks live one at a time, and `live` settings run loglikelihood
        tasks live one at a time too (their replayed rows keep the aggregate)."""
        said = {g: f"group {g}: its tasks are scored apart (replayed, or live one task at a time), so "
                   "lm-eval's group aggregate is not reported; each task's rows are"
                for g in self.groups_apart([ll] + [[t] for t in gen])}
        if live:
            said.update({g: f"group {g}: live settings score its tasks one at a time, so its live rows have "
                            "no group aggregate (its replayed rows do)"
                         for g in self.groups_apart([[t] for t in ll + gen]) if g not in said})
        return said

    def use_tokenizer(self, tokenizer=None, chat_template=None, path=None) -> None:
        """Bind the model's tokenizer (loaded from checkpoint folder `path` when not given;
        none there: no chat) and a chat-template override (`ouro_lab.chat.ChatTemplate`);
        with `apply_chat_template`, the template is checked now (one line if there is none)."""
        from ouro_lab.chat import ChatTemplate

        if tokenizer is None and path is not None:
            from ouro_lab.loading import has_tokenizer, load_tokenizer

            if has_tokenizer(path):
                tokenizer = load_tokenizer(path)
        if tokenizer is None:
            if self.apply_chat_template:
                raise TaskError(f"tasks: apply_chat_template needs a tokenizer; {path} has none")
            return
        self.chat = ChatTemplate(tokenizer, chat_template, source=f"tokenizer of {path or 'the model'}")
        self.request_kwargs()

    def request_kwargs(self) -> dict:
        """lm-eval's chat arguments of `Task.build_all_requests` for this task set: the system
        instruction and, with `apply_chat_template`, the model's template (`self.chat`, an
        `ouro_lab.chat.ChatTemplate`, set once the tokenizer is known)."""
        kw = {"system_instruction": self.system_instruction}
        if not self.apply_chat_template:
            return kw
        if self.chat is None:
            raise TaskError("tasks: apply_chat_template needs the model's tokenizer (TaskSet.chat); "
                            "load the model first")
        self.chat.chat_template(self.apply_chat_template)  # resolve it now: one line if there is none
        return {**kw, "apply_chat_template": True, "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "chat_template": self.chat.apply_chat_template, "tokenizer_name": self.chat.tokenizer_name}

    def reset_seeds(self) -> None:
        """Re-seed few-shot sampling (lm-eval's `simple_evaluate` does this once per run;
        we evaluate many times over the same task objects)."""
        for task in self.tasks.values():
            task.set_fewshot_seed(seed=self.fewshot_seed)

    def chance(self, task: str) -> float | None:
        """What guessing scores on the documents a run uses: multiple choice, the mean of
        1 / (number of choices); generation 0 (exact answers); otherwise None."""
        t = self.tasks[task]
        if t.OUTPUT_TYPE == "generate_until":
            return 0.0
        if t.OUTPUT_TYPE != "multiple_choice":
            return None
        from lm_eval.evaluator_utils import get_sample_size

        docs = [d for _, d in t.doc_iterator(limit=get_sample_size(t, self.limit),
                                             samples=self.samples_of(task))]
        return sum(1.0 / max(len(t.doc_to_choice(d)), 1) for d in docs) / max(len(docs), 1)

    def doc_meta(self, task: str, doc_id: int, key: str):
        docs = self.tasks[task].eval_docs
        doc = docs[int(doc_id) if self.samples is None else self.samples[task][int(doc_id)]]
        return doc.get(key) if isinstance(doc, dict) else None


def build_task_dict(names: list[str], include_path=None, data_root=None,
                    num_fewshot: int | None = None) -> dict:
    """lm-eval's task dict for `names`: see the module docstring for the lookup rules.
    `num_fewshot` (None: each task's own) decides whether a local copy needs its few-shot split."""
    from lm_eval.tasks import TaskManager

    _offline_env()
    paths = [Path(p) for p in (include_path or [PROJECT_TASKS])]
    for p in paths:
        if not p.exists():
            raise TaskError(f"include_path {p}: no such folder; point it at a folder of task YAMLs")
    own = list(paths)  # the user's folders (lm-eval's own task folders are added below)
    lm_dir = _lm_eval_tasks_dir()
    paths += sorted({lm_dir / src[0] for src in map(standard_source, names) if src})
    tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    root = Path(data_root or os.environ.get("OURO_LAB_DATA") or "data")
    factory = _local_copies_factory(tm._factory._meta, num_fewshot)
    built = []
    for name in names:
        entry = tm.task_index.get(name)
        if entry is None:
            hint = difflib.get_close_matches(name, list(tm.all_tasks) + list(STANDARD), n=3)
            broken = _unreadable_yaml(name, own)  # lm-eval's index skips such a file in silence
            raise TaskError(f"task {name!r} not found in {', '.join(str(p) for p in paths)}"
                            + (f"; {broken}" if broken else f"; did you mean {', '.join(hint)}?" if hint
                               else "; add its YAML folder to include_path"))
        overrides = {}
        src = standard_source(name)
        if src is not None:
            local = root / src[1]
            if not local.is_dir():
                raise TaskError(f"{name}: no local copy of {src[1]} at {local}; download it "
                                f"there in the hub's layout (hf download {src[1]} --repo-type "
                                f"dataset --local-dir {local}) or set data_root / OURO_LAB_DATA")
            overrides["dataset_path"] = str(local.resolve())
            factory.local_copies[overrides["dataset_path"]] = src[1]
        elif entry.yaml_path is not None:
            overrides.update(_yaml_overrides(Path(entry.yaml_path)))
        try:
            # lm-eval's factory merges overrides into the YAML's config (and into every member
            # of a group); TaskManager.load() then flattens the built objects.
            with _quiet("datasets"):  # its JSON loader logs each bad file: the error below says it once
                obj = factory.build(entry, overrides=overrides or None, registry=tm._index)
        except OuroLabError:
            raise
        except Exception as e:  # a task's YAML or data: the user's to fix, in one line
            msg = _build_error(name, entry.yaml_path, overrides, e)
            if msg is None:
                raise
            raise TaskError(msg) from None
        built.extend(obj if isinstance(obj, list) else [obj])
    try:
        return tm.load(built)
    except ValueError as e:  # lm-eval refuses a task named alone and inside a group
        if not str(e).startswith("Duplicate task"):
            raise
        raise TaskError(f"tasks: {str(e).splitlines()[0]}; name it once (a group already runs its "
                        "members)") from None


def _local_copies_factory(meta, num_fewshot: int | None):
    """lm-eval's TaskFactory, with every leaf task's relative `data_files` resolved against
    its own YAML's folder (a group's members included) and every leaf task whose data is a
    local copy of a hub dataset fitted to the splits that copy really has
    (`fit_local_splits`) before the task object (which reads them) is built.
    `.local_copies`: resolved folder -> hub id."""
    from lm_eval.tasks._factory import TaskFactory

    class LocalCopies(TaskFactory):
        local_copies: dict[str, str] = {}

        def _load_full_config(self, entry, overrides=None):
            cfg = super()._load_full_config(entry, overrides)
            kwargs = cfg.get("dataset_kwargs")
            if isinstance(cfg.get("task"), str) and entry.yaml_path and isinstance(kwargs, dict) \
                    and "data_files" in kwargs:  # every member of a group too, each against its own YAML
                cfg["dataset_kwargs"] = {**kwargs, "data_files": _absolute_data_files(
                    kwargs["data_files"], Path(entry.yaml_path).parent)}
            if isinstance(cfg.get("task"), str) and cfg.get("dataset_path") in self.local_copies:
                cfg = fit_local_splits(cfg, num_fewshot, self.local_copies[cfg["dataset_path"]])
            return cfg

    factory = LocalCopies(meta=meta)
    factory.local_copies = {}
    return factory


DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv", ".arrow")


def _split_files(folder: Path) -> dict[str, list[str]]:
    """{split: files} of a config folder without a card entry: `<split>-*.<ext>` files in
    it (the hub's layout) or `<split>/*.<ext>` (the hub's refs/convert/parquet branch)."""
    files: dict[str, list[str]] = {}
    if not folder.is_dir():
        return files
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if not f.is_file() or f.suffix not in DATA_EXTENSIONS or len(rel.parts) > 2:
            continue
        split = rel.parts[0] if len(rel.parts) == 2 else f.stem.split("-")[0].split(".")[0]
        files.setdefault(split, []).append(str(f))
    return files


def local_splits(local: Path, config: str | None, task: str, hub_id: str) -> tuple[dict, bool]:
    """The split files of config `config` of the local dataset copy `local`, {split: [files]},
    and whether its card (README.md `configs:` header) lists the config (else they come
    from the config's folder and must be given to datasets as `data_files`)."""
    import datasets

    label = f"{local} (config {config})" if config else str(local)
    try:
        builder = datasets.load_dataset_builder(str(local), config)
        return {k: list(v) for k, v in (builder.config.data_files or {}).items()}, True
    except ValueError as e:
        if "BuilderConfig" not in str(e):
            first = str(e).splitlines()[0]
            raise TaskError(f"{task}: the local copy {label} cannot be read ({first})") from None
        listed = str(e).split("Available:")[-1].strip(" []") if "Available:" in str(e) else "none"
        names = [n.strip(" '") for n in listed.split(",")]
        listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    except FileNotFoundError as e:  # no data files at all
        raise TaskError(f"{task}: the local copy {label} holds no data files ({str(e).splitlines()[0]}); "
                        f"download it again (hf download {hub_id} --repo-type dataset --local-dir {local})"
                        ) from None
    files = _split_files(local / config) if config else {}
    if not files:
        raise TaskError(f"{task}: the local copy {local} has no config {config!r}: its README.md `configs:` "
                        f"header lists {listed} and there is no folder {local / config} with "
                        f"<split>-*.parquet files; download the whole repository (hf download {hub_id} "
                        f"--repo-type dataset --local-dir {local}) or add that folder")
    return files, False


def _datasets_cache(files: dict[str, list[str]]) -> str:
    """A datasets cache folder of its own for these exact files (paths, sizes, modification
    times). datasets names the cache of a local folder after the folder's name and config
    alone: two copies called `mmlu` (another data root, a re-downloaded copy) would
    silently share the first one's converted data."""
    import hashlib

    import datasets

    h = hashlib.blake2b(digest_size=12)
    for split in sorted(files):
        for f in sorted(files[split]):
            st = os.stat(f)
            h.update(f"{split}\0{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "ouro-lab-local" / h.hexdigest())


def fit_local_splits(cfg: dict, num_fewshot: int | None, hub_id: str) -> dict:
    """A leaf task's config fitted to its local copy: the split it scores must exist; the
    split its few-shot examples come from (lm-eval's rule: fewshot_split, else the
    training, validation, test split) must exist when it runs n-shot, and any configured
    split the copy lacks is set to None (lm-eval reads the few-shot split even at 0-shot).
    The copy gets a datasets cache of its own (`_datasets_cache`)."""
    task, local = cfg["task"], Path(cfg["dataset_path"])
    files, from_card = local_splits(local, cfg.get("dataset_name"), task, hub_id)
    splits = set(files)
    label = f"{local} (config {cfg['dataset_name']})" if cfg.get("dataset_name") else str(local)
    sub = "its config folder" if cfg.get("dataset_name") else "data/"
    kwargs = {**(cfg.get("dataset_kwargs") or {}), "cache_dir": _datasets_cache(files)}
    cfg = {**cfg, "dataset_kwargs": kwargs}
    if not from_card:
        kwargs["data_files"] = files
        cfg["dataset_name"] = None
    has = ", ".join(sorted(splits)) or "none"
    scored = cfg.get("test_split") or cfg.get("validation_split")
    if scored not in splits:
        raise TaskError(f"{task}: split {scored!r} (the documents it scores) is missing from the local "
                        f"copy {label}, which has: {has}; add {scored}-*.parquet to {sub} (and to the card's "
                        "configs header, if it has one)")
    fs = cfg.get("fewshot_config") if isinstance(cfg.get("fewshot_config"), dict) else {}
    shots = num_fewshot if num_fewshot is not None else int(cfg.get("num_fewshot") or 0)
    source = cfg.get("fewshot_split") or fs.get("split")
    if source is None and not fs.get("samples"):
        source = cfg.get("training_split") or cfg.get("validation_split") or cfg.get("test_split")
    if shots > 0 and source is not None and source not in splits:
        raise TaskError(f"{task}: {shots}-shot prompts take their examples from split {source!r}, which the "
                        f"local copy {label} lacks (it has: {has}); add {source}-*.parquet to {sub} (and to "
                        "the card's configs header, if it has one) or run 0-shot (num_fewshot: 0)")
    for key in ("training_split", "validation_split", "fewshot_split"):
        if cfg.get(key) is not None and cfg[key] not in splits:
            cfg[key] = None  # absent, and not needed at this shot count
    if fs.get("split") is not None and fs["split"] not in splits:
        cfg["fewshot_config"] = {**fs, "split": None}
    return cfg


def _yaml_overrides(yaml_path: Path) -> dict:
    """`dataset_kwargs` with relative `data_files` resolved against the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=False)
    kwargs = cfg.get("dataset_kwargs") or {}
    if "data_files" not in kwargs:
        return {}
    return {"dataset_kwargs": {**kwargs, "data_files": _absolute_data_files(kwargs["data_files"],
                                                                              yaml_path.parent)}}


def _unreadable_yaml(name: str, folders: list[Path]) -> str | None:
    """Why task `name` is missing: a YAML file in `folders`, named after the task or naming
    it, that does not parse, as 'file:line: problem; fix that file' (None: no such file)."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    files = [f for d in folders for f in ([d] if d.is_file() else sorted(d.glob("**/*.yaml")))]
    files = sorted((f for f in files if f.stem == name or name in f.read_text(errors="replace")),
                   key=lambda f: f.stem != name)
    for f in files:
        try:
            load_yaml(f, resolve_func=False, recursive=False)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            return f"{f}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({problem}); fix that file"
        except (OSError, ValueError) as e:
            return f"{f}: cannot be read as a task YAML ({str(e).splitlines()[0]}); fix that file"
    return None


def _build_error(name: str, yaml_path, overrides: dict, e: Exception) -> str | None:
    """One line for a task lm-eval cannot build: a template reading a field its documents
    lack, a data file that does not parse, or lm-eval's own first line (None: not a
    mistake in the task's files)."""
    where = f"task {name} ({yaml_path})"
    if type(e).__name__ == "UndefinedError":  # jinja2: "'question' is undefined"
        field_ = str(e).split("'")[1] if str(e).count("'") >= 2 else str(e)
        return (f"{where}: its template reads the field {field_!r}, which its documents lack; fix the "
                f"YAML's doc_to_text / doc_to_target / doc_to_choice or add {field_!r} to the data")
    files = (overrides.get("dataset_kwargs") or {}).get("data_files")
    if type(e).__name__ == "DatasetGenerationError" and files:
        return f"{where}: {_bad_data_file(files, e)}"
    if not isinstance(e, FileNotFoundError | ValueError):
        return None
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{where}: cannot load its dataset ({msg})"


def _bad_data_file(data_files, e: Exception) -> str:
    """'file:line: not valid JSON (...)' for the first JSON Lines line that does not parse,
    else the data files and the loader's cause; each with the fix."""
    import json

    files = (list(data_files.values()) if isinstance(data_files, dict) else
             data_files if isinstance(data_files, list) else [data_files])
    files = [f for v in files for f in (v if isinstance(v, list) else [v])]
    for f in files:
        if str(f).endswith((".jsonl", ".json")) and Path(f).is_file():
            with open(f, errors="replace") as fh:
                for i, line in enumerate(fh, 1):
                    try:
                        line.strip() and json.loads(line)
                    except json.JSONDecodeError as j:
                        return (f"data file {f}:{i}: not valid JSON Lines ({j.msg}, column {j.colno}); "
                                "fix that line (one JSON object per line)")
    cause = e.__cause__ or e
    return (f"data file(s) {', '.join(map(str, files))} cannot be read ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else ''}); fix the file")


@contextlib.contextmanager
def _quiet(name: str):
    """Silence a library's logger (and its children, which inherit its level) inside the block."""
    import logging

    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)
