"""The packages import one way: base (``core``) -> stages (``datasets``, then ``gen``/``recon``/``eval``) ->
orchestration (``cluster``). The graph is computed from the sources, lazy imports inside functions included,
and printed, so a new import that points up or closes a cycle fails here by name."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "datasets", "gen", "recon", "eval", "cluster")
# What each package may import (besides itself). Everything else is a layering fault.
ALLOWED = {
    "core": set(),
    "datasets": {"core"},
    "recon": {"core", "datasets"},
    "gen": {
        "core",
        "datasets",
        "recon",
    },  # generate fits a FLAME identity to a reference with recon's tracker
    "eval": {"core", "datasets"},  # eval scores image folders: it never imports gen or recon
    "cluster": {"core", "datasets", "gen", "recon", "eval"},
}


def _imported_packages(path: Path) -> set[str]:
    """The geodiff4d packages a source file imports anywhere in its body (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "geodiff4d" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for package in PACKAGES:
        graph[package]
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[package] |= _imported_packages(path) - {package}
    return dict(graph)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None when it is acyclic."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_package_import_graph_is_acyclic_and_layered():
    graph = package_graph()
    print("\npackage import graph (package -> what it imports):")
    for package in PACKAGES:
        print(f"  {package:9s} -> {', '.join(sorted(graph[package])) or '(nothing)'}")
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    upward = {p: sorted(graph[p] - ALLOWED[p]) for p in PACKAGES if graph[p] - ALLOWED[p]}
    assert not upward, f"imports that break the layers (package -> forbidden imports): {upward}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
