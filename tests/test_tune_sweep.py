"""Real sweeps: `python -m lora_diffusion.tune` in a subprocess, a fresh local Ray cluster, MLflow on SQLite.

- A 6-trial sweep (2 at once, ASHA, one trial that raises) killed by PID mid-sweep and resumed with
  --resume: every trial once as a child run of one parent, params = what Optuna sampled, constraints
  hold, a trial PRUNED by ASHA, the failing one FAILED with its error, nothing that ended re-runs, and
  the best adapter registered and reloaded by models:/ to the same outputs.
- SIGTERM (what SLURM sends before the time limit): the driver stops, saves the sweep and exits 143.
- Multi-worker trials: each trial builds and fits a TorchTrainer (2 DDP workers) and reports through
  TuneReportCallback.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_tune import write_sst2

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SWEEP = """\
name: sweep
overrides:
  model.base: builtin:tiny
  model.max_length: 32
  task.eval_subset_size: 8
  train.batch_size: 8
  train.max_steps: 8
  train.warmup_steps: 0
  train.report_every: 2
  train.eval_every: 2           # val_loss (fixed noise) at every report: what ASHA compares
  train.val_examples: 16
  train.keep_checkpoints: 1
  sampling.steps: 2
params:
  train.lr: {type: categorical, choices: [1.0e-7, 1.0e-2]}   # 1e-7 learns nothing: ASHA's prey
  method.lora_diffusion.b1: {type: float, low: 0.1, high: 0.5}
  method.lora_diffusion.b2: {type: float, low: 0.3, high: 0.9}
  method.lora_diffusion.rank_early: {type: int, low: 2, high: 8}
  method.lora_diffusion.rank_mid: {type: int, low: 2, high: 8}
  method.lora_diffusion.rank_late: {type: int, low: 1, high: 8}
  train.fail_at_step: {type: categorical, choices: [null, 1]}  # the injected failure
constraints: {phase_gap: 0.1, rank_order: true}
metric: eval_denoise_acc
mode: max
sampler: {name: tpe, seed: SEED, n_startup_trials: 10}
scheduler: {name: asha, metric: val_loss, mode: min, grace_period: 1, reduction_factor: 2}
num_samples: 6
max_concurrent: 2
resources: {workers: 1, cpus_per_worker: 1}
model_name: tiny-sweep-best
"""
GOOD, BAD = 1e-2, 1e-7
# the kill-and-resume sweep trains longer, so that trials are still running when the driver is killed
LONG_STEPS, LONG_EVERY = 160, 20


def long_sweep(seed: int) -> str:
    return (SWEEP.replace("SEED", str(seed)).replace("train.max_steps: 8", f"train.max_steps: {LONG_STEPS}")
            .replace("train.report_every: 2", f"train.report_every: {LONG_EVERY}")
            .replace("train.eval_every: 2 ", f"train.eval_every: {LONG_EVERY} "))


def choose_seed(tmp_path: Path) -> tuple[int, list[dict]]:
    """The first sampler seed whose 6 configs (deterministic, as --dry-run shows) make a telling sweep:
    trials 1-2 learn and finish (so ASHA has a record when later trials reach a rung), among trials 3-6
    exactly one raises, trial 3 or 4 does not learn (ASHA stops it early), one learns, and trial 6
    does not raise, so it is still running, however fast the machine, when the driver is killed after
    the first prune."""
    from lora_diffusion.search_space import load_space

    for seed in range(2000):
        samples = load_space(text=long_sweep(seed)).sample(6)
        ok = lambda s, lr: s["train.lr"] == lr and s["train.fail_at_step"] is None  # noqa: E731
        later = samples[2:]
        if (ok(samples[0], GOOD) and ok(samples[1], GOOD) and sum(s["train.fail_at_step"] == 1 for s in later) == 1
                and any(ok(s, BAD) for s in later[:2]) and any(ok(s, GOOD) for s in later)
                and samples[5]["train.fail_at_step"] is None):
            return seed, samples
    raise AssertionError("no seed in 0..1999 gives the wanted sweep")


def driver(tmp_path: Path, space: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora_diffusion.tune", str(space), "--data-dir", str(tmp_path / "data"),
            "--storage-path", str(tmp_path / "tune"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--num-cpus", "2", "--no-dashboard", *extra]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    e["RAY_DEDUP_LOGS"] = "0"
    return e


def trial_states(db: Path) -> dict[str, str]:
    """ray_trial_id -> trial_state, read straight from the MLflow SQLite file (the driver keeps writing it)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute(
                "SELECT a.value, b.value FROM tags a JOIN tags b ON a.run_uuid = b.run_uuid "
                "WHERE a.key = 'ray_trial_id' AND b.key = 'trial_state'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return {}
    return dict(rows)


def stop_group(proc: subprocess.Popen) -> None:
    """Kill what is left of the driver's process group (the Ray processes it started), by its id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def child_runs(client, experiment_id: str, parent_id: str) -> list:
    runs = client.search_runs([experiment_id], filter_string="tags.run_type = 'trial'", max_results=100)
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in runs)
    return runs


@pytest.mark.timeout(900)
def test_sweep_killed_and_resumed(tmp_path):
    from mlflow import MlflowClient

    write_sst2(tmp_path / "data")
    seed, samples = choose_seed(tmp_path)
    space = tmp_path / "sweep.yaml"
    space.write_text(long_sweep(seed))
    db = tmp_path / "mlflow.db"

    # -- run 1: killed by PID once a trial has finished and one was stopped by ASHA ----------------------
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(driver(tmp_path, space), cwd=tmp_path, stdout=log1, stderr=subprocess.STDOUT, env=env(),
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            states = trial_states(db)
            if "PRUNED" in states.values() and "FINISHED" in states.values():
                break
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-4000:]
            time.sleep(0.2)
        else:
            pytest.fail("no trial pruned and finished within 600 s:\n" + (tmp_path / "run1.log").read_text()[-4000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
        log1.close()
    ended_before = {t: s for t, s in trial_states(db).items() if s in ("FINISHED", "PRUNED", "FAILED")}
    assert len(ended_before) < 6, "the sweep ended before the kill; nothing left to resume"
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("sweep")
    before = {r.data.tags["ray_trial_id"]: (r.info.run_id, r.info.start_time, len(client.get_metric_history(r.info.run_id, "loss")))
              for r in client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'trial'")
              if r.data.tags["ray_trial_id"] in ended_before}

    # -- run 2: --resume completes the sweep ----------------------------------------------------------
    with open(tmp_path / "run2.log", "w") as log2:
        proc2 = subprocess.Popen(driver(tmp_path, space, "--resume"), cwd=tmp_path, stdout=log2, stderr=subprocess.STDOUT,
                                 env=env(), start_new_session=True)
        try:
            rc = proc2.wait(timeout=600)
        finally:
            stop_group(proc2)
    out2 = (tmp_path / "run2.log").read_text()
    assert rc == 0, out2[-6000:]
    assert "resuming sweep 'sweep'" in out2 and "best trials by max eval_denoise_acc" in out2

    best = json.loads((tmp_path / "tune" / "sweep" / "best.json").read_text())
    tune_ids = {r["trial_id"] for r in best["trials"]}
    assert len(tune_ids) == 6 and best["state"] == "FINISHED"

    # one parent, every trial once as its child
    parents = client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = child_runs(client, exp.experiment_id, parent.info.run_id)
    by_trial = {r.data.tags["ray_trial_id"]: r for r in children}
    assert len(children) == 6 and set(by_trial) == tune_ids

    # params = what Optuna sampled; constraints hold; the sampled sequence is the --dry-run one
    import mlflow

    study_file = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="optuna_study.json",
                                                     dst_path=str(tmp_path), tracking_uri=f"sqlite:///{db}")
    study = json.loads(Path(study_file).read_text())
    sampled = {t["ray_trial_id"]: t["params"] for t in study["trials"] if t["ray_trial_id"]}
    assert set(sampled) == tune_ids
    for tid, run in by_trial.items():
        for key, value in sampled[tid].items():
            assert run.data.params[key] == str(value), (tid, key)
        p = {k: float(v) for k, v in run.data.params.items() if k.startswith("method.lora_diffusion.") and
             k.rsplit(".", 1)[1] in ("b1", "b2", "rank_early", "rank_mid", "rank_late")}
        assert 0 < p["method.lora_diffusion.b1"] < p["method.lora_diffusion.b2"] < 1
        assert p["method.lora_diffusion.b2"] - p["method.lora_diffusion.b1"] >= 0.1 - 1e-9
        assert p["method.lora_diffusion.rank_early"] >= p["method.lora_diffusion.rank_mid"] >= p["method.lora_diffusion.rank_late"]
    # the first configs are the ones --dry-run shows for this seed
    assert {json.dumps(s, sort_keys=True) for s in samples[:2]} <= {json.dumps(r["params"], sort_keys=True) for r in best["trials"]}

    # states: one FAILED with its error, at least one PRUNED by ASHA, the rest FINISHED with adapter + objective
    states = {tid: r.data.tags["trial_state"] for tid, r in by_trial.items()}
    failed = [r for r in children if r.data.tags["trial_state"] == "FAILED"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "fail_at_step=1" in failed[0].data.tags["error"] and failed[0].data.params["train.fail_at_step"] == "1"
    pruned = [r for r in children if r.data.tags["trial_state"] == "PRUNED"]
    assert pruned and all(r.info.status == "KILLED" and int(r.data.tags["pruned_at_step"]) < LONG_STEPS for r in pruned)
    finished = [r for r in children if r.data.tags["trial_state"] == "FINISHED"]
    assert len(finished) + len(pruned) + 1 == 6 and finished
    for r in finished:
        assert r.info.status == "FINISHED" and "objective" in r.data.metrics and r.data.metrics["step"] == LONG_STEPS
        assert [h.step for h in client.get_metric_history(r.info.run_id, "objective")] == [LONG_STEPS]
        assert {"adapter", "config.yaml", "eval"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    assert states == {r["trial_id"]: r["state"] for r in best["trials"]}

    # nothing that had ended before the kill ran again: same run, same start, same metric history
    for tid, (run_id, start, n_loss) in before.items():
        r = by_trial[tid]
        assert r.info.run_id == run_id and r.info.start_time == start and r.data.tags["trial_state"] == ended_before[tid]
        assert len(client.get_metric_history(run_id, "loss")) == n_loss, tid

    # the best adapter: registered with its run as lineage, and models:/ reloads it to the same outputs
    b = best["best"]
    assert parent.data.tags["best_run_id"] == b["run_id"] and parent.data.tags["best_model_uri"] == b["model_uri"]
    assert b["model_uri"] == "models:/tiny-sweep-best/1" and b["trial_id"] in {r.data.tags["ray_trial_id"] for r in finished}
    objectives = [r.data.metrics["objective"] for r in finished]
    assert b["objective"] == max(objectives)
    mv = client.get_model_version("tiny-sweep-best", "1")
    assert mv.run_id == b["run_id"] and mv.source == f"runs:/{b['run_id']}/adapter"
    assert {"best.json", "optuna_study.json", "trials.csv", "space"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    try:
        from lora_diffusion.adapter import load_adapter

        registered, tok, _ = load_adapter(b["model_uri"])
        local, _, _ = load_adapter(str(Path(b["checkpoint"]) / "adapter"))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, len(tok), (2, 16), generator=g)
    t = torch.tensor([0.3, 0.8])
    mask = torch.ones_like(x)
    instr = torch.zeros_like(x, dtype=torch.bool)
    instr[:, 1:4] = True
    reg_state, local_state = registered.adapter_state_dict(), local.adapter_state_dict()
    assert reg_state.keys() == local_state.keys() and all(torch.equal(reg_state[k], local_state[k]) for k in reg_state)
    with torch.no_grad():
        target = torch.zeros_like(instr)
        target[:, 10:] = True
        assert torch.equal(registered(x, t, mask, instr, target_mask=target), local(x, t, mask, instr, target_mask=target))


@pytest.mark.timeout(600)
def test_sigterm_saves_the_sweep(tmp_path):
    """SLURM sends SIGTERM before the time limit: Tune saves the sweep, the driver exits 143, MLflow says so."""
    from mlflow import MlflowClient
    from ray import tune

    write_sst2(tmp_path / "data")
    space = tmp_path / "sweep.yaml"
    space.write_text(SWEEP.replace("SEED", "0").replace("max_concurrent: 2", "max_concurrent: 1")
                     .replace("train.max_steps: 8", "train.max_steps: 400").replace("num_samples: 6", "num_samples: 3")
                     .replace("scheduler: {name: asha,", "scheduler: {name: none,")
                     .replace("train.fail_at_step: {type: categorical, choices: [null, 1]}  # the injected failure", ""))
    db = tmp_path / "mlflow.db"
    proc = subprocess.Popen(driver(tmp_path, space), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(), start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and "RUNNING" not in trial_states(db).values():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.5)
        assert "RUNNING" in trial_states(db).values(), "no trial started within 400 s"
        time.sleep(3)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        stop_group(proc)
    assert proc.returncode == 143, out[-4000:]
    assert "the sweep was interrupted; its state is saved" in out and "--resume" in out
    assert tune.Tuner.can_restore(str(tmp_path / "tune" / "sweep"))
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("sweep")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'sweep'")
    assert parent.info.status == "KILLED" and parent.data.tags["sweep_state"] == "INTERRUPTED"
    children = child_runs(client, exp.experiment_id, parent.info.run_id)
    assert children and all(r.info.status != "RUNNING" for r in children)
    assert "INTERRUPTED" in {r.data.tags["trial_state"] for r in children}


@pytest.mark.timeout(600)
def test_multi_worker_trials_fit_a_torch_trainer(tmp_path):
    """workers > 1: each trial builds a TorchTrainer (2 DDP workers); metrics reach Tune via TuneReportCallback."""
    from mlflow import MlflowClient

    write_sst2(tmp_path / "data")
    space = tmp_path / "ddp.yaml"
    space.write_text(SWEEP.replace("name: sweep", "name: ddp").replace("SEED", "0").replace("num_samples: 6", "num_samples: 1")
                     .replace("max_concurrent: 2", "max_concurrent: 1").replace("workers: 1", "workers: 2")
                     .replace("scheduler: {name: asha,", "scheduler: {name: none,")
                     .replace("train.fail_at_step: {type: categorical, choices: [null, 1]}  # the injected failure", "")
                     .replace("model_name: tiny-sweep-best", "model_name: tiny-ddp-best"))
    out = subprocess.run(driver(tmp_path, space), cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=560)
    (tmp_path / "driver.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddp")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'sweep'")
    children = child_runs(client, exp.experiment_id, parent.info.run_id)
    assert len(children) == 1
    for r in children:
        assert r.data.tags["trial_state"] == "FINISHED" and r.info.status == "FINISHED"
        assert r.data.params["train.num_workers"] == "2"
        assert [h.step for h in client.get_metric_history(r.info.run_id, "objective")] == [8]
        assert [h.step for h in client.get_metric_history(r.info.run_id, "val_loss")] == [2, 4, 6, 8]
        assert "adapter" in {a.path for a in client.list_artifacts(r.info.run_id)}
    best = json.loads((tmp_path / "tune" / "ddp" / "best.json").read_text())
    assert best["best"]["model_uri"] == "models:/tiny-ddp-best/1"
    # the trials' TorchTrainer runs live under the experiment folder (restorable by name)
    assert sorted(p.name for p in (tmp_path / "tune" / "ddp" / "train").iterdir()) == sorted(
        f"trial_{r.data.tags['ray_trial_id']}" for r in children)
