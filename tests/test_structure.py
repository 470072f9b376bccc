"""The package's shape: imports flow one way (no cycles among module-level imports, and no two modules
importing each other even inside a function), and the paths that must stay light (DAG parsing, the
operators' modules, the package root) load neither TensorFlow, nor Airflow where it has no business, nor an
fsspec backend.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, cli_env

PACKAGE = "tf_export_pipeline"
ROOTS = {REPO / "pipeline": PACKAGE, REPO / "operators": f"{PACKAGE}.operators"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, package: str, known: set[str]) -> set[str]:
    """The project modules (of ``known``) one import statement in ``package`` names."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
    found = set()
    for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in known:
            found.add(full)
        elif base in known:
            found.add(base)
    return found


def _package_of(path: Path, name: str) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _module_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules imported when ``path`` is imported (not inside functions or TYPE_CHECKING)."""
    package = _package_of(path, name)
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []) +
                      [h for handler in getattr(node, "handlers", []) for h in handler.body])
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_imported(node, package, known))

    visit(ast.parse(path.read_text()).body)
    found.discard(name)
    return found


def _imports_anywhere(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in it: at the top, inside functions, under TYPE_CHECKING."""
    package = _package_of(path, name)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_imported(node, package, known))
    found.discard(name)
    return found


def _mutual_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Pairs of modules (sorted) each of which imports the other."""
    return {tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles_among_the_packages_modules():
    modules = _modules()
    known = set(modules)
    graph = {name: _module_level_imports(path, name, known) for name, path in modules.items()}
    assert len(graph) > 30 and graph[f"{PACKAGE}.stages"], "the import graph was not read"
    assert _cycles(graph) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_cycle_even_through_imports_inside_functions():
    # A lazy import hides a cycle from the module-level check; the modules still depend on each other.
    modules = _modules()
    known = set(modules)
    graph = {name: _imports_anywhere(path, name, known) for name, path in modules.items()}
    assert f"{PACKAGE}.storage.transfers" in graph[f"{PACKAGE}.storage.base"], "the import graph was not read"
    assert _mutual_imports(graph) == set()
    assert _cycles(graph) == []


def test_mutual_import_detection_looks_inside_functions_and_type_checking_blocks(tmp_path):
    (tmp_path / "pkg").mkdir()
    sources = {
        "a": "from pkg.b import THING\n",
        "b": "def late():\n    from pkg import a\n    return a\n",
        "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import Other\n",
        "d": "from pkg.c import Base\n",
        "e": "import pkg.a\n",
    }
    for name, text in sources.items():
        (tmp_path / "pkg" / f"{name}.py").write_text(text)
    known = {f"pkg.{n}" for n in sources}
    graph = {f"pkg.{n}": _imports_anywhere(tmp_path / "pkg" / f"{n}.py", f"pkg.{n}", known) for n in sources}
    assert _mutual_imports(graph) == {("pkg.a", "pkg.b"), ("pkg.c", "pkg.d")}
    top_level = {f"pkg.{n}": _module_level_imports(tmp_path / "pkg" / f"{n}.py", f"pkg.{n}", known) for n in sources}
    assert _mutual_imports(top_level) == set()  # what the module-level check alone would miss


LIGHT = f"""
import sys
import {PACKAGE}, {PACKAGE}.config, {PACKAGE}.layout, {PACKAGE}.records, {PACKAGE}.errors
import {PACKAGE}.operators.export, {PACKAGE}.operators.sensors, {PACKAGE}.operators.serving
import {PACKAGE}.operators.hooks, {PACKAGE}.operators.provider, {PACKAGE}.operators.celery_worker
heavy = ("tensorflow", "keras", "gcsfs", "s3fs", "google.cloud.storage")
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_operators_and_their_hook_load_no_tensorflow_and_no_storage_backend():
    proc = subprocess.run([sys.executable, "-c", LIGHT], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


PRELOAD = f"""
import sys, threading
from {PACKAGE}.operators.celery_worker import CELERY_CONFIG, PRELOAD_MODULE
assert "tensorflow" not in sys.modules
assert PRELOAD_MODULE in CELERY_CONFIG["imports"], CELERY_CONFIG.get("imports")
__import__(PRELOAD_MODULE)
print(sorted(m for m in ("tensorflow", "keras", "{PACKAGE}.stages") if m in sys.modules), threading.active_count())
"""


def test_a_celery_worker_preloads_tensorflow_without_starting_a_thread():
    # Celery imports PRELOAD_MODULE before its pool forks: a thread alive then would not survive the fork.
    proc = subprocess.run([sys.executable, "-c", PRELOAD], env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"['keras', 'tensorflow', '{PACKAGE}.stages'] 1"
    assert proc.stderr.strip() == "", proc.stderr[-2000:]  # the import's start-up lines go nowhere


def test_the_core_never_imports_airflow():
    offenders = []
    for name, path in _modules().items():
        if name.startswith(f"{PACKAGE}.operators"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {m}" for m in modules if m == "airflow" or m.startswith("airflow.")]
    assert offenders == []
