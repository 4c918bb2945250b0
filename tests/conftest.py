"""Shared fixtures: the tiny built-in base, the real data folder, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lora_diffusion.offline import use_offline_defaults

use_offline_defaults()  # before anything imports transformers or huggingface_hub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real SST-2 / SQuAD / XSum JSON Lines folder (`.ci/run` sets LORA_DIFFUSION_TEST_DATA)."""
    path = os.environ.get("LORA_DIFFUSION_TEST_DATA")
    if not path or not Path(path).is_dir():
        pytest.skip("real data not available: set LORA_DIFFUSION_TEST_DATA to a folder with sst2/, squad/, xsum/")
    return Path(path)


@pytest.fixture
def tiny_config():
    from lora_diffusion.config import load_config

    return load_config(None, ["model.base=builtin:tiny", "model.max_length=48"])


@pytest.fixture
def tiny_base(tiny_config):
    from lora_diffusion.model import load_base

    return load_base(tiny_config.model)
