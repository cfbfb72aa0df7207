"""Device and network profiles: the ``[devices]`` and ``[schedule]`` tables, and which client is which.

A device class (``[[devices.classes]]``, or one row of ``devices.csv``) has a share of the clients, a
compute speed relative to the reference step cost ``devices.step_cost_s`` (1 = the machine that cost
was measured on, 0.25 = four times slower), uplink and downlink bandwidth (Mbit/s), a round-trip latency,
an availability (a probability per round and/or an on/off pattern over rounds), a probability of dropping
out in the middle of a round, and optionally the LoRA rank its clients train (HetLoRA, FlexLoRA).

Each client gets its class from the experiment seed alone (:func:`class_of`): exact shares, the
partitions shuffled by the seed. Availability and drops are drawn from (seed, round, client), so every
process computes the same answers without talking to the others.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.core.errors import ConfigError

STEP_COST_S = 0.50
"""Default seconds of one local step at speed 1: the packaged MiniLM with LoRA r=8 on query/value, AdamW,
batch 16, real tweets (padded width about 48), one torch thread, on the 2-core AMD EPYC machine kind this
project's CI uses, idle (``benchmarks/step_cost.py``: median 0.504 s, 2026-12-07; docs/devices.md). A
constant, never measured during a run, so virtual times do not depend on how loaded the machine is."""
MODES = ("sync", "fedbuff")
SHARE_TOLERANCE = 1e-6
DEFAULT_BUFFER = 10
"""FedBuff's default buffer: the paper's K = 10 updates per server step."""


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}")


@dataclass
class DeviceClass:
    """One kind of device and its network (a ``[[devices.classes]]`` entry or a row of ``devices.csv``)."""

    name: str = ""
    share: float = 0.0
    """Share of the clients in this class; the shares of all classes sum to 1."""
    speed: float = 1.0
    """Compute speed relative to ``devices.step_cost_s`` (0.25: a step takes four times as long)."""
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    latency_s: float = 0.05
    """Round-trip latency, added once per client trip."""
    availability: float = 1.0
    """Probability that a client of this class can be sampled in a round (drawn per round and client)."""
    pattern: str = ""
    """On/off over rounds, e.g. '1100' (cycled; each client starts at an offset drawn from the seed);
    empty = always on. Combined with ``availability``: a client is available when both say so."""
    drop: float = 0.0
    """Probability that a client of this class vanishes in the middle of a round it was sampled for."""
    rank: int = 0
    """LoRA rank of this class's clients for strategies with per-client ranks; 0 = lora.rank."""

    def __post_init__(self) -> None:
        key = f"devices.classes[{self.name or '?'}]"
        _check(bool(self.name.strip()), f"{key}.name", self.name, "a non-empty class name")
        _check(0.0 < self.share <= 1.0, f"{key}.share", self.share, "a number in (0, 1]")
        _check(self.speed > 0, f"{key}.speed", self.speed, "a number > 0 (relative to the reference step)")
        _check(self.uplink_mbps > 0, f"{key}.uplink_mbps", self.uplink_mbps, "a number of Mbit/s > 0")
        _check(self.downlink_mbps > 0, f"{key}.downlink_mbps", self.downlink_mbps, "a number of Mbit/s > 0")
        _check(self.latency_s >= 0, f"{key}.latency_s", self.latency_s, "a number of seconds >= 0")
        _check(0.0 < self.availability <= 1.0, f"{key}.availability", self.availability, "a number in (0, 1]")
        _check(
            self.pattern == "" or (set(self.pattern) <= {"0", "1"} and "1" in self.pattern),
            f"{key}.pattern",
            self.pattern,
            "'' (always on) or a string of 0 and 1 with at least one 1, e.g. '1100'",
        )
        _check(0.0 <= self.drop < 1.0, f"{key}.drop", self.drop, "a number in [0, 1)")
        _check(self.rank >= 0, f"{key}.rank", self.rank, "0 (lora.rank) or an integer >= 1")


@dataclass
class DevicesConfig:
    """Device classes of the clients and the reference step cost of the virtual clock (docs/devices.md)."""

    step_cost_s: float = field(
        default=STEP_COST_S,
        metadata={"help": "seconds of one local step at speed 1 (benchmarks/step_cost.py); a constant"},
    )
    classes: list[DeviceClass] = field(
        default_factory=list,
        metadata={"help": "device classes ([[devices.classes]]); empty = no virtual clock"},
    )
    csv: str = field(
        default="",
        metadata={"help": "a CSV file of device classes (one row per class, columns named like the keys)"},
    )

    def __post_init__(self) -> None:
        _check(self.step_cost_s > 0, "devices.step_cost_s", self.step_cost_s, "a number of seconds > 0")
        if self.csv and self.classes:
            raise ConfigError("devices: set devices.csv or [[devices.classes]], not both")
        if self.csv:
            self.classes, self.csv = read_csv(Path(self.csv)), ""
        if not self.classes:
            return
        names = [c.name for c in self.classes]
        _check(len(set(names)) == len(names), "devices.classes", names, "distinct class names")
        total = math.fsum(c.share for c in self.classes)
        _check(abs(total - 1.0) <= SHARE_TOLERANCE, "devices.classes shares", round(total, 9), "a sum of 1")

    @property
    def enabled(self) -> bool:
        """Whether clients have device classes (the virtual clock runs)."""
        return bool(self.classes)


@dataclass
class ScheduleConfig:
    """How the server waits for clients on the virtual clock: synchronous rounds or FedBuff."""

    mode: str = field(default="sync", metadata={"help": "sync (rounds) or fedbuff (asynchronous, buffered)"})
    deadline_s: float = field(
        default=0.0,
        metadata={"help": "sync: virtual seconds a round waits; later clients are dropped; 0 = the slowest"},
    )
    over_select: float = field(
        default=0.0,
        metadata={"help": "sync: sample this share more clients and keep the first to arrive (0.3 = 30%)"},
    )
    concurrency: int = field(
        default=0, metadata={"help": "fedbuff: clients training at once; 0 = federation's clients per round"}
    )
    buffer: int = field(
        default=DEFAULT_BUFFER, metadata={"help": "fedbuff: updates per server step (the paper's K)"}
    )
    server_lr: float = field(default=1.0, metadata={"help": "fedbuff: the server's step size eta_g"})

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "schedule.mode", self.mode, f"one of {', '.join(MODES)}")
        _check(self.deadline_s >= 0, "schedule.deadline_s", self.deadline_s, "0 (none) or seconds > 0")
        _check(self.over_select >= 0, "schedule.over_select", self.over_select, "a share >= 0, e.g. 0.3")
        _check(self.concurrency >= 0, "schedule.concurrency", self.concurrency, "0 or an integer >= 1")
        _check(self.buffer >= 1, "schedule.buffer", self.buffer, "an integer >= 1")
        _check(self.server_lr > 0, "schedule.server_lr", self.server_lr, "a number > 0")


def check_devices(
    devices: DevicesConfig,
    schedule: ScheduleConfig,
    *,
    lora_rank: int,
    local_epochs: float,
    privacy_mode: str,
    clients_per_round: int,
    num_clients: int,
) -> None:
    """Checks that involve devices, the schedule and other sections (one-line ConfigErrors)."""
    if not devices.enabled:
        needs = [k for k, on in _schedule_keys(schedule).items() if on]
        if needs:
            raise ConfigError(f"{needs[0]} needs device classes ([[devices.classes]] or devices.csv)")
        return
    if local_epochs > 0:
        raise ConfigError(
            f"train.local_epochs = {local_epochs:g} with [devices]: the virtual clock needs each client's "
            "steps before it trains; set train.local_epochs = 0 and train.local_steps"
        )
    for c in devices.classes:
        _check(
            c.rank <= lora_rank, f"devices.classes[{c.name}].rank", c.rank, f"at most lora.rank ({lora_rank})"
        )
    if schedule.mode == "fedbuff":
        _check_fedbuff(schedule, privacy_mode, clients_per_round, num_clients)
    elif schedule.concurrency or schedule.buffer != DEFAULT_BUFFER or schedule.server_lr != 1.0:
        raise ConfigError(
            "schedule.concurrency, buffer and server_lr apply to schedule.mode = 'fedbuff' only"
        )


def _schedule_keys(schedule: ScheduleConfig) -> dict[str, bool]:
    """The schedule settings that need the virtual clock, and whether each is set."""
    return {
        "schedule.mode = 'fedbuff'": schedule.mode == "fedbuff",
        "schedule.deadline_s": schedule.deadline_s > 0,
        "schedule.over_select": schedule.over_select > 0,
    }


def _check_fedbuff(
    schedule: ScheduleConfig, privacy_mode: str, clients_per_round: int, num_clients: int
) -> None:
    if schedule.deadline_s > 0 or schedule.over_select > 0:
        raise ConfigError("schedule.deadline_s and over_select apply to schedule.mode = 'sync' only")
    if privacy_mode != "none":
        raise ConfigError(
            f"schedule.mode = 'fedbuff' runs without DP; privacy.mode = {privacy_mode!r} is not supported"
        )
    k = concurrency(schedule, clients_per_round)
    _check(k <= num_clients, "schedule.concurrency", k, f"at most federation.num_clients ({num_clients})")
    _check(schedule.buffer <= k, "schedule.buffer", schedule.buffer, f"at most the concurrency ({k})")


def concurrency(schedule: ScheduleConfig, clients_per_round: int) -> int:
    """FedBuff's K: clients training at once (``schedule.concurrency``, or the clients per round)."""
    return schedule.concurrency or clients_per_round


def read_csv(path: Path) -> list[DeviceClass]:
    """Device classes from a CSV file whose header names :class:`DeviceClass` fields (name and share
    required, the others default); ConfigError naming the file, row and column on a bad value."""
    if not path.is_file():
        raise ConfigError(f"devices.csv = '{path}' not found; give a CSV file with one device class per row")
    fields = {f.name: f.type for f in dataclasses.fields(DeviceClass)}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        unknown = [h for h in header if h not in fields]
        if unknown or not {"name", "share"} <= set(header):
            raise ConfigError(
                f"devices.csv '{path}': columns {header} are invalid: expected name, share and any of "
                f"{', '.join(f for f in fields if f not in ('name', 'share'))}"
            )
        return [
            _row_class(path, i, {k.strip(): v for k, v in row.items()}) for i, row in enumerate(reader, 2)
        ]


def _row_class(path: Path, line: int, row: dict[str, str]) -> DeviceClass:
    """One CSV row as a device class (empty cells keep their defaults)."""
    kinds = {f.name: f.type for f in dataclasses.fields(DeviceClass)}
    values: dict[str, Any] = {}
    for key, text in row.items():
        text = (text or "").strip()
        if not text:
            continue
        kind = kinds[key]
        try:
            values[key] = int(text) if kind == "int" else float(text) if kind == "float" else text
        except ValueError:
            raise ConfigError(f"devices.csv '{path}' line {line}: {key} = {text!r} is not a {kind}") from None
    return DeviceClass(**values)


@functools.lru_cache(maxsize=8)
def _classes(shares: tuple[float, ...], seed: int, num_clients: int) -> tuple[int, ...]:
    """Class index of every partition: exact shares (largest remainders), partitions shuffled by seed."""
    exact = [s * num_clients for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    labels = [i for i, n in enumerate(counts) for _ in range(n)]
    partitions = list(range(num_clients))
    random.Random(f"fedlora-devices/{seed}").shuffle(partitions)
    found = [0] * num_clients
    for pid, label in zip(partitions, labels, strict=True):
        found[pid] = label
    return tuple(found)


def class_of(devices: DevicesConfig, seed: int, num_clients: int, partition_id: int) -> DeviceClass:
    """The device class of client ``partition_id`` (a function of the seed alone)."""
    shares = tuple(c.share for c in devices.classes)
    return devices.classes[_classes(shares, seed, num_clients)[partition_id]]


def class_counts(devices: DevicesConfig, seed: int, num_clients: int) -> dict[str, int]:
    """Clients per class name."""
    labels = _classes(tuple(c.share for c in devices.classes), seed, num_clients)
    return {c.name: labels.count(i) for i, c in enumerate(devices.classes)}


def draw(seed: int, what: str, server_round: int, partition_id: int) -> float:
    """A uniform number in [0, 1) for (seed, what, round, client): the same in every process and run."""
    return random.Random(f"fedlora-clock/{seed}/{what}/{server_round}/{partition_id}").random()


def available(cls: DeviceClass, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether a client of class ``cls`` can be sampled in ``server_round`` (its pattern and probability)."""
    if cls.pattern:
        offset = int(draw(seed, "offset", 0, partition_id) * len(cls.pattern))
        if cls.pattern[(server_round - 1 + offset) % len(cls.pattern)] != "1":
            return False
    return cls.availability >= 1.0 or draw(seed, "available", server_round, partition_id) < cls.availability
