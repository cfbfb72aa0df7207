"""Tiny random folders of the families of issue 27: GPT-2 (fused Conv1D attention), Phi-3 (fused
qkv_proj), Qwen2, DeBERTa-v2 and a DistilBERT folder saved with a 2-label head, for classification and for
the decoders causal-lm, one round each with a preset, from the same ``--set`` values a user types; and a
family that cannot be trained refused before Ray: one line, exit 2, nothing written.

Three cases run ``fedlora run`` itself (the real CLI in a new process, Ray included); the others go
through the same loader and pre-flight into an in-process federation (``federate``), which saves a Ray
start and a process's imports each and proves the same model path (the fast tier's conformance matrix
covers every family that way too).

Each case prints its wall time (timings belong in benchmarks; not asserted).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.families import save_family, write_data

pytestmark = [pytest.mark.e2e, pytest.mark.cli]

Run = Callable[..., subprocess.CompletedProcess[str]]

CLI_CASES = [
    ("gpt2", "base", "classification", "qkvo", "is a causal language model (GPT2LMHeadModel)"),
    ("distilbert", "head", "classification", "qv", "holds a classification head (pre_classifier, classifier"),
    ("gpt2", "base", "causal-lm", "qv", ""),
]
IN_PROCESS_CASES = [
    ("phi3", "base", "classification", "qv", "is a causal language model (Phi3ForCausalLM)"),
    ("qwen2", "base", "classification", "mlp", "is a causal language model (Qwen2ForCausalLM)"),
    ("deberta-v2", "base", "classification", "qkvo", ""),
    ("phi3", "base", "causal-lm", "qkvo", ""),
    ("qwen2", "base", "causal-lm", "vo", ""),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models-e2e")


def _fedlora_run(run_cli: Run, out: Path, *sets: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``fedlora run --out OUT --set ...`` in a fresh process (no GPU visible); prints its wall time."""
    args = [arg for value in sets for arg in ("--set", value)]
    start = time.perf_counter()
    proc = run_cli("run", "--out", str(out), *args, timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})
    print(f"fedlora run {out.name}: exit {proc.returncode} in {time.perf_counter() - start:.1f} s")
    return proc, [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def _sets(model: str, data: Path, task: str, preset: str) -> list[str]:
    sets = [
        f'model.path="{model}"',
        f'data.source="{data}"',
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=10",
        "data.val_fraction=0.0",
        "federation.num_clients=2",
        "federation.rounds=1",
        "federation.client_cpus=1",
        "train.local_steps=1",
        "train.batch_size=4",
        f'lora.targets="{preset}"',
    ]
    if task == "causal-lm":
        sets += ['task="causal-lm"', 'data.template="Tweet: {text} Sentiment:"']
    return sets


@pytest.mark.parametrize(("family", "kind", "task", "preset", "notice"), CLI_CASES, ids=lambda v: str(v))
def test_fedlora_run_trains_a_tiny_family(
    run_cli: Run, root: Path, family: str, kind: str, task: str, preset: str, notice: str
) -> None:
    model = root / f"{family}-{kind}"
    if not model.exists():
        save_family(model, family, kind=kind)
    out = root / "runs" / f"{family}-{kind}-{task}-{preset}"
    proc, lines = _fedlora_run(run_cli, out, *_sets(str(model), write_data(root), task, preset))
    assert proc.returncode == 0, lines[-5:]
    assert (out / "summary.json").is_file()
    assert {"adapter_model.safetensors", "tokenizer_config.json", "config.json"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    notes = [line for line in lines if line.startswith("note: ")]
    assert (notes == []) if not notice else (len(notes) == 1 and notice in notes[0]), notes


@pytest.mark.parametrize(
    ("family", "kind", "task", "preset", "notice"), IN_PROCESS_CASES, ids=lambda v: str(v)
)
def test_the_loader_and_a_federation_train_a_tiny_family(
    federate: Callable[..., Path], root: Path, family: str, kind: str, task: str, preset: str, notice: str
) -> None:
    from fedlora.run.experiment import load_experiment, model_notice, preflight

    model = root / f"{family}-{kind}"
    if not model.exists():
        save_family(model, family, kind=kind)
    cfg = preflight(load_experiment(None, _sets(str(model), write_data(root), task, preset)))
    out = federate(cfg, root / "in-process" / f"{family}-{kind}-{task}-{preset}")
    assert (out / "summary.json").is_file()
    assert {"adapter_model.safetensors", "tokenizer_config.json", "config.json"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    assert (notice in model_notice(cfg)) if notice else model_notice(cfg) == ""


def test_a_family_that_cannot_be_trained_is_refused_before_ray(run_cli: Run, root: Path) -> None:
    model = save_family(root / "vit", "vit")
    out = root / "runs" / "vit"
    proc, lines = _fedlora_run(run_cli, out, *_sets(model, write_data(root), "classification", "qv"))
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: model.path: "), lines
    assert "is a vit model, which has no sequence-classification class in transformers" in lines[0]
    assert "starting Ray" not in proc.stdout + proc.stderr
    assert not out.exists()
