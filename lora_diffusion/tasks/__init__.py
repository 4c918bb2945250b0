"""Task registry: every module in this folder that defines `TASK` (a `tasks.base.Task`) is a task.

    from lora_diffusion.tasks import TASKS, get_task
    get_task("sst2").to_prompt_target({"sentence": "a gem ", "label": 1})

Adding a task is one file, `lora_diffusion/tasks/<name>.py`:

    from lora_diffusion.metrics import squad_metrics
    from lora_diffusion.tasks.base import Task

    class MyQA(Task):
        def references(self, ex):            # every acceptable answer
            return [ex["answer"]]

    TASK = MyQA(
        name="myqa", hub_id="org/myqa", hub_config=None,
        required_fields=("question", "context", "answer"),
        instruction_template="Answer the question. Question: {question}",   # never truncated
        input_field="context",                                              # cut when too long
        target_budget=24,                                                    # tokens incl. [SEP]
        metric_fn=squad_metrics,
        metrics={"exact_match": "max", "f1": "max"},   # what can rank runs: eval_exact_match, eval_f1
        headline="f1",                                 # the benchmark's one number
        corpus_fields=("context", "question"),         # what `pretrain --tasks myqa` reads
    )

Its local data then lives in `<data_dir>/myqa/<split>.jsonl` (Hub schema, one object per line),
`task.name=myqa` is accepted by the config validator, `eval_f1` can be a search space's metric
and `pretrain --tasks myqa` reads its text fields: they all read the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from lora_diffusion.tasks.base import DataError, Task

__all__ = ["TASKS", "DataError", "Task", "discover", "get_task", "register_task"]

TASKS: dict[str, Task] = {}


def register_task(task: Task, where: str) -> None:
    """Add `task` to the registry (`where` names its module in the error when the name is taken)."""
    if task.name in TASKS:
        raise ValueError(f"task name {task.name!r} is defined twice ({where})")
    TASKS[task.name] = task


def discover() -> None:
    """Register the `TASK` of every module in this package's folders not registered yet (run at import)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        task = getattr(module, "TASK", None)
        if isinstance(task, Task) and TASKS.get(task.name) is not task:
            register_task(task, f"tasks/{info.name}.py")


discover()


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task.name: unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}") from None
