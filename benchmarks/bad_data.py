"""How fast bad data is refused: every bad-data case of ``tests/test_bad_data.py`` as a real
``fedlora run`` process (Python start-up and imports included), median of ``--repeats`` runs each,
next to the floor every command pays: ``fedlora --help``.

Each case must exit 2 with one line on stderr and leave no run directory; the script says so when one
does not. Prints the load average before and after: on a busy machine the absolute times grow, the
ratios to the floor much less.

Usage: ``python benchmarks/bad_data.py [--repeats 3]`` from the repository root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_bad_data import BAD_DATA, FEDERATION, SMALL  # noqa: E402  (the cases the tests check)


def timed(args: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds of ``python -m fedlora.cli *args`` from the repository root, and its result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return time.perf_counter() - start, proc


def case_seconds(name: str, repeats: int) -> tuple[float, str]:
    """Median seconds to refuse case ``name``, and a problem with how it was refused ("" = none)."""
    write, fragment = BAD_DATA[name]
    times, problem = [], ""
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / "files"
            files.mkdir()
            text = write(files)
            experiment = Path(tmp) / "bad.toml"
            experiment.write_text(SMALL + text + ("" if "[federation]" in text else FEDERATION))
            seconds, proc = timed(["run", str(experiment), "--out", str(Path(tmp) / "run")])
            lines = proc.stderr.strip().splitlines()
            if proc.returncode != 2 or len(lines) != 1 or fragment not in lines[0]:
                problem = f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
            elif (Path(tmp) / "run").exists():
                problem = "left a run directory"
            times.append(seconds)
    return statistics.median(times), problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median; default 3)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    help_s = statistics.median(timed(["--help"])[0] for _ in range(args.repeats))
    print(f"{'fedlora --help (the floor of any command)':45s} {help_s:6.2f} s")
    results = {name: case_seconds(name, args.repeats) for name in BAD_DATA}
    for name, (seconds, problem) in results.items():
        print(f"{name:45s} {seconds:6.2f} s{'  ' + problem if problem else ''}")
    worst = max(results, key=lambda n: results[n][0])
    median = statistics.median(s for s, _ in results.values())
    print(f"median over {len(results)} cases {median:.2f} s; slowest '{worst}' {results[worst][0]:.2f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
