"""Models and adapters: loading, weights on disk, LoRA targets, adapter arrays."""
