"""The package's import structure: no cycles, no layer reaching up, one module per heavy dependency.

The rules are those of the design's layout section. Imports are read from the
source with `ast`, nothing is imported, so the test is fast and sees every
import, wherever it stands:

- module level (what runs when the module is imported), including under
  `try` or `if`;
- inside functions and methods (lazy imports);
- under `if TYPE_CHECKING:`;
- `importlib.import_module` / `__import__` with a literal name, or with an
  f-string whose literal prefix names a package of the project (then every
  module under that prefix counts as imported: any of them may be loaded).

Every one of them is an edge, for the layering rules and for cycles alike. A
module-level cycle is what breaks an import outright (a name not yet defined
in a half-initialised module); a cycle closed by a lazy or type-only import
still ties two modules together (neither can be read, tested or moved without
the other) and becomes an import-time failure the day someone hoists the
import, so it is refused too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sparse_embed"

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports `target`.

    Attributes:
        source: The importing module's dotted name.
        target: The imported module's dotted name; for a third-party import,
            the name as written (`horovod.tensorflow`).
        where: `path:line` of the import statement, for messages.
    """

    source: str
    target: str
    where: str


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every Python module of `package` under `root`, by dotted name (a package is its `__init__`)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _base(module: str, path: Path, level: int, name: str | None) -> str:
    """The module a `from ... import` names, with a relative import resolved against `module`."""
    if not level:
        return name or ""
    parts = module.split(".")
    if path.name != "__init__.py":
        parts.pop()
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _dynamic_targets(call: ast.Call, modules: dict[str, Path]) -> list[str]:
    """What `importlib.import_module(...)` or `__import__(...)` may load, as far as its source says."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not call.args:
        return []
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        if prefix.startswith(f"{PACKAGE}."):
            return [m for m in modules if m.startswith(prefix)]
    return []


def import_edges(root: Path = ROOT, package: str = PACKAGE) -> list[Edge]:
    """Every import of every module of `package`, resolved to module names where they are the package's.

    `from a import b` is an edge to `a.b` when that is a module of the
    package, else to `a` (b is a name defined in a).
    """
    modules = module_files(root, package)
    edges = []
    for module, path in modules.items():
        where = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, path, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            elif isinstance(node, ast.Call):
                targets = _dynamic_targets(node, modules)
            edges += [Edge(module, target, f"{where}:{node.lineno}") for target in targets]
    return edges


def internal_graph(edges: list[Edge], modules: dict[str, Path]) -> dict[str, dict[str, Edge]]:
    """module -> {imported module of the package -> one edge that imports it}, self-imports left out."""
    graph: dict[str, dict[str, Edge]] = defaultdict(dict)
    for edge in edges:
        target = edge.target
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != edge.source:
            graph[edge.source].setdefault(target, edge)
    return graph


def cycles(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(f"{prefix}.")


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return module_files(ROOT)


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(ROOT)


def test_no_import_cycles(edges: list[Edge], modules: dict[str, Path]) -> None:
    graph = internal_graph(edges, modules)
    report = []
    for component in cycles(graph):
        ties = [f"  {a} -> {b} ({graph[a][b].where})" for a in component for b in graph[a] if b in component]
        report.append(f"{', '.join(component)}:\n" + "\n".join(ties))
    assert not report, "import cycles (break each by moving what both sides need into a leaf module):\n" + \
        "\n".join(report)


# (importer, imported, why): no module under the first may import one under the second.
LAYERS = [
    ("sparse_embed.models", "sparse_embed.training", "networks are built without the trainer"),
    ("sparse_embed.heads", "sparse_embed.training", "heads take a Strategy from sparse_embed.strategy"),
    ("sparse_embed.distributions", "sparse_embed.training", "distributions are used by models and heads"),
    ("sparse_embed.data", "sparse_embed.search", "data reads and writes datasets; protocols are metrics"),
    ("sparse_embed.data", "sparse_embed.metrics", "data computes no metric"),
]


@pytest.mark.parametrize(("importer", "imported", "why"), LAYERS, ids=[f"{a}-{b}" for a, b, _ in LAYERS])
def test_no_layer_reaches_up(edges: list[Edge], importer: str, imported: str, why: str) -> None:
    wrong = [f"{e.where}: {e.source} imports {e.target}" for e in edges
             if _inside(e.source, importer) and _inside(e.target, imported)]
    assert not wrong, f"{importer} must not import {imported} ({why}):\n" + "\n".join(wrong)


def test_the_library_never_imports_the_app(edges: list[Edge]) -> None:
    app = f"{PACKAGE}.app"
    wrong = [f"{e.where}: {e.source} imports {e.target}" for e in edges
             if not _inside(e.source, app) and _inside(e.target, app)]
    assert not wrong, "the app uses the library, never the other way round:\n" + "\n".join(wrong)


def _reached(edges: list[Edge], modules: dict[str, Path], prefix: str) -> dict[str, list[str]]:
    """Every module the modules under `prefix` import, however indirectly, with one import path."""
    graph = internal_graph(edges, modules)
    reached = {m: [m] for m in modules if _inside(m, prefix)}
    todo = list(reached)
    while todo:
        module = todo.pop()
        for target in graph.get(module, {}):
            if target not in reached:
                reached[target] = reached[module] + [target]
                todo.append(target)
    return reached


def test_edge_never_loads_tensorflow(edges: list[Edge], modules: dict[str, Path]) -> None:
    """The TFLite-only runtime runs where TensorFlow is not installed: nothing it imports, however
    indirectly, may import `sparse_embed.keras` (the one TensorFlow import)."""
    path = _reached(edges, modules, f"{PACKAGE}.edge").get(f"{PACKAGE}.keras")
    assert path is None, "sparse_embed.edge reaches TensorFlow: " + " -> ".join(path or [])


# Layers below the trainer, and the plumbing every entry point shares (cli.py): none of them may
# reach `training`, even through another module.
BELOW_TRAINING = ["cli", "config", "launch", "checkpoints", "strategy", "models", "heads", "distributions",
                  "data", "faces", "metrics", "search", "edge"]


@pytest.mark.parametrize("layer", BELOW_TRAINING)
def test_lower_layers_never_reach_the_trainer(edges: list[Edge], modules: dict[str, Path],
                                              layer: str) -> None:
    reached = _reached(edges, modules, f"{PACKAGE}.{layer}")
    wrong = [" -> ".join(path) for module, path in reached.items() if _inside(module, f"{PACKAGE}.training")]
    assert not wrong, f"sparse_embed.{layer} reaches the training package:\n" + "\n".join(wrong[:5])


# A heavy or optional dependency -> the only modules that may import it; everything else asks them.
HEAVY = {
    "tensorflow": {"sparse_embed.keras"},
    "tf_keras": {"sparse_embed.keras"},
    "keras": {"sparse_embed.keras"},
    "horovod": {"sparse_embed.training.distributed"},
    "ai_edge_litert": {"sparse_embed.edge.runtime"},
    "tensorflow_model_optimization": {"sparse_embed.compression.quantize", "sparse_embed.compression.prune",
                                      "sparse_embed.compression.rewrite"},
    "pymilvus": {"sparse_embed.search.milvus"},
    "mtcnn": {"sparse_embed.faces.detect"},
    "optuna": {"sparse_embed.experiment"},
    "fastapi": {"sparse_embed.app.serve"},
}


@pytest.mark.parametrize("dependency", sorted(HEAVY))
def test_a_heavy_dependency_is_imported_in_one_place(edges: list[Edge], dependency: str) -> None:
    wrong = [f"{e.where}: {e.source} imports {e.target}" for e in edges
             if _inside(e.target, dependency) and e.source not in HEAVY[dependency]]
    assert not wrong, f"only {', '.join(sorted(HEAVY[dependency]))} may import {dependency}:\n" + \
        "\n".join(wrong)


# -- the walker itself, on a package written for the test ---------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_walker_sees_lazy_relative_type_only_and_dynamic_imports(tmp_path: Path) -> None:
    _write(tmp_path, {
        "sparse_embed/__init__.py": "",
        "sparse_embed/a.py": "from sparse_embed import b\n",
        "sparse_embed/b.py": "def f():\n    from .pkg import c\n",
        "sparse_embed/pkg/__init__.py": "",
        "sparse_embed/pkg/c.py": "import importlib\nfrom typing import TYPE_CHECKING\n"
                                 "import horovod.tensorflow\n"
                                 "if TYPE_CHECKING:\n    from sparse_embed.a import Thing\n"
                                 "def g(n):\n    return importlib.import_module(f'sparse_embed.pkg.{n}')\n",
        "sparse_embed/pkg/d.py": "",
    })
    modules = module_files(tmp_path)
    edges = import_edges(tmp_path)
    assert {(e.source, e.target) for e in edges} >= {
        ("sparse_embed.a", "sparse_embed.b"),  # a module named in `from package import module`
        ("sparse_embed.b", "sparse_embed.pkg.c"),  # relative, inside a function
        ("sparse_embed.pkg.c", "sparse_embed.a"),  # type-only
        ("sparse_embed.pkg.c", "horovod.tensorflow"),
        ("sparse_embed.pkg.c", "sparse_embed.pkg.d"),  # f-string import_module
    }
    cycle = ["sparse_embed.a", "sparse_embed.b", "sparse_embed.pkg.c"]
    assert cycles(internal_graph(edges, modules)) == [cycle]


def test_the_walker_finds_the_package_and_its_imports(edges: list[Edge], modules: dict[str, Path]) -> None:
    assert {"sparse_embed.keras", "sparse_embed.training.trainer", "sparse_embed.heads"} <= set(modules)
    assert any(e.source == "sparse_embed.keras" and e.target == "tensorflow" for e in edges)
