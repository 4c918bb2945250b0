"""The Task class: everything that makes a data set a diffusion fine-tuning task.

A task knows where its data lives (a Hub id and config, or local JSON Lines files in the
Hub schema), which fields an example must have, how an example becomes an
(instruction, input, target) triple, the target length budget (tokens, including the
closing [SEP]), its label words when it is a classification task, the references a
prediction is scored against, the metric function, the metrics that can rank runs (with
their direction: a sweep's objective, the benchmark's headline) and the text fields a
continued pretraining reads. Nothing about a task is declared anywhere else: the config
validator, the search spaces and `pretrain` read it from here.

The instruction is never truncated and is what LoRA-Diffusion's instruction encoder sees;
the input (the context side: a review, a passage, an article) is what the collator cuts
when a sequence is too long; the target is the span the model denoises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class DataError(ValueError):
    """Bad or missing task data; the message names the file (or split) and the field."""


@dataclass(frozen=True)
class Task:
    name: str
    hub_id: str  # Hugging Face dataset id, e.g. "glue"
    hub_config: str | None  # its configuration name, e.g. "sst2"
    required_fields: tuple[str, ...]  # top-level fields every example must have
    instruction_template: str  # format string over the example's fields (the never-cut part)
    input_field: str  # the context side: truncated first when the sequence is too long
    target_budget: int  # target span length in tokens: target tokens + [SEP] + [PAD]s
    metric_fn: Callable[[list[str], list[list[str]]], dict[str, float]]  # (predictions, references) -> metrics
    # The metrics of metric_fn that can rank runs, name -> "max" | "min" (the final evaluation reports each as
    # eval_<name>; a search space may optimise it). A label task also gets rank_accuracy (see eval_metrics).
    metrics: dict[str, str]
    headline: str  # the one metric that sums a run up (the quality benchmark's goals); one of eval_metrics()
    corpus_fields: tuple[str, ...]  # the text fields `python -m lora_diffusion.pretrain` reads from the task's files
    label_words: tuple[str, ...] | None = None  # classification: label id i <-> label_words[i]
    # split name -> candidate local files (relative to <data_dir>/<task>/); first existing wins.
    # Splits not listed resolve to <split>.jsonl.
    local_files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # split name -> Hub split name, for local-only aliases (e.g. squad's "full_validation").
    hub_splits: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        bad = {m: d for m, d in self.metrics.items() if d not in ("max", "min")}
        if bad:
            raise ValueError(f"task {self.name!r}: metrics {bad}: each direction must be 'max' or 'min'")
        if self.headline not in self.eval_metrics():
            raise ValueError(f"task {self.name!r}: headline {self.headline!r}; allowed: {', '.join(self.eval_metrics())}")
        if not self.corpus_fields:
            raise ValueError(f"task {self.name!r}: corpus_fields is empty; name the text fields pretraining reads")

    def eval_metrics(self) -> dict[str, str]:
        """Every metric of this task's final evaluation that can rank runs, name -> direction: the declared
        `metrics`, and for a label task rank_accuracy (the evaluation also ranks the label words)."""
        return {**self.metrics, **({"rank_accuracy": "max"} if self.label_words else {})}

    # -- the example -> text triple ------------------------------------------------------------
    def instruction(self, example: dict[str, Any]) -> str:
        return self.instruction_template.format(**example)

    def input_text(self, example: dict[str, Any]) -> str:
        return str(example.get(self.input_field) or "")

    def target_text(self, example: dict[str, Any]) -> str:
        """The training target (for several references, the first)."""
        return self.references(example)[0]

    def references(self, example: dict[str, Any]) -> list[str]:
        """Every acceptable answer for scoring (override per task)."""
        raise NotImplementedError

    def to_prompt_target(self, example: dict[str, Any]) -> tuple[str, str, str]:
        """(instruction, input, target) text of one example."""
        return self.instruction(example), self.input_text(example), self.target_text(example)

    def example_from_prompt(self, text: str) -> dict[str, Any]:
        """An example (without target) from a user prompt: the prompt is the input field."""
        return {self.input_field: text}

    # -- data checks ----------------------------------------------------------------------------
    def check_example(self, example: dict[str, Any]) -> str | None:
        """None when the example is usable, else what is wrong with it (field and value)."""
        for f in self.required_fields:
            if example.get(f) is None:
                return f"field {f!r} is missing"
        return None

    def compute_metrics(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(f"{self.name}: {len(predictions)} predictions for {len(references)} references")
        return self.metric_fn(predictions, references)

    def local_candidates(self, split: str) -> tuple[str, ...]:
        return self.local_files.get(split, (f"{split}.jsonl",))

    def local_path(self, data_dir: str | Path, split: str) -> Path | None:
        folder = Path(data_dir) / self.name
        for rel in self.local_candidates(split):
            if (folder / rel).is_file():
                return folder / rel
        return None
