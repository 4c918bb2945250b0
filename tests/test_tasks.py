"""Task registry and the example -> (instruction, input, target) mapping of each task."""

from __future__ import annotations

import pytest

from lora_diffusion.config import ConfigError, load_config
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
