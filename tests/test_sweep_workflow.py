"""The researcher's workflow around a sweep, on real sweeps (`python -m lora_diffusion.tune` in a subprocess,
a fresh local Ray cluster, MLflow on SQLite, the Optuna study in its journal file):

- a two-objective sweep (eval_denoise_acc max, trainable_params min) whose first trial is the space's
  `initial_points` entry: the Pareto front in best.json, the trials table and the MLflow parent run;
- `--resume --num-samples N` extends the finished sweep: same Optuna study, same parent run, nothing re-run;
- `--warm-start` starts a new sweep from the best config of the first;
- optuna-dashboard on 127.0.0.1 against the journal: its HTTP API lists the study and its trials, and
  its page renders in headless Chromium with no console errors (screenshot).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_tune import write_sst2

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPACE = """\
name: two
overrides:
  model.base: builtin:tiny
  model.max_length: 32
  task.eval_subset_size: 8
  train.batch_size: 8
  train.max_steps: 4
  train.warmup_steps: 0
  train.report_every: 2
  train.eval_every: 2
  train.val_examples: 16
  train.keep_checkpoints: 1
  sampling.steps: 2
params:
  train.lr: {type: categorical, choices: [1.0e-2, 3.0e-3]}
  method.lora_diffusion.rank_early: {type: int, low: 2, high: 16}
  method.lora_diffusion.rank_mid: {type: int, low: 2, high: 16}
  method.lora_diffusion.rank_late: {type: int, low: 1, high: 16}
constraints: {rank_order: true}
metric: [eval_denoise_acc, trainable_params]
mode: [max, min]
initial_points:
  - {method.lora_diffusion.rank_early: 16, method.lora_diffusion.rank_mid: 8, method.lora_diffusion.rank_late: 2}
sampler: {name: tpe, seed: 3, n_startup_trials: 10}
scheduler: {name: asha, metric: val_loss, mode: min, grace_period: 1, reduction_factor: 2}
num_samples: 3
max_concurrent: 2
resources: {workers: 1, cpus_per_worker: 1}
model_name: two-best
"""
INITIAL = {"method.lora_diffusion.rank_early": 16, "method.lora_diffusion.rank_mid": 8, "method.lora_diffusion.rank_late": 2}


def driver(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora_diffusion.tune", str(tmp / "two.yaml"), "--data-dir", str(tmp / "data"),
            "--storage-path", str(tmp / "tune"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--num-cpus", "2", "--no-dashboard", *extra]


def run(tmp: Path, name: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    out = subprocess.run(driver(tmp, *extra), cwd=tmp, capture_output=True, text=True, env=env, timeout=560)
    text = out.stdout + out.stderr
    (tmp / f"{name}.log").write_text(text)
    assert out.returncode == 0, text[-6000:]
    return text


def runs_of(uri: str, experiment: str) -> tuple[object, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'sweep'")
    children = client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'trial'", max_results=100)
    return parents, children


def study(tmp: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(tmp / "tune" / name / "optuna_journal.log"))))


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """Three driver runs: the sweep, its extension to 5 trials, a warm-started sweep; what each left behind."""
    tmp = tmp_path_factory.mktemp("workflow")
    write_sst2(tmp / "data")
    (tmp / "two.yaml").write_text(SPACE)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out1 = run(tmp, "run1")
    best1 = json.loads((tmp / "tune" / "two" / "best.json").read_text())
    parents1, children1 = runs_of(uri, "two")
    before = {r.data.tags["ray_trial_id"]: (r.info.run_id, r.info.start_time) for r in children1}
    out2 = run(tmp, "run2", "--resume", "--num-samples", "5")
    best2 = json.loads((tmp / "tune" / "two" / "best.json").read_text())
    out3 = run(tmp, "run3", "--name", "warm", "--warm-start", "two", "--warm-start-k", "1", "--num-samples", "2")
    best3 = json.loads((tmp / "tune" / "warm" / "best.json").read_text())
    return {"tmp": tmp, "uri": uri, "out1": out1, "best1": best1, "parents1": parents1, "children1": children1, "before": before,
            "out2": out2, "best2": best2, "out3": out3, "best3": best3}


def dominated(a: list[float], b: list[float]) -> bool:
    """a (max, min) is dominated by b."""
    return b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1])


def test_two_objectives_pareto_front_and_initial_point(workflow):
    tmp, best, out = workflow["tmp"], workflow["best1"], workflow["out1"]
    assert (tmp / "tune" / "two" / "optuna_journal.log").is_file() and not (tmp / "tune" / "two" / "optuna_study.db").exists()
    assert best["metrics"] == ["eval_denoise_acc", "trainable_params"] and best["modes"] == ["max", "min"]
    assert best["asha"].startswith("on min val_loss (one metric")
    assert "ASHA on min val_loss (one metric" in out and "Pareto front of max eval_denoise_acc, min trainable_params" in out
    assert "pareto" in out.split("best trials by")[1].splitlines()[1]  # the table's header has the front column

    # the front: exactly the finished trials that no other finished trial dominates, read from MLflow
    children = workflow["children1"]
    assert len(children) == 3
    finished = {r.data.tags["ray_trial_id"]: [r.data.metrics["eval_denoise_acc"], r.data.metrics["trainable_params"]]
                for r in children if r.data.tags["trial_state"] == "FINISHED"}
    assert finished
    expected = {t for t, v in finished.items() if not any(dominated(v, w) for o, w in finished.items() if o != t)}
    front = best["pareto_front"]
    assert {f["trial_id"] for f in front} == expected
    for f in front:
        assert [f["values"]["eval_denoise_acc"], f["values"]["trainable_params"]] == finished[f["trial_id"]]
    # the registered best is the front's best first objective
    assert best["best"]["trial_id"] == max(front, key=lambda f: f["values"]["eval_denoise_acc"])["trial_id"]
    assert best["best"]["model_uri"] == "models:/two-best/1"

    # the parent run carries the front
    (parent,) = workflow["parents1"]
    assert set(parent.data.tags["pareto_front_trials"].split(",")) == expected
    assert parent.data.metrics["pareto_front_size"] == len(expected)
    assert parent.data.params["sweep.objectives"] == "eval_denoise_acc:max, trainable_params:min"

    # Optuna: a two-objective study; its first trial is the space's initial point
    s = study(tmp, "two")  # (by now extended to 5 trials: the first 3 are this sweep's)
    assert [d.name for d in s.directions] == ["MAXIMIZE", "MINIMIZE"]
    first = min(s.trials, key=lambda t: t.number)
    assert {k: first.params[k] for k in INITIAL} == INITIAL
    by_params = {r.data.tags["ray_trial_id"]: r.data.params for r in children}
    assert any(all(p[k] == str(v) for k, v in INITIAL.items()) for p in by_params.values())
    done = [t for t in sorted(s.trials, key=lambda t: t.number)[:3] if t.state.name == "COMPLETE"]
    assert len(done) == len(finished) and all(len(t.values) == 2 for t in done)


def test_resume_with_more_samples_extends_the_same_study_and_parent_run(workflow):
    tmp, best, out = workflow["tmp"], workflow["best2"], workflow["out2"]
    assert "extending sweep 'two' from 3 to 5 trials" in out
    assert best["state"] == "FINISHED" and best["trials_planned"] == 5 and len(best["trials"]) == 5
    parents, children = runs_of(workflow["uri"], "two")
    assert len(parents) == 1 and parents[0].info.run_id == workflow["parents1"][0].info.run_id
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["extended"] == "3 -> 5 trials"
    assert len(children) == 5 and {r.data.tags["ray_trial_id"] for r in children} == {r["trial_id"] for r in best["trials"]}
    # the first three were not run again
    for r in children:
        tid = r.data.tags["ray_trial_id"]
        if tid in workflow["before"]:
            assert (r.info.run_id, r.info.start_time) == workflow["before"][tid]
    assert len(set(workflow["before"]) & {r.data.tags["ray_trial_id"] for r in children}) == 3
    s = study(tmp, "two")
    assert len(s.trials) == 5 and all(t.state.is_finished() for t in s.trials)
    assert json.loads((tmp / "tune" / "two" / "sweep.json").read_text())["space"]["num_samples"] == 5


def test_warm_start_tries_the_best_config_of_the_earlier_sweep_first(workflow):
    tmp, best3, out = workflow["tmp"], workflow["best3"], workflow["out3"]
    b = workflow["best2"]["best"]["params"]
    assert "warm start: the best 1 config(s) of" in out
    s = study(tmp, "warm")
    trials = sorted(s.trials, key=lambda t: t.number)
    assert len(trials) == 2
    # enqueued in order: the space's initial point, then the earlier sweep's best
    assert {k: trials[0].params[k] for k in INITIAL} == INITIAL
    assert trials[1].params == b
    assert best3["initial_points"][1] == b and len(best3["trials"]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.browser
@pytest.mark.timeout(900)
def test_optuna_dashboard_serves_the_sweep_journal(workflow):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report_browser import open_page

    tmp = workflow["tmp"]
    journal = tmp / "tune" / "two" / "optuna_journal.log"
    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    log = open(tmp / "dashboard.log", "w")
    proc = subprocess.Popen([str(exe), str(journal), "--host", "127.0.0.1", "--port", str(port)], cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                studies = get_json(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, (tmp / "dashboard.log").read_text()[-3000:]
                assert time.time() < deadline, "optuna-dashboard did not answer within 90 s"
                time.sleep(0.5)
        (entry,) = [x for x in studies if x["study_name"] == "two"]
        detail = get_json(f"{base}/api/studies/{entry['study_id']}")
        assert len(detail["trials"]) == 5
        assert {t["state"] for t in detail["trials"]} <= {"Complete", "Pruned"}
        assert len(detail["directions"]) == 2
        # the dashboard's Pareto front (Optuna's) is the one in best.json
        front = {frozenset((p["name"], p["param_external_value"]) for p in t["params"]) for t in detail["best_trials"]}
        ours = {frozenset((k, str(v)) for k, v in f["params"].items()) for f in workflow["best2"]["pareto_front"]}
        assert front == ours and front

        url = f"{base}/dashboard/studies/{entry['study_id']}"
        res = open_page(url, timeout_s=90, expression="document.body.innerText",
                        ready=lambda text: bool(text) and "two" in text and "Trials" in text)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    (tmp / "optuna_dashboard.png").write_bytes(res.screenshot)
    if os.environ.get("LORA_DIFFUSION_SCREENSHOTS"):  # where the README's screenshot was taken from
        Path(os.environ["LORA_DIFFUSION_SCREENSHOTS"], "optuna_dashboard.png").write_bytes(res.screenshot)
    assert res.exceptions == [], res.exceptions
    assert res.console_errors == [], res.console_errors
    assert [u for u in res.external_requests if not u.startswith(base)] == []
    assert "two" in res.value and res.screenshot.startswith(b"\x89PNG")
