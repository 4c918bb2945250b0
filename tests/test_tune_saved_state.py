"""sweep.resume.save_tune_decisions: Ray Tune 2.60 can save a trial whose own process was lost with its node as
RUNNING although it recorded the trial ERROR (seen on the local 2-node SLURM: console "1 ERROR", error.txt
written, experiment_state-*.json "status": "RUNNING"; the sweep then called it unfinished and exited 130).
The driver writes Tune's final in-memory state into the saved experiment state. Real Ray Trial objects
(no cluster); the file is Tune's format (trial_data: [trial JSON, runtime metadata JSON] per trial).
And the MLflow error tag of such a trial: Ray's error text, not "no error recorded by Ray"."""

from __future__ import annotations

import json

from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial

from lora_diffusion.sweep.resume import save_tune_decisions


def trial(tmp_path, tid: str, status: str) -> Trial:
    t = Trial("run_trial", config={"train.lr": 1e-3}, trial_id=tid, stub=True,
              storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="sweep", trial_dir_name=f"trial_{tid}"))
    t.set_status(status)
    return t


def test_a_trial_saved_running_but_ended_by_tune_is_saved_as_tune_ended_it(tmp_path):
    lost, done, going = trial(tmp_path, "lost", Trial.RUNNING), trial(tmp_path, "done", Trial.TERMINATED), \
        trial(tmp_path, "going", Trial.RUNNING)
    exp = tmp_path / "sweep"
    exp.mkdir(exist_ok=True)  # the trials' storage made it
    saved = {"trial_data": [list(t.get_json_state()) for t in (lost, done, going)], "runner_data": {"x": 1}, "stats": {}}
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({**saved, "trial_data": []}))  # older
    newest = exp / "experiment_state-2026-12-01_16-33-23.json"
    newest.write_text(json.dumps(saved))
    lost.set_status(Trial.ERROR)  # what Tune decided after it last saved the trial
    going.set_status(Trial.TERMINATED)  # e.g. stopped by SIGINT after the last save: left for a resume to decide

    assert save_tune_decisions(exp, [lost, done, going]) == ["run_trial_lost (RUNNING -> ERROR)"]
    state = json.loads(newest.read_text())
    assert [json.loads(e[0])["status"] for e in state["trial_data"]] == ["ERROR", "TERMINATED", "RUNNING"]
    assert json.loads(state["trial_data"][0][1]) == json.loads(lost.get_json_state()[1])  # its runtime metadata too
    assert state["runner_data"] == {"x": 1} and not list(exp.glob("*.tmp"))
    assert save_tune_decisions(exp, [lost, done, going]) == []  # nothing left to correct: the file is not rewritten


def test_no_saved_state_is_no_change(tmp_path):
    assert save_tune_decisions(tmp_path, [trial(tmp_path, "a", Trial.ERROR)]) == []


class CrashedTrial:  # what error_line reads of a Ray Trial in on_trial_error, before Tune synced its error file
    def __init__(self, error_file):
        self.error_file = error_file

    def get_error(self):
        return None  # Trial.get_error reads the storage path's copy: not written yet


def test_the_error_of_a_trial_lost_with_its_node_is_read_from_the_drivers_error_file(tmp_path):
    from lora_diffusion.sweep.states import error_line

    f = tmp_path / "error.txt"
    f.write_text("Failure # 1 (occurred at 2026-12-01_16-34-42)\nThe actor 5eb2 is unavailable: The actor is temporarily "
                 "unavailable: RpcError: RPC error: Socket closed rpc_code: 14.\n")
    assert error_line(CrashedTrial(str(f))).startswith("The actor 5eb2 is unavailable: ")
    assert error_line(CrashedTrial(None)) == "trial failed (no error recorded by Ray)"
