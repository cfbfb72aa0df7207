"""Bad experiment files fail before any work starts: one line naming key, value and fix; exit 2.

The table runs the real CLI in-process (typer's CliRunner) to stay fast; one case, and the resume
errors, go through a real subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import app

ROOT = Path(__file__).resolve().parents[1]

# (experiment file text, fragment of the one-line error)
BAD_FILES: dict[str, tuple[str, str]] = {
    "unknown key": (
        "[lora]\nrnak = 4\n",
        "unknown key 'lora.rnak' (did you mean 'rank'?); valid keys here: rank",
    ),
    "unknown section": ("[faultz]\nnan_fraction = 0.1\n", "unknown key 'faultz' (did you mean 'faults'?)"),
    "unknown top-level key": ('nmae = "x"\n', "unknown key 'nmae' (did you mean 'name'?)"),
    "string for an integer": ('[lora]\nrank = "8"\n', "lora.rank = '8' is invalid: expected an integer"),
    "float for an integer": (
        "[federation]\nrounds = 2.5\n",
        "federation.rounds = 2.5 is invalid: expected an integer",
    ),
    "integer for a boolean": ("[lora]\nrslora = 1\n", "lora.rslora = 1 is invalid: expected true or false"),
    "section not a table": ("lora = 3\n", "lora must be a table"),
    "unknown partitioner": (
        '[data]\npartitioner = "random"\n',
        "data.partitioner = 'random' is invalid: expected one of natural, dirichlet, iid",
    ),
    "unknown optimizer": (
        '[train]\noptimizer = "adam"\n',
        "train.optimizer = 'adam' is invalid: expected one of adamw, sgd",
    ),
    "unknown privacy mode": (
        '[privacy]\nmode = "dp"\n',
        "privacy.mode = 'dp' is invalid: expected one of ddp, dp-sgd, dp-updates, none",
    ),
    "unknown strategy": (
        '[strategy]\nname = "fedprox"\n',
        "strategy.name = 'fedprox' is unknown; valid strategies: fed-sb, fedex-lora",
    ),
    "fraction above 1": (
        "[federation]\nfraction = 1.5\n",
        "federation.fraction = 1.5 is invalid: expected a number in (0, 1]",
    ),
    "min_clients above num_clients": (
        "[federation]\nnum_clients = 3\nmin_clients = 5\n",
        "federation.min_clients = 5 is invalid: expected at most federation.num_clients (3)",
    ),
    "more clients than examples": (
        "[data]\nmax_examples = 600\ntest_size = 200\n[federation]\nnum_clients = 500\n",
        "federation.num_clients = 500 is invalid: expected at most the 400 training tweets",
    ),
    "test set as large as the data": (
        "[data]\nmax_examples = 500\ntest_size = 500\n",
        "data.test_size = 500 is invalid: expected fewer than the 500 tweets in use",
    ),
    "client evaluation without validation splits": (
        "[data]\nval_fraction = 0.0\n[federation]\nfraction_evaluate = 0.5\n",
        "federation.fraction_evaluate = 0.5 needs client validation splits, but data.val_fraction = 0",
    ),
    "dp-updates (secure-aggregation placement) with lora-fair": (
        '[strategy]\nname = "lora-fair"\n'
        '[privacy]\nmode = "dp-updates"\nplacement = "client"\nnoise_multiplier = 1.0\n',
        "privacy.mode = 'dp-updates' cannot protect strategy 'lora-fair'",
    ),
    "dp-updates with flora": (
        '[strategy]\nname = "flora"\n[privacy]\nmode = "dp-updates"\nnoise_multiplier = 1.0\n',
        "privacy.mode = 'dp-updates' cannot protect strategy 'flora'",
    ),
    "dp-updates with fedex-lora": (
        '[strategy]\nname = "fedex-lora"\n[privacy]\nmode = "dp-updates"\nnoise_multiplier = 1.0\n',
        "privacy.mode = 'dp-updates' cannot protect strategy 'fedex-lora'",
    ),
    "placement without dp-updates": (
        '[privacy]\nplacement = "client"\n',
        "privacy.placement = 'client' only applies to privacy.mode = 'dp-updates'",
    ),
    "a dp-sgd key under dp-updates": (
        '[privacy]\nmode = "dp-updates"\nnoise_multiplier = 1.0\nopacus_mode = "ghost"\n',
        "privacy.opacus_mode = 'ghost' only applies to privacy.mode = 'dp-sgd' (mode is 'dp-updates')",
    ),
    "an accountant Opacus does not have": (
        '[privacy]\nmode = "dp-sgd"\nnoise_multiplier = 1.0\naccountant = "moments"\n',
        "privacy.accountant = 'moments' is invalid: expected one of Opacus's accountants (gdp, prv, rdp)",
    ),
    "dp without noise or budget": (
        '[privacy]\nmode = "dp-sgd"\n',
        "privacy.mode = 'dp-sgd' needs privacy.target_epsilon",
    ),
    "ffa-lora with a trained (non-shared) A": (
        '[strategy]\nname = "ffa-lora"\noptions = { train_a = true }\n',
        "strategy.options.train_a is unknown for strategy 'ffa-lora'; valid options: a_init",
    ),
    "ffa-lora with an unknown A": (
        '[strategy]\nname = "ffa-lora"\noptions = { a_init = "per-client" }\n',
        "strategy.options.a_init = 'per-client' is invalid: expected kaiming or orthogonal",
    ),
    "fault fractions above 1": (
        "[faults]\nraise_fraction = 0.6\nnan_fraction = 0.6\n",
        "faults: raise_fraction + straggle_fraction + nan_fraction + corrupt_fraction = 1.2 is invalid: "
        "expected at most 1",
    ),
    "every client faulty": (
        "[faults]\nraise_fraction = 1.0\n",
        "faults: 1 of the clients would never send a valid update",
    ),
    "straggling without a delay": (
        "[faults]\nstraggle_fraction = 0.2\n",
        "faults.straggle_fraction > 0 needs faults.straggle_s > 0",
    ),
    "negative norm bound": (
        "[robustness]\nmax_update_norm = -1\n",
        "robustness.max_update_norm = -1.0 is invalid: expected 0 (no bound) or a number > 0",
    ),
    "negative retries": (
        "[robustness]\nround_retries = -1\n",
        "robustness.round_retries = -1 is invalid: expected an integer >= 0",
    ),
    "not TOML": ("[lora\nrank = 3\n", "is not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_experiment_file_fails_with_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    text, fragment = BAD_FILES[case]
    experiment = tmp_path / "bad.toml"
    experiment.write_text(text)
    result = CliRunner().invoke(app, ["run", str(experiment), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_at_least_twenty_bad_files() -> None:
    assert len(BAD_FILES) >= 20


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.cli  # a new Python process
def test_a_bad_file_through_a_real_process(tmp_path: Path) -> None:
    experiment = tmp_path / "bad.toml"
    experiment.write_text(BAD_FILES["fault fractions above 1"][0])
    proc = _cli(str(experiment), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: faults: raise_fraction + straggle_fraction + nan_fraction + corrupt_fraction = 1.2 is "
        "invalid: expected at most 1 (each client plays one fault per round)"
    ]
    assert not (tmp_path / "run").exists()


def test_resume_errors_name_the_problem(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cases = [
        (["--resume", str(run)], "is not a run directory (no config.toml)"),
        (
            ["sims/quickstart.toml", "--resume", str(run)],
            "--resume takes everything from RUN_DIR/config.toml",
        ),
    ]
    for args, fragment in cases:
        result = CliRunner().invoke(app, ["run", *args])
        assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    run.mkdir()
    (run / "config.toml").write_text("")
    (run / "rounds.jsonl").write_text("")
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exit_code == 2
    assert (
        "has no checkpoint (it stopped before round 1 finished); start it again with --overwrite"
        in result.stderr
    )
    (run / "summary.json").write_text("{}")
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exit_code == 2 and "has finished already" in result.stderr
    assert (run / "summary.json").read_text() == "{}"
