"""The trial states a sweep records (MLflow tag `trial_state`) and how a Ray Tune trial maps to one.

Owns: the state names, the tag, `trial_state` (Tune status -> state), a trial's `train.max_steps` and its error line.

RUNNING, FINISHED, FAILED (with an `error` tag), PRUNED (stopped early by ASHA: its last report came before
`train.max_steps`), INTERRUPTED (the driver was stopped; a resume continues it), LOST (started after the last
saved sweep state of a driver that was killed; its run is soft-deleted on resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_diffusion.search_space import config_key

STATE_TAG = "trial_state"
FINISHED, FAILED, PRUNED, RUNNING = "FINISHED", "FAILED", "PRUNED", "RUNNING"
INTERRUPTED, LOST = "INTERRUPTED", "LOST"


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


def trial_max_steps(base: dict[str, Any], config: dict[str, Any]) -> int:
    """The trial's `train.max_steps`: sampled (`config`), else the base config's."""
    steps = [v for k, v in config.items() if config_key(k) == "train.max_steps"]
    return int(steps[0] if steps else base["train"]["max_steps"])


def error_line(trial) -> str:
    """The line of a failed Tune trial's error that names the exception (for the `error` tag and best.json)."""
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
