"""The package imports downward only: no import cycle between modules of `sorted_jax`, counting
imports inside functions too, and no lazy (function-level) import except of heavy optional
third-party packages.

Read with `ast`, without importing anything. An edge `a -> b` is an `import b` / `from b import
x` anywhere in module `a` (`from pkg import sub` is an edge to `pkg.sub` when `sub` is a
module). Importing `pkg.sub` also runs `pkg/__init__.py`; that implicit edge is not counted, so
a package may re-export its submodules, but a submodule that imports its own package is a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sorted_jax"

# Imports allowed inside functions: heavy packages that most commands never need, so importing
# sorted_jax stays light and works without them. Everything else is imported at the top.
LAZY_OK = frozenset({
    "torch",                # conversion of .bin checkpoints, HF parity (tests)
    "tensorflow_datasets",  # tfds: data sources (optional extra)
    "tensorflow",
    "matplotlib",           # plots, written at the end of a run
    "tensorboardX",         # TensorBoard events (imports protobuf)
    "transformers",         # HF tokenizer dirs (seconds to import)
    "sentencepiece",        # SentencePiece tokenizers (a native extension)
    "fastapi",              # python -m sorted_jax.serve (the `serve` extra)
    "uvicorn",
    "gguf",                 # GGUF files (llama.cpp): the `gguf` extra, only when one is read
    "lm_eval",              # evaluate lm-eval: the lm-evaluation-harness (the `lm-eval` extra)
})


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, here: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_pkg else here.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, line, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    in_function.add(id(sub))
    for node in ast.walk(tree):
        lazy = id(node) in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, lazy
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, name, is_pkg)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            yield from ((s, node.lineno, lazy) for s in subs)
            if len(subs) < len(node.names):
                yield target, node.lineno, lazy


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_and_relative_imports():
    graph = _graph()
    assert "sorted_jax.model.config" in graph["sorted_jax.model.modeling"]
    assert "sorted_jax.core.errors" in graph["sorted_jax.model.config"]
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(fake) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each group imports itself, directly or not): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_lazy_imports_only_for_heavy_optional_packages():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, line, lazy in _imports(name, path, modules):
            if lazy and target.split(".")[0] not in LAZY_OK:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
    assert not bad, ("imports inside functions (move them to the top of the module, or add a "
                     "heavy optional package to LAZY_OK): " + ", ".join(bad))


def test_errors_is_the_lowest_module():
    graph = _graph()
    assert graph["sorted_jax.core.errors"] == set()


# The layers of docs/architecture.md, lowest first: a package imports its own row or lower.
LAYERS = {"core": 0, "model": 1, "data": 1, "parallel": 1, "tools": 1, "objective": 2, "io": 3,
          "training": 4, "decoding": 5, "evaluation": 5, "serving": 5}


def _package(module: str) -> str | None:
    """The subpackage a module belongs to; None for `sorted_jax` itself and the commands."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_packages_import_only_their_own_layer_or_lower():
    graph = _graph()
    commands = {m for m in graph if m.count(".") == 1 and _package(m) is None}
    assert {"sorted_jax.train", "sorted_jax.serve"} <= commands
    upward, into_commands = [], []
    for module, targets in graph.items():
        here = _package(module)
        for target in targets:
            if target in commands:
                into_commands.append(f"{module} -> {target}")
            elif here is not None and _package(target) is not None \
                    and LAYERS[_package(target)] > LAYERS[here]:
                upward.append(f"{module} -> {target}")
    assert not into_commands, "the library imports a command: " + ", ".join(into_commands)
    assert not upward, "imports that go up a layer: " + ", ".join(upward)
    # every subpackage is placed in a layer (a new one must be added to LAYERS and the docs)
    packages = {m.split(".")[1] for m in graph if m.count(".") >= 2}
    assert packages <= set(LAYERS), packages - set(LAYERS)
