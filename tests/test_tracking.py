"""tracking.py against a real MLflow SQLite store: URIs, reachability, secrets, run life cycle."""

from __future__ import annotations

import socket

import pytest

from lora_diffusion.config import load_config
from lora_diffusion.tracking import (
    RunTracker,
    TrackingError,
    check_tracking_uri,
    client,
    is_secret_name,
    redact_uri,
    resolve_tracking_uri,
    run_tags,
    tracked_run,
)


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_resolve_order_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'env.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000", cwd=tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////abs/x.db", cwd=tmp_path) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("runs_here", cwd=tmp_path) == str(tmp_path.resolve() / "runs_here")


def test_unreachable_uris_fail_with_the_uri_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(TrackingError, match=rf"http://127.0.0.1:{port} is not reachable"):
        check_tracking_uri(f"http://127.0.0.1:{port}", timeout_s=3)
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'm.db'}")


def test_secrets_are_recognised_and_redacted():
    for name in ("RAY_AUTH_TOKEN", "api_key", "db.password", "client-secret", "HF_TOKEN", "aws_secret_access_key"):
        assert is_secret_name(name), name
    for name in ("model.max_length", "sampling.top_k", "train.lr", "task.name", "method.lora_diffusion.rank_early"):
        assert not is_secret_name(name), name
    assert redact_uri("postgresql://bob:hunter2@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"


def test_run_life_cycle(uri):
    check_tracking_uri(uri)
    cfg = load_config(None, ["model.base=builtin:tiny"])
    parent = RunTracker.start(uri, "exp-a", run_name="parent", tags=run_tags(cfg, "sweep", sweep="s1"))
    child = RunTracker.start(uri, "exp-a", parent_run_id=parent.run_id, tags=run_tags(cfg, "trial", ray_trial_id="t1"))
    child.log_params({"train.lr": 0.001, "RAY_AUTH_TOKEN": "abc", "method.weight_lora.target_modules": ["query", "value"]})
    child.log_metrics({"loss": 2.0, "ce_mid": float("nan"), "flag": True, "note": "x"}, step=1)
    child.log_metrics({"loss": 1.5}, step=2)
    child.end("FINISHED")
    parent.end("FINISHED")

    c = client(uri)
    run = c.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "method.weight_lora.target_modules": "['query', 'value']"}
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["run_type"] == "trial" and run.data.tags["task"] == "sst2" and run.data.tags["ray_trial_id"] == "t1"
    assert run.data.tags["base"] == "builtin:tiny" and len(run.data.tags["git_commit"]) == 40
    assert [(m.step, m.value) for m in c.get_metric_history(child.run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    assert "ce_mid" not in run.data.metrics and "flag" not in run.data.metrics
    assert c.get_run(parent.run_id).data.tags["sweep"] == "s1"

    # a run reused by id belongs to its creator: end() leaves it alone unless forced
    reused = RunTracker.start(uri, "exp-a", run_id=parent.run_id)
    assert not reused.owned


def test_tracked_run_ends_failed_with_error_and_never_running(uri):
    with pytest.raises(ZeroDivisionError):
        with tracked_run(uri, "exp-b") as run:
            run.log_metrics({"loss": 1.0}, step=1)
            1 / 0
    info = client(uri).get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags["error"].startswith("ZeroDivisionError")
    with tracked_run(uri, "exp-b") as ok:
        pass
    assert client(uri).get_run(ok.run_id).info.status == "FINISHED"


def test_run_type_is_checked():
    cfg = load_config(None, ["model.base=builtin:tiny"])
    with pytest.raises(ValueError, match="run_type: got 'nope'; allowed: sweep, trial, train"):
        run_tags(cfg, "nope")
