"""Generate text for prompts with a base plus zero, one or several adapters.

    python -m lora_diffusion.generate --base minilm --adapter outputs/sst2/adapter --task sst2 \\
        --prompt "a gorgeous, witty film" --prompt "flat and lifeless"

Each prompt is the task's input (sst2: the review; xsum: the article; squad:
'QUESTION ||| CONTEXT' or a JSON object with question and context); the task's instruction
is added as in training. Several --adapter (paths or MLflow URIs; lora_diffusion adapters on
the same base) are composed with uniform weights (ComposedLoRADiffusion without a router).
Sampling follows the config's `sampling` section; trailing key=value items override it.
"""

from __future__ import annotations

import argparse
import json
import sys

from lora_diffusion.config import ConfigError
from lora_diffusion.evaluate import add_common_args, build_config, load_model, read_adapter


def prompt_examples(task, prompts: list[str], tokenizer) -> list[dict]:
    """Tokenised, target-less examples (what Collator takes) for the raw prompts."""
    items = []
    for i, text in enumerate(prompts):
        ex = task.example_from_prompt(text)
        try:
            instruction = task.instruction(ex)
        except KeyError as e:
            raise ValueError(f"--prompt {i + 1}: task {task.name!r} needs the field {e.args[0]!r} in the prompt") from None
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        items.append({"instruction_ids": enc(instruction), "context_ids": enc(task.input_text(ex)), "target_ids": [], "index": i})
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.generate", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", action="append", default=[], help="adapter folder or MLflow URI (repeat to compose)")
    p.add_argument("--prompt", action="append", default=[], required=True, help="an input text (repeat for a batch)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_common_args(p)
    args = p.parse_args(argv)

    import torch

    from lora_diffusion.data import collator_for
    from lora_diffusion.sampling import decode_targets, generate
    from lora_diffusion.tasks import get_task

    try:
        cfg = build_config(args, read_adapter(args.adapter[0]) if args.adapter else None)
        task = get_task(cfg.task.name)
        model, tokenizer = load_model(cfg, args.adapter, args.device)
        device = next(model.parameters()).device
        batch = collator_for(cfg, tokenizer)(prompt_examples(task, args.prompt, tokenizer))
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            out = generate(model, batch, cfg.sampling, tokenizer.mask_token_id, diffusion_cfg=cfg.diffusion)
        texts = decode_targets(tokenizer, out.cpu(), batch["target_mask"].cpu())
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, texts):
        print(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
