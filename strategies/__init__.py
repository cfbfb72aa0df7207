"""Server-side aggregation strategies for LoRA adapters, and the ServerApp."""
