"""The package layout follows method.md's stages: each module imports only its own package or the layers below it
(function-level imports included), no package imports a private name of another module, and no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first: a module may import its own package or anything listed before it
LAYERS = ["oodpl.errors", "oodpl.paths", "oodpl.config", "oodpl.runtime", "oodpl.data", "oodpl.models", "oodpl.core",
          "oodpl.train", "oodpl.adapt", "oodpl.evaluation", "oodpl.toy", "oodpl.experiment", "oodpl.api",
          "oodpl.cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "oodpl").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(name: str) -> str | None:
    for layer in LAYERS:
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every oodpl import of a file at any depth, skipping `if TYPE_CHECKING:` blocks."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, []) for a in child.names if a.name.startswith("oodpl"))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("oodpl"):
                assert child.level == 0, f"{path}: relative import (oodpl imports absolutely)"
                found.append((child.module, [a.name for a in child.names]))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _targets(module: str, names: list[str]) -> set[str]:
    subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    return subs if subs and len(subs) == len(names) else {module} | subs


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "oodpl" and _layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "oodpl"))
def test_module_imports_only_its_package_or_lower_layers(module):
    mine = LAYERS.index(_layer(module))
    for target, names in _imports(MODULES[module]):
        for t in _targets(target, names):
            layer = _layer(t)
            if layer is None:  # `import oodpl` itself
                continue
            assert LAYERS.index(layer) <= mine, f"{module} imports {t}, a layer above it ({layer})"
        assert not [n for n in names if n.startswith("_") and n != "__version__"], \
            f"{module} imports a private name from {target}: {names}"


def test_no_import_circle_between_modules():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for target, names in _imports(path):
            graph[m] |= {t for t in _targets(target, names) if t in MODULES and t != m}
    state: dict[str, int] = {}

    def walk(m, trail):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                walk(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check is not vacuous: a models module importing the benchmark is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from oodpl.experiment.benchmark import Benchmark\n")
    (target, names), = _imports(bad)
    assert {_layer(t) for t in _targets(target, names)} == {"oodpl.experiment"}
    assert LAYERS.index("oodpl.experiment") > LAYERS.index("oodpl.models")
