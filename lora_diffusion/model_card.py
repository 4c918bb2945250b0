"""Model cards: a short README.md in every adapter folder the service logs or registers.

    write_card(ckpt / "adapter", cfg, metrics, step, adapter_uri="runs:/<run_id>/adapter")
    text = read_card(folder)            # None when the folder has no card

The card says what the adapter is and how to use it: base, method and its settings, task, data
source, steps, metrics, git commit, trainable parameters, and the command that loads it
(`python -m lora_diffusion.generate --adapter ...`). The training loop writes it beside
`adapter_config.json` at every checkpoint (with the metrics of that report; the last one has the
final evaluation), so the adapter artifact of every MLflow run carries it; the registered model
version gets the same text as its description (`sweep.results.register_best`).

Kept under MLflow's 5,000-character limit for a model version description (long method settings
are shortened, never the facts above).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
MAX_CHARS = 5000  # MLflow's model-version description column
EXAMPLE_PROMPTS = {"sst2": "a gorgeous, witty, seductive movie",
                   "squad": "Who wrote Hamlet? ||| Hamlet is a tragedy written by William Shakespeare.",
                   "xsum": "The council approved the new cycle lanes on Tuesday after a long public consultation."}
# final metrics worth a line (per-t denoising splits and counts stay in eval/metrics.json)
_SKIP_SUFFIX = ("_count", "_examples")


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.4g}"
    return str(v)


def card_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a card lists: final evaluation (eval_*), validation (val_*) and the training loss."""
    out = {}
    for k in sorted(metrics):
        v = metrics[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        if k.startswith("eval_"):
            if k.endswith(_SKIP_SUFFIX) or k.startswith("eval_denoise_acc_t"):
                continue
            out[k] = float(v)
        elif k.startswith("val_") or k == "loss":
            out[k] = float(v)
    return out


def data_source(cfg) -> str:
    """Where the task's data came from: a local folder of JSON Lines, or the Hugging Face Hub."""
    from lora_diffusion.tasks import get_task

    task = get_task(cfg.task.name)
    folder = cfg.task.resolved_data_dir()
    where = (f"local JSON Lines `{Path(folder) / task.name}/`" if folder
             else f"Hugging Face Hub `{task.hub_id}`" + (f" (`{task.hub_config}`)" if task.hub_config else ""))
    sizes = []
    sizes.append(f"train split `{cfg.task.train_split}`"
                 + (f", a {cfg.task.subset_size}-example subset" if cfg.task.subset_size else ", all rows"))
    sizes.append(f"eval split `{cfg.task.eval_split}`"
                 + (f", a {cfg.task.eval_subset_size}-example subset" if cfg.task.eval_subset_size else ", all rows"))
    return f"{where}; {'; '.join(sizes)} (subset seed {cfg.task.seed})"


def _settings(cfg, limit: int = 900) -> str:
    block = cfg.method.settings().model_dump(mode="json")
    if not block:
        return "(none: the method has no settings)"
    text = ", ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else _num(v)}" for k, v in block.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_card(cfg, metrics: dict[str, Any], param_counts: dict[str, int], step: int,
                adapter_uri: str | None = None, commit: str | None = None) -> str:
    """The card's Markdown text (deterministic: the same inputs give the same text)."""
    tc = cfg.train
    trainable, total = int(param_counts.get("trainable", 0)), int(param_counts.get("total", 0))
    share = f" ({100.0 * trainable / total:.3g} % of {total:,})" if total else ""
    extra = [f"{k} {v:,}" for k, v in param_counts.items() if k not in ("trainable", "total", "frozen")]
    shown = card_metrics(metrics)
    lines = [
        f"# LoRA-Diffusion adapter: `{cfg.method.name}` on `{cfg.task.name}`",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{cfg.model.base}` (max_length {cfg.model.max_length}) |",
        f"| method | `{cfg.method.name}` |",
        f"| method settings | {_settings(cfg)} |",
        f"| task | `{cfg.task.name}` |",
        f"| data source | {data_source(cfg)} |",
        f"| steps | {step} of {tc.max_steps} (batch {tc.batch_size} × {tc.num_workers} worker(s) × {tc.grad_accum} "
        f"accumulation, lr {_num(tc.lr)}, seed {tc.seed}, {tc.precision}) |",
        f"| trainable parameters | {trainable:,}{share}" + (f"; {', '.join(extra)}" if extra else "") + " |",
        f"| diffusion | {cfg.diffusion.schedule} schedule, T = {cfg.diffusion.T}, {cfg.diffusion.loss_weighting} "
        f"weighting; sampling {cfg.sampling.strategy}, {cfg.sampling.steps} steps |",
        f"| commit | `{commit or 'unknown (not a git checkout)'}` |",
    ]
    if adapter_uri:
        lines.append(f"| MLflow | `{adapter_uri}` |")
    lines += ["", f"## Metrics (step {step})", ""]
    if shown:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_num(v)} |" for k, v in shown.items()]
    else:
        lines.append("No evaluation metrics at this step.")
    where = adapter_uri or "<this folder>"
    prompt = EXAMPLE_PROMPTS.get(cfg.task.name, "your input text")
    lines += [
        "",
        "## Load it",
        "",
        "```bash",
        f"python -m lora_diffusion.generate --adapter {where} --task {cfg.task.name} --prompt {json.dumps(prompt)}",
        "```",
        "",
        "In Python: `from lora_diffusion.adapter import load_adapter; adaptation, tokenizer, config = "
        f"load_adapter({where!r})` (the base is loaded from the recorded `{cfg.model.base}`).",
        "",
    ]
    text = "\n".join(lines)
    if len(text) > MAX_CHARS:  # only the settings line can grow without bound: shorten it
        text = text.replace(_settings(cfg), _settings(cfg, limit=200))
    return text[:MAX_CHARS]


def write_card(adapter_dir: str | os.PathLike, cfg, metrics: dict[str, Any], step: int,
               adapter_uri: str | None = None) -> Path:
    """Write README.md into an adapter folder (its parameter counts come from adapter_config.json)."""
    from lora_diffusion.adapter import CONFIG_NAME
    from lora_diffusion.tracking import git_commit

    folder = Path(adapter_dir)
    counts = json.loads((folder / CONFIG_NAME).read_text()).get("param_counts", {})
    path = folder / CARD_NAME
    path.write_text(render_card(cfg, metrics, counts, step, adapter_uri, git_commit()), encoding="utf-8")
    return path


def read_card(adapter_dir: str | os.PathLike) -> str | None:
    path = Path(adapter_dir) / CARD_NAME
    return path.read_text(encoding="utf-8") if path.is_file() else None
