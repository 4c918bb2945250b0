"""`python -m lora_diffusion.train` on a real local Ray cluster: 2-worker DDP, a killed worker, a NaN loss.

One Ray cluster (started like the command starts it: token auth, dashboard on 127.0.0.1) serves
the three tests; `main()` runs in this process and uses it. MLflow is a real SQLite store.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_train import tiny_overrides, write_sst2  # noqa: E402 - the same tiny SST-2 rows and config

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from lora_diffusion.ray_runtime import start_ray

    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    assert not ray.is_initialized()
    start_ray(num_cpus=2, dashboard=True)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = saved


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("data"))


def ray_overrides(data_dir: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    return tiny_overrides(
        data_dir, "train.num_workers=2", "train.cpus_per_worker=1", "tracking.enabled=true",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.experiment={name}",
        f"tracking.run_name={name}", f"train.output_dir={tmp_path / 'out'}", *extra,
    )


def only_run(tmp_path: Path, experiment: str):
    from lora_diffusion.tracking import client

    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return c, runs[0]


@pytest.mark.timeout(300)
def test_two_worker_ddp_run_trains_checkpoints_and_tracks(ray_cluster, data_dir, tmp_path, monkeypatch):
    from lora_diffusion.adapter import load_adapter
    from lora_diffusion.train import main

    assert main(ray_overrides(data_dir, tmp_path, "ddp", "train.max_steps=8", "train.report_every=4",
                              "train.eval_at_end=true")) == 0
    c, run = only_run(tmp_path, "ddp")
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_type"] == "train" and run.data.tags["ray_run_name"] == "ddp"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["method.name"] == "lora_diffusion"
    for metric in ("loss", "denoise_loss", "reg_rank", "lr", "tokens_per_s", "peak_mem_mb"):
        assert [m.step for m in c.get_metric_history(rid, metric)] == [4, 8], metric
    assert "eval_accuracy" in run.data.metrics
    # system metrics of both DDP ranks (rank 1 under system/rank1/), each rank's node tagged
    assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    assert "system/rank1/cpu_utilization_percentage" in run.data.metrics
    assert run.data.tags["node_hostname"] and run.data.tags["ray_node_id"] and run.data.tags["node.rank1"]

    ckpt = tmp_path / "out" / "ddp" / "checkpoint_0000008"
    state = json.loads((ckpt / "train_state.json").read_text())
    # 64 examples over 2 ranks = 4 batches of 8 per rank and epoch: 8 steps end at epoch 1, batch 4
    assert (state["step"], state["epoch"], state["batch"]) == (8, 1, 4)
    assert (ckpt / "config.yaml").is_file() and (tmp_path / "out" / "ddp" / "checkpoint_0000004").is_dir()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from_mlflow, tok, _ = load_adapter(f"runs:/{rid}/adapter")
    from_disk, _, _ = load_adapter(str(ckpt / "adapter"))
    x = torch.randint(5, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
    t, instr = torch.tensor([0.3, 0.8]), torch.zeros(2, 16, dtype=torch.bool)
    instr[:, 1:4] = True
    target = torch.zeros_like(instr)
    target[:, 10:] = True
    assert torch.equal(from_mlflow(x, t, None, instr, target_mask=target), from_disk(x, t, None, instr, target_mask=target))
    # it trained: the up-projections started at zero
    assert any(float(v.abs().sum()) > 0 for k, v in from_disk.adapter_state_dict().items() if k.endswith("up.weight"))


def _train_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _latest_registered_step(run_dir: Path) -> int | None:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    if not snap.is_file():
        return None
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except json.JSONDecodeError:  # being written
        return None
    if not latest:
        return None
    return int(latest["checkpoint_dir_name"].rsplit("_", 1)[1])


@pytest.mark.timeout(420)
def test_killed_worker_is_restarted_from_the_last_checkpoint(ray_cluster, data_dir, tmp_path):
    from lora_diffusion.train import main

    every, max_steps = 10, 120  # at ~30 steps/s (idle box) the kill lands seconds before the end
    args = ray_overrides(data_dir, tmp_path, "kill", "method.name=bitfit", f"train.max_steps={max_steps}",
                         f"train.report_every={every}", "train.max_failures=1")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(args)), daemon=True)
    thread.start()
    run_dir = tmp_path / "out" / "kill"
    deadline = time.time() + 240
    while (_latest_registered_step(run_dir) is None or len(_train_workers()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    before = _latest_registered_step(run_dir)
    assert before is not None and before < max_steps, "no checkpoint before the deadline"
    victim = _train_workers()[-1]
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=360)
    assert not thread.is_alive() and result["rc"] == 0

    c, run = only_run(tmp_path, "kill")
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    history = c.get_metric_history(run.info.run_id, "step")
    after = sorted(int(m.value) for m in history if m.timestamp / 1000.0 > killed_at)
    assert after and after[-1] == max_steps, "no report after the kill: the run ended before the worker died"
    # the restarted group began at a checkpoint no older than the last one Ray had when the worker died
    assert after[0] - every >= before, (before, after[:3])
    assert json.loads((run_dir / f"checkpoint_{max_steps:07d}" / "train_state.json").read_text())["step"] == max_steps


@pytest.mark.timeout(300)
def test_nan_loss_fails_the_run_without_hanging(ray_cluster, data_dir, tmp_path, capsys):
    from lora_diffusion.train import main

    assert main(ray_overrides(data_dir, tmp_path, "nan", "method.name=weight_lora", "train.max_steps=20",
                              "train.report_every=1", "train.inject_nan_at_step=3")) == 1
    assert "loss became nan" in capsys.readouterr().err
    c, run = only_run(tmp_path, "nan")
    assert run.info.status == "FAILED"
    assert "loss became nan" in run.data.tags["error"] and "at step 3" in run.data.tags["error"]
    assert [int(m.value) for m in c.get_metric_history(run.info.run_id, "step")] == [1, 2]


@pytest.mark.timeout(240)
def test_tune_function_trial_reports_and_checkpoints_through_tune_reporter(ray_cluster, data_dir, tmp_path):
    """train_loop inside a Ray Tune function trial (no nested TorchTrainer), logging a child MLflow run."""
    from ray import tune

    from lora_diffusion.config import load_config
    from lora_diffusion.train_reporters import TuneReporter
    from lora_diffusion.tracking import RunTracker, client
    from lora_diffusion.train import train_loop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunTracker.start(uri, "tune")
    cfg = load_config(None, tiny_overrides(data_dir, "train.max_steps=2", "train.report_every=1", "train.cpus_per_worker=1"))

    def trial(space):
        train_loop({"config": cfg.to_dict(), "trial_name": None,
                    "mlflow": {"tracking_uri": uri, "experiment": "tune", "parent_run_id": space["parent"],
                               "tags": {"run_type": "trial"}}}, TuneReporter())

    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1}), param_space={"parent": parent.run_id},
                       run_config=tune.RunConfig(name="tune-reporter", storage_path=str(tmp_path / "tune")))
    result = tuner.fit()[0]
    parent.end("FINISHED")
    assert result.error is None and result.metrics["step"] == 2
    assert (Path(result.checkpoint.path) / "adapter" / "adapter_model.safetensors").is_file()
    c = client(uri)
    child = [r for r in c.search_runs([c.get_experiment_by_name("tune").experiment_id]) if r.info.run_id != parent.run_id]
    assert len(child) == 1 and child[0].info.status == "FINISHED"
    assert child[0].data.tags["mlflow.parentRunId"] == parent.run_id and child[0].data.tags["ray_trial_id"]
    assert child[0].data.tags["run_type"] == "trial"
