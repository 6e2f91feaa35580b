"""The library's layering, checked over its import graph (fast: parses files, imports nothing).

medqlora/ groups modules by the pipeline phase they serve. A phase may import core and the
phases that run before it, never one that runs after it; core imports no phase; and no group of
modules imports itself round in a cycle. `cli.py` and `stages/` sit on top and may import any.

    core < data < train.fast < train < evaluate < ship        (cli on top)

Function-level imports count (they run); `if TYPE_CHECKING:` blocks do not (they never run).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from medqlora.core import contract

# Lowest first. A module's layer is the longest of these its dotted name starts with.
LAYERS = ("core", "data", "train.fast", "train", "evaluate", "ship")
TOP = "top"   # medqlora/__init__.py and cli.py: may import anything, nothing imports them


def layer_of(module: str) -> str:
    """'medqlora.train.fast.graphs' -> 'train.fast'; 'medqlora.cli' -> 'top'."""
    rest = module.split(".", 1)[1] if "." in module else ""
    found = [layer for layer in LAYERS if rest == layer or rest.startswith(layer + ".")]
    return max(found, key=len) if found else TOP


def rank(layer: str) -> int:
    """train.fast sits between data and train; top above ship."""
    order = ("core", "data", "train.fast", "train", "evaluate", "ship", TOP)
    return order.index(layer)


def import_graph(root: Path, package: str = "medqlora") -> dict[str, set[str]]:
    """{module: the package modules it imports} for every .py file under root/package."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        targets = set()
        for imported in contract.imported_modules(path, root, package):
            file = contract.module_file(imported, root)
            if file is not None:
                trel = file.relative_to(root).with_suffix("")
                tparts = trel.parts[:-1] if trel.name == "__init__" else trel.parts
                targets.add(".".join(tparts))
        graph[name] = targets - {name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import from a lower layer to a higher one (core importing a phase included)."""
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer_of(module), layer_of(target)
            if rank(high) > rank(low):
                problems.append(f"{module} ({low}) imports {target} ({high}): a {low} module "
                                f"may import only {', '.join(LAYERS[:LAYERS.index(low) + 1])}"
                                if low != TOP else f"{module} imports {target}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among modules (package __init__ files, which only hold a docstring,
    included), each as the path that closes it."""
    found, state = [], {}   # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


GRAPH = import_graph(ROOT)


def test_every_module_sits_in_a_phase_and_the_top_level_is_small():
    top = sorted(p.name for p in (ROOT / "medqlora").iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "cli.py", "core", "data", "evaluate", "ship", "train"]
    assert {m for m in GRAPH if layer_of(m) == TOP} == {"medqlora", "medqlora.cli"}


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    problems = upward_imports(GRAPH)
    assert not problems, "\n".join(problems)


def test_the_import_graph_has_no_cycles():
    assert not cycles(GRAPH), cycles(GRAPH)


def test_the_graph_is_the_real_one():
    """Guard against a checker that sees nothing: known edges of each kind are in the graph."""
    assert "medqlora.core.config" in GRAPH["medqlora.data.dataset"]
    assert "medqlora.train.fast.fastpath" in GRAPH["medqlora.train.preflight"]
    assert "medqlora.evaluate.generation" in GRAPH["medqlora.ship.serve.engine"]
    # a function-level import (contract.imported_modules reads function bodies too)
    assert "medqlora.ship.serve.api" in GRAPH["medqlora.cli"]
    assert len(GRAPH) > 45 and sum(map(len, GRAPH.values())) > 100


@pytest.mark.parametrize("source, expected", [
    # core importing a phase
    ({"core/config.py": "from medqlora.train.training import run\n"},
     "medqlora.core.config (core) imports medqlora.train.training (train)"),
    # an earlier phase importing a later one, inside a function
    ({"data/dataset.py": "def f():\n    from medqlora.ship.merging import merge\n"},
     "medqlora.data.dataset (data) imports medqlora.ship.merging (ship)"),
    # the fast path importing the recipe above it
    ({"train/fast/graphs.py": "import medqlora.train.training\n"},
     "medqlora.train.fast.graphs (train.fast) imports medqlora.train.training (train)"),
])
def test_an_added_upward_import_is_reported(tmp_path, source, expected):
    files = {"__init__.py": "", "core/__init__.py": "", "data/__init__.py": "",
             "train/__init__.py": "", "train/fast/__init__.py": "", "ship/__init__.py": "",
             "core/config.py": "", "data/dataset.py": "", "train/training.py": "",
             "train/fast/graphs.py": "", "ship/merging.py": "", **source}
    for rel, text in files.items():
        path = tmp_path / "medqlora" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    problems = upward_imports(import_graph(tmp_path))
    assert [p.split(":")[0] for p in problems] == [expected]


def test_an_added_cycle_is_reported(tmp_path):
    for rel, text in {"__init__.py": "", "core/__init__.py": "",
                      "core/a.py": "from medqlora.core import b\n",
                      "core/b.py": "def f():\n    import medqlora.core.a\n"}.items():
        path = tmp_path / "medqlora" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert cycles(import_graph(tmp_path)) == [["medqlora.core.a", "medqlora.core.b",
                                                "medqlora.core.a"]]
