"""The package's floors, checked from the source: lower parts never import upper ones, no
modules import each other in a circle, only the command line prints, and every folder says
what it is for."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import aufs
from conftest import REPO

PACKAGE = Path(aufs.__file__).resolve().parent
SOURCE = REPO / "aufs" if (REPO / "aufs").is_dir() else PACKAGE
# bottom to top; a module may import from its own floor and the floors below it
FLOORS = ["core", "archive", "store", "images", "docker", "cli"]
FACE = {"aufs", "aufs.__main__"}  # the public face re-exports from every floor


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else "core"


def imports_of(path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, module) for every aufs module that path imports, at any depth of the file;
    `from aufs import x` counts as importing aufs.x when x is a module."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aufs":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "aufs":
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                yield node.lineno, candidate if candidate in known else node.module


def test_the_floors_are_the_folders() -> None:
    folders = {path.name for path in SOURCE.iterdir()
               if path.is_dir() and (path / "__init__.py").is_file()}
    assert folders == set(FLOORS[1:])


def known_modules() -> set[str]:
    """Every module name, the compiled ones (aufs._native) included."""
    return set(modules()) | {module_name(path) for path in SOURCE.rglob("*.pyx")}


def test_lower_floors_never_import_upper_ones() -> None:
    known = known_modules()
    wrong = []
    for module, path in modules().items():
        if module in FACE:
            continue
        for line, target in imports_of(path, known):
            if target == "aufs":
                wrong.append(f"{module}:{line} imports the public face `aufs`; import the "
                             "module that defines the name")
            elif FLOORS.index(floor_of(target)) > FLOORS.index(floor_of(module)):
                wrong.append(f"{module}:{line} ({floor_of(module)}) imports {target} "
                             f"({floor_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle() -> None:
    known = known_modules()
    graph = {module: {target for _, target in imports_of(path, known)} - {module}
             for module, path in modules().items()}
    circles = _circles(graph)
    assert not circles, f"modules that import each other: {circles}"


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_circles() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_only_the_command_line_prints() -> None:
    printing = [
        f"{module}:{node.lineno}"
        for module, path in modules().items() if floor_of(module) != "cli"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    assert not printing, f"print() outside aufs/cli: {printing}"


@pytest.mark.parametrize("floor", FLOORS[1:])
def test_each_folder_says_what_it_is_for_and_what_it_may_import(floor: str) -> None:
    docstring = ast.get_docstring(ast.parse((SOURCE / floor / "__init__.py").read_text()))
    assert docstring, f"aufs/{floor}/__init__.py has no docstring"
    assert "may import" in docstring.lower()
