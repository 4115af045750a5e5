"""The layering of spell_core (docs/ARCHITECTURE.md): which package may import which, and no circles.

`layering_errors(root)` parses every module under `root/spell_core` with `ast`, takes every
import (at module level and inside functions alike: a function-level import is still an arrow),
maps each to the package it lands in, and lists what breaks the rules:
- a package imports one on its own floor or a higher one (`FLOORS`, lowest first);
- modules import each other in a circle (within a package too).
"""
from __future__ import annotations

import ast
from pathlib import Path

# Lowest first. A package may import its own modules and those of any lower floor, nothing else.
# "spell_core" is the top floor: the command modules run.py, eval.py, plan.py, __main__.py.
FLOORS = (
    ("common", "roles"),
    ("models",),
    ("data", "sampling", "distributed"),
    ("selfplay",),
    ("training",),
    ("evaluation",),
    ("cli",),
    ("spell_core",),
)
FLOOR = {package: n for n, packages in enumerate(FLOORS) for package in packages}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/spell_core."""
    files = {}
    for path in sorted((root / "spell_core").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The spell_core modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from spell_core.common import durable` imports the module spell_core.common.durable
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "spell_core" or t.startswith("spell_core."))
    found.discard(name)
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOOR) else "spell_core"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layering_errors(root) -> list[str]:
    files = module_files(Path(root))
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    errors = []
    for name, targets in sorted(graph.items()):
        source = package_of(name)
        if source not in FLOOR:
            errors.append(f"{name}: package {source!r} is on no floor; add it to FLOORS in tests/layering.py "
                          "and to docs/ARCHITECTURE.md")
            continue
        for target in sorted(targets):
            to = package_of(target)
            if to != source and FLOOR.get(to, len(FLOORS)) >= FLOOR[source]:
                errors.append(f"{name} imports {target}: {source!r} (floor {FLOOR[source]}) may not import "
                              f"{to!r} (floor {FLOOR.get(to)})")
    errors += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return errors
