"""`python -m lora_diffusion.tune`: the tuning service's command (lora_diffusion/sweep/cli.py).

Interim step of the split into lora_diffusion/sweep/: this name is the sweep driver's module until its callers move."""

import sys

from lora_diffusion.sweep import cli

if __name__ == "__main__":
    sys.exit(cli.main())
else:
    sys.modules[__name__] = cli
