"""BitFit (Ben Zaken et al., 2022): only the bias terms of the base train."""

from __future__ import annotations

from lora_diffusion.methods.core import Adaptation, freeze


class BitFit(Adaptation):
    method_name = "bitfit"


def build(denoiser, settings) -> Adaptation:
    freeze(denoiser)
    for name, p in denoiser.mlm.base_model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
    return BitFit(denoiser, settings)
