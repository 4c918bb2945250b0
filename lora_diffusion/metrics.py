"""Task metrics on generated text, and the paper's token-level denoising accuracy.

Everything works offline: SQuAD's official normalisation is re-implemented here (the v1.1
evaluation script's rules), ROUGE comes from `rouge-score`, BLEU from `sacrebleu`.
`evaluate.load(...)` is never used: it fetches metric scripts from the Hub at run time.

All scores are percentages (0-100), as in the SQuAD script, sacrebleu and the paper's tables.

- accuracy: the generated text, lower-cased and stripped of surrounding whitespace and
  punctuation, must equal the reference label word; anything that is no label word is
  wrong and counted (`non_label_rate`).
- exact_match / f1: SQuAD v1.1 (lower-case, drop punctuation and a/an/the, collapse
  whitespace; token-bag F1), maximum over the references, averaged over examples.
- rouge1 / rouge2 / rougeL / rougeLsum: F-measure with Porter stemming, maximum over the
  references; for rougeLsum sentences are split on end punctuation here and joined with
  newlines (rouge-score's own splitting needs NLTK's punkt data, absent offline).
- bleu: sacrebleu corpus BLEU (13a tokenisation), all references used.
- denoise_acc: mask the target span at a given t (the forward process), predict in one
  pass, and count the masked target tokens predicted correctly.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

# --------------------------------------------------------------------------- classification


def normalize_label(text: str) -> str:
    return text.strip().lower().strip(string.punctuation + " \t\n")


def classification_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                           label_words: Sequence[str]) -> dict[str, float]:
    """accuracy and non_label_rate (both %), plus the count of non-label outputs."""
    labels = {w.lower() for w in label_words}
    correct = non_label = 0
    for pred, refs in zip(predictions, references):
        p = normalize_label(pred)
        if p not in labels:
            non_label += 1
            continue
        correct += p in {normalize_label(r) for r in refs}
    n = max(len(predictions), 1)
    return {"accuracy": 100.0 * correct / n, "non_label_rate": 100.0 * non_label / n, "non_label_count": float(non_label)}


# --------------------------------------------------------------------------- SQuAD v1.1


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation: lower, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def squad_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """exact_match and f1 (%), each the maximum over an example's references, averaged."""
    em = f1 = 0.0
    for pred, refs in zip(predictions, references):
        em += max(squad_exact(pred, r) for r in refs)
        f1 += max(squad_f1(pred, r) for r in refs)
    n = max(len(predictions), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# --------------------------------------------------------------------------- ROUGE and BLEU

_SENT_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """Sentences on separate lines (for rougeLsum): existing newlines kept, '.', '!', '?' + space split."""
    lines = []
    for line in text.split("\n"):
        lines.extend(s for s in _SENT_END.split(line.strip()) if s)
    return "\n".join(lines)


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True, split_summaries=False)
    return _SCORER


def rouge_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """rouge1/2/L/Lsum F-measure (%), max over references, averaged over examples."""
    scorer = _rouge_scorer()
    totals = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for pred, refs in zip(predictions, references):
        p = split_sentences(pred)
        best = {k: 0.0 for k in totals}
        for r in refs:
            scores = scorer.score(split_sentences(r), p)
            for k in totals:
                best[k] = max(best[k], scores[k].fmeasure)
        for k in totals:
            totals[k] += best[k]
    n = max(len(predictions), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


def bleu_metric(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """sacrebleu corpus BLEU. Examples with fewer references repeat their first one (no effect on BLEU)."""
    import sacrebleu

    if not predictions:
        return {"bleu": 0.0}
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), streams).score)}


def summarization_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    return {**rouge_metrics(predictions, references), **bleu_metric(predictions, references)}


# --------------------------------------------------------------------------- denoising accuracy


def denoising_accuracy(adaptation, batches: Iterable[dict], t_values: Sequence[float], mask_id: int,
                       schedule: str = "linear", seed: int = 0, exclude_ids: Sequence[int] = ()) -> dict[str, float]:
    """Fraction (%) of masked target tokens predicted correctly in one pass, at each t and overall.

    Each batch (the batch contract) is noised with the forward process at each t in `t_values`
    (at least one target token masked per example) under a generator seeded with `seed`, so
    the number is reproducible. Returns `denoise_acc` (over all t, token-weighted) and
    `denoise_acc_t<100 t>` per t (e.g. denoise_acc_t50 for t = 0.5). With `exclude_ids` (the
    tokenizer's [SEP] and [PAD]) also `denoise_acc_content`: the same count over the masked target
    tokens that are none of those, i.e. the answer's own tokens. The paper's metric counts the span's
    [SEP]/[PAD] too, which a model gets right without knowing the answer.
    """
    import torch

    from lora_diffusion.diffusion import get_schedule

    with torch.no_grad():
        return _denoising_accuracy(adaptation, batches, t_values, mask_id, get_schedule(schedule), seed, tuple(exclude_ids))


def _denoising_accuracy(adaptation, batches, t_values, mask_id, sched, seed, exclude_ids=()):
    import torch

    from lora_diffusion.diffusion import forward_process

    correct = {t: 0 for t in t_values}
    total = {t: 0 for t in t_values}
    content_correct = content_total = 0
    device = None
    gen = None
    for batch in batches:
        if device is None:
            device = batch["input_ids"].device
            gen = torch.Generator(device=device).manual_seed(seed)
        ids, maskable = batch["input_ids"], batch["target_mask"].bool()
        for tv in t_values:
            t = torch.full((ids.shape[0],), float(tv), device=device)
            x_t, masked = forward_process(ids, maskable, t, sched, mask_id, generator=gen)
            if not masked.any():
                continue
            logits = adaptation(x_t, t, batch["attention_mask"], batch["instruction_mask"], positions=masked,
                                target_mask=maskable)
            truth = ids[masked]
            hit = logits.argmax(-1) == truth
            correct[tv] += int(hit.sum())
            total[tv] += int(masked.sum())
            if exclude_ids:
                content = ~torch.isin(truth, torch.tensor(exclude_ids, device=truth.device))
                content_correct += int((hit & content).sum())
                content_total += int(content.sum())
    out = {"denoise_acc": 100.0 * sum(correct.values()) / max(sum(total.values()), 1)}
    if exclude_ids:
        out["denoise_acc_content"] = 100.0 * content_correct / max(content_total, 1)
    for tv in t_values:
        out[f"denoise_acc_t{round(100 * tv)}"] = 100.0 * correct[tv] / max(total[tv], 1)
    return out
