"""XSum: extreme summarisation of a BBC article; the target is its one-sentence summary.

Hub: EdinburghNLP/xsum (train, validation, test). Local: <data_dir>/xsum/<split>.jsonl with
{"document": str, "summary": str, "id": str}. An empty document is allowed (the original
data has some); an empty summary is not. Scores: ROUGE-1/2/L/Lsum (stemmed) and BLEU.
"""

from __future__ import annotations

from lora_diffusion.metrics import summarization_metrics
from lora_diffusion.tasks.base import Task


class XSum(Task):
    def references(self, example):
        return [example["summary"]]

    def check_example(self, example):
        problem = super().check_example(example)
        if problem:
            return problem
        if not isinstance(example["document"], str):
            return f"field 'document' must be a string, got {type(example['document']).__name__}"
        if not isinstance(example["summary"], str) or not example["summary"].strip():
            return f"field 'summary' must be a non-empty string, got {example['summary']!r}"
        return None


TASK = XSum(
    name="xsum",
    hub_id="EdinburghNLP/xsum",
    hub_config=None,
    required_fields=("document", "summary"),
    instruction_template="Summarize the article in one sentence.",
    input_field="document",
    target_budget=64,
    metric_fn=summarization_metrics,
    metrics={"rouge1": "max", "rouge2": "max", "rougeL": "max", "rougeLsum": "max", "bleu": "max"},
    headline="rougeL",
    corpus_fields=("document", "summary"),
    description="XSum one-sentence summarisation; metrics = ROUGE-1/2/L/Lsum, BLEU",
)
