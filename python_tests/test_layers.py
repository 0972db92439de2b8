"""The layers contract: which part of sharelora_kernels may import which (read from the source, no import runs).

``LAYERS`` is the contract, lowest floor first. A unit is a top-level module of the package or a
folder (every file under it, files added later included); ``""`` is the package's ``__init__`` (the
public API, whose names are imported on first use). A module may import its own unit, its own floor
and any lower floor, never a higher one; every import counts, those inside functions too. Across the
whole package no chain of imports may come back to where it started (no import circle).
A new top-level module or folder must be given a floor here.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sharelora_kernels"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "base", "files", "version", "extension", "data"),  # foundations: import no other unit
    ("reference", "targeting"),                                     # the math of each path kind; which modules
    ("plan",),                                                      # who owns which tensor, per method
    ("ops", "similarity"),                                          # kernels and backends; share planning
    ("layer",),
    ("grouping",),
    ("model",),
    ("checkpoint", "export", "peft_import", "trainer", "serving"),
    ("integrations",),                                              # framework integrations: nothing imports them
    ("",),                                                          # the public API (sharelora_kernels/__init__.py)
    ("benchmarks", "cli", "__main__"),                              # commands
)
FLOOR = {unit: i for i, floor in enumerate(LAYERS) for unit in floor}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """``sharelora_kernels.ops.tables`` -> ``ops``; ``sharelora_kernels`` -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def import_graph() -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported package module, line)}, every import statement of the package's files."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[tuple[str, int]]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges.update((t, node.lineno) for t in targets if t.split(".")[0] == PACKAGE.name and t != name)
    return graph


def test_every_unit_has_a_floor():
    units = {unit_of(m) for m in import_graph()}
    assert units - set(FLOOR) == set(), "give these modules / folders a floor in LAYERS (python_tests/test_layers.py)"


def test_no_import_runs_up_a_floor():
    upward = [f"{m} (line {line}) imports {t}: floor {FLOOR[unit_of(m)]} -> {FLOOR[unit_of(t)]}"
              for m, edges in import_graph().items() for t, line in sorted(edges)
              if unit_of(t) != unit_of(m) and FLOOR[unit_of(t)] > FLOOR[unit_of(m)]]
    assert upward == []


def test_no_import_circle():
    graph = {m: {t for t, _ in edges} for m, edges in import_graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_the_check_sees_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The checks above fail on a package that breaks the contract (so their passing means something)."""
    fake = tmp_path / "sharelora_kernels"
    (fake / "ops").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "config.py").write_text("def f():\n    from .layer import X\n")  # a lazy import up to the layer
    (fake / "layer.py").write_text("from .config import f\nX = 1\n")
    (fake / "ops" / "__init__.py").write_text("from .a import g\n")
    (fake / "ops" / "a.py").write_text("from .. import ops\ng = 1\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = import_graph()
    assert ("sharelora_kernels.layer", 2) in graph["sharelora_kernels.config"]
    assert ("sharelora_kernels.ops", 1) in graph["sharelora_kernels.ops.a"]
    for check in (test_no_import_runs_up_a_floor, test_no_import_circle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a package that breaks the contract")
