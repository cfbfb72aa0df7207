"""What an experiment's data split looks like (``fedlora data``): per client its number of examples and
label histogram, the global test set with its majority-class baseline, and a PNG of label shares per
client drawn by flwr-datasets' ``plot_label_distributions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt
from flwr_datasets.partitioner import Partitioner
from flwr_datasets.visualization import plot_label_distributions

from fedlora.core.config import DataConfig
from fedlora.core.data.sources import LABEL, partition_column
from fedlora.core.data.splits import FederatedSplits, label_counts, majority_accuracy


@dataclass(frozen=True)
class ClientRow:
    """One client of a split."""

    client: int
    train: int
    val: int
    counts: list[int]
    """Examples per class (train and val together), in label-id order."""
    holds: str
    """The values of ``data.partition_by`` it holds (natural splits), else empty."""


def client_rows(splits: FederatedSplits, cfg: DataConfig) -> list[ClientRow]:
    """One row per client: sizes, label histogram and the partition values it holds."""
    rows = []
    for cid in range(splits.num_clients):
        train, val = splits.client_train(cid), splits.client_val(cid)
        counts = [a + b for a, b in zip(label_counts(train), label_counts(val), strict=True)]
        rows.append(ClientRow(cid, len(train), len(val), counts, _holds(train, val, cfg)))
    return rows


def _holds(train: datasets.Dataset, val: datasets.Dataset, cfg: DataConfig) -> str:
    if cfg.partitioner != "natural":
        return ""
    column = partition_column(cfg)
    values = {str(v) for part in (train, val) for v in part.with_format("arrow")[:][column].to_pylist()}
    return ", ".join(sorted(values))


def split_table(splits: FederatedSplits, cfg: DataConfig) -> str:
    """The split as plain text: a header of class names, one line per client, the test set last."""
    names = list(splits.test.features[LABEL].names)
    width = max(8, *(len(n) for n in names))
    head = f"{'client':>6} {'train':>7} {'val':>6}  " + " ".join(f"{n:>{width}}" for n in names)
    lines = [head + ("  holds" if cfg.partitioner == "natural" else "")]
    for row in client_rows(splits, cfg):
        counts = " ".join(f"{c:>{width}}" for c in row.counts)
        holds = f"  {row.holds}" if row.holds else ""
        lines.append(f"{row.client:>6} {row.train:>7} {row.val:>6}  {counts}{holds}")
    test = splits.test
    counts = " ".join(f"{c:>{width}}" for c in label_counts(test))
    majority = 100 * majority_accuracy(test)
    lines.append(f"{'test':>6} {len(test):>7} {'':>6}  {counts}  majority class {majority:.1f}%")
    return "\n".join(lines)


class _Fixed(Partitioner):
    """flwr-datasets' Partitioner over partitions already made (what its plotting functions read)."""

    def __init__(self, parts: list[datasets.Dataset]) -> None:
        super().__init__()
        self._parts = parts
        self.dataset = datasets.concatenate_datasets(parts)

    @property
    def num_partitions(self) -> int:
        return len(self._parts)

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self._parts[partition_id]


def plot_label_shares(splits: FederatedSplits, path: Path, title: str) -> Path:
    """A bar per client (train and val together) of its label shares in percent, to a PNG at ``path``."""
    parts = [
        datasets.concatenate_datasets([splits.client_train(cid), splits.client_val(cid)])
        for cid in range(splits.num_clients)
    ]
    height = max(3.0, min(0.3 * len(parts) + 1.5, 30.0))
    figure, _, _ = plot_label_distributions(
        _Fixed(parts),
        label_name=LABEL,
        plot_type="bar",
        size_unit="percent",
        partition_id_axis="y",
        figsize=(8.0, height),
        title=title,
        legend=True,
        legend_title="label",
        verbose_labels=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
