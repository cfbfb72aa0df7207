"""Privacy mechanisms as plug-ins: the registry (modes, keys, options, checks), Opacus's accountants by
name, and the example mechanism of docs/privacy.md dropped into the package and run end to end.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fedlora.privacy.mechanisms as package
from fedlora.core.config import ConfigError, ExperimentConfig, PrivacyConfig, from_dict
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.core.model.arrays import global_norm
from fedlora.privacy import accounting
from fedlora.privacy.mechanisms import dp_sgd, dp_updates, mechanism_for
from fedlora.privacy.mechanisms import registry as mechanisms
from fedlora.run import checkpoint
from fedlora.run.experiment import check_strategy, load_experiment, preflight
from strategies import registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "clip_updates.py"
BUILT_IN = ("ddp", "dp-sgd", "dp-updates", "none")
MODES = sorted(mechanisms.available())


def load(privacy: dict[str, Any], **sections: Any) -> ExperimentConfig:
    """A config checked as the experiment loader checks it (privacy, then the strategy)."""
    return check_strategy(from_dict({"privacy": privacy, **sections}))


def one_line_error(privacy: dict[str, Any], **sections: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(privacy, **sections)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ----- the registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mechanism_keeps_the_contract(mode: str) -> None:
    """Registered under its mode, documented, with frozen options made of ``[privacy]`` keys and keys of
    its own (read from ``[privacy.options]``, so they need a default)."""
    cls = mechanisms.get(mode)
    keys = {f.name for f in dataclasses.fields(PrivacyConfig)} - {"mode", "options"}
    fields = dataclasses.fields(cls.Options)
    own = [f for f in fields if f.name not in keys]
    assert cls.mode == mode and cls.__doc__
    assert cls.Options.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert all(f.default is not dataclasses.MISSING for f in own), [f.name for f in own]
    assert cls.ignores <= keys and not {f.name for f in fields} & cls.ignores


def test_an_unknown_mode_lists_the_registered_ones() -> None:
    registered = ", ".join(mechanisms.available())
    assert set(BUILT_IN) <= set(mechanisms.available())
    message = one_line_error({"mode": "dp"})
    assert message == f"privacy.mode = 'dp' is invalid: expected one of {registered}"
    with pytest.raises(ConfigError, match=re.escape(message)):  # a config that skipped the loader
        mechanism_for(from_dict({"privacy": {"mode": "dp"}}))


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        (
            {"mode": "dp-updates", "noise_multiplier": 1.0, "max_physical_batch": 4},
            "privacy.max_physical_batch = 4 only applies to privacy.mode = 'dp-sgd' (mode is 'dp-updates'); "
            "remove privacy.max_physical_batch or set privacy.mode = 'dp-sgd'",
        ),
        (
            {"mode": "dp-sgd", "noise_multiplier": 1.0, "placement": "client"},
            "privacy.placement = 'client' only applies to privacy.mode = 'dp-updates' (mode is 'dp-sgd'); "
            "remove privacy.placement or set privacy.mode = 'dp-updates'",
        ),
        (
            {"mode": "dp-updates", "noise_multiplier": 1.0, "opacus_mode": "ghost"},
            "privacy.opacus_mode = 'ghost' only applies to privacy.mode = 'dp-sgd' (mode is 'dp-updates')",
        ),
        (
            {"placement": "client"},
            "privacy.placement = 'client' only applies to privacy.mode = 'dp-updates' (mode is 'none')",
        ),
    ],
)
def test_a_key_of_another_mode_is_refused_in_one_line(privacy: dict[str, Any], message: str) -> None:
    assert message in one_line_error(privacy)


def test_mode_none_ignores_the_budget_so_one_override_turns_dp_off() -> None:
    dp = load_experiment(ROOT / "sims" / "dp_sgd_eps3_fedit.toml")
    off = load_experiment(ROOT / "sims" / "dp_sgd_eps3_fedit.toml", ["privacy.mode='none'"])
    assert dp.privacy.target_epsilon == off.privacy.target_epsilon == 3.0
    assert mechanism_for(off).epsilon() == 0.0 and not mechanisms.get("none").private


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        (
            {"mode": "dp-sgd", "noise_multiplier": 1.0, "opacus_mode": "ew"},
            "privacy.opacus_mode = 'ew' is invalid: expected hooks or ghost",
        ),
        (
            {"mode": "dp-updates", "noise_multiplier": 1.0, "placement": "both"},
            "privacy.placement = 'both' is invalid: expected server or client",
        ),
        ({"mode": "dp-updates"}, "privacy.mode = 'dp-updates' needs privacy.target_epsilon"),
    ],
)
def test_each_mechanism_checks_its_own_options(privacy: dict[str, Any], message: str) -> None:
    assert message in one_line_error(privacy)


def test_dp_sgd_refuses_gradient_checkpointing() -> None:
    message = one_line_error(
        {"mode": "dp-sgd", "noise_multiplier": 1.0}, train={"gradient_checkpointing": True}
    )
    assert message.startswith(
        "train.gradient_checkpointing = true does not work with privacy.mode = 'dp-sgd'"
    )


def test_fedlora_strategies_lists_only_the_modes_that_give_dp() -> None:
    assert mechanisms.private_modes() == ["ddp", "dp-sgd", "dp-updates"]
    assert registry.dp_modes("fedit") == ["ddp", "dp-sgd", "dp-updates"]
    assert registry.dp_modes("lora-fair") == ["dp-sgd"]
    assert "none" in registry.privacy_modes("lora-fair")


# ----- accountants ----------------------------------------------------------------------------------


def test_accountants_are_opacus_registry_names() -> None:
    from opacus.accountants import create_accountant

    names = accounting.accountant_names()
    assert {"rdp", "prv", "gdp"} <= set(names)
    with warnings.catch_warnings():  # Opacus warns that gdp is experimental
        warnings.simplefilter("ignore")
        assert [create_accountant(name).mechanism() for name in names] == names
    message = one_line_error({"mode": "dp-sgd", "noise_multiplier": 1.0, "accountant": "moments"})
    listed = ", ".join(names)
    assert (
        message
        == f"privacy.accountant = 'moments' is invalid: expected one of Opacus's accountants ({listed})"
    )


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
@pytest.mark.parametrize("mode", ["dp-sgd", "dp-updates"])
def test_gdp_is_accepted_and_accounts_the_whole_run(mode: str) -> None:
    """Calibrated with gdp, the planned run spends the target; every round counts (Opacus's
    GaussianAccountant reads only the last history entry: the history is merged first)."""
    cfg = load(
        {"mode": mode, "target_epsilon": 3.0, "accountant": "gdp"},
        federation={"num_clients": 100, "rounds": 8, "fraction": 0.1},
    )
    history = [dp_sgd.plan(cfg, 1000)] * 8 if mode == "dp-sgd" else dp_updates.update_history(cfg, 8)
    spent = accounting.epsilon(history, 1e-5, "gdp")
    assert 3.0 - 0.05 <= spent <= 3.0
    assert accounting.epsilon(history[:4], 1e-5, "gdp") < spent
    if mode == "dp-updates":
        server = mechanism_for(cfg)
        server.restore({"rounds_noised": 8})
        assert server.epsilon() == spent


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
def test_gdp_refuses_a_history_it_cannot_account_and_merging_changes_nothing_for_rdp() -> None:
    with pytest.raises(ValueError, match="accounts one noise multiplier and sample rate for the whole run"):
        accounting.epsilon([(1.0, 0.01, 8), (2.0, 0.01, 8)], 1e-5, "gdp")
    split = accounting.epsilon([(1.0, 0.01, 8), (1.2, 0.01, 8), (1.0, 0.01, 8)], 1e-5, "rdp")
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(1.0, 0.01, 8), (1.2, 0.01, 8), (1.0, 0.01, 8)]
    assert split == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)


# ----- the example mechanism, dropped into the package ---------------------------------------------


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Any]]:
    """docs/examples/clip_updates.py as a new file of ``fedlora/privacy/mechanisms/``, found by the
    registry's own discovery (the path a user's file takes)."""
    folder = tmp_path / "mechanisms"
    folder.mkdir()
    (folder / "clip_updates.py").write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(mechanisms, "_discovered", False)
    try:
        yield mechanisms.get("clip-updates")
    finally:
        mechanisms._REGISTRY.pop("clip-updates", None)
        sys.modules.pop("fedlora.privacy.mechanisms.clip_updates", None)


def test_the_example_is_discovered_and_selectable(example: type[Any]) -> None:
    assert "clip-updates" in mechanisms.available() and example.__module__.endswith(".clip_updates")
    assert "clip-updates" in registry.privacy_modes("fedit")
    assert "clip-updates" not in registry.privacy_modes("lora-fair")  # not a linear aggregate
    assert registry.dp_modes("fedit") == ["ddp", "dp-sgd", "dp-updates"]  # it gives no DP
    cfg = load({"mode": "clip-updates", "clip_norm": 0.5})
    assert mechanism_for(cfg).options.clip_norm == 0.5
    refused = one_line_error({"mode": "clip-updates", "target_epsilon": 3.0})
    assert "privacy.target_epsilon = 3.0 only applies to privacy.mode = 'ddp' or 'dp-sgd' or 'dp-updates' " \
        "(mode is 'clip-updates')" in refused  # fmt: skip
    assert "privacy.mode = 'clip-updates' cannot protect strategy 'flora'" in one_line_error(
        {"mode": "clip-updates"}, strategy={"name": "flora"}
    )


def test_the_example_known_answer(example: type[Any]) -> None:
    server = mechanism_for(load({"mode": "clip-updates", "clip_norm": 1.0}))
    sent = {"b": torch.zeros(4), "head": torch.ones(2)}
    small = {"b": torch.tensor([0.3, 0.0, 0.0, 0.4]), "head": torch.ones(2)}  # update norm 0.5: kept
    large = {"b": torch.tensor([3.0, 0.0, 0.0, 0.0]), "head": torch.tensor([1.0, 5.0])}  # norm 5: clipped
    server.observe([])
    released, weights = server.release(sent, [small, large], [0.25, 0.75], 1)
    assert weights == [0.25, 0.75]
    torch.testing.assert_close(released[0]["b"], small["b"])
    torch.testing.assert_close(released[1]["b"], torch.tensor([0.6, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(released[1]["head"], torch.tensor([1.0, 1.8]))
    assert server.round_metrics() == {"clipped_share": 0.5}


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


def test_the_example_runs_a_round_end_to_end_in_process(
    example: type[Any],
    run_in_memory,
    tiny_bert,
    topics_csv: Path,  # type: ignore[no-untyped-def]
) -> None:
    """The server and the clients (the real ClientApp, over Flower's serialisation) find the dropped-in
    mechanism; the global adapter moves by at most the clip norm, and no epsilon is reported."""
    bound = 1e-2
    cfg = preflight(
        load_experiment(
            None,
            [
                f'model.path="{tiny_bert.path}"', f'data.source="{topics_csv}"', 'data.label="topic"',
                f"data.labels={json.dumps(sorted(TOPICS))}", 'data.partitioner="iid"', "data.max_length=16",
                "data.test_size=12", "federation.num_clients=3", "federation.rounds=1", "train.local_steps=2",
                "privacy.mode='clip-updates'", f"privacy.clip_norm={bound}",
            ],
        )
    )  # fmt: skip
    from fedlora.tasks.models import initial_state

    run = run_in_memory(cfg, "clip")
    (row,) = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert row["num_clients"] == 3 and row["clipped_share"] == 1.0 and "epsilon" not in row
    summary = json.loads((run / "summary.json").read_text())
    assert "final_epsilon" not in summary and "privacy_mode" not in summary
    start = initial_state(cfg)
    final = checkpoint.load(run / "checkpoint.safetensors").global_state
    moved = global_norm({k: final[k] - start[k] for k in final})
    assert 0 < moved <= bound * 1.01  # float32 rounding of sent + clipped update
