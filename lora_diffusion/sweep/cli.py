"""The tuning service: a search space in, a Ray Tune sweep with Optuna + ASHA out, every trial in MLflow.

    python -m lora_diffusion.tune tune_spaces/quick.yaml --data-dir /path/to/data
    python -m lora_diffusion.tune SPACE.yaml --dry-run              # resolved space, samples, resource plan; no Ray
    python -m lora_diffusion.tune SPACE.yaml --resume               # continue an interrupted sweep
    python -m lora_diffusion.tune SPACE.yaml train.max_steps=50     # overrides of the space's base config

What happens, top to bottom (`main`):
1. The space file is loaded and validated, the base config resolved (search_space.py), the MLflow
   store, the data and the base model checked -- all before any cluster time is spent.
2. Ray: a fresh local cluster (dashboard on 127.0.0.1, its address printed), or the cluster at
   $RAY_ADDRESS (e.g. the one cluster/ starts inside a SLURM allocation). On several nodes the
   MLflow store and the storage path must be visible from every node: that is checked for real.
3. MLflow: one experiment per sweep name; a parent run for the sweep (the space file, later the
   Optuna study summary and the best trial); one nested child run per trial, found again by its
   `ray_trial_id` tag when a trial restarts, so a resumed sweep never duplicates a trial.
4. Tune: `Tuner` over `run_trial` with `OptunaSearch(space=define_by_run, metric="objective")`
   and ASHA (its own metric/mode). A one-worker trial runs the training loop in the trial
   process (`TuneReporter`); a multi-worker trial builds and fits a `TorchTrainer` and reports
   through `TuneReportCallback`. Experiment names are deterministic (`<storage>/<sweep name>`):
   an existing experiment is restored (`Tuner.restore`) -- finished and failed trials are kept,
   unfinished ones continue from their last checkpoint. SIGINT, SIGTERM or SIGUSR1 stop the
   sweep with its state saved, so a requeued job resumes with `--resume`.
5. At the end: the best trials table, `best.json`, the best adapter registered in the MLflow
   model registry (`models:/<model_name>/<version>`, lineage = its trial's run).

The sweep workflow around it:
- The Optuna study lives in `<experiment folder>/optuna_journal.log` (JournalStorage, file backend: safe on
  NFS/GPFS/Lustre) unless `--optuna-storage URL` names an RDB; `optuna-dashboard <journal>` browses it.
- `--resume --num-samples N` (N larger than before) extends a finished sweep: the saved search state's trial
  count is raised (`extend_search`), so the same study and the same MLflow parent run get the new trials.
- `initial_points:` in the space and `--warm-start SWEEP_OR_BEST_JSON` enqueue configs (OptunaSearch
  points_to_evaluate), each checked against the space's ranges, conditions and constraints first.
- Two metrics (`metric: [a, b]`, `mode: [max, min]`) make a multi-objective study: Optuna is told
  [`objective`, b]; ASHA compares its one scheduler metric; `best.json` holds the Pareto front.

Trial states in MLflow (tag `trial_state`): RUNNING, FINISHED, FAILED (with an `error` tag), PRUNED
(stopped early by ASHA: its last report came before `train.max_steps`), INTERRUPTED (the driver was
stopped; a resume continues it), LOST (started after the last saved sweep state of a driver that was
killed; its run is soft-deleted on resume and a new trial takes its place).

Restore decision: failed trials stay failed (`resume_errored=False`: a deterministic error would only
repeat); `--retry-failed` runs them again from their last checkpoint. A trial that ended after the
last state save of a killed driver is not retrained: its MLflow run says how it ended, and the trial
reports that result again.

Exit codes: 0 done; 2 bad input (nothing started); 130 (SIGINT / SIGUSR1) or 143 (SIGTERM) when
interrupted with the sweep saved -- rerun the same command (with --resume) to continue; 75 when a fault
of the environment stopped it with the sweep saved (the MLflow server stayed away longer than MLflow's
retries, or a disk filled up: faults.py) -- fix that, then rerun with --resume.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from lora_diffusion.search_space import Space, SpaceError, apply_sampled, config_key, load_space
from lora_diffusion.tracking import OBJECTIVE

DEFAULT_STORAGE = "tune_results"
STATE_TAG = "trial_state"
FINISHED, FAILED, PRUNED, RUNNING = "FINISHED", "FAILED", "PRUNED", "RUNNING"
SWEEP_FILE = "sweep.json"  # in the experiment folder: what the sweep was started with (checked on restore)
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node (a TorchTrainer trial asks 0.001)
# The Optuna study: a journal file in the experiment folder (appends under a symlink lock: works on NFS, GPFS
# and Lustre, where SQLite's locking does not), or the RDB URL given with --optuna-storage.
JOURNAL_FILE = "optuna_journal.log"
LEGACY_STUDY_DB = "optuna_study.db"  # sweeps started before the journal was the default keep using theirs
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
WARM_START_K = 3


class SweepError(RuntimeError):
    """The sweep cannot start or continue; the message says why and what to do."""


# --------------------------------------------------------------------------- MLflow for the sweep


def _client(uri: str):
    from lora_diffusion.tracking import client

    return client(uri)


def artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite/file store (absolute, so every
    trial process writes to the same place whatever its working directory); the server decides otherwise."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name)
    if uri.startswith("file:"):
        return None
    if "://" not in uri:
        return None  # file store: artifacts live inside it
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """The id of the MLflow experiment `name`, created with an absolute artifact location if new."""
    from mlflow.exceptions import MlflowException

    c = _client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            from lora_diffusion.tracking import redact_uri

            raise SweepError(f"MLflow experiment {name!r} is deleted at {redact_uri(uri)}; restore it (mlflow experiments restore) "
                             "or choose another sweep name with --name")
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location(uri, name))
    except MlflowException:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_parent_run(uri: str, experiment_id: str, sweep: str):
    runs = _client(uri).search_runs([experiment_id], filter_string=f"tags.run_type = 'sweep' and tags.sweep = '{sweep}'",
                                    max_results=5, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def find_child_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    """The child run of `trial_id` under the sweep's parent run, or None."""
    runs = _client(uri).search_runs(
        [experiment_id], filter_string=f"tags.ray_trial_id = '{trial_id}' and tags.run_type = 'trial'", max_results=10)
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    return runs[0] if runs else None


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    out, token = [], None
    while True:
        page = _client(uri).search_runs([experiment_id], filter_string="tags.run_type = 'trial'", max_results=1000,
                                        page_token=token)
        out += [r for r in page if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
        token = page.token
        if not token:
            return out


def start_parent_run(uri: str, space: Space, experiment_id: str) -> str:
    """Find the sweep's parent run (resume) or create it; log the space and its settings."""
    from lora_diffusion.tracking import RunTracker, run_tags

    existing = find_parent_run(uri, experiment_id, space.name)
    if existing is not None:
        c = _client(uri)
        c.update_run(existing.info.run_id, status="RUNNING")
        c.set_tag(existing.info.run_id, "sweep_state", "RUNNING")
        return existing.info.run_id
    run = RunTracker.start(uri, space.name, run_name=space.name,
                           tags=run_tags(space.base, "sweep", sweep=space.name, sweep_state="RUNNING"))
    s = space.spec
    run.log_params({
        "sweep.metric": space.metric, "sweep.mode": space.mode, "sweep.num_samples": s.num_samples,
        "sweep.objectives": ", ".join(f"{m}:{x}" for m, x in zip(space.metrics, space.modes)),
        "sweep.initial_points": len(space.points),
        "sweep.max_concurrent": s.max_concurrent, "sweep.sampler": s.sampler.name, "sweep.sampler_seed": s.sampler.seed,
        "sweep.scheduler": s.scheduler.name, "sweep.scheduler_metric": space.scheduler_metric,
        "sweep.grace_period": s.scheduler.grace_period, "sweep.reduction_factor": s.scheduler.reduction_factor,
        "sweep.max_t": space.max_t, "sweep.trial_runner": space.trial_runner, "sweep.workers": space.workers,
        "sweep.params": ", ".join(p.key for p in space.params), "sweep.model_name": space.model_name,
    })
    name = space.path.name if space.path else "space.yaml"
    run.log_text(space.source_text, f"space/{name}")
    run.log_text(space.describe() + "\n\n" + space.resource_plan() + "\n", "space/resolved.txt")
    run.log_text(space.base.to_yaml(), "space/base_config.yaml")
    return run.run_id


# --------------------------------------------------------------------------- one trial (runs in a Ray worker)


class ObjectiveReporter:
    """The in-process trial's reporter: adds `objective` (= the space's metric) to every report that has it,
    logs every report to the trial's MLflow run (metrics; at the last step the adapter, config and
    evaluation files of the checkpoint) and passes it on to Tune.

    The trial logs here rather than through the loop's own tracker because Tune stops an ASHA-pruned
    trial by raising SystemExit inside `report`: that is not a failure, and only the trial knows it.
    """

    def __init__(self, inner, metric: str, tracker, max_steps: int, first: tuple[str, ...] = (), logged_through: int = 0):
        self._inner = inner
        self._metric = metric
        self._first = first
        self._tracker = tracker
        self._max_steps = max_steps
        self._logged_through = logged_through  # a resumed trial's run has its metrics up to here: not again

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def report(self, metrics: dict[str, Any], checkpoint_dir=None) -> None:
        metrics = with_objective(metrics, self._metric, self._first)
        step = int(metrics.get("step", 0))
        if step > self._logged_through:
            self._tracker.log_metrics(metrics, step=step)
        if checkpoint_dir is not None and step >= self._max_steps:
            folder = Path(checkpoint_dir)
            self._tracker.log_artifacts(folder / "adapter", "adapter")
            if (folder / "config.yaml").is_file():
                self._tracker.log_artifact(folder / "config.yaml")
            if (folder / "eval").is_dir():
                self._tracker.log_artifacts(folder / "eval", "eval")
        self._inner.report(metrics, checkpoint_dir=checkpoint_dir)


def with_objective(metrics: dict[str, Any], metric: str, first: tuple[str, ...] = ()) -> dict[str, Any]:
    """`metrics` plus `objective` (when `metric` has a finite value), with the keys in `first` up front
    (Tune's console table shows the first metrics of a trial's first report)."""
    v = metrics.get(metric)
    out = {k: metrics[k] for k in first if k in metrics}
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        out[OBJECTIVE] = float(v)
    out.update({k: val for k, val in metrics.items() if k not in out})
    return out


def _objective_callback(metric: str, uri: str | None, run_id: str | None, first: tuple[str, ...] = ()):
    """A `TuneReportCallback` for a nested TorchTrainer that also adds (and logs) `objective`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [with_objective(m, metric, first) for m in metrics]
            if uri and run_id and metrics and OBJECTIVE in metrics[0]:
                from lora_diffusion.tracking import RunTracker

                RunTracker(uri, run_id, owned=False).log_metrics(
                    {OBJECTIVE: metrics[0][OBJECTIVE]}, step=int(metrics[0].get("step", 0)))
            super().after_report(run_context, metrics, checkpoint)

    return ObjectiveTuneReportCallback()


def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """The Tune trial (`_run_trial`); a fault of the environment (tracking store gone, disk full: faults.py)
    does not fail it but goes to the driver, which stops the sweep resumably."""
    from lora_diffusion.faults import fault_of, hand_to_driver

    try:
        _run_trial(config, sweep)
    except Exception as e:
        fault = fault_of(e)
        if fault is None:
            raise
        from ray import tune

        hand_to_driver(sweep["name"], f"trial {tune.get_context().get_trial_name()}", fault)


def _run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """The Tune trial: the base config + the sampled `config`, trained in-process or by a TorchTrainer."""
    from ray import tune

    from lora_diffusion.tracking import RunTracker, error_text, run_tags

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = apply_sampled(sweep["base"], config)

    uri, exp_id, parent = sweep["tracking_uri"], sweep["experiment_id"], sweep["parent_run_id"]
    existing = find_child_run(uri, exp_id, parent, trial_id)
    state = existing.data.tags.get(STATE_TAG) if existing is not None else None
    if state in (FINISHED, PRUNED):
        # It ended before the driver could save that fact (driver killed): report its last result again
        # (a pruned trial's stops before max_steps, so it is recorded PRUNED again); do not retrain.
        print(f"[tune] trial {trial_name} already {state} in MLflow run {existing.info.run_id}; not re-running it", flush=True)
        tune.report(dict(existing.data.metrics))
        return
    if state == FAILED and not sweep.get("retry_failed"):
        raise RuntimeError(f"trial {trial_name} failed before the sweep was restarted "
                           f"({existing.data.tags.get('error', 'no error recorded')}); --retry-failed runs it again")
    if existing is not None:
        tracker = RunTracker(uri, existing.info.run_id, owned=True)
        _client(uri).update_run(tracker.run_id, status="RUNNING")
        tracker.set_tags({STATE_TAG: RUNNING})
    else:
        tracker = RunTracker.start(uri, sweep["experiment"], parent_run_id=parent, run_name=trial_name,
                                   tags=run_tags(cfg, "trial", sweep=sweep["name"], ray_trial_id=trial_id,
                                                 ray_trial_name=trial_name, **{STATE_TAG: RUNNING}))
        tracker.log_params(cfg.flat())
    loop_config = {"config": cfg.to_dict(), "resume_from": None, "trial_name": trial_name,
                   "mlflow": {"tracking_uri": uri, "experiment": sweep["experiment"], "run_id": tracker.run_id},
                   # system metrics and the model card's adapter URI (also when ObjectiveReporter logs instead)
                   "mlflow_run": {"tracking_uri": uri, "run_id": tracker.run_id}}
    try:
        if sweep["trial_runner"] == "in_process":
            from lora_diffusion.train_reporters import TuneReporter
            from lora_diffusion.train import train_loop

            loop_config["mlflow"] = None  # ObjectiveReporter logs instead (see there)
            logged = int(existing.data.metrics.get("step", 0)) if existing is not None else 0
            train_loop(loop_config, ObjectiveReporter(TuneReporter(), sweep["metric"], tracker, cfg.train.max_steps,
                                                      sweep["console_metrics"], logged_through=logged))
        else:
            import ray.train

            from lora_diffusion.train import make_trainer

            run_config = ray.train.RunConfig(
                name=f"trial_{trial_id}", storage_path=sweep["train_storage"],
                callbacks=[_objective_callback(sweep["metric"], uri, tracker.run_id, sweep["console_metrics"])],
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1))
            make_trainer(cfg, loop_config, run_config=run_config).fit()
    except SystemExit:
        raise  # Tune stopping the trial (ASHA): the driver's TrialStates callback records PRUNED
    except BaseException as e:
        from lora_diffusion.faults import fault_of

        if fault_of(e) is None:  # a fault of the environment is not the trial's: it continues on --resume
            tracker.set_tags({STATE_TAG: FAILED})
            tracker.end("FAILED", error=error_text(e))
        raise
    tracker.set_tags({STATE_TAG: FINISHED})
    tracker.end("FINISHED")


# --------------------------------------------------------------------------- driver-side pieces


def trial_state(status: str, last_result: dict | None, max_steps: int) -> str:
    """FINISHED / FAILED / PRUNED (stopped by the scheduler before its last step) / RUNNING for a Tune trial."""
    if status == "ERROR":
        return FAILED
    if status != "TERMINATED":
        return RUNNING
    step = (last_result or {}).get("step")
    if step is None or int(step) < max_steps:
        return PRUNED
    return FINISHED


def _trial_max_steps(base: dict[str, Any], config: dict[str, Any]) -> int:
    steps = [v for k, v in config.items() if config_key(k) == "train.max_steps"]
    return int(steps[0] if steps else base["train"]["max_steps"])


def _error_line(trial) -> str:
    try:
        err = trial.get_error()
        if err is None and trial.error_file and Path(trial.error_file).is_file():
            # get_error() reads the copy in the storage path, which Tune writes only later (the sweep's end);
            # in on_trial_error the error is in the driver's staging folder (a trial lost with its node)
            err = Path(trial.error_file).read_text(errors="replace")
    except Exception:  # noqa: BLE001 - the error file may be gone; say so
        err = None
    if err is None:
        return "trial failed (no error recorded by Ray)"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":", 1)[0] or "Exception" in ln.split(":", 1)[0]:
            return ln[:4000]
    return (lines[-1] if lines else str(err))[:4000]


def trial_states_callback(sweep: dict[str, Any]):
    """The Tune callback that records each finished trial's state in its MLflow child run (also for compare)."""
    from ray import tune

    class TrialStates(tune.Callback):
        """Records each finished trial's state in its MLflow child run (the trial process may not be able to:
        ASHA stops it from outside, and a crashed process tags nothing)."""

        def __init__(self, sweep: dict[str, Any]):
            self.sweep = sweep

        def record_end(self, trial, state: str, error: str | None = None) -> None:
            from lora_diffusion.tracking import RunTracker, run_tags

            s = self.sweep
            try:
                run = find_child_run(s["tracking_uri"], s["experiment_id"], s["parent_run_id"], trial.trial_id)
                if run is None:  # the trial died before it could create its run: record it anyway
                    cfg = apply_sampled(s["base"], trial.config)
                    tracker = RunTracker.start(s["tracking_uri"], s["experiment"], parent_run_id=s["parent_run_id"],
                                               run_name=str(trial), tags=run_tags(cfg, "trial", sweep=s["name"],
                                                                                  ray_trial_id=trial.trial_id,
                                                                                  ray_trial_name=str(trial)))
                    tracker.log_params(cfg.flat())
                else:
                    tracker = RunTracker(s["tracking_uri"], run.info.run_id, owned=True)
                    if state == FAILED and run.data.tags.get("error"):
                        error = None  # the trial recorded its own, fuller error
                tracker.set_tags({STATE_TAG: state})
                if state == PRUNED:
                    step = (trial.last_result or {}).get("step")
                    # a restored trial's last result comes back from Tune's JSON state with floats (20.0)
                    tracker.set_tags({"pruned_at_step": int(step) if isinstance(step, (int, float)) else step})
                    _log_pruned_adapter(tracker, trial)
                status = {FINISHED: "FINISHED", FAILED: "FAILED", PRUNED: "KILLED"}[state]
                tracker.client.set_terminated(tracker.run_id, status=status)
                if error:
                    tracker.set_tags({"error": error})
            except Exception as e:  # noqa: BLE001 - never let bookkeeping stop the sweep, unless the store is gone
                from lora_diffusion.faults import driver_faults, fault_of

                fault, faults = fault_of(e), driver_faults()
                if fault is not None and faults is not None:  # stop resumably; the restore records this end
                    faults.add(f"recording the end of trial {trial} in MLflow", fault)
                else:
                    print(f"[tune] warning: could not record trial {trial} in MLflow: {e}", file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            state = trial_state("TERMINATED", trial.last_result, _trial_max_steps(self.sweep["base"], trial.config))
            if state == PRUNED:
                print(f"[tune] trial {trial} stopped early by ASHA at step {(trial.last_result or {}).get('step')}", flush=True)
            self.record_end(trial, state)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.record_end(trial, FAILED, _error_line(trial))

    return TrialStates(sweep)


def _log_pruned_adapter(tracker, trial) -> None:
    """A pruned trial's adapter at the step it was stopped (from its last Tune checkpoint), when readable here."""
    ckpt = getattr(trial, "checkpoint", None)
    path = getattr(ckpt, "path", None)
    if path and (Path(path) / "adapter").is_dir():
        tracker.log_artifacts(Path(path) / "adapter", "adapter")


def searcher_metrics(space: Space) -> list[str]:
    """The result keys Optuna is told: `objective` (the first metric), then the second metric by its name."""
    return [OBJECTIVE, *space.metrics[1:]]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def open_optuna_storage(spec: str):
    """An Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or the path of a journal file."""
    import optuna

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(spec))


def optuna_storage_spec(exp_dir: Path, url: str | None) -> str:
    """What the sweep's study lives in: the --optuna-storage URL, else the experiment folder's journal file
    (or the SQLite file of a sweep started before the journal was the default)."""
    if url:
        return url
    if (exp_dir / LEGACY_STUDY_DB).is_file() and not (exp_dir / JOURNAL_FILE).exists():
        return f"sqlite:///{exp_dir / LEGACY_STUDY_DB}"
    return str(exp_dir / JOURNAL_FILE)


def check_optuna_storage(url: str) -> None:
    """--optuna-storage: an RDB URL Optuna can open (checked by connecting, before any cluster time)."""
    from lora_diffusion.tracking import redact_uri

    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else None
    if scheme not in RDB_SCHEMES:
        raise SweepError(f"--optuna-storage: got {redact_uri(url)!r}; give an RDB URL ({', '.join(s + '://...' for s in RDB_SCHEMES)}), "
                         f"or leave it out for the journal file {JOURNAL_FILE} in the experiment folder")
    if scheme == "sqlite":
        path = url.split(":///", 1)[-1]
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise SweepError(f"--optuna-storage: {url}: folder {str(Path(path).parent)!r} does not exist")
    try:
        open_optuna_storage(url)
    except Exception as e:  # noqa: BLE001 - any driver / connection problem, said plainly
        raise SweepError(f"--optuna-storage: cannot open {redact_uri(url)!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def _make_searcher(space: Space, storage_url: str):
    from ray.tune.search.optuna import OptunaSearch

    class Search(OptunaSearch):
        """OptunaSearch that ignores reports without the objective (e.g. an eval_* metric exists only at the end)
        and tells a two-objective study a trial without both final values (stopped by ASHA) as pruned."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if OBJECTIVE in result and not self._finished_in_study(trial_id):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if isinstance(self.metric, list) and result and not all(_finite(result.get(m)) for m in self.metric):
                result = None  # Optuna: PRUNED (or FAIL when error); a multi-objective study takes no partial values
            if not self._finished_in_study(trial_id):
                super().on_trial_complete(trial_id, result, error)

        def restore(self, checkpoint_path: str) -> None:  # what Tuner.restore reaches (via restore_from_dir)
            super().restore(checkpoint_path)
            self._restored = True

        def _finished_in_study(self, trial_id: str) -> bool:
            """The study already holds this trial as ended: the driver died after Optuna stored the trial's
            end but before Tune saved its own state, so the restored Tune runs the trial again. Optuna
            refuses to update an ended trial (UpdateFinishedTrialError), which would stop the sweep.
            Only a restored searcher can meet this, so a fresh one does not query the study per report."""
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or not getattr(self, "_restored", False):
                return False
            state = self._ot_study._storage.get_trial(ot_trial._trial_id).state
            return state.is_finished()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, mode = (searcher_metrics(space), space.modes) if space.multi_objective else (OBJECTIVE, space.mode)
    search = Search(space=space.define_by_run, metric=metric, mode=mode, sampler=space.make_sampler(),
                    storage=open_optuna_storage(storage_url), study_name=space.name,
                    points_to_evaluate=space.points or None)
    with warnings.catch_warnings():  # experimental in some Optuna versions; names the objectives in optuna-dashboard
        warnings.simplefilter("ignore")
        search._ot_study.set_metric_names(space.metrics)
    return search


def _make_scheduler(space: Space):
    if space.scheduler_metric is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = space.spec.scheduler
    # stop_last_trials=False: a trial that reaches max_t ends by itself (finishing its evaluation and MLflow run).
    return ASHAScheduler(time_attr="training_iteration", metric=space.scheduler_metric, mode=space.scheduler_mode,
                         max_t=space.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                         stop_last_trials=False)


def trial_name(trial) -> str:
    """A trial's name and its folder's name in the Tune experiment: trial_<trial id>."""
    return f"trial_{trial.trial_id}"


def forget_lost_trials(uri: str, experiment_id: str, parent_run_id: str, exp_dir: Path) -> None:
    """Child runs of trials the saved Tune state does not know (started after its last save, then the
    driver died) are deleted (MLflow's soft delete), so MLflow holds exactly the sweep's trials."""
    from ray.tune import ExperimentAnalysis

    known = {t.trial_id for t in ExperimentAnalysis(str(exp_dir)).trials}
    c = _client(uri)
    for run in child_runs(uri, experiment_id, parent_run_id):
        tid = run.data.tags.get("ray_trial_id")
        if tid not in known:
            c.set_tag(run.info.run_id, STATE_TAG, "LOST")
            if run.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status="KILLED")
            c.delete_run(run.info.run_id)
            print(f"[tune] trial {tid} started after the last saved sweep state and was lost with the driver; "
                  f"its MLflow run {run.info.run_id} is deleted (a new trial takes its place)", flush=True)


# --------------------------------------------------------------------------- Ray, storage, checks


def start_ray(num_cpus: int | None, dashboard: bool) -> tuple[bool, str | None]:
    """Connect to $RAY_ADDRESS or start a fresh local cluster; (we connected, dashboard URL)."""
    import ray

    from lora_diffusion.train import LOOPBACK, QUIET_EXIT_RUNTIME_ENV, free_port, loopback_only, quiet_ray_sigterm_exit

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ctx = ray.init(address=address, log_to_driver=True)
        return True, _url(ctx.dashboard_url)
    # a local single-node cluster: every Ray process listens on 127.0.0.1 only (see train.loopback_only)
    kwargs: dict[str, Any] = {"num_cpus": num_cpus, "include_dashboard": dashboard, "_node_ip_address": LOOPBACK,
                              "runtime_env": QUIET_EXIT_RUNTIME_ENV}  # no SystemExit report at shutdown
    quiet_ray_sigterm_exit()
    port = free_port()
    if dashboard:
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    # Ray Train's placement-group cleaner asks the state API; point it at our own cluster (see ray-stack notes).
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    with loopback_only():
        ctx = ray.init(**kwargs)
    return True, _url(ctx.dashboard_url) if dashboard else None


def _url(u: str | None) -> str | None:
    if not u:
        return None
    return u if "://" in u else f"http://{u}"


def local_store_dir(uri: str) -> Path | None:
    """The folder of a SQLite or file-based MLflow store (None for a server or database)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].lstrip("/")).resolve() if uri.startswith("file:/") else None
    if "://" not in uri:
        return Path(uri)
    return None


def check_shared_paths(paths: dict[str, Path], node_sees) -> None:
    """On a multi-node cluster every node must see `paths` (the MLflow store, the storage path).

    `node_sees(path_of_marker) -> {node: bool}` runs a check on every node. Raises SweepError naming
    the path, the nodes that do not see it and what to use instead.
    """
    for what, folder in paths.items():
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".lora_diffusion_shared_check_{os.getpid()}"
        marker.write_text("shared?")
        try:
            seen = node_sees(str(marker))
        finally:
            marker.unlink(missing_ok=True)
        blind = sorted(n for n, ok in seen.items() if not ok)
        if blind:
            hint = ("use an MLflow server (mlflow server --backend-store-uri ... --host <head ip>) and pass its http:// URI "
                    "with --tracking-uri, or put the SQLite file on storage every node mounts") if what == "tracking" else \
                   "pass --storage-path on storage every node mounts (e.g. $HOME or /fs/scratch on OSC)"
            raise SweepError(f"{what}: {folder} is not visible from node(s) {', '.join(blind)} of this {len(seen)}-node "
                             f"Ray cluster; {hint}")


def _ray_node_sees(marker: str) -> dict[str, bool]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(path: str) -> bool:
        return os.path.exists(path)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})":
            exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
            for n in nodes}
    return {k: bool(ray.get(v, timeout=120)) for k, v in refs.items()}


def check_cluster(uri: str, storage: Path, space: Space) -> list[str]:
    """Multi-node checks and resource fit; returns warnings to print (raises SweepError for blocking problems)."""
    import ray

    warnings = []
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        paths = {"storage path": storage}
        store = local_store_dir(uri)
        if store is not None:
            paths["tracking"] = store
        check_shared_paths(paths, _ray_node_sees)
        if store is not None and uri.startswith("sqlite:///"):
            warnings.append(f"tracking: {len(nodes)} nodes write to one SQLite file ({uri}); it is shared, but SQLite on "
                            "network file systems locks poorly: an MLflow server is the safer choice")
    total = ray.cluster_resources()
    need = space.resources_per_trial()["total"]
    for res, amount in need.items():
        if amount and total.get(res, 0) < amount:
            raise SweepError(f"resources: one trial needs {amount:g} {res}, the Ray cluster has {total.get(res, 0):g}; "
                             "lower resources.cpus_per_worker / workers / gpus_per_worker in the space")
    return warnings


def preflight(space: Space, uri: str, check_resources: bool = True) -> None:
    """Everything that would fail later, checked now: tracking store, data, base model(s), resources (this
    machine's, for a local cluster; --dry-run skips those: a plan may be meant for a cluster)."""
    from lora_diffusion import train
    from lora_diffusion.tracking import check_tracking_uri

    if not space.base.tracking.enabled:
        raise SweepError("tracking.enabled: got False; the tuning service records every trial in MLflow "
                         "(set --tracking-uri to choose the store)")
    train.preflight(space.base, check_resources=check_resources)
    check_tracking_uri(uri)
    for p in space.params:
        if p.key == "model.base":
            for choice in p.choices:
                train.check_base(choice)
    if check_resources and os.environ.get("RAY_ADDRESS") is None:
        need = space.resources_per_trial()["total"]
        ncpu = os.cpu_count() or 1
        if need["CPU"] > ncpu:
            raise SweepError(f"resources: one trial needs {need['CPU']} CPUs, this machine has {ncpu}")


# --------------------------------------------------------------------------- results


def collect_trials(exp_dir: Path, space: Space, uri: str, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per Tune trial: id, state, objective, sampled params, MLflow run, error."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(exp_dir))
    runs = {r.data.tags.get("ray_trial_id"): r for r in child_runs(uri, experiment_id, parent_run_id)}
    base = space.base.to_dict()
    rows = []
    for t in analysis.trials:
        last = t.last_result or {}
        state = trial_state(t.status, last, _trial_max_steps(base, t.config))
        run = runs.get(t.trial_id)
        rows.append({
            "trial_id": t.trial_id, "trial_name": str(t), "state": state, "status": t.status,
            "objective": last.get(OBJECTIVE), "step": last.get("step"), "params": dict(t.config),
            # one value per objective (space.metrics), the first = `objective`
            "values": [last.get(m) for m in searcher_metrics(space)],
            "run_id": run.info.run_id if run else None,
            "error": (run.data.tags.get("error") if run else None) or (_error_line(t) if t.status == "ERROR" else None),
            "checkpoint": getattr(getattr(t, "checkpoint", None), "path", None),
            "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and (k.startswith(("eval_", "val_")) or k in (OBJECTIVE, "loss", "step", *space.metrics))},
        })
    return rows


def pareto_front(rows: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    """The FINISHED trials with every objective value that no other such trial dominates (at least as good in
    every objective and better in one), best first by the first objective."""
    ok = [r for r in rows if r["state"] == FINISHED and len(r.get("values") or []) == len(modes)
          and all(_finite(v) for v in r["values"])]
    sign = [1.0 if m == "max" else -1.0 for m in modes]  # larger is better after the sign

    def key(r):
        return [s * float(v) for s, v in zip(sign, r["values"])]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    front = [r for r in ok if not any(dominates(key(o), key(r)) for o in ok if o is not r)]
    return sorted(front, key=lambda r: [-x for x in key(r)])


def best_trial(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["state"] == FINISHED and isinstance(r["objective"], (int, float)) and math.isfinite(r["objective"])]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r["objective"])


def trials_table(rows: list[dict[str, Any]], space: Space, mode: str, limit: int = 10,
                 front: list[dict[str, Any]] | None = None) -> str:
    """The trials, best first by the objective; a two-objective sweep adds the second metric and marks
    the Pareto front's trials with '*'."""
    keys = [p.key for p in space.params]
    short = {k: k.split(".")[-1] for k in keys}
    on_front = {r["trial_id"] for r in front or []}
    extra = space.metrics[1:]
    def sort_key(r):
        o = r["objective"]
        has = isinstance(o, (int, float)) and math.isfinite(o)
        rank = {FINISHED: 0, PRUNED: 1, FAILED: 2}.get(r["state"], 3)
        return (rank, 0 if has else 1, (-o if mode == "max" else o) if has else 0)
    rows = sorted(rows, key=sort_key)
    head = ["#", "trial", "state", OBJECTIVE] + extra + (["pareto"] if extra else []) + ["step"] + [short[k] for k in keys]
    body = []
    for i, r in enumerate(rows[:limit], 1):
        o = r["objective"]
        more = [_cell(v) if _finite(v) else "-" for v in (r.get("values") or [None] * (len(extra) + 1))[1:]]
        body.append([str(i), r["trial_name"], r["state"], f"{o:.4g}" if isinstance(o, (int, float)) else "-"] + more
                    + (["*" if r.get("trial_id") in on_front else ""] if extra else [])
                    + [str(r["step"] if r["step"] is not None else "-")]
                    + [_cell(r["params"].get(k, "-")) for k in keys])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in best.json")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def optuna_summary(storage_url: str, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Optuna study as JSON: every trial (number, state, value(s), params), matched to its Tune trial by params."""
    import optuna

    study = optuna.load_study(study_name=name, storage=open_optuna_storage(storage_url))
    multi = len(study.directions) > 1
    by_params = {json.dumps(r["params"], sort_keys=True, default=str): r["trial_id"] for r in rows}
    trials, claimed = [], set()
    # Ended Optuna trials claim their Tune trial first; a RUNNING one whose Tune trial was lost with a killed
    # driver (and sampled again after the restore) stays unmatched.
    for t in sorted(study.trials, key=lambda t: (t.state.name == "RUNNING", t.number)):
        tid = by_params.get(json.dumps(t.params, sort_keys=True, default=str))
        tid = None if tid in claimed else tid
        claimed.add(tid)
        trials.append({"number": t.number, "state": t.state.name, "values": t.values,
                       **({} if multi else {"value": t.value}), "params": t.params,
                       "ray_trial_id": tid,
                       "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
                       "datetime_start": str(t.datetime_start) if t.datetime_start else None,
                       "datetime_complete": str(t.datetime_complete) if t.datetime_complete else None})
    trials.sort(key=lambda t: t["number"])
    summary: dict[str, Any] = {"study_name": name, "directions": [d.name for d in study.directions],
                               **({} if multi else {"direction": study.direction.name}),
                               "sampler": type(study.sampler).__name__, "n_trials": len(trials),
                               "states": {s: sum(1 for t in trials if t["state"] == s) for s in sorted({t["state"] for t in trials})},
                               "trials": trials}
    if multi:  # Optuna's own Pareto front (its best_trials)
        summary["best_trials"] = [{"number": b.number, "values": b.values, "params": b.params} for b in study.best_trials]
        return summary
    try:
        b = study.best_trial
        summary["best_trial"] = {"number": b.number, "value": b.value, "params": b.params}
    except ValueError:
        summary["best_trial"] = None
    return summary


def register_best(uri: str, model_name: str, run_id: str, tags: dict[str, str]) -> str | None:
    """Register runs:/<run_id>/adapter as a version of `model_name` (once per run); the version number.

    The version's description is the adapter's model card (its README.md, see model_card.py)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from lora_diffusion.model_card import CARD_NAME

    c = _client(uri)
    artifacts = c.list_artifacts(run_id, "adapter")
    if not artifacts:
        print(f"[tune] warning: run {run_id} has no adapter artifact; nothing registered", file=sys.stderr)
        return None
    description = f"best trial of sweep {tags.get('sweep')} ({tags.get('metric')} = {tags.get('objective')})"
    if any(a.path.rsplit("/", 1)[-1] == CARD_NAME for a in artifacts):
        with tempfile.TemporaryDirectory() as tmp:
            description = Path(c.download_artifacts(run_id, f"adapter/{CARD_NAME}", tmp)).read_text(encoding="utf-8")
    source = f"runs:/{run_id}/adapter"
    try:
        c.create_registered_model(model_name, description="Best LoRA-Diffusion adapters of the sweep of the same name")
    except MlflowException:
        pass  # exists
    for mv in c.search_model_versions(f"name = '{model_name}'"):
        if mv.run_id == run_id and mv.source == source:
            return str(mv.version)
    mv = c.create_model_version(model_name, source=source, run_id=run_id, tags=tags, description=description)
    return str(mv.version)


def finish_sweep(space: Space, exp_dir: Path, uri: str, experiment_id: str, parent_run_id: str, storage_url: str,
                 interrupted: bool, wall_s: float) -> dict[str, Any]:
    """Best trials table, best.json, Optuna summary and registry; the parent run gets them all."""
    from lora_diffusion.tracking import RunTracker, redact_uri

    rows = collect_trials(exp_dir, space, uri, experiment_id, parent_run_id)
    front = pareto_front(rows, space.modes) if space.multi_objective else None
    # two objectives: the registered "best" is the front's best by the first objective
    best = best_trial(front if front is not None else rows, space.mode)
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in (FINISHED, PRUNED, FAILED, RUNNING)}
    parent = RunTracker(uri, parent_run_id, owned=True)
    if interrupted:  # trials cut off by the interruption: KILLED until a resume continues them
        c = _client(uri)
        for r in rows:
            if r["state"] == RUNNING and r["run_id"]:
                c.set_tag(r["run_id"], STATE_TAG, "INTERRUPTED")
                c.set_terminated(r["run_id"], status="KILLED")
    model_uri = version = None
    if best is not None and best["run_id"] and not interrupted:
        version = register_best(uri, space.model_name, best["run_id"],
                                {"sweep": space.name, "metric": space.metric, "objective": str(best["objective"]),
                                 "ray_trial_id": best["trial_id"]})
        if version:
            model_uri = f"models:/{space.model_name}/{version}"
    result = {
        "sweep": space.name, "metric": space.metric, "mode": space.mode, "state": "INTERRUPTED" if interrupted else "FINISHED",
        "metrics": space.metrics, "modes": space.modes, "asha": asha_note(space),
        "optuna_storage": _shown_storage(storage_url, exp_dir), "initial_points": space.points,
        "experiment_path": str(exp_dir), "tracking_uri": redact_uri(uri), "mlflow_experiment": space.name,
        "mlflow_experiment_id": experiment_id, "parent_run_id": parent_run_id, "counts": counts,
        "trials_planned": space.spec.num_samples, "wall_time_s": round(wall_s, 1),
        "best": None if best is None else {
            **{k: best[k] for k in ("trial_id", "trial_name", "objective", "params", "metrics", "run_id", "checkpoint")},
            "adapter_uri": f"runs:/{best['run_id']}/adapter" if best["run_id"] else None,
            "model_uri": model_uri, "registered_model": space.model_name if version else None, "model_version": version,
        },
        "trials": rows,
    }
    if front is not None:
        result["pareto_front"] = [{"trial_id": r["trial_id"], "trial_name": r["trial_name"], "run_id": r["run_id"],
                                   "values": dict(zip(space.metrics, r["values"])), "params": r["params"]} for r in front]
    (exp_dir / "best.json").write_text(json.dumps(result, indent=2, default=str))
    parent.log_artifact(exp_dir / "best.json")
    try:
        parent.log_text(json.dumps(optuna_summary(storage_url, space.name, rows), indent=2, default=str), "optuna_study.json")
    except Exception as e:  # noqa: BLE001 - a summary problem must not hide the results
        print(f"[tune] warning: no Optuna summary: {e}", file=sys.stderr)
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = [p.key for p in space.params]
    extra = space.metrics[1:]
    on_front = {r["trial_id"] for r in front or []}
    w.writerow(["trial_id", "state", OBJECTIVE, *extra, *(["pareto_front"] if extra else []), "step", "run_id", *keys, "error"])
    for r in rows:
        w.writerow([r["trial_id"], r["state"], r["objective"], *r["values"][1:],
                    *([r["trial_id"] in on_front] if extra else []), r["step"], r["run_id"],
                    *[r["params"].get(k, "") for k in keys], r["error"] or ""])
    parent.log_text(buf.getvalue(), "trials.csv")
    parent.log_metrics({f"trials_{k.lower()}": v for k, v in counts.items()} | {"sweep_wall_s": wall_s}, step=0)
    tags = {"sweep_state": result["state"], "trials_planned": str(space.spec.num_samples)}
    if front is not None:
        parent.log_metrics({"pareto_front_size": len(front)}, step=0)
        tags["pareto_front_trials"] = ",".join(r["trial_id"] for r in front)[:4000]
    if best is not None:
        parent.log_metrics({"best_objective": best["objective"]}, step=0)
        tags.update({"best_trial_id": best["trial_id"], "best_run_id": best["run_id"], "best_model_uri": model_uri})
    parent.set_tags(tags)
    parent.end("KILLED" if interrupted else "FINISHED")
    return result


def asha_note(space: Space) -> str:
    """What ASHA compares, said plainly (a two-objective sweep's scheduler sees one metric only)."""
    if space.scheduler_metric is None:
        return "off: every trial runs to the end"
    note = f"on {space.scheduler_mode} {space.scheduler_metric}"
    if space.multi_objective:
        note += (f" (one metric; the Pareto front is of the final {' and '.join(space.metrics)}; a trial ASHA stops "
                 "has no final values and is not on it)")
    return note


def _shown_storage(spec: str, exp_dir: Path) -> str:
    from lora_diffusion.tracking import redact_uri

    return redact_uri(spec) if "://" in spec else str(Path(spec))


# --------------------------------------------------------------------------- the command


def sweep_fingerprint(space: Space, optuna_storage: str | None = None) -> dict[str, Any]:
    """What a sweep is started with; a restore must match it (but num_samples may grow: see check_restorable).
    `optuna_storage`: the journal file's name or the redacted --optuna-storage URL."""
    out: dict[str, Any] = {"space": space.spec.model_dump(mode="json"), "base": space.base.to_dict()}
    if optuna_storage is not None:
        out["optuna_storage"] = optuna_storage
    warm = getattr(space, "_extra_points", None)
    if warm:
        out["warm_start"] = warm
    return out


def _fingerprint_storage(spec: str, exp_dir: Path) -> str:
    if spec == str(exp_dir / JOURNAL_FILE):
        return JOURNAL_FILE
    if spec == f"sqlite:///{exp_dir / LEGACY_STUDY_DB}":
        return LEGACY_STUDY_DB
    return _shown_storage(spec, exp_dir)


def check_restorable(exp_dir: Path, space: Space, optuna_storage: str | None = None) -> int | None:
    """Refuse to restore a sweep started with other settings (the diff says which); the trial count it
    was planned with (a larger count extends the sweep), None when there is no saved sweep."""
    f = exp_dir / SWEEP_FILE
    if not f.is_file():
        return None
    old = json.loads(f.read_text())
    new = json.loads(json.dumps(sweep_fingerprint(space, optuna_storage)))
    if "optuna_storage" not in old:  # written before the storage was recorded
        new.pop("optuna_storage", None)
    planned = old.get("space", {}).pop("num_samples", None)
    new.get("space", {}).pop("num_samples", None)
    if old != new:
        diffs = nested_diff(old, new)
        raise SweepError(f"{exp_dir} holds sweep {space.name!r} started with different settings "
                         f"({'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}); resume it with the same space file, "
                         "overrides and flags (only --num-samples may grow: that extends the sweep), or start a new "
                         "sweep with --name")
    return planned


def extend_search(exp_dir: Path, num_samples: int) -> int:
    """Raise the trial count in Tune's saved search state (the newest search_gen_state-*.json, which the restored
    Tuner reads back), so the restored sweep samples more trials from the same Optuna study. The old count."""
    import ray.cloudpickle as cloudpickle

    files = sorted(exp_dir.glob("search_gen_state-*.json"))  # Ray restores the last by name
    if not files:
        raise SweepError(f"{exp_dir}: no saved search state (search_gen_state-*.json): this sweep cannot be extended; "
                         "start a new one with --name (and --warm-start to reuse its best configs)")
    state = cloudpickle.loads(files[-1].read_bytes())
    old = int(state["total_samples"])
    state["total_samples"], state["finished"] = num_samples, False
    tmp = files[-1].with_name(f".{files[-1].name}.extend")
    tmp.write_bytes(cloudpickle.dumps(state))
    os.replace(tmp, files[-1])
    return old


def warm_start_points(source: str, storage: Path, space: Space, k: int) -> tuple[list[dict[str, Any]], Path]:
    """The configs of the best `k` trials of an earlier sweep (its best.json: a path, a folder, or a sweep name
    under the storage path), restricted to the parameters this space searches. Pareto-front trials come first."""
    p = Path(source).expanduser()
    tried = [p] if p.suffix == ".json" else [p / "best.json", storage / source / "best.json"]
    found = next((t for t in tried if t.is_file()), None)
    if found is None:
        raise SweepError(f"--warm-start: {source!r}: no best.json at {', '.join(map(str, tried))}; give the name of a "
                         "finished sweep (its folder under --storage-path) or the path of its best.json")
    try:
        data = json.loads(found.read_text())
        rows = list(data["trials"])
    except (ValueError, KeyError, TypeError) as e:
        raise SweepError(f"--warm-start: {found}: not a sweep's best.json ({type(e).__name__}: {e})") from None
    if k < 1:
        raise SweepError(f"--warm-start-k: got {k}; must be >= 1")
    mode = data.get("mode", "max")
    scored = [r for r in rows if r.get("state") == FINISHED and _finite(r.get("objective"))]
    scored.sort(key=lambda r: -r["objective"] if mode == "max" else r["objective"])
    front = [r.get("trial_id") for r in data.get("pareto_front") or []]
    scored.sort(key=lambda r: 0 if r.get("trial_id") in front else 1)  # stable: front first, each by objective
    if not scored:
        raise SweepError(f"--warm-start: {found}: no finished trial with an objective to start from")
    known = {q.key for q in space.params}
    points, dropped = [], set()
    for r in scored:
        pt = {key: v for key, v in (r.get("params") or {}).items() if key in known}
        dropped |= set(r.get("params") or {}) - known
        if pt and pt not in points:
            points.append(pt)
        if len(points) == k:
            break
    if dropped:
        print(f"[tune] warm start: {', '.join(sorted(dropped))} not searched by this space; left out of the points", flush=True)
    if not points:
        raise SweepError(f"--warm-start: {found}: its trials share no searched parameter with this space "
                         f"({', '.join(sorted(known))})")
    return points, found


def nested_diff(a, b, prefix="") -> list[str]:
    """What differs between two nested dicts, one `dotted.key: was A, now B` each (sorted by key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += nested_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: was {a!r}, now {b!r}"]


def print_where(space: Space, exp_dir: Path, uri: str, experiment_id: str | None, dashboard: str | None,
                optuna_storage: str | None = None) -> None:
    from lora_diffusion.tracking import redact_uri

    print(f"[tune] experiment folder: {exp_dir}")
    if optuna_storage:
        shown = _shown_storage(optuna_storage, exp_dir)
        print(f"[tune] Optuna study {space.name!r} in {shown}; browse it: optuna-dashboard {shown} --host 127.0.0.1 --port 8080")
    if dashboard:
        print(f"[tune] Ray dashboard: {dashboard}")
    print(f"[tune] MLflow: experiment {space.name!r}" + (f" (id {experiment_id})" if experiment_id else "")
          + f" at {redact_uri(uri)}")
    if uri.startswith("sqlite:///") or "://" not in uri:
        art = artifact_location(uri, space.name)
        print(f"[tune] MLflow UI: mlflow ui --backend-store-uri {uri}"
              + (f" --default-artifact-root {Path(art).parent}" if art else "") + " --host 127.0.0.1 --port 5000"
              + (f"  ->  http://127.0.0.1:5000/#/experiments/{experiment_id}/runs" if experiment_id else ""), flush=True)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("space", help="search space YAML (see tune_spaces/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the space's base config, e.g. train.max_steps=50")
    p.add_argument("--data-dir", help="local data folder (<dir>/<task>/<split>.jsonl); default $LORA_DIFFUSION_DATA_DIR, else the Hub")
    p.add_argument("--name", help="sweep name (default: the space's `name`); names the experiment folder and MLflow experiment")
    p.add_argument("--storage-path", help=f"where Tune keeps experiments (default ./{DEFAULT_STORAGE}); shared storage on a cluster")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.tracking_uri, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the space's num_samples); with --resume, "
                   "a larger count extends a finished sweep (same Optuna study, same MLflow parent run)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name (error if there is none)")
    p.add_argument("--optuna-storage", metavar="URL", help=f"Optuna RDB storage URL (postgresql://..., sqlite:///...); default: "
                   f"the journal file {JOURNAL_FILE} in the experiment folder (safe on cluster file systems)")
    p.add_argument("--warm-start", metavar="SWEEP_OR_BEST_JSON", help="try the best configs of an earlier sweep first "
                   "(its name under --storage-path, its folder, or its best.json)")
    p.add_argument("--warm-start-k", type=int, default=WARM_START_K, help=f"how many of its best configs (default {WARM_START_K})")
    p.add_argument("--retry-failed", action="store_true", help="with a restore: run failed trials again from their last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved space, sample configs and the resource plan; start nothing")
    p.add_argument("--samples", type=int, default=5, help="configs to sample in --dry-run (default 5)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray cluster without its dashboard")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before or after the flags
    for flag in ("--samples", "--num-samples", "--num-cpus", "--warm-start-k"):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and value < 1:
            p.error(f"{flag}: got {value}; must be >= 1")  # exit code 2, before anything is loaded
    return args


def check_storage_path(storage: Path) -> None:
    """--storage-path is a folder this user can write (or can create), checked before Ray starts; nothing is
    created here (a probe folder is made and removed in the nearest existing parent)."""
    from lora_diffusion.config import ConfigError, check_writable_folder

    try:
        check_writable_folder(storage, "--storage-path")
    except ConfigError as e:
        raise SweepError(f"{e} (the folder Tune keeps sweeps in; default ./{DEFAULT_STORAGE})") from None


def check_restore_ownership(storage: Path, exp_dir: Path) -> None:
    """Before `Tuner.restore` (which unpickles tuner.pkl, the trainable and trial state from `exp_dir`): the
    storage and experiment folders and every pickle in the experiment must belong to this user and be
    writable by nobody else, or someone else could have planted code that the restore runs."""
    import stat

    uid = os.getuid()
    paths = [storage, exp_dir]
    for folder, dirs, files in os.walk(exp_dir):
        paths += [Path(folder) / d for d in dirs] + [Path(folder) / f for f in files if f.endswith((".pkl", ".pickle"))]
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise SweepError(f"--resume: {p} is a symbolic link; a sweep to restore must be plain files and folders of "
                             "yours (Ray unpickles them)")
        if st.st_uid != uid:
            raise SweepError(f"--resume: {p} belongs to user id {st.st_uid}, not to you ({uid}); restoring would unpickle "
                             "files someone else controls, so it is refused. Copy the sweep into a folder of yours")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = " and ".join(w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if st.st_mode & bit)
            raise SweepError(f"--resume: {p} is writable by {who} (mode {stat.filemode(st.st_mode)}); restoring would unpickle files others could have "
                             f"changed, so it is refused. If only you wrote them: chmod -R go-w {exp_dir} {storage}")


def dry_run(space: Space, exp_dir: Path, uri: str, n: int) -> int:
    print(space.describe())
    print()
    samples = space.sample(n)
    print(f"first {len(samples)} of {space.spec.num_samples} sampled configs (seed {space.spec.sampler.seed}; constraints checked):")
    for i, s in enumerate(samples, 1):
        print(f"  {i}: " + ", ".join(f"{k.split('.')[-1]}={_cell(v)}" for k, v in s.items()))
    print()
    print(space.resource_plan())
    print()
    state = "exists: it will be resumed" if (exp_dir / SWEEP_FILE).is_file() else "new"
    print(f"experiment folder: {exp_dir} ({state})")
    from lora_diffusion.tracking import redact_uri

    print(f"MLflow: experiment {space.name!r} at {redact_uri(uri)}; best adapter registered as {space.model_name!r}")
    print(f"trials: {space.spec.num_samples}")
    print(f"checked as a real run checks before it starts Ray: data files, base model(s), MLflow store "
          f"{redact_uri(uri)}, storage path {exp_dir.parent} (resources: against the cluster when the sweep starts)")
    print("dry run: nothing started")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lora_diffusion.config import ConfigError
    from lora_diffusion.tasks import DataError
    from lora_diffusion.tracking import TrackingError, resolve_tracking_uri

    # -- 1. the space, the paths, the checks (no Ray yet) -----------------------------------------
    try:
        data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
        space = load_space(args.space, overrides=args.overrides, name=args.name, num_samples=args.num_samples, data_dir=data_dir)
        from lora_diffusion.train import absolutize

        space.rebase(absolutize(space.base))
        storage = Path(args.storage_path or DEFAULT_STORAGE).expanduser().resolve()
        check_storage_path(storage)
        exp_dir = storage / space.name
        uri = resolve_tracking_uri(args.tracking_uri or space.base.tracking.tracking_uri)
        if args.warm_start:
            points, found = warm_start_points(args.warm_start, storage, space, args.warm_start_k)
            space.add_points(points, f"--warm-start {found}")
            print(f"[tune] warm start: the best {len(points)} config(s) of {found} are tried first", flush=True)
        if args.dry_run:  # the same checks a real run makes before Ray starts; a failure exits 2 as there
            preflight(space, uri, check_resources=False)
            return dry_run(space, exp_dir, uri, args.samples)
        if args.optuna_storage:
            check_optuna_storage(args.optuna_storage)
        storage_url = optuna_storage_spec(exp_dir, args.optuna_storage)
        fingerprint_storage = _fingerprint_storage(storage_url, exp_dir)
        restoring = (exp_dir / SWEEP_FILE).is_file()
        if args.resume and not restoring:
            raise SweepError(f"--resume: no sweep {space.name!r} in {storage} (no {exp_dir / SWEEP_FILE}); run without --resume to start it")
        extend_from = None
        if restoring:
            check_restore_ownership(storage, exp_dir)
            planned = check_restorable(exp_dir, space, fingerprint_storage)
            if planned is not None and space.spec.num_samples < planned:
                raise SweepError(f"num_samples: sweep {space.name!r} is planned with {planned} trials, got {space.spec.num_samples}; "
                                 f"resume it with --num-samples {planned} (or more, to extend it): a sweep is never shrunk")
            if planned is not None and space.spec.num_samples > planned:
                extend_from = planned
        preflight(space, uri)
    except (SpaceError, SweepError, ConfigError, DataError, TrackingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # -- 2. Ray and MLflow ---------------------------------------------------------------------------
    import ray
    from ray import tune

    from lora_diffusion import faults as env_faults

    interrupted_by: list[int] = []

    def on_term(signum, frame):  # SIGTERM (SLURM, requeue) -> the graceful stop Tune gives SIGINT
        interrupted_by.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    # The objective exists only in reports that carry the space's metric (eval_* at the end; ASHA has its own).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Every report checkpoints, so Tune snapshots the sweep state often (what a resume needs); no warning for it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = time.time()
    connected = False
    parent_run_id = None
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        connected, dashboard = start_ray(args.num_cpus, not args.no_dashboard)
        signal.signal(signal.SIGTERM, on_term)  # after ray.init: Ray's core installs its own (abort) handler
        faults = env_faults.watch(space.name)  # a trial's tracking-store or disk fault stops the sweep resumably
        faults.close()  # a fault box left by an earlier driver of this sweep on a lasting cluster
        for w in check_cluster(uri, storage, space):
            print(f"[tune] warning: {w}", flush=True)
        experiment_id = ensure_experiment(uri, space.name)
        parent_run_id = start_parent_run(uri, space, experiment_id)
        print_where(space, exp_dir, uri, experiment_id, dashboard, storage_url)
        exp_dir.mkdir(parents=True, exist_ok=True)
        sweep = {"name": space.name, "base": space.base.to_dict(), "metric": space.metric, "tracking_uri": uri,
                 "experiment": space.name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                 "trial_runner": space.trial_runner, "train_storage": str(exp_dir / "train"),
                 "retry_failed": args.retry_failed,
                 # Tune's trial table shows the first 4 metrics of the first report: make them these
                 "console_metrics": tuple(dict.fromkeys(["step", space.scheduler_metric or "loss", space.metric, "loss"]))}

        # -- 3. the Tuner (new or restored) ------------------------------------------------------------
        res = space.resources_per_trial()["trial"]
        resources = {k.lower(): v for k, v in res.items() if v or k == "CPU"}
        if space.trial_runner != "in_process":
            # The trial process only waits on its TorchTrainer, and Ray Train puts the trainer's controller on
            # the same node: keep both on the head (as Ray Train does with its state actor). A lost worker node
            # then costs the trial its Ray Train workers, which restart from the last checkpoint
            # (train.max_failures), not the trial itself (Tune would record it FAILED; cluster/README.md).
            resources[HEAD_NODE_RESOURCE] = 0.001
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), resources)
        can_restore = restoring and tune.Tuner.can_restore(str(exp_dir))
        if can_restore and extend_from is not None:
            extend_search(exp_dir, space.spec.num_samples)
            _client(uri).set_tag(parent_run_id, "extended", f"{extend_from} -> {space.spec.num_samples} trials")
            print(f"[tune] extending sweep {space.name!r} from {extend_from} to {space.spec.num_samples} trials "
                  "(same Optuna study, same MLflow parent run)", flush=True)
        if not restoring or extend_from is not None:
            (exp_dir / SWEEP_FILE).write_text(json.dumps(sweep_fingerprint(space, fingerprint_storage), indent=2))
        if space.multi_objective:
            print(f"[tune] objectives: {', '.join(f'{x} {m}' for m, x in zip(space.metrics, space.modes))} (Optuna "
                  f"{space.spec.sampler.name}, Pareto front); ASHA {asha_note(space)}", flush=True)
        if can_restore:
            forget_lost_trials(uri, experiment_id, parent_run_id, exp_dir)
            record_missed_ends(sweep, exp_dir)
            print(f"[tune] resuming sweep {space.name!r} from {exp_dir} (finished trials are kept"
                  + (", failed ones run again" if args.retry_failed else ", failed ones stay failed") + ")", flush=True)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=args.retry_failed, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=_make_searcher(space, storage_url), scheduler=_make_scheduler(space),
                                            num_samples=space.spec.num_samples, max_concurrent_trials=space.spec.max_concurrent,
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                            # an in-process trial imports torch/transformers/datasets: keep the process
                                            reuse_actors=space.trial_runner == "in_process"),
                run_config=tune.RunConfig(
                    name=space.name, storage_path=str(storage), callbacks=[trial_states_callback(sweep), faults.callback()],
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
        fitted = tuner.fit()
        wall = time.time() - started
        if faults.items:  # stopped for a fault of the environment: say which, touch nothing more
            faults.close()
            return fault_exit(faults.items, uri, space, exp_dir, storage)
        for t in save_tune_decisions(exp_dir, fitted._experiment_analysis.trials):
            print(f"[tune] trial {t}: Tune's saved state corrected (its process was lost with its node)", flush=True)

        # -- 4. results --------------------------------------------------------------------------------
        rows_state = _states(exp_dir)
        interrupted = bool(interrupted_by) or rows_state["unfinished"] > 0 or rows_state["total"] < space.spec.num_samples
        result = finish_sweep(space, exp_dir, uri, experiment_id, parent_run_id, storage_url, interrupted, wall)
    except KeyboardInterrupt:
        print(f"[tune] interrupted before the sweep started; rerun with --resume", file=sys.stderr)
        return 130
    except (SweepError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        fault = env_faults.fault_of(e)
        if fault is not None:  # e.g. the Optuna study's disk filled up in the driver, or the store went away
            return fault_exit([("the sweep driver", fault)], uri, space, exp_dir, storage)
        if parent_run_id is not None:
            from lora_diffusion.tracking import RunTracker, error_text

            RunTracker(uri, parent_run_id, owned=True).end("FAILED", error=error_text(e))
        raise
    finally:
        if connected:
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous_term)

    c = result["counts"]
    print()
    print(f"[tune] sweep {space.name!r}: {c[FINISHED]} finished, {c[PRUNED]} stopped early by ASHA, {c[FAILED]} failed"
          + (f", {c[RUNNING]} unfinished" if c[RUNNING] else "") + f" in {wall:.0f} s")
    front = result.get("pareto_front")
    if result["trials"]:
        print(f"[tune] best trials by {space.mode} {space.metric}" + (" ('*': on the Pareto front)" if front is not None else "") + ":")
        print(trials_table(result["trials"], space, space.mode, front=front))
    if front is not None:
        print(f"[tune] Pareto front of {', '.join(f'{x} {m}' for m, x in zip(space.metrics, space.modes))}: {len(front)} trial(s)")
        for f in front:
            print(f"[tune]   {f['trial_name']}: " + ", ".join(f"{m}={_cell(v)}" for m, v in f["values"].items())
                  + f"  MLflow run {f['run_id']}")
    b = result["best"]
    if b:
        print(f"[tune] best: {b['trial_name']} {space.metric}={b['objective']:.4g}  MLflow run {b['run_id']}")
        print(f"[tune] best adapter: {b['model_uri'] or b['adapter_uri']}  (lora_diffusion.adapter.load_adapter accepts it)")
    print(f"[tune] results: {exp_dir / 'best.json'}")
    print_where(space, exp_dir, uri, experiment_id, None, storage_url)
    if interrupted:
        print(f"[tune] the sweep was interrupted; its state is saved. Continue it with the same command plus --resume",
              flush=True)
        return 143 if signal.SIGTERM in interrupted_by else 130
    return 0


def fault_exit(items: list, uri: str, space: Space, exp_dir: Path, storage: Path) -> int:
    """The sweep was stopped for a fault of the environment (faults.py): say what and where, mark the MLflow
    runs INTERRUPTED when the store still answers, and return EXIT_FAULT. Nothing recorded is touched otherwise."""
    from lora_diffusion.faults import DISK, EXIT_FAULT, TRACKING, space_report
    from lora_diffusion.tracking import redact_uri

    kinds = {f.kind for _, f in items}
    where = "; ".join(dict.fromkeys(f"{w}: {f}" for w, f in items))
    lines = [f"error: the sweep stopped: {where}"]
    if TRACKING in kinds:
        lines.append(f"  tracking URI {redact_uri(uri)} does not answer; start the MLflow server again (same store)")
    if DISK in kinds:
        folders = {"storage path": exp_dir, "temporary folder": Path(tempfile.gettempdir())}
        store = local_store_dir(uri)
        if store is not None:
            folders["MLflow store"] = store
        art = artifact_location(uri, space.name)
        if art is not None:
            folders["MLflow artifacts"] = Path(art)
        lines.append(f"  free space: {space_report(folders)}; free some space there")
    if TRACKING not in kinds:
        import logging

        db_log = logging.getLogger("mlflow.store.db.utils")  # logs a full disk's SQL error with a traceback
        level = db_log.level
        db_log.setLevel(logging.CRITICAL)
        try:
            mark_interrupted(uri, space, exp_dir)
        except Exception as e:  # noqa: BLE001 - the message above matters more
            lines.append(f"  (the MLflow runs could not be marked INTERRUPTED: {e.__class__.__name__}; a resume does it)")
        finally:
            db_log.setLevel(level)
    lines.append(f"  the sweep's state is saved in {exp_dir}; then rerun the same command with --resume")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return EXIT_FAULT


def mark_interrupted(uri: str, space: Space, exp_dir: Path) -> None:
    """The sweep's parent run and its RUNNING child runs: INTERRUPTED / KILLED until a resume continues them."""
    c = _client(uri)
    exp = c.get_experiment_by_name(space.name)
    parent = find_parent_run(uri, exp.experiment_id, space.name) if exp is not None else None
    if parent is None:
        return
    for run in child_runs(uri, exp.experiment_id, parent.info.run_id):
        if run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, STATE_TAG, "INTERRUPTED")
            c.set_terminated(run.info.run_id, status="KILLED")
    c.set_tag(parent.info.run_id, "sweep_state", "INTERRUPTED")
    c.set_terminated(parent.info.run_id, status="KILLED")


def record_missed_ends(sweep: dict[str, Any], exp_dir: Path) -> None:
    """Trials whose end Tune saved but MLflow never heard of (the store was down when they ended): record
    it now, as the driver's TrialStates callback would have."""
    from ray.tune import ExperimentAnalysis

    runs = {r.data.tags.get("ray_trial_id"): r
            for r in child_runs(sweep["tracking_uri"], sweep["experiment_id"], sweep["parent_run_id"])}
    states = trial_states_callback(sweep)
    for t in ExperimentAnalysis(str(exp_dir)).trials:
        if t.status not in ("TERMINATED", "ERROR"):
            continue
        state = trial_state(t.status, t.last_result, _trial_max_steps(sweep["base"], t.config))
        run = runs.get(t.trial_id)
        if run is None or run.data.tags.get(STATE_TAG) != state:
            print(f"[tune] recording in MLflow that trial {t} ended {state} (the store was not reachable then)", flush=True)
            states.record_end(t, state, _error_line(t) if state == FAILED else None)


def save_tune_decisions(exp_dir: Path, trials) -> list[str]:
    """Write Tune's in-memory state of the `trials` (from `tuner.fit()`) that Tune ended ERROR into the saved
    experiment state where that says otherwise; returns the names of the trials corrected.

    Ray Tune 2.60 saves a trial whose own process was lost with its node (ActorUnavailableError) as RUNNING
    although it recorded the trial ERROR (console, error.txt): its actor is already forgotten, so
    `TuneController._schedule_trial_stop` returns before it marks the trial's saved state for refreshing.
    The summary, `--resume` and `compare` read the saved state: they must see what Tune decided. Only ERROR
    is final in memory (a sweep stopped by a signal or a fault leaves unfinished trials to be resumed).
    """
    files = sorted(exp_dir.glob("experiment_state-*.json"))  # Tune reads the newest by name, as here
    if not files:
        return []
    path = files[-1]
    state = json.loads(path.read_text())
    ended = {t.trial_id: t for t in trials if t.status == "ERROR"}
    fixed = []
    for i, entry in enumerate(state.get("trial_data", [])):
        saved = json.loads(entry[0])
        t = ended.get(saved.get("trial_id"))
        if t is not None and saved.get("status") != t.status:
            t.invalidate_json_state()
            state["trial_data"][i] = list(t.get_json_state())
            fixed.append(f"{t} ({saved.get('status')} -> {t.status})")
    if fixed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
    return fixed


def _states(exp_dir: Path) -> dict[str, int]:
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(exp_dir)).trials
    return {"unfinished": sum(1 for t in trials if t.status not in ("TERMINATED", "ERROR")), "total": len(trials)}


if __name__ == "__main__":
    sys.exit(main())
