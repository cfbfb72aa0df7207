"""Test files never import each other (or conftest.py): shared code lives in fixtures or tests/helpers.py."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    """A module name that is a test file or conftest.py (``tests.test_x``, ``test_x``, ``conftest``)."""
    last = name.split(".")[-1]
    return last.startswith("test_") or last == "conftest"


def imported_test_modules(source: str) -> list[str]:
    """The test modules (and conftest) that ``source`` imports, function-local imports included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.module and _is_test_module(node.module):
                found.append(module)
            elif node.module in (None, "tests"):  # from tests import test_x / from . import test_x
                found += [f"{module}.{a.name}".lstrip(".") for a in node.names if _is_test_module(a.name)]
    return found


def test_the_check_sees_every_form_of_import() -> None:
    source = (
        "import tests.test_e2e\n"
        "from tests.test_e2e import ROOT\n"
        "from tests import conftest\n"
        "from .test_strategies import LAYERS\n"
        "def f():\n"
        "    from . import test_e2e\n"
        "from tests.helpers import client_state\n"
        "import testing_tools\n"
    )
    assert imported_test_modules(source) == [
        "tests.test_e2e",
        "tests.test_e2e",
        "tests.conftest",
        ".test_strategies",
        "test_e2e",
    ]


def test_no_test_file_imports_another_test_file() -> None:
    files = sorted(TESTS.glob("*.py"))
    assert len([p for p in files if p.name.startswith("test_")]) > 10
    offenders = {p.name: found for p in files if (found := imported_test_modules(p.read_text()))}
    assert not offenders, (
        f"move what they share into a fixture (conftest.py) or tests/helpers.py: {offenders}"
    )
