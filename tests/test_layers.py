"""The package's layers import one way: a module imports only from its own layer or those below it.

Read from the source with ``ast`` (function-level imports included), so a cycle hidden inside a
function fails here too, and intra-package imports sit at the top of their modules (the CLI alone
defers them, to keep ``medexplore --help`` fast).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medexplore"
# lowest first; each layer may import the ones before it
LAYERS = ("errors", "configs", "typed", "pretrained", "models", "ssl", "adapt", "data", "train", "analysis", "viz", "experiments", "cli")
DEFERRED_OK = {"cli"}  # layers whose functions may import the package lazily
OPTIONAL_DEPENDENCY_MODULES = {"medexplore.train.tensorboard"}  # imported on request: needs an optional extra


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(line, imported module, inside a function) for every import of the package in ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "medexplore" or t.startswith("medexplore."):
                yield node.lineno, t, id(node) in in_function


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medexplore"


def layer_violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(_module_name(path))
        for line, target, deferred in _imports(path):
            other = _layer(target)
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if other not in LAYERS and other != "medexplore":
                problems.append(f"{where}: imports {target}, which is in no layer")
            elif own in LAYERS and other in LAYERS and LAYERS.index(other) > LAYERS.index(own):
                problems.append(f"{where}: {own} imports {target} ({other} is above {own})")
            elif deferred and own not in DEFERRED_OK and target not in OPTIONAL_DEPENDENCY_MODULES:
                problems.append(f"{where}: imports {target} inside a function; import it at the top")
    return problems


def test_every_module_belongs_to_a_layer():
    own = {_layer(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {"medexplore", "__main__"}
    assert own <= set(LAYERS), f"packages without a layer: {sorted(own - set(LAYERS))}"


def test_imports_run_one_way():
    problems = layer_violations()
    print(f"{len(list(PACKAGE.rglob('*.py')))} modules in layers {' < '.join(LAYERS)}: {len(problems)} violation(s)")
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "medexplore"
    (fake / "models").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "models" / "bad.py").write_text("def f():\n    from ..train import engine\n")
    (fake / "train" / "engine.py").write_text("from ..models import bad\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    problems = layer_violations()
    assert len(problems) == 1 and "models imports medexplore.train" in problems[0]


@pytest.mark.parametrize("library", ["qtpy", "napari", "PyQt6", "magicgui"])
def test_the_library_never_imports_qt(library):
    hits = [f"{p}:{n.lineno}" for p in PACKAGE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            and any((a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0] == library for a in n.names)]
    assert not hits, hits
