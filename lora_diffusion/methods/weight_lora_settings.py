"""Weight LoRA's settings (the `method.weight_lora:` block) and its registration; the method is weight_lora.py."""

from __future__ import annotations

from pydantic import Field

from lora_diffusion.methods import MethodSettings, register_method


class WeightLoRAConfig(MethodSettings):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])


register_method(name="weight_lora", settings=WeightLoRAConfig, build="lora_diffusion.methods.weight_lora:build",
                default_lr=2e-3, order=1, description="LoRA on the base's linear layers (peft)")
