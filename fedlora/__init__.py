"""fedlora: federated LoRA fine-tuning of pretrained transformers, simulated on Flower and Ray."""

import os

# Offline and quiet before any module imports huggingface_hub, transformers or tokenizers (they read
# these when imported): models come from local directories only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # flwr and flwr-datasets read it when imported

__version__ = "0.1.0"
