"""The import contracts of .importlinter hold, and the core is acyclic.

* ``lint-imports`` (import-linter, from this interpreter's environment) keeps every contract:
  graph_passes imports neither plugin, cost_models nor torch; cost_models imports neither plugin
  nor torch; the search strategies do not import each other; no cycles between sibling modules
  of graph_passes / cost_models.
* a module-level check with grimp: the import graph of graph_passes, cost_models and plugin
  (function-level imports included) has no cycle at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("plugin.strategies.gradient", "plugin.strategies.uniform", "plugin.strategies.sequential")


def _lint_imports() -> Path:
    exe = Path(sys.executable).parent / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return exe


def test_lint_imports_keeps_every_contract():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(_lint_imports()), "--no-cache"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lint-imports failed (exit {proc.returncode}):\n{output}"
    assert "0 broken" in output, output


def _graph(*packages: str):
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph(*packages, include_external_packages=False, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def _cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import)."""
    import networkx as nx

    dg = nx.DiGraph()
    dg.add_nodes_from(modules)
    for importer in modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported in modules:
                dg.add_edge(importer, imported)
    return [sorted(c) for c in nx.strongly_connected_components(dg)
            if len(c) > 1 or any(dg.has_edge(m, m) for m in c)]


@pytest.mark.parametrize("package", ["graph_passes", "cost_models", "plugin"])
def test_package_import_graph_is_acyclic(package):
    graph = _graph(package)
    modules = {m for m in graph.modules if m == package or m.startswith(package + ".")}
    cycles = _cycles(graph, modules)
    if cycles:
        chains = []
        for cycle in cycles:
            a, b = cycle[0], cycle[1]
            chains.append(f"{' <-> '.join(cycle)}; e.g. {a} -> {b}: "
                          f"{graph.find_shortest_chain(importer=a, imported=b)}")
        pytest.fail(f"import cycles in {package}:\n" + "\n".join(chains))


def test_existing_strategies_are_independent():
    """The built-in strategies (and any module added to plugin/strategies/) import no other strategy."""
    graph = _graph("plugin")
    shared = {"plugin.strategies", "plugin.strategies.base", "plugin.strategies.registry", "plugin.strategies.problem"}
    present = sorted(m for m in graph.modules if m.startswith("plugin.strategies.") and m not in shared)
    assert set(STRATEGIES) <= set(present), present
    bad = [(a, b, graph.find_shortest_chain(importer=a, imported=b))
           for a in present for b in present if a != b and graph.chain_exists(importer=a, imported=b)]
    assert not bad, "strategies import each other: " + "; ".join(f"{a} -> {b} via {c}" for a, b, c in bad)
