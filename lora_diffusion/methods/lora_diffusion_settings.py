"""LoRA-Diffusion's settings (the `method.lora_diffusion:` block) and its registration; the method is lora_diffusion.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lora_diffusion.methods import MethodSettings, register_method


class LoRADiffusionConfig(MethodSettings):
    # Phase boundaries as fractions of the trajectory: late t <= b1, mid b1 < t <= b2, early t > b2.
    b1: float = 1.0 / 3.0
    b2: float = 2.0 / 3.0
    rank_early: int = Field(64, gt=0)
    rank_mid: int = Field(32, gt=0)
    rank_late: int = Field(8, gt=0)
    scale_early: float = Field(1.0, ge=0)
    scale_mid: float = Field(0.5, ge=0)
    scale_late: float = Field(0.25, ge=0)
    k: int = Field(2, ge=1, description="modules per phase")
    time_dim: int = Field(64, gt=0, description="width of Emb(t) concatenated to h")
    instruction_dim: int = Field(64, gt=0, description="width of the condition encoding c")
    # What c encodes: "prompt" = the frozen base's hidden states mean-pooled over the whole prompt
    # (instruction + input); "instruction" = the instruction's word embeddings only (one constant per
    # single-instruction task such as SST-2: the adapter then cannot see the input).
    condition: Literal["prompt", "instruction"] = "prompt"
    # Learned embedding of the position within the target span, added to g_i's input (0 = off):
    # adjacent [MASK]s look alike to a frozen base, so without it the label and [SEP] positions blur.
    span_positions: int = Field(64, ge=0, description="span offsets embedded for the adapter (0 = off)")
    film: bool = True
    rank_norm: Literal["nuclear", "frobenius"] = "nuclear"
    lambda_rank: float = Field(1e-4, ge=0)
    lambda_orth: float = Field(1e-3, ge=0)

    @model_validator(mode="after")
    def _boundaries(self) -> "LoRADiffusionConfig":
        if not (0.0 < self.b1 < self.b2 < 1.0):
            raise ValueError(f"b1={self.b1}, b2={self.b2}: boundaries must satisfy 0 < b1 < b2 < 1")
        return self


register_method(name="lora_diffusion", settings=LoRADiffusionConfig, build="lora_diffusion.methods.lora_diffusion:build",
                default_lr=5e-3, order=0, description="step-adaptive low-rank perturbations of the hidden states")
