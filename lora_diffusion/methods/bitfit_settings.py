"""BitFit's settings (none: the `method.bitfit:` block is empty) and its registration; the method is bitfit.py."""

from __future__ import annotations

from lora_diffusion.methods import MethodSettings, register_method


class BitFitConfig(MethodSettings):
    pass


register_method(name="bitfit", settings=BitFitConfig, build="lora_diffusion.methods.bitfit:build",
                default_lr=3e-3, order=4, description="only the base's bias terms train")
