"""Client start-up per message on deployed SuperNodes: fedlora's ClientApp next to an empty Flower
ClientApp, side by side in one run.

A SuperNode starts a fresh ClientApp process (``flwr-clientapp``) for every message, so each round
pays the process's start-up again: Flower's own (importing flwr, connecting to the SuperNode, reading
the message), which any ClientApp pays, and the app's (imports, model, data) until its first training
step. This script brings up one loopback deployment (TLS, authenticated SuperNodes:
:class:`fedlora.run.deploy.LocalDeployment`) and submits, one after the other, to the same nodes:

- an **empty** Flower App (written to a temporary folder): a ServerApp that sends ``--rounds`` train
  messages to every node, a ClientApp whose train handler records its start-up and replies at once;
- **fedlora**'s App with a small experiment (``--nodes`` clients, all sampled, ``--rounds`` rounds of
  one local step of batch 8 on 1,500 tweets, max_length 32).

Each ClientApp process appends one JSON line when it reaches its first training step (fedlora:
``clients.runtime.log_startup``; the empty app: the same fields), to the file FEDLORA_STARTUP_LOG
names. Reported per app, as medians over its messages: **CPU s**, the CPU seconds the ClientApp
process had used by then (from its start, which follows the message's arrival at the node; what a busy
machine barely inflates), and **wall s**, seconds from the server creating the message to that point
(includes the node's polling and waiting for a CPU). The ratio fedlora / empty is taken on CPU s.
The 1-minute load average is printed before and after (other jobs inflate wall s, much less CPU s).

``--trainer`` chooses the SuperNodes: ``off`` (each message's ClientApp process trains itself),
``on`` (each node's warm trainer trains, :mod:`clients.warm`; CPU s is then the ClientApp process's
CPU until it handed the message over plus the trainer's CPU for that message until its first training
step), or ``both`` (default: one deployment of each, one after the other, each with its own empty-app
baseline). With the trainer, a node's first message also builds the model in the trainer (its
imports were paid when the node started): the table gives the median and the first message apart.

``--experiment`` names fedlora's experiment (default ``sims/quickstart.toml``, MiniLM;
``sims/llm_quickstart.toml`` runs SmolLM2-135M, after ``fedlora models convert-smollm2``), with the
overrides above.

Usage, from the repository root:
``python benchmarks/client_startup.py [--nodes 2] [--rounds 3] [--trainer both] [--experiment FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.runtime import STARTUP_LOG  # noqa: E402
from fedlora.run.deploy import LocalDeployment  # noqa: E402

EMPTY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "emptyapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "emptyapp_server:app"
clientapp = "emptyapp_client:app"

[tool.flwr.app.config]
rounds = 3
nodes = 2
"""

EMPTY_SERVER = '''\
"""Send one train message per round to every node; wait for all replies."""

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds, nodes = int(context.run_config["rounds"]), int(context.run_config["nodes"])
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < nodes:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    for server_round in range(1, rounds + 1):
        messages = [
            Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), node, "train")
            for node in node_ids
        ]
        replies = list(grid.send_and_receive(messages))
        assert len(replies) == len(node_ids) and not any(r.has_error() for r in replies), replies
'''

EMPTY_CLIENT = '''\
"""A ClientApp that does nothing: it records its start-up (as fedlora's does) and replies."""

import json
import os
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    path = os.environ.get("FEDLORA_STARTUP_LOG")
    if path:
        row = {
            "round": int(message.content["config"]["server-round"]),
            "startup_s": time.time() - message.metadata.created_at,
            "cpu_s": time.process_time(),
            "pid": os.getpid(),
            "fresh": True,
        }
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps(row) + "\\n")
    return Message(RecordDict(), reply_to=message)
'''


def write_empty_app(folder: Path) -> Path:
    """Write the empty Flower App into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(EMPTY_PYPROJECT)
    (folder / "emptyapp_server.py").write_text(EMPTY_SERVER)
    (folder / "emptyapp_client.py").write_text(EMPTY_CLIENT)
    return folder


def fedlora_overrides(nodes: int, rounds: int) -> list[str]:
    """fedlora's small experiment."""
    return [
        f"federation.num_clients={nodes}",
        f"federation.rounds={rounds}",
        "train.local_steps=1",
        "train.batch_size=8",
        "data.max_length=32",
        "data.max_examples=1500",
        "data.test_size=100",
    ]


def run_app(deployment: LocalDeployment, app: Path, run_config: str, log: Path) -> list[dict[str, float]]:
    """Submit ``app`` to the deployment, wait for it to finish; return its ClientApps' log rows."""
    proc = deployment.flwr(
        "run", str(app), deployment.federation, "--stream", "--run-config", run_config, timeout=1200
    )
    if proc.returncode != 0:
        sys.exit(f"run of {app} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def summarise(rows: list[dict[str, float]]) -> tuple[int, float, float, float, float]:
    """(messages, median CPU s, median wall s over all rounds, median wall s over rounds >= 2, the
    largest CPU s: a trainer's first message, which builds the model)."""
    cpu = statistics.median(r["cpu_s"] for r in rows)
    wall = statistics.median(r["startup_s"] for r in rows)
    later = [r["startup_s"] for r in rows if r["round"] > 1] or [wall]
    return len(rows), cpu, wall, statistics.median(later), max(r["cpu_s"] for r in rows)


Summary = tuple[int, float, float, float, float]


def measure(work: Path, nodes: int, rounds: int, trainer: bool, experiment: Path) -> dict[str, Summary]:
    """One deployment (with or without warm trainers): the empty app, then fedlora's; their summaries."""
    empty = write_empty_app(work / "emptyapp")
    # The log is named before the SuperNodes start: they pass their environment to every ClientApp
    # process they start (and to their trainers), so both apps log to one file, told apart by order.
    log = work / "startup.jsonl"
    os.environ[STARTUP_LOG] = str(log)
    with LocalDeployment(work / "deployment", nodes, app_dir=ROOT, trainer=trainer) as deployment:
        empty_rows = run_app(deployment, empty, f"rounds={rounds} nodes={nodes}", log)
        seen = len(empty_rows)
        job = ";".join(fedlora_overrides(nodes, rounds))
        config = f"experiment='{experiment}' overrides='{job}' out-dir='{work / 'runs'}'"
        fedlora_rows = run_app(deployment, ROOT, config, log)[seen:]
    return {"empty": summarise(empty_rows), "fedlora": summarise(fedlora_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes, all sampled each round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per app (default 3)")
    parser.add_argument(
        "--trainer", choices=("on", "off", "both"), default="both", help="warm trainers on the nodes"
    )
    parser.add_argument(
        "--experiment", type=Path, default=ROOT / "sims" / "quickstart.toml", help="fedlora's experiment"
    )
    args = parser.parse_args()
    if args.nodes < 1 or args.rounds < 1:
        sys.exit("error: --nodes and --rounds must be at least 1")
    if not args.experiment.is_file():
        sys.exit(f"error: --experiment {args.experiment}: no such file")
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.trainer]
    head = f"{'SuperNodes':<14} {'ClientApp':<10} {'messages':>8} {'CPU s':>7} {'first CPU s':>11}"
    print(f"{head} {'wall s':>7} {'wall s, rounds >= 2':>20}")
    for trainer in modes:
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="fedlora-startup-") as tmp:
            results = measure(Path(tmp), args.nodes, args.rounds, trainer, args.experiment.resolve())
        load_after = os.getloadavg()[0]
        label = "warm trainer" if trainer else "no trainer"
        for name, (messages, cpu, wall, later, first) in results.items():
            row = f"{label:<14} {name:<10} {messages:>8} {cpu:>7.2f} {first:>11.2f}"
            print(f"{row} {wall:>7.2f} {later:>20.2f}")
        ratio = results["fedlora"][1] / results["empty"][1]
        print(
            f"{label}: start-up ratio fedlora / empty (median CPU s per message) {ratio:.2f}x; "
            f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after; {os.cpu_count()} CPUs"
        )
    print(
        f"command: python benchmarks/client_startup.py --nodes {args.nodes} --rounds {args.rounds} "
        f"--trainer {args.trainer} --experiment {args.experiment}"
    )


if __name__ == "__main__":
    main()
