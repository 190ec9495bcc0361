"""The shape of mlarch's import graph: no cycles among its modules, and the layers.

Every `import` and `from ... import` counts, at module level and inside functions alike (a
deferred import is still a dependency; deferring only hides a cycle from the interpreter).
Relative imports are resolved; `from pkg import name` is an edge to pkg.name where that is a
module, else to pkg. Imports of the root package `mlarch` itself (for __version__) are not
edges: Python runs mlarch/__init__.py before any mlarch module anyway, and its own lazy
imports (mlarch.open, mlarch.Archive) make it the top of the graph.

Layers: the store (catalog, arrays, derived rows) knows nothing of how results are made or
shown; queries read the store and know nothing of ingest or the CLI.

PENDING lists imports that break these rules today and wait for a move their owners are
making (each says which). The checks run on the graph without them, and a PENDING entry that
no longer exists fails too, so the list can only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mlarch

ROOT = Path(mlarch.__file__).resolve().parent

LAYERS = {  # importer package -> packages it must never import
    "mlarch.store": ("mlarch.ingest", "mlarch.evaluation", "mlarch.query", "mlarch.charts", "mlarch.cli"),
    # query only reads: scoring, evaluating and charts live above it (mlarch.archive)
    "mlarch.query": ("mlarch.ingest", "mlarch.evaluation", "mlarch.charts", "mlarch.archive", "mlarch.cli"),
    # the core math and the output formats serve every layer: they import none of them
    "mlarch.selection": ("mlarch.store", "mlarch.query", "mlarch.ingest", "mlarch.evaluation", "mlarch.charts",
                         "mlarch.cli"),
    "mlarch.pattern_counts": ("mlarch.store", "mlarch.query", "mlarch.ingest", "mlarch.evaluation",
                              "mlarch.charts", "mlarch.cli"),
    "mlarch.formats": ("mlarch.store", "mlarch.query", "mlarch.ingest", "mlarch.evaluation", "mlarch.charts",
                       "mlarch.cli"),
}

# (importer, imported): known breaks awaiting a move (see the module docstring)
PENDING = {
}


def module_files(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__) for every .py file under `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def imports_of(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The mlarch modules that module `name` imports anywhere in its body."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..store import y
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in known else module)
    edges = set()
    for target in targets:
        if target.split(".")[0] != "mlarch":
            continue
        while target not in known and "." in target:  # mlarch.x.y.attr -> the module holding it
            target = target.rpartition(".")[0]
        if target in known and target not in (name, "mlarch"):
            edges.add(target)
    return edges


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {name: imports_of(name, path, is_package, known) for name, (path, is_package) in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layering_breaks(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    breaks = []
    for importer, imported in sorted((a, b) for a, targets in graph.items() for b in targets):
        for layer, forbidden in LAYERS.items():
            if within(importer, layer) and any(within(imported, f) for f in forbidden):
                breaks.append((importer, imported))
    return breaks


def without_pending(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: {t for t in targets if (name, t) not in PENDING} for name, targets in graph.items()}


def describe_cycle(graph: dict[str, set[str]], component: list[str]) -> str:
    """The component's edges, so a failure says which import lines to look at."""
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
    return "; ".join(edges)


def check_no_cycles(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles among mlarch modules: " + " | ".join(describe_cycle(graph, c) for c in found)


def check_layers(graph: dict[str, set[str]]) -> None:
    breaks = layering_breaks(graph)
    assert not breaks, "layering broken: " + ", ".join(f"{a} imports {b}" for a, b in breaks)


def test_no_import_cycles():
    check_no_cycles(without_pending(import_graph()))


def test_layering():
    check_layers(without_pending(import_graph()))


def test_pending_entries_still_exist():
    graph = import_graph()
    stale = sorted((a, b) for a, b in PENDING if b not in graph.get(a, set()))
    assert not stale, f"these PENDING imports are gone: remove them from PENDING: {stale}"


# --- the checker itself, on planted graphs -------------------------------------------------

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mlarch"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_planted_cycle_through_a_function_level_import(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "ingest/__init__.py": "",
        "ingest/a.py": "from mlarch.ingest.b import thing\n",
        "ingest/b.py": "def thing():\n    from . import c\n",  # relative and deferred
        "ingest/c.py": "import mlarch.ingest.a\n",
        "ingest/d.py": "from mlarch.ingest import a\nimport mlarch\n",  # no cycle: nothing imports d
    })
    graph = import_graph(root)
    assert graph["mlarch.ingest.b"] == {"mlarch.ingest.c"}
    assert graph["mlarch.ingest.d"] == {"mlarch.ingest.a"}  # the root package is not an edge
    assert cycles(graph) == [["mlarch.ingest.a", "mlarch.ingest.b", "mlarch.ingest.c"]]


def test_planted_layering_breaks(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "store/__init__.py": "",
        "store/derive.py": "def f():\n    from ..query.patterns import histogram\n",
        "store/ok.py": "from mlarch.store import derive\n",
        "query/__init__.py": "",
        "query/patterns.py": "from mlarch.store.ok import x\n",
        "query/api.py": "from mlarch.ingest import pipeline\n",
        "ingest/__init__.py": "",
        "ingest/pipeline.py": "from mlarch.store import ok\nfrom mlarch.query import patterns\n",
    })
    graph = import_graph(root)
    assert layering_breaks(graph) == [("mlarch.query.api", "mlarch.ingest.pipeline"),
                                      ("mlarch.store.derive", "mlarch.query.patterns")]
    # store.derive -> query.patterns -> store.ok -> store.derive
    assert cycles(graph) == [["mlarch.query.patterns", "mlarch.store.derive", "mlarch.store.ok"]]


@pytest.mark.parametrize("planted, expected", [
    ("cycle", r"import cycles .*mlarch\.cache -> mlarch\.ingest\.named_models"),
    ("layer", r"layering broken: mlarch\.store\.spans imports mlarch\.ingest\.scoring"),
    ("query-charts", r"layering broken: mlarch\.query\.patterns imports mlarch\.charts"),
    ("core", r"layering broken: mlarch\.selection imports mlarch\.store\.spans"),
])
def test_the_checks_fail_on_a_planted_import(tmp_path, planted, expected):
    """The checks the two tests above run, on a copy of mlarch with one import planted: they
    fail naming it (whatever else the copy holds)."""
    import shutil

    copy = tmp_path / "mlarch"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if planted == "cycle":  # the cache location importing a module that imports it, deferred
        path = copy / "cache.py"
        path.write_text(path.read_text() + "\n\ndef _planted():\n    from mlarch.ingest import named_models\n")
        check = check_no_cycles
    else:
        path, line = {"layer": ("store/spans.py", "from mlarch.ingest import scoring"),
                      "query-charts": ("query/patterns.py", "def _planted():\n    from mlarch import charts"),
                      "core": ("selection.py", "from mlarch.store import spans")}[planted]
        path = copy / path
        path.write_text(path.read_text() + "\n" + line + "\n")
        check = check_layers
    with pytest.raises(AssertionError, match=expected):
        check(without_pending(import_graph(copy)))
