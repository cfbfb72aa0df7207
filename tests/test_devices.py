"""Where clients train: mixed precision only on a CUDA GPU, the CPU path unchanged.

The CUDA tests run on a machine with a GPU (they are skipped elsewhere); the CPU tests always run.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.core.config import DataConfig, LoraConfig, TrainConfig
from fedlora.core.data.splits import get_splits
from fedlora.core.model.adapters import adapter_state, inject_lora
from fedlora.core.model.loading import load_classifier, load_tokenizer
from fedlora.core.training.loops import encode, evaluate, mixed_precision, train_local

CUDA = torch.cuda.is_available()


def test_no_autocast_on_the_cpu() -> None:
    x = torch.ones(4, 4)
    with mixed_precision(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert (x @ x).dtype == torch.float32


def _model_and_data(device: str):  # type: ignore[no-untyped-def]
    splits = get_splits(DataConfig(max_examples=600, test_size=100), 2, 0)
    data = encode(splits.client_train(0), load_tokenizer(""), 48)
    model = inject_lora(load_classifier("", num_labels=3, seed=0), LoraConfig(), seed=0).to(device)
    return model, data


def _output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Record the dtype of every attention query projection's output during the next forward passes."""
    seen: list[torch.dtype] = []
    for name, module in model.named_modules():
        if name.endswith("attention.self.query.base_layer"):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.real_model
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_training_runs_in_bf16_and_keeps_float32_weights() -> None:
    model, data = _model_and_data("cuda")
    seen = _output_dtypes(model)
    loss, n = train_local(model, data, TrainConfig(local_steps=3, batch_size=16), seed=0)
    assert math.isfinite(loss) and n == 48
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert seen and set(seen) == {expected}
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
    assert all(v.device.type == "cpu" for v in adapter_state(model).values())  # what travels


@pytest.mark.real_model
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_mixed_precision_tracks_the_cpu_result() -> None:
    """Same seed, same steps: bf16 on the GPU ends close to float32 on the CPU (loss within 0.05)."""
    results = []
    for device in ("cpu", "cuda"):
        model, data = _model_and_data(device)
        train_local(model, data, TrainConfig(local_steps=5, batch_size=16), seed=3)
        results.append(evaluate(model, data))
    (cpu_loss, cpu_acc), (gpu_loss, gpu_acc) = results
    assert abs(cpu_loss - gpu_loss) < 0.05
    assert abs(cpu_acc - gpu_acc) < 0.05
