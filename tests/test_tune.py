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

from lora_diffusion.sweep import checks, cli, results, resume, runs, search, states, trial
from lora_diffusion.tracking import OBJECTIVE
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
    monkeypatch.chdir(tmp_path)  # --dry-run checks data and base like a real run: the real files; the Hub is offline
    rc = cli.main([str(path), "--dry-run", "--samples", "3", "--data-dir", str(shared_data), "model.base=minilm"])
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
                          "--dry-run", "--data-dir", str(data), "train.max_steps=750", "--num-samples", "5"],
                         cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert f"data={data}" in out.stdout and "max_steps=750" in out.stdout and "trials: 5" in out.stdout
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
    rc = cli.main([str(write_space(tmp_path, body))])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "tune_results").exists()


def test_missing_data_and_disabled_tracking_fail_before_ray(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    space = write_space(tmp_path, TINY)
    assert cli.main([str(space), "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no folder 'sst2'" in err and str(tmp_path / "empty") in err
    assert cli.main([str(space), "--data-dir", str(tmp_path / "empty"), "tracking.enabled=false"]) == 2
    assert "tracking.enabled" in capsys.readouterr().err
    data = write_sst2(tmp_path / "data")
    assert cli.main([str(space), "--data-dir", str(data), "--tracking-uri", f"sqlite:///{tmp_path}/no/such/dir/m.db"]) == 2
    err = capsys.readouterr().err
    assert "tracking URI" in err and "does not exist" in err


def test_resume_needs_an_existing_sweep_and_the_same_settings(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    assert cli.main([str(space), "--resume", "--storage-path", str(tmp_path / "st")]) == 2
    assert "--resume: no sweep 'tiny'" in capsys.readouterr().err
    # an experiment folder written by a run with other settings is not resumed with these
    s = load_space(space, overrides=["train.max_steps=6"])
    exp = tmp_path / "st" / "tiny"
    exp.mkdir(parents=True)
    (exp / resume.SWEEP_FILE).write_text(json.dumps(resume.sweep_fingerprint(s)))
    assert cli.main([str(space), "--storage-path", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert "started with different settings" in err and "base.train.max_steps: was 6, now 4" in err and "--name" in err


# --------------------------------------------------------------------------- driver helpers


def test_trial_state():
    assert states.trial_state("ERROR", {"step": 2}, 8) == states.FAILED
    assert states.trial_state("TERMINATED", {"step": 8}, 8) == states.FINISHED
    assert states.trial_state("TERMINATED", {"step": 4}, 8) == states.PRUNED
    assert states.trial_state("RUNNING", {"step": 4}, 8) == states.RUNNING
    assert states.trial_max_steps({"train": {"max_steps": 8}}, {"train.max_steps@a": 5}) == 5
    assert states.trial_max_steps({"train": {"max_steps": 8}}, {"train.lr": 0.1}) == 8


def test_objective_and_best_trial():
    assert trial.with_objective({"eval_accuracy": 50.0, "step": 3}, "eval_accuracy")["objective"] == 50.0
    assert "objective" not in trial.with_objective({"loss": 1.0}, "eval_accuracy")
    assert "objective" not in trial.with_objective({"loss": float("nan")}, "loss")
    rows = [{"state": states.FINISHED, "objective": 0.3}, {"state": states.PRUNED, "objective": 0.9},
            {"state": states.FINISHED, "objective": 0.5}, {"state": states.FAILED, "objective": None}]
    assert results.best_trial(rows, "max")["objective"] == 0.5
    assert results.best_trial(rows, "min")["objective"] == 0.3
    assert results.best_trial(rows[1:2], "max") is None


def test_trials_table_lists_best_first():
    s = load_space(text=TINY)
    rows = [{"trial_name": f"t{i}", "state": st, "objective": o, "step": 4, "params": {"train.lr": lr}}
            for i, (st, o, lr) in enumerate([(states.PRUNED, 0.1, 1e-3), (states.FINISHED, 2.0, 1e-2),
                                             (states.FINISHED, 1.0, 3e-3), (states.FAILED, None, 5e-3)])]
    lines = results.trials_table(rows, s, "min").splitlines()
    assert lines[0].split()[:5] == ["#", "trial", "state", "objective", "step"] and "lr" in lines[0]
    assert [ln.split()[1] for ln in lines[1:]] == ["t2", "t1", "t0", "t3"]


def test_shared_path_check_names_blind_nodes(tmp_path):
    seen = []

    def all_see(marker):
        seen.append(marker)
        assert Path(marker).is_file()
        return {"10.0.0.1 (aaaa)": True, "10.0.0.2 (bbbb)": True}

    checks.check_shared_paths({"storage path": tmp_path / "st", "tracking": tmp_path / "ml"}, all_see)
    assert len(seen) == 2 and not any(Path(m).exists() for m in seen)  # markers cleaned up

    def one_blind(marker):
        return {"10.0.0.1 (aaaa)": True, "10.0.0.2 (bbbb)": False}

    with pytest.raises(checks.SweepError) as e:
        checks.check_shared_paths({"tracking": tmp_path / "ml"}, one_blind)
    msg = str(e.value)
    assert "not visible from node(s) 10.0.0.2 (bbbb)" in msg and "2-node" in msg and "MLflow server" in msg
    with pytest.raises(checks.SweepError, match="--storage-path on storage every node mounts"):
        checks.check_shared_paths({"storage path": tmp_path / "st"}, one_blind)


def test_store_locations():
    assert runs.local_store_dir("sqlite:////a/b/mlflow.db") == Path("/a/b")
    assert runs.local_store_dir("http://127.0.0.1:5000") is None
    assert runs.local_store_dir("postgresql://u:p@h/db") is None
    assert runs.artifact_location("sqlite:////a/b/mlflow.db", "sw") == "/a/b/mlartifacts/sw"
    assert runs.artifact_location("http://127.0.0.1:5000", "sw") is None


def test_searcher_ignores_reports_for_a_trial_the_study_already_ended(tmp_path):
    """After a driver crash, the restored searcher (state saved before the trial ended) may see
    reports of a trial whose end the Optuna study already stored: they must not stop the sweep."""
    space = load_space(REPO / "tune_spaces" / "quick.yaml")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    (tmp_path / "state").mkdir()
    searcher = search.make_searcher(space, url)
    assert searcher.suggest("t1")
    searcher.save_to_dir(str(tmp_path / "state"))  # Tune's last save: t1 still running
    searcher.on_trial_complete("t1", {OBJECTIVE: 0.5, "training_iteration": 2})

    restored = search.make_searcher(space, url)
    restored.restore_from_dir(str(tmp_path / "state"))
    assert restored._finished_in_study("t1")
    restored.on_trial_result("t1", {OBJECTIVE: 0.4, "training_iteration": 3})  # no error
    restored.on_trial_complete("t1", {OBJECTIVE: 0.4, "training_iteration": 3})
    trials = restored._ot_study.trials
    assert len(trials) == 1 and trials[0].state.is_finished() and trials[0].value == 0.5


# --------------------------------------------------------------------------- sweep workflow (storage, extend, warm start, two objectives)

TWO = TINY.replace("metric: loss", "metric: [loss, trainable_params]\nmode: [min, min]").replace(
    "params:\n  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}",
    "params:\n  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n"
    "  method.lora_diffusion.rank_early: {type: int, low: 2, high: 16}")


def test_pareto_front_and_its_table():
    s = load_space(text=TWO)
    row = lambda i, st, a, b: {"trial_id": f"t{i}", "trial_name": f"t{i}", "state": st, "objective": a,  # noqa: E731
                               "values": [a, b], "step": 4, "params": {"train.lr": 1e-3}}
    rows = [row(0, states.FINISHED, 1.0, 500), row(1, states.FINISHED, 2.0, 100), row(2, states.FINISHED, 1.5, 600),
            row(3, states.PRUNED, 0.1, 50), row(4, states.FINISHED, 1.0, 500), row(5, states.FAILED, None, None)]
    front = results.pareto_front(rows, ["min", "min"])
    assert [r["trial_id"] for r in front] == ["t0", "t4", "t1"]  # t2 is dominated; pruned/failed never count
    assert [r["trial_id"] for r in results.pareto_front(rows, ["max", "min"])] == ["t1"]
    lines = results.trials_table(rows, s, "min", front=front).splitlines()
    assert lines[0].split()[:6] == ["#", "trial", "state", "objective", "trainable_params", "pareto"]
    marked = {ln.split()[1] for ln in lines[1:] if " * " in ln}
    assert marked == {"t0", "t1", "t4"}


def test_restore_allows_a_larger_count_and_refuses_other_changes(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    exp = tmp_path / "st" / "tiny"
    exp.mkdir(parents=True)
    from lora_diffusion.train import absolutize

    def loaded(**kw):
        s = load_space(space, **kw)
        s.rebase(absolutize(s.base))  # as the command does
        return s

    s = loaded(num_samples=5)
    (exp / resume.SWEEP_FILE).write_text(json.dumps(resume.sweep_fingerprint(s, search.JOURNAL_FILE)))
    assert resume.check_restorable(exp, loaded(num_samples=8), search.JOURNAL_FILE) == 5
    with pytest.raises(checks.SweepError, match="base.train.max_steps: was 4, now 6"):
        resume.check_restorable(exp, loaded(num_samples=8, overrides=["train.max_steps=6"]), search.JOURNAL_FILE)
    with pytest.raises(checks.SweepError, match="optuna_storage: was 'optuna_journal.log'"):
        resume.check_restorable(exp, s, "postgresql://u:***@h/db")
    # fewer trials than planned: refused before Ray, with the count to use
    assert cli.main([str(space), "--resume", "--storage-path", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert "planned with 5 trials, got 3" in err and "--num-samples 5" in err


def test_extend_search_raises_the_saved_trial_count(tmp_path):
    import ray.cloudpickle as cloudpickle

    (tmp_path / "search_gen_state-2026-01-01_00-00-00.json").write_bytes(cloudpickle.dumps({"counter": 3, "total_samples": 3, "finished": True}))
    (tmp_path / "search_gen_state-2026-01-02_00-00-00.json").write_bytes(cloudpickle.dumps({"counter": 3, "total_samples": 3, "finished": False}))
    assert resume.extend_search(tmp_path, 7) == 3
    newest = cloudpickle.loads((tmp_path / "search_gen_state-2026-01-02_00-00-00.json").read_bytes())
    assert newest == {"counter": 3, "total_samples": 7, "finished": False}
    with pytest.raises(checks.SweepError, match="no saved search state"):
        resume.extend_search(tmp_path / "nothing", 7)


def write_best(folder: Path, rows: list[dict], mode: str = "min", front: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"mode": mode, "trials": rows}
    if front is not None:
        data["pareto_front"] = [{"trial_id": t} for t in front]
    (folder / "best.json").write_text(json.dumps(data))
    return folder / "best.json"


def test_warm_start_points_are_the_best_configs_of_the_earlier_sweep(tmp_path, capsys):
    s = load_space(text=TWO)
    rows = [{"trial_id": f"t{i}", "state": st, "objective": o, "params": {"train.lr": lr, "train.other": 1}}
            for i, (st, o, lr) in enumerate([(states.FINISHED, 3.0, 1e-3), (states.FINISHED, 1.0, 2e-3),
                                             (states.PRUNED, 0.5, 3e-3), (states.FINISHED, 2.0, 4e-3)])]
    write_best(tmp_path / "st" / "old", rows)
    points, found = resume.warm_start_points("old", tmp_path / "st", s, 2)  # by sweep name
    assert found == tmp_path / "st" / "old" / "best.json"
    assert points == [{"train.lr": 2e-3}, {"train.lr": 4e-3}]  # by objective (min); pruned not taken
    assert "train.other not searched by this space" in capsys.readouterr().out
    # a Pareto front comes first; a path to the file works too
    write_best(tmp_path / "two", rows, front=["t0"])
    assert resume.warm_start_points(str(tmp_path / "two" / "best.json"), tmp_path, s, 2)[0] == [{"train.lr": 1e-3}, {"train.lr": 2e-3}]
    with pytest.raises(checks.SweepError, match="no best.json at"):
        resume.warm_start_points("missing", tmp_path / "st", s, 2)


def test_warm_start_with_a_point_outside_the_space_fails_before_ray(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    write_best(tmp_path / "tune_results" / "old", [{"trial_id": "t0", "state": states.FINISHED, "objective": 1.0,
                                                     "params": {"train.lr": 0.5}}])
    assert cli.main([str(space), "--warm-start", "old"]) == 2
    err = capsys.readouterr().err
    assert "--warm-start" in err and "point 1: train.lr: 0.5 is outside the range [0.0001, 0.01]" in err
    # in range: --dry-run shows it enqueued first
    write_best(tmp_path / "tune_results" / "old", [{"trial_id": "t0", "state": states.FINISHED, "objective": 1.0,
                                                     "params": {"train.lr": 0.005}}])
    data = write_sst2(tmp_path / "data")
    assert cli.main([str(space), "--warm-start", "old", "--dry-run", "--samples", "2", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "initial points: 1" in out and "  1: lr=0.005" in out


def test_bad_optuna_storage_fails_before_ray(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY)
    data = write_sst2(tmp_path / "data")
    for url, expected in [("redis://h:6379", "give an RDB URL"), (f"sqlite:///{tmp_path}/no/dir/o.db", "does not exist"),
                          ("postgresql://u:secret@127.0.0.1:1/db", "cannot open")]:
        assert cli.main([str(space), "--data-dir", str(data), "--optuna-storage", url]) == 2
        err = capsys.readouterr().err
        assert "--optuna-storage" in err and expected in err and "secret" not in err, err
    assert not (tmp_path / "tune_results").exists()


def test_storage_defaults_to_the_journal_and_keeps_an_old_sqlite_study(tmp_path):
    assert search.optuna_storage_spec(tmp_path, None) == str(tmp_path / search.JOURNAL_FILE)
    assert search.optuna_storage_spec(tmp_path, "postgresql://h/db") == "postgresql://h/db"
    (tmp_path / search.LEGACY_STUDY_DB).write_bytes(b"")
    assert search.optuna_storage_spec(tmp_path, None) == f"sqlite:///{tmp_path / search.LEGACY_STUDY_DB}"


def test_two_objective_searcher_tells_a_stopped_trial_as_pruned(tmp_path):
    s = load_space(text=TWO)
    searcher = search.make_searcher(s, str(tmp_path / search.JOURNAL_FILE))
    assert searcher.metric == ["objective", "trainable_params"]
    for tid in ("a", "b"):
        assert searcher.suggest(tid)
    searcher.on_trial_result("a", {OBJECTIVE: 2.0, "trainable_params": 10, "training_iteration": 1})
    searcher.on_trial_complete("a", {OBJECTIVE: 1.5, "trainable_params": 10, "training_iteration": 2})
    searcher.on_trial_complete("b", {"trainable_params": 20, "training_iteration": 1})  # no final objective
    import optuna

    study = optuna.load_study(study_name="tiny", storage=search.open_optuna_storage(str(tmp_path / search.JOURNAL_FILE)))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"] and study.trials[0].values == [1.5, 10.0]
    assert study.metric_names == ["loss", "trainable_params"]
    summary = results.optuna_summary(str(tmp_path / search.JOURNAL_FILE), "tiny", [])
    assert summary["directions"] == ["MINIMIZE", "MINIMIZE"] and [b["number"] for b in summary["best_trials"]] == [0]
