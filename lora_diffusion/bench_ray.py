"""ray: the training loop plainly vs inside Ray Train, and Tune's per-trial orchestration overhead.

1. plain: `train.train_loop` with a `LocalReporter` in a fresh process (after one short untimed
   call that imports everything and fills the tokenisation cache), N steps.
2. Ray Train: the same config through `train.make_trainer`'s scaling (one worker, the same CPUs and
   torch threads) on a fresh local Ray cluster: `init_ray` + `fit()` + `ray.shutdown()`.
   Both runs time-stamp every report (a thin reporter wrapper), so steps/s is measured between
   the first and the last report (start-up excluded, reporting and checkpointing included) in
   both. Fixed start-up cost = wall time - N / steps/s; Ray's extra = its fixed cost - plain's.
3. Tune: `python -m lora_diffusion.tune` (in a fresh process) on a space of K short trials, one
   at a time, no early stopping, MLflow into a fresh SQLite store. Per-trial orchestration
   overhead = (time inside `Tuner.fit` - K x the same trial's plain wall time) / K; the one-off
   costs (Ray start, MLflow set-up, the summary) are reported apart.

Data: `--data-dir` (or $LORA_DIFFUSION_DATA_DIR) when given, else a small synthetic SST-2 folder
(these numbers are about Ray and Tune, not the data). Goals (issue 8): Ray Train steps/s >= 0.97x
plain; per-trial overhead <= 5 s for one-worker trials.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_diffusion.bench import (
    BenchError, goal, goals_table, machine_info, machine_line, median, resolve_data_dir, run_isolated, synthetic_sst2,
    table,
)

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
    s = dict(PRESETS[size])
    for key in ("base", "steps", "report_every", "batch_size", "trials", "trial_steps"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.threads is not None:
        s["threads"] = args.threads
    if s["threads"] is None:
        s["threads"] = max(1, (os.cpu_count() or 2) - 1)
    for key in ("steps", "report_every", "batch_size", "trials", "trial_steps"):
        if s[key] < 1:
            raise BenchError(f"--{key.replace('_', '-')} {s[key]}: must be >= 1")
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


def plain(spec: dict[str, Any]) -> dict[str, Any]:
    """train_loop with LocalReporter: an untimed warm-up call, the timed N-step run, the timed Tune trial."""
    from lora_diffusion.reporting import LocalReporter
    from lora_diffusion.train import train_loop

    work = spec["work"]
    warm = run_config_dict(spec, spec["data_dir"], work, 2, 1)
    train_loop({"config": warm, "mlflow": None, "resume_from": None, "trial_name": "warmup"},
               LocalReporter(Path(work) / "plain_warmup"))
    rep = TimedReporter(LocalReporter(Path(work) / "plain"))
    cfg = run_config_dict(spec, spec["data_dir"], work, spec["steps"], spec["report_every"])
    t0 = time.perf_counter()
    train_loop({"config": cfg, "mlflow": None, "resume_from": None, "trial_name": "plain"}, rep)
    wall = time.perf_counter() - t0
    trial_cfg = run_config_dict(spec, spec["data_dir"], work, spec["trial_steps"], spec["trial_steps"])
    t0 = time.perf_counter()
    train_loop({"config": trial_cfg, "mlflow": None, "resume_from": None, "trial_name": "plain-trial"},
               LocalReporter(Path(work) / "plain_trial"))
    trial_wall = time.perf_counter() - t0
    return {"wall_s": wall, "trial_wall_s": trial_wall, "reports": rep.reports}


def ray_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train worker: `train_loop` with the Ray Train reporter, time-stamped; returns the reports."""
    from lora_diffusion.reporting import RayTrainReporter
    from lora_diffusion.train import train_loop

    rep = TimedReporter(RayTrainReporter())
    train_loop(loop_config, rep)
    return rep.reports


def ray_train(spec: dict[str, Any]) -> dict[str, Any]:
    """The same N-step run inside Ray Train, one worker, on a fresh local cluster."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from lora_diffusion.config import config_from_dict
    from lora_diffusion.train import init_ray, make_trainer

    work = spec["work"]
    cfg_dict = run_config_dict(spec, spec["data_dir"], work, spec["steps"], spec["report_every"])
    loop_config = {"config": cfg_dict, "mlflow": None, "resume_from": None, "trial_name": "ray"}
    t0 = time.perf_counter()
    connected = init_ray(num_cpus=spec["threads"], dashboard=False)
    t1 = time.perf_counter()
    try:
        run_config = ray.train.RunConfig(name="bench-ray-train", storage_path=str(Path(work) / "ray_storage"),
                                         checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1))
        scaling = make_trainer(config_from_dict(cfg_dict), loop_config, run_config).scaling_config  # the project's scaling
        trainer = TorchTrainer(ray_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)
        result = trainer.fit()
        t2 = time.perf_counter()
    finally:
        if connected:
            ray.shutdown()
    t3 = time.perf_counter()
    reports = result.return_value
    if not reports:
        raise BenchError("Ray Train returned no reports from the worker (result.return_value is empty)")
    return {"init_s": t1 - t0, "fit_s": t2 - t1, "shutdown_s": t3 - t2, "wall_s": t3 - t0, "reports": reports,
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

    tune.Tuner.fit = timed_fit
    argv = [str(space_file), "--data-dir", spec["data_dir"], "--storage-path", str(work / "tune"),
            "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--num-cpus", str(spec["threads"]), "--no-dashboard"]
    t0 = time.perf_counter()
    try:
        rc = tune_main(argv)
    finally:
        tune.Tuner.fit = original
    wall = time.perf_counter() - t0
    best_file = work / "tune" / spec["sweep_name"] / "best.json"
    if rc != 0 or not best_file.is_file():
        raise BenchError(f"python -m lora_diffusion.tune {' '.join(argv)} exited {rc} (best.json: {best_file.is_file()})")
    best = json.loads(best_file.read_text())
    return {"wall_s": wall, "fit_s": fit_times[0] if fit_times else float("nan"), "best": best, "space": space}


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


def prepare_data(args: argparse.Namespace, work: str, size: str) -> tuple[str, str]:
    """(data folder, description): the given one, else a synthetic SST-2 folder in `work`."""
    d = resolve_data_dir(getattr(args, "data_dir", None))
    if d:
        return d, f"local folder {d}"
    n = {"smoke": 256, "quick": 2048, "full": 8192}[size]
    return str(synthetic_sst2(Path(work) / "data", n_train=n, n_val=128)), f"synthetic SST-2 ({n} train rows)"


def run(args: argparse.Namespace, size: str) -> dict[str, Any]:
    s = _settings(args, size)
    with tempfile.TemporaryDirectory(prefix="lora_diffusion_bench_ray_") as work:
        data_dir, data_desc = prepare_data(args, work, size)
        spec = {**s, "work": work, "data_dir": data_dir}
        print("[ray] plain loop (LocalReporter) …", flush=True)
        p = run_isolated("lora_diffusion.bench_ray:plain", spec)
        print(f"[ray] plain: {p['wall_s']:.1f} s for {s['steps']} steps", flush=True)
        print("[ray] inside Ray Train (1 worker) …", flush=True)
        r = run_isolated("lora_diffusion.bench_ray:ray_train", spec)
        print(f"[ray] Ray Train: {r['wall_s']:.1f} s (init {r['init_s']:.1f}, fit {r['fit_s']:.1f}, "
              f"shutdown {r['shutdown_s']:.1f})", flush=True)
        print(f"[ray] Tune sweep of {s['trials']} one-worker trials …", flush=True)
        tspec = {**spec, "sweep_name": "bench-tune-overhead", "metric": "loss", "mode": "min", "scheduler": {"name": "none"},
                 "params": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-3}}}
        t = run_isolated("lora_diffusion.bench_ray:tune_sweep", tspec)

    ps, rs = steps_per_s(p["reports"], s["batch_size"]), steps_per_s(r["reports"], s["batch_size"])
    plain_fixed = p["wall_s"] - s["steps"] / ps["steps_per_s"]
    ray_fixed = r["wall_s"] - s["steps"] / rs["steps_per_s"]
    trials = t["best"]["trials"]
    finished = sum(1 for x in trials if x["state"] == "FINISHED")
    overhead = (t["fit_s"] - s["trials"] * p["trial_wall_s"]) / s["trials"]
    rows = [
        {"run": "plain (LocalReporter)", "steps": s["steps"], "wall_s": p["wall_s"], "steps_per_s": ps["steps_per_s"],
         "loop_steps_per_s": ps["loop_steps_per_s"], "fixed_s": plain_fixed, "x_plain": 1.0, "x_plain_loop": 1.0},
        {"run": "Ray Train (1 worker)", "steps": s["steps"], "wall_s": r["wall_s"], "steps_per_s": rs["steps_per_s"],
         "loop_steps_per_s": rs["loop_steps_per_s"], "fixed_s": ray_fixed, "x_plain": rs["steps_per_s"] / ps["steps_per_s"],
         "x_plain_loop": rs["loop_steps_per_s"] / ps["loop_steps_per_s"]},
    ]
    tune_row = {
        "trials": s["trials"], "finished": finished, "trial_steps": s["trial_steps"],
        "plain_trial_s": p["trial_wall_s"], "tuner_fit_s": t["fit_s"], "command_wall_s": t["wall_s"],
        "one_off_s": t["wall_s"] - t["fit_s"], "per_trial_overhead_s": overhead,
        "per_trial_s": t["fit_s"] / s["trials"],
        "trial_runner": "in_process" if t["space"]["resources"]["trial_runner"] in ("auto", "in_process") else "torch_trainer",
    }
    goals = [
        goal("Ray Train steps/s >= 0.97x plain loop", rows[1]["x_plain"], 0.97, ">="),
        goal("Tune per-trial orchestration overhead <= 5 s (one-worker trials)", overhead, 5.0),
    ]
    if finished != s["trials"]:
        raise BenchError(f"Tune sweep: {finished} of {s['trials']} trials finished; states: {[x['state'] for x in trials]}")
    return {
        "machine": machine_info(s["device"], s["threads"]),
        "settings": {**s, "data": data_desc},
        "rows": rows,
        "ray_startup": {"init_s": r["init_s"], "fit_s": r["fit_s"], "shutdown_s": r["shutdown_s"],
                        "extra_fixed_s": ray_fixed - plain_fixed, "scaling": r["scaling"]},
        "tune": tune_row,
        "goals": goals,
    }


def markdown(result: dict[str, Any]) -> str:
    s, st, tu = result["settings"], result["ray_startup"], result["tune"]
    cols = [("run", "run"), ("steps", "steps"), ("wall_s", "wall s"), ("steps_per_s", "steps/s (reports)"),
            ("loop_steps_per_s", "steps/s (loop)"), ("x_plain", "x plain"), ("x_plain_loop", "x plain (loop)"),
            ("fixed_s", "fixed start-up s")]
    tcols = [("trials", "trials"), ("trial_steps", "steps each"), ("trial_runner", "trial runner"),
             ("plain_trial_s", "plain trial s"), ("per_trial_s", "Tune s / trial"),
             ("per_trial_overhead_s", "overhead s / trial"), ("one_off_s", "one-off s (Ray, MLflow, summary)")]
    return "\n".join([
        f"### Benchmark `ray` ({result['size']})",
        "",
        machine_line(result["machine"]),
        "",
        f"`{s['method']}` on `{s['base']}`, batch {s['batch_size']} x {s['max_length']} tokens, {s['threads']} CPU(s) and "
        f"torch threads per worker, report (+ checkpoint) every {s['report_every']} steps; data: {s['data']}.",
        "",
        table(result["rows"], cols),
        "",
        f"Ray Train start-up: `ray.init` {st['init_s']:.1f} s, `fit()` {st['fit_s']:.1f} s (training included), "
        f"shutdown {st['shutdown_s']:.1f} s; fixed cost over the plain loop: {st['extra_fixed_s']:.1f} s.",
        "",
        "Tune sweep (`python -m lora_diffusion.tune`, one trial at a time, no early stopping):",
        "",
        table([tu], tcols),
        "",
        goals_table(result["goals"]),
    ])
