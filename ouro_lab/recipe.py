"""Sweep recipes: one YAML file describes a whole experiment, validated before any compute.

    # ouro-lab sweep recipes/demo.yaml
    model: {path: ../ouro_lab/builtin/loop-demo, dtype: float32, device: cpu}
    tasks: {names: [loop_demo_mc], include: [../tasks], limit: 200}
    strategies:
      - {name: threshold, grid: {q: [0.3, 0.5, 0.7, 0.9]}}
      - {name: kl, grid: {eps: [0.01, 0.1], min_step: 1}}

Relative paths in the file resolve against the recipe's folder; paths given as
`key=value` overrides on the command line resolve against the working directory.
Every error is reported at once, one line each: `file:line: field: problem (allowed: ...)`.
Nothing here imports torch: `validate` and `--dry-run` stay fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ouro_lab.errors import DEVICE_PATTERN, DEVICES, OuroLabError
from ouro_lab.files import atomic_write


class RecipeError(OuroLabError, ValueError):
    """One or more mistakes in a recipe; `errors` holds one line per mistake."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- schema

Scalar = int | float | str | bool | None


MAX_SETTINGS = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(_Strict):
    """The checkpoint to evaluate."""

    path: str = Field(description="checkpoint folder (config.json + model.safetensors)")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field(
        "float32", description="weights and activations dtype")
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description=DEVICES)
    steps: int | None = Field(None, ge=1, le=64,
                              description="loop depth R (default: the checkpoint's total_ut_steps)")
    threads: int | None = Field(None, ge=1, le=1024,
                                description="CPU threads for torch (default: torch's; 1 suits tiny models)")
    chat_template: str | None = Field(None, description="chat template overriding the tokenizer's: a Jinja "
                                      "file (relative to the recipe) or the template text")


class TasksSpec(_Strict):
    """lm-eval tasks to score (a bare list of names is accepted as `names`)."""

    names: list[str] = Field(min_length=1, description="lm-eval task names")
    include: list[str] = Field(default_factory=list, description="extra folders of task YAMLs")
    limit: int | None = Field(None, ge=1, description="the first this many documents per task (the head of "
                              "each file: a biased subset where files are sorted)")
    sample: int | None = Field(None, ge=1, description="a random subset of this many documents per task, "
                               "drawn with the recipe's seed (use it rather than limit)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (default: the task's)")
    data_root: str | None = Field(None, description="local copies of the standard tasks' datasets, "
                                  "<data_root>/<hub id> (default: $OURO_LAB_DATA)")
    apply_chat_template: bool | str = Field(False, description="render requests with the model's chat "
                                            "template (a string: one of the tokenizer's named templates)")
    system_instruction: str | None = Field(None, description="system message (chat) or prompt prefix")
    fewshot_as_multiturn: bool = Field(False, description="few-shot examples as chat turns "
                                       "(needs apply_chat_template)")

    @model_validator(mode="after")
    def _one_subset(self):
        if self.limit is not None and self.sample is not None:
            raise ValueError("give either limit (the first documents) or sample (a random subset), not both")
        return self

    @field_validator("names")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"task(s) listed twice: {', '.join(dup)}")
        return v


class RuleSpec(_Strict):
    """An exit strategy and the grid of parameter values to sweep."""

    name: str = Field(description="a strategy file's stem (see `ouro-lab strategies`)")
    grid: dict[str, Any] = Field(default_factory=dict,
                                 description="parameter -> value or list of values (cartesian product)")

    @field_validator("grid")
    @classmethod
    def _scalars(cls, grid: dict[str, Any]) -> dict[str, Any]:
        for k, v in grid.items():
            values = v if isinstance(v, list) else [v]
            if not values:
                raise ValueError(f"grid.{k}: empty list; give at least one value")
            for x in values:
                if not isinstance(x, int | float | str | bool) and x is not None:
                    raise ValueError(f"grid.{k}: {x!r} is not a number, string or boolean")
        return grid


class StrategySpec(RuleSpec):
    """One exit strategy and the grid of parameter values to sweep."""

    granularity: Literal["token", "sequence"] | None = Field(
        None, description="exit per token or per sequence (default: the recipe's)")
    live: bool = Field(False, description="also run these settings live (really stopping compute)")


class SpeculativeSpec(_Strict):
    """Lossless self-speculative decoding on the generation tasks: an exit rule drafts
    `draft_len` tokens at shallow depth, one full-depth pass verifies them; the output is
    full-depth greedy decoding's (rows report acceptance, steps executed, measured speed)."""

    draft: RuleSpec = Field(description="the drafting exit rule, e.g. {name: fixed, grid: {step: 1}}")
    draft_len: int | list[int] = Field(4, description="tokens drafted per round (a list: one setting each)")

    @field_validator("draft_len")
    @classmethod
    def _lengths(cls, v: int | list[int]) -> int | list[int]:
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("empty list; give at least one draft length")
        bad = [x for x in values if not 1 <= x <= 64]
        if bad:
            raise ValueError(f"draft lengths must be 1..64 tokens, got {bad[0]}")
        return v


class CalibrationSpec(_Strict):
    """How calibrating strategies (`budget`) are fitted without seeing what they report:
    documents are split into `folds` parts by a seeded hash, and each part is scored by
    a copy of the rule fitted on the other parts (cross-fitting)."""

    folds: int = Field(2, ge=2, le=20, description="number of document folds")
    seed: int = Field(0, description="seed of the document split")


class LiveSpec(_Strict):
    """Live runs: decoding (generate_until tasks) and true early exit for loglikelihood tasks."""

    kv_policy: Literal["full", "copy", "last"] = Field(
        "copy", description="how an exited token's deeper KV slots are filled")
    max_gen_toks: int | None = Field(None, ge=1, description="cap on generated tokens per request")


class Recipe(_Strict):
    """An ouro-lab sweep: one model, a task set, strategies with grids."""

    model: ModelSpec
    tasks: TasksSpec
    strategies: list[StrategySpec] = Field(min_length=1)
    strategies_dirs: list[str] = Field(default_factory=list,
                                       description="extra folders of strategy files")
    granularity: Literal["token", "sequence"] = "token"
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    live: LiveSpec = Field(default_factory=LiveSpec)
    speculative: list[SpeculativeSpec] = Field(
        default_factory=list, description="self-speculative decoding settings (generation tasks)")
    seed: int = Field(1234, description="seed for randomized strategies and the bootstrap")
    bootstrap: int = Field(1000, ge=0, le=100_000, description="paired-bootstrap resamples (0: none)")
    tolerance: float = Field(1.0, ge=0, allow_inf_nan=False,
                             description="accuracy loss (points) allowed for 'compute saved'")
    batch_size: int | str = Field(8, description="rows a model call, or auto: the largest that fits on CUDA "
                                  "(found by trying), 8 elsewhere")
    log_samples: bool = Field(False, description="also write lm-eval's samples JSONL per task and setting "
                                                 "(samples/<run_mode>/<setting>/samples_<task>.jsonl)")
    output: str | None = Field(None, description="run folder (default results/<recipe>/<run-id>)")
    max_settings: int = Field(MAX_SETTINGS, ge=1, description="refuse grids that expand to more settings "
                              "than this (a guard against a typo in a grid; raise it on purpose)")

    @field_validator("batch_size", mode="before")  # before: `true` would already be 1
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"{v!r} is not allowed (allowed: a positive integer, or auto)")

    @model_validator(mode="before")
    @classmethod
    def _tasks_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("tasks"), list):
            data = {**data, "tasks": {"names": data["tasks"]}}
        return data


TOP_KEYS = tuple(Recipe.model_fields)
PATH_FIELDS = (("model", "path"), ("tasks", "include"), ("tasks", "data_root"), ("strategies_dirs",),
               ("output",))


def json_schema() -> dict:
    schema = Recipe.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema,
            "title": "ouro-lab sweep recipe"}


def write_json_schema(path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, json.dumps(json_schema(), indent=2) + "\n")
    return path




# --------------------------------------------------------------------------- loading


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster on a large grid


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    """The YAML node tree (for line numbers and keys given twice) and its data, parsed once."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path (('strategies', 0, 'grid', 'q')) to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            out[path + (key,)] = k.start_mark.line + 1
            _lines(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _lines(v, path + (i,), out)
    return out


def _duplicate_keys(node: yaml.Node | None, file: Path, path: tuple = ()) -> list[str]:
    """One error per key given twice in one mapping (YAML keeps the last silently)."""
    out: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            line = k.start_mark.line + 1
            if key in first and key != "<<":
                out.append(f"{file}:{line}: {_fmt(path + (key,))}: key given twice (lines {first[key]} and "
                           f"{line}); keep one")
            first.setdefault(key, line)
            out += _duplicate_keys(v, file, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, file, path + (i,))
    return out


def _fmt(loc: tuple) -> str:
    s = ""
    for p in loc:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "(top level)"


class RecipeSource:
    """The raw data of a recipe with a way to name where each field came from."""

    def __init__(self, file: Path, data: dict, lines: dict[tuple, int], overrides: dict[tuple, str],
                 problems: list[str] = ()):
        self.file, self.data, self.lines, self.overrides = file, data, lines, overrides
        self.problems = list(problems)  # found while parsing (keys given twice): reported with the rest

    def where(self, loc: tuple) -> str:
        loc = tuple(loc)
        for n in range(len(loc), -1, -1):  # a value set on the command line wins over the file
            if loc[:n] in self.overrides:
                return f"{self.file}: override {self.overrides[loc[:n]]}"
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return f"{self.file}:{self.lines[loc[:n]]}"
        return str(self.file)

    def error(self, loc: tuple, problem: str) -> str:
        return f"{self.where(loc)}: {_fmt(loc)}: {problem}"


def parse_override(text: str) -> tuple[tuple, Any]:
    if "=" not in text:
        raise RecipeError([f"override {text!r}: expected key=value (e.g. tasks.limit=20)"])
    key, raw = text.split("=", 1)
    if not key.strip():
        raise RecipeError([f"override {text!r}: empty key"])
    path = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def _set(data: dict, path: tuple, value: Any, text: str, file: Path | str = "") -> None:
    """Set `path` to `value` in place; a step through a missing key makes a mapping (or a
    list, before an index); a step through a scalar is refused, naming it."""
    where = f"{file}: " if file else ""

    def refuse(loc: tuple, problem: str) -> RecipeError:
        return RecipeError([f"{where}override {text}: {_fmt(loc)}: {problem}"])

    cur: Any = data
    for i, p in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(cur, list):
            if not isinstance(p, int) or p >= len(cur):
                raise refuse(path[: i + 1], f"no such list item (the list has {len(cur)})")
            cur = cur[p]
        elif isinstance(cur, dict):
            if cur.get(p) is None:
                cur[p] = [] if isinstance(nxt, int) else {}
            cur = cur[p]
        if not isinstance(cur, dict | list):  # e.g. tasks.names.0.foo: names[0] is a string
            raise refuse(path[: i + 1], f"is {_kind(cur)}, not a mapping or list; set "
                         f"{_fmt(path[: i + 1])} itself (e.g. {'.'.join(map(str, path[: i + 1]))}=...)")
    last = path[-1]
    if isinstance(cur, list):
        if not isinstance(last, int) or last > len(cur):
            raise refuse(path, "no such list item")
        if last == len(cur):
            cur.append(value)
        else:
            cur[last] = value
    else:
        cur[last] = value


def _kind(v: Any) -> str:
    if v is None:
        return "empty (null)"
    if isinstance(v, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number"}.get(type(v), f"a {type(v).__name__}")


def read_source(file: str | Path, overrides: list[str] = ()) -> RecipeSource:
    file = Path(file)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise RecipeError([f"{file}: recipe not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{file}: cannot read the recipe ({e.__class__.__name__})"]) from None
    try:
        node, data = _parse(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError([f"{file}{line}: not valid YAML ({problem})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{file}:1: (top level): a recipe is a mapping with keys {', '.join(TOP_KEYS)}"])
    lines = _lines(node) if node is not None else {}
    problems = _duplicate_keys(node, file)
    ov: dict[tuple, str] = {}
    base = file.resolve().parent
    data = _resolve_paths(data, base, skip=())
    for text_ in overrides:
        path, value = parse_override(text_)
        if path[:1] == ("tasks",) and len(path) > 1 and isinstance(data.get("tasks"), list):
            data["tasks"] = {"names": data["tasks"]}
        _set(data, path, value, text_, file)
        ov[path] = text_
        data = _resolve_paths(data, Path.cwd(), skip=(), only=path)
    return RecipeSource(file, data, lines, ov, problems)


def _resolve_paths(data: dict, base: Path, skip=(), only: tuple | None = None) -> dict:
    """Make relative path fields absolute against `base` (only those under `only`, if given)."""

    def fix(v):
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            return str((base / v).resolve())
        return str(Path(v).expanduser()) if isinstance(v, str) else v

    def touches(field_path: tuple) -> bool:
        if only is None:
            return True
        n = min(len(only), len(field_path))
        return only[:n] == field_path[:n]

    model = data.get("model")
    if isinstance(model, dict) and "path" in model and touches(("model", "path")):
        model["path"] = fix(model["path"])
    chat = model.get("chat_template") if isinstance(model, dict) else None
    if isinstance(chat, str) and "{" not in chat and touches(("model", "chat_template")):
        model["chat_template"] = fix(chat)  # a file; template text (Jinja braces) stays as it is
    tasks = data.get("tasks")
    if isinstance(tasks, dict) and isinstance(tasks.get("include"), list) and touches(("tasks", "include")):
        tasks["include"] = [fix(p) for p in tasks["include"]]
    elif isinstance(tasks, dict) and isinstance(tasks.get("include"), str) and touches(("tasks", "include")):
        tasks["include"] = [fix(tasks["include"])]
    root = tasks.get("data_root") if isinstance(tasks, dict) else None
    if isinstance(root, str) and touches(("tasks", "data_root")):
        tasks["data_root"] = fix(tasks["data_root"])
    if isinstance(data.get("strategies_dirs"), str):  # one folder: a one-item list, as tasks.include
        data["strategies_dirs"] = [data["strategies_dirs"]]
    if isinstance(data.get("strategies_dirs"), list) and touches(("strategies_dirs",)):
        data["strategies_dirs"] = [fix(p) for p in data["strategies_dirs"]]
    if isinstance(data.get("output"), str) and touches(("output",)):
        data["output"] = fix(data["output"])
    return data


def _allowed(loc: tuple) -> list[str]:
    model: Any = Recipe
    for p in loc:
        if isinstance(p, int):
            continue
        f = getattr(model, "model_fields", {}).get(p)
        if f is None:
            break
        ann = f.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            break
        model = nxt
    return list(getattr(model, "model_fields", {}))


def _pydantic_errors(src: RecipeSource, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(src.error(loc, f"unknown key{hint} (allowed: {', '.join(allowed)})"))
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            msg = f"{e['input']!r} is not allowed (allowed: {allowed})"
        elif e["type"] == "missing":
            msg = "required field missing"
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{e['input']!r} is not allowed (allowed: {DEVICES})"
        elif e["type"].endswith("_type") or e["type"].endswith("_parsing"):
            msg = f"{msg}, got {e['input']!r}"
        out.append(src.error(loc, msg))
    return out


def load_recipe(file: str | Path, overrides: list[str] = (),
                check: bool = True) -> tuple[Recipe, RecipeSource]:
    """Parse and validate a recipe; raise `RecipeError` with every problem, one per line.

    With `check`, also look the strategies up (name, parameter names and types) and check
    that the model folder and include folders exist: still no torch, no model load."""
    src = read_source(file, overrides)
    errors: list[str] = list(src.problems)
    recipe = None
    try:
        recipe = Recipe.model_validate(src.data)
    except ValidationError as e:
        errors += _pydantic_errors(src, e)
    if check:
        errors += check_references(src, recipe)
    if errors:
        raise RecipeError(errors)
    return recipe, src


def check_references(src: RecipeSource, recipe: Recipe | None) -> list[str]:
    """Errors about things a recipe points to: strategy names and grids, folders."""
    errors: list[str] = []
    data = src.data
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    mpath = model.get("path")
    if isinstance(mpath, str):
        p = Path(mpath)
        if not p.is_dir():
            errors.append(src.error(("model", "path"), f"{mpath}: no such folder; point it to a "
                                    "checkpoint folder with config.json and model.safetensors"))
        elif not (p / "config.json").is_file():
            errors.append(src.error(("model", "path"), f"{mpath}: no config.json in this folder; "
                                    "a checkpoint folder needs config.json and model.safetensors"))
        elif not os.access(p / "config.json", os.R_OK):
            errors.append(src.error(("model", "path"), f"{p / 'config.json'}: not readable (permissions)"))
    tasks = data.get("tasks") if isinstance(data.get("tasks"), dict) else {}
    for i, inc in enumerate(tasks.get("include") or []):
        if isinstance(inc, str) and not Path(inc).exists():
            errors.append(src.error(("tasks", "include", i), f"{inc}: no such file or folder"))
    root = tasks.get("data_root")
    if isinstance(root, str) and not Path(root).is_dir():
        errors.append(src.error(("tasks", "data_root"), f"{root}: no such folder; point it at the folder "
                                "holding <hub id>/ dataset copies (see README, Standard tasks offline)"))
    dirs = [d for d in data.get("strategies_dirs") or [] if isinstance(d, str)]
    for i, d in enumerate(dirs):
        if not Path(d).is_dir():
            errors.append(src.error(("strategies_dirs", i), f"{d}: no such folder"))
    strategies = data.get("strategies") if isinstance(data.get("strategies"), list) else []
    speculative = data.get("speculative") if isinstance(data.get("speculative"), list) else []
    rules = [(("strategies", i), s) for i, s in enumerate(strategies)] + [
        (("speculative", i, "draft"), sp.get("draft"))
        for i, sp in enumerate(speculative) if isinstance(sp, dict)]
    if any(isinstance(s, dict) and isinstance(s.get("name"), str) for _, s in rules):
        try:
            from ouro_lab import registry
        except ImportError:  # the registry lands with the strategies issue
            return errors
        dirs_ok = [Path(d) for d in dirs if Path(d).is_dir()]
        try:
            known = _names(registry.list_strategies(dirs_ok))
        except OuroLabError as e:
            return errors + [src.error(("strategies_dirs",), str(e))]
        size, limit = grid_size(strategies), data.get("max_settings", MAX_SETTINGS)
        if isinstance(limit, int) and size > limit:  # refused before expanding: that alone takes long
            return errors + [src.error(("strategies",), f"the grids expand to {size:,} settings, above the "
                                       f"limit of {limit:,}; shrink the grids, or raise the limit on purpose "
                                       f"with max_settings: {size} (or the override max_settings={size})")]
        for where, s in rules:  # every strategy and every speculative draft rule
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                continue
            grid = s.get("grid") if isinstance(s.get("grid"), dict) else {}
            try:
                registry.expand_grid(s["name"], grid, dirs_ok)
            except OuroLabError as e:
                errors.append(src.error((*where, "grid" if s["name"] in known else "name"), str(e)))
    return errors


def grid_size(strategies: list) -> int:
    """Settings the recipe's strategy grids expand to (a scalar counts as one value),
    counted without building any: the product of each grid's list lengths, summed."""
    total = 0
    for s in strategies:
        grid = s.get("grid") if isinstance(s, dict) and isinstance(s.get("grid"), dict) else {}
        n = 1
        for v in grid.values():
            n *= max(len(v), 1) if isinstance(v, list | tuple) else 1
        total += n
    return total


def _names(known) -> set[str]:
    if isinstance(known, dict):
        return set(known)
    out = set()
    for k in known or []:
        out.add(getattr(k, "name", k if isinstance(k, str) else str(k)))
    return out


# --------------------------------------------------------------------------- identity


def canonical(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (every default filled in)."""
    return recipe.model_dump(mode="json")


def recipe_hash(recipe: Recipe, n: int = 10) -> str:
    """Content hash of the resolved recipe, minus where its results go, whether per-sample
    logs are written and the grid-size guard (none of them changes a result)."""
    d = canonical(recipe)
    for k in ("output", "log_samples", "max_settings"):
        d.pop(k, None)
    return hashlib.blake2b(json.dumps(d, sort_keys=True).encode(), digest_size=16).hexdigest()[:n]
