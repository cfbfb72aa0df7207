"""Every strategy completes a short run on the real model and data (MiniLM, the tweets).

Each strategy is run once (3 clients, 2 sampled per round, 2 rounds), only when a test asks for it.
FedIT runs twice in a real Ray simulation (``fedlora run`` in the test process, one client actor of
two CPUs): a Ray simulation with client sampling is reproducible. The other strategies run through the
in-process federation (``federate``: the product's round loop and ClientApp, every message serialised
to Flower's protobuf form and back), which leaves out only Ray's start-up and actors, the same for
every strategy and shown by the FedIT runs. That every strategy is reproducible bit for bit, and
completes under DP-SGD, is shown in-process on a tiny model (test_in_process.py). The tests are
grouped in classes by the runs they read: `make test` hands out whole classes to its xdist workers
(``--dist loadscope``), so no run is made twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strategies import registry

EXTRA = {
    "flora": ["strategy.options.ranks=[4,8]"],  # mixed ranks
    "fedsa-lora": ["federation.fraction_evaluate=1.0"],  # its personalised accuracy
}
"""Settings that exercise what is particular to a strategy; every other one runs with the defaults."""
BUILT_IN = {"fedit", "ffa-lora", "lora-fair", "fedex-lora", "flora", "fedsa-lora", "fedsvd", "rolora"}
"""Strategies whose runs the classes below share with strategy-specific checks."""
SMALL = [
    "federation.num_clients=3",
    "federation.rounds=2",
    "federation.fraction=0.67",
    "train.local_steps=2",
    "federation.client_cpus=2",  # one Ray actor runs both clients: one model load instead of two
    "data.max_examples=2000",
    "data.test_size=100",
    "data.max_length=32",
]
TIMING = ("wall_s", "aggregate_s", "fair_solve_s")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, run_in_process, federate, repo_root: Path):  # type: ignore[no-untyped-def]
    """``results(name, run=0)``: the rounds.jsonl rows of run ``run`` of strategy ``name``, made on first
    use (``run=1``: a second run with the same seed); FedIT on Ray, the others in-process."""
    from fedlora.run.experiment import load_experiment, preflight

    base = tmp_path_factory.mktemp("strategies")
    quickstart = repo_root / "sims" / "quickstart.toml"
    done: dict[tuple[str, int], list[dict]] = {}  # type: ignore[type-arg]

    def get(name: str, run: int = 0) -> list[dict]:  # type: ignore[type-arg]
        if (name, run) not in done:
            out = base / f"{name}-{run}"
            overrides = [*SMALL, f'strategy.name="{name}"', *EXTRA.get(name, [])]
            if name == "fedit":
                sets = [arg for o in overrides for arg in ("--set", o)]
                proc = run_in_process("run", str(quickstart), *sets, "--out", str(out))
                assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            else:
                federate(preflight(load_experiment(quickstart, overrides), simulation=True), out)
            done[name, run] = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
        return done[name, run]

    return get


def check_completes(results, name: str) -> None:  # type: ignore[no-untyped-def]
    rows = results(name)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["num_clients"] == 2 and r["strategy"] == name and r["num_failed"] == 0 for r in rows)


@pytest.mark.e2e
class TestFairFedexFedsa:
    @pytest.mark.parametrize("name", ["lora-fair", "fedex-lora", "fedsa-lora"])
    def test_strategy_completes(self, results, name: str) -> None:  # type: ignore[no-untyped-def]
        check_completes(results, name)

    def test_fair_diagnostics_and_fedex_downlink(self, results) -> None:  # type: ignore[no-untyped-def]
        fair = results("lora-fair")[-1]
        assert fair["fair_cos_after"] >= fair["fair_cos_before"]
        assert fair["fair_delta_norm"] >= 0
        fedex = results("fedex-lora")
        residual_bytes = 2 * 12 * 384 * 384 * 4  # 2 clients x 12 full-rank float32 offsets
        assert fedex[1]["downlink_bytes"] - fedex[0]["downlink_bytes"] >= residual_bytes
        fedsa = results("fedsa-lora")[-1]  # natural split by source: non-IID clients
        # personalised (global A, the client's own B and head, its own validation data) above the
        # global model the server evaluates (B = 0, the initial head)
        assert fedsa["client_eval_accuracy"] > fedsa["eval_accuracy"]


@pytest.mark.e2e
class TestFeditAndFfaLora:
    @pytest.mark.parametrize("name", ["fedit", "ffa-lora"])
    def test_strategy_completes(self, results, name: str) -> None:  # type: ignore[no-untyped-def]
        check_completes(results, name)

    def test_same_seed_same_metrics_with_client_sampling(self, results) -> None:  # type: ignore[no-untyped-def]
        """Clients are sampled by partition id with the seeded RNG, and replies summed in a fixed order."""
        rows = [
            [{k: v for k, v in row.items() if k not in TIMING} for row in run]
            for run in (results("fedit"), results("fedit", 1))  # 2 of 3 clients sampled per round
        ]
        assert rows[0] == rows[1]
        assert all(r["num_clients"] == 2 for r in rows[0])

    def test_ffa_lora_uplink_is_half_of_fedit_plus_the_head(self, results) -> None:  # type: ignore[no-untyped-def]
        from fedlora.core.config import from_dict
        from fedlora.core.model.arrays import is_head, is_lora_a, payload_bytes, to_arrays
        from fedlora.tasks.models import initial_state

        state = initial_state(from_dict({}))
        a = payload_bytes(to_arrays({k: v for k, v in state.items() if is_lora_a(k)}))
        head = payload_bytes(to_arrays({k: v for k, v in state.items() if is_head(k)}))
        fedit, ffa = results("fedit")[0]["uplink_bytes"], results("ffa-lora")[0]["uplink_bytes"]
        assert ffa == fedit - 2 * a  # two clients per round, A never sent
        assert (ffa - 2 * head) * 2 == fedit - 2 * head  # square q/v projections: B is exactly half of A+B


@pytest.mark.e2e
class TestFlora:
    def test_strategy_completes(self, results) -> None:  # type: ignore[no-untyped-def]
        check_completes(results, "flora")


def _payload(kinds: set[str]) -> int:
    """Bytes of the default adapter's arrays of ``kinds`` ('lora_A', 'lora_B', 'head') on the wire."""
    from fedlora.core.config import from_dict
    from fedlora.core.model.arrays import kind_of, payload_bytes, to_arrays
    from fedlora.tasks.models import initial_state

    state = initial_state(from_dict({}))
    return payload_bytes(to_arrays({k: v for k, v in state.items() if kind_of(k) in kinds}))


@pytest.mark.e2e
class TestFedSvdAndRolora:
    @pytest.mark.parametrize("name", ["fedsvd", "rolora"])
    def test_strategy_completes(self, results, name: str) -> None:  # type: ignore[no-untyped-def]
        check_completes(results, name)

    @pytest.mark.parametrize("name", ["fedsvd", "rolora"])
    def test_a_travels_down_and_one_factor_up(self, results, name: str) -> None:  # type: ignore[no-untyped-def]
        rows = results(name)
        down = 2 * _payload({"lora_A", "lora_B", "head"})  # two clients a round, both factors and the head
        up = 2 * _payload({"lora_B", "head"})  # square q/v projections: one A is as large as one B
        assert all(r["downlink_bytes"] == down and r["uplink_bytes"] == up for r in rows)
        if name == "rolora":
            assert [r["trained_b"] for r in rows] == [1.0, 0.0]


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(set(registry.available()) - BUILT_IN))
def test_every_other_registered_strategy_completes(results, name: str) -> None:  # type: ignore[no-untyped-def]
    """A strategy added as a new file in strategies/ is run here without editing this file."""
    check_completes(results, name)
