"""The package's shape: each layer imports only from itself and the layers
below it, no two modules import each other through any path, and no module
outgrows what a newcomer reads in one sitting. docs/architecture.md describes
the same layers."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
MAX_LINES = 450

# Top to bottom; a module may import from its own layer and any layer below.
LAYERS: list[tuple[str, ...]] = [
    ("gateway.__main__", "gateway.app", "gateway.wiring", "gateway.httpserver", "gateway.testing"),
    ("gateway.api",),
    ("gateway.proxy",),
    ("gateway.upstream",),
    ("gateway.auth",),
    # The core takes plain values, never the settings; the settings check a pinned
    # slurmrestd version against the adapters.
    ("gateway.settings", "gateway.settings_checks"),
    ("gateway.core",),
    ("gateway.slurm",),
    (
        "gateway.metrics",
        "gateway.accesslog",
        "gateway.requestid",
        "gateway.transport",
        "gateway",
    ),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The gateway modules ``path`` imports, by their dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gateway"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
            found.add(f"{node.module}")
            # `from gateway.core import metadata` names a module too.
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> int:
    best = -1
    best_len = -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best >= 0, f"{module} belongs to no layer; add it to LAYERS"
    return best


MODULES = {_module_name(p): p for p in sorted(GATEWAY.rglob("*.py"))}
GRAPH = {name: _imports(path) & MODULES.keys() for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    upward = sorted(m for m in GRAPH[module] if _layer(m) < _layer(module))
    assert not upward, f"{module} imports from a higher layer: {upward}"


def test_no_import_cycle() -> None:
    # A package's __init__ re-exporting its modules is not a cycle of design.
    graph = {
        name: {m for m in deps if not m.startswith(name + ".")} for name, deps in GRAPH.items()
    }
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_api_uses_no_http_client() -> None:
    clients = {"aiohttp", "httpx"}
    for name, path in MODULES.items():
        if not name.startswith("gateway.api"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            used = {n.split(".")[0] for n in names} & clients
            assert not used, f"{name} imports an HTTP client ({used}); that is the proxy's job"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_fits_one_sitting(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES})"
