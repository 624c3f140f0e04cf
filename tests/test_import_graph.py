"""The import graph: one way between layers (core <- plugins / export <- apps, DESIGN.md) and no cycles.

Every import counts, module-level or inside a function (a lazy import that breaks a cycle still leaves a
design cycle, STYLE.md rule 13); only `if TYPE_CHECKING:` blocks are left out. Cycles are looked for between
modules and between the packages they sit in (fpdm.models, fpdm.diffusion, ...; a module directly in fpdm/,
plugins/, export/, apps/ or benchmarks/ is its own node), across the package and benchmarks/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "fpdm": "fpdm_core",
    "fpdm.plugins": "plugins",
    "fpdm.export": "export",
    "fpdm.apps": "apps",
    "benchmarks": "benchmarks",
}
# layer -> the layers it must not import
FORBIDDEN = {
    "fpdm": ("fpdm.plugins", "fpdm.export", "fpdm.apps", "benchmarks"),
    "fpdm.plugins": ("fpdm.export", "fpdm.apps", "benchmarks"),
    "fpdm.export": ("fpdm.plugins", "fpdm.apps", "benchmarks"),
    "fpdm.apps": ("benchmarks",),
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules `name` imports, at any depth but TYPE_CHECKING blocks."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports the module; `from pkg import name`, pkg
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    if name.startswith("benchmarks."):  # scripts import their siblings by bare name (their folder is on sys.path)
        found |= {f"benchmarks.{m}" for m in found}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def node_of(module: str) -> str:
    """The package a module counts under: its subpackage, or itself when it sits directly in a layer."""
    for layer in sorted(FOLDERS, key=len, reverse=True):
        if module == layer:
            return module
        if module.startswith(layer + "."):
            rest = module[len(layer) + 1 :].split(".")
            return module if len(rest) == 1 else f"{layer}.{rest[0]}"
    return module


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return [*stack[stack.index(v) :], v]
            if v not in state and (cycle := dfs(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(edges):
        if u not in state and (cycle := dfs(u)):
            return cycle
    return None


def layer_of(module: str) -> str:
    return max((layer for layer in FOLDERS if module == layer or module.startswith(layer + ".")), key=len)


def test_every_layer_has_modules():
    layers = {layer_of(m) for m in modules()}
    assert layers == set(FOLDERS)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_go_one_way(layer):
    for module, targets in graph().items():
        if layer_of(module) == layer:
            bad = sorted(t for t in targets if layer_of(t) in FORBIDDEN[layer])
            assert not bad, f"{module} imports {bad}"


def test_no_cycle_between_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in graph().items():
        packages.setdefault(node_of(module), set()).update(node_of(t) for t in targets if node_of(t) != node_of(module))
    cycle = find_cycle(packages)
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    assert node_of("fpdm.models.transformer") == "fpdm.models"
    assert node_of("fpdm.build") == "fpdm.build"
    assert node_of("fpdm.plugins.solvers") == "fpdm.plugins.solvers"
