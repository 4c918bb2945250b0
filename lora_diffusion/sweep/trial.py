"""One trial of a sweep, run by Ray Tune in a worker process: the base config plus the sampled values, trained
in-process (`ObjectiveReporter` over the loop's `TuneReporter`) or by a nested `TorchTrainer`.

Owns: `run_trial` (the Tune trainable; Ray pickles it by this module path), `objective` in every report, the
trial's MLflow child run (created, or found again on a restart), and what a trial that already ended reports.
"""

from __future__ import annotations

from typing import Any

from lora_diffusion.search_space import apply_sampled
from lora_diffusion.sweep.runs import find_child_run
from lora_diffusion.sweep.states import FAILED, FINISHED, PRUNED, RUNNING, STATE_TAG
from lora_diffusion.tracking import OBJECTIVE, RunTracker, client, error_text, is_finite_number, run_tags


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
            self._tracker.log_checkpoint(checkpoint_dir)
        self._inner.report(metrics, checkpoint_dir=checkpoint_dir)


def with_objective(metrics: dict[str, Any], metric: str, first: tuple[str, ...] = ()) -> dict[str, Any]:
    """`metrics` plus `objective` (when `metric` has a finite value), with the keys in `first` up front
    (Tune's console table shows the first metrics of a trial's first report)."""
    v = metrics.get(metric)
    out = {k: metrics[k] for k in first if k in metrics}
    if is_finite_number(v):
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
        client(uri).update_run(tracker.run_id, status="RUNNING")
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
