#!/usr/bin/env python
"""Print effigen's import graph between its layers and check that every import points down and none is cyclic.

    python scripts/import_graph.py            # the package-level graph, then any violation; exit 1 if there is one
    python scripts/import_graph.py --modules  # the module-level graph

Every `import` / `from ... import` in src/effigen counts, at module level or inside a function (a lazy import is
still a dependency). A unit is a subpackage (`training`, `models`, ...) or a top-level module (`pipeline`,
`registry`, ...). `LAYERS` below is the order of docs/adding-a-method.md and DESIGN.md, top first: a unit may import
units of lower layers only; units of one layer do not import each other. tests/test_layers.py runs `check()`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "effigen"

# top first; a unit may import only units further down
LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),  # thin commands
    ("experiment",),  # a compatibility alias of training.experiment (the experiment moved into the training layer)
    ("report",),  # trains, evaluates and benchmarks every method
    ("post", "convert"),  # after training: distillation, Neon, quantization; official checkpoints -> folders
    ("bench",),
    ("training",),  # experiment resolution, the run builder, the Trainer, distributed set-up
    ("pipeline",),  # folders with named components; sampling and editing
    ("registry",),  # method name -> network + objective; class name -> component class
    ("objectives",),
    ("samplers",),
    ("models",),
    ("tokenizers",),
    ("teachers",),
    ("nn",),
    ("eval",),
    ("data",),
    ("config", "io", "images", "rng", "runtime", "__init__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def module_edges() -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported effigen module, line)}; `from . import x` resolves to the submodule x when it exists."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.append(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target.split(".")[0] == "effigen" and target != module:
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    edges[module].add((target, node.lineno))
    return edges


def unit_edges(edges) -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> ["module:line", ...]."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module, targets in edges.items():
        for target, line in targets:
            if _unit(module) != _unit(target):
                out[_unit(module)][_unit(target)].append(f"{module}:{line}")
    return out


def _layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise KeyError(unit)


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles."""
    graph = {m: {t for t, _ in ts} for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def check() -> list[str]:
    """Every violation as a line: an import into an unknown unit, a same-layer or upward import, a module cycle."""
    edges = module_edges()
    problems = []
    for unit, targets in sorted(unit_edges(edges).items()):
        for target, where in sorted(targets.items()):
            try:
                source_layer, target_layer = _layer_of(unit), _layer_of(target)
            except KeyError as e:
                problems.append(f"unit {e.args[0]!r} is in no layer of scripts/import_graph.py: add it to LAYERS")
                continue
            if target_layer <= source_layer:
                kind = "sideways" if target_layer == source_layer else "upward"
                problems.append(f"{kind} import {unit} -> {target} at {', '.join(sorted(where)[:4])}")
    for cycle in _cycles(edges):
        problems.append(f"import cycle between modules {' <-> '.join(cycle)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", action="store_true", help="print the module-level graph")
    args = parser.parse_args(argv)
    edges = module_edges()
    if args.modules:
        for module in sorted(edges):
            print(f"{module} -> {', '.join(sorted({t for t, _ in edges[module]}))}")
    else:
        units = unit_edges(edges)
        for layer in LAYERS:
            for unit in layer:
                if unit in units:
                    print(f"{unit:<11} -> {', '.join(sorted(units[unit], key=_layer_of))}")
    problems = check()
    print("\n" + ("\n".join(problems) if problems else "no upward or sideways imports, no import cycles"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
