"""Prefix tuning's settings (the `method.prefix_tuning:` block) and its registration; the method is prefix_tuning.py."""

from __future__ import annotations

from pydantic import Field

from lora_diffusion.methods import MethodSettings, register_method


class PrefixTuningConfig(MethodSettings):
    num_prefix: int = Field(16, gt=0, description="learned key/value prefix length per layer")
    reparam_hidden: int = Field(0, ge=0, description="MLP reparameterisation width (0 = direct)")


register_method(name="prefix_tuning", settings=PrefixTuningConfig, build="lora_diffusion.methods.prefix_tuning:build",
                default_lr=5e-3, order=3, description="learned key/value prefixes in every self-attention")
