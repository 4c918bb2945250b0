"""MLflow for the sweep: its experiment's artifact folder, the parent run (the space, later the results) and
the nested child runs (one per trial, found again by its `ray_trial_id` tag, so a resumed sweep never
duplicates a trial).

Owns: finding and starting the parent run, finding child runs, marking them INTERRUPTED, where a local store lives.
The experiment itself is made by `tracking.ensure_experiment` (with `artifact_location` from here).
"""

from __future__ import annotations

from pathlib import Path

from lora_diffusion.search_space import Space
from lora_diffusion.sweep.states import INTERRUPTED, STATE_TAG
from lora_diffusion.tracking import RunTracker, client, run_tags


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


def find_parent_run(uri: str, experiment_id: str, sweep: str):
    runs = client(uri).search_runs([experiment_id], filter_string=f"tags.run_type = 'sweep' and tags.sweep = '{sweep}'",
                                    max_results=5, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def find_child_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    """The child run of `trial_id` under the sweep's parent run, or None."""
    runs = client(uri).search_runs(
        [experiment_id], filter_string=f"tags.ray_trial_id = '{trial_id}' and tags.run_type = 'trial'", max_results=10)
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    return runs[0] if runs else None


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    out, token = [], None
    while True:
        page = client(uri).search_runs([experiment_id], filter_string="tags.run_type = 'trial'", max_results=1000,
                                        page_token=token)
        out += [r for r in page if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
        token = page.token
        if not token:
            return out


def start_parent_run(uri: str, space: Space, experiment_id: str) -> str:
    """Find the sweep's parent run (resume) or create it; log the space and its settings."""
    existing = find_parent_run(uri, experiment_id, space.name)
    if existing is not None:
        c = client(uri)
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


def mark_interrupted(uri: str, space: Space, exp_dir: Path) -> None:
    """The sweep's parent run and its RUNNING child runs: INTERRUPTED / KILLED until a resume continues them."""
    c = client(uri)
    exp = c.get_experiment_by_name(space.name)
    parent = find_parent_run(uri, exp.experiment_id, space.name) if exp is not None else None
    if parent is None:
        return
    for run in child_runs(uri, exp.experiment_id, parent.info.run_id):
        if run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, STATE_TAG, INTERRUPTED)
            c.set_terminated(run.info.run_id, status="KILLED")
    c.set_tag(parent.info.run_id, "sweep_state", INTERRUPTED)
    c.set_terminated(parent.info.run_id, status="KILLED")


def local_store_dir(uri: str) -> Path | None:
    """The folder of a SQLite or file-based MLflow store (None for a server or database)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].lstrip("/")).resolve() if uri.startswith("file:/") else None
    if "://" not in uri:
        return Path(uri)
    return None
