"""The sections of the report page, one function each: it takes the `Sweep` and returns a `Section` (a
title, an intro and its parts: plotly figures, HTML tables, `Note`s), or None where the section does not
apply to this experiment. Below in this file's order; `page.build_report` puts them in page order.

best_table            the best trials, ranked by the objective, and the failed ones with their errors
pareto_section        a two-objective sweep: its Pareto front (only when the sweep logged `sweep.objectives`)
parallel_coordinates  the searched parameters against the objective, one plot per method
efficiency_frontier   the objective against trainable parameters per method
learning_curves       training and validation loss of the top trials
importances           Optuna's fANOVA on an in-memory study built from the trials
phase_losses          lora_diffusion trials: the loss per diffusion phase
seed_study            a seed study (`python -m lora_diffusion.compare`): its table, the page's headline
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lora_diffusion.config import PHASE_METRICS
from lora_diffusion.report.sweep_data import Sweep, Trial, metric_history, scored
from lora_diffusion.tracking import OBJECTIVE

MIN_IMPORTANCE_TRIALS = 3  # fANOVA needs a few trials with different values to say anything


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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    groups = _groups(scored(sweep.trials))
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

    trials = [t for t in scored(sweep.trials) if t.trainable]
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

    best = scored(sweep.ranked())[:top]
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
    for method, trials in _groups(scored(sweep.trials)).items():
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

    lora = [t for t in scored(sweep.ranked()) if t.method == "lora_diffusion"]
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
