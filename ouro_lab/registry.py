"""Find exit strategies by name: one file per strategy, the file's stem is its name.

Where they come from, in this order (a name found twice is an error, never a silent
override):

1. the built-ins: the checkout's top-level `strategies/` folder, or, installed from a
   wheel, the package `ouro_lab_strategies` (the same files);
2. extra folders: a recipe's `strategies_dir`, the CLI's `--strategies-dir`;
3. the entry-point group `ouro_lab.strategies` of installed packages, for example
   `[project.entry-points."ouro_lab.strategies"] mine = "my_pkg.my_rule"` (a module
   defining `Strategy`, or `"my_pkg.my_rule:MyStrategy"` for another class name).

Listing reads the files with `ast` and imports nothing (no torch): `ouro-lab strategies`
stays fast. Loading imports one file and checks the contract; every problem is one
`OuroLabError` line naming the file and the parameter.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import itertools
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ouro_lab.errors import OuroLabError
from ouro_lab.files import display_path

ENTRY_POINT_GROUP = "ouro_lab.strategies"


class StrategyError(OuroLabError):
    """A strategy that cannot be found, imported or built from the given parameters."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str      # the annotation as written
    default: str   # the default as written ("" when required)


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    doc: str                   # first docstring line: the rule
    params: tuple[Param, ...]
    source: str                # file shown in messages
    path: Path | None          # the file (None: an entry point without a readable file)
    target: str = ""           # "module" or "module:Class" for entry points
    kind: str = "skip"


# --------------------------------------------------------------------------- discovery


def builtin_dir() -> Path | None:
    """The built-in strategies: the checkout's `strategies/`, else the installed package."""
    here = Path(__file__).resolve().parent.parent / "strategies"
    if (here / "threshold.py").is_file():
        return here
    spec = importlib.util.find_spec("ouro_lab_strategies")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def _entry_points():
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def _module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def discover(dirs=()) -> dict[str, StrategyInfo]:
    """Every strategy by name, read with `ast` (nothing imported)."""
    found: dict[str, StrategyInfo] = {}

    def add(info: StrategyInfo):
        if info.name in found:
            raise StrategyError(f"strategy {info.name!r} is defined twice: {found[info.name].source} and "
                                f"{info.source}; rename one of the files")
        found[info.name] = info

    folders = [d for d in [builtin_dir()] if d is not None]
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise StrategyError(f"{d}: strategies folder not found; pass a folder of strategy .py files")
        if not any(d.resolve() == f.resolve() for f in folders):
            folders.append(d)
    for folder in folders:
        for path in _files(folder):
            add(_parse(path.stem, path, display_path(path)))
    for ep in _entry_points():
        module, _, cls = ep.value.partition(":")
        path = _module_file(module)
        src = f"entry point {ep.name} = {ep.value}"
        info = (_parse(ep.name, path, src, cls or "Strategy") if path is not None
                else StrategyInfo(ep.name, "", (), src, None))
        add(StrategyInfo(info.name, info.doc, info.params, src, path, ep.value, info.kind))
    return found


def _parse(name: str, path: Path, source: str, cls_name: str = "Strategy") -> StrategyInfo:
    """Docstring, parameters and kind of one strategy file, without importing it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise StrategyError(f"{source}: line {e.lineno}: syntax error ({e.msg}); fix or remove the "
                            "file") from None
    except (UnicodeDecodeError, OSError) as e:
        raise StrategyError(f"{source}: unreadable ({type(e).__name__}: {_first(e)})") from None
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name), None)
    doc = ast.get_docstring(tree) or (ast.get_docstring(cls) if cls is not None else None) or ""
    params, kind = [], "skip"
    if cls is not None:
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                ann = ast.unparse(node.annotation)
                if node.target.id.startswith("_") or ann.startswith(("ClassVar", "typing.ClassVar")):
                    if node.target.id == "kind" and isinstance(node.value, ast.Constant):
                        kind = str(node.value.value)
                    continue
                default = "" if node.value is None else ast.unparse(node.value)
                params.append(Param(node.target.id, ann, default))
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "kind"
                  and isinstance(node.value, ast.Constant)):
                kind = str(node.value.value)
    first = doc.strip().splitlines()[0] if doc.strip() else "(no docstring)"
    return StrategyInfo(name, first, tuple(params), source, path, "", kind)


def list_strategies(dirs=()) -> list[StrategyInfo]:
    """Every strategy, sorted by name: name, first docstring line, parameters."""
    return sorted(discover(dirs).values(), key=lambda i: i.name)


def _info(name: str, dirs) -> StrategyInfo:
    found = discover(dirs)
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(found))}"
        raise StrategyError(f"unknown strategy {name!r}{hint} (add strategies/{name}.py or "
                            "pass --strategies-dir)")
    return found[name]


# --------------------------------------------------------------------------- loading

_cache: dict[tuple[str, float], type] = {}


def load_strategy(name: str, dirs=()) -> type:
    """The `Strategy` class of strategy `name`, checked against the contract."""
    return _load(_info(name, dirs))


def _load(info: StrategyInfo) -> type:
    key = (str(info.path) + info.target, info.path.stat().st_mtime if info.path else 0.0)
    if key not in _cache:
        _cache[key] = _check(_import(info), info)
    return _cache[key]


def _import(info: StrategyInfo) -> type:
    if info.target:  # entry point
        module, _, attr = info.target.partition(":")
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # any failure of user code is one line
            raise StrategyError(f"{info.source}: failed to import ({type(e).__name__}: "
                                f"{_first(e)})") from None
        cls = getattr(mod, attr or "Strategy", None)
        if cls is None:
            raise StrategyError(f"{info.source}: defines no class {attr or 'Strategy'}; add "
                                "`@dataclass class Strategy(ExitStrategy)`")
        return cls
    digest = hashlib.blake2b(str(info.path.resolve()).encode(), digest_size=4).hexdigest()
    mod_name = f"ouro_lab_strategy_{info.name}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, info.path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise StrategyError(f"{info.source}: failed to import ({type(e).__name__}: {_first(e)})") from None
    cls = getattr(mod, "Strategy", None)
    if cls is None:
        raise StrategyError(f"{info.source}: defines no class Strategy; add "
                            "`@dataclass class Strategy(ExitStrategy)`")
    return cls


def _first(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else "no message"


def _check(cls, info: StrategyInfo) -> type:
    import dataclasses

    from ouro_lab.strategy import SELECT_SIGNALS, ExitStrategy, expand_needs

    if not (isinstance(cls, type) and issubclass(cls, ExitStrategy)):
        raise StrategyError(f"{info.source}: Strategy must subclass ouro_lab.strategy.ExitStrategy")
    if not dataclasses.is_dataclass(cls):
        raise StrategyError(f"{info.source}: Strategy must be a @dataclass (its fields are its parameters)")
    if cls.decide is ExitStrategy.decide:
        raise StrategyError(f"{info.source}: Strategy must define decide(self, s, r) -> (N,) bool")
    if cls.kind not in ("skip", "select"):
        raise StrategyError(f"{info.source}: kind must be 'skip' or 'select', got {cls.kind!r}")
    try:
        needs = expand_needs(cls.needs)
    except ValueError as e:
        raise StrategyError(f"{info.source}: needs: {e}") from None
    per_doc = needs & set(SELECT_SIGNALS)
    if (cls.kind == "select") != bool(per_doc) or (per_doc and needs - per_doc):
        raise StrategyError(f"{info.source}: kind 'select' rules read per-document signals only "
                            f"({', '.join(SELECT_SIGNALS)}), and only they do; needs = {tuple(cls.needs)}")
    missing = [f.name for f in _params(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise StrategyError(f"{info.source}: parameter {missing[0]} needs a default value")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # an annotation naming something the file does not import
        raise StrategyError(f"{info.source}: a parameter's type cannot be resolved ({type(e).__name__}: "
                            f"{_first(e)}); import the names its annotations use") from None
    for f in _params(cls):
        v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if not _matches(v, hints.get(f.name, typing.Any)):
            raise StrategyError(f"{info.source}: parameter {f.name}: {_type_name(hints.get(f.name))} has "
                                f"default {v!r}, which is not a {_type_name(hints.get(f.name))}; fix the "
                                "default or the type")
    return cls


def untyped_attributes(cls) -> dict:
    """Class attributes of a strategy written without a type (`q = 0.5`): not parameters
    (a dataclass field needs an annotation), almost always a mistake."""
    import inspect

    from ouro_lab.strategy import ExitStrategy

    out = {}
    for klass in cls.__mro__:
        if klass is ExitStrategy or not issubclass(klass, ExitStrategy):
            break
        annotated = inspect.get_annotations(klass)
        for k, v in vars(klass).items():
            if (k.startswith("_") or k in annotated or k in ("needs", "fit_needs", "kind")
                    or callable(v) or isinstance(v, (staticmethod, classmethod, property))):
                continue
            out.setdefault(k, v)
    return out


def check_strategy(name: str, dirs=()) -> None:
    """What `ouro-lab strategies --check` runs for one strategy: load it (class contract,
    defaults of the declared types), refuse untyped class attributes, build it with its
    defaults and run `ouro_lab.strategy.check_contract` (fit and decide on synthetic
    signals over every step, causality). Raises a one-line error naming the file."""
    from ouro_lab.contract import check_contract

    cls = load_strategy(name, dirs)
    untyped = untyped_attributes(cls)
    if untyped:
        k, v = next(iter(untyped.items()))
        raise StrategyError(f"{_info(name, dirs).source}: class attribute {k} = {v!r} has no type, so it "
                            f"is not a parameter; write `{k}: {type(v).__name__} = {v!r}` (or `{k}: "
                            "ClassVar[...]` for a constant)")
    check_contract(make_strategy(name, {}, dirs))


def _params(cls):
    import dataclasses

    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


# --------------------------------------------------------------------------- building


def make_strategy(name: str, params: dict | None = None, dirs=()):
    """An instance of strategy `name` with `params`, names and types checked.

    Numbers and booleans may also be given as strings ("0.5", "true"), as a command
    line passes them; an int is accepted where a float is expected."""
    return _builder(name, dirs)(dict(params or {}))


def _builder(name: str, dirs):
    """params -> instance of strategy `name`: the strategy is found, imported and its
    parameter types read once, however many settings are then built (a 10,000-setting
    grid discovers the strategies once, not 10,000 times)."""
    info = _info(name, dirs)
    cls, source = _load(info), info.source
    known = {f.name: f for f in _params(cls)}
    hints = typing.get_type_hints(cls)

    def build(params: dict):
        kwargs = {}
        for k, v in params.items():
            if k not in known:
                close = difflib.get_close_matches(k, list(known), n=1)
                hint = (f"did you mean {close[0]!r}?" if close else
                        f"known: {', '.join(known) or 'none (it takes no parameters)'}")
                untyped = untyped_attributes(cls)
                if k in untyped:
                    hint = (f"{k} = {untyped[k]!r} has no type, so it is not a parameter; write "
                            f"`{k}: {type(untyped[k]).__name__} = {untyped[k]!r}` in the class")
                raise StrategyError(f"{source}: unknown parameter {k!r}; {hint}")
            try:
                kwargs[k] = _coerce(v, hints.get(k, typing.Any))
            except TypeError:
                raise StrategyError(f"{source}: parameter {k} must be {_type_name(hints.get(k))}, "
                                    f"got {v!r}") from None
            if isinstance(kwargs[k], float) and not math.isfinite(kwargs[k]):  # 'nan', 1e400, .inf
                raise StrategyError(f"{source}: parameter {k} must be a finite number, got {v!r}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise StrategyError(f"{source}: {_first(e)}") from None

    return build


def _coerce(v, tp):
    """`v` as type `tp`, or TypeError."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return v
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(v, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is typing.Literal:
        if v in typing.get_args(tp):
            return v
        raise TypeError
    if tp is type(None):
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null")):
            return None
        raise TypeError
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        raise TypeError
    if tp in (int, float):  # an int is a valid float, never the reverse; numeric strings parse
        if isinstance(v, (int,) if tp is int else (int, float)) and not isinstance(v, bool):
            return tp(v)
        if isinstance(v, str):
            try:
                return tp(v.strip())
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(v, str):
            return v
        raise TypeError
    if isinstance(tp, type) and not isinstance(v, tp):
        raise TypeError
    return v


def _matches(v, tp) -> bool:
    """Whether a default `v` is of type `tp` as written (no string parsing)."""
    try:
        c = _coerce(v, tp)
    except TypeError:
        return False
    return not (isinstance(v, str) and not isinstance(c, str))


def _type_name(tp) -> str:
    if tp is None:
        return "any"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def expand_grid(name: str, grid: dict | None = None, dirs=()) -> list:
    """One strategy per combination of the grid's values (a scalar counts as [scalar]),
    in the grid's key order, the last key varying fastest."""
    grid = dict(grid or {})
    keys, values = list(grid), []
    for k in keys:
        v = grid[k]
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        if not v:
            raise StrategyError(f"strategy {name}: grid value list for {k} is empty; give at least one value")
        values.append(v)
    build = _builder(name, dirs)
    return [build(dict(zip(keys, combo, strict=True))) for combo in itertools.product(*values)]


__all__ = ["StrategyError", "StrategyInfo", "Param", "list_strategies", "load_strategy",
           "make_strategy", "expand_grid", "discover", "builtin_dir", "check_strategy", "ENTRY_POINT_GROUP"]
