"""Imports go one way: core <- plugins / export <- apps (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

# folder -> fpdm subpackages it must not import
FORBIDDEN = {
    "fpdm_core": ("fpdm.plugins", "fpdm.export", "fpdm.apps"),
    "plugins": ("fpdm.export", "fpdm.apps"),
    "export": ("fpdm.plugins", "fpdm.apps"),
}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_go_one_way(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported_modules(path) if m.startswith(FORBIDDEN[folder])}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_core_uses_relative_imports_only_for_itself():
    for path in sorted((ROOT / "fpdm_core").rglob("*.py")):
        assert not {m for m in imported_modules(path) if m == "fpdm" or m.startswith("fpdm.")}, path
