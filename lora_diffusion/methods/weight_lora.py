"""Weight LoRA (Hu et al., 2021) through `peft`: W x + (alpha / r) B A x on chosen linear layers.

`peft.inject_adapter_in_model` replaces each targeted `nn.Linear` inside the masked LM
(`denoiser.mlm`) by a LoRA layer in place, so `Denoiser.hidden` and `Denoiser.head` keep
working unchanged. Only the LoRA matrices train (B starts at zero: an untrained adapter is the
base). Unlike LoRA-Diffusion, the gradient flows back through every layer of the base.

Targets are module-name suffixes as in peft ("query", "value", "dense", "attention.self.key", ...);
each one must match at least one linear layer, otherwise the build fails naming the key.
"""

from __future__ import annotations

from torch import nn

from lora_diffusion.methods.core import Adaptation, freeze
from lora_diffusion.methods.weight_lora_settings import WeightLoRAConfig

ADAPTER_NAME = "default"


class WeightLoRA(Adaptation):
    method_name = "weight_lora"


def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def _check_targets(mlm: nn.Module, targets: list[str]) -> None:
    names = _linear_names(mlm)
    if not targets:
        raise ValueError("method.weight_lora.target_modules: got []; give at least one linear layer name")
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"method.weight_lora.target_modules: {unknown} match no linear layer of {type(mlm).__name__}; "
            f"allowed (name suffixes): {', '.join(leaves)}"
        )


def build(denoiser, settings: WeightLoRAConfig) -> WeightLoRA:
    from peft import LoraConfig, inject_adapter_in_model

    if any(n.endswith(".lora_A." + ADAPTER_NAME + ".weight") for n, _ in denoiser.named_parameters()):
        raise ValueError("weight_lora: this base already carries LoRA layers; load a fresh base for a new adapter")
    _check_targets(denoiser.mlm, list(settings.target_modules))
    freeze(denoiser)
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    inject_adapter_in_model(lora, denoiser.mlm, adapter_name=ADAPTER_NAME)
    # peft marks the new LoRA matrices trainable; make sure nothing else is.
    for name, p in denoiser.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return WeightLoRA(denoiser, settings)
