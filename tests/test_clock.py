"""Device profiles and the virtual clock: the trip formula, what a synchronous round keeps, class
assignment by seed, availability, FedBuff's staleness weight, and the one-line errors of [devices]."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedlora.compare.estimate import cost_key
from fedlora.core.config import ConfigError, load_config
from fedlora.core.devices.clock import Trip, staleness_weight, sync_round, trip, trip_seconds
from fedlora.core.devices.profiles import DeviceClass, DevicesConfig, available, class_counts, class_of
from fedlora.core.records.rundir import RunDirectory
from fedlora.report import paired, plots
from fedlora.report.results import group, load_run, markdown, table

PHONE = DeviceClass(name="phone", share=1.0, speed=0.25, uplink_mbps=2.0, downlink_mbps=8.0, latency_s=0.1)
THREE = (
    'devices.classes=[{name="phone", share=0.6, speed=0.25}, {name="tablet", share=0.3, speed=0.5}, '
    '{name="laptop", share=0.1}]'
)


def test_a_trip_is_compute_plus_bytes_over_bandwidth_plus_latency() -> None:
    # 4 steps x 0.5 s / 0.25 = 8 s; 1 MB down at 8 Mbit/s = 1 s; 0.5 MB up at 2 Mbit/s = 2 s; + 0.1 s
    assert trip_seconds(4, 0.5, PHONE, 1_000_000, 500_000) == pytest.approx(11.1, abs=1e-12)


def test_a_round_without_deadline_waits_for_the_slowest() -> None:
    out = sync_round([Trip(0, 3.0), Trip(1, 9.0), Trip(2, 1.0)], target=3, deadline_s=0.0)
    assert out.kept == [2, 0, 1] and out.seconds == 9.0 and out.dropped == 0


def test_a_deadline_drops_the_late_and_ends_the_round_at_the_deadline() -> None:
    out = sync_round([Trip(0, 3.0), Trip(1, 9.0), Trip(2, 1.0)], target=3, deadline_s=5.0)
    assert out.kept == [2, 0] and out.late == [1] and out.seconds == 5.0 and out.dropped == 1


def test_over_selection_keeps_the_first_to_arrive() -> None:
    trips = [Trip(0, 3.0), Trip(1, 9.0), Trip(2, 1.0), Trip(3, 2.0)]
    out = sync_round(trips, target=2, deadline_s=0.0)
    assert out.kept == [2, 3] and out.surplus == [0, 1] and out.seconds == 2.0


def test_a_client_that_drops_is_known_when_it_vanishes() -> None:
    out = sync_round([Trip(0, 3.0), Trip(1, 9.0, drop_s=4.0)], target=2, deadline_s=0.0)
    assert out.kept == [0] and out.offline == [1] and out.seconds == 4.0


def test_drops_are_drawn_per_round_and_client_from_the_seed() -> None:
    flaky = DeviceClass(name="flaky", share=1.0, drop=0.5)
    trips = [trip(flaky, 0, 1, pid, 10.0) for pid in range(400)]
    again = [trip(flaky, 0, 1, pid, 10.0) for pid in range(400)]
    dropped = [t for t in trips if t.drop_s is not None]
    assert trips == again and 150 < len(dropped) < 250
    assert all(0 <= t.drop_s < 10.0 for t in dropped)  # type: ignore[operator]


def test_classes_have_exact_shares_by_seed() -> None:
    devices = load_config(None, [THREE]).devices
    assert class_counts(devices, 0, 1000) == {"phone": 600, "tablet": 300, "laptop": 100}
    assert class_counts(devices, 0, 7) == {"phone": 4, "tablet": 2, "laptop": 1}
    names = [class_of(devices, 0, 50, pid).name for pid in range(50)]
    assert names == [class_of(devices, 0, 50, pid).name for pid in range(50)]
    assert names != [class_of(devices, 1, 50, pid).name for pid in range(50)]


def test_availability_follows_the_pattern_and_the_probability() -> None:
    night = DeviceClass(name="night", share=1.0, pattern="10")
    on = [available(night, 0, r, 7) for r in range(1, 7)]
    assert on in ([True, False] * 3, [False, True] * 3)
    half = DeviceClass(name="half", share=1.0, availability=0.5)
    share = sum(available(half, 0, 3, pid) for pid in range(1000)) / 1000
    assert 0.45 < share < 0.55


def test_staleness_weight_is_the_papers() -> None:
    assert [staleness_weight(s) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert staleness_weight(1) == pytest.approx(1 / math.sqrt(2))


def test_device_classes_from_a_csv(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("name,share,speed,uplink_mbps\nphone,0.75,0.25,1.5\nlaptop,0.25,,\n")
    devices = DevicesConfig(csv=str(path))
    assert [(c.name, c.speed, c.uplink_mbps) for c in devices.classes] == [
        ("phone", 0.25, 1.5),
        ("laptop", 1.0, 10.0),
    ]
    assert devices.csv == "" and devices.enabled


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['devices.classes=[{name="a", share=0.5}]'], "devices.classes shares = 0.5 is invalid"),
        (['devices.classes=[{name="a", share=1.0, speed=0}]'], "devices.classes[a].speed = 0.0 is invalid"),
        (['devices.classes=[{name="a", share=1.0, pattern="1x"}]'], "devices.classes[a].pattern"),
        (
            ['devices.classes=[{name="a", share=1.0, rank=16}]'],
            "rank = 16 is invalid: expected at most lora.rank",
        ),
        (["schedule.deadline_s=5.0"], "schedule.deadline_s needs device classes"),
        (['schedule.mode="fedbuff"'], "schedule.mode = 'fedbuff' needs device classes"),
        (['devices.csv="nowhere.csv"'], "devices.csv = 'nowhere.csv' not found"),
        (['devices.classes=[{name="a", share=1.0}]', "train.local_epochs=1"], "train.local_epochs = 1"),
        (
            ['devices.classes=[{name="a", share=1.0}]', "schedule.buffer=3"],
            "apply to schedule.mode = 'fedbuff'",
        ),
        (
            ['devices.classes=[{name="a", share=1.0}]', 'schedule.mode="fedbuff"', "schedule.buffer=20"],
            "schedule.buffer = 20 is invalid: expected at most the concurrency (10)",
        ),
        (
            ['devices.classes=[{name="a", share=1.0}]', 'schedule.mode="fedbuff"', 'privacy.mode="dp-sgd"'],
            "privacy.mode = 'dp-sgd' is not supported",
        ),
    ],
)
def test_bad_device_settings_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def _timed_run(path: Path, strategy: str, seed: int, accuracy: list[float], seconds: list[float]) -> Path:
    """A finished run directory whose rows carry the device clock's cumulative ``virtual_time_s``."""
    cfg = load_config(None, [f'strategy.name="{strategy}"', f"seed={seed}"])
    run = RunDirectory(path)
    run.create(cfg)
    for i, (acc, t) in enumerate(zip(accuracy, seconds, strict=True), start=1):
        run.append_round({"round": i, "eval_accuracy": acc, "uplink_bytes": 100, "virtual_time_s": t})
    summary = {
        "name": cfg.name,
        "strategy": strategy,
        "rounds": len(accuracy),
        "final_eval_accuracy": accuracy[-1],
        "best_eval_accuracy": max(accuracy),
        "majority_accuracy": 0.4,
        "total_uplink_bytes": 100 * len(accuracy),
        "total_downlink_bytes": 200 * len(accuracy),
        "wall_s": 1.0,
        "virtual_time_s": seconds[-1],
    }
    run.write_summary(summary)
    return path


def test_the_report_gives_virtual_time_to_target_beside_rounds_and_bytes(tmp_path: Path) -> None:
    runs = [
        _timed_run(tmp_path / "a0", "fedit", 0, [0.5, 0.65, 0.7], [100.0, 250.0, 400.0]),
        _timed_run(tmp_path / "a1", "fedit", 1, [0.62, 0.66, 0.7], [90.0, 200.0, 310.0]),
        _timed_run(tmp_path / "b0", "ffa-lora", 0, [0.5, 0.55, 0.61], [60.0, 120.0, 180.0]),
        _timed_run(tmp_path / "b1", "ffa-lora", 1, [0.5, 0.55, 0.58], [60.0, 120.0, 180.0]),
    ]
    results = [load_run(r, cell=r.name[0], levels={}, target=0.6) for r in runs]
    assert [r.virtual_s_to_target for r in results] == [250.0, 90.0, 180.0, None]
    assert [r.virtual_time_s for r in results] == [400.0, 310.0, 180.0, 180.0]
    cells = group(results)
    header, rows = table(cells, 0.6)
    col = header.index("virtual s to 60%")
    assert header[col - 1] == "rounds to 60%"
    assert rows[0][col] == "**170 ± 113**" and rows[1][col] == "180 †"  # less is better
    header, rows = paired.table(cells, paired.pairings(cells, "a")[0], 0.6)
    assert header[-3:] == ["rounds to 60%", "uplink MB to 60%", "virtual s to 60%"]
    assert rows[0][-1] == "170" and rows[1][-1] == "180"
    assert "Virtual time: seconds on the device clock" in markdown(cells, 0.6)
    png = plots.accuracy_vs_virtual_time(cells, tmp_path / "virtual.png", "accuracy against virtual time")
    assert png is not None and png.stat().st_size > 10_000


def test_the_estimate_calibrates_each_schedule_apart() -> None:
    classes = 'devices.classes=[{name="a", share=1.0}]'
    assert cost_key(load_config(None, [])) == ("fedit", "none")
    assert cost_key(load_config(None, [classes, "schedule.deadline_s=5.0"])) == ("fedit", "none", "deadline")
    assert cost_key(load_config(None, [classes, 'schedule.mode="fedbuff"'])) == ("fedit", "none", "fedbuff")
