"""The bottleneck adapters' settings (the `method.adapters:` block) and their registration; the method is adapters.py."""

from __future__ import annotations

from pydantic import Field

from lora_diffusion.methods import MethodSettings, register_method


class AdaptersConfig(MethodSettings):
    bottleneck: int = Field(64, gt=0, description="Houlsby bottleneck width")
    # Houlsby et al. also train the layer norms of every layer; off = only the adapters train.
    train_layernorm: bool = True


register_method(name="adapters", settings=AdaptersConfig, build="lora_diffusion.methods.adapters:build",
                default_lr=1e-3, order=2, description="Houlsby bottleneck adapters")
