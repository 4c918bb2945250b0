"""The sweep as the report reads it from MLflow: `load_sweep` gives a `Sweep` (the sweep run(s), its
metric and mode, what it searched) holding one `Trial` per trial run; `ReportError` when it cannot.

Reads MLflow alone: a sweep's parent run `run_type=sweep` (params `sweep.metric` / `sweep.mode` /
`sweep.params` / `sweep.objectives`, the space file as `space/<file>.yaml`) and its trial runs, named as in
the project's naming contract.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lora_diffusion.tracking import OBJECTIVE

# config keys that can differ between trials without being searched
BOOKKEEPING = ("tracking.", "train.output_dir", "task.data_dir", "model.base_path")


class ReportError(RuntimeError):
    """The report cannot be made; the message names the experiment / store and what to do."""


@dataclass
class Trial:
    run_id: str
    name: str
    state: str  # FINISHED | FAILED | PRUNED | RUNNING | KILLED
    method: str
    task: str
    params: dict[str, Any]
    metrics: dict[str, float]
    error: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None

    @property
    def objective(self) -> float | None:
        return self.metrics.get(OBJECTIVE)

    @property
    def trainable(self) -> float | None:
        return self.metrics.get("trainable_params")


@dataclass
class Sweep:
    experiment: str
    experiment_id: str
    tracking_uri: str  # as given (may hold a password: never shown)
    shown_uri: str  # the URI with any password masked, for the page
    metric: str  # the space's metric (what `objective` holds)
    mode: str  # "min" | "max"
    parents: list[Any]
    trials: list[Trial]
    searched: list[str]  # flat config keys that were searched
    searched_source: str
    log_keys: set[str] = field(default_factory=set)  # params searched on a log scale
    notes: list[str] = field(default_factory=list)
    # a two-objective sweep's (metric, mode) pairs, from the sweep run's `sweep.objectives`; the first is `objective`
    objectives: list[tuple[str, str]] = field(default_factory=list)

    def ranked(self) -> list[Trial]:
        """Trials with an objective that did not fail, best first, then the others (in start order)."""
        best = scored(self.trials)
        best.sort(key=lambda t: t.objective, reverse=self.mode == "max")
        done = {t.run_id for t in best}
        return best + [t for t in self.trials if t.run_id not in done]


def scored(trials: Iterable[Trial]) -> list[Trial]:
    """The trials with an objective that did not fail (in the order given)."""
    return [t for t in trials if t.objective is not None and t.state != "FAILED"]


def parse_value(text: str | None) -> Any:
    """An MLflow param string back to a Python value (int, float, bool, None, list or str)."""
    if text is None:
        return None
    if text in ("None", "null"):
        return None
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.startswith("[") and text.endswith("]"):
        try:
            return json.loads(text.replace("'", '"'))
        except ValueError:
            return text
    return text


def _first(v: Any) -> Any:
    """A space's metric / mode: a two-objective space lists two (the first is `objective`)."""
    return v[0] if isinstance(v, list) and v else v


def resolve_uri(uri: str | None) -> str:
    from lora_diffusion.tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri)


def _check_store(uri: str) -> None:
    """The store exists (a report never creates one) and answers within seconds, as train and tune check it."""
    from lora_diffusion.tracking import TrackingError, check_tracking_uri, redact_uri

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.exists():
            raise ReportError(f"tracking URI {redact_uri(uri)}: no MLflow store at {str(path)!r}; "
                              "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the sweep's store")
    try:
        check_tracking_uri(uri)
    except TrackingError as e:
        raise ReportError(str(e)) from None


def _all_runs(client, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _space_from_parent(client, parents: list[Any]) -> dict | None:
    """The search space the sweep logged on its parent run: the tuner logs the space file as
    `space/<file>.yaml` (beside `space/base_config.yaml`); a bare `space.yaml` also counts."""
    import os

    import yaml

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bar in a CLI's output
    for parent in parents:
        run_id = parent.info.run_id
        try:
            paths = [a.path for a in client.list_artifacts(run_id, "space")] + ["space.yaml"]
        except Exception:  # noqa: BLE001 - an artifact store we cannot list: no space
            continue
        for path in paths:
            name = path.rsplit("/", 1)[-1]
            if not name.endswith((".yaml", ".yml")) or name == "base_config.yaml":
                continue
            try:
                space = yaml.safe_load(Path(client.download_artifacts(run_id, path)).read_text())
            except Exception:  # noqa: BLE001 - missing or unreadable: try the next
                continue
            if isinstance(space, dict) and isinstance(space.get("params"), dict):
                return space
    return None


def _parent_value(parents: list[Any], *names: str) -> str | None:
    """The first of `names` found among the sweep runs' params or tags."""
    for parent in parents:
        for name in names:
            for source in (parent.data.params, parent.data.tags):
                if source.get(name):
                    return source[name]
    return None


def _searched_from_parent(parents: list[Any], space: dict | None) -> tuple[list[str], str] | None:
    """Keys the sweep searched: the space's `params` (keyed by flat config keys), else the sweep
    run's `sweep.params` (or `searched_params`) param or tag (a list or comma-separated)."""
    if space is not None and space.get("params"):
        return [str(k) for k in space["params"]], "the sweep's space file"
    raw = _parent_value(parents, "sweep.params", "searched_params")
    if raw:
        keys = parse_value(raw)
        keys = keys if isinstance(keys, list) else [k.strip() for k in str(raw).split(",")]
        return [str(k) for k in keys if str(k)], "the sweep run's sweep.params"
    return None


def _log_keys(space: dict | None) -> set[str]:
    params = (space or {}).get("params")
    if not isinstance(params, dict):
        return set()
    return {k for k, p in params.items() if isinstance(p, dict) and (p.get("type") == "log_float" or p.get("log"))}


def metric_mode(metric: str) -> str:
    """The natural direction of a metric name (from the tuner's metric table when it knows it)."""
    try:
        from lora_diffusion.search_space import KNOWN_METRICS
    except ImportError:  # pragma: no cover - the tuner's module is part of the package
        KNOWN_METRICS = {}
    if metric in KNOWN_METRICS:
        return KNOWN_METRICS[metric]
    return "min" if "loss" in metric or "perplexity" in metric else "max"


def varying_keys(trials: list[Trial]) -> list[str]:
    """Flat config keys whose value differs between trials (bookkeeping keys left out)."""
    keys = sorted({k for t in trials for k in t.params})
    out = []
    for k in keys:
        if k.startswith(BOOKKEEPING):
            continue
        values = {json.dumps(t.params.get(k), sort_keys=True, default=str) for t in trials if k in t.params}
        if len(values) > 1:
            out.append(k)
    return out


def load_sweep(experiment: str, tracking_uri: str | None = None, metric: str | None = None,
               mode: str | None = None) -> Sweep:
    """Read an experiment's sweep parent(s) and trial runs from MLflow."""
    from lora_diffusion.tracking import client as mlflow_client, redact_uri

    uri = resolve_uri(tracking_uri)
    _check_store(uri)
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise ReportError(f"experiment {experiment!r} not found in {redact_uri(uri)}; "
                          f"experiments there: {', '.join(names) or '(none)'}")
    runs = _all_runs(client, exp.experiment_id)
    parents = [r for r in runs if r.data.tags.get("run_type") == "sweep"]
    trial_runs = [r for r in runs if r.data.tags.get("run_type") in ("trial", "train")
                  or (r.data.tags.get("run_type") is None and "mlflow.parentRunId" in r.data.tags)]
    if not trial_runs:
        raise ReportError(f"experiment {experiment!r} in {redact_uri(uri)} has no trial runs "
                          f"({len(runs)} run(s), none tagged run_type=trial or train)")

    trials = []
    for r in sorted(trial_runs, key=lambda r: r.info.start_time or 0):
        tags = r.data.tags
        params = {k: parse_value(v) for k, v in r.data.params.items()}
        trials.append(Trial(
            run_id=r.info.run_id,
            name=r.info.run_name or tags.get("ray_trial_id") or r.info.run_id[:8],
            state=tags.get("trial_state") or r.info.status,
            method=tags.get("method") or str(params.get("method.name", "?")),
            task=tags.get("task") or str(params.get("task.name", "?")),
            params=params,
            metrics=dict(r.data.metrics),
            error=tags.get("error"),
            start_ms=r.info.start_time,
            end_ms=r.info.end_time,
        ))

    notes = []
    if len(parents) > 1:
        notes.append(f"{len(parents)} sweep runs in this experiment; the report covers the trials of all of them.")
    space = _space_from_parent(client, parents)
    # the tuner logs the resolved metric and mode as params of the sweep run
    space_metric = _parent_value(parents, "sweep.metric", "metric") or _first((space or {}).get("metric"))
    space_mode = _parent_value(parents, "sweep.mode", "mode") or _first((space or {}).get("mode"))
    has_objective = any(t.objective is not None for t in trials)
    if metric is not None and metric != OBJECTIVE:
        # compare on another logged metric: copy it into `objective` for every trial
        if not any(metric in t.metrics for t in trials):
            names = sorted({k for t in trials for k in t.metrics})
            raise ReportError(f"--metric {metric!r}: no trial logged it; metrics logged: {', '.join(names)}")
        for t in trials:
            if metric in t.metrics:
                t.metrics[OBJECTIVE] = t.metrics[metric]
            else:
                t.metrics.pop(OBJECTIVE, None)
        space_metric, space_mode = metric, None
    elif not has_objective:
        names = sorted({k for t in trials for k in t.metrics})
        raise ReportError(f"no trial of {experiment!r} logged the metric {OBJECTIVE!r}; pass --metric NAME "
                          f"to compare on one of: {', '.join(names) or '(no metrics logged)'}")
    metric_name = space_metric or OBJECTIVE
    if mode is None and space_mode is None and metric_name == OBJECTIVE:
        notes.append(f"The sweep did not record its metric or mode: assuming higher {OBJECTIVE} is better "
                     "(pass --mode min if lower is).")
    mode = mode or space_mode or metric_mode(metric_name)
    if mode not in ("min", "max"):
        raise ReportError(f"mode: got {mode!r}; allowed: min, max")

    found = _searched_from_parent(parents, space)
    if found is not None:
        searched, source = found
        searched = [k for k in searched if any(k in t.params for t in trials)]
    else:
        searched, source = varying_keys(trials), "the config keys that differ between trials"
    return Sweep(experiment=experiment, experiment_id=exp.experiment_id, tracking_uri=uri, shown_uri=redact_uri(uri),
                 metric=metric_name, mode=mode, parents=parents, trials=trials, searched=searched,
                 searched_source=source, log_keys=_log_keys(space), notes=notes,
                 objectives=_objectives(_parent_value(parents, "sweep.objectives")) if metric is None else [])


def _objectives(raw: str | None) -> list[tuple[str, str]]:
    """`sweep.objectives` ("eval_accuracy:max, trainable_params:min") as pairs; only a two-objective sweep's."""
    pairs = [tuple(x.strip().rsplit(":", 1)) for x in (raw or "").split(",") if ":" in x]
    return [(m, d) for m, d in pairs if d in ("min", "max")] if len(pairs) > 1 else []


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from lora_diffusion.tracking import client as mlflow_client

    hist = mlflow_client(resolve_uri(tracking_uri)).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist if math.isfinite(m.value))
