"""Deployment: the docker-compose topology as local processes (TLS, authenticated SuperNodes).

One module-scoped topology (a SuperLink and three SuperNodes on loopback, each node given its own data
file and traced with strace) runs a 2-round FFA-LoRA job submitted with ``flwr run``: it completes,
each client reports its own file's counts and labels, and no node opens another node's file, the
server's file or the packaged corpus. Intruders (an unregistered key, a client without a key, a
plaintext client) must be refused; the last test stops it and checks that every PID it started is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from fedlora.core.data.sources import Origin, read_table, write_table
from fedlora.core.data.tweets import TOPICS, corpus_path, topics_frame
from fedlora.run.credentials import make_credentials
from fedlora.run.deploy import LocalDeployment, write_flwr_home
from fedlora.run.processes import free_ports, running
from tests.helpers import node_files

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
TOPIC_NAMES = sorted(TOPICS)


# -- credentials and configuration (no processes) ------------------------------------------------
def test_credentials_chain_and_key_formats(tmp_path: Path) -> None:
    creds = make_credentials(tmp_path, 2, hosts=("superlink", "127.0.0.1"))
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_key = load_pem_private_key(creds.server_key.read_bytes(), None)
    assert server_key.public_key() == server.public_key()
    publics = set()
    for i in range(2):
        key = load_ssh_private_key(creds.node_key(i).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert creds.node_public_key(i).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert oct(creds.node_key(i).stat().st_mode & 0o777) == "0o600"
        publics.add(creds.node_public_key(i).read_text())
    assert len(publics) == 2  # every node its own key


def test_flwr_home_is_read_by_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    write_flwr_home(tmp_path, "fed", "127.0.0.1:1234", tmp_path / "ca.crt")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    conn = read_superlink_connection("fed")
    assert conn.address == "127.0.0.1:1234"
    assert conn.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert read_superlink_connection(None).name == "fed"  # the default connection


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_log_startup_writes_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clients import runtime

    sent = time.time() - 1.5
    message = SimpleNamespace(
        content={"config": {"server-round": 2}}, metadata=SimpleNamespace(created_at=sent)
    )
    monkeypatch.delenv(runtime.STARTUP_LOG, raising=False)
    runtime.log_startup(message)  # type: ignore[arg-type]  # unset: nothing written anywhere
    log = tmp_path / "startup.jsonl"
    monkeypatch.setenv(runtime.STARTUP_LOG, str(log))
    runtime.log_startup(message)  # type: ignore[arg-type]
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["round"] == 2 and row["pid"] == os.getpid()
    assert 1.5 <= row["startup_s"] < 60 and row["cpu_s"] > 0
    assert row["fresh"] is False  # this process had seen a message before


def _private_keys(directory: Path) -> list[str]:
    """Every file under ``directory`` that holds a private key of any format (PEM or OpenSSH)."""
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for load in (load_pem_private_key, load_ssh_private_key):
            try:
                load(data, None)
            except (ValueError, TypeError):
                continue
            found.append(str(path.relative_to(directory)))
            break
    return found


def _certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), *args], capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_operator_certs_script_makes_no_node_key(tmp_path: Path) -> None:
    proc = _certs(str(tmp_path), "coordinator.example.org")
    assert proc.returncode == 0, proc.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName))
    assert {"superlink", "localhost", "coordinator.example.org"} <= names
    assert load_pem_private_key((tmp_path / "superlink.key").read_bytes(), None).public_key() == (
        server.public_key()
    )
    # The operator's side holds its own two private keys and no SuperNode's.
    assert _private_keys(tmp_path) == ["ca.key", "superlink.key"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ca.crt", "ca.key", "superlink.crt", "superlink.key"]
    rerun = _certs(str(tmp_path))
    assert rerun.returncode != 0 and "already" in rerun.stderr  # never overwrites existing keys


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_certs_script_refuses_the_old_node_count_and_names_the_demo_mode(tmp_path: Path) -> None:
    proc = _certs(str(tmp_path / "c"), "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: '3' is not a host name; node keys are no longer made here (each data owner runs "
        "'fedlora deploy keygen'); for a one-machine rehearsal use: "
        f"deploy/certs.sh --local-demo 3 {tmp_path / 'c'}"
    ]
    assert not (tmp_path / "c").exists()  # refused before any work
    bad = _certs("--local-demo", "zero", str(tmp_path / "d"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: --local-demo needs a positive number")


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs ssh-keygen")
def test_certs_script_local_demo_makes_node_keys_flower_reads(tmp_path: Path) -> None:
    proc = _certs("--local-demo", "2", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "never do this for a real federation" in proc.stdout
    for i in range(2):
        key = load_ssh_private_key((tmp_path / "nodes" / f"supernode-{i}").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert oct((tmp_path / "nodes" / f"supernode-{i}").stat().st_mode & 0o777) == "0o600"


def test_keygen_prints_only_the_public_key_and_keeps_the_private_one(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "owner" / "supernode"
    proc = run_cli("deploy", "keygen", str(path), "--comment", "owner-0", timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()  # one line on stdout: the public key, nothing else
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(" owner-0")
    assert "PRIVATE" not in proc.stdout + proc.stderr
    key = load_ssh_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = load_ssh_public_key(line.encode())
    assert public == key.public_key()  # the printed key is the one the node authenticates with
    assert (tmp_path / "owner" / "supernode.pub").read_text().strip() == line
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = run_cli("deploy", "keygen", str(path), timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {path} already exists; remove it or choose another path (never overwritten)"
    ]


def test_compose_mounts_each_node_only_its_own_key_and_data() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    nodes = sorted(name for name in services if name.startswith("supernode-"))
    assert nodes == [f"supernode-{i}" for i in range(NODES)]
    for name in nodes:
        sources = [v.split(":/")[0] for v in services[name]["volumes"]]
        keys = [s for s in sources if "KEYS" in s]
        data = [s for s in sources if "FEDLORA_DATA" in s]
        assert keys == [f"${{FEDLORA_KEYS:-./deploy/keys}}/{name}"]
        assert data == [f"${{FEDLORA_DATA:-./deploy/data}}/{name}"]
        others = [n for n in nodes if n != name]
        assert not [s for s in sources for other in others if other in s]  # nothing of another node
        assert not [s for s in sources if "superlink.key" in s or "ca.key" in s]
        (config,) = [a for a in services[name]["command"] if a.startswith("--node-config=")]
        assert config.endswith(' data-path="${FEDLORA_NODE_DATA-/own/data.csv}"')  # its own file in /own
    superlink = [v.split(":/")[0] for v in services["superlink"]["volumes"]]
    assert not [s for s in superlink if "KEYS" in s or "supernode" in s]  # no node key at the operator


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Compose v1 not installed")
def test_compose_file_is_valid() -> None:
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Compose v1 not installed")
def test_gpu_override_reserves_a_gpu_per_node_and_keeps_each_nodes_mounts() -> None:
    files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.gpu.yml")]
    proc = subprocess.run(["docker-compose", *files, "config"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert "deploy" not in services["superlink"]  # the SuperLink stays on the CPU image
    for i in range(NODES):
        node = services[f"supernode-{i}"]
        (device,) = node["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
        assert node["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
        mounts = sorted(v.split(":")[1] for v in node["volumes"])
        assert mounts == ["/certs/ca.crt", "/data", "/keys/supernode", "/own"], mounts
        assert any(v.endswith(f"supernode-{i}:/keys/supernode:ro") for v in node["volumes"])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"PYTHON": "/nonexistent/python"},
            "deploy-ci: error: no Python at /nonexistent/python; run 'make setup'",
        ),
        (
            {"FEDLORA_DEPLOY_ROUNDS": "two"},
            "deploy-ci: error: FEDLORA_DEPLOY_ROUNDS must be a positive integer",
        ),
        (
            {"FEDLORA_CI_PROJECT": "Bad Name"},
            "deploy-ci: error: FEDLORA_CI_PROJECT 'Bad Name' must be lowercase",
        ),
        (
            {"FEDLORA_DEPLOY_MARGIN": "ten"},
            "deploy-ci: error: FEDLORA_DEPLOY_MARGIN must be a number between 0 and 1, got 'ten'",
        ),
    ],
)
def test_deploy_ci_script_rejects_bad_input_before_any_work(env: dict[str, str], expected: str) -> None:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "ci.sh")], capture_output=True, text=True, env=environment, timeout=120
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(expected), line
    assert proc.stdout == ""  # nothing installed, built or started


def _walkthrough(*args: str, doc: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    if doc is not None:
        env["FEDLORA_WALKTHROUGH_DOC"] = str(doc)
    script = str(ROOT / "deploy" / "walkthrough.sh")
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, timeout=120)


def test_walkthrough_runs_the_docs_podman_steps_for_each_machine_as_printed() -> None:
    """deploy/walkthrough.sh --list: the blocks it runs, per machine, straight from docs/deploy.md."""
    proc = _walkthrough("--list")
    assert proc.returncode == 0, proc.stderr
    machines = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("### ")]
    assert machines[:3] == ["operator", "owner-a", "owner-b"]  # CONTAINERS_CONF on every machine
    text = proc.stdout
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for command in (
        "podman-compose up -d superlink",
        "flwr supernode register owner-a.pub fedlora",
        '--filter label=com.docker.compose.service=superlink)":/data/runs ./runs',
    ):
        assert command in text and command in doc
    assert "podman-compose up -d supernode-0" in text and "podman-compose up -d supernode-1" in text
    assert "fedlora deploy keygen /keys/supernode-1 --comment owner-b" in text  # owner B's own key
    assert "operator.example.org" not in text  # the host's address and port instead
    assert "docker compose" not in text and "docker build" not in text  # engine=docker blocks are skipped


def test_walkthrough_fails_when_the_doc_loses_a_step(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    marked = "```bash walkthrough=operator\nmkdir -p ~/.flwr-fedlora"
    assert marked in doc
    broken = tmp_path / "deploy.md"
    broken.write_text(doc.replace(marked, "```bash\nmkdir -p ~/.flwr-fedlora"))  # step 6 unmarked
    proc = _walkthrough("--list", doc=broken)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"walkthrough: error: {broken} has no walkthrough=operator block that runs "
        "'flwr supernode register owner-a.pub' (a step is missing or unmarked)"
    )


@pytest.mark.e2e
def test_walkthrough_fails_on_a_doc_command_that_does_not_work_as_printed(tmp_path: Path) -> None:
    """The walkthrough runs the doc's commands for real: a typo in one (here the operator's `make
    base-image` step) fails it with the block named, exit 1, and nothing of its projects left behind.
    Needs podman (skips itself where podman cannot run, as the walkthrough does)."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    step = "```bash walkthrough=operator engine=podman\nmake base-image wheelhouse"
    assert step in doc
    broken = tmp_path / "deploy.md"
    broken.write_text(doc.replace(step, step.replace("make base-image", "make base-imag")))
    env = {**os.environ, "PYTHON": sys.executable, "FEDLORA_WALKTHROUGH_DOC": str(broken)}
    script = str(ROOT / "deploy" / "walkthrough.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 0 and "walkthrough: skipped:" in proc.stdout:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "make: *** No rule to make target 'base-imag'" in proc.stdout, proc.stdout[-2000:]
    assert re.search(
        r"walkthrough: error: operator: a command of block \d+ failed \(see above\); the doc's step does "
        r"not work as printed",
        proc.stderr,
    ), proc.stderr
    assert "nothing left: no container, volume or network of fedlora-walk-*" in proc.stdout


# -- the live topology ---------------------------------------------------------------------------
class TracedDeployment(LocalDeployment):
    """A deployment whose SuperNodes run under strace (where it is installed): ``opens(i)`` is every
    path that SuperNode ``i`` and the ClientApp processes it starts tried to open (seccomp-bpf keeps
    the slowdown small). ``plain_args`` starts a SuperNode without the trace (the intruders)."""

    traced = shutil.which("strace") is not None

    def supernode_args(self, i: int, port: int, **kwargs: Any) -> list[str]:
        if not self.traced:
            return super().supernode_args(i, port, **kwargs)
        trace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat,openat2"]
        return [
            *trace,
            "-o",
            str(self.directory / f"opens-{i}.txt"),
            *super().supernode_args(i, port, **kwargs),
        ]

    def plain_args(self, i: int, port: int, **kwargs: Any) -> list[str]:
        return super().supernode_args(i, port, **kwargs)

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
    """The node files (one per SuperNode), the coordinator's file (label set and test set), the corpus."""

    files: list[Path]
    server: Path
    corpus: Path


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> OwnData:
    root = tmp_path_factory.mktemp("own-data")
    files = [p.resolve() for p in node_files(root, topics_frame(per_topic=30, users=6, seed=0))]
    server = write_table(topics_frame(per_topic=12, users=1, seed=1), root / "server" / "server.csv")
    return OwnData(files, server.resolve(), corpus_path())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, own_data: OwnData) -> Iterator[TracedDeployment]:
    directory = tmp_path_factory.mktemp("deploy")
    with TracedDeployment(directory, NODES, app_dir=ROOT, data_paths=tuple(own_data.files)) as dep:
        yield dep


@pytest.fixture(scope="module")
def finished_run(deployment: TracedDeployment, own_data: OwnData) -> Path:
    """Two FFA-LoRA rounds on the three nodes, every client evaluated in the second; returns the run
    directory. (Every message is a new ClientApp process that imports torch and loads the model: an
    evaluation in round 1 too would cost three more.)"""
    out = deployment.directory / "runs"
    job = [
        f"federation.num_clients={NODES}",
        "federation.rounds=2",
        "federation.fraction_evaluate=1.0",
        "federation.evaluate_every=2",
        "train.local_steps=2",
        'strategy.name="ffa-lora"',
        f"data.source={own_data.server}",  # the coordinator's labelled sample: the label set
        f"data.test_path={own_data.server}",  # and its own test file; no node reads either
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
    runs = list(out.iterdir())
    assert len(runs) == 1, proc.stdout[-3000:]
    return runs[0]


@pytest.fixture(scope="module")
def intruders(deployment: TracedDeployment) -> dict[str, tuple[int, str]]:
    """Start, side by side, four SuperNodes the SuperLink must refuse; their exit codes and logs, and
    what the SuperLink logged meanwhile (under ``"superlink"``).

    ``stranger``: TLS and a key that was never registered; ``anonymous``: TLS, no key;
    ``plaintext``: no TLS (and no key: Flower itself refuses a key over plaintext); ``wrong-ca``: its own
    registered key, but another CA's certificate to check the SuperLink with.
    """
    stranger = make_credentials(deployment.directory / "stranger", 1)
    ports = free_ports(4)
    args = {
        "stranger": deployment.plain_args(0, ports[0], key=stranger.node_key(0), trainer=False),
        "anonymous": deployment.plain_args(0, ports[1], auth=False, trainer=False),
        "plaintext": deployment.plain_args(0, ports[2], tls=False, auth=False, trainer=False),
        "wrong-ca": deployment.plain_args(0, ports[3], trainer=False),
    }
    ca = args["wrong-ca"].index("--root-certificates") + 1
    args["wrong-ca"][ca] = str(stranger.ca_cert)
    superlink_log = deployment.logs / "superlink.log"
    mark = superlink_log.stat().st_size
    procs = {name: deployment.spawn(name, [*a, "--max-retries", "2"]) for name, a in args.items()}
    deadline = time.monotonic() + 90
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} was not refused within 90 s")
    found = {name: (p.returncode, (deployment.logs / f"{name}.log").read_text()) for name, p in procs.items()}
    time.sleep(1)  # the SuperLink's log lines for the last refusal
    return {**found, "superlink": (0, superlink_log.read_text()[mark:])}


@pytest.mark.e2e
def test_ffa_lora_job_completes_on_three_authenticated_nodes(
    deployment: TracedDeployment, finished_run: Path
) -> None:
    rows = [json.loads(line) for line in (finished_run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(
        r["strategy"] == "ffa-lora" and r["num_clients"] == NODES and r["num_failed"] == 0 for r in rows
    )
    # The same arrays (for FFA-LoRA: B and the head) travel each way, every round.
    assert rows[0]["uplink_bytes"] == rows[1]["uplink_bytes"] > 0
    assert rows[0].get("eval_accuracy") is None and 0.0 <= rows[1]["eval_macro_f1"] <= 1.0
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["final_eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert summary["labels"] == TOPIC_NAMES
    assert summary["majority_accuracy"] == pytest.approx(0.2)  # the server's own test file: 12 per topic
    assert (finished_run / "adapter" / "adapter_model.safetensors").is_file()
    for i in range(NODES):  # every SuperNode started ClientApp processes, which handed over to its trainer
        log = (deployment.logs / f"supernode-{i}.log").read_text()
        assert "Start `flwr-clientapp` process" in log and "fedlora: warm trainer ready at " in log
        assert log.count("fedlora: warm trainer: train message of run ") == 2, log[-3000:]
        assert log.count("fedlora: warm trainer: evaluate message of run ") == 1, log[-3000:]


@pytest.mark.e2e
def test_secure_aggregation_runs_on_the_deployed_nodes(
    deployment: TracedDeployment, own_data: OwnData
) -> None:
    """One FedIT round under SecAgg+ on the three nodes: a fresh ClientApp process per stage message, the
    secrets kept in each node's Context between them; the sum is unmasked with all three vectors."""
    out = deployment.directory / "secure-runs"
    job = [
        f"federation.num_clients={NODES}",
        "federation.rounds=1",
        "train.local_steps=2",
        "secure_aggregation.enabled=true",
        "secure_aggregation.num_shares=1.0",
        f"data.source={own_data.server}",
        f"data.test_path={own_data.server}",
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
    (row,) = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert (row["num_clients"], row["secagg_shares"], row["secagg_abandoned"], row["secagg_dropped"]) == (
        NODES,
        NODES,
        0,
        0,
    )
    assert row["uplink_bytes"] > 0 and row["secagg_bytes"] > 0


@pytest.mark.e2e
def test_each_client_reports_the_counts_and_labels_of_its_own_file(
    own_data: OwnData, finished_run: Path
) -> None:
    """clients.jsonl: a node's train and validation examples together are its file's rows, and their
    label histograms add up to the file's; it trains on the same split in both rounds (it evaluates in
    the second only, ``federation.evaluate_every = 2``)."""
    replies = [json.loads(line) for line in (finished_run / "clients.jsonl").read_text().splitlines()]
    for i, path in enumerate(own_data.files):
        mine = {
            (r["round"], r["phase"]): r for r in replies if r["partition_id"] == i and r["status"] == "ok"
        }
        assert set(mine) == {(1, "train"), (2, "train"), (2, "evaluate")}, replies
        assert mine[1, "train"]["label_counts"] == mine[2, "train"]["label_counts"]
        topics = read_table(Origin("data-path", str(path))).to_pandas()["topic"]
        train, val = mine[2, "train"], mine[2, "evaluate"]
        assert train["num_examples"] + val["num_examples"] == len(topics)
        assert [a + b for a, b in zip(train["label_counts"], val["label_counts"], strict=True)] == [
            int((topics == name).sum()) for name in TOPIC_NAMES
        ]


@pytest.mark.e2e
def test_no_supernode_opens_the_corpus_or_another_nodes_file(
    deployment: TracedDeployment, own_data: OwnData, finished_run: Path
) -> None:
    """What the kernel saw (strace) while the nodes trained and evaluated: each opened its own file,
    and none opened another node's file, the server's file or the packaged corpus."""
    if not deployment.traced:
        pytest.skip("needs strace (.ci/run installs it)")
    for i in range(NODES):
        opened = deployment.opens(i)
        assert str(own_data.files[i]) in opened  # the trace does see the node read its file
        others = [p for j, p in enumerate(own_data.files) if j != i] + [own_data.server, own_data.corpus]
        assert [str(p) for p in others if str(p) in opened] == []
        assert own_data.corpus.name not in opened


@pytest.mark.e2e
def test_unregistered_key_is_refused(
    deployment: TracedDeployment, intruders: dict[str, tuple[int, str]]
) -> None:
    code, log = intruders["stranger"]
    assert code != 0 and "Failed to activate SuperNode" in log, log
    assert len(deployment.nodes()) == NODES  # nobody new joined


@pytest.mark.e2e
def test_supernode_without_a_key_is_refused(intruders: dict[str, tuple[int, str]]) -> None:
    code, log = intruders["anonymous"]
    assert code != 0 and "SuperNode authentication is enabled" in log, log


@pytest.mark.e2e
def test_supernode_with_another_ca_is_refused(intruders: dict[str, tuple[int, str]]) -> None:
    code, log = intruders["wrong-ca"]
    assert code == 1 and "could not establish a connection" in log, log


@pytest.mark.e2e
def test_the_superlink_logs_the_refusals_flower_sees(intruders: dict[str, tuple[int, str]]) -> None:
    """Flower logs a refused key (an error line and the access line's 412) and a node without a key;
    plaintext and wrong-CA connections fail in the TLS handshake, before Flower sees a request: Flower
    1.42 logs nothing for them (docs/deploy.md, section 9)."""
    _, log = intruders["superlink"]
    assert (
        "[/v1/fleet/activate-node][ApiError:2004]" in log
        and "No SuperNode found with the given public key" in log
    )
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in log
    assert "[/v1/fleet/register-node][ApiError:2001]" in log
    assert set(re.findall(r"ApiError:(\d+)", log)) == {"2004", "2001"}, log  # none for plaintext, wrong CA


@pytest.mark.e2e
def test_plaintext_client_is_refused(
    deployment: TracedDeployment, intruders: dict[str, tuple[int, str]]
) -> None:
    code, log = intruders["plaintext"]
    assert code != 0 and "could not establish a connection" in log, log
    with pytest.raises(httpx.HTTPError):  # the port speaks TLS only
        httpx.get(f"http://{deployment.address}/health", timeout=5)


@pytest.mark.e2e
def test_health_command_answers_for_the_superlink(deployment: TracedDeployment, run_cli) -> None:  # type: ignore[no-untyped-def]
    def health(address: str) -> subprocess.CompletedProcess[str]:
        return run_cli("deploy", "health", "--address", address, timeout=60)

    ok = health(f"127.0.0.1:{deployment.health_port}")
    assert ok.returncode == 0 and "serving" in ok.stdout, ok.stderr
    dead = health(f"127.0.0.1:{free_ports(1)[0]}")
    assert dead.returncode == 1
    assert dead.stderr.strip().startswith("error: no healthy Flower process answers at 127.0.0.1:")


@pytest.mark.e2e
def test_status_shows_every_node_online_and_the_runs_last_round(  # type: ignore[no-untyped-def]
    deployment: TracedDeployment, finished_run: Path, run_cli
) -> None:
    proc = run_cli(
        "deploy", "status", deployment.federation, env={"FLWR_HOME": str(deployment.home)}, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"SuperLink {deployment.federation} ({deployment.address}): ")
    assert lines[0].endswith(f"{NODES} SuperNodes registered, {NODES} online"), lines
    nodes = [line for line in lines if line.startswith("  node ")]
    assert len(nodes) == NODES and all(": online, last heartbeat " in line for line in nodes), lines
    runs = [line for line in lines if line.startswith("run ")]  # this module's runs, newest first
    assert runs and all(": finished:completed" in run for run in runs), lines
    assert re.search(r": finished:completed, round (\d+)/\1: done: clients 3 ", runs[0]), lines  # last round


@pytest.mark.e2e
def test_stop_leaves_nothing_running(deployment: TracedDeployment) -> None:
    pids = deployment.pids()
    assert len(pids) > NODES + 1  # the SuperLink, the SuperNodes and what they started
    deployment.stop()
    assert running(pids) == []
    assert not _accepts(deployment.port)


def _accepts(port: int) -> bool:
    try:
        httpx.get(f"https://127.0.0.1:{port}/", verify=False, timeout=2)
        return True
    except httpx.HTTPError:
        return False


# -- the CLI -------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_cli_brings_up_and_tears_down_on_ctrl_c(tmp_path: Path, start_cli) -> None:  # type: ignore[no-untyped-def]
    proc = start_cli("deploy", "local", "--nodes", "1", "--dir", str(tmp_path))
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "flwr run ." in line or not line:
                break
        submit = [line for line in lines if "flwr run . fedlora-local" in line]
        assert submit, "".join(lines)
        home = Path(submit[0].split("FLWR_HOME=")[1].split()[0])
        assert "[superlink.fedlora-local]" in (home / "config.toml").read_text()
        seen = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(seen) >= 2  # a SuperLink and a SuperNode at least
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped" in out
    assert running(seen) == []


def test_cli_rejects_zero_nodes(run_cli) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("deploy", "local", "--nodes", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --nodes 0 is invalid: expected an integer >= 1"]
