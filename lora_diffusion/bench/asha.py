"""asha: the same sweep with ASHA early stopping and without: trained steps and best objective.

Two runs of `python -m lora_diffusion.tune` (each in a fresh process, fresh Ray cluster and
MLflow store) on the same space, seed and trial count: learning rate (log scale) and the number
of LoRA-Diffusion modules per phase, objective `val_loss` (the denoising loss on a fixed validation
subset with fixed noise, measured at every report), trials one at a time. The sampler is seeded
random search so that both runs train exactly the same configurations in the same order (checked
and reported): the only difference is ASHA (grace period 1 report, reduction factor 2).

Reported per run: total trained steps (sum of each trial's last step), trials stopped early, best
objective (best finished trial), wall time. Goal (issue 8): the same best within noise for <= 0.5x
the steps. "Within noise" is taken as: ASHA's best val_loss at most 2% above the full sweep's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from lora_diffusion.bench.common import (
    BenchError, goal, goals_table, heading, machine_info, prepare_data, run_isolated, table, with_options,
)
from lora_diffusion.bench.ray_overhead import tune_sweep

NAME = "asha"

NOISE_REL = 0.02

PRESETS = {
    "smoke": dict(base="builtin:tiny", max_length=48, batch_size=8, trials=3, trial_steps=6, trial_report_every=2,
                  val_examples=32, subset=128, threads=1),
    "quick": dict(base="minilm", max_length=64, batch_size=16, trials=16, trial_steps=30, trial_report_every=5,
                  val_examples=128, subset=2048, threads=2),
    "full": dict(base="minilm", max_length=128, batch_size=32, trials=16, trial_steps=200, trial_report_every=20,
                 val_examples=512, subset=None, threads=None),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="model.base (default: builtin:tiny for --smoke, minilm otherwise)")
    p.add_argument("--data-dir", help="local data folder with sst2/{train,validation}.jsonl (default: synthetic)")
    p.add_argument("--trials", type=int, help="trials per sweep")
    p.add_argument("--trial-steps", type=int, help="training steps of a full trial")
    p.add_argument("--report-every", type=int, dest="trial_report_every", help="steps between reports (ASHA rungs)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (both sweeps)")


def run(args: argparse.Namespace, size: str) -> dict[str, Any]:
    s = with_options(PRESETS[size], args, ("base", "trials", "trial_steps", "trial_report_every"),
                     positive=("trials", "trial_steps", "trial_report_every"))
    if s["threads"] is None:
        s["threads"] = max(1, (os.cpu_count() or 2) - 1)
    if s["trial_steps"] < 2 * s["trial_report_every"]:
        raise BenchError(f"--trial-steps {s['trial_steps']} / --report-every {s['trial_report_every']}: ASHA needs at "
                         "least 2 reports per trial")
    s.update(method="lora_diffusion", device=args.device, gpus_per_worker=1.0 if args.device.startswith("cuda") else 0.0,
             seed=args.seed, steps=s["trial_steps"], report_every=s["trial_report_every"])
    params = {"train.lr": {"type": "log_float", "low": 1e-5, "high": 3e-2},
              "method.lora_diffusion.k": {"type": "int", "low": 1, "high": 2}}
    extra = {"train.eval_every": s["trial_report_every"], "train.val_examples": s["val_examples"]}
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lora_diffusion_bench_asha_") as work:
        data_dir, data_desc = prepare_data(args, work, size)
        for name, scheduler in (("none", {"name": "none"}),
                                ("asha", {"name": "asha", "metric": "val_loss", "mode": "min", "grace_period": 1,
                                          "reduction_factor": 2})):
            print(f"[asha] sweep with scheduler={name}: {s['trials']} trials …", flush=True)
            spec = {**s, "work": work, "data_dir": data_dir, "sweep_name": f"bench-asha-{name}", "params": params,
                    "metric": "val_loss", "mode": "min", "scheduler": scheduler, "extra_overrides": extra}
            t0 = time.perf_counter()
            runs[name] = run_isolated(f"{tune_sweep.__module__}:{tune_sweep.__name__}", spec)
            print(f"[asha] {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for name, r in runs.items():
        trials = r["best"]["trials"]
        best = r["best"]["best"]
        bad = [t for t in trials if t["state"] == "FAILED"]
        if bad:
            raise BenchError(f"sweep {name}: {len(bad)} trial(s) failed: {bad[0]['error']}")
        if best is None:
            raise BenchError(f"sweep {name}: no finished trial with a finite objective")
        rows.append({
            "scheduler": name, "trials": len(trials),
            "finished": sum(1 for t in trials if t["state"] == "FINISHED"),
            "stopped_early": sum(1 for t in trials if t["state"] == "PRUNED"),
            "trained_steps": int(sum(int(t["step"] or 0) for t in trials)),
            "best_objective": float(best["objective"]), "best_lr": float(best["params"]["train.lr"]),
            "tuner_fit_s": r["fit_s"], "wall_s": r["wall_s"],
        })
    none, asha = rows
    sig = [sorted(t["params"].items()) for t in runs["none"]["best"]["trials"]]
    sig_asha = [sorted(t["params"].items()) for t in runs["asha"]["best"]["trials"]]
    same = sorted(map(str, sig)) == sorted(map(str, sig_asha))
    step_ratio = asha["trained_steps"] / max(1, none["trained_steps"])
    best_ratio = asha["best_objective"] / none["best_objective"]
    goals = [
        goal("ASHA trains <= 0.5x the steps of the full sweep", step_ratio, 0.5),
        goal(f"ASHA's best val_loss within noise of the full sweep's (ratio <= {1 + NOISE_REL})", best_ratio, 1 + NOISE_REL,
             note=f"best val_loss: ASHA {asha['best_objective']:.4f}, full {none['best_objective']:.4f}"),
    ]
    return {
        "machine": machine_info(s["device"], s["threads"]),
        "settings": {**{k: v for k, v in s.items() if k not in ("steps", "report_every")}, "data": data_desc,
                     "params": params, "same_configs": same},
        "rows": rows,
        "step_ratio": step_ratio,
        "best_ratio": best_ratio,
        "goals": goals,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    cols = [("scheduler", "scheduler"), ("trials", "trials"), ("finished", "finished"), ("stopped_early", "stopped early"),
            ("trained_steps", "trained steps"), ("best_objective", "best val_loss"), ("best_lr", "best lr"),
            ("tuner_fit_s", "Tuner.fit s"), ("wall_s", "command s")]
    return "\n".join([
        *heading(result),
        f"`lora_diffusion` on `{s['base']}`, {s['trials']} trials of {s['trial_steps']} steps (report + val_loss every "
        f"{s['trial_report_every']} steps on {s['val_examples']} validation examples), batch {s['batch_size']}, "
        f"seeded random search over {', '.join(s['params'])}; same configurations in both sweeps: "
        f"{'yes' if s['same_configs'] else 'NO'}; data: {s['data']}.",
        "",
        table(result["rows"], cols),
        "",
        f"ASHA / full: {result['step_ratio']:.2f}x the steps, best val_loss ratio {result['best_ratio']:.3f}.",
        "",
        goals_table(result["goals"]),
    ])
