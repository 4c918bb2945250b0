"""SST-2 (GLUE): binary sentiment of a movie-review sentence; the target is a label word.

Hub: glue / sst2. Local: <data_dir>/sst2/{train,validation}.jsonl with
{"sentence": str, "label": 0|1, "idx": int} (0 = negative, 1 = positive).
The unlabelled GLUE test split (label -1) is refused: it cannot be scored.
"""

from __future__ import annotations

from lora_diffusion.metrics import classification_metrics
from lora_diffusion.tasks.base import Task

LABEL_WORDS = ("negative", "positive")


class SST2(Task):
    def references(self, example):
        return [self.label_words[example["label"]]]

    def check_example(self, example):
        problem = super().check_example(example)
        if problem:
            return problem
        if not isinstance(example["sentence"], str):
            return f"field 'sentence' must be a string, got {type(example['sentence']).__name__}"
        label = example["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(self.label_words):
            return f"field 'label' is {label!r}; allowed: 0 ({self.label_words[0]}), 1 ({self.label_words[1]})"
        return None


TASK = SST2(
    name="sst2",
    hub_id="glue",
    hub_config="sst2",
    required_fields=("sentence", "label"),
    instruction_template="Classify the sentiment of the movie review as positive or negative.",
    input_field="sentence",
    target_budget=4,
    metric_fn=lambda preds, refs: classification_metrics(preds, refs, LABEL_WORDS),
    metrics={"accuracy": "max", "non_label_rate": "min"},
    headline="accuracy",
    corpus_fields=("sentence",),
    label_words=LABEL_WORDS,
    description="GLUE SST-2 sentiment; target = 'negative' | 'positive'; metric = accuracy",
)
