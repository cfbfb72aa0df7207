"""The environment Ray's processes get: offline, no telemetry, no update checks, quiet libraries.

Kept apart from :mod:`fedlora.run.simulation` so that a process that only starts Ray processes (the
comparison's shared head) can use it without importing Ray, Flower and torch.
"""

from __future__ import annotations

import os

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_environment() -> None:
    """Offline, no telemetry, no update checks (inherited by Ray's worker processes)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
