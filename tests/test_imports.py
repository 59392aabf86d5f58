"""The package's import graph: every module imports, there is no cycle, and no module imports from a
layer above its own (lazy imports inside functions count: they are the same dependency, deferred).

Layers, bottom to top (README "Layout"): config/io -> features -> data -> encoders -> projector,
prompt, scoring, checkpoint -> llm, generation, encoder cache, aux CTC, CTC prefix scores -> model -> training ->
firered (AED family, released formats) -> recipes -> demo.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.helpers import SRC

PACKAGE = SRC / "llmasr"

# (module prefix, layer); the longest matching prefix wins.
LAYERS = {
    "llmasr": 0,
    "llmasr.config": 0,
    "llmasr.io": 0,
    "llmasr.layers": 0,
    "llmasr.features": 1,
    "llmasr.vad": 1,
    "llmasr.data": 2,
    "llmasr.encoders": 3,
    "llmasr.projector": 4,
    "llmasr.prompt": 4,
    "llmasr.scoring": 4,
    "llmasr.checkpoint": 4,
    "llmasr.llm": 5,
    "llmasr.generation": 5,
    "llmasr.encoder_cache": 5,
    "llmasr.aux_ctc": 5,
    "llmasr.ctc_prefix": 5,
    "llmasr.model": 6,
    "llmasr.training": 7,
    "llmasr.vllm_engine": 7,
    "llmasr.firered": 8,
    "llmasr.decoding_shards": 8,
    "llmasr.recipes": 9,
    "llmasr.demo": 10,
}


def _modules() -> dict:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict) -> set:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in mods else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in mods and m != name}


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_every_module_imports():
    failures = {}
    for name in sorted(_modules()):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report every module that fails, not just the first
            failures[name] = f"{type(e).__name__}: {e}"
    assert not failures, failures


def test_no_import_cycle(graph):
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph[m]):
            # A package's __init__ re-exporting its own submodules is not a design cycle.
            if dep.startswith(m + "."):
                continue
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_upward_import(graph):
    upward = sorted(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                    for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
    assert not upward, "\n".join(upward)


def test_the_check_sees_a_planted_cycle_and_upward_edge(tmp_path):
    """The analysis itself: a lazy import inside a function is an edge, and relative imports resolve."""
    pkg = tmp_path / "llmasr"
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "model.py").write_text("def f():\n    from llmasr.training.loop import g\n")
    (pkg / "training" / "loop.py").write_text("from ..model import f\n")
    mods = {"llmasr": pkg / "__init__.py", "llmasr.model": pkg / "model.py",
            "llmasr.training": pkg / "training" / "__init__.py", "llmasr.training.loop": pkg / "training" / "loop.py"}
    assert _imports("llmasr.model", mods["llmasr.model"], mods) == {"llmasr.training.loop"}
    assert _imports("llmasr.training.loop", mods["llmasr.training.loop"], mods) == {"llmasr.model"}
    assert _layer("llmasr.training.loop") > _layer("llmasr.model")
