"""The environment for running without the network: the Hugging Face Hub offline, no telemetry.

The benchmarks and the tests run on machines that reach no Hub; `use_offline_defaults()` sets each
variable only where it is unset, so a user who exports HF_HUB_OFFLINE=0 (or any other value) keeps it.
Call it before transformers, datasets or huggingface_hub are imported: they read these at import.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def use_offline_defaults() -> None:
    """Set every OFFLINE_ENV variable that is not already set."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
