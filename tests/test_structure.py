"""The package's import structure: imports point down, no cycles.

Read from the source with `ast` (every import, including those inside
functions), so a cycle is found even when Python happens to tolerate it
at import time. Importing `keras_qlora.a.b` also runs the package
`keras_qlora.a` (its `__init__`), so that counts as an edge too; the root
package `keras_qlora`, which re-exports the public API, is left out of
those implicit edges.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "keras_qlora"


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {
    _module_name(p): p
    for p in sorted(ROOT.rglob("*.py"))
    if "tests" not in p.parts
}


def _imports(name, path):
    """Yields `(imported module, imported names)` for each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names]


def _targets(module, names):
    """The package modules an import statement runs."""
    found = set()
    for candidate in [module] + [f"{module}.{n}" for n in names]:
        if candidate in MODULES:
            found.add(candidate)
            parts = candidate.split(".")
            # Parent packages run first (not the root package).
            for i in range(2, len(parts)):
                found.add(".".join(parts[:i]))
    return found


def _graph():
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for module, names in _imports(name, path):
            edges |= _targets(module, names)
        edges.discard(name)
        # A package's own __init__ is not an import of its modules.
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def _find_cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "keras_qlora":
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and node != "keras_qlora":
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_package_modules_are_found():
    # The checks below would pass on nothing: make sure they see the code.
    assert {
        "keras_qlora.model",
        "keras_qlora.rewrite",
        "keras_qlora.layers.base",
    } <= set(MODULES)
    assert "keras_qlora.training.checkpoint" in _graph()["keras_qlora.training"]


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_imported_from_another_module(name):
    # `from keras_qlora.x import _y` ties a module to another's internals;
    # a private submodule of the importer's own package is allowed.
    own_package = (
        name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    )
    bad = []
    for module, names in _imports(name, MODULES[name]):
        if not module.startswith("keras_qlora"):
            continue
        for imported in names:
            full = f"{module}.{imported}"
            private_module = full in MODULES and module == own_package
            if imported.startswith("_") and not private_module:
                bad.append(full)
    assert not bad, f"{name} imports private names {bad}"


def test_model_is_recognized_without_importing_it():
    # Modules below model.py check for the wrapper through keras_qlora.wrapper.
    graph = _graph()
    importers = sorted(
        m for m, edges in graph.items() if "keras_qlora.model" in edges
    )
    assert set(importers) <= {"keras_qlora", "keras_qlora.rewrite"}, importers


# The layers of docs/architecture.md, bottom first: a module may import
# modules of lower layers, and modules of its own package.
LAYERS = [
    ["internals", "wrapper", "atomic", "quantizers"],
    ["ops", "settings", "deferred", "surgery"],
    ["layers"],
    ["convert"],
    ["selectors", "report", "export"],
    ["remat", "chunked"],
    ["adapters"],
    ["training"],
    ["model"],
    ["rewrite"],
    ["interop", "loading"],
]


def _layer_of(module):
    top = module.split(".")[1] if module.count(".") else None
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return None


def test_every_module_has_a_layer():
    missing = sorted(
        m for m in MODULES if m != "keras_qlora" and _layer_of(m) is None
    )
    assert not missing, f"add {missing} to LAYERS and docs/architecture.md"


def test_imports_point_down():
    graph = _graph()
    upward = []
    for module, edges in graph.items():
        if module == "keras_qlora":
            continue
        here = _layer_of(module)
        package = module.split(".")[:2]
        for target in edges:
            if target == "keras_qlora" or target.split(".")[:2] == package:
                continue
            if _layer_of(target) >= here:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point down: " + ", ".join(upward)
