"""The package's import graph has no cycle and follows the layout's layers, counting the imports inside functions too
(issue 14; README.md, "Code layout")."""

import ast
from pathlib import Path

import trinityx

ROOT = Path(trinityx.__file__).parent


def module_name(path: Path) -> str:
    parts = ("trinityx", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trinityx"):
                # `from trinityx.eval import judges` imports a submodule, `from trinityx.io import write_json` a module
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("trinityx")}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" when all its imports are explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


PACKAGES = ("lora", "mocae", "train", "infer", "eval", "eval.judges", "apps", "experiment", "bench")
"""The subpackages of the layout (README.md, "Code layout")."""
LAYERS = (("errors", "config", "io", "paths"), ("backbones", "backbones_cli", "data", "sft"), ("registry",), ("lora",),
          ("mocae",), ("train",), ("infer",), ("eval",), ("apps",), ("bench",), ("experiment",), ("cli", "__main__"))
"""The layout from the bottom up: a module imports from its own layer and the layers below."""


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {f"trinityx.{p}" for p in PACKAGES} <= set(graph)  # the graph reads every package
    assert "trinityx.bench.inference" in graph and "trinityx.eval.judges.local" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_folder_of_modules_is_a_package_the_wheel_ships():
    # pyproject's [tool.setuptools.packages.find] ships only folders with an __init__.py
    from setuptools import find_packages

    folders = {".".join(("trinityx", *p.parent.relative_to(ROOT).parts)) for p in ROOT.rglob("*.py")}
    assert folders == {f"trinityx.{p}" for p in PACKAGES} | {"trinityx"}
    assert set(find_packages(ROOT.parent, include=["trinityx", "trinityx.*"])) == folders


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_module_imports_from_its_own_layer_and_below():
    graph = import_graph()
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    assert {m.split(".")[1] for m in graph if m != "trinityx"} == set(rank)  # every module has its layer

    def layer(module: str) -> int:
        return -1 if module == "trinityx" else rank[module.split(".")[1]]

    assert {(a, b) for a, imported in graph.items() for b in imported if layer(b) > layer(a)} == set()
