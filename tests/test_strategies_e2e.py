"""Every strategy completes a short `fedlora run` on the real model and data, reproducibly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_e2e import ROOT

STRATEGIES = {
    "fedit": [],
    "ffa-lora": [],
    "lora-fair": [],
    "fedex-lora": [],
    "flora": ["--set", "strategy.options.ranks=[4,8]"],
    "fedsa-lora": ["--set", "federation.fraction_evaluate=1.0"],
}
SMALL = [
    "--clients",
    "3",
    "--rounds",
    "2",
    "--set",
    "federation.fraction=0.67",
    "--set",
    "train.local_steps=2",
]
SMALL += ["--set", "data.max_examples=2000", "--set", "data.test_size=100", "--set", "data.max_length=32"]
TIMING = ("wall_s", "aggregate_s", "fair_solve_s")


def run(name: str, out: Path) -> list[dict]:  # type: ignore[type-arg]
    args = ["--strategy", name, *SMALL, *STRATEGIES[name], "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "run", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[dict]]]:  # type: ignore[type-arg]
    base = tmp_path_factory.mktemp("strategies")
    return {name: [run(name, base / f"{name}-{i}") for i in range(2)] for name in STRATEGIES}


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_completes_and_is_reproducible(results, name: str) -> None:  # type: ignore[no-untyped-def]
    first, second = results[name]
    assert [r["round"] for r in first] == [1, 2]
    assert all(r["num_clients"] == 2 and r["strategy"] == name for r in first)
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in first]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in second]


@pytest.mark.e2e
def test_ffa_lora_uplink_is_half_of_fedit_plus_the_head(results) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.adapters import initial_state
    from fedlora.core.arrays import is_head, is_lora_a, payload_bytes, to_arrays
    from fedlora.core.config import from_dict

    state = initial_state(from_dict({}))
    a = payload_bytes(to_arrays({k: v for k, v in state.items() if is_lora_a(k)}))
    head = payload_bytes(to_arrays({k: v for k, v in state.items() if is_head(k)}))
    fedit, ffa = results["fedit"][0][0]["uplink_bytes"], results["ffa-lora"][0][0]["uplink_bytes"]
    assert ffa == fedit - 2 * a  # two clients per round, A never sent
    assert (ffa - 2 * head) * 2 == fedit - 2 * head  # square q/v projections: B is exactly half of A+B


@pytest.mark.e2e
def test_fair_diagnostics_and_fedex_downlink(results) -> None:  # type: ignore[no-untyped-def]
    fair = results["lora-fair"][0][-1]
    assert fair["fair_cos_after"] >= fair["fair_cos_before"]
    assert fair["fair_delta_norm"] >= 0
    fedex = results["fedex-lora"][0]
    residual_bytes = 2 * 12 * 384 * 384 * 4  # 2 clients x 12 full-rank float32 offsets
    assert fedex[1]["downlink_bytes"] - fedex[0]["downlink_bytes"] >= residual_bytes
    assert "client_eval_accuracy" in results["fedsa-lora"][0][-1]
