"""Full fine-tuning: every parameter of the base (and its timestep embedding) trains."""

from __future__ import annotations

from lora_diffusion.methods.core import Adaptation


class FullFineTuning(Adaptation):
    method_name = "full_ft"


def build(denoiser, settings) -> Adaptation:
    for p in denoiser.parameters():
        p.requires_grad_(True)
    return FullFineTuning(denoiser, settings)
