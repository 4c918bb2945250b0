"""ray: the training loop plainly vs inside Ray Train, and Tune's per-trial orchestration overhead.

1. Plain vs Ray Train, in one fresh process that starts one local Ray cluster (`ray_runtime.start_ray`):
   after an untimed warm-up call (imports, tokenisation cache), the same N-step config runs
   alternately plainly (`train.train_loop` with a `LocalReporter`, in this process) and inside
   Ray Train (`fit()` of a `TorchTrainer` with `train.make_trainer`'s scaling: one worker, the
   same CPUs and torch threads), in the order plain, Ray, Ray, plain (--smoke: plain, Ray), so a
   machine that speeds up or slows down affects both alike. Every report is time-stamped (a thin
   reporter wrapper): steps/s is measured between the first and the last report (start-up
   excluded; reporting and checkpointing included), also the loop's own samples/s. The ratio is
   the median of the per-pair ratios. Fixed start-up cost = wall time - N / steps/s; Ray's extra
   = its fixed cost per `fit()` + `ray.init` + `ray.shutdown` - the plain loop's fixed cost.
2. Tune: `python -m lora_diffusion.tune` (in a fresh process) on a space of K short trials, one
   at a time, no early stopping, MLflow into a fresh SQLite store. The same trial is run plainly
   in that process right before and right after the sweep. Per-trial orchestration overhead =
   (time inside `Tuner.fit` - K x the plain trial's mean wall time) / K; the one-off costs (Ray
   start, MLflow set-up, the summary) are reported apart.

Data: `--data-dir` (or $LORA_DIFFUSION_DATA_DIR) when given, else a small synthetic SST-2 folder
(these numbers are about Ray and Tune, not the data). Goals (issue 8): Ray Train steps/s >= 0.97x
plain; per-trial overhead <= 5 s for one-worker trials.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_diffusion.bench.common import (
    BenchError, goal, goals_table, heading, machine_info, median, prepare_data, run_isolated, table, with_options,
)

NAME = "ray"

PRESETS = {
    "smoke": dict(base="builtin:tiny", max_length=48, batch_size=8, steps=12, report_every=3, subset=128, threads=1,
                  trials=2, trial_steps=4),
    "quick": dict(base="minilm", max_length=64, batch_size=16, steps=60, report_every=10, subset=2048, threads=2,
                  trials=4, trial_steps=10),
    "full": dict(base="minilm", max_length=128, batch_size=64, steps=300, report_every=50, subset=None, threads=None,
                 trials=8, trial_steps=50),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="model.base (default: builtin:tiny for --smoke, minilm otherwise)")
    p.add_argument("--data-dir", help="local data folder with sst2/{train,validation}.jsonl (default: synthetic)")
    p.add_argument("--steps", type=int, help="training steps of the plain and Ray Train runs")
    p.add_argument("--report-every", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--trials", type=int, help="trials of the Tune sweep")
    p.add_argument("--trial-steps", type=int, help="training steps per Tune trial")
    p.add_argument("--method", default="lora_diffusion", help="method trained in every run (default lora_diffusion)")


def _settings(args: argparse.Namespace, size: str) -> dict[str, Any]:
    keys = ("steps", "report_every", "batch_size", "trials", "trial_steps")
    s = with_options(PRESETS[size], args, ("base", *keys), positive=keys)
    if s["threads"] is None:
        s["threads"] = max(1, (os.cpu_count() or 2) - 1)
    if s["steps"] < 3 * s["report_every"]:
        raise BenchError(f"--steps {s['steps']} / --report-every {s['report_every']}: need at least 3 reports to measure steps/s")
    from lora_diffusion.config import METHOD_NAMES

    if args.method not in METHOD_NAMES:
        raise BenchError(f"--method {args.method!r}: allowed: {', '.join(METHOD_NAMES)}")
    s["method"] = args.method
    s["device"] = args.device
    s["gpus_per_worker"] = 1.0 if args.device.startswith("cuda") else 0.0
    if s["threads"] > (os.cpu_count() or 1):
        raise BenchError(f"--threads {s['threads']}: this machine has {os.cpu_count()} CPUs (Ray reserves one per thread)")
    return s


def run_config_dict(s: dict[str, Any], data_dir: str, work: str, steps: int, report_every: int) -> dict[str, Any]:
    """The training config every part of the suite runs (Config.to_dict())."""
    from lora_diffusion.config import load_config

    over = [f"model.base={s['base']}", f"model.max_length={s['max_length']}", "task.name=sst2", f"task.data_dir={data_dir}",
            f"task.cache_dir={Path(work) / 'cache'}", f"method.name={s['method']}", f"train.batch_size={s['batch_size']}",
            f"train.max_steps={steps}", f"train.report_every={report_every}", f"train.warmup_steps={min(10, steps)}",
            "train.eval_at_end=false", f"train.cpus_per_worker={s['threads']}", f"train.torch_threads={s['threads']}",
            f"train.gpus_per_worker={s['gpus_per_worker']}", f"train.output_dir={Path(work) / 'outputs'}",
            "train.keep_checkpoints=1", "tracking.enabled=false"]
    if s.get("subset"):
        over.append(f"task.subset_size={s['subset']}")
    return load_config(None, over).to_dict()


# --------------------------------------------------------------------------- measured pieces (child processes)


class TimedReporter:
    """Wraps a reporter and keeps every report with its wall-clock time (`bench_time`)."""

    def __init__(self, inner):
        self.inner = inner
        self.reports: list[dict[str, Any]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def report(self, metrics: dict[str, Any], checkpoint_dir=None) -> None:
        self.inner.report(metrics, checkpoint_dir=checkpoint_dir)
        self.reports.append({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "bench_time": time.time()})


def steps_per_s(reports: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """Steps/s between the first and the last report, and the loop's own samples/s (windows after the first)."""
    if len(reports) < 2:
        raise BenchError(f"only {len(reports)} report(s) came back; need at least 2 to measure steps/s")
    a, b = reports[0], reports[-1]
    between = (b["step"] - a["step"]) / max(b["bench_time"] - a["bench_time"], 1e-9)
    loop = median([r["samples_per_s"] / batch_size for r in reports[1:]])
    return {"steps_per_s": between, "loop_steps_per_s": loop}


def _plain_run(spec: dict[str, Any], steps: int, report_every: int, name: str) -> dict[str, Any]:
    """One plain `train_loop` call (LocalReporter); its wall time and time-stamped reports."""
    from lora_diffusion.train_reporters import LocalReporter
    from lora_diffusion.train import train_loop

    rep = TimedReporter(LocalReporter(Path(spec["work"]) / name))
    cfg = run_config_dict(spec, spec["data_dir"], spec["work"], steps, report_every)
    t0 = time.perf_counter()
    train_loop({"config": cfg, "mlflow": None, "resume_from": None, "trial_name": name}, rep)
    wall = time.perf_counter() - t0
    shutil.rmtree(Path(spec["work"]) / name, ignore_errors=True)
    return {"kind": "plain", "wall_s": wall, "reports": rep.reports}


def ray_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train worker: `train_loop` with the Ray Train reporter, time-stamped; returns the reports."""
    from lora_diffusion.train_reporters import RayTrainReporter
    from lora_diffusion.train import train_loop

    rep = TimedReporter(RayTrainReporter())
    train_loop(loop_config, rep)
    return rep.reports


def train_runs(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain and Ray Train runs of the same config, interleaved, on one fresh local Ray cluster."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from lora_diffusion.config import config_from_dict
    from lora_diffusion.ray_runtime import start_ray
    from lora_diffusion.train import make_trainer

    work = spec["work"]
    _plain_run(spec, 2, 1, "warmup")
    cfg_dict = run_config_dict(spec, spec["data_dir"], work, spec["steps"], spec["report_every"])
    loop_config = {"config": cfg_dict, "mlflow": None, "resume_from": None, "trial_name": "ray"}
    t0 = time.perf_counter()
    connected, _ = start_ray(num_cpus=spec["threads"], dashboard=False)
    init_s = time.perf_counter() - t0
    runs = []
    try:
        scaling = make_trainer(config_from_dict(cfg_dict), loop_config).scaling_config  # the project's scaling
        for i, kind in enumerate(spec["order"]):
            if kind == "plain":
                runs.append(_plain_run(spec, spec["steps"], spec["report_every"], f"plain_{i}"))
                continue
            run_config = ray.train.RunConfig(name=f"bench-ray-train-{i}", storage_path=str(Path(work) / "ray_storage"),
                                             checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1))
            trainer = TorchTrainer(ray_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)
            t = time.perf_counter()
            result = trainer.fit()
            wall = time.perf_counter() - t
            if not result.return_value:
                raise BenchError("Ray Train returned no reports from the worker (result.return_value is empty)")
            runs.append({"kind": "ray", "wall_s": wall, "reports": result.return_value})
    finally:
        t = time.perf_counter()
        if connected:
            ray.shutdown()
        shutdown_s = time.perf_counter() - t
    return {"init_s": init_s, "shutdown_s": shutdown_s, "runs": runs,
            "scaling": {"num_workers": scaling.num_workers, "resources_per_worker": scaling.resources_per_worker}}


def tune_sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """`python -m lora_diffusion.tune` on K one-worker trials; `Tuner.fit` is timed by a wrapper."""
    import yaml
    from ray import tune

    from lora_diffusion.tune import main as tune_main

    work = Path(spec["work"])
    space = {
        "name": spec["sweep_name"],
        "overrides": {k: v for k, v in _flat_overrides(spec, spec["trial_steps"]).items()},
        "params": spec["params"],
        "metric": spec["metric"], "mode": spec["mode"],
        "sampler": {"name": "random", "seed": spec.get("seed", 0)},
        "scheduler": spec["scheduler"],
        "num_samples": spec["trials"], "max_concurrent": 1,
        "resources": {"workers": 1, "cpus_per_worker": spec["threads"], "gpus_per_worker": spec["gpus_per_worker"],
                      "trial_runner": spec.get("trial_runner", "auto")},
    }
    space_file = work / f"{spec['sweep_name']}.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    fit_times: list[float] = []
    original = tune.Tuner.fit

    def timed_fit(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            fit_times.append(time.perf_counter() - t)

    plain_trials = []
    if spec.get("plain_trial_bracket"):  # the same trial plainly, right before the sweep (after a warm-up call)
        _plain_run(spec, 2, 1, "warmup")
        plain_trials.append(_plain_run(spec, spec["trial_steps"], spec["trial_steps"], "plain_trial_before")["wall_s"])
    tune.Tuner.fit = timed_fit
    argv = [str(space_file), "--data-dir", spec["data_dir"], "--storage-path", str(work / "tune"),
            "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--num-cpus", str(spec["threads"]), "--no-dashboard"]
    t0 = time.perf_counter()
    try:
        rc = tune_main(argv)
    finally:
        tune.Tuner.fit = original
    wall = time.perf_counter() - t0
    if spec.get("plain_trial_bracket") and rc == 0:  # ... and right after it
        plain_trials.append(_plain_run(spec, spec["trial_steps"], spec["trial_steps"], "plain_trial_after")["wall_s"])
    best_file = work / "tune" / spec["sweep_name"] / "best.json"
    if rc != 0 or not best_file.is_file():
        raise BenchError(f"python -m lora_diffusion.tune {' '.join(argv)} exited {rc} (best.json: {best_file.is_file()})")
    best = json.loads(best_file.read_text())
    return {"wall_s": wall, "fit_s": fit_times[0] if fit_times else float("nan"), "best": best, "space": space,
            "plain_trial_s": plain_trials}


def _flat_overrides(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    from lora_diffusion.config import flatten

    cfg = run_config_dict(spec, spec["data_dir"], spec["work"], steps, spec.get("trial_report_every", steps))
    flat = flatten(cfg)
    keep = ("model.base", "model.max_length", "task.name", "task.cache_dir", "task.subset_size", "method.name",
            "train.batch_size", "train.max_steps", "train.report_every", "train.warmup_steps", "train.eval_at_end",
            "train.torch_threads", "train.keep_checkpoints", "train.eval_every", "train.val_examples")
    out = {k: flat[k] for k in keep if k in flat and flat[k] is not None}
    out.update(spec.get("extra_overrides", {}))
    return out


# --------------------------------------------------------------------------- the suite


def run(args: argparse.Namespace, size: str) -> dict[str, Any]:
    s = _settings(args, size)
    order = ["plain", "ray"] if size == "smoke" else ["plain", "ray", "ray", "plain"]
    with tempfile.TemporaryDirectory(prefix="lora_diffusion_bench_ray_") as work:
        data_dir, data_desc = prepare_data(args, work, size)
        spec = {**s, "work": work, "data_dir": data_dir}
        print(f"[ray] {' / '.join(order)}: {s['steps']} steps each …", flush=True)
        tr = run_isolated(f"{__name__}:train_runs", {**spec, "order": order})
        for r in tr["runs"]:
            print(f"[ray] {r['kind']}: {r['wall_s']:.1f} s", flush=True)
        print(f"[ray] Tune sweep of {s['trials']} one-worker trials …", flush=True)
        tspec = {**spec, "sweep_name": "bench-tune-overhead", "metric": "loss", "mode": "min", "scheduler": {"name": "none"},
                 "params": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-3}}, "plain_trial_bracket": True}
        t = run_isolated(f"{__name__}:tune_sweep", tspec)

    runs = tr["runs"]
    for r in runs:
        r.update(steps_per_s(r.pop("reports"), s["batch_size"]))
        r["fixed_s"] = r["wall_s"] - s["steps"] / r["steps_per_s"]
        # seconds a report (+ checkpoint) adds: a report window's time minus the loop's own time for its steps
        r["report_s"] = s["report_every"] * (1.0 / r["steps_per_s"] - 1.0 / r["loop_steps_per_s"])
    plain_runs = [r for r in runs if r["kind"] == "plain"]
    ray_runs = [r for r in runs if r["kind"] == "ray"]
    # pairs in time order: (plain, ray) and, with ABBA, (plain, ray) again from the end
    pairs = [(runs[0], runs[1])] + ([(runs[3], runs[2])] if len(runs) == 4 else [])
    ratio = median([r["steps_per_s"] / p["steps_per_s"] for p, r in pairs])
    ratio_loop = median([r["loop_steps_per_s"] / p["loop_steps_per_s"] for p, r in pairs])

    def summary(name: str, rs: list[dict[str, Any]], x: float, x_loop: float) -> dict[str, Any]:
        return {"run": name, "runs": len(rs), "steps": s["steps"], "wall_s": median([r["wall_s"] for r in rs]),
                "steps_per_s": median([r["steps_per_s"] for r in rs]),
                "loop_steps_per_s": median([r["loop_steps_per_s"] for r in rs]),
                "fixed_s": median([r["fixed_s"] for r in rs]), "report_s": median([r["report_s"] for r in rs]),
                "x_plain": x, "x_plain_loop": x_loop}

    rows = [summary("plain (LocalReporter)", plain_runs, 1.0, 1.0),
            summary("Ray Train (1 worker)", ray_runs, ratio, ratio_loop)]
    trials = t["best"]["trials"]
    finished = sum(1 for x in trials if x["state"] == "FINISHED")
    if finished != s["trials"]:
        raise BenchError(f"Tune sweep: {finished} of {s['trials']} trials finished; states: {[x['state'] for x in trials]}")
    plain_trial = sum(t["plain_trial_s"]) / len(t["plain_trial_s"])
    overhead = (t["fit_s"] - s["trials"] * plain_trial) / s["trials"]
    tune_row = {
        "trials": s["trials"], "finished": finished, "trial_steps": s["trial_steps"],
        "plain_trial_s": plain_trial, "plain_trial_before_s": t["plain_trial_s"][0], "plain_trial_after_s": t["plain_trial_s"][-1],
        "tuner_fit_s": t["fit_s"], "command_wall_s": t["wall_s"], "one_off_s": t["wall_s"] - t["fit_s"],
        "per_trial_s": t["fit_s"] / s["trials"], "per_trial_overhead_s": overhead,
        "trial_runner": "in_process" if t["space"]["resources"]["trial_runner"] in ("auto", "in_process") else "torch_trainer",
    }
    goals = [
        goal("Ray Train steps/s >= 0.97x plain loop", ratio, 0.97, ">=",
             note=f"loop-only throughput (reporting excluded): {ratio_loop:.3f}x"),
        goal("Tune per-trial orchestration overhead <= 5 s (one-worker trials)", overhead, 5.0),
    ]
    return {
        "machine": machine_info(s["device"], s["threads"]),
        "settings": {**s, "data": data_desc, "order": order},
        "rows": rows,
        "runs": runs,
        "ray_startup": {"init_s": tr["init_s"], "fit_fixed_s": rows[1]["fixed_s"], "shutdown_s": tr["shutdown_s"],
                        "extra_fixed_s": rows[1]["fixed_s"] + tr["init_s"] + tr["shutdown_s"] - rows[0]["fixed_s"],
                        "scaling": tr["scaling"]},
        "tune": tune_row,
        "goals": goals,
    }


def markdown(result: dict[str, Any]) -> str:
    s, st, tu = result["settings"], result["ray_startup"], result["tune"]
    cols = [("run", "run"), ("runs", "runs"), ("steps", "steps"), ("wall_s", "wall s"), ("steps_per_s", "steps/s (reports)"),
            ("loop_steps_per_s", "steps/s (loop)"), ("x_plain", "x plain"), ("x_plain_loop", "x plain (loop)"),
            ("report_s", "s per report"), ("fixed_s", "fixed start-up s")]
    tcols = [("trials", "trials"), ("trial_steps", "steps each"), ("trial_runner", "trial runner"),
             ("plain_trial_s", "plain trial s (before/after mean)"), ("per_trial_s", "Tune s / trial"),
             ("per_trial_overhead_s", "overhead s / trial"), ("one_off_s", "one-off s (Ray, MLflow, summary)")]
    return "\n".join([
        *heading(result),
        f"`{s['method']}` on `{s['base']}`, batch {s['batch_size']} x {s['max_length']} tokens, {s['threads']} CPU(s) and "
        f"torch threads per worker, report (+ checkpoint) every {s['report_every']} steps; data: {s['data']}.",
        "",
        table(result["rows"], cols),
        "",
        f"Runs in this order: {', '.join(s['order'])} (medians; the ratio is the median of the per-pair ratios). "
        f"Ray Train start-up: `ray.init` {st['init_s']:.1f} s once, fixed cost per `fit()` {st['fit_fixed_s']:.1f} s "
        f"(plain loop: {result['rows'][0]['fixed_s']:.1f} s), `ray.shutdown` {st['shutdown_s']:.1f} s; Ray's extra "
        f"fixed cost for one run: {st['extra_fixed_s']:.1f} s.",
        "",
        "Tune sweep (`python -m lora_diffusion.tune`, one trial at a time, no early stopping):",
        "",
        table([tu], tcols),
        "",
        goals_table(result["goals"]),
    ])
