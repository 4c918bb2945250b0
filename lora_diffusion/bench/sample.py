"""sample: generation time per example with and without the adapter.

The reverse process (`lora_diffusion.sampling.generate`) fills the target span of a synthetic batch
of prompts (same shapes for every model; what the words are does not change the cost), with
greedy proposals and two ways of choosing what to commit at each step: random positions
("greedy") and the most confident positions ("low_confidence", LLaDA), at several step counts.
Models: the bare base (no adapter) and the base with a LoRA-Diffusion adapter (weights drawn at
random so that it perturbs the hidden states like a trained one; the cost does not depend on the
values); `--methods` adds other methods. Each model has its own copy of the base. Timing rounds
alternate the models (and which goes first), so the ratio to the base (median of the per-round
ratios) is measured over the same seconds on a busy machine; the ratio of the best times is
reported beside it.

Goal (issue 8): adapter <= 1.15x the base, in every configuration (the worst one is the goal's figure).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from lora_diffusion.bench.common import (
    BenchError, goal, goals_table, heading, int_list, machine_info, median, sync, synthetic_batch, table,
    with_options,
)
from lora_diffusion.config import METHOD_NAMES

NAME = "sample"

BASE = "base (no adapter)"

PRESETS = {
    "smoke": dict(base="builtin:tiny", batch_size=4, seq_len=32, target_len=8, step_counts=[2, 4], repeats=2, threads=1),
    "quick": dict(base="minilm", batch_size=16, seq_len=64, target_len=16, step_counts=[4, 8, 16], repeats=5, threads=2),
    "full": dict(base="minilm", batch_size=64, seq_len=128, target_len=32, step_counts=[8, 16, 32], repeats=5, threads=None),
}

STRATEGIES = {
    "greedy": dict(strategy="greedy", remasking="random"),
    "low_confidence": dict(strategy="greedy", remasking="low_confidence"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="model.base (default: builtin:tiny for --smoke, minilm otherwise)")
    p.add_argument("--methods", default="lora_diffusion",
                   help=f"adapters to compare with the bare base, comma-separated from {','.join(METHOD_NAMES)}")
    p.add_argument("--batch-size", type=int, help="prompts generated together")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--target-len", type=int, help="target span to generate (tokens)")
    p.add_argument("--step-counts", help="comma-separated reverse-step counts, e.g. 4,8,16")
    p.add_argument("--repeats", type=int, help="timed rounds (median reported)")


def _settings(args: argparse.Namespace, size: str) -> dict[str, Any]:
    s = with_options(PRESETS[size], args, ("base", "batch_size", "seq_len", "target_len", "repeats"),
                     positive=("batch_size", "seq_len", "target_len", "repeats"))
    if args.step_counts:
        s["step_counts"] = int_list("--step-counts", args.step_counts, "4,8,16")
    if not s["step_counts"] or min(s["step_counts"]) < 1:
        raise BenchError(f"--step-counts {s['step_counts']}: give at least one count, each >= 1")
    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise BenchError(f"--methods {args.methods!r}: unknown or empty ({', '.join(unknown)}); allowed: {', '.join(METHOD_NAMES)}")
    s["methods"] = methods
    s["device"] = args.device
    return s


def _randomise(adaptation, seed: int = 0) -> None:
    """Give an untrained adapter non-zero weights (zero-initialised parts included), like a trained one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adaptation.trainable_named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def run(args: argparse.Namespace, size: str) -> dict[str, Any]:
    import torch

    from lora_diffusion.config import DiffusionConfig, MethodConfig, ModelConfig, SamplingConfig
    from lora_diffusion.methods import Adaptation, build_method
    from lora_diffusion.model import load_base
    from lora_diffusion.sampling import generate

    s = _settings(args, size)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    device = s["device"]
    model_cfg = ModelConfig(base=s["base"], max_length=s["seq_len"])
    models: dict[str, Any] = {}
    base, tokenizer = load_base(model_cfg, seed=0)
    models[BASE] = Adaptation(base.to(device)).eval()
    for m in s["methods"]:
        denoiser, _ = load_base(model_cfg, seed=0)
        adaptation = build_method(MethodConfig(name=m), denoiser.to(device)).to(device)
        if m != "full_ft":  # full fine-tuning "adapter" = the whole base; random noise would only wreck it
            _randomise(adaptation)
        models[m] = adaptation.eval()
    batch = synthetic_batch(tokenizer, s["batch_size"], s["seq_len"], s["target_len"], device=device)
    mask_id, dcfg = tokenizer.mask_token_id, DiffusionConfig()

    rows: list[dict[str, Any]] = []
    for strat, kw in STRATEGIES.items():
        for n_steps in s["step_counts"]:
            cfg = SamplingConfig(steps=n_steps, **kw)
            times: dict[str, list[float]] = {name: [] for name in models}
            for r in range(s["repeats"] + 1):  # round 0 is a warm-up
                order = list(models.items())
                for name, model in (order if r % 2 else order[::-1]):  # alternate who goes first (cancels drift)
                    sync(device)
                    t0 = time.perf_counter()
                    out = generate(model, batch, cfg, mask_id, diffusion_cfg=dcfg)
                    sync(device)
                    if r > 0:
                        times[name].append(time.perf_counter() - t0)
                    if bool((out[batch["target_mask"]] == mask_id).any()):
                        raise BenchError(f"{name}: generate left [MASK] in the target span ({strat}, {n_steps} steps)")
            base_ms = 1000 * median(times[BASE]) / s["batch_size"]
            for name in models:
                ratio = median([a / b for a, b in zip(times[name], times[BASE])])
                rows.append({
                    "strategy": strat, "steps": n_steps, "model": name,
                    "ms_per_example": 1000 * median(times[name]) / s["batch_size"],
                    "base_ms_per_example": base_ms, "x_base": ratio,
                    "x_base_best": min(times[name]) / min(times[BASE]),
                    "tokens_per_s": s["batch_size"] * s["target_len"] / median(times[name]),
                })
            print(f"[sample] {strat} {n_steps} steps: " + ", ".join(
                f"{r['model']} {r['ms_per_example']:.1f} ms/ex ({r['x_base']:.2f}x)" for r in rows[-len(models):]), flush=True)

    goals = []
    for m in s["methods"]:
        ratios = [r["x_base"] for r in rows if r["model"] == m]
        goals.append(goal(f"{m} generation <= 1.15x base (worst configuration)", max(ratios), 1.15,
                          note=f"range {min(ratios):.3f}-{max(ratios):.3f}, median {median(ratios):.3f}"))
    return {"machine": machine_info(device, torch.get_num_threads()), "settings": s, "rows": rows, "goals": goals}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    cols = [("strategy", "commit rule"), ("steps", "steps"), ("model", "model"), ("ms_per_example", "ms / example"),
            ("x_base", "x base"), ("x_base_best", "x base (best times)"), ("tokens_per_s", "target tokens / s")]
    return "\n".join([
        *heading(result),
        f"Base `{s['base']}`, {s['batch_size']} prompts x {s['seq_len']} tokens, target span {s['target_len']}; greedy "
        f"proposals, committing random positions (greedy) or the most confident (low_confidence); median of "
        f"{s['repeats']} rounds after a warm-up round, models alternating within each round.",
        "",
        table(result["rows"], cols),
        "",
        goals_table(result["goals"]),
    ])
