"""Evaluate a base, or a base plus an adapter, on a task split; write metrics and predictions.

    python -m lora_diffusion.evaluate --base minilm --adapter outputs/run/adapter --task sst2 \\
        --data-dir ~/data --split validation --limit 200 --out outputs/eval/sst2 sampling.steps=4

--adapter: an adapter folder or an MLflow URI (runs:/<id>/adapter, models:/<name>/<version>);
its recorded base and model settings are used unless --base / model.* overrides say otherwise.
Without --adapter the bare base is evaluated. Trailing key=value items override the config
(see lora_diffusion/config.py), e.g. sampling.strategy=sample sampling.top_p=0.9.

Writes <out>/metrics.json (flat metric names, percentages), <out>/predictions.jsonl (index,
instruction, input, reference, references, prediction) and <out>/config.yaml, and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lora_diffusion.config import ConfigError, config_from_dict, load_config, parse_override, set_dotted


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model: Hub name, local folder, 'minilm' or 'builtin:tiny' (default: the adapter's)")
    p.add_argument("--task", help="task name (default: the adapter's task when recorded, else the config's)")
    p.add_argument("--data-dir", help="folder with <task>/<split>.jsonl (default: $LORA_DIFFUSION_DATA_DIR, else the Hub)")
    p.add_argument("--config", help="a run config YAML to start from")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def build_config(args, adapter_config: dict | None):
    """The run config: --config file, then the adapter's recorded model settings, then the flags, then overrides."""
    data: dict = {}
    if args.config:
        data = load_config(args.config).to_dict()
    if adapter_config is not None:
        data["model"] = dict(adapter_config.get("base") or {})
        recorded_task = adapter_config.get("task")
        if isinstance(recorded_task, dict):
            recorded_task = recorded_task.get("name")
        if isinstance(recorded_task, str) and not args.task:
            set_dotted(data, "task.name", recorded_task)
    items = []
    if args.base:
        items.append(f"model.base={args.base}")
    if args.task:
        items.append(f"task.name={args.task}")
    if args.data_dir:
        items.append(f"task.data_dir={args.data_dir}")
    for item in items + list(args.overrides):
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return config_from_dict(data)


def load_model(cfg, adapter_paths: list[str], device: str | None):
    """(adaptation, tokenizer): the bare base, one adapter, or several composed with uniform weights."""
    import torch

    from lora_diffusion.adapter import load_adapter
    from lora_diffusion.methods.core import Adaptation
    from lora_diffusion.model import load_base

    denoiser, tokenizer = load_base(cfg.model)  # the fixed base every adapter is trained on
    if not adapter_paths:
        model = Adaptation(denoiser)
    else:
        adapters = [load_adapter(p, denoiser=denoiser)[0] for p in adapter_paths]
        if len(adapters) == 1:
            model = adapters[0]
        else:
            from lora_diffusion.methods.lora_diffusion import ComposedLoRADiffusion, LoRADiffusion

            bad = [p for p, a in zip(adapter_paths, adapters) if not isinstance(a, LoRADiffusion)]
            if bad:
                raise ValueError(f"--adapter: composing several adapters needs lora_diffusion adapters; not one: {', '.join(bad)}")
            model = ComposedLoRADiffusion(adapters, learn_router=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def read_adapter(path: str | None) -> dict | None:
    if not path:
        return None
    from lora_diffusion.adapter import read_adapter_config

    return read_adapter_config(path)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", help="adapter folder or MLflow URI (default: evaluate the bare base)")
    p.add_argument("--split", help="split to evaluate (default: task.eval_split)")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=int, help="examples per generation batch (default: train.eval_batch_size)")
    p.add_argument("--out", help="output folder (default: outputs/eval/<task>-<split>)")
    add_common_args(p)
    args = p.parse_args(argv)

    from lora_diffusion.data import local_split_file
    from lora_diffusion.scoring import evaluate, format_table, write_eval_outputs
    from lora_diffusion.tasks import DataError, get_task

    start = time.perf_counter()
    try:
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit: got {args.limit}; must be > 0")
        if args.batch_size is not None and args.batch_size <= 0:
            raise ConfigError(f"--batch-size: got {args.batch_size}; must be > 0 (omit it for train.eval_batch_size)")
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out: {args.out!r} is a file; give a folder (it gets metrics.json and predictions.jsonl)")
        adapter_config = read_adapter(args.adapter)
        cfg = build_config(args, adapter_config)
        split = args.split or cfg.task.eval_split
        from lora_diffusion.data import check_split_name

        check_split_name(split)  # a file stem inside the data folder: never '../..' or an absolute path
        data_dir = cfg.task.resolved_data_dir()
        if data_dir:  # a missing file fails before the model loads
            local_split_file(get_task(cfg.task.name), data_dir, split)
        model, tokenizer = load_model(cfg, [args.adapter] if args.adapter else [], args.device)
        metrics, predictions = evaluate(model, tokenizer, cfg, split=split, limit=args.limit, batch_size=args.batch_size)
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    out = Path(args.out or f"outputs/eval/{cfg.task.name}-{split.replace('/', '_')}")
    m, pr = write_eval_outputs(out, metrics, predictions)
    (out / "config.yaml").write_text(cfg.to_yaml())
    what = f"adapter {args.adapter}" if args.adapter else "bare base"
    print(format_table(metrics, f"{cfg.task.name} / {split}: {int(metrics['n_examples'])} examples, {what} on {cfg.model.base}"))
    print(f"wall time {wall:.1f} s; wrote {m} and {pr}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
