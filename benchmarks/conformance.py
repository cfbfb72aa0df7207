"""The conformance matrix of tests/test_conformance.py, every cell (fast and e2e tiers), as a table:
family x task x dtype x folder x strategy -> "trains" or pre-flight's refusal line.

    .venv/bin/python benchmarks/conformance.py

Runs pytest on that file and prints the table it writes (Markdown), the counts and the wall time.
Exit status: pytest's (0 when every cell behaved as the tests expect).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.families import Cell, cells, table  # noqa: E402  (the cells the tests define)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / "table.jsonl"
        env = {**os.environ, "FEDLORA_CONFORMANCE_TABLE": str(written), "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_conformance.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in written.read_text().splitlines()] if written.is_file() else []
    if not rows:
        print(proc.stdout[-3000:] + proc.stderr[-3000:])
        return proc.returncode or 1
    fields = ("family", "task", "dtype", "kind", "strategy")
    order = {cell: i for i, (cell, _) in enumerate(cells())}  # by family, as the tests define them
    outcomes = [(Cell(*(r[k] for k in fields)), r["outcome"]) for r in rows]
    print(table(sorted(outcomes, key=lambda row: order[row[0]])))
    trains = sum(r["outcome"] == "trains" for r in rows)
    print(f"\n{len(rows)} cells: {trains} train, {len(rows) - trains} refused in pre-flight; {wall:.1f} s")
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
