"""The one-way arrows: autotune imports only the standard library and itself."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import autotune

PACKAGE_DIR = Path(autotune.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_autotune_imports_only_stdlib_and_itself():
    modules = sorted(PACKAGE_DIR.glob("*.py"))
    assert len(modules) >= 7
    for module in modules:
        foreign = imported_roots(module) - set(sys.stdlib_module_names) - {"autotune", "__future__"}
        assert not foreign, f"{module.name} imports {sorted(foreign)}"
