"""The sweep driver behind `python -m lora_diffusion.tune` (being split into one module per section)."""
