"""A sweep's results, read back from Tune's saved state and MLflow: one row per trial, the best trial (or the
Pareto front of two objectives), the table printed at the end, `best.json`, the Optuna study's summary, and
the best adapter registered in the MLflow model registry.

Owns: `collect_trials`, `best_trial`, `pareto_front`, `trials_table`, `optuna_summary`, `register_best` and
`finish_sweep` (all of them, logged to the parent run, which it ends).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from lora_diffusion.search_space import Space
from lora_diffusion.sweep.runs import child_runs
from lora_diffusion.sweep.search import asha_note, open_optuna_storage, searcher_metrics, shown_storage
from lora_diffusion.sweep.states import (FAILED, FINISHED, INTERRUPTED, PRUNED, RUNNING, STATE_TAG, error_line,
                                         trial_max_steps, trial_state)
from lora_diffusion.tracking import OBJECTIVE, RunTracker, client, is_finite_number, redact_uri


def collect_trials(exp_dir: Path, space: Space, uri: str, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per Tune trial: id, state, objective, sampled params, MLflow run, error."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(exp_dir))
    runs = {r.data.tags.get("ray_trial_id"): r for r in child_runs(uri, experiment_id, parent_run_id)}
    base = space.base.to_dict()
    rows = []
    for t in analysis.trials:
        last = t.last_result or {}
        state = trial_state(t.status, last, trial_max_steps(base, t.config))
        run = runs.get(t.trial_id)
        rows.append({
            "trial_id": t.trial_id, "trial_name": str(t), "state": state, "status": t.status,
            "objective": last.get(OBJECTIVE), "step": last.get("step"), "params": dict(t.config),
            # one value per objective (space.metrics), the first = `objective`
            "values": [last.get(m) for m in searcher_metrics(space)],
            "run_id": run.info.run_id if run else None,
            "error": (run.data.tags.get("error") if run else None) or (error_line(t) if t.status == "ERROR" else None),
            "checkpoint": getattr(getattr(t, "checkpoint", None), "path", None),
            "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and (k.startswith(("eval_", "val_")) or k in (OBJECTIVE, "loss", "step", *space.metrics))},
        })
    return rows


def pareto_front(rows: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    """The FINISHED trials with every objective value that no other such trial dominates (at least as good in
    every objective and better in one), best first by the first objective."""
    ok = [r for r in rows if r["state"] == FINISHED and len(r.get("values") or []) == len(modes)
          and all(is_finite_number(v) for v in r["values"])]
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
        more = [cell(v) if is_finite_number(v) else "-" for v in (r.get("values") or [None] * (len(extra) + 1))[1:]]
        body.append([str(i), r["trial_name"], r["state"], f"{o:.4g}" if isinstance(o, (int, float)) else "-"] + more
                    + (["*" if r.get("trial_id") in on_front else ""] if extra else [])
                    + [str(r["step"] if r["step"] is not None else "-")]
                    + [cell(r["params"].get(k, "-")) for k in keys])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in best.json")
    return "\n".join(lines)


def cell(v) -> str:
    """A value as the tables show it (floats to 4 significant digits)."""
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
    from mlflow.exceptions import MlflowException

    from lora_diffusion.model_card import CARD_NAME

    c = client(uri)
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
    rows = collect_trials(exp_dir, space, uri, experiment_id, parent_run_id)
    front = pareto_front(rows, space.modes) if space.multi_objective else None
    # two objectives: the registered "best" is the front's best by the first objective
    best = best_trial(front if front is not None else rows, space.mode)
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in (FINISHED, PRUNED, FAILED, RUNNING)}
    parent = RunTracker(uri, parent_run_id, owned=True)
    if interrupted:  # trials cut off by the interruption: KILLED until a resume continues them
        c = client(uri)
        for r in rows:
            if r["state"] == RUNNING and r["run_id"]:
                c.set_tag(r["run_id"], STATE_TAG, INTERRUPTED)
                c.set_terminated(r["run_id"], status="KILLED")
    model_uri = version = None
    if best is not None and best["run_id"] and not interrupted:
        version = register_best(uri, space.model_name, best["run_id"],
                                {"sweep": space.name, "metric": space.metric, "objective": str(best["objective"]),
                                 "ray_trial_id": best["trial_id"]})
        if version:
            model_uri = f"models:/{space.model_name}/{version}"
    result = {
        "sweep": space.name, "metric": space.metric, "mode": space.mode, "state": INTERRUPTED if interrupted else FINISHED,
        "metrics": space.metrics, "modes": space.modes, "asha": asha_note(space),
        "optuna_storage": shown_storage(storage_url), "initial_points": space.points,
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
