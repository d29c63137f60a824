"""The house stays in order: imports within `ouro_lab/` run one way (no cycle, counting the
imports inside functions too), no module is over its line budget, no function over its own.

Read with `ast` only: nothing is imported, so the test takes milliseconds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ouro_lab"
MODULE_LINES = 600    # a module a reader takes in at one sitting
FUNCTION_LINES = 80   # a function that fits on a screen or two

# Functions allowed over FUNCTION_LINES, each with the reason. Remove an entry when its
# function is split; never add one without saying why splitting would read worse.
LONG_FUNCTIONS = {
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The ouro_lab modules an import statement loads (a `from pkg import name` loads the
    submodule pkg.name when there is one, else pkg itself)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    subs = [f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in known]
    if subs:
        return subs
    return [src] if src in known else []


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, every import statement
    in the file (module level, inside functions, under TYPE_CHECKING) counted."""
    mods = _modules()
    known = set(mods)
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(node, name, path.name == "__init__.py", known):
                    if t != name:
                        edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        if len(comp) < 2:
            continue
        start = min(comp)
        paths, seen = [[start]], {start}
        while paths:  # shortest way back to `start` inside the component
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in comp]
            if start in nxt:
                out.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return out


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_functions() -> dict[str, int]:
    out = {}
    for name, path in _modules().items():
        short = name.removeprefix("ouro_lab.") if name != "ouro_lab" else "__init__"
        for qual, node in _functions(ast.parse(path.read_text(), str(path))):
            n = node.end_lineno - node.lineno + 1
            if n > FUNCTION_LINES:
                out[f"{short}.{qual}"] = n
    return out


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "ouro_lab.lm" in graph["ouro_lab.tracing"]        # module level
    assert "ouro_lab.model" in graph["ouro_lab"]              # inside __getattr__ (lazy)
    assert "ouro_lab.sweep" in graph["ouro_lab.cli"]          # inside a typer command
    assert "ouro_lab.distributed" in graph["ouro_lab.live"]   # `from ouro_lab import distributed`
    fake = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert cycles(fake) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    lines = []
    for cyc in found:
        lines.append(" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cyc, cyc[1:], strict=False))
                     + f" -> {cyc[-1]}")
    assert not found, "import cycles in ouro_lab/ (a helper used by two modules lives in the lower one):\n" \
        + "\n".join(lines)


def test_no_module_over_the_line_budget():
    over = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MODULE_LINES}
    assert not over, f"modules over {MODULE_LINES} lines (split along the data flow): {over}"


def test_no_function_over_the_line_budget():
    found = long_functions()
    over = {k: n for k, n in found.items() if k not in LONG_FUNCTIONS}
    assert not over, f"functions over {FUNCTION_LINES} lines (split, or allow-list with a reason): {over}"
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not stale, f"LONG_FUNCTIONS entries no longer needed (remove them): {stale}"


def test_every_module_says_what_it_owns():
    missing = [name for name, path in _modules().items()
               if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()]
    assert not missing, f"modules without a docstring whose first line says what they own: {missing}"


def test_readme_file_tree_lists_every_module_once_and_nothing_outside_it():
    """The README's `## Files` block names every .py file of the project once; a file line
    (path + comment) elsewhere, e.g. inside another checked block, is a misplaced one."""
    root = PACKAGE.parent
    text = (root / "README.md").read_text()
    block = re.search(r"## Files\n\n```\n(.*?)\n```", text, re.S).group(1)
    listed = [line.split()[0] for line in block.splitlines() if line.strip()]
    assert len(listed) == len(set(listed)), "a file listed twice in the README's file tree"
    files = {p.relative_to(root).as_posix() for d in ("ouro_lab", "strategies", "tests", "bench")
             for p in (root / d).glob("*.py")}
    assert files <= set(listed), f"missing from the README's file tree: {sorted(files - set(listed))}"
    outside = [line for line in text.replace(block, "").splitlines()
               if re.match(r"^\S+ {2,}\S", line) and (root / line.split()[0]).is_file()]
    assert not outside, f"file-tree lines outside the README's file tree: {outside}"
