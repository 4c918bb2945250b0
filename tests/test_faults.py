"""Faults survived by a real sweep (issue 12, items 11 and 13): real services, real processes, real file systems.

- The MLflow server used as the tracking store is killed (SIGKILL to the process group this test started)
  mid-sweep. A short outage: the sweep waits (MLflow's bounded HTTP retries) and goes on. An outage longer
  than that wait: the sweep stops with its state saved, exit code 75, an error naming the store; after the
  server is back, `--resume` finishes it and every trial is in MLflow exactly once, with its full metric
  history and its adapter.
- Disk full in the storage folder and in the MLflow folder (a small tmpfs this test mounts and unmounts):
  the sweep stops with exit code 75 and an error naming the folder; the MLflow store, the earlier
  checkpoints and the Optuna study are intact; after space is freed `--resume` finishes the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_tune import write_sst2

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
STEPS, EVERY = 60, 10
SPACE = """\
name: faults
overrides:
  model.base: builtin:tiny
  model.max_length: 32
  task.eval_subset_size: 8
  train.batch_size: 8
  train.max_steps: STEPS
  train.warmup_steps: 0
  train.report_every: EVERY
  train.eval_every: EVERY
  train.val_examples: 16
  train.keep_checkpoints: 1
  sampling.steps: 2
params:
  train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  method.lora_diffusion.rank_early: {type: int, low: 2, high: 8}
metric: eval_denoise_acc
mode: max
sampler: {name: tpe, seed: 0, n_startup_trials: 10}
scheduler: {name: none}
num_samples: SAMPLES
max_concurrent: 1
resources: {workers: 1, cpus_per_worker: 1}
model_name: faults-best
"""
EXIT_FAULT = 75


def space_text(steps: int = STEPS, samples: int = 3) -> str:
    return SPACE.replace("STEPS", str(steps)).replace("EVERY", str(EVERY)).replace("SAMPLES", str(samples))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts in `root`), started and killed by PID."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc, self.starts = root, free_port(), None, 0
        root.mkdir(parents=True, exist_ok=True)
        self.db = root / "mlflow.db"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> float:
        import requests

        self.starts += 1
        log = open(self.root / f"server{self.starts}.log", "w")
        t0 = time.time()
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, (self.root / f"server{self.starts}.log").read_text()[-3000:]
            try:
                if requests.get(self.uri + "/health", timeout=2).status_code == 200:
                    return time.time() - t0
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL to the server's process group (the uvicorn workers with it), the way a crash ends it."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            self.proc = None


def driver(tmp_path: Path, space: Path, uri: str, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora_diffusion.tune", str(space), "--data-dir", str(tmp_path / "data"),
            "--storage-path", str(storage), "--tracking-uri", uri, "--num-cpus", "2", "--no-dashboard", *extra]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    e["RAY_DEDUP_LOGS"] = "0"
    e.update(extra)
    return e


def stop_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a driver's process group (the Ray processes it started), by its id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def progress(db: Path) -> dict[str, tuple[str, int]]:
    """ray_trial_id -> (trial_state, number of `loss` values), read straight from the store's SQLite file."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute(
                "SELECT a.value, b.value, (SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = a.run_uuid AND m.key = 'loss') "
                "FROM tags a JOIN tags b ON a.run_uuid = b.run_uuid "
                "WHERE a.key = 'ray_trial_id' AND b.key = 'trial_state'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return {}
    return {t: (s, n) for t, s, n in rows}


def wait_for(pred, proc: subprocess.Popen, log: Path, what: str, timeout: float = 400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        assert proc.poll() is None, f"driver ended (rc {proc.returncode}) before {what}:\n" + log.read_text()[-5000:]
        time.sleep(0.3)
    pytest.fail(f"not within {timeout} s: {what}\n" + log.read_text()[-5000:])


def check_every_trial_once(uri: str, exp_dir: Path, n: int, steps: int = STEPS) -> None:
    """Every Tune trial is one FINISHED child run of the sweep's one parent, with its full metric history
    (every report step once) and its adapter."""
    from mlflow import MlflowClient

    best = json.loads((exp_dir / "best.json").read_text())
    assert best["state"] == "FINISHED" and len(best["trials"]) == n
    tune_ids = {r["trial_id"] for r in best["trials"]}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("faults")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_state"] == "FINISHED"
    children = client.search_runs([exp.experiment_id], filter_string="tags.run_type = 'trial'", max_results=100)
    assert sorted(r.data.tags["ray_trial_id"] for r in children) == sorted(tune_ids)
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags["trial_state"] == "FINISHED", r.data.tags
        for key in ("loss", "val_loss"):
            logged = sorted(h.step for h in client.get_metric_history(r.info.run_id, key))
            assert logged == list(range(EVERY, steps + 1, EVERY)), (r.data.tags["ray_trial_id"], key, logged)
        assert [h.step for h in client.get_metric_history(r.info.run_id, "objective")] == [steps]
        assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(r.info.run_id, "adapter")}
    assert best["best"]["model_uri"] == "models:/faults-best/1"


# --------------------------------------------------------------------------- which errors are faults (fast)


def test_fault_of_recognises_environment_faults():
    import errno
    import sqlite3 as sq

    from mlflow.exceptions import MlflowException

    from lora_diffusion.faults import DISK, TRACKING, fault_of

    f = fault_of(OSError(errno.ENOSPC, "No space left on device", "/x/y.json"))
    assert f.kind == DISK and "/x/y.json" in str(f)
    assert fault_of(OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")).kind == DISK
    try:  # MLflow's SQL store wraps SQLite's error
        try:
            raise sq.OperationalError("database or disk is full")
        except sq.OperationalError as e:
            raise MlflowException(str(e)) from e
    except MlflowException as e:
        assert fault_of(e).kind == DISK
    refused = MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
                              "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: ... "
                              "(Caused by NewConnectionError(...: [Errno 111] Connection refused))")
    assert fault_of(refused).kind == TRACKING
    try:  # deep in a chain, as a trial's error arrives
        try:
            raise refused
        except MlflowException as e:
            raise RuntimeError("training stopped") from e
    except RuntimeError as e:
        assert fault_of(e).kind == TRACKING
    # not faults: the trial's own errors, a store that answers with a refusal
    assert fault_of(RuntimeError("train.fail_at_step=1: injected failure at step 1")) is None
    assert fault_of(ValueError("model.base: got 'x'")) is None
    assert fault_of(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert fault_of(MlflowException("API request to http://h/api/2.0/mlflow/runs/create failed with error code 400 != 200")) is None


def test_space_report_names_the_full_folder(tmp_path):
    from lora_diffusion.faults import space_report

    text = space_report({"storage path": tmp_path / "not" / "yet", "temporary folder": tmp_path})
    assert f"storage path {tmp_path / 'not' / 'yet'}: " in text and "free of" in text


def test_resume_records_trial_ends_mlflow_missed(tmp_path, monkeypatch):
    """A trial that ended while the store was down (Tune saved the end, MLflow did not hear of it) is recorded
    at the restore; a run that already says how it ended is left alone."""
    from types import SimpleNamespace

    import ray.tune
    from mlflow import MlflowClient

    from lora_diffusion.config import load_config
    from lora_diffusion.sweep.resume import record_missed_ends
    from lora_diffusion.sweep.runs import artifact_location
    from lora_diffusion.tracking import RunTracker, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["model.base=builtin:tiny", "train.max_steps=20"])
    exp_id = ensure_experiment(uri, "s", artifact_location(uri, "s"))
    parent = RunTracker.start(uri, "s", tags={"run_type": "sweep", "sweep": "s"})
    runs = {}
    for tid, state in (("missed", "RUNNING"), ("known", "FINISHED")):
        r = RunTracker.start(uri, "s", parent_run_id=parent.run_id, tags={"run_type": "trial", "ray_trial_id": tid,
                                                                           "trial_state": state})
        runs[tid] = r.run_id
    MlflowClient(uri).set_terminated(runs["known"], status="FINISHED")
    ended = [SimpleNamespace(trial_id=t, status="TERMINATED", last_result={"step": 20}, config={}, checkpoint=None,
                             __str__=lambda self: "t") for t in ("missed", "known")]
    monkeypatch.setattr(ray.tune, "ExperimentAnalysis", lambda path: SimpleNamespace(trials=ended))
    sweep = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent.run_id, "base": cfg.to_dict(),
             "experiment": "s", "name": "s"}
    known_end = MlflowClient(uri).get_run(runs["known"]).info.end_time
    record_missed_ends(sweep, tmp_path)
    missed = MlflowClient(uri).get_run(runs["missed"])
    assert missed.info.status == "FINISHED" and missed.data.tags["trial_state"] == "FINISHED"
    assert MlflowClient(uri).get_run(runs["known"]).info.end_time == known_end


# --------------------------------------------------------------------------- item 11: the MLflow server is killed


@pytest.mark.timeout(1800)
@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_server_killed_mid_sweep(tmp_path):
    write_sst2(tmp_path / "data")
    space = tmp_path / "faults.yaml"
    space.write_text(space_text())
    server = MlflowServer(tmp_path / "server")
    storage = tmp_path / "tune"
    log1 = tmp_path / "run1.log"
    proc = None
    try:
        first_start = server.start()
        # MLflow's HTTP retries are the bounded wait (default 7 retries, backoff factor 2: about 4 min). Here
        # factor 1 and as few retries as keep the wait (0+2+4+... = 2^n - 2 s) above 2.5x this server's start
        # time, so that outage 1 (a restart) is ridden out and outage 2 (no restart) is found soon.
        n = next(n for n in range(5, 11) if 2 ** n - 2 >= 2.5 * first_start)
        retry = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(n), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        print(f"mlflow server up in {first_start:.1f} s; MLflow retries {n} (wait {2 ** n - 2} s)")
        with open(log1, "w") as out:
            proc = subprocess.Popen(driver(tmp_path, space, server.uri, storage), cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT, env=env(**retry), start_new_session=True)
            # -- outage 1, shorter than the retries: the sweep waits and goes on -----------------------------
            first = wait_for(lambda: [t for t, (s, n) in progress(server.db).items() if s == "RUNNING" and n >= 1],
                             proc, log1, "a trial running with a logged loss")[0]
            logged_before = sum(n for _, n in progress(server.db).values())
            server.kill()
            t_kill = time.time()
            up = server.start()
            print(f"outage 1: server down {time.time() - t_kill:.1f} s (restart took {up:.1f} s)")
            # the sweep logs again (the killed trial may have been at its last step, past its last loss)
            wait_for(lambda: sum(n for _, n in progress(server.db).values()) > logged_before
                     or progress(server.db).get(first, ("", 0))[0] == "FINISHED", proc, log1,
                     "the trial logging again after the restart")
            # -- outage 2, longer than the retries: the sweep stops, resumably -------------------------------
            second = wait_for(lambda: [t for t, (s, n) in progress(server.db).items()
                                       if s == "RUNNING" and n >= 1 and t != first], proc, log1,
                              "a second trial running with a logged loss")[0]
            server.kill()
            t_kill = time.time()
            rc = proc.wait(timeout=2 * (2 ** n - 2) + 180)  # a request or two of retries, then the stop
        stopped_in = time.time() - t_kill
        out1 = log1.read_text()
        print(f"outage 2: the driver exited {rc} {stopped_in:.1f} s after the kill")
        print("\n".join(ln for ln in out1.splitlines() if "error" in ln.lower() or "[tune]" in ln)[-3000:])
        assert rc == EXIT_FAULT, out1[-6000:]
        assert f"tracking URI {server.uri}" in out1 and "--resume" in out1, out1[-4000:]
        assert "Traceback" not in out1.split("[tune] error")[-1]
        assert progress(server.db)[first][0] == "FINISHED"

        # -- the server is back: --resume finishes the sweep ---------------------------------------------
        server.start()
        out2 = subprocess.run(driver(tmp_path, space, server.uri, storage, "--resume"), cwd=tmp_path, capture_output=True,
                              text=True, env=env(**retry), timeout=500)
        (tmp_path / "run2.log").write_text(out2.stdout + out2.stderr)
        assert out2.returncode == 0, (out2.stdout + out2.stderr)[-6000:]
        assert "resuming sweep 'faults'" in out2.stdout
        check_every_trial_once(server.uri, storage / "faults", 3)
    finally:
        if proc is not None:
            stop_group(proc)
        server.kill()


# --------------------------------------------------------------------------- item 13: the disk fills up


DISK_STEPS = 200


def fill(folder: Path) -> int:
    """Write a filler file in `folder` until its file system is full; the bytes written."""
    n = 0
    with open(folder / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    n += f.write(chunk)
                except OSError:
                    break
    return n


def sqlite_ok(db: Path) -> None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", db


def tune_checkpoints(exp_dir: Path) -> dict[str, str]:
    """trial id -> the checkpoint folder Tune's saved state points to."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.checkpoint.path for t in ExperimentAnalysis(str(exp_dir)).trials if t.checkpoint is not None}


@pytest.mark.timeout(1200)
@pytest.mark.ray
@pytest.mark.slow
def test_disk_full_mid_sweep(tmp_path):
    """Storage path and MLflow store (SQLite file and artifacts) on a small tmpfs that this test fills mid-trial."""
    import optuna
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from lora_diffusion.checkpoint import read_train_state

    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount: {r.stderr.strip() or r.returncode}); the disk-full test needs "
                    "root or CAP_SYS_ADMIN")
    proc = None
    try:
        write_sst2(tmp_path / "data")
        space = tmp_path / "faults.yaml"
        # 2 trials of 200 steps: the second is still running after the fill however fast the machine is
        space.write_text(space_text(steps=DISK_STEPS, samples=2))
        storage, store = disk / "tune", disk / "mlflow"
        store.mkdir()
        db = store / "mlflow.db"
        uri = f"sqlite:///{db}"
        exp_dir = storage / "faults"
        log1 = tmp_path / "run1.log"
        with open(log1, "w") as out:
            proc = subprocess.Popen(driver(tmp_path, space, uri, storage), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                    env=env(), start_new_session=True)
            # a trial finished (its run, checkpoint and Optuna trial are what must survive); the next one running
            first = wait_for(lambda: [t for t, (s, n) in progress(db).items() if s == "FINISHED"], proc, log1,
                             "a finished trial")[0]
            wait_for(lambda: [t for t, (s, n) in progress(db).items() if s == "RUNNING" and n >= 1], proc, log1,
                     "a second trial running with a logged loss")
            client = MlflowClient(uri)
            (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                                        filter_string=f"tags.ray_trial_id = '{first}'")
            loss_before = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
            filled = fill(disk)
            t_fill = time.time()
            rc = proc.wait(timeout=400)
        stopped_in = time.time() - t_fill
        out1 = log1.read_text()
        print(f"filled {filled / 2**20:.1f} MiB; the driver exited {rc} {stopped_in:.1f} s later")
        print("\n".join(ln for ln in out1.splitlines() if "error" in ln.lower() or "[tune]" in ln)[-3000:])
        assert rc == EXIT_FAULT, out1[-6000:]
        assert "no space left on device" in out1 and f"storage path {exp_dir}: " in out1 and "(full)" in out1, out1[-4000:]
        assert "--resume" in out1

        # nothing recorded is corrupted: MLflow store, the finished trial's run, checkpoints, the Optuna study
        sqlite_ok(db)
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == loss_before
        ckpts = tune_checkpoints(exp_dir)
        assert first in ckpts
        for path in ckpts.values():
            assert read_train_state(path)["step"] > 0
            load_file(str(Path(path) / "adapter" / "adapter_model.safetensors"))
            load_file(str(Path(path) / "train_state.safetensors"))
        from lora_diffusion.sweep.search import open_optuna_storage, optuna_storage_spec

        study = optuna.load_study(study_name="faults", storage=open_optuna_storage(optuna_storage_spec(exp_dir, None)))
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 1

        # -- space freed: --resume finishes the sweep --------------------------------------------------------
        (disk / "filler").unlink()
        out2 = subprocess.run(driver(tmp_path, space, uri, storage, "--resume"), cwd=tmp_path, capture_output=True,
                              text=True, env=env(), timeout=600)
        (tmp_path / "run2.log").write_text(out2.stdout + out2.stderr)
        assert out2.returncode == 0, (out2.stdout + out2.stderr)[-6000:]
        check_every_trial_once(uri, exp_dir, 2, steps=DISK_STEPS)
    finally:
        if proc is not None:
            stop_group(proc)
        for _ in range(10):
            if subprocess.run(["umount", str(disk)], capture_output=True).returncode == 0:
                break
            time.sleep(2)
        else:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
