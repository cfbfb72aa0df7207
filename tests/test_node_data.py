"""Deployed clients read only their own data: a SuperNode's ``data-path`` is the one file its ClientApp
reads (never ``data.source``, which need not exist on the node), checked here without processes. The
live check (three SuperNodes, each given a distinct small file, traced with strace) is in
test_deploy.py, on the one deployment that file starts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients import runtime
from fedlora.cli import app
from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.run.deploy import DeployError, LocalDeployment, check_data_paths
from tests.helpers import node_files

ROOT = Path(__file__).resolve().parents[1]
TOPIC_NAMES = sorted(TOPICS)
NODES = 3


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
