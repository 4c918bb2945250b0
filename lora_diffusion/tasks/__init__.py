"""Task registry (placeholder until the tasks module lands): name -> module path."""

TASKS = {"sst2": "lora_diffusion.tasks.sst2", "squad": "lora_diffusion.tasks.squad", "xsum": "lora_diffusion.tasks.xsum"}
