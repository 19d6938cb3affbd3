"""The package's layering: no import cycle, and lower layers never import higher ones.

Every module under nanoseek/ is parsed (module-level and function-level imports alike) into a graph of
"module -> the nanoseek modules it imports". `from a import b` is an import of a.b when a.b is a module, else of a.
Importing a.b.c also runs a/__init__.py and a/b/__init__.py; those implicit parent-package imports do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nanoseek

# Lowest first. A module may import its own layer and the layers below it, never one above. An entry names a
# module or a package (then everything under it); the root package itself is the facade (nanoseek/__init__.py,
# the public API: it may import anything below the CLI). Every module must be listed: a new package is one line.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("nanoseek.errors", "nanoseek.config")),
    ("model", ("nanoseek.model",)),
    ("utilities", ("nanoseek.atomic", "nanoseek.provenance", "nanoseek.options")),
    ("io", ("nanoseek.data", "nanoseek.checkpoint")),
    ("inference", ("nanoseek.infer",)),
    ("evaluation", ("nanoseek.math_check", "nanoseek.rewards", "nanoseek.eval", "nanoseek.sample")),
    ("training", ("nanoseek.train",)),
    ("parallel", ("nanoseek.parallel",)),
    ("recipes", ("nanoseek.pipeline", "nanoseek.r1", "nanoseek.distill_vs_rl")),
    ("facade", ("nanoseek",)),
    ("cli", ("nanoseek.cli",)),
]

Graph = dict[str, dict[str, int]]  # module -> {imported module: line of the first such import}


def module_names(root: Path) -> dict[str, Path]:
    """The package at root (a directory with __init__.py) -> dotted module name -> file."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(root: Path) -> Graph:
    modules = module_names(root)

    def resolve(name: str) -> str:
        """A dotted name -> the longest of its prefixes that is one of the package's modules."""
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: Graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..y import z
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != root.name:
                    continue  # torch, the standard library, ...
                target = resolve(target)
                if target != module:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[module] = edges
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) per back edge of a depth-first search; none when the graph is acyclic."""
    cycles, state, stack = [], {}, []  # state: 1 on the current path, 2 done

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """The index of the module's layer: the longest entry that is the module or a package above it (the root
    package's entry only covers the root itself)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if n == 1 and module != prefix:
            return None
        for index, (_, members) in enumerate(layers):
            if prefix in members:
                return index
    return None


def layer_violations(graph: Graph, layers: list[tuple[str, tuple[str, ...]]], root: Path) -> list[str]:
    files = module_names(root)
    problems = []
    for module, edges in sorted(graph.items()):
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{module} is in no layer: add it to LAYERS")
            continue
        for target, line in sorted(edges.items()):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > own:
                problems.append(f"{module} ({layers[own][0]}) imports {target} ({layers[theirs][0]}), a higher "
                                f"layer: {files[module].relative_to(root.parent)}:{line}")
    return problems


def format_cycles(cycles: list[list[str]], graph: Graph) -> str:
    return "\n".join(" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
                     for cycle in cycles)


ROOT = Path(nanoseek.__file__).parent


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert len(graph) > 30 and "nanoseek.model.transformer" in graph["nanoseek.model"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module (line of the import) -> ...):\n" + format_cycles(cycles, graph)


def test_lower_layers_never_import_higher_ones():
    problems = layer_violations(import_graph(ROOT), LAYERS, ROOT)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------- the checker itself
def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "fake"


FAKE_LAYERS = [("base", ("fake.config",)), ("model", ("fake.model",)), ("train", ("fake.train",)),
               ("facade", ("fake",))]


def test_checker_resolves_every_form_of_import(tmp_path):
    root = write_package(tmp_path, {
        "fake/__init__.py": "from fake.model import Net\n",
        "fake/config.py": "import os\n",
        "fake/model/__init__.py": "from .net import Net\n",
        "fake/model/net.py": "from fake import config\nfrom ..config import *\n",
        "fake/model/parts.py": "def f():\n    from fake.model import net, Net\n    import fake.config as c\n",
        "fake/train/__init__.py": "",
        "fake/train/loop.py": "from fake.model.net import Net\nimport fake.model.parts\n",
    })
    graph = import_graph(root)
    assert graph == {
        "fake": {"fake.model": 1},
        "fake.config": {},
        "fake.model": {"fake.model.net": 1},
        "fake.model.net": {"fake.config": 1},
        "fake.model.parts": {"fake.model.net": 2, "fake.model": 2, "fake.config": 3},
        "fake.train": {},
        "fake.train.loop": {"fake.model.net": 1, "fake.model.parts": 2},
    }
    assert find_cycles(graph) == [] and layer_violations(graph, FAKE_LAYERS, root) == []


def test_checker_catches_a_planted_cycle_and_upward_import(tmp_path):
    root = write_package(tmp_path, {
        "fake/__init__.py": "",
        "fake/config.py": "",
        "fake/model/__init__.py": "",
        "fake/model/net.py": "def save():\n    from fake.train.loop import run\n",  # upward, inside a function
        "fake/train/__init__.py": "",
        "fake/train/loop.py": "from fake.model import net\n",
        "fake/serve.py": "",
    })
    graph = import_graph(root)
    cycles = find_cycles(graph)
    assert cycles == [["fake.model.net", "fake.train.loop", "fake.model.net"]]
    assert format_cycles(cycles, graph) == "fake.model.net (line 2) -> fake.train.loop (line 1) -> fake.model.net"
    assert layer_violations(graph, FAKE_LAYERS, root) == [
        "fake.model.net (model) imports fake.train.loop (train), a higher layer: fake/model/net.py:2",
        "fake.serve is in no layer: add it to LAYERS",
    ]
