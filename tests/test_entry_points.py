"""Every entry point loads experiments through one loader: `fedlora run` and the ServerApp of
`flwr run .` refuse the same bad experiments with the same one-line message, before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.core.config import ConfigError
from fedlora.run import server_app

ROOT = Path(__file__).resolve().parents[1]
BAD = [
    ["lora.rank=0"],
    ["strategy.name=fedprox"],
    ["strategy.options.steps=3"],
    ['privacy.mode="dp-updates"', "privacy.noise_multiplier=1.0", 'strategy.name="lora-fair"'],
    ['privacy.mode="dp-sgd"', "privacy.target_epsilon=3", "privacy.delta=0.5"],
    ['model.path="/nonexistent/model"'],
]


@dataclass
class RunContext:
    """The part of Flower's Context the ServerApp reads."""

    run_config: dict[str, str] = field(default_factory=dict)


def _server_app_error(overrides: list[str], out: Path) -> str:
    context = RunContext(
        {"experiment": "sims/quickstart.toml", "overrides": ";".join(overrides), "out-dir": str(out)}
    )
    with pytest.raises(ConfigError) as err:
        server_app.main(None, context)  # type: ignore[arg-type]
    return str(err.value)


def _cli_error(overrides: list[str], out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.chdir(ROOT)
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = CliRunner().invoke(app, ["run", "sims/quickstart.toml", *sets, "--out", str(out)])
    return result.exit_code, result.output.strip()


@pytest.mark.parametrize("overrides", BAD, ids=lambda o: o[0].split("=")[0])
def test_fedlora_run_and_flwr_run_refuse_with_the_same_line(
    overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flwr_message = _server_app_error(overrides, tmp_path / "flwr")
    code, output = _cli_error(overrides, tmp_path / "cli", monkeypatch)
    assert code == 2
    assert output == f"error: {flwr_message}"
    assert "\n" not in flwr_message
    assert not (tmp_path / "flwr").exists() and not (tmp_path / "cli").exists()
