"""The package layout holds: the layer contract in pyproject.toml, no import cycle, imports at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedlora", "strategies", "clients")


def test_the_layer_contract_in_pyproject_is_kept() -> None:
    """import-linter checks ``[tool.importlinter]``: every import, function-local ones included."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
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


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "b", "c"):
        graph.add_module(name)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="a")
    graph.add_import(importer="b", imported="c")
    assert _cycles(graph) == [["a", "b"]]


def _local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source line) of imports inside functions without a comment saying why."""
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import | ast.ImportFrom) and not _explained(lines, sub.lineno):
                bad.append((sub.lineno, lines[sub.lineno - 1].strip()))
    return bad


def _explained(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or above the block of imports (blank lines allowed) it is in."""
    if "#" in lines[lineno - 1]:
        return True
    above = lineno - 2
    while above >= 0 and (not lines[above].strip() or lines[above].lstrip().startswith(("import ", "from "))):
        above -= 1
    return above >= 0 and lines[above].lstrip().startswith("#")


def test_function_local_imports_say_why() -> None:
    """Imports belong at the top; one inside a function must say why (start-up time) in a comment."""
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    bad = [f"{p.relative_to(ROOT)}:{line}: {text}" for p in files for line, text in _local_imports(p)]
    assert not bad, "\n".join(bad)


@pytest.mark.cli
def test_the_client_app_loads_without_torch() -> None:
    """A SuperNode starts a process per message; the query's process must not pay torch's imports."""
    code = "import sys, clients.app; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.cli
def test_help_loads_none_of_the_heavy_libraries() -> None:
    """`fedlora --help` (and a command's) answers at once: torch, transformers, peft, Ray and Flower are
    imported by the commands when they run, never by the command line itself."""
    code = (
        "import sys\n"
        "from fedlora.cli import app\n"
        "for args in (['--help'], ['run', '--help'], ['compare', '--help'], ['deploy', 'local', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({'torch', 'transformers', 'peft', 'ray', 'flwr'} & set(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
