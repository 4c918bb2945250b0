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
    )

Its local data then lives in `<data_dir>/myqa/<split>.jsonl` (Hub schema, one object per line)
and `task.name=myqa` is accepted by the config validator.
"""

from __future__ import annotations

import importlib
import pkgutil

from lora_diffusion.tasks.base import DataError, Task

__all__ = ["TASKS", "DataError", "Task", "get_task"]


def _discover() -> dict[str, Task]:
    found: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        task = getattr(module, "TASK", None)
        if isinstance(task, Task):
            if task.name in found:
                raise ValueError(f"task name {task.name!r} is defined twice (tasks/{info.name}.py)")
            found[task.name] = task
    return found


TASKS: dict[str, Task] = _discover()


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task.name: unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}") from None
