"""Experiment config: defaults, overrides, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.core.config import ConfigError, ExperimentConfig, from_dict, load_config
from fedlora.core.typed_toml import apply_overrides
from fedlora.run.experiment import check_strategy
from strategies import registry

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid() -> None:
    cfg = from_dict({})
    assert cfg.strategy.name == "fedit"
    assert cfg.lora.targets == ["qv"]
    assert cfg.federation.clients_per_round() == 10


def test_every_sims_file_loads() -> None:
    files = sorted(p for p in (ROOT / "sims").glob("*.toml") if "[compare]" not in p.read_text())
    assert files, "sims/ has no experiment files"
    for path in files:
        load_config(path)  # comparison grids: tests/test_compare.py (test_the_shipped_grids_resolve)


def test_overrides_parse_toml_values_and_bare_words() -> None:
    cfg = load_config(
        ROOT / "sims" / "quickstart.toml",
        ["lora.rank=4", "train.lr=0.01", "lora.rslora=true", "strategy.name=fedit", 'lora.targets=["query"]'],
    )
    assert cfg.lora.rank == 4
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.lora.rslora is True
    assert cfg.lora.targets == ["query"]


def test_int_is_accepted_where_a_float_is_expected() -> None:
    assert from_dict({"lora": {"alpha": 32}}).lora.alpha == 32.0


def test_toml_round_trip_is_exact() -> None:
    cfg = load_config(ROOT / "sims" / "quickstart.toml", ["seed=7", "data.partitioner=dirichlet"])
    assert ExperimentConfig.from_toml(cfg.to_toml()) == cfg


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"lora": {"rnak": 4}}, "unknown key 'lora.rnak' (did you mean 'rank'?)"),
        ({"loar": {}}, "unknown key 'loar' (did you mean 'lora'?)"),
        ({"lora": {"rank": 0}}, "lora.rank = 0 is invalid: expected an integer >= 1"),
        ({"lora": {"rank": "8"}}, "lora.rank = '8' is invalid: expected an integer"),
        ({"lora": {"rank": 2.5}}, "lora.rank = 2.5 is invalid: expected an integer"),
        ({"lora": {"rslora": 1}}, "lora.rslora = 1 is invalid: expected true or false"),
        (
            {"data": {"partitioner": "random"}},
            "data.partitioner = 'random' is invalid: expected one of natural",
        ),
        ({"data": {"alpha": 0}}, "data.alpha = 0.0 is invalid"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer = 'adam' is invalid: expected one of adamw, sgd"),
        (
            {"federation": {"fraction": 0}},
            "federation.fraction = 0.0 is invalid: expected a number in (0, 1]",
        ),
        (
            {"federation": {"num_clients": 3, "min_clients": 5}},
            "federation.min_clients = 5 is invalid: expected at most federation.num_clients (3)",
        ),
        (
            {"strategy": {"name": "fedprox"}},
            "strategy.name = 'fedprox' is unknown; valid strategies: "
            + ", ".join(sorted(registry.available())),
        ),
        ({"strategy": {"options": {"x": 1}}}, "strategy.options.x is unknown for strategy 'fedit'"),
        ({"lora": 3}, "lora must be a table"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_strategy(from_dict(data))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["lora.rank", "=3", "lora..rank=3"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        apply_overrides({}, [override])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nrank = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.cli
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "lora.rnak=4"], "unknown key 'lora.rnak'"),
        (["--strategy", "nope"], "strategy.name = 'nope' is unknown"),
        (["missing.toml"], "experiment file 'missing.toml' not found"),
        (
            ["--set", "model.path=/nonexistent"],
            "model.path = '/nonexistent' is not a Hugging Face model directory",
        ),
    ],
)
def test_cli_config_errors_are_one_line_and_exit_2(
    args: list[str], fragment: str, tmp_path: Path, run_cli
) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("run", *args, "--out", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_cli_refuses_to_overwrite_a_run(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "rounds.jsonl").write_text('{"round": 1}\n')
    proc = run_cli("run", "--out", str(run_dir), timeout=120)
    assert proc.returncode == 2
    assert "already exists; pass --overwrite" in proc.stderr
    assert (run_dir / "rounds.jsonl").read_text() == '{"round": 1}\n'


def test_every_config_key_is_documented_in_usage() -> None:
    """docs/usage.md's key table lists every key of every section, so the docs cannot fall behind."""
    import dataclasses
    from pathlib import Path

    from fedlora.core.config import ExperimentConfig

    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    keys = []
    for f in dataclasses.fields(ExperimentConfig):
        default = getattr(ExperimentConfig(), f.name)
        if dataclasses.is_dataclass(default):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(default)]
        else:
            keys.append(f.name)
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, missing
