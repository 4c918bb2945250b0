"""Seed studies: the best config of each method, rerun on N seeds as Ray Tune trials, with paired tests.

    python -m lora_diffusion.compare --sweep compare_methods --seeds 5            # best of each method of a sweep
    python -m lora_diffusion.compare --sweep quick --sweep tune_results/weight_lora_sst2/best.json --seeds 0,1,2
    python -m lora_diffusion.compare --configs study.yaml --data-dir /path/to/data train.max_steps=200
    python -m lora_diffusion.compare ... --dry-run                               # the trials it would run; no Ray

What happens, top to bottom (`main`):
1. Candidates: from each `--sweep` (a sweep name under --storage-path, its experiment folder, its best.json,
   or the MLflow experiment of that name) the best FINISHED trial of each method (by the sweep's metric and
   mode): the sweep's base config plus that trial's params. Or from `--configs FILE.yaml` (see
   `StudyFile`): one entry per method, a config file and/or overrides. One config per method.
2. key=value overrides apply to every candidate; then one budget is checked: train.max_steps, batch size,
   accumulation, workers, base, task data and evaluation settings must be equal for all methods (else
   exit 2 naming the key and each method's value).
3. Trials: each (method, seed) is the method's config with train.seed = seed (the data order, the
   initial adapter, the noise and dropout all follow train.seed; task.seed, i.e. which subset, stays, so
   every trial is evaluated on the same validation examples). They run as Ray Tune trials (one Tune
   experiment `<storage>/<study>`; rerunning the same command resumes it), each a child run of one
   MLflow parent run (`run_type=sweep`, `study=seed_study`) in the MLflow experiment `<study>`.
4. Statistics (lora_diffusion/stats.py) on the study metric, against the baseline (default
   lora_diffusion): mean ± std and a 95 % t-interval over seeds per method; a paired t-test over seeds
   (seed i of a method against seed i of the baseline); a paired bootstrap over validation examples on
   per-example scores (from each trial's eval/predictions.jsonl, averaged over the seeds both ran), for
   metrics that are means over examples (accuracy, rank_accuracy, exact match, F1, ROUGE; not corpus BLEU, not the
   token-level denoising accuracy: then the bootstrap says why it is missing).
5. Out: `<storage>/<study>/seed_study.json` and `seed_study.md` (also printed), the same as artifacts of
   the MLflow parent run (with `<method>_mean` / `_std` metrics), and a "Seed study" section in
   `python -m lora_diffusion.report --experiment <study>`.

Exit codes: 0 done; 2 bad input (nothing started); 1 when trials failed (the table shows what finished).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lora_diffusion.config import (Config, ConfigError, check_method_name, config_from_dict, format_validation_error, load_config,
                                   parse_override, set_dotted)

BASELINE = "lora_diffusion"
DEFAULT_SEEDS = 3
STUDY_FILE = "study.json"  # in the study's Tune folder: what it was started with (checked on a rerun)
RESULT_JSON, RESULT_MD = "seed_study.json", "seed_study.md"
PREDICTIONS = "eval/predictions.jsonl"
# What every method of a study must share (the budget and the evaluation); a prefix ends with "."
SAME_BUDGET = ("train.max_steps", "train.batch_size", "train.grad_accum", "train.num_workers", "model.base",
               "model.max_length", "task.", "sampling.", "diffusion.T", "train.eval_at_end")


class StudyError(RuntimeError):
    """The study cannot start; the message names the input (file, key, value) and what is allowed."""


# --------------------------------------------------------------------------- the study file (--configs)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MethodEntry(_Spec):
    # The method (one entry per method); it is also method.name of the entry's config.
    method: str
    # A run config YAML (relative to the study file) to start from; default: the study's base.
    config: str | None = None
    # Dotted config keys -> values, over the config (e.g. train.lr, method.weight_lora.r).
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_method_name(v)


class StudyFile(_Spec):
    name: str | None = None  # the study name (default: the file's stem)
    metric: str = "eval_accuracy"  # what the study compares (a metric every trial reports)
    mode: Literal["min", "max"] | None = None  # default: the metric's natural direction
    seeds: int | list[int] | None = None  # a count (0..N-1) or the seeds; --seeds replaces it
    baseline: str = BASELINE  # the method every other one is tested against
    base_config: str | None = None  # a run config YAML every entry starts from (relative to this file)
    overrides: dict[str, Any] = Field(default_factory=dict)  # over the base, for every entry
    methods: list[MethodEntry] = Field(min_length=1)


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    method: str
    config: Config
    source: str  # where the config came from, for the table and the MLflow params
    sweep_objective: float | None = None


@dataclass
class Study:
    name: str
    metric: str
    mode: str
    seeds: list[int]
    baseline: str
    candidates: list[Candidate]
    sources: list[str] = field(default_factory=list)

    def trial_configs(self) -> list[tuple[str, int, Config]]:
        """(method, seed, config) for every trial, methods in order, then seeds."""
        out = []
        for c in self.candidates:
            for s in self.seeds:
                data = c.config.to_dict()
                data["train"]["seed"] = s
                out.append((c.method, s, config_from_dict(data)))
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "seeds": self.seeds, "baseline": self.baseline,
                "configs": {c.method: c.config.to_dict() for c in self.candidates}}


def _metric_mode(metric: str) -> str:
    from lora_diffusion.report import metric_mode

    return metric_mode(metric)


def _apply(cfg_dict: dict[str, Any], overrides: dict[str, Any] | list[str], where: str) -> Config:
    data = json.loads(json.dumps(cfg_dict))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        set_dotted(data, str(key), value)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None


def locate_best_json(ref: str, storage: Path, tracking_uri: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(best.json, the sweep's base config dict, where) for a sweep name, folder, best.json or MLflow experiment."""
    p = Path(ref).expanduser()
    candidates = [p] if p.suffix == ".json" else [p / "best.json", storage / ref / "best.json"]
    for f in candidates:
        if f.is_file():
            best = json.loads(f.read_text())
            sweep_file = f.parent / "sweep.json"
            if sweep_file.is_file():
                return best, json.loads(sweep_file.read_text())["base"], str(f)
            base = _base_from_mlflow(best.get("parent_run_id"), tracking_uri)
            if base is None:
                raise StudyError(f"--sweep {ref}: {f} has no sweep.json beside it and its MLflow parent run "
                                 f"{best.get('parent_run_id')} has no space/base_config.yaml: the sweep's base config is unknown")
            return best, base, str(f)
    if p.suffix == ".json":
        raise StudyError(f"--sweep {ref}: file does not exist")
    return _best_from_mlflow(ref, tracking_uri, tried=[str(c) for c in candidates])


def _base_from_mlflow(run_id: str | None, uri: str) -> dict[str, Any] | None:
    if not run_id:
        return None
    from lora_diffusion.tracking import client

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client(uri).download_artifacts(run_id, "space/base_config.yaml", tmp)
            return yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 - missing artifact or store: the caller says what is missing
        return None


def _best_from_mlflow(name: str, uri: str, tried: list[str]) -> tuple[dict[str, Any], dict[str, Any], str]:
    from lora_diffusion.sweep.runs import find_parent_run
    from lora_diffusion.tracking import client, redact_uri

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    parent = find_parent_run(uri, exp.experiment_id, name) if exp is not None else None
    if parent is None:
        raise StudyError(f"--sweep {name}: no best.json at {', '.join(tried)} and no sweep {name!r} in the MLflow store "
                         f"{redact_uri(uri)}; give the sweep's name (with --storage-path / --tracking-uri), its folder "
                         "or its best.json")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            best = json.loads(Path(c.download_artifacts(parent.info.run_id, "best.json", tmp)).read_text())
    except Exception:  # noqa: BLE001
        raise StudyError(f"--sweep {name}: its MLflow parent run {parent.info.run_id} has no best.json "
                         "(the sweep did not finish); finish it with `python -m lora_diffusion.tune ... --resume`") from None
    base = _base_from_mlflow(parent.info.run_id, uri)
    if base is None:
        raise StudyError(f"--sweep {name}: its MLflow parent run {parent.info.run_id} has no space/base_config.yaml")
    return best, base, f"MLflow run {parent.info.run_id}"


def candidates_from_sweep(ref: str, storage: Path, tracking_uri: str) -> tuple[list[Candidate], str, str, str]:
    """The best FINISHED trial of each method of one sweep; (candidates, the sweep's metric, its mode, its name)."""
    from lora_diffusion.search_space import apply_sampled

    best, base, where = locate_best_json(ref, storage, tracking_uri)
    metric, mode = best.get("metric"), best.get("mode")
    if mode not in ("min", "max"):
        raise StudyError(f"--sweep {ref}: {where} has mode {mode!r}; expected min or max")
    by_method: dict[str, tuple[dict[str, Any], Config]] = {}
    for row in best.get("trials", []):
        obj = row.get("objective")
        if row.get("state") != "FINISHED" or not isinstance(obj, (int, float)) or not math.isfinite(obj):
            continue
        try:
            cfg = apply_sampled(base, row.get("params") or {})
        except ConfigError as e:
            raise StudyError(f"--sweep {ref}: trial {row.get('trial_id')} of {where}: {e}") from None
        held = by_method.get(cfg.method.name)
        if held is None or (obj > held[0]["objective"] if mode == "max" else obj < held[0]["objective"]):
            by_method[cfg.method.name] = (row, cfg)
    if not by_method:
        raise StudyError(f"--sweep {ref}: {where} has no FINISHED trial with a finite {metric}; nothing to rerun")
    name = best.get("sweep") or ref
    out = [Candidate(m, cfg, f"sweep {name}, trial {row['trial_id']} ({metric} = {row['objective']:.4g})",
                     float(row["objective"])) for m, (row, cfg) in by_method.items()]
    return out, metric, mode, name


def candidates_from_file(path: str, data_dir: str | None) -> tuple[list[Candidate], StudyFile]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise StudyError(f"--configs {path}: file does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise StudyError(f"--configs {path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"--configs {path}: the top level must be a mapping with `methods:`, got {type(raw).__name__}")
    try:
        spec = StudyFile.model_validate(raw)
    except ValidationError as e:
        raise StudyError(format_validation_error(e, StudyFile, where=str(path))) from None

    def load(rel: str | None, what: str) -> dict[str, Any]:
        if rel is None:
            return Config().to_dict()
        f = (p.parent / rel).expanduser()
        try:
            return load_config(f).to_dict()
        except ConfigError as e:
            raise StudyError(f"{path}: {what}: {e}") from None

    base = _apply(load(spec.base_config, "base_config"), spec.overrides, f"{path}: overrides")
    if data_dir:
        base = _apply(base.to_dict(), {"task.data_dir": data_dir}, "--data-dir")
    out = []
    for i, entry in enumerate(spec.methods):
        where = f"{path}: methods[{i}] ({entry.method})"
        start = base.to_dict() if entry.config is None else load(entry.config, f"methods[{i}].config")
        if entry.config is not None:  # the study-wide overrides still hold over an entry's own file
            start = _apply(start, spec.overrides, f"{path}: overrides").to_dict()
            if data_dir:
                start["task"]["data_dir"] = data_dir
        cfg = _apply(start, {**entry.overrides, "method.name": entry.method}, where)
        out.append(Candidate(entry.method, cfg, f"{p.name} methods[{i}]"))
    return out, spec


def check_one_per_method(cands: list[Candidate]) -> None:
    seen: dict[str, str] = {}
    for c in cands:
        if c.method in seen:
            raise StudyError(f"method {c.method!r} comes twice ({seen[c.method]}; {c.source}); a seed study compares "
                             "one config per method: give each method once")
        seen[c.method] = c.source


def check_same_budget(cands: list[Candidate]) -> None:
    """Every method trains and is evaluated the same way; else StudyError naming each key and value."""
    flats = {c.method: c.config.flat() for c in cands}
    keys = sorted({k for f in flats.values() for k in f
                   if any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAME_BUDGET)})
    diffs = []
    for k in keys:
        values = {m: f.get(k) for m, f in flats.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            diffs.append(f"{k}: " + ", ".join(f"{m} {v!r}" for m, v in values.items()))
    if diffs:
        raise StudyError("the methods do not share one budget and evaluation: " + "; ".join(diffs[:6])
                         + ("; ..." if len(diffs) > 6 else "")
                         + ". Set each on the command line (e.g. train.max_steps=200) so that every method gets the same")


def parse_seeds(text: str | None, default: int | list[int] | None) -> list[int]:
    raw: Any = default if text is None else text
    if raw is None:
        raw = DEFAULT_SEEDS
    if isinstance(raw, str):
        try:
            parts = [int(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise StudyError(f"--seeds: got {raw!r}; give a count (3) or a comma-separated list of integers (0,1,2)") from None
        raw = parts[0] if len(parts) == 1 and "," not in raw else parts
    if isinstance(raw, int):
        if raw < 1:
            raise StudyError(f"--seeds: got {raw}; the number of seeds must be >= 1")
        return list(range(raw))
    seeds = list(raw)
    if not seeds or len(set(seeds)) != len(seeds) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise StudyError(f"--seeds: got {seeds!r}; the seeds must be distinct integers >= 0")
    return seeds


# --------------------------------------------------------------------------- per-example scores


def per_example_scores(task_name: str, predictions: list[dict[str, Any]], metric: str,
                       run_value: float | None) -> tuple[dict[int, float] | None, str | None]:
    """{example index: score} for `metric` (eval_<task metric>) from a trial's predictions, or (None, why not).

    The score of one example is the task's metric on that example alone; a paired bootstrap over them is
    only meaningful when their mean is the metric (checked against the run's value)."""
    from lora_diffusion.tasks import get_task

    key = metric.removeprefix("eval_")
    if not metric.startswith("eval_"):
        return None, f"{metric} is not a final-evaluation metric (eval_*): no per-example scores"
    if not predictions:
        return None, "the trial wrote no predictions"
    task = get_task(task_name)
    scores: dict[int, float] = {}
    if key == "rank_accuracy":  # rank classification of label tasks: the rank_prediction of each example
        if not all("rank_prediction" in row for row in predictions):
            return None, "the predictions have no rank_prediction (not a label task)"
        scores = {int(r["index"]): 100.0 * (r["rank_prediction"] in r["references"]) for r in predictions}
        predictions = []
    for row in predictions:
        one = task.compute_metrics([row["prediction"]], [list(row["references"])])
        if key not in one:
            return None, f"{metric} is not computed from the generated predictions (the task's metrics: {', '.join(sorted(one))})"
        scores[int(row["index"])] = float(one[key])
    mean = sum(scores.values()) / len(scores)
    if run_value is not None and abs(mean - run_value) > 1e-6 * max(1.0, abs(run_value)):
        return None, (f"{metric} is not a mean over examples (per-example mean {mean:.4g}, the run's {run_value:.4g}): "
                      "no paired bootstrap")
    return scores, None


# --------------------------------------------------------------------------- analysis


def analyse(study: Study, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The study's statistics from its trials ({method, seed, state, value, scores, scores_reason, ...})."""
    from lora_diffusion import stats

    by = {(t["method"], t["seed"]): t for t in trials}
    done = lambda m, s: by.get((m, s), {}).get("value") is not None  # noqa: E731
    methods = []
    base_m = study.baseline
    for c in study.candidates:
        m = c.method
        values = {s: by[(m, s)]["value"] for s in study.seeds if done(m, s)}
        vals = list(values.values())
        mean, std = stats.mean_std(vals) if vals else (None, None)
        lo, hi = stats.ci95(vals) if vals else (float("nan"), float("nan"))
        params = next((by[(m, s)].get("trainable_params") for s in study.seeds if by.get((m, s), {}).get("trainable_params")), None)
        row: dict[str, Any] = {"method": m, "source": c.source, "n": len(vals), "values": {str(s): v for s, v in values.items()},
                               "mean": mean, "std": std, "ci95": [_nan_none(lo), _nan_none(hi)],
                               "trainable_params": params, "failed_seeds": [s for s in study.seeds if not done(m, s)]}
        if m != base_m and any(k[0] == base_m for k in by):
            paired = [s for s in study.seeds if done(m, s) and done(base_m, s)]
            t = stats.paired_t_test([by[(m, s)]["value"] for s in paired], [by[(base_m, s)]["value"] for s in paired])
            row["t_test"] = {**{k: _nan_none(v) for k, v in t.items()}, "seeds": paired}
            row["bootstrap"] = _bootstrap(by, m, base_m, paired)
        methods.append(row)
    return {"study": study.name, "metric": study.metric, "mode": study.mode, "baseline": base_m, "seeds": study.seeds,
            "sources": study.sources, "methods": methods,
            "trials": [{k: v for k, v in t.items() if k != "scores"} for t in trials]}


def _bootstrap(by: dict, m: str, base_m: str, seeds: list[int]) -> dict[str, Any]:
    """Paired bootstrap over the validation examples both methods scored, per-example scores averaged over `seeds`."""
    from lora_diffusion import stats

    if not seeds:
        return {"reason": "no seed finished for both methods"}
    for who in (m, base_m):
        for s in seeds:
            if by[(who, s)].get("scores") is None:
                return {"reason": f"{who} seed {s}: {by[(who, s)].get('scores_reason') or 'no per-example scores'}"}
    common = set.intersection(*(set(by[(who, s)]["scores"]) for who in (m, base_m) for s in seeds))
    if not common:
        return {"reason": "the trials scored no common validation example"}
    idx = sorted(common)
    avg = lambda who: [sum(by[(who, s)]["scores"][i] for s in seeds) / len(seeds) for i in idx]  # noqa: E731
    out = stats.paired_bootstrap(avg(m), avg(base_m))
    return {**out, "seeds": seeds, "reason": None}


def _nan_none(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def _f(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    from lora_diffusion.stats import format_p

    metric, base = result["metric"], result["baseline"]
    head = ["method", "seeds", f"{metric} mean ± std", "95 % CI", f"Δ vs {base}", "paired t-test p (seeds)",
            "bootstrap Δ [95 %] (examples)", "bootstrap p", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    reasons: list[str] = []

    def missing(reason: str | None) -> str:  # an undefined test: a numbered note under the table says why
        reasons.append(reason or "not defined")
        return f"— [{len(reasons)}]"

    for r in result["methods"]:
        t, b = r.get("t_test"), r.get("bootstrap")
        ci = "—" if r["ci95"][0] is None else f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        delta = p_t = boot = p_b = "—"
        if t is not None:
            delta = "—" if t["mean_diff"] is None else f"{t['mean_diff']:+.2f}"
            p_t = format_p(t["p"]) if t["p"] is not None else missing(t.get("reason"))
        if b is not None:
            if b.get("reason"):
                boot = missing(b["reason"])
            else:
                boot, p_b = f"{b['diff']:+.2f} [{b['lo']:+.2f}, {b['hi']:+.2f}]", format_p(b["p"])
        if r["method"] == base:
            delta = "(baseline)"
        mean = "—" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
        n = f"{r['n']}" + (f" (failed: {', '.join(map(str, r['failed_seeds']))})" if r["failed_seeds"] else "")
        params = "—" if r["trainable_params"] is None else f"{int(r['trainable_params']):,}"
        lines.append("| " + " | ".join([r["method"], n, mean, ci, delta, p_t, boot, p_b, params]) + " |")
    notes = [f"{metric} ({result['mode']}) over seeds {', '.join(map(str, result['seeds']))}; Δ = method − {base}. "
             "t-test: paired over the seeds both finished (two-sided); bootstrap: paired over validation examples, "
             "per-example scores averaged over those seeds, 10,000 resamples (two-sided p)."]
    notes += [f"[{i}] {reason}." for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# --------------------------------------------------------------------------- running the trials


def trial_points(configs: list[Config]) -> list[dict[str, Any]]:
    """Each trial's Tune config: the flat keys whose value differs between the study's configs (always
    method.name and train.seed), so that `apply_sampled(first config, point)` rebuilds each config exactly."""
    from lora_diffusion.config import flatten
    from lora_diffusion.search_space import apply_sampled

    flats = [flatten(c.to_dict()) for c in configs]
    keys = sorted({k for f in flats for k in f if len({json.dumps(g.get(k), sort_keys=True) for g in flats}) > 1}
                  | {"method.name", "train.seed"})
    points = []
    for cfg, f in zip(configs, flats):
        point = {k: f[k] for k in keys}
        lists = [k for k, v in point.items() if isinstance(v, (list, dict))]
        if lists:
            raise StudyError(f"{', '.join(lists)}: differs between the methods and is a list; a seed study's trials "
                             "differ in scalar settings only: give it once on the command line")
        if apply_sampled(configs[0].to_dict(), point).flat() != cfg.flat():  # the point must rebuild its config
            raise StudyError(f"internal: the trial config of {cfg.method.name} seed {cfg.train.seed} does not rebuild it")
        points.append(point)
    return points


def _resources(cfg: Config) -> dict[str, Any]:
    from lora_diffusion.search_space import TRIAL_PROCESS_MEMORY

    t = cfg.train
    if t.num_workers == 1:
        return {"cpu": t.cpus_per_worker, **({"gpu": t.gpus_per_worker} if t.gpus_per_worker else {})}
    return {"cpu": 0, "memory": TRIAL_PROCESS_MEMORY}


def start_study_run(uri: str, study: Study, experiment_id: str) -> str:
    from lora_diffusion.sweep.runs import find_parent_run
    from lora_diffusion.tracking import RunTracker, run_tags

    existing = find_parent_run(uri, experiment_id, study.name)
    if existing is not None:
        RunTracker(uri, existing.info.run_id, owned=True).client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    cfg0 = study.candidates[0].config
    run = RunTracker.start(uri, study.name, run_name=study.name,
                           tags=run_tags(cfg0, "sweep", sweep=study.name, study="seed_study", sweep_state="RUNNING"))
    run.log_params({"sweep.metric": study.metric, "sweep.mode": study.mode, "study.seeds": ",".join(map(str, study.seeds)),
                    "study.methods": ",".join(c.method for c in study.candidates), "study.baseline": study.baseline,
                    "sweep.num_samples": len(study.seeds) * len(study.candidates), "sweep.params": "method.name, train.seed"})
    for c in study.candidates:
        run.log_text(c.config.to_yaml(), f"configs/{c.method}.yaml")
    run.log_text("\n".join(f"{c.method}: {c.source}" for c in study.candidates) + "\n", "configs/sources.txt")
    return run.run_id


def run_study(study: Study, storage: Path, uri: str, num_cpus: int | None, dashboard: bool,
              max_concurrent: int | None) -> dict[str, Any]:
    """Run (or resume) the study's trials on Ray Tune; the analysed result (also written and logged)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from lora_diffusion.ray_runtime import start_ray
    from lora_diffusion.sweep.callbacks import trial_states_callback
    from lora_diffusion.sweep.runs import artifact_location
    from lora_diffusion.sweep.search import trial_name
    from lora_diffusion.sweep.trial import run_trial
    from lora_diffusion.tracking import RunTracker, ensure_experiment, error_text

    exp_dir = storage / study.name
    configs = study.trial_configs()
    base = configs[0][2]
    points = trial_points([cfg for _, _, cfg in configs])
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # predictions are read back quietly
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    connected, parent_run_id = False, None
    started = time.time()
    try:
        connected, dash = start_ray(num_cpus, dashboard, reuse=False)
        if dash:
            print(f"[compare] Ray dashboard: {dash}", flush=True)
        experiment_id = ensure_experiment(uri, study.name, artifact_location(uri, study.name), "sweep name with --name")
        parent_run_id = start_study_run(uri, study, experiment_id)
        print(f"[compare] MLflow: experiment {study.name!r} (id {experiment_id}), parent run {parent_run_id}", flush=True)
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / STUDY_FILE).write_text(json.dumps(study.fingerprint(), indent=2))
        sweep = {"name": study.name, "base": base.to_dict(), "metric": study.metric, "tracking_uri": uri,
                 "experiment": study.name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                 "trial_runner": "in_process" if base.train.num_workers == 1 else "torch_trainer",
                 "train_storage": str(exp_dir / "train"), "retry_failed": False,
                 "console_metrics": ("step", "loss", study.metric)}
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), _resources(base))
        if tune.Tuner.can_restore(str(exp_dir)):
            print(f"[compare] resuming study {study.name!r} from {exp_dir} (finished trials are kept)", flush=True)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space={k: None for k in points[0]},  # the points fill every key
                tune_config=tune.TuneConfig(
                    search_alg=BasicVariantGenerator(points_to_evaluate=points), num_samples=len(points),
                    max_concurrent_trials=max_concurrent, trial_name_creator=trial_name,
                    trial_dirname_creator=trial_name, reuse_actors=sweep["trial_runner"] == "in_process"),
                run_config=tune.RunConfig(name=study.name, storage_path=str(storage), callbacks=[trial_states_callback(sweep)],
                                          failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1))
        tuner.fit()
        trials = collect(study, exp_dir, uri, experiment_id, parent_run_id)
        result = analyse(study, trials)
        result.update({"experiment_path": str(exp_dir), "mlflow_experiment_id": experiment_id,
                       "parent_run_id": parent_run_id, "wall_time_s": round(time.time() - started, 1)})
        finish(result, exp_dir, uri, parent_run_id)
        return result
    except BaseException as e:
        if parent_run_id is not None:
            RunTracker(uri, parent_run_id, owned=True).end(
                "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", error=error_text(e))
        raise
    finally:
        if connected:
            ray.shutdown()


def collect(study: Study, exp_dir: Path, uri: str, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per trial: method, seed, state, MLflow run, the study metric, trainable params, per-example scores."""
    from ray.tune import ExperimentAnalysis

    from lora_diffusion.sweep.runs import child_runs
    from lora_diffusion.sweep.states import FINISHED, trial_state
    from lora_diffusion.tracking import client

    c = client(uri)
    runs = {r.data.tags.get("ray_trial_id"): r for r in child_runs(uri, experiment_id, parent_run_id)}
    max_steps = study.candidates[0].config.train.max_steps
    rows = []
    for t in ExperimentAnalysis(str(exp_dir)).trials:
        method, seed = t.config.get("method.name"), t.config.get("train.seed")
        run = runs.get(t.trial_id)
        state = trial_state(t.status, t.last_result, max_steps)
        metrics = dict(run.data.metrics) if run is not None else {}
        value = metrics.get(study.metric) if state == FINISHED else None
        row = {"method": method, "seed": seed, "trial_id": t.trial_id, "state": state,
               "run_id": run.info.run_id if run else None, "value": value,
               "trainable_params": metrics.get("trainable_params"),
               "error": run.data.tags.get("error") if run else None, "scores": None, "scores_reason": None}
        if value is not None:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    lines = Path(c.download_artifacts(run.info.run_id, PREDICTIONS, tmp)).read_text().splitlines()
                preds = [json.loads(x) for x in lines if x.strip()]
                row["scores"], row["scores_reason"] = per_example_scores(
                    study.candidates[0].config.task.name, preds, study.metric, value)
            except Exception as e:  # noqa: BLE001 - no predictions: the table says so
                row["scores_reason"] = f"no {PREDICTIONS} in run {run.info.run_id} ({type(e).__name__})"
        rows.append(row)
    return rows


def finish(result: dict[str, Any], exp_dir: Path, uri: str, parent_run_id: str) -> None:
    """seed_study.json / .md in the study folder and on the MLflow parent run (metrics per method, tags)."""
    from lora_diffusion.tracking import RunTracker

    text = markdown_table(result)
    (exp_dir / RESULT_JSON).write_text(json.dumps(result, indent=2, default=str))
    (exp_dir / RESULT_MD).write_text(text)
    parent = RunTracker(uri, parent_run_id, owned=True)
    parent.log_artifact(exp_dir / RESULT_JSON)
    parent.log_artifact(exp_dir / RESULT_MD)
    metrics: dict[str, float] = {}
    for r in result["methods"]:
        if r["mean"] is not None:
            metrics[f"{r['method']}_mean"], metrics[f"{r['method']}_std"] = r["mean"], r["std"]
        t = r.get("t_test") or {}
        if t.get("p") is not None:
            metrics[f"{r['method']}_ttest_p"] = t["p"]
        b = r.get("bootstrap") or {}
        if b.get("p") is not None:
            metrics[f"{r['method']}_bootstrap_p"] = b["p"]
    parent.log_metrics(metrics, step=0)
    failed = sum(1 for t in result["trials"] if t["state"] != "FINISHED")
    parent.set_tags({"sweep_state": "FINISHED" if not failed else "FINISHED_WITH_FAILURES"})
    parent.end("FINISHED")


# --------------------------------------------------------------------------- the command


def build_study(args) -> Study:
    from lora_diffusion.tracking import resolve_tracking_uri

    storage = Path(args.storage_path or "tune_results").expanduser().resolve()
    data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
    if bool(args.sweep) == bool(args.configs):
        raise StudyError("give the configs to compare: one or more --sweep NAME_OR_BEST_JSON, or --configs FILE.yaml (not both)")
    cands: list[Candidate] = []
    metric = mode = None
    seeds_default: Any = None
    baseline = args.baseline
    sources: list[str] = []
    if args.configs:
        cands, spec = candidates_from_file(args.configs, data_dir)
        metric, mode, seeds_default = spec.metric, spec.mode, spec.seeds
        baseline = baseline or spec.baseline
        name = args.name or spec.name or Path(args.configs).stem
        sources.append(str(args.configs))
    else:
        uri = resolve_tracking_uri(args.tracking_uri)
        metrics_seen, names = {}, []
        for ref in args.sweep:
            got, m, md, sweep_name = candidates_from_sweep(ref, storage, uri)
            names.append(sweep_name)
            metrics_seen[ref] = (m, md)
            for c in got:
                if data_dir:
                    c.config = _apply(c.config.to_dict(), {"task.data_dir": data_dir}, "--data-dir")
            cands += got
            sources.append(ref)
        pairs = set(metrics_seen.values())
        if args.metric is None and len(pairs) > 1:
            raise StudyError("the sweeps optimised different metrics (" + ", ".join(f"{r}: {m} {md}" for r, (m, md) in metrics_seen.items())
                             + "); choose the study's with --metric")
        metric, mode = next(iter(pairs))
        name = args.name or ("_".join(dict.fromkeys(names)) + "_seeds")
    metric = args.metric or metric
    mode = args.mode or (mode if not args.metric else None) or _metric_mode(metric)
    if args.overrides:
        for c in cands:
            c.config = _apply(c.config.to_dict(), args.overrides, "overrides")
    check_one_per_method(cands)
    check_same_budget(cands)
    baseline = baseline or BASELINE
    methods = [c.method for c in cands]
    if baseline not in methods:
        raise StudyError(f"--baseline: got {baseline!r}; the study's methods are: {', '.join(methods)}")
    cands.sort(key=lambda c: (c.method != baseline, methods.index(c.method)))
    _check_metric(metric, cands[0].config)
    seeds = parse_seeds(args.seeds, seeds_default)
    return Study(name=name, metric=metric, mode=mode, seeds=seeds, baseline=baseline, candidates=cands, sources=sources)


def _check_metric(metric: str, cfg: Config) -> None:
    from lora_diffusion.search_space import KNOWN_METRICS, TASK_EVAL_METRICS

    task_metrics = TASK_EVAL_METRICS.get(cfg.task.name, set())
    other = {m for ms in TASK_EVAL_METRICS.values() for m in ms} - task_metrics
    if metric in other:
        raise StudyError(f"--metric: got {metric!r}; task {cfg.task.name} reports {', '.join(sorted(task_metrics))} "
                         "(and eval_denoise_acc, val_loss, ...)")
    if metric not in KNOWN_METRICS and not metric.startswith("eval_"):
        raise StudyError(f"--metric: got {metric!r}; allowed: {', '.join(sorted(KNOWN_METRICS))}")
    if metric.startswith("eval_") and not cfg.train.eval_at_end:
        raise StudyError(f"--metric {metric}: train.eval_at_end is false, so no trial reports it; set train.eval_at_end=true")
    if metric.startswith("val_") and cfg.train.eval_every <= 0:
        raise StudyError(f"--metric {metric}: train.eval_every is 0, so no trial reports it; set train.eval_every")


def check_restorable(study: Study, exp_dir: Path) -> None:
    f = exp_dir / STUDY_FILE
    if not f.is_file():
        return
    old = json.loads(f.read_text())
    new = json.loads(json.dumps(study.fingerprint()))
    if old != new:
        from lora_diffusion.sweep.resume import nested_diff

        diffs = nested_diff(old, new)
        raise StudyError(f"{exp_dir} holds study {study.name!r} started with other settings ({'; '.join(diffs[:4])}"
                         f"{' ...' if len(diffs) > 4 else ''}); rerun it with the same inputs, or choose another --name")


def describe(study: Study) -> str:
    lines = [f"seed study {study.name!r}: {study.metric} ({study.mode}), baseline {study.baseline}, "
             f"seeds {', '.join(map(str, study.seeds))} -> {len(study.seeds) * len(study.candidates)} trials"]
    for c in study.candidates:
        s = c.config.method.settings().model_dump(mode="json")
        lines.append(f"  {c.method:<15} lr {c.config.train.lr:.3g}, {c.config.train.max_steps} steps; "
                     + ", ".join(f"{k}={v}" for k, v in list(s.items())[:8]) + f"   <- {c.source}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method, e.g. train.max_steps=200")
    p.add_argument("--sweep", action="append", default=[],
                   help="a finished sweep: its name (under --storage-path, or an MLflow experiment), folder or best.json; repeatable")
    p.add_argument("--configs", help="a study YAML listing one config per method (see StudyFile in lora_diffusion/compare.py)")
    p.add_argument("--seeds", help=f"a count (default {DEFAULT_SEEDS}: seeds 0..N-1) or a list, e.g. 0,1,2")
    p.add_argument("--metric", help="the metric to compare (default: the sweep's metric / the file's, eval_accuracy)")
    p.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better (default: the metric's)")
    p.add_argument("--baseline", help=f"the method the others are tested against (default {BASELINE})")
    p.add_argument("--name", help="the study name: its Tune folder and MLflow experiment (default: from the sources)")
    p.add_argument("--data-dir", help="local data folder (<dir>/<task>/<split>.jsonl) for every method")
    p.add_argument("--storage-path", help="where Tune keeps experiments (default ./tune_results); also where --sweep names are looked up")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs allow)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray cluster without its dashboard")
    p.add_argument("--dry-run", action="store_true", help="print the study (methods, configs, seeds); start nothing")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lora_diffusion.tasks import DataError
    from lora_diffusion.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri

    try:
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise StudyError(f"--max-concurrent: got {args.max_concurrent}; must be >= 1")
        study = build_study(args)
        storage = Path(args.storage_path or "tune_results").expanduser().resolve()
        uri = resolve_tracking_uri(args.tracking_uri or study.candidates[0].config.tracking.tracking_uri)
        print(describe(study), flush=True)
        if args.dry_run:
            print("dry run: nothing started")
            return 0
        from lora_diffusion import train

        for c in study.candidates:
            c.config = train.absolutize(c.config)
            train.preflight(c.config)
        check_restorable(study, storage / study.name)  # after absolutize: what run_study records
        check_tracking_uri(uri)
    except (StudyError, ConfigError, DataError, TrackingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result = run_study(study, storage, uri, args.num_cpus, not args.no_dashboard, args.max_concurrent)
    print()
    print(markdown_table(result))
    print(f"[compare] results: {Path(result['experiment_path']) / RESULT_JSON} (and {RESULT_MD}); "
          f"MLflow parent run {result['parent_run_id']}; report: python -m lora_diffusion.report --experiment {study.name}")
    failed = [t for t in result["trials"] if t["state"] != "FINISHED"]
    if failed:
        print(f"[compare] {len(failed)} trial(s) did not finish: "
              + ", ".join(f"{t['method']} seed {t['seed']} ({t['state']})" for t in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
