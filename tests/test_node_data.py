"""Deployed clients read only their own data: a SuperNode's ``data-path`` is the one file its ClientApp
reads (never ``data.source``, which need not exist on the node); three SuperNodes each given a distinct
small file train a federation whose server evaluates on its own test file."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from clients import runtime
from fedlora.cli import app
from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.sources import Origin, read_table, write_table
from fedlora.core.tweets import TOPICS, corpus_path, topics_frame
from fedlora.run.deploy import DeployError, LocalDeployment, check_data_paths

ROOT = Path(__file__).resolve().parents[1]
TOPIC_NAMES = sorted(TOPICS)
NODES = 3


def node_files(root: Path, frame: pd.DataFrame) -> list[Path]:
    """One file per node (users 0-1, 2-3, 4-5), in three formats."""
    names = ["node-0.csv", "node-1.parquet", "node-2.jsonl"]
    return [
        write_table(frame[frame["user"].isin([f"user-{2 * i}", f"user-{2 * i + 1}"])], root / name)
        for i, name in enumerate(names)
    ]


def experiment_text(source: Path, labels: list[str]) -> str:
    cfg = ExperimentConfig.from_toml(
        f'[data]\nsource = "{source}"\nlabel = "topic"\nlabels = {json.dumps(labels)}\npartitioner = "iid"\n'
        "test_size = 20\nmax_length = 32\n[federation]\nnum_clients = 3\n"
    )
    return cfg.to_toml()


def test_a_node_trains_on_its_file_and_never_reads_data_source(tmp_path: Path) -> None:
    frame = topics_frame(per_topic=20, users=6, seed=0)
    files = node_files(tmp_path, frame)
    text = experiment_text(tmp_path / "nowhere.csv", TOPIC_NAMES)  # no such file: reading it would fail
    for i, path in enumerate(files):
        data = runtime.data_for(text, i, str(path))
        size = int(frame["user"].isin([f"user-{2 * i}", f"user-{2 * i + 1}"]).sum())
        assert len(data.train) + len(data.val) == size
        assert len(data.val) == int(size * 0.1 + 1e-9)


def test_a_node_with_labels_outside_the_federation_fails_with_one_line(tmp_path: Path) -> None:
    frame = topics_frame(per_topic=10, users=2, seed=0)
    path = write_table(frame, tmp_path / "mine.csv")
    text = experiment_text(tmp_path / "nowhere.csv", ["airline", "apple"])
    with pytest.raises(ConfigError) as info:
        runtime.data_for(text, 0, str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"node config data-path '{path}' has labels outside the label set (airline, apple): "
    )
    assert message.endswith("remove those rows or add the classes to data.labels")


def test_deploy_data_paths_are_one_existing_file_per_node(tmp_path: Path) -> None:
    files = node_files(tmp_path, topics_frame(per_topic=10, users=6, seed=0))
    assert check_data_paths(files, 3) == tuple(p.resolve() for p in files)
    with pytest.raises(DeployError, match="2 --data files for 3 SuperNodes; give one file per node"):
        check_data_paths(files[:2], 3)
    with pytest.raises(DeployError, match="no such file or directory"):
        check_data_paths([*files[:2], tmp_path / "gone.csv"], 3)
    with pytest.raises(DeployError, match="names the same file twice"):
        check_data_paths([files[0], files[0], files[1]], 3)
    dep = LocalDeployment(tmp_path / "d", 3, data_paths=tuple(files))
    assert dep.node_config(1) == f'partition-id=1 num-partitions=3 data-path="{files[1].resolve()}"'
    assert LocalDeployment(tmp_path / "e", 2).node_config(0) == "partition-id=0 num-partitions=2"


class TracedDeployment(LocalDeployment):
    """A deployment whose SuperNodes run under strace: ``opens(i)`` is every path that SuperNode ``i``
    and the ClientApp processes it starts tried to open (seccomp-bpf keeps the slowdown small)."""

    def supernode_args(self, i: int, port: int, **kwargs: Any) -> list[str]:
        trace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat,openat2"]
        return [
            *trace,
            "-o",
            str(self.directory / f"opens-{i}.txt"),
            *super().supernode_args(i, port, **kwargs),
        ]

    def stop(self) -> list[int]:
        """SIGTERM the SuperNodes under strace first (strace does not pass a SIGTERM on to them)."""
        for proc in self.processes.values():
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children():
                    child.terminate()
        return super().stop()

    def opens(self, i: int) -> str:
        return (self.directory / f"opens-{i}.txt").read_text(errors="replace")


@dataclass(frozen=True)
class OwnData:
    deployment: TracedDeployment
    files: list[Path]
    server: Path
    corpus: Path


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnData]:
    if shutil.which("strace") is None:
        pytest.skip("needs strace (.ci/run installs it)")
    root = tmp_path_factory.mktemp("own-data-deploy")
    frame = topics_frame(per_topic=30, users=6, seed=0)
    files = [p.resolve() for p in node_files(root, frame)]
    server = write_table(
        topics_frame(per_topic=12, users=1, seed=1), root / "server" / "server.csv"
    ).resolve()
    with TracedDeployment(root / "deploy", NODES, app_dir=ROOT, data_paths=tuple(files)) as dep:
        yield OwnData(dep, files, server, corpus_path())


@pytest.fixture(scope="module")
def federation(own_data: OwnData) -> Path:
    """One round on the three nodes, every client evaluated too; returns the run directory."""
    deployment, server = own_data.deployment, own_data.server
    out = deployment.directory / "runs"
    job = [
        f"federation.num_clients={NODES}",
        "federation.rounds=1",
        "federation.fraction_evaluate=1.0",
        "train.local_steps=1",
        f"data.source={server}",  # the coordinator's labelled sample: the label set
        f"data.test_path={server}",  # and its own test file; no node reads either
        "data.label=topic",
        "data.partitioner=iid",
        "data.max_length=32",
    ]
    proc = deployment.flwr(
        "run", ".", deployment.federation, "--stream",
        "--run-config", f"overrides='{';'.join(job)}' out-dir='{out}'",
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = list(out.iterdir())
    return run


@pytest.mark.e2e
def test_three_nodes_each_with_its_own_file_train_a_federation(own_data: OwnData, federation: Path) -> None:
    rows = [json.loads(line) for line in (federation / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["num_clients"] == NODES and rows[0]["num_failed"] == 0
    assert 0.0 <= rows[0]["eval_macro_f1"] <= 1.0
    summary = json.loads((federation / "summary.json").read_text())
    assert summary["labels"] == TOPIC_NAMES
    assert summary["majority_accuracy"] == pytest.approx(0.2)  # the server's own test file: 12 per topic
    for i in range(NODES):
        log = (own_data.deployment.logs / f"supernode-{i}.log").read_text()
        assert "Start `flwr-clientapp` process" in log


@pytest.mark.e2e
def test_each_client_reports_the_counts_and_labels_of_its_own_file(
    own_data: OwnData, federation: Path
) -> None:
    """clients.jsonl: a node's train and validation examples together are its file's rows, and their
    label histograms add up to the file's."""
    replies = [json.loads(line) for line in (federation / "clients.jsonl").read_text().splitlines()]
    for i, path in enumerate(own_data.files):
        mine = {r["phase"]: r for r in replies if r["partition_id"] == i and r["status"] == "ok"}
        assert set(mine) == {"train", "evaluate"}, replies
        topics = read_table(Origin("data-path", str(path))).to_pandas()["topic"]
        assert mine["train"]["num_examples"] + mine["evaluate"]["num_examples"] == len(topics)
        train, val = mine["train"]["label_counts"], mine["evaluate"]["label_counts"]
        assert [a + b for a, b in zip(train, val, strict=True)] == [
            int((topics == name).sum()) for name in TOPIC_NAMES
        ]


@pytest.mark.e2e
def test_no_supernode_opens_the_corpus_or_another_nodes_file(own_data: OwnData, federation: Path) -> None:
    """What the kernel saw (strace) while the nodes trained and evaluated: each opened its own file,
    and none opened another node's file, the server's file or the packaged corpus."""
    for i in range(NODES):
        opened = own_data.deployment.opens(i)
        assert str(own_data.files[i]) in opened  # the trace does see the node read its file
        others = [p for j, p in enumerate(own_data.files) if j != i] + [own_data.server, own_data.corpus]
        assert [str(p) for p in others if str(p) in opened] == []
        assert own_data.corpus.name not in opened


def test_deploy_local_checks_each_node_file_before_any_process_starts(tmp_path: Path) -> None:
    frame = topics_frame(per_topic=12, users=3, seed=0)
    server = write_table(frame, tmp_path / "server.csv")
    good = [write_table(frame, tmp_path / f"node-{i}.csv") for i in range(2)]
    odd = write_table(frame.assign(topic="weather"), tmp_path / "odd.csv")
    experiment = tmp_path / "exp.toml"
    experiment.write_text(
        f'[data]\nsource = "{server}"\nlabel = "topic"\npartitioner = "iid"\ntest_size = 10\n'
        "[federation]\nmin_clients = 2\n"
    )
    args = ["deploy", "local", "--dir", str(tmp_path / "dep"), "--experiment", str(experiment)]
    for path in (*good, odd):
        args += ["--data", str(path)]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --data '{odd}' has labels outside the label set (airline, apple, ")
    assert ": 'weather'; this node's labels must be among the federation's" in line
    assert line.endswith("remove those rows or add the classes to data.labels")
    assert not (tmp_path / "dep").exists()  # no certificate, no SuperLink, no SuperNode
    print(f"refused in {time.perf_counter() - start:.2f} s")  # timing belongs in benchmarks
