"""The metrics a space may optimise or stop trials on, each with its natural direction ("min" or "max")."""

from __future__ import annotations

from typing import Mapping

from lora_diffusion.config import PHASE_METRICS
from lora_diffusion.tasks import TASKS

# Metrics the training loop reports during training (usable by ASHA), with their natural direction.
TRAIN_METRICS: dict[str, str] = {
    "loss": "min", "denoise_loss": "min", "reg_rank": "min", "reg_orth": "min",
    **{m: "min" for m in PHASE_METRICS},  # masked cross-entropy per diffusion phase
    "tokens_per_s": "max", "samples_per_s": "max", "peak_mem_mb": "min",
    "trainable_params": "min", "total_params": "min",  # in every report (a second objective: size vs quality)
    "val_loss": "min", "val_denoise_acc": "max",  # need train.eval_every > 0
}
# Final-evaluation metrics of every task (token-level denoising accuracy); the others each Task declares.
TASK_INDEPENDENT_EVAL = {"eval_denoise_acc", "eval_denoise_acc_content"}


class _FromTasks(Mapping):
    """A table computed from the task registry at each lookup, so a task registered after this import counts."""

    def __init__(self, build):
        self._build = build

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self):
        return iter(self._build())

    def __len__(self):
        return len(self._build())


def _eval_metrics() -> dict[str, str]:
    tasks = {f"eval_{m}": mode for task in TASKS.values() for m, mode in task.eval_metrics().items()}
    return {**tasks, **{m: "max" for m in sorted(TASK_INDEPENDENT_EVAL)}}


# Metrics of the final evaluation (reported once, at the end of a trial): eval_<name> of each Task's eval_metrics().
EVAL_METRICS: Mapping[str, str] = _FromTasks(_eval_metrics)
KNOWN_METRICS: Mapping[str, str] = _FromTasks(lambda: {**TRAIN_METRICS, **_eval_metrics()})
# Task-specific final metrics, by task name; the TASK_INDEPENDENT_EVAL ones come from every task.
TASK_EVAL_METRICS: Mapping[str, set[str]] = _FromTasks(
    lambda: {name: {f"eval_{m}" for m in task.eval_metrics()} for name, task in TASKS.items()})
