"""Every public name of mlarch has a docstring (issue 13): each public function, class and
method (no leading underscore) defined in a public module of the package.

The modules are walked as source (ast), not imported: a dataclass gets a generated __doc__
(its signature) that import-based checks mistake for documentation, and importing every
module would load torch and transformers for nothing."""

import ast
import pkgutil
from pathlib import Path

import mlarch

PACKAGE = Path(mlarch.__file__).resolve().parent


def _public(name: str) -> bool:
    return not name.startswith("_")


def _defs(body, prefix: str = ""):
    """(qualified name, node) of the public functions and classes in `body`, and the public
    methods of public classes; module-level `if`/`try` blocks are walked too (conditional
    definitions), function bodies are not (nested helpers are not API)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not _public(node.name):
                continue
            yield f"{prefix}{node.name}", node
            if isinstance(node, ast.ClassDef):
                yield from _defs(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, ast.If):
            yield from _defs(node.body + node.orelse, prefix)
        elif isinstance(node, ast.Try):
            yield from _defs(node.body + node.orelse + node.finalbody
                             + [n for h in node.handlers for n in h.body], prefix)


def public_modules(package: Path, name: str) -> dict[str, Path]:
    """module name -> source file of every public module under `package`, as pkgutil lists
    them (iter_modules: nothing is imported)."""
    found = {name: package / "__init__.py"}
    for info in pkgutil.iter_modules([str(package)]):
        if not _public(info.name):
            continue
        if info.ispkg:
            found.update(public_modules(package / info.name, f"{name}.{info.name}"))
        else:
            found[f"{name}.{info.name}"] = package / f"{info.name}.py"
    return found


def undocumented(package: Path, name: str) -> list[str]:
    """`module:line qualified.name` of every public definition without a docstring."""
    missing = []
    for module, path in sorted(public_modules(package, name).items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for qualified, node in _defs(tree.body):
            if ast.get_docstring(node) is None:
                missing.append(f"{module}:{node.lineno} {qualified}")
    return missing


def test_every_public_name_of_mlarch_has_a_docstring():
    modules = public_modules(PACKAGE, "mlarch")
    # the walk reaches every layer (a broken walk must not pass by finding nothing)
    assert {"mlarch.query.api", "mlarch.store.bundle", "mlarch.cli", "mlarch.charts.data",
            "mlarch.ingest.pipeline", "mlarch.evaluation.tasks"} <= set(modules)
    sources = {p for p in PACKAGE.rglob("*.py")
               if not any(part.startswith("_") and part != "__init__.py" for part in p.relative_to(PACKAGE).parts)}
    assert set(modules.values()) == sources  # every public source file, none left out
    missing = undocumented(PACKAGE, "mlarch")
    assert not missing, f"{len(missing)} public names lack a docstring:\n" + "\n".join(missing)


def test_the_check_finds_what_lacks_a_docstring(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('"""Package."""\n')
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "mod.py").write_text(
        '"""Module."""\n'
        "from dataclasses import dataclass\n\n\n"
        "@dataclass\nclass Plain:\n    x: int = 0\n\n"  # a dataclass: __doc__ is generated, not written
        "    @property\n    def double(self):\n        return 2 * self.x\n\n"
        "    def _private(self):\n        pass\n\n\n"
        'def documented():\n    """Yes."""\n\n\n'
        "def bare():\n    def inner():\n        pass\n\n\n"
        "def _helper():\n    pass\n\n\n"
        "class _Hidden:\n    def method(self):\n        pass\n\n\n"
        "try:\n    def fallback():\n        pass\nexcept ImportError:\n    pass\n")
    (package / "_private.py").write_text("def exposed():\n    pass\n")
    missing = undocumented(package, "pkg")
    assert [m.split(" ")[1] for m in missing] == ["Plain", "Plain.double", "bare", "fallback"]
    assert missing[0].startswith("pkg.sub.mod:")
