"""Task registry and the example -> (instruction, input, target) mapping of each task."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from lora_diffusion import pretrain, tasks
from lora_diffusion.config import ConfigError, load_config
from lora_diffusion.search_space import SpaceError, load_space
from lora_diffusion.tasks import TASKS, Task, get_task


def test_registry_lists_the_three_tasks_and_the_config_accepts_them():
    assert {"sst2", "squad", "xsum"} <= set(TASKS)
    assert sorted(TASKS) == sorted(set(TASKS))
    for name in TASKS:
        assert isinstance(get_task(name), Task) and get_task(name).name == name
        assert load_config(None, [f"task.name={name}"]).task.name == name
    with pytest.raises(ValueError, match="unknown task 'mnli'; allowed: squad, sst2, xsum"):
        get_task("mnli")
    with pytest.raises(ConfigError, match="task.name"):
        load_config(None, ["task.name=mnli"])


def test_task_definitions_are_consistent():
    for task in TASKS.values():
        assert task.target_budget >= 2
        assert task.input_field in task.required_fields
        assert callable(task.metric_fn)
        # the instruction template only uses required fields
        dummy = {f: f"<{f}>" for f in task.required_fields}
        task.instruction_template.format(**dummy)
        # what it declares: metrics its metric_fn returns, a headline among them, text fields of its examples
        assert set(task.metrics) <= set(task.compute_metrics(["x"], [["x"]]))
        assert task.headline in task.eval_metrics() and set(task.corpus_fields) <= set(task.required_fields)


def test_a_task_declaration_is_checked():
    sst2 = get_task("sst2")
    kw = {f: getattr(sst2, f) for f in sst2.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"task 'sst2': headline 'f1'; allowed: accuracy, non_label_rate, rank_accuracy"):
        Task(**{**kw, "headline": "f1"})
    with pytest.raises(ValueError, match=r"metrics \{'accuracy': 'up'\}: each direction must be 'max' or 'min'"):
        Task(**{**kw, "metrics": {"accuracy": "up"}})
    with pytest.raises(ValueError, match="task name 'sst2' is defined twice"):
        tasks.register_task(Task(**kw), "tests")


def test_sst2_maps_labels_to_words():
    task = get_task("sst2")
    instr, inp, tgt = task.to_prompt_target({"sentence": "a gorgeous film ", "label": 1, "idx": 0})
    assert "positive or negative" in instr and inp == "a gorgeous film " and tgt == "positive"
    assert task.references({"sentence": "x", "label": 0}) == ["negative"]
    assert task.label_words == ("negative", "positive")
    assert task.check_example({"sentence": "x", "label": 2}) == "field 'label' is 2; allowed: 0 (negative), 1 (positive)"
    assert "missing" in task.check_example({"sentence": "x", "label": None})
    assert task.compute_metrics(["positive", "maybe"], [["positive"], ["negative"]])["accuracy"] == 50.0


def test_squad_question_is_instruction_passage_is_input():
    task = get_task("squad")
    ex = {"id": "1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
          "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}
    instr, inp, tgt = task.to_prompt_target(ex)
    assert instr.endswith("Question: Where is Paris?") and inp == "Paris is in France." and tgt == "France"
    assert task.references(ex) == ["France", "in France"]
    assert task.check_example({**ex, "answers": {"text": [], "answer_start": []}}).startswith("field 'answers.text'")
    assert task.example_from_prompt("Where is Paris? ||| Paris is in France.") == {"question": "Where is Paris?", "context": "Paris is in France."}
    assert task.example_from_prompt('{"question": "q", "context": "c"}') == {"question": "q", "context": "c"}
    with pytest.raises(ValueError, match=r"\|\|\|"):
        task.example_from_prompt("no separator")
    assert task.compute_metrics(["in France"], [task.references(ex)]) == {"exact_match": 100.0, "f1": 100.0}


def test_xsum_summary_is_target():
    task = get_task("xsum")
    ex = {"document": "Long article.\nSecond line.", "summary": "Short summary.", "id": "7"}
    assert task.to_prompt_target(ex) == ("Summarize the article in one sentence.", "Long article.\nSecond line.", "Short summary.")
    assert task.check_example({**ex, "document": ""}) is None  # empty documents exist in XSum
    assert "summary" in task.check_example({**ex, "summary": " "})
    assert set(task.compute_metrics(["Short summary."], [["Short summary."]])) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"}


# --------------------------------------------------------------------------- a new task is one file

ECHO_TASK = """
\"\"\"Echo: repeat the key word of a line (a throw-away task for the extension test).\"\"\"
from lora_diffusion.tasks.base import Task


def echo_metrics(predictions, references):
    hits = sum(p.strip() == refs[0] for p, refs in zip(predictions, references))
    return {"echo_match": 100.0 * hits / max(len(predictions), 1), "echo_misses": float(len(predictions) - hits)}


class Echo(Task):
    def references(self, example):
        return [example["word"]]


TASK = Echo(
    name="echo", hub_id="none/echo", hub_config=None, required_fields=("line", "word"),
    instruction_template="Repeat the key word.", input_field="line", target_budget=4,
    metric_fn=echo_metrics, metrics={"echo_match": "max", "echo_misses": "min"}, headline="echo_match",
    corpus_fields=("line",),
)
"""


@pytest.fixture
def echo_task(tmp_path, monkeypatch):
    """The throw-away task as one file in a folder that task discovery reads as it reads tasks/; removed after."""
    folder = tmp_path / "more_tasks"
    folder.mkdir()
    (folder / "echo.py").write_text(ECHO_TASK)
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(folder)])
    tasks.discover()
    yield TASKS["echo"]
    del TASKS["echo"]
    sys.modules.pop("lora_diffusion.tasks.echo", None)


def test_a_new_task_is_one_file(echo_task, tmp_path):
    # the config validator accepts it
    assert load_config(None, ["task.name=echo"]).task.name == "echo"
    assert echo_task.compute_metrics(["hi", "no"], [["hi"], ["yes"]]) == {"echo_match": 50.0, "echo_misses": 1.0}

    # its metrics can be a sweep's objective, with their declared direction, and only for its own task
    def sweep(metric: str, task: str):
        return load_space(text=textwrap.dedent(f"""\
            name: t
            overrides: {{model.base: "builtin:tiny", task.name: {task}, train.max_steps: 20, train.report_every: 5}}
            params:
              train.lr: {{type: log_float, low: 1.0e-4, high: 1.0e-2}}
            metric: {metric}
            scheduler: {{name: none}}
            """))
    assert sweep("eval_echo_match", "echo").mode == "max" and sweep("eval_echo_misses", "echo").mode == "min"
    with pytest.raises(SpaceError, match="'eval_echo_match' is not computed for task 'sst2'"):
        sweep("eval_echo_match", "sst2")
    with pytest.raises(SpaceError, match="'eval_accuracy' is not computed for task 'echo'; allowed for echo: "
                                         "eval_denoise_acc, eval_denoise_acc_content, eval_echo_match, eval_echo_misses"):
        sweep("eval_accuracy", "echo")

    # pretrain reads its text fields from its files
    (tmp_path / "data" / "echo").mkdir(parents=True)
    rows = [{"line": "say hello", "word": "hello"}, {"line": "say bye", "word": "bye"}]
    (tmp_path / "data" / "echo" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = pretrain.task_files(str(tmp_path / "data"), ["echo"], ["train"])
    assert pretrain.read_texts(files, []) == ["say hello", "say bye"]
