"""Bottleneck adapters (Houlsby et al., 2019) after the attention output and the FFN output of every layer.

    y = dense(x);   y <- y + up(GELU(down(y)));   then the layer's own dropout, residual and LayerNorm

`up` starts at zero, so an untrained adapter is the identity and the model is the base. What
trains: the adapters and, as in Houlsby (setting `train_layernorm`), the layer norms of every
layer. For BERT-family layers (BERT, RoBERTa, ELECTRA, ...: `attention.output.dense` and
`output.dense`); any other architecture is refused with a clear error.

The adapted `dense` keeps the original weight and bias Parameters under their old names, so
the base's parameter names do not change; each adapter is `<...>.dense.adapter.{down,up}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.methods.adapters_settings import AdaptersConfig
from lora_diffusion.methods.core import Adaptation, freeze


class Bottleneck(nn.Module):
    """x + up(GELU(down(x))), up zero-initialised."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


class AdaptedDense(nn.Module):
    """A frozen `nn.Linear` (same weight/bias Parameters) followed by a bottleneck adapter."""

    def __init__(self, dense: nn.Linear, bottleneck: int):
        super().__init__()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.weight = dense.weight
        self.bias = dense.bias
        self.adapter = Bottleneck(dense.out_features, bottleneck).to(dense.weight.device, dense.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def bert_layers(denoiser, method: str) -> list[nn.Module]:
    """The transformer layers of a BERT-family masked LM, or a ValueError naming what is supported."""
    layers = denoiser.encoder_layers
    ok = len(layers) > 0 and all(
        isinstance(getattr(getattr(getattr(layer, "attention", None), "output", None), "dense", None), (nn.Linear, AdaptedDense))
        and isinstance(getattr(getattr(layer, "output", None), "dense", None), (nn.Linear, AdaptedDense))
        and isinstance(getattr(layer.attention.output, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(layer.output, "LayerNorm", None), nn.LayerNorm)
        for layer in layers
    )
    if not ok:
        raise ValueError(
            f"method {method}: {type(denoiser.mlm).__name__} is not supported; it needs BERT-family layers "
            "(encoder.layer[i].attention.output.dense/LayerNorm and .output.dense/LayerNorm, as in BERT, RoBERTa, "
            "ELECTRA, MiniLM). "
            "Use lora_diffusion, weight_lora, bitfit or full_ft for this base."
        )
    return layers


class HoulsbyAdapters(Adaptation):
    method_name = "adapters"


def build(denoiser, settings: AdaptersConfig) -> HoulsbyAdapters:
    layers = bert_layers(denoiser, "adapters")
    if any(isinstance(layer.output.dense, AdaptedDense) for layer in layers):
        raise ValueError("adapters: this base already carries bottleneck adapters; load a fresh base for a new adapter")
    freeze(denoiser)
    for layer in layers:
        layer.attention.output.dense = AdaptedDense(layer.attention.output.dense, settings.bottleneck)
        layer.output.dense = AdaptedDense(layer.output.dense, settings.bottleneck)
        if settings.train_layernorm:
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.requires_grad_(True)
    return HoulsbyAdapters(denoiser, settings)
