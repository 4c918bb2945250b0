"""Adaptation methods behind one registry: a method is one file in this folder.

Each module `lora_diffusion/methods/<name>.py` defines

    def build(denoiser: Denoiser, settings: <its config block>) -> Adaptation

which freezes the base, adds or unfreezes what the method trains, and returns an
`Adaptation` (see core.py): forward(x_t, t, attention_mask, instruction_mask, positions) ->
logits at `positions`, plus regularisers, parameter counts and the adapter's state.
Adding a method: a config block in config.py (and its name in METHOD_NAMES) and one file here.
"""

from __future__ import annotations

import importlib

from lora_diffusion.config import METHOD_NAMES, MethodConfig
from lora_diffusion.methods.core import Adaptation, count_parameters

__all__ = ["Adaptation", "METHOD_NAMES", "build_method", "count_parameters"]


def build_method(cfg: MethodConfig, denoiser) -> Adaptation:
    """Build the method `cfg.name` on `denoiser` with its settings block."""
    if cfg.name not in METHOD_NAMES:
        raise ValueError(f"method.name: unknown method {cfg.name!r}; allowed: {', '.join(METHOD_NAMES)}")
    module = importlib.import_module(f"lora_diffusion.methods.{cfg.name}")
    adaptation = module.build(denoiser, cfg.settings())
    adaptation.method_name = cfg.name
    return adaptation
