"""The conformance matrix: tiny random models of many transformers families (tests/families.py), each
through pre-flight, one federated round in this process (every message through Flower's serialisation),
the adapter saved and reloaded with the docs' plain transformers + peft code, predictions equal.

Per family and task: FedIT on a float32 folder without a classification head, and FFA-LoRA on a
bfloat16 folder with a 2-label head (classification; a 3-label task) or a bfloat16 causal LM; one of the
two is in the fast tier (rotated over the families, tests/families.py), the other marked e2e. Families
that cannot be trained must be refused by pre-flight with their one line. The table of outcomes is
printed (``pytest -s``) and written to ``$FEDLORA_CONFORMANCE_TABLE`` when set
(benchmarks/conformance.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.families import EXPECTED_REFUSALS, Cell, cells, dump, run_cell, save_family, table, write_data

OUTCOMES: list[tuple[Cell, str]] = []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conformance")


@pytest.fixture(scope="module")
def data(workdir: Path) -> Path:
    return write_data(workdir)


@pytest.fixture(scope="module")
def folder(workdir: Path) -> Callable[[Cell], str]:
    """``folder(cell)``: the cell's model folder, built once per module and shared by cells."""
    built: dict[str, str] = {}

    def get(cell: Cell) -> str:
        if cell.folder not in built:
            kind = "head" if cell.kind == "head" else "base"
            built[cell.folder] = save_family(
                workdir / "models" / cell.folder, cell.family, kind=kind, dtype=cell.dtype
            )
        return built[cell.folder]

    return get


@pytest.fixture(scope="module", autouse=True)
def _print_table() -> object:
    yield
    if OUTCOMES:
        print("\n" + table(OUTCOMES))
        if os.environ.get("FEDLORA_CONFORMANCE_TABLE"):
            dump(OUTCOMES, Path(os.environ["FEDLORA_CONFORMANCE_TABLE"]))


def _name(cell: Cell) -> str:
    return f"{cell.family}-{cell.task}-{cell.dtype}-{cell.kind}-{cell.strategy}"


@pytest.mark.parametrize(
    "cell",
    [pytest.param(c, id=_name(c), marks=() if fast else pytest.mark.e2e) for c, fast in cells()],
)
def test_cell(cell: Cell, folder, data: Path, workdir: Path, federate) -> None:  # type: ignore[no-untyped-def]
    outcome = run_cell(cell, folder(cell), data, workdir / "runs" / _name(cell), federate)
    OUTCOMES.append((cell, outcome))
    expected = EXPECTED_REFUSALS.get((cell.family, cell.task))
    if expected is None:
        assert outcome == "trains", outcome
    else:
        assert outcome.startswith("refused: ") and expected in outcome, outcome
        assert "\n" not in outcome
