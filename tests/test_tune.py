"""`python -m lora_diffusion.tune` without a cluster: --dry-run, errors before Ray starts, driver helpers.

Nothing here starts Ray: `ray.init` is replaced by a function that fails the test if it is called.
The real sweeps (local Ray cluster, MLflow SQLite) are in test_tune_sweep.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_diffusion import tune
from lora_diffusion.search_space import load_space

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(*a, **k):
        raise AssertionError("ray.init was called: this path must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert not ray.is_initialized()


POS = ["very good movie", "great fun film", "the best story", "love this film", "funny and great"]
NEG = ["very bad movie", "boring and dull film", "the worst story", "hate this film", "sad and boring"]


def write_sst2(root: Path, n_train: int = 64, n_val: int = 16) -> Path:
    """A few SST-2 rows (Hub schema) under root/sst2/, in words of the builtin:tiny vocabulary."""
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(root / "sst2" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = i % 2
                words = (POS if label else NEG)[(i // 2) % len(POS)]
                f.write(json.dumps({"sentence": words, "label": label, "idx": i}) + "\n")
    return root


def write_space(tmp_path: Path, body: str, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


TINY = """\
name: tiny
overrides:
  model.base: builtin:tiny
  model.max_length: 32
  train.max_steps: 4
  train.warmup_steps: 0
  train.report_every: 2
params:
  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
metric: loss
num_samples: 3
resources: {cpus_per_worker: 1}
"""


# --------------------------------------------------------------------------- --dry-run


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_dry_run_passes_on_every_shipped_space(path, tmp_path, capsys, no_ray, monkeypatch, shared_data):
    monkeypatch.chdir(tmp_path)  # --dry-run checks the data like a real run: the real files
    rc = tune.main([str(path), "--dry-run", "--samples", "3", "--data-dir", str(shared_data)])
    out = capsys.readouterr().out
    assert rc == 0, out
    s = load_space(path)
    assert f"sweep {s.name!r}" in out and "resource plan:" in out and f"trials: {s.spec.num_samples}" in out
    assert "first 3 of" in out and "dry run: nothing started" in out
    assert not (tmp_path / "tune_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_dry_run_command_line(tmp_path):
    """The real command in a fresh process: prints the plan, writes nothing, starts nothing."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    data = write_sst2(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "lora_diffusion.tune", str(REPO / "tune_spaces" / "quick.yaml"),
                          "--dry-run", "--data-dir", str(data), "train.max_steps=60", "--num-samples", "5"],
                         cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert f"data={data}" in out.stdout and "max_steps=60" in out.stdout and "trials: 5" in out.stdout
    assert "rank_early >= rank_mid >= rank_late" in out.stdout and "ASHA on min val_loss" in out.stdout
    assert "checked as a real run checks before it starts Ray: data files, base model(s), MLflow store" in out.stdout
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------- errors before Ray


@pytest.mark.parametrize("body, expected", [
    (TINY.replace("train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}",
                  "method.lora_diffusion.b1: {type: float, low: 0.7, high: 0.9}\n"
                  "  method.lora_diffusion.b2: {type: float, low: 0.2, high: 0.6}"), "no b1 < b2"),
    (TINY.replace("train.lr:", "train.learning_rate:"), "params.train.learning_rate: unknown parameter"),
    (TINY.replace("{type: log_float, low: 1.0e-4, high: 1.0e-2}", "{type: categorical, choices: []}"), "choices: empty"),
    (TINY.replace("train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}",
                  "method.lora_diffusion.rank_mid: {type: int, low: -8, high: -2}"), "-8 is not a valid value"),
    (TINY.replace("metric: loss", "metric: accuracy"), "unknown metric 'accuracy'"),
    (TINY.replace("name: tiny", "name: 'bad name/with slash'"), "name: got 'bad name/with slash'"),
], ids=["b1>=b2", "unknown-param", "empty-choices", "negative-rank", "unknown-metric", "bad-name"])
def test_bad_spaces_fail_before_ray(body, expected, tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = tune.main([str(write_space(tmp_path, body))])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "tune_results").exists()


def test_missing_data_and_disabled_tracking_fail_before_ray(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    space = write_space(tmp_path, TINY)
    assert tune.main([str(space), "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no folder 'sst2'" in err and str(tmp_path / "empty") in err
    assert tune.main([str(space), "--data-dir", str(tmp_path / "empty"), "tracking.enabled=false"]) == 2
    assert "tracking.enabled" in capsys.readouterr().err
    data = write_sst2(tmp_path / "data")
    assert tune.main([str(space), "--data-dir", str(data), "--tracking-uri", f"sqlite:///{tmp_path}/no/such/dir/m.db"]) == 2
    err = capsys.readouterr().err
    assert "tracking URI" in err and "does not exist" in err


def test_resume_needs_an_existing_sweep_and_the_same_settings(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    assert tune.main([str(space), "--resume", "--storage-path", str(tmp_path / "st")]) == 2
    assert "--resume: no sweep 'tiny'" in capsys.readouterr().err
    # an experiment folder written by a run with other settings is not resumed with these
    s = load_space(space, overrides=["train.max_steps=6"])
    exp = tmp_path / "st" / "tiny"
    exp.mkdir(parents=True)
    (exp / tune.SWEEP_FILE).write_text(json.dumps(tune.sweep_fingerprint(s)))
    assert tune.main([str(space), "--storage-path", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert "started with different settings" in err and "base.train.max_steps: was 6, now 4" in err and "--name" in err


# --------------------------------------------------------------------------- driver helpers


def test_trial_state():
    assert tune.trial_state("ERROR", {"step": 2}, 8) == tune.FAILED
    assert tune.trial_state("TERMINATED", {"step": 8}, 8) == tune.FINISHED
    assert tune.trial_state("TERMINATED", {"step": 4}, 8) == tune.PRUNED
    assert tune.trial_state("RUNNING", {"step": 4}, 8) == tune.RUNNING
    assert tune._trial_max_steps({"train": {"max_steps": 8}}, {"train.max_steps@a": 5}) == 5
    assert tune._trial_max_steps({"train": {"max_steps": 8}}, {"train.lr": 0.1}) == 8


def test_objective_and_best_trial():
    assert tune.with_objective({"eval_accuracy": 50.0, "step": 3}, "eval_accuracy")["objective"] == 50.0
    assert "objective" not in tune.with_objective({"loss": 1.0}, "eval_accuracy")
    assert "objective" not in tune.with_objective({"loss": float("nan")}, "loss")
    rows = [{"state": tune.FINISHED, "objective": 0.3}, {"state": tune.PRUNED, "objective": 0.9},
            {"state": tune.FINISHED, "objective": 0.5}, {"state": tune.FAILED, "objective": None}]
    assert tune.best_trial(rows, "max")["objective"] == 0.5
    assert tune.best_trial(rows, "min")["objective"] == 0.3
    assert tune.best_trial(rows[1:2], "max") is None


def test_trials_table_lists_best_first():
    s = load_space(text=TINY)
    rows = [{"trial_name": f"t{i}", "state": st, "objective": o, "step": 4, "params": {"train.lr": lr}}
            for i, (st, o, lr) in enumerate([(tune.PRUNED, 0.1, 1e-3), (tune.FINISHED, 2.0, 1e-2),
                                             (tune.FINISHED, 1.0, 3e-3), (tune.FAILED, None, 5e-3)])]
    lines = tune.trials_table(rows, s, "min").splitlines()
    assert lines[0].split()[:5] == ["#", "trial", "state", "objective", "step"] and "lr" in lines[0]
    assert [ln.split()[1] for ln in lines[1:]] == ["t2", "t1", "t0", "t3"]


def test_shared_path_check_names_blind_nodes(tmp_path):
    seen = []

    def all_see(marker):
        seen.append(marker)
        assert Path(marker).is_file()
        return {"10.0.0.1 (aaaa)": True, "10.0.0.2 (bbbb)": True}

    tune.check_shared_paths({"storage path": tmp_path / "st", "tracking": tmp_path / "ml"}, all_see)
    assert len(seen) == 2 and not any(Path(m).exists() for m in seen)  # markers cleaned up

    def one_blind(marker):
        return {"10.0.0.1 (aaaa)": True, "10.0.0.2 (bbbb)": False}

    with pytest.raises(tune.SweepError) as e:
        tune.check_shared_paths({"tracking": tmp_path / "ml"}, one_blind)
    msg = str(e.value)
    assert "not visible from node(s) 10.0.0.2 (bbbb)" in msg and "2-node" in msg and "MLflow server" in msg
    with pytest.raises(tune.SweepError, match="--storage-path on storage every node mounts"):
        tune.check_shared_paths({"storage path": tmp_path / "st"}, one_blind)


def test_store_locations():
    assert tune.local_store_dir("sqlite:////a/b/mlflow.db") == Path("/a/b")
    assert tune.local_store_dir("http://127.0.0.1:5000") is None
    assert tune.local_store_dir("postgresql://u:p@h/db") is None
    assert tune.artifact_location("sqlite:////a/b/mlflow.db", "sw") == "/a/b/mlartifacts/sw"
    assert tune.artifact_location("http://127.0.0.1:5000", "sw") is None


def test_searcher_ignores_reports_for_a_trial_the_study_already_ended(tmp_path):
    """After a driver crash, the restored searcher (state saved before the trial ended) may see
    reports of a trial whose end the Optuna study already stored: they must not stop the sweep."""
    space = load_space(Path(tune.__file__).resolve().parents[1] / "tune_spaces" / "quick.yaml")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    (tmp_path / "state").mkdir()
    searcher = tune._make_searcher(space, url)
    assert searcher.suggest("t1")
    searcher.save_to_dir(str(tmp_path / "state"))  # Tune's last save: t1 still running
    searcher.on_trial_complete("t1", {tune.OBJECTIVE: 0.5, "training_iteration": 2})

    restored = tune._make_searcher(space, url)
    restored.restore_from_dir(str(tmp_path / "state"))
    assert restored._finished_in_study("t1")
    restored.on_trial_result("t1", {tune.OBJECTIVE: 0.4, "training_iteration": 3})  # no error
    restored.on_trial_complete("t1", {tune.OBJECTIVE: 0.4, "training_iteration": 3})
    trials = restored._ot_study.trials
    assert len(trials) == 1 and trials[0].state.is_finished() and trials[0].value == 0.5
