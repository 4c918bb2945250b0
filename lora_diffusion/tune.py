"""`python -m lora_diffusion.tune SPACE.yaml ...`: the tuning service's command; the sweep driver is lora_diffusion/sweep/."""

import sys

from lora_diffusion.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
