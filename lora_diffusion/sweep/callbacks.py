"""The driver's Ray Tune callback that records each ended trial in its MLflow child run.

Owns: `trial_states_callback` (FINISHED / FAILED / PRUNED, the `error` and `pruned_at_step` tags, a pruned
trial's adapter), also for `compare` and for the ends a resume records late (resume.record_missed_ends).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lora_diffusion.search_space import apply_sampled
from lora_diffusion.sweep.runs import find_child_run
from lora_diffusion.sweep.states import FAILED, FINISHED, PRUNED, STATE_TAG, error_line, trial_max_steps, trial_state
from lora_diffusion.tracking import RunTracker, run_tags


def trial_states_callback(sweep: dict[str, Any]):
    """The Tune callback that records each finished trial's state in its MLflow child run (also for compare)."""
    from ray import tune

    class TrialStates(tune.Callback):
        """Records each finished trial's state in its MLflow child run (the trial process may not be able to:
        ASHA stops it from outside, and a crashed process tags nothing)."""

        def __init__(self, sweep: dict[str, Any]):
            self.sweep = sweep

        def record_end(self, trial, state: str, error: str | None = None) -> None:
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
            state = trial_state("TERMINATED", trial.last_result, trial_max_steps(self.sweep["base"], trial.config))
            if state == PRUNED:
                print(f"[tune] trial {trial} stopped early by ASHA at step {(trial.last_result or {}).get('step')}", flush=True)
            self.record_end(trial, state)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.record_end(trial, FAILED, error_line(trial))

    return TrialStates(sweep)


def _log_pruned_adapter(tracker, trial) -> None:
    """A pruned trial's adapter at the step it was stopped (from its last Tune checkpoint), when readable here."""
    ckpt = getattr(trial, "checkpoint", None)
    path = getattr(ckpt, "path", None)
    if path and (Path(path) / "adapter").is_dir():
        tracker.log_artifacts(Path(path) / "adapter", "adapter")
