"""The package's shape (issue #14): no import cycles between tinyfast's modules, and no module reaching into
another's private names, at module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

import tinyfast

PACKAGE = Path(tinyfast.__file__).parent


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported tinyfast module, name or '')}"""
    found: dict[str, set[tuple[str, str]]] = {}
    for path in PACKAGE.glob("*.py"):
        deps = found.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    target = node.module.split(".")[0]
                elif node.level == 0 and (node.module or "").startswith("tinyfast."):
                    target = node.module.split(".")[1]
                else:
                    continue
                deps |= {(target, a.name) for a in node.names}
    return found


def test_no_import_cycles():
    graph = {m: {t for t, _ in deps if t != m} for m, deps in _imports().items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]):
        state[m] = "open"
        for t in graph.get(m, ()):
            assert state.get(t) != "open", f"import cycle: {' -> '.join(path[path.index(t):] + [t])}"
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_module_imports_another_modules_private_names():
    private = sorted(f"{m} imports {t}.{n}" for m, deps in _imports().items() for t, n in deps
                     if n.startswith("_") and t != m)
    assert private == []
