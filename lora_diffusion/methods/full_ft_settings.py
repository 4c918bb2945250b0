"""Full fine-tuning's settings (none: the `method.full_ft:` block is empty) and its registration; the method is full_ft.py."""

from __future__ import annotations

from lora_diffusion.methods import MethodSettings, register_method


class FullFTConfig(MethodSettings):
    pass


register_method(name="full_ft", settings=FullFTConfig, build="lora_diffusion.methods.full_ft:build",
                default_lr=1e-4, order=5, description="every parameter of the base trains")
