"""Checks that pirl_fast's imports follow the data's flow: no upward import, no cycle.

    python scripts/check_layers.py        # exit 0 and one line when clean; each problem on its own line

The stage packages, lowest first; a module may import its own package and the ones before it:
    runtime -> shard -> data -> model -> train -> eval -> report -> bench
Every import counts, also one inside a function. Modules directly under pirl_fast/ (the command
aliases) may import any stage; dali_pipelines/ may import nothing from pirl_fast.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("runtime", "shard", "data", "model", "train", "eval", "report", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    files = [*ROOT.glob("pirl_fast/**/*.py"), *ROOT.glob("dali_pipelines/**/*.py")]
    return {module_name(p): p for p in files}


def imported(tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """The project modules `tree` imports: `from a.b import c` is a.b.c when c is a module, else a.b."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {name for name in found if name in known}


def layer(module: str) -> int | None:
    """The stage index of a pirl_fast module; None for pirl_fast itself and the command aliases."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def problems() -> list[str]:
    known = modules()
    graph = {m: imported(ast.parse(p.read_text(), str(p)), known) - {m} for m, p in known.items()}
    found = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            if m.startswith("dali_pipelines") and t.startswith("pirl_fast"):
                found.append(f"{m} imports {t}: dali_pipelines must not depend on pirl_fast")
            elif layer(m) is not None and layer(t) is not None and layer(t) > layer(m):
                found.append(f"upward import: {m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})")
    found += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return found


if __name__ == "__main__":
    found = problems()
    print("\n".join(found) if found else f"imports follow the flow: {' -> '.join(LAYERS)}; no cycle")
    sys.exit(1 if found else 0)
