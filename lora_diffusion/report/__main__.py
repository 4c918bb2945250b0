"""`python -m lora_diffusion.report`: the command is `cli.main` (kept there so that importing the package does
not import this file, which runpy then runs as `__main__`)."""

import sys

from lora_diffusion.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
