"""Continuing a sweep: what it was started with (`sweep.json`, checked on restore), extending a finished one
(--resume --num-samples N), warm-starting from an earlier sweep's best configs, and putting Tune's saved state
and MLflow back in step before `Tuner.restore` (lost trials, ends MLflow missed) and after `fit`.

Owns: the sweep fingerprint and `check_restorable`, `extend_search`, `warm_start_points`, `forget_lost_trials`,
`record_missed_ends`, `save_tune_decisions`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_diffusion.search_space import Space
from lora_diffusion.sweep.callbacks import trial_states_callback
from lora_diffusion.sweep.checks import SweepError
from lora_diffusion.sweep.runs import child_runs
from lora_diffusion.sweep.search import JOURNAL_FILE, LEGACY_STUDY_DB, shown_storage
from lora_diffusion.sweep.states import FAILED, FINISHED, LOST, STATE_TAG, error_line, trial_max_steps, trial_state
from lora_diffusion.tracking import client, is_finite_number

SWEEP_FILE = "sweep.json"  # in the experiment folder: what the sweep was started with (checked on restore)


def sweep_fingerprint(space: Space, optuna_storage: str | None = None) -> dict[str, Any]:
    """What a sweep is started with; a restore must match it (but num_samples may grow: see check_restorable).
    `optuna_storage`: the journal file's name or the redacted --optuna-storage URL."""
    out: dict[str, Any] = {"space": space.spec.model_dump(mode="json"), "base": space.base.to_dict()}
    if optuna_storage is not None:
        out["optuna_storage"] = optuna_storage
    warm = space.points[len(space.spec.initial_points):]  # the --warm-start points
    if warm:
        out["warm_start"] = warm
    return out


def fingerprint_storage(spec: str, exp_dir: Path) -> str:
    """The Optuna storage as the fingerprint records it: the journal's or legacy database's file name in the
    experiment folder, else the redacted URL."""
    if spec == str(exp_dir / JOURNAL_FILE):
        return JOURNAL_FILE
    if spec == f"sqlite:///{exp_dir / LEGACY_STUDY_DB}":
        return LEGACY_STUDY_DB
    return shown_storage(spec)


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
    scored = [r for r in rows if r.get("state") == FINISHED and is_finite_number(r.get("objective"))]
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


def forget_lost_trials(uri: str, experiment_id: str, parent_run_id: str, exp_dir: Path) -> None:
    """Child runs of trials the saved Tune state does not know (started after its last save, then the
    driver died) are deleted (MLflow's soft delete), so MLflow holds exactly the sweep's trials."""
    from ray.tune import ExperimentAnalysis

    known = {t.trial_id for t in ExperimentAnalysis(str(exp_dir)).trials}
    c = client(uri)
    for run in child_runs(uri, experiment_id, parent_run_id):
        tid = run.data.tags.get("ray_trial_id")
        if tid not in known:
            c.set_tag(run.info.run_id, STATE_TAG, LOST)
            if run.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status="KILLED")
            c.delete_run(run.info.run_id)
            print(f"[tune] trial {tid} started after the last saved sweep state and was lost with the driver; "
                  f"its MLflow run {run.info.run_id} is deleted (a new trial takes its place)", flush=True)


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
        state = trial_state(t.status, t.last_result, trial_max_steps(sweep["base"], t.config))
        run = runs.get(t.trial_id)
        if run is None or run.data.tags.get(STATE_TAG) != state:
            print(f"[tune] recording in MLflow that trial {t} ended {state} (the store was not reachable then)", flush=True)
            states.record_end(t, state, error_line(t) if state == FAILED else None)


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
