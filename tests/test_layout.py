"""The import arrows point one way (issue 20): a static check of every import in the tree.

Layers, lowest first; each may import only what is below it (and itself)::

    ftps.v1 (generated)
      <- the shared library: ftps.* (common <- records <- ml, privacy)
        <- services.* and clients.*
          <- the composition root: stack (the embedded stack, demo, ``ftps-stack``) and bench

Every ``.py`` under ftps/, services/, clients/, stack/ and bench/ is parsed (never imported) and every
import is read, function-local ones included: an import hidden in a function is still an arrow.
Besides the layers, one service never imports another service's package (they talk over gRPC),
and no group of modules imports itself round in a circle.

Arrows that still point back are listed in ``ALLOWED`` with why; the test fails on a new one and
on a listed one that is gone, so the list can only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ftps", "services", "clients", "stack", "bench")

# (importing module, imported module) -> why the arrow still points back.
ALLOWED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in ``path``, at any depth, resolved to the
    deepest module of ours it names (``from ftps.ml import engine`` -> ``ftps.ml.engine``)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] not in PACKAGES:
                continue
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES:
                yield target, node.lineno


EDGES: dict[tuple[str, str], int] = {}
for _module, _path in MODULES.items():
    for _target, _line in _imports(_module, _path):
        if _target != _module:
            EDGES.setdefault((_module, _target), _line)


def _layer(module: str) -> str:
    top = module.split(".")[0]
    if top in ("bench", "stack"):
        return "root"
    if top == "ftps":
        return "generated" if module == "ftps.v1" or module.startswith("ftps.v1.") else "library"
    return top  # services, clients


_MAY_IMPORT = {
    "generated": {"generated"},
    "library": {"generated", "library"},
    "services": {"generated", "library", "services"},
    "clients": {"generated", "library", "clients"},
    "root": {"generated", "library", "services", "clients", "root"},
}


# Inside the shared library, lowest first: plumbing <- records <- the maths and the ML engine (which
# both build on records and never on each other's internals in the other direction).
_LIBRARY_ORDER = {"ftps.common": 0, "ftps.records": 1, "ftps.privacy": 2, "ftps.ml": 2}


def _library_rank(module: str) -> int | None:
    return _LIBRARY_ORDER.get(".".join(module.split(".")[:2]))


def _why_wrong(src: str, dst: str) -> str | None:
    a, b = _layer(src), _layer(dst)
    if b not in _MAY_IMPORT[a]:
        return f"{a} must not import {b}"
    if a == b == "library":
        ra, rb = _library_rank(src), _library_rank(dst)
        if ra is not None and rb is not None and rb > ra:
            return f"{'.'.join(src.split('.')[:2])} must not import {'.'.join(dst.split('.')[:2])}"
    if a == b == "services" and src.split(".")[:2] != dst.split(".")[:2]:
        return "one service must not import another service's package"
    return None


def test_the_tree_is_scanned():
    # A wrong ROOT or a renamed package would make every check below pass vacuously.
    for module in ("ftps.privacy.scoring", "ftps.ml.engine", "services.lira_scorer.rounds",
                   "clients.score.cli", "stack.demo", "bench.attacks"):
        assert module in MODULES
    assert ("services.lira_scorer.rounds", "ftps.privacy.scoring") in EDGES


@pytest.mark.parametrize(("src", "dst", "expected"), [
    ("ftps.common.serde", "ftps.v1.common_pb2", None),
    ("ftps.v1.common_pb2", "ftps.common.serde", "generated must not import library"),
    ("ftps.privacy.plots", "services.lira_scorer.rounds", "library must not import services"),
    ("ftps.ml.engine", "stack.demo", "library must not import root"),
    ("ftps.records.checks", "ftps.common.errors", None),
    ("ftps.ml.jobs", "ftps.records.npz", None),
    ("ftps.records.npz", "ftps.ml.jobs", "ftps.records must not import ftps.ml"),
    ("ftps.common.serde", "ftps.records.npz", "ftps.common must not import ftps.records"),
    ("ftps.common.storage", "ftps.privacy.dp", "ftps.common must not import ftps.privacy"),
    ("services.lira_scorer.rounds", "services.lira_scorer.store", None),
    ("services.lira_scorer.rounds", "services.finetune_worker.worker",
     "one service must not import another service's package"),
    ("services.finetune_worker.worker", "clients.api", "services must not import clients"),
    ("clients.score.cli", "services.lira_scorer.rounds", "clients must not import services"),
    ("clients.web.assets", "stack.demo", "clients must not import root"),
    ("stack.embedded", "services.lira_scorer.rounds", None),
    ("bench.attacks", "clients.api", None),
])
def test_the_rules(src, dst, expected):
    assert _why_wrong(src, dst) == expected


def test_imports_point_down_the_layers():
    found = {(src, dst): line for (src, dst), line in EDGES.items() if _why_wrong(src, dst)}
    new = [f"{MODULES[src].relative_to(ROOT)}:{line}: {src} -> {dst} ({_why_wrong(src, dst)})"
           for (src, dst), line in sorted(found.items()) if (src, dst) not in ALLOWED]
    gone = [f"{src} -> {dst}" for src, dst in ALLOWED if (src, dst) not in found]
    assert not new, "imports that point back up the layers:\n" + "\n".join(new)
    assert not gone, "allowed imports that no longer occur (drop them from ALLOWED):\n" + "\n".join(gone)


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {}
    for src, dst in sorted(edges):
        graph.setdefault(src, []).append(dst)
        graph.setdefault(dst, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_cycle_finder():
    assert _cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert _cycles({("a", "b"), ("b", "c")}) == []


def test_no_import_cycles():
    # A package's __init__ importing its submodules, which import names from the package, is how
    # packages re-export; those arrows (module -> an enclosing package) are not counted.
    edges = {(src, dst) for src, dst in EDGES if not src.startswith(dst + ".")}
    assert _cycles(edges) == [], "modules that import each other (directly or round a circle)"


# The compute core runs on a bare CUDA machine with PyTorch (bench/gpu.py, issue 18): importing it
# must not reach this project's protobuf or gRPC runtime, nor the services' other dependencies.
COMPUTE_CORE = ("ftps.ml.engine", "ftps.ml.pretrain", "ftps.ml.datasets", "ftps.privacy.scoring",
                "ftps.privacy.masks", "ftps.records.npz", "ftps.records.beton", "ftps.records.builder")


def test_the_compute_core_imports_no_protobuf_or_service_stack():
    from tests.conftest import run_without_service_stack

    proc = run_without_service_stack(f"for module in {COMPUTE_CORE!r}:\n    __import__(module)\n",
                                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
