"""Experiment report: one self-contained HTML page comparing the trials of an MLflow experiment.

    python -m lora_diffusion.report --experiment NAME [--tracking-uri URI] --out report.html

Reads MLflow alone (a sweep's parent run `run_type=sweep` and its trial runs, named as in the
project's naming contract) and writes a page with: the best trials table; parallel coordinates of
the searched parameters against the objective; the objective against trainable parameters per
method (efficiency frontier); learning curves of the top trials; parameter importances (Optuna's
fANOVA on an in-memory study built from the trials); and, for lora_diffusion trials, the
loss per diffusion phase. For a seed study (`python -m lora_diffusion.compare`) the page opens with its
table (mean ± std, 95 % intervals, paired tests against the baseline). Plots are plotly with plotly.js
inlined: the page fetches nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lora_diffusion.config import PHASE_METRICS
from lora_diffusion.tracking import OBJECTIVE

MIN_IMPORTANCE_TRIALS = 3  # fANOVA needs a few trials with different values to say anything
# config keys that can differ between trials without being searched
BOOKKEEPING = ("tracking.", "train.output_dir", "task.data_dir", "model.base_path")


class ReportError(RuntimeError):
    """The report cannot be made; the message names the experiment / store and what to do."""


# --------------------------------------------------------------------------- reading MLflow


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
        scored = _scored(self.trials)
        scored.sort(key=lambda t: t.objective, reverse=self.mode == "max")
        done = {t.run_id for t in scored}
        return scored + [t for t in self.trials if t.run_id not in done]


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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


# --------------------------------------------------------------------------- the sections


@dataclass
class Section:
    anchor: str
    title: str
    intro: str
    parts: list[Any]  # plotly figures, HTML strings (tables), or Note


@dataclass
class Note:
    text: str


def _groups(trials: Iterable[Trial]) -> dict[str, list[Trial]]:
    out: dict[str, list[Trial]] = {}
    for t in trials:
        out.setdefault(t.method, []).append(t)
    return out


def _short(key: str) -> str:
    """`method.lora_diffusion.rank_early` -> `rank_early`; `train.lr` -> `lr`; `method.name` -> `method`."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _varies(trials: list[Trial], key: str) -> bool:
    return len({json.dumps(t.params.get(key), sort_keys=True, default=str) for t in trials}) > 1


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)  # MLflow stores every metric as a float: parameter counts, steps
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def _headline_eval(key: str) -> bool:
    """The final-evaluation metrics worth a column (the tuner's table of them), not counts or per-t splits."""
    try:
        from lora_diffusion.search_space import EVAL_METRICS
    except ImportError:  # pragma: no cover - the tuner's module is part of the package
        EVAL_METRICS = {}
    if EVAL_METRICS:
        return key in EVAL_METRICS
    return key.startswith("eval_") and not key.endswith(("_count", "_examples")) and "_t" not in key[5:]


def best_table(sweep: Sweep, top: int) -> Section:
    ranked = sweep.ranked()
    shown = ranked[:top]
    evals = sorted({k for t in shown for k in t.metrics if _headline_eval(k)})
    keys = [k for k in sweep.searched if k != "method.name" and any(k in t.params for t in shown)]
    head = (["#", "trial", "state", "method", "task", f"objective ({sweep.metric}, {sweep.mode})",
             "trainable params"] + evals + [_short(k) for k in keys] + ["minutes", "run id"])
    rows = []
    for i, t in enumerate(shown, 1):
        minutes = (t.end_ms - t.start_ms) / 60000 if t.end_ms and t.start_ms else None
        cells = ([i, t.name, t.state, t.method, t.task, t.objective, t.trainable]
                 + [t.metrics.get(k) for k in evals] + [t.params.get(k) for k in keys] + [minutes, t.run_id])
        cls = ' class="best"' if i == 1 and t.objective is not None else ""
        rows.append(f"<tr{cls}>" + "".join(
            f'<td class="{"state-" + html.escape(str(c).lower()) if j == 2 else ""}">{html.escape(_fmt(c))}</td>'
            for j, c in enumerate(cells)) + "</tr>")
    titles = ["", "", "", "", "", "", ""] + evals + keys + ["", ""]
    thead = "".join(f'<th title="{html.escape(ti)}">{html.escape(h)}</th>' for h, ti in zip(head, titles))
    table = f'<table class="trials" id="best-trials"><thead><tr>{thead}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    parts: list[Any] = [table]
    if len(ranked) > top:
        parts.append(Note(f"{len(ranked) - top} more trial(s) not shown (--top-table)."))
    failed = [t for t in sweep.trials if t.state == "FAILED"]
    if failed:
        frows = "".join(f"<tr><td>{html.escape(t.name)}</td><td>{html.escape(t.method)}</td>"
                        f"<td><code>{html.escape((t.error or '(no error tag)')[:400])}</code></td></tr>" for t in failed)
        parts.append(f'<h3>Failed trials</h3><table class="trials" id="failed-trials"><thead><tr><th>trial</th>'
                     f'<th>method</th><th>error</th></tr></thead><tbody>{frows}</tbody></table>')
    counts = {}
    for t in sweep.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    intro = (f"{len(sweep.trials)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
             + f". Ranked by <code>{OBJECTIVE}</code> (= {html.escape(sweep.metric)}, {sweep.mode}imised); "
             "trials stopped early by the scheduler (PRUNED) are ranked on their last report, failed ones come last.")
    return Section("best", "Best trials", intro, parts)


def _scored(trials: Iterable[Trial]) -> list[Trial]:
    return [t for t in trials if t.objective is not None and t.state != "FAILED"]


def _log_scale(sweep: Sweep, key: str, lo: float, hi: float) -> bool:
    """Log scale for params the space searched on one; without a space, for positive ranges over 100x."""
    if lo <= 0:
        return False
    if sweep.searched_source == "the sweep's space file":
        return key in sweep.log_keys
    return hi / lo >= 100


def _dimension(sweep: Sweep, key: str, values: list[Any]) -> dict | None:
    present = [v for v in values if v is not None]
    if len(present) != len(values) or not present:
        return None
    if all(_is_number(v) for v in present):
        lo, hi = min(present), max(present)
        log = _log_scale(sweep, key, lo, hi)
        vals = [math.log10(v) for v in present] if log else present
        dim = {"label": _short(key) + (" (log10)" if log else ""), "values": vals}
        if lo == hi:
            dim["range"] = [vals[0] - 1, vals[0] + 1]
        return dim
    cats = sorted({json.dumps(v, default=str) for v in present})
    codes = [cats.index(json.dumps(v, default=str)) for v in present]
    return {"label": _short(key), "values": codes, "tickvals": list(range(len(cats))),
            "ticktext": [c.strip('"') for c in cats], "range": [-0.5, len(cats) - 0.5] if len(cats) == 1 else None}


def parallel_coordinates(sweep: Sweep) -> Section:
    import plotly.graph_objects as go

    parts: list[Any] = []
    groups = _groups(_scored(sweep.trials))
    for method, trials in groups.items():
        # axes: the searched parameters every trial of this method has and that differ between them
        keys = [k for k in sweep.searched if all(k in t.params for t in trials) and _varies(trials, k)]
        if len(trials) < 2 or not keys:
            parts.append(Note(f"{method}: {len(trials)} scored trial(s) and {len(keys)} searched parameter(s) "
                              "with different values; parallel coordinates need at least 2 trials and 1 parameter."))
            continue
        dims = []
        for k in keys:
            d = _dimension(sweep, k, [t.params.get(k) for t in trials])
            if d is not None:
                dims.append({kk: vv for kk, vv in d.items() if vv is not None})
        objective = [t.objective for t in trials]
        dims.append({"label": f"objective ({sweep.metric})", "values": objective})
        fig = go.Figure(go.Parcoords(
            line={"color": objective, "colorscale": "Viridis", "showscale": True,
                  "reversescale": sweep.mode == "min", "colorbar": {"title": {"text": sweep.metric}}},
            dimensions=dims,
            labelangle=-20,
        ))
        fig.update_layout(title=f"{method}: {len(trials)} trials", margin={"l": 60, "r": 60, "t": 90, "b": 30},
                          height=420)
        parts.append(fig)
    if not parts:
        parts.append(Note("No trial has an objective yet."))
    intro = (f"One line per trial, coloured by the objective; one plot per method. Axes: the searched "
             f"parameters (from {html.escape(sweep.searched_source)}) and the objective. Drag on an axis to filter.")
    return Section("parallel", "Searched parameters vs objective", intro, parts)


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """Points not beaten by one with fewer (or equal) parameters and a better objective."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if mode == "max" else p[1])):
        if best is None or (y > best if mode == "max" else y < best):
            front.append((x, y))
            best = y
    return front


def efficiency_frontier(sweep: Sweep) -> Section:
    import plotly.graph_objects as go

    trials = [t for t in _scored(sweep.trials) if t.trainable]
    intro = ("Objective against trainable parameters (log scale), one colour per method; the line links the "
             "trials that no trial with fewer parameters beats.")
    if not trials:
        return Section("frontier", "Efficiency frontier", intro,
                       [Note("No scored trial logged trainable_params.")])
    fig = go.Figure()
    for method, ts in _groups(trials).items():
        fig.add_trace(go.Scatter(
            x=[t.trainable for t in ts], y=[t.objective for t in ts], mode="markers", name=method,
            marker={"size": 10}, text=[t.name for t in ts],
            hovertemplate="%{text}<br>params %{x:,}<br>objective %{y:.4g}<extra>" + method + "</extra>"))
    front = pareto_front([(t.trainable, t.objective) for t in trials], sweep.mode)
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                             name="frontier", line={"dash": "dot", "color": "black", "shape": "hv"}))
    fig.update_layout(xaxis={"type": "log", "title": {"text": "trainable parameters"}},
                      yaxis={"title": {"text": f"objective ({sweep.metric})"}}, height=420,
                      margin={"t": 30})
    return Section("frontier", "Efficiency frontier", intro, [fig])


def nondominated(points: list[tuple[float, float]], modes: tuple[str, str]) -> list[int]:
    """Indices of the points no other point dominates (at least as good in both coordinates, better in one)."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    keys = [(sign[0] * x, sign[1] * y) for x, y in points]
    return [i for i, a in enumerate(keys)
            if not any(b[0] >= a[0] and b[1] >= a[1] and b != a for j, b in enumerate(keys) if j != i)]


def pareto_section(sweep: Sweep) -> Section | None:
    """A two-objective sweep: the second objective (x) against the first (y), one colour per method, the
    Pareto front of the finished trials drawn as a line and ringed (the front best.json lists)."""
    if len(sweep.objectives) != 2:
        return None
    import plotly.graph_objects as go

    (m1, d1), (m2, d2) = sweep.objectives
    intro = (f"The sweep's two objectives: {html.escape(m1)} ({d1}imised, y) against {html.escape(m2)} ({d2}imised, x). "
             "The line joins the Pareto front: the finished trials no other finished trial beats in both. "
             "Trials stopped early by ASHA have no final values and are not drawn.")
    trials = [t for t in sweep.trials if t.state == "FINISHED" and _is_number(t.objective) and _is_number(t.metrics.get(m2))]
    if not trials:
        return Section("pareto", "Pareto front", intro, [Note(f"No finished trial logged both {m1} and {m2}.")])
    fig = go.Figure()
    for method, ts in _groups(trials).items():
        fig.add_trace(go.Scatter(
            x=[t.metrics[m2] for t in ts], y=[t.objective for t in ts], mode="markers", name=method,
            marker={"size": 10}, text=[t.name for t in ts],
            hovertemplate="%{text}<br>" + m2 + " %{x:,}<br>" + m1 + " %{y:.4g}<extra>" + method + "</extra>"))
    idx = nondominated([(t.objective, t.metrics[m2]) for t in trials], (d1, d2))
    front = sorted((trials[i] for i in idx), key=lambda t: t.metrics[m2])
    fig.add_trace(go.Scatter(
        x=[t.metrics[m2] for t in front], y=[t.objective for t in front], mode="lines+markers", name="Pareto front",
        text=[t.name for t in front], line={"dash": "dot", "color": "black"},
        marker={"size": 16, "symbol": "circle-open", "color": "black", "line": {"width": 2}},
        hovertemplate="%{text} (Pareto front)<extra></extra>"))
    logx = m2 in ("trainable_params", "total_params") and min(t.metrics[m2] for t in trials) > 0
    fig.update_layout(xaxis={"type": "log" if logx else "linear", "title": {"text": f"{m2} ({d2})"}},
                      yaxis={"title": {"text": f"{m1} ({d1})"}}, height=420, margin={"t": 30})
    names = ", ".join(f"{t.name} ({m1} {_fmt(t.objective)}, {m2} {_fmt(t.metrics[m2])})" for t in front)
    return Section("pareto", "Pareto front", intro, [fig, Note(f"On the front: {names}.")])


def learning_curves(sweep: Sweep, top: int) -> Section:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    best = _scored(sweep.ranked())[:top]
    intro = f"Training loss and validation loss against the step for the {top} best trials."
    if not best:
        return Section("curves", "Learning curves", intro, [Note("No trial has an objective yet.")])
    curves = {t.run_id: {k: metric_history(sweep.tracking_uri, t.run_id, k) for k in ("loss", "val_loss")}
              for t in best}
    has_val = any(c["val_loss"] for c in curves.values())
    fig = make_subplots(rows=1, cols=2 if has_val else 1,
                        subplot_titles=["training loss", "validation loss"] if has_val else ["training loss"])
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    for i, t in enumerate(best):
        color = palette[i % len(palette)]
        for col, key in enumerate(("loss", "val_loss") if has_val else ("loss",), 1):
            pts = curves[t.run_id][key]
            if pts:
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                         name=f"{t.name} ({t.method})", legendgroup=t.run_id,
                                         showlegend=col == 1, line={"color": color}), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=420, margin={"t": 40})
    return Section("curves", "Learning curves", intro, [fig])


def _distributions(sweep: Sweep, trials: list[Trial], keys: list[str]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for k in keys:
        values = [t.params.get(k) for t in trials]
        if any(v is None for v in values):
            continue
        if len({json.dumps(v, default=str) for v in values}) < 2:
            continue  # constant here: no importance to measure
        if all(_is_number(v) for v in values):
            lo, hi = min(values), max(values)
            if all(isinstance(v, int) for v in values):
                dists[k] = IntDistribution(int(lo), int(hi))
            else:
                dists[k] = FloatDistribution(float(lo), float(hi), log=_log_scale(sweep, k, lo, hi))
        elif all(isinstance(v, (str, bool, int, float)) for v in values):
            dists[k] = CategoricalDistribution(sorted(set(values), key=str))
    return dists


def importances(sweep: Sweep, seed: int = 0) -> Section:
    import optuna
    import plotly.graph_objects as go
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    parts: list[Any] = []
    for method, trials in _groups(_scored(sweep.trials)).items():
        dists = _distributions(sweep, trials, sweep.searched)
        if len(trials) < MIN_IMPORTANCE_TRIALS or not dists:
            parts.append(Note(f"{method}: not enough to estimate importances — {len(trials)} scored trial(s) "
                              f"(at least {MIN_IMPORTANCE_TRIALS} needed) and {len(dists)} searched parameter(s) "
                              "with different values."))
            continue
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if sweep.mode == "max" else "minimize")
        for t in trials:
            study.add_trial(optuna.trial.create_trial(
                params={k: t.params[k] for k in dists}, distributions=dists, value=t.objective))
        try:
            imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), normalize=True)
        except (RuntimeError, ValueError) as e:
            parts.append(Note(f"{method}: fANOVA could not estimate importances ({e})."))
            continue
        names = list(imp)[::-1]
        fig = go.Figure(go.Bar(x=[imp[n] for n in names], y=[_short(n) for n in names], orientation="h",
                               hovertext=names, marker={"color": "#4c72b0"}))
        fig.update_layout(title=f"{method}: {len(trials)} trials", height=max(220, 60 + 32 * len(names)),
                          xaxis={"title": {"text": "importance (fANOVA, normalised)"}, "range": [0, 1]},
                          margin={"l": 140, "t": 50})
        parts.append(fig)
    if not parts:
        parts.append(Note("No trial has an objective yet."))
    intro = ("Share of the objective's variance explained by each searched parameter (Optuna's fANOVA "
             "evaluator on an in-memory study rebuilt from the trials' params and objectives).")
    return Section("importance", "Parameter importances", intro, parts)


def phase_losses(sweep: Sweep, top: int) -> Section | None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    lora = [t for t in _scored(sweep.ranked()) if t.method == "lora_diffusion"]
    if not lora:
        return None
    intro = ("Masked cross-entropy per diffusion phase (early t > b2, mid b1 < t &le; b2, late t &le; b1): "
             "the last reported value of the best lora_diffusion trials, and the curves of the best one.")
    shown = [t for t in lora[:top] if any(p in t.metrics for p in PHASE_METRICS)]
    if not shown:
        return Section("phases", "Loss per phase (lora_diffusion)", intro,
                       [Note(f"No lora_diffusion trial logged {' / '.join(PHASE_METRICS)}.")])
    fig = make_subplots(rows=1, cols=2, subplot_titles=["last value, best trials", f"{shown[0].name} over steps"])
    colors = dict(zip(PHASE_METRICS, ("#d62728", "#ff7f0e", "#2ca02c")))  # early red, mid orange, late green
    for p in PHASE_METRICS:
        fig.add_trace(go.Bar(x=[t.name for t in shown], y=[t.metrics.get(p) for t in shown], name=p,
                             legendgroup=p, marker={"color": colors[p]}), row=1, col=1)
        pts = metric_history(sweep.tracking_uri, shown[0].run_id, p)
        fig.add_trace(go.Scatter(x=[q[0] for q in pts], y=[q[1] for q in pts], mode="lines+markers", name=p,
                                 legendgroup=p, showlegend=False, line={"color": colors[p]}), row=1, col=2)
    fig.update_layout(barmode="group", height=420, margin={"t": 40})
    fig.update_xaxes(title_text="step", row=1, col=2)
    fig.update_yaxes(title_text="masked cross-entropy", row=1, col=1)
    return Section("phases", "Loss per phase (lora_diffusion)", intro, [fig])


def seed_study(sweep: Sweep) -> Section | None:
    """The table of a seed study (`python -m lora_diffusion.compare`), read from its parent run's
    seed_study.json; None when the experiment is not a seed study."""
    import os
    import tempfile

    from lora_diffusion.tracking import client as mlflow_client

    parents = [p for p in sweep.parents if p.data.tags.get("study") == "seed_study"]
    if not parents:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    title = "Seed study"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow_client(sweep.tracking_uri).download_artifacts(parents[0].info.run_id, "seed_study.json", tmp)
            result = json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - a study still running has no result yet
        return Section("seed-study", title, "", [Note("The study has no seed_study.json yet (still running or failed).")])
    from lora_diffusion.stats import format_p

    base = result["baseline"]
    head = ["method", "seeds", f"{result['metric']} mean ± std", "95 % CI", f"Δ vs {base}", "t-test p (seeds)",
            "bootstrap Δ [95 %] (examples)", "bootstrap p", "trainable params", "per seed"]
    rows, reasons = [], []

    def missing(reason: str | None) -> str:  # an undefined test: a numbered note under the table says why
        if not reason:
            return "–"
        reasons.append(reason)
        return f"– [{len(reasons)}]"

    for r in result["methods"]:
        t, b = r.get("t_test") or {}, r.get("bootstrap") or {}
        ci = "–" if r["ci95"][0] is None else f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        delta = "(baseline)" if r["method"] == base else ("–" if t.get("mean_diff") is None else f"{t['mean_diff']:+.2f}")
        p_t = format_p(t["p"]) if t.get("p") is not None else missing(t.get("reason"))
        boot = missing(b.get("reason")) if b.get("diff") is None else f"{b['diff']:+.2f} [{b['lo']:+.2f}, {b['hi']:+.2f}]"
        cells = [r["method"], r["n"], "–" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}", ci, delta, p_t, boot,
                 format_p(b["p"]) if b.get("p") is not None else "–", r.get("trainable_params"),
                 ", ".join(f"{s}: {v:.2f}" for s, v in r["values"].items())]
        cls = ' class="best"' if r["method"] == base else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_fmt(c) if not isinstance(c, str) else c)}</td>" for c in cells)
                    + "</tr>")
    thead = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    table = f'<table class="trials" id="seed-study"><thead><tr>{thead}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    intro = (f"The best config of each method rerun on seeds {html.escape(', '.join(map(str, result['seeds'])))} "
             f"(same budget, same data order per seed). Δ = method − {html.escape(base)}; paired t-test over the seeds "
             "both finished; paired bootstrap over validation examples (per-example scores averaged over those seeds).")
    notes = [Note(f"[{i}] {reason}") for i, reason in enumerate(reasons, 1)]
    return Section("seed-study", title, intro, [table, *notes])


# --------------------------------------------------------------------------- the page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:18px 32px}
header h1{margin:0 0 6px;font-size:22px} header p{margin:2px 0;font-size:13px;color:#cfd8dc}
nav{padding:8px 32px;background:#eceff1;font-size:14px} nav a{margin-right:16px;color:#263238}
main{padding:8px 32px 40px} section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:18px 0;padding:8px 18px 14px}
h2{font-size:18px;margin:10px 0 4px} h3{font-size:15px} .intro{font-size:13px;color:#555;margin:0 0 10px}
table.trials{border-collapse:collapse;font-size:12px;width:100%;overflow-x:auto;display:block}
table.trials th,table.trials td{border-bottom:1px solid #eee;padding:4px 8px;text-align:right;white-space:nowrap}
table.trials th{background:#f5f5f5;position:sticky;top:0} table.trials td:nth-child(2){text-align:left}
tr.best td{background:#e8f5e9;font-weight:600} td.state-failed{color:#c62828} td.state-pruned{color:#8d6e63}
p.note{background:#fff8e1;border-left:4px solid #ffb300;padding:8px 12px;font-size:13px}
code{font-size:12px} .plot{min-height:200px}
"""


def _figure_html(fig, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def render(sweep: Sweep, sections: list[Section]) -> str:
    """The whole page, plotly.js inlined once."""
    from plotly.offline import get_plotlyjs

    body, n = [], 0
    for s in sections:
        chunks = [f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2><p class="intro">{s.intro}</p>']
        for part in s.parts:
            if isinstance(part, Note):
                chunks.append(f'<p class="note">{html.escape(part.text)}</p>')
            elif isinstance(part, str):
                chunks.append(part)
            else:
                n += 1
                chunks.append(f'<div class="plot" data-section="{s.anchor}">{_figure_html(part, f"plot-{n}")}</div>')
        chunks.append("</section>")
        body.append("".join(chunks))
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    parents = ", ".join(p.info.run_id for p in sweep.parents) or "(no sweep run)"
    notes = "".join(f'<p class="note">{html.escape(t)}</p>' for t in sweep.notes)
    generated = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(sweep.experiment)} — lora-diffusion report</title>
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<header><h1>Experiment {html.escape(sweep.experiment)}</h1>
<p>MLflow store <code>{html.escape(sweep.shown_uri)}</code> · experiment id {html.escape(sweep.experiment_id)} ·
sweep run {html.escape(parents)} · objective: {html.escape(sweep.metric)} ({sweep.mode}) · generated {generated}</p>
<p>Open the runs in the MLflow UI: <code>mlflow ui --backend-store-uri {html.escape(sweep.shown_uri)} --host 127.0.0.1</code>
then <code>http://127.0.0.1:5000/#/experiments/{html.escape(sweep.experiment_id)}/runs</code></p></header>
<nav>{nav}</nav>
<main>{notes}{"".join(body)}</main>
</body></html>
"""


def build_report(experiment: str, tracking_uri: str | None = None, metric: str | None = None,
                 mode: str | None = None, top: int = 5, top_table: int = 25) -> tuple[str, Sweep]:
    """The report page for an MLflow experiment, and the sweep it was read from."""
    sweep = load_sweep(experiment, tracking_uri, metric, mode)
    sections = [best_table(sweep, top_table), parallel_coordinates(sweep), efficiency_frontier(sweep),
                learning_curves(sweep, top), importances(sweep)]
    pareto = pareto_section(sweep)
    if pareto is not None:
        sections.insert(1, pareto)
    phases = phase_losses(sweep, top)
    if phases is not None:
        sections.append(phases)
    study = seed_study(sweep)
    if study is not None:  # a seed study: its table is the headline
        sections.insert(0, study)
    return render(sweep, sections), sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_diffusion.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name (the sweep name)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    ap.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    ap.add_argument("--metric", default=None,
                    help=f"compare on this logged metric instead of {OBJECTIVE!r} (e.g. eval_accuracy)")
    ap.add_argument("--mode", choices=("min", "max"), default=None,
                    help="whether lower or higher is better (default: the sweep's mode, else min for losses)")
    ap.add_argument("--top", type=int, default=5, help="trials in the learning-curve and phase plots (default 5)")
    ap.add_argument("--top-table", type=int, default=25, help="rows of the best trials table (default 25)")
    args = ap.parse_args(argv)
    for name in ("top", "top_table"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; must be >= 1")
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"--out: folder {str(out.parent)!r} does not exist")
    try:
        page, sweep = build_report(args.experiment, args.tracking_uri, args.metric, args.mode, args.top,
                                   args.top_table)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB): {len(sweep.trials)} trials of {args.experiment!r}, "
          f"objective {sweep.metric} ({sweep.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
