"""fedlora: federated LoRA fine-tuning of pretrained transformers, simulated on Flower and Ray."""

__version__ = "0.1.0"
