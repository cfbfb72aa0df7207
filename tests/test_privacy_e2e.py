"""Privacy end to end on the real model and tweets: `fedlora run` with DP-SGD on Ray (Opacus in the
client actors), and dp-updates through the in-process federation (the product's round loop and
ClientApp, messages through Flower's protobuf form), whose noise and accounting are the server's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

SMALL = ["--clients", "3", "--set", "train.local_steps=2", "--set", "data.max_examples=2000"]
SMALL += ["--set", "data.test_size=100", "--set", "data.max_length=32"]
SMALL += ["--set", "federation.client_cpus=2"]  # one Ray actor runs every client: one model load


def _run(run_in_process: Callable, out: Path, *args: str) -> list[dict]:  # type: ignore[type-arg]
    proc = run_in_process("run", *SMALL, *args, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "eps " in proc.stdout  # the progress line shows epsilon
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _reference(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta)) if history else 0.0


def _saved_a_is_the_initial_a(out: Path) -> None:
    """FFA-LoRA: the saved adapter's A is bit-identical to the A every client derives from the seed."""
    from peft import PeftModel

    from fedlora.core.config import ExperimentConfig
    from fedlora.core.model.adapters import adapter_state
    from fedlora.core.model.arrays import is_lora_a
    from fedlora.core.model.loading import load_classifier
    from fedlora.tasks.models import initial_state

    cfg = ExperimentConfig.from_toml((out / "config.toml").read_text())
    saved = adapter_state(
        PeftModel.from_pretrained(load_classifier("", num_labels=3, seed=1), str(out / "adapter"))
    )
    initial = initial_state(cfg)
    a_keys = [k for k in initial if is_lora_a(k)]
    assert a_keys and all(torch.equal(saved[k], initial[k]) for k in a_keys)


@pytest.mark.e2e
def test_dp_sgd_accounts_across_rounds_and_clients_decline_past_their_budget(
    tmp_path: Path, run_in_process
) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.config import load_config
    from fedlora.core.data.splits import get_splits

    cfg = load_config(None, [*_overrides(SMALL), "federation.num_clients=3"])
    splits = get_splits(cfg.data, 3, cfg.seed)
    rates = [16 / len(splits.client_train(k)) for k in range(3)]
    entry = [(1.0, q, 2) for q in rates]
    after_two = sorted(_reference([e] * 2, 1e-5) for e in entry)
    budget = after_two[1] + 1e-6  # the middle client can afford exactly two rounds
    rows = _run(
        run_in_process, tmp_path / "run",
        "--strategy", "ffa-lora", "--rounds", "3",
        "--set", "privacy.mode=dp-sgd", "--set", "privacy.noise_multiplier=1.0",
        "--set", f"privacy.target_epsilon={budget}",
    )  # fmt: skip
    # Replay the budget rule with the reference accountant: a client trains while it can afford it.
    trained = [0, 0, 0]
    spent = [0.0, 0.0, 0.0]
    for row in rows:
        declined = 0
        for k in range(3):
            if _reference([entry[k]] * (trained[k] + 1), 1e-5) > budget:
                declined += 1
            else:
                trained[k] += 1
            spent[k] = _reference([entry[k]] * trained[k], 1e-5)
        assert row["num_declined"] == declined
        assert row["num_clients"] == 3 - declined
        assert row["epsilon"] == pytest.approx(max(spent), rel=1e-9)
        assert row["epsilon"] <= budget and row["delta"] == 1e-5 and row["clip_norm"] == 1.0
        assert row["noise_multiplier"] == 1.0 or declined == 3
    assert sum(r["num_declined"] for r in rows) >= 1
    assert [r["epsilon"] for r in rows] == sorted(r["epsilon"] for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_epsilon"] == rows[-1]["epsilon"] and summary["privacy_mode"] == "dp-sgd"
    _saved_a_is_the_initial_a(tmp_path / "run")


@pytest.mark.e2e
@pytest.mark.parametrize(("strategy", "placement"), [("fedit", "server"), ("ffa-lora", "client")])
def test_dp_updates_epsilon_is_the_subsampled_gaussian_after_each_round(
    tmp_path: Path, strategy: str, placement: str, federate, repo_root: Path
) -> None:  # type: ignore[no-untyped-def]
    from fedlora.run.experiment import load_experiment, preflight

    overrides = [
        *_overrides(SMALL), "federation.num_clients=3", f'strategy.name="{strategy}"', "federation.rounds=2",
        "privacy.mode='dp-updates'", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5",
        f"privacy.placement='{placement}'", "federation.fraction=0.67",
    ]  # fmt: skip
    cfg = preflight(load_experiment(repo_root / "sims" / "quickstart.toml", overrides), simulation=True)
    out = federate(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    q = 2 / 3  # clients_per_round = int(0.67 * 3) = 2 of 3
    for k, row in enumerate(rows, start=1):
        assert row["epsilon"] == pytest.approx(_reference([(1.0, q, 1)] * k, 1e-5), rel=1e-9)
        assert row["noise_multiplier"] == 1.0 and row["clip_norm"] == 0.5
    if strategy == "ffa-lora":
        _saved_a_is_the_initial_a(tmp_path / "run")


def _overrides(args: list[str]) -> list[str]:
    """The --set values of an argument list."""
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]
