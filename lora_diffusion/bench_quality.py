"""quality: every method on real SST-2, same base and budget, several seeds.

1. Base: `--base FOLDER`, else one built by `python -m lora_diffusion.pretrain` from the offline
   BERT (`minilm`; `builtin:tiny` for --smoke): continued masked-diffusion training on the SST-2
   training sentences (text only, no instruction-format examples unless `--pretrain-sft-mix`), so it
   runs with no network. The base is the same for every method.
2. Every method is fine-tuned with the same budget (steps, batch, sequence length, data subset and
   order per seed) and its own learning rate (`LR` below, `--lr method=value` to change) by the
   project's training loop (`train.train_loop`, `LocalReporter`, no Ray), one process per method
   (--smoke: one for all).
3. The final adapter is reloaded from its checkpoint folder (`adapter.load_adapter`) and evaluated
   on the whole validation split (`evaluation.evaluate`): accuracy of the generated label word
   (an output that is no label word counts as wrong), the paper's token-level denoising accuracy,
   and the share of non-label outputs.

Reported per method: accuracy and denoising accuracy (mean ± std over seeds), trainable parameters
and %, training and evaluation wall time. Goals (issue 8): lora_diffusion accuracy >= 0.85 with
<= 2% trainable parameters (adapters + instruction encoder), within 3 points of full fine-tuning.
Data: `--data-dir` (or $LORA_DIFFUSION_DATA_DIR) with sst2/{train,validation}.jsonl; --smoke alone
falls back to a synthetic SST-2 folder (no real data: its accuracies mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lora_diffusion.bench import (
    BenchError, goal, goals_table, machine_info, machine_line, mean_std, resolve_data_dir, run_isolated, synthetic_sst2,
    table,
)
from lora_diffusion.config import METHOD_NAMES

# Learning rate per method: the usual order of magnitude for each family at a short budget.
LR = {"lora_diffusion": 2e-3, "weight_lora": 2e-3, "adapters": 1e-3, "prefix_tuning": 5e-3, "bitfit": 3e-3,
      "full_ft": 1e-4}

PRESETS = {
    "smoke": dict(base_model="builtin:tiny", pretrain_steps=4, pretrain_batch=8, max_length=48, batch_size=8, steps=6,
                  seeds=[0, 1], subset=64, eval_limit=None, threads=1, sampling_steps=2),
    "quick": dict(base_model="minilm", pretrain_steps=200, pretrain_batch=32, max_length=64, batch_size=16, steps=150,
                  seeds=[0, 1, 2], subset=4096, eval_limit=None, threads=2, sampling_steps=2),
    "full": dict(base_model="minilm", pretrain_steps=3000, pretrain_batch=64, max_length=128, batch_size=32, steps=2000,
                 seeds=[0, 1, 2], subset=None, eval_limit=None, threads=None, sampling_steps=4),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="local data folder with sst2/{train,validation}.jsonl (required unless --smoke)")
    p.add_argument("--base", help="a base folder (e.g. from python -m lora_diffusion.pretrain); default: build one")
    p.add_argument("--base-model", help="what the base is pretrained from (default minilm; builtin:tiny for --smoke)")
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--pretrain-sft-mix", type=float, default=0.0, help="pretrain --sft-mix (default 0: text only)")
    p.add_argument("--keep-base", help="copy the built base to this folder (reuse it with --base)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run (the same for every method)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--subset", type=int, help="training examples (a seeded subset of the train split)")
    p.add_argument("--eval-limit", type=int, help="validation examples (default: all 872)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="learning rate of one method")


def _settings(args: argparse.Namespace, size: str) -> dict[str, Any]:
    s = dict(PRESETS[size])
    for key in ("base_model", "pretrain_steps", "steps", "batch_size", "subset", "eval_limit"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.threads is not None:
        s["threads"] = args.threads
    if s["threads"] is None:
        s["threads"] = os.cpu_count() or 1
    if args.seeds:
        try:
            s["seeds"] = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise BenchError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if not s["seeds"]:
        raise BenchError("--seeds: give at least one seed")
    methods = list(METHOD_NAMES)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHOD_NAMES]
        if unknown or not methods:
            raise BenchError(f"--methods {args.methods!r}: unknown {', '.join(unknown)}; allowed: {', '.join(METHOD_NAMES)}")
    s["methods"] = methods
    lr = dict(LR)
    for item in args.lr:
        m, _, v = item.partition("=")
        if m not in METHOD_NAMES:
            raise BenchError(f"--lr {item!r}: unknown method {m!r}; allowed: {', '.join(METHOD_NAMES)}")
        try:
            lr[m] = float(v)
        except ValueError:
            raise BenchError(f"--lr {item!r}: {v!r} is not a number") from None
        if lr[m] <= 0:
            raise BenchError(f"--lr {item!r}: must be > 0")
    s["lr"] = {m: lr[m] for m in methods}
    for key in ("steps", "batch_size", "pretrain_steps"):
        if s[key] < 1:
            raise BenchError(f"--{key.replace('_', '-')} {s[key]}: must be >= 1")
    if not 0.0 <= args.pretrain_sft_mix < 1.0:
        raise BenchError(f"--pretrain-sft-mix {args.pretrain_sft_mix}: must be in [0, 1)")
    s["pretrain_sft_mix"] = args.pretrain_sft_mix
    s["device"] = args.device
    return s


# --------------------------------------------------------------------------- the base


def build_base(s: dict[str, Any], data_dir: str, out: Path) -> tuple[str, float]:
    """`python -m lora_diffusion.pretrain` on the SST-2 training sentences; (folder, wall seconds)."""
    cmd = [sys.executable, "-m", "lora_diffusion.pretrain", "--base", s["base_model"], "--data-dir", data_dir,
           "--tasks", "sst2", "--splits", "train", "--steps", str(s["pretrain_steps"]),
           "--batch-size", str(s["pretrain_batch"]), "--max-length", str(s["max_length"]), "--lr", "1e-4",
           "--seed", "0", "--threads", str(s["threads"]), "--device", s["device"], "--out", str(out),
           "--log-every", str(max(1, s["pretrain_steps"] // 10))]
    if s["pretrain_sft_mix"] > 0:
        cmd += ["--sft-mix", str(s["pretrain_sft_mix"])]
    print("[quality] building the base: " + " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:  # progress as it comes (loss, tokens/s)
        line = line.rstrip()
        if line and "Loading weights" not in line and "Writing model shards" not in line:
            print("[pretrain] " + line, flush=True)
            tail = (tail + [line])[-30:]
    if proc.wait() != 0:
        raise BenchError(f"pretrain failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return str(out), time.perf_counter() - t0


def _pretrain_note(folder: Path) -> str:
    """What a base folder's pretrain_metrics.jsonl says about how it was made (empty when absent)."""
    f = folder / "pretrain_metrics.jsonl"
    try:
        last = json.loads(f.read_text().strip().splitlines()[-1])
        return f" (pretrained {last['step']} steps, last loss {last['loss']:.2f}, masked accuracy {last['masked_acc']:.3f})"
    except (OSError, IndexError, KeyError, ValueError):
        return ""


# --------------------------------------------------------------------------- one method, its seeds (child process)


def train_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune `spec["method"]` once per seed, reload the final adapter, evaluate on the validation split."""
    import torch

    from lora_diffusion.adapter import load_adapter
    from lora_diffusion.config import load_config
    from lora_diffusion.evaluation import evaluate
    from lora_diffusion.reporting import LocalReporter
    from lora_diffusion.train import train_loop

    torch.set_num_threads(spec["threads"])
    runs = []
    for seed in spec["seeds"]:
        work = Path(tempfile.mkdtemp(prefix=f"lora_diffusion_quality_{spec['method']}_{seed}_", dir=spec["work"]))
        over = [f"model.base={spec['base']}", f"model.max_length={spec['max_length']}", "task.name=sst2",
                f"task.data_dir={spec['data_dir']}", f"task.cache_dir={Path(spec['work']) / 'cache'}",
                f"task.seed={seed}", f"method.name={spec['method']}", f"train.seed={seed}",
                f"train.lr={spec['lr']}", f"train.batch_size={spec['batch_size']}", f"train.max_steps={spec['steps']}",
                f"train.warmup_steps={max(1, spec['steps'] // 10)}", f"train.report_every={max(1, spec['steps'] // 2)}",
                "train.eval_at_end=false", f"train.torch_threads={spec['threads']}", f"train.cpus_per_worker={spec['threads']}",
                f"train.gpus_per_worker={1.0 if spec['device'].startswith('cuda') else 0.0}",
                f"train.output_dir={work}", f"sampling.steps={spec['sampling_steps']}", "tracking.enabled=false"]
        if spec.get("subset"):
            over.append(f"task.subset_size={spec['subset']}")
        if spec.get("eval_limit"):
            over.append(f"task.eval_subset_size={spec['eval_limit']}")
        cfg = load_config(None, over)
        reporter = LocalReporter(work / "checkpoints")
        t0 = time.perf_counter()
        train_loop({"config": cfg.to_dict(), "mlflow": None, "resume_from": None, "trial_name": f"{spec['method']}-{seed}"},
                   reporter)
        train_s = time.perf_counter() - t0
        last = reporter.reports[-1]
        t0 = time.perf_counter()
        adaptation, tokenizer, _ = load_adapter(str(reporter.checkpoints[-1] / "adapter"), base=spec["base"])
        if spec["device"].startswith("cuda"):
            adaptation.to(spec["device"])
        metrics, predictions = evaluate(adaptation, tokenizer, cfg)
        eval_s = time.perf_counter() - t0
        refs = Counter(p["reference"] for p in predictions)
        preds = Counter(p["prediction"] for p in predictions)
        runs.append({
            "seed": seed, "accuracy": float(metrics["accuracy"]) / 100.0, "denoise_acc": float(metrics["denoise_acc"]) / 100.0,
            "non_label_rate": float(metrics.get("non_label_rate", 0.0)) / 100.0, "n_eval": int(metrics.get("n_examples", 0)),
            "final_loss": float(last["loss"]), "trainable": int(last["trainable_params"]), "total": int(last["total_params"]),
            "train_s": train_s, "eval_s": eval_s, "steps_per_s": spec["steps"] / train_s,
            # collapse check: the share of the most frequent output, and what always answering the
            # most frequent reference would score
            "top_prediction": preds.most_common(1)[0][0], "top_prediction_share": preds.most_common(1)[0][1] / len(predictions),
            "majority_baseline": refs.most_common(1)[0][1] / len(predictions),
        })
        print(f"[quality] {spec['method']} seed {seed}: accuracy {runs[-1]['accuracy']:.3f}, denoise_acc "
              f"{runs[-1]['denoise_acc']:.3f}, {train_s:.0f} s training, {eval_s:.0f} s evaluation", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return {"method": spec["method"], "runs": runs}


def train_eval_many(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """`train_eval` for each of spec["methods"] in this one process (--smoke: saves a process start per method)."""
    return [train_eval({**spec, "method": m, "lr": spec["lr"][m]}) for m in spec["methods"]]


# --------------------------------------------------------------------------- the suite


def run(args: argparse.Namespace, size: str) -> dict[str, Any]:
    s = _settings(args, size)
    data_dir = resolve_data_dir(args.data_dir)
    if args.base and not (Path(args.base) / "config.json").is_file():
        raise BenchError(f"--base {args.base!r}: not a base folder (no config.json); build one with python -m lora_diffusion.pretrain")
    with tempfile.TemporaryDirectory(prefix="lora_diffusion_bench_quality_") as work:
        if data_dir is None:
            if size != "smoke":
                raise BenchError("quality needs real SST-2: give --data-dir (a folder with sst2/train.jsonl and "
                                 "sst2/validation.jsonl) or set LORA_DIFFUSION_DATA_DIR")
            data_dir, data_desc = str(synthetic_sst2(Path(work) / "data", 256, 64)), "synthetic SST-2 (smoke: not real data)"
        else:
            data_desc = f"SST-2 from {data_dir}"
        pretrain_s = 0.0
        if args.base:
            base = str(Path(args.base).resolve())
            base_desc = f"given folder {base}" + _pretrain_note(Path(base))
        else:
            base, pretrain_s = build_base(s, data_dir, Path(work) / "base")
            base_desc = (f"pretrain from {s['base_model']}: {s['pretrain_steps']} steps x {s['pretrain_batch']} x "
                         f"{s['max_length']} tokens of SST-2 train sentences (sft-mix {s['pretrain_sft_mix']})"
                         + _pretrain_note(Path(base)))
            if args.keep_base:
                shutil.copytree(base, args.keep_base, dirs_exist_ok=True)
                base_desc += f", kept in {args.keep_base}"
        common = {**s, "base": base, "data_dir": data_dir, "work": work}
        if size == "smoke":
            results = run_isolated("lora_diffusion.bench_quality:train_eval_many", common, timeout=3600, stream=True)
        else:
            results = [run_isolated("lora_diffusion.bench_quality:train_eval", {**common, "method": m, "lr": s["lr"][m]},
                                    timeout=6 * 3600, stream=True) for m in s["methods"]]

    rows = []
    for r in results:
        runs = r["runs"]
        acc, acc_sd = mean_std([x["accuracy"] for x in runs])
        dacc, dacc_sd = mean_std([x["denoise_acc"] for x in runs])
        nl, _ = mean_std([x["non_label_rate"] for x in runs])
        rows.append({
            "method": r["method"], "lr": s["lr"][r["method"]], "accuracy": acc, "accuracy_std": acc_sd,
            "denoise_acc": dacc, "denoise_acc_std": dacc_sd, "non_label_rate": nl,
            "trainable": runs[0]["trainable"], "total": runs[0]["total"],
            "trainable_pct": 100.0 * runs[0]["trainable"] / max(1, runs[0]["total"]),
            "train_s": mean_std([x["train_s"] for x in runs])[0], "eval_s": mean_std([x["eval_s"] for x in runs])[0],
            "n_eval": runs[0]["n_eval"], "seeds": [x["seed"] for x in runs], "per_seed_accuracy": [x["accuracy"] for x in runs],
            "top_prediction_share": mean_std([x["top_prediction_share"] for x in runs])[0],
            "top_predictions": [x["top_prediction"] for x in runs], "majority_baseline": runs[0]["majority_baseline"],
        })
    by = {r["method"]: r for r in rows}
    goals = []
    if "lora_diffusion" in by:
        ld = by["lora_diffusion"]
        goals += [goal("lora_diffusion accuracy >= 0.85", ld["accuracy"], 0.85, ">="),
                  goal("lora_diffusion trainable parameters <= 2% (adapters + instruction encoder)", ld["trainable_pct"], 2.0)]
        if "full_ft" in by:
            goals.append(goal("lora_diffusion within 3 points of full fine-tuning (full FT acc - LoRA-Diffusion acc)",
                              by["full_ft"]["accuracy"] - ld["accuracy"], 0.03))
    return {
        "machine": machine_info(s["device"], s["threads"]),
        "settings": {**s, "data": data_desc, "base": base_desc, "pretrain_s": pretrain_s},
        "rows": rows,
        "goals": goals,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = [{**r, "acc": f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}",
             "dacc": f"{r['denoise_acc']:.3f} ± {r['denoise_acc_std']:.3f}"} for r in result["rows"]]
    cols = [("method", "method"), ("lr", "lr"), ("acc", "accuracy (mean ± std)"), ("dacc", "denoising acc"),
            ("non_label_rate", "non-label outputs"), ("top_prediction_share", "most frequent output"),
            ("trainable", "trainable"), ("trainable_pct", "trainable %"),
            ("train_s", "train s / run"), ("eval_s", "eval s / run")]
    n_eval = result["rows"][0]["n_eval"] if result["rows"] else 0
    return "\n".join([
        f"### Benchmark `quality` ({result['size']})",
        "",
        machine_line(result["machine"]),
        "",
        f"Data: {s['data']}; base: {s['base']} ({s['pretrain_s']:.0f} s). Every method: {s['steps']} steps x batch "
        f"{s['batch_size']} x {s['max_length']} tokens" + (f" on a {s['subset']}-example training subset" if s.get("subset") else "")
        + f", seeds {', '.join(map(str, s['seeds']))}; evaluated on {n_eval} validation examples, {s['sampling_steps']} "
        "reverse steps, accuracy of the generated label word"
        + (f"; always answering the majority label scores {result['rows'][0]['majority_baseline']:.3f}." if result["rows"] else "."),
        "",
        table(rows, cols),
        "",
        goals_table(result["goals"]),
    ])
