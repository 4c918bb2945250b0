"""Model cards and system metrics of a real training run (builtin:tiny, MLflow on SQLite, no Ray).

- The adapter artifact of the run carries README.md with base, method and settings, task, data source,
  steps, metrics, commit, trainable parameters and the load command; that command really runs.
- Registering the adapter (sweep.results.register_best) gives a model version whose description is the card.
- The run has MLflow system metrics (system/*) and the node tag.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
from pathlib import Path

import pytest

from lora_diffusion.config import load_config
from lora_diffusion.model_card import card_metrics, read_card, render_card
from lora_diffusion.train_reporters import LocalReporter
from lora_diffusion.tracking import client, git_commit
from lora_diffusion.train import train_loop
from test_train import tiny_overrides, write_sst2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 4-step run that logs into its own MLflow run (evaluation at the end, system metrics every 0.2 s)."""
    tmp = tmp_path_factory.mktemp("card")
    data = write_sst2(tmp / "data")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(None, tiny_overrides(data, "train.max_steps=4", "train.report_every=2", "train.eval_at_end=true",
                                           "sampling.steps=2", "tracking.enabled=true",
                                           "tracking.system_metrics_interval_s=0.2"))
    rep = LocalReporter(tmp / "ckpt")
    last = train_loop({"config": cfg.to_dict(), "resume_from": None, "trial_name": "card",
                       "mlflow": {"tracking_uri": uri, "experiment": "cards", "run_name": "card"}}, rep)
    return {"uri": uri, "cfg": cfg, "run_id": last["mlflow_run_id"], "last": last, "tmp": tmp, "rep": rep, "data": data}


def _logged_card(trained) -> str:
    c = client(trained["uri"])
    names = [a.path for a in c.list_artifacts(trained["run_id"], "adapter")]
    assert "adapter/README.md" in names, names
    return Path(c.download_artifacts(trained["run_id"], "adapter/README.md", str(trained["tmp"]))).read_text()


def test_logged_adapter_has_a_card_with_the_facts(trained):
    card = _logged_card(trained)
    cfg, last, run_id = trained["cfg"], trained["last"], trained["run_id"]
    assert card.startswith("# LoRA-Diffusion adapter: `lora_diffusion` on `sst2`")
    assert "| base | `builtin:tiny` (max_length 40) |" in card
    assert "| method | `lora_diffusion` |" in card
    assert "rank_early=8" in card and "rank_mid=4" in card and "rank_late=2" in card
    assert "| task | `sst2` |" in card
    assert f"local JSON Lines `{trained['data'] / 'sst2'}/`" in card and "8-example subset" in card
    assert "| steps | 4 of 4 (batch 8" in card and "lr 0.003" in card
    assert f"| trainable parameters | {int(last['trainable_params']):,} (" in card
    commit = git_commit()
    assert commit and f"| commit | `{commit}` |" in card
    # the final evaluation's metrics, as logged to the run
    run = client(trained["uri"]).get_run(run_id)
    assert "| eval_accuracy |" in card and "| eval_denoise_acc |" in card
    acc = run.data.metrics["eval_accuracy"]
    assert re.search(rf"\| eval_accuracy \| {re.escape(f'{acc:.4g}' if not float(acc).is_integer() else f'{int(acc):,}')} \|", card)
    assert "eval_n_examples" not in card and "eval_denoise_acc_t" not in card
    assert f"python -m lora_diffusion.generate --adapter runs:/{run_id}/adapter --task sst2 --prompt" in card
    # every checkpoint's adapter folder has one too (with the metrics of its step)
    early = read_card(trained["rep"].checkpoints[0] / "adapter")
    assert early is not None and "## Metrics (step 2)" in early and "eval_accuracy" not in early


def test_the_cards_load_command_runs(trained, monkeypatch, capsys):
    from lora_diffusion.generate import main

    card = _logged_card(trained)
    line = next(ln for ln in card.splitlines() if ln.startswith("python -m lora_diffusion.generate"))
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "lora_diffusion.generate"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])  # runs:/ URIs resolve against the run's store
    monkeypatch.chdir(trained["tmp"])
    assert main(argv[3:]) == 0
    out = capsys.readouterr().out
    assert out.strip(), "generate printed nothing"


def test_registered_version_description_is_the_card(trained):
    from lora_diffusion.sweep.results import register_best

    version = register_best(trained["uri"], "card-test", trained["run_id"], {"sweep": "cards", "metric": "eval_accuracy",
                                                                             "objective": "1.0"})
    mv = client(trained["uri"]).get_model_version("card-test", version)
    assert mv.description == _logged_card(trained)


def test_run_has_system_metrics_and_node_tags(trained):
    run = client(trained["uri"]).get_run(trained["run_id"])
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert "system/cpu_utilization_percentage" in system, sorted(run.data.metrics)
    assert "system/system_memory_usage_megabytes" in system
    assert run.data.tags["node_hostname"] == socket.gethostname()
    assert run.data.tags["node.rank0"].startswith(socket.gethostname())
    hist = client(trained["uri"]).get_metric_history(trained["run_id"], "system/cpu_utilization_percentage")
    assert hist and all(0.0 <= m.value <= 100.0 * (os.cpu_count() or 1) for m in hist)


def test_render_card_is_short_and_deterministic(tiny_config):
    metrics = {"eval_accuracy": 75.0, "eval_denoise_acc": 60.123456, "eval_denoise_acc_t50": 1.0,
               "eval_n_examples": 8.0, "val_loss": 1.25, "loss": 2.0, "lr": 1e-3, "step": 4}
    assert card_metrics(metrics) == {"eval_accuracy": 75.0, "eval_denoise_acc": 60.123456, "loss": 2.0,
                                     "val_loss": 1.25}
    counts = {"trainable": 1234, "total": 100000, "adapters": 1000, "encoder": 234}
    a = render_card(tiny_config, metrics, counts, 4, "runs:/abc/adapter", "deadbeef")
    assert a == render_card(tiny_config, metrics, counts, 4, "runs:/abc/adapter", "deadbeef")
    assert len(a) < 5000
    assert "1,234 (1.23 % of 100,000); adapters 1,000, encoder 234" in a
    assert "| eval_denoise_acc | 60.12 |" in a
    no_uri = render_card(tiny_config, {}, counts, 0)
    assert "--adapter <this folder>" in no_uri and "No evaluation metrics at this step." in no_uri


def test_a_run_shorter_than_one_interval_still_gets_a_sample(tmp_path):
    from lora_diffusion.system_metrics import start_monitor, stop_monitor
    from lora_diffusion.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunTracker.start(uri, "short")
    monitor = start_monitor(uri, run.run_id, rank=1, interval_s=60.0)  # far longer than the "run"
    stop_monitor(monitor)
    got = client(uri).get_run(run.run_id)
    assert "system/rank1/cpu_utilization_percentage" in got.data.metrics, sorted(got.data.metrics)
    assert got.data.tags["node.rank1"].startswith(socket.gethostname()) and "node_hostname" not in got.data.tags
    assert start_monitor(uri, None) is None and start_monitor(None, run.run_id) is None
