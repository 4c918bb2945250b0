"""Score an adapted denoiser on a task split: generate the targets, score them (the library behind
`python -m lora_diffusion.evaluate`, which is the command).

    metrics, predictions = evaluate(adaptation, tokenizer, cfg)                  # cfg.task.eval_split
    metrics, predictions = evaluate(adaptation, tokenizer, cfg, split="train", limit=200)

`metrics` has flat names WITHOUT the `eval_` prefix (callers add it): the task's metrics on the
generated text (sst2: accuracy, non_label_rate, non_label_count; squad: exact_match, f1; xsum:
rouge1, rouge2, rougeL, rougeLsum, bleu), for label tasks `rank_accuracy` (rank classification, below),
the token-level denoising accuracy (`denoise_acc` and `denoise_acc_t<100 t>` for each t in
sampling.denoise_t: the paper's metric, over every target-span token including [SEP] and [PAD]),
`denoise_acc_content` (the same over content tokens only: no [SEP]/[PAD]) and `n_examples`.
Scores are percentages. `predictions` holds one dict per example: index, instruction, input,
reference, references, prediction, and for label tasks rank_prediction.

Rank classification (as lm-eval-harness scores multiple choice): the whole target span is masked
at t = 1 and, in one forward pass, each label word is scored by the log-likelihood of its span
tokens (the word's tokens and the closing [SEP]) at their target positions; the best-scoring
label is the answer. That pass is the sampler's first step (the same input: whole span masked,
t = 1), so rank classification costs no forward of its own; a sampler whose first step is not at
t = 1 gets one. It needs no free generation, so it shows what the model knows even when
its sampler emits no label word; it is reported beside the generated-label accuracy, never
instead of it.

Generation follows cfg.sampling (see sampling.py) with one generator seeded by sampling.seed,
so the same adapter, data and config give the same predictions. Runs under torch.no_grad in eval
mode (the module's previous mode is restored), in the precision it was trained in (cfg.train.precision,
as autocast: `precision.autocast_for`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lora_diffusion.data import collator_for, make_dataset
from lora_diffusion.metrics import denoising_accuracy
from lora_diffusion.precision import autocast_for
from lora_diffusion.sampling import decode_targets, generate


def _device(module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(adaptation, tokenizer, cfg, split: str | None = None, limit: int | None = None,
             batch_size: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """(metrics, predictions) of `adaptation` on `split` (default cfg.task.eval_split), first `limit` examples."""
    split = split or cfg.task.eval_split
    if limit is not None and limit <= 0:
        raise ValueError(f"limit: got {limit}; must be > 0")
    ds = make_dataset(cfg, tokenizer, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    bs = batch_size or cfg.train.eval_batch_size
    collate = collator_for(cfg, tokenizer)
    mask_id = tokenizer.mask_token_id
    device = _device(adaptation)

    cpu_batches = [collate([ds[i] for i in range(start, min(start + bs, n))]) for start in range(0, n, bs)]

    def batches():
        for batch in cpu_batches:
            yield {k: v.to(device) for k, v in batch.items()}

    was_training = adaptation.training
    adaptation.eval()
    try:
        with torch.no_grad(), autocast_for(cfg.train.precision, device):
            generator = torch.Generator(device=device).manual_seed(cfg.sampling.seed)
            task = ds.task
            candidates = (label_spans(tokenizer, task.label_words, int(cpu_batches[0]["target_mask"][0].sum()))
                          if task.label_words and cpu_batches else None)
            texts: list[str] = []
            ranked: list[int] | None = [] if candidates else None
            for batch in batches():
                first: list[torch.Tensor] = []

                def keep_first(step, t, positions, logits, first=first):
                    # step 0 sees the whole span masked; at t = 1 that is rank classification's own input
                    if step == 0 and bool((t == 1.0).all()):
                        first.append(logits)

                out = generate(adaptation, batch, cfg.sampling, mask_id, diffusion_cfg=cfg.diffusion, generator=generator,
                               on_logits=keep_first if candidates else None)
                texts.extend(decode_targets(tokenizer, out.cpu(), batch["target_mask"].cpu()))
                if candidates:
                    scores = (scores_from_logits(first[0], batch["target_mask"].bool(), candidates) if first
                              else rank_scores(adaptation, batch, candidates, mask_id))
                    ranked.extend(scores.argmax(-1).tolist())
            denoise = denoising_accuracy(adaptation, batches(), cfg.sampling.denoise_t, mask_id,
                                         schedule=cfg.diffusion.schedule, seed=cfg.sampling.seed,
                                         exclude_ids=(tokenizer.sep_token_id, tokenizer.pad_token_id))
    finally:
        adaptation.train(was_training)

    predictions, references = [], []
    for i, text in enumerate(texts):
        ex = ds.example(i)
        refs = task.references(ex)
        references.append(refs)
        predictions.append({
            "index": int(ex["index"]), "instruction": task.instruction(ex), "input": task.input_text(ex),
            "reference": refs[0], "references": refs, "prediction": text,
        })
        if ranked is not None:
            predictions[-1]["rank_prediction"] = task.label_words[ranked[i]]
    metrics = task.compute_metrics(texts, references)
    if ranked is not None:
        correct = sum(p["rank_prediction"] in p["references"] for p in predictions)
        metrics["rank_accuracy"] = 100.0 * correct / max(n, 1)
    metrics = {**metrics, **denoise, "n_examples": float(n)}
    return metrics, predictions


def label_spans(tokenizer, label_words, budget: int) -> list[list[int]]:
    """Each label word as the target span tokens it is scored on: its tokens (cut to budget - 1) and [SEP]."""
    spans = []
    for w in label_words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"][: budget - 1]
        spans.append([*ids, tokenizer.sep_token_id])
    return spans


def rank_scores(adaptation, batch: dict, candidates: list[list[int]], mask_id: int) -> torch.Tensor:
    """(B, n candidates) log-likelihood of each candidate span at the target positions, span all masked, t = 1."""
    target = batch["target_mask"].bool()
    x = batch["input_ids"].masked_fill(target, mask_id)
    t = torch.ones(x.shape[0], device=x.device)
    logits = adaptation(x, t, batch["attention_mask"], batch.get("instruction_mask"), positions=target, target_mask=target)
    return scores_from_logits(logits, target, candidates)


def scores_from_logits(logits: torch.Tensor, target: torch.Tensor, candidates: list[list[int]]) -> torch.Tensor:
    """(B, n candidates) log-likelihood of each candidate span, from the model's logits (N, V) at the target
    positions (rows in (example, position) order) with the whole span masked at t = 1."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_row = target.sum(1).tolist()
    scores = torch.zeros(target.shape[0], len(candidates), device=logits.device)
    for b, rows in enumerate(torch.split(logp, per_row)):
        for j, cand in enumerate(candidates):
            k = min(len(cand), rows.shape[0])
            scores[b, j] = rows[torch.arange(k, device=logits.device), torch.tensor(cand[:k], device=logits.device)].sum()
    return scores


def rank_classify(adaptation, batch: dict, candidates: list[list[int]], mask_id: int) -> torch.Tensor:
    """Index of the best-scoring candidate per example (ties: the first)."""
    return rank_scores(adaptation, batch, candidates, mask_id).argmax(-1)


def write_eval_outputs(folder: str | os.PathLike, metrics: dict, predictions: list[dict]) -> tuple[Path, Path]:
    """Write `metrics.json` and `predictions.jsonl` (one JSON object per line) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m, p = folder / "metrics.json", folder / "predictions.jsonl"
    m.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with p.open("w", encoding="utf-8") as f:
        for row in predictions:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return m, p


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """A short two-column text table of the metrics."""
    width = max((len(k) for k in metrics), default=6)
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  value")
    lines.append(f"{'-' * width}  {'-' * 9}")
    for k, v in metrics.items():
        lines.append(f"{k:<{width}}  {v:9.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
