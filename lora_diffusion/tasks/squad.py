"""SQuAD v1.1: extractive question answering; the target is the (first) answer text.

Hub: rajpurkar/squad (train, validation). Local: <data_dir>/squad/ with the Hub schema
{"id", "title", "context", "question", "answers": {"text": [str, ...], "answer_start": [int, ...]}}.

Split mapping for local folders (first file that exists wins):
- train            train.jsonl, else dev_split/train.jsonl
- validation       dev_split/validation.jsonl, else validation.jsonl
- full_validation  validation.jsonl (the whole official dev set; Hub: validation)
With only the official dev set at hand (validation.jsonl plus its article-level dev_split/),
`train` and `validation` are the two disjoint halves of dev_split/. Do not train on
dev_split/train.jsonl and report on full_validation: they overlap.

The question is part of the instruction (never truncated); the passage is the input
(truncated when too long). Scores: exact match and F1, max over all reference answers.
"""

from __future__ import annotations

import json

from lora_diffusion.metrics import squad_metrics
from lora_diffusion.tasks.base import Task

PROMPT_SEPARATOR = "|||"


class SQuAD(Task):
    def references(self, example):
        return list(example["answers"]["text"])

    def check_example(self, example):
        problem = super().check_example(example)
        if problem:
            return problem
        for f in ("question", "context"):
            if not isinstance(example[f], str):
                return f"field {f!r} must be a string, got {type(example[f]).__name__}"
        answers = example["answers"]
        texts = answers.get("text") if isinstance(answers, dict) else None
        if not isinstance(texts, list) or not texts or not all(isinstance(a, str) and a.strip() for a in texts):
            return f"field 'answers.text' must be a non-empty list of non-empty strings, got {texts!r}"
        return None

    def example_from_prompt(self, text):
        """A JSON object {"question": ..., "context": ...} or 'question ||| context'."""
        stripped = text.strip()
        if stripped.startswith("{"):
            ex = json.loads(stripped)
        elif PROMPT_SEPARATOR in text:
            q, c = text.split(PROMPT_SEPARATOR, 1)
            ex = {"question": q.strip(), "context": c.strip()}
        else:
            raise ValueError(
                f"squad prompt {text[:60]!r}: give 'QUESTION {PROMPT_SEPARATOR} CONTEXT' or a JSON object with question and context"
            )
        if not isinstance(ex, dict) or not {"question", "context"} <= set(ex):
            raise ValueError("squad prompt: the JSON object needs the fields question and context")
        return ex


TASK = SQuAD(
    name="squad",
    hub_id="rajpurkar/squad",
    hub_config=None,
    required_fields=("question", "context", "answers"),
    instruction_template="Answer the question with a span from the passage. Question: {question}",
    input_field="context",
    target_budget=32,
    metric_fn=squad_metrics,
    metrics={"exact_match": "max", "f1": "max"},
    headline="f1",
    corpus_fields=("context", "question"),
    local_files={
        "train": ("train.jsonl", "dev_split/train.jsonl"),
        "validation": ("dev_split/validation.jsonl", "validation.jsonl"),
        "full_validation": ("validation.jsonl",),
    },
    hub_splits={"full_validation": "validation"},
    description="SQuAD v1.1 extractive QA; target = answer text; metrics = exact match, F1",
)
