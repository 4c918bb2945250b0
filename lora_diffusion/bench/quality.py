"""quality: every method on a real task, same base and budget, several seeds: generated-text metrics.

1. Base: `--base FOLDER_OR_NAME` (a folder from `python -m lora_diffusion.pretrain`, `minilm`, a Hub
   name), else the preset's: `minilm` as it is for --quick (measured: it needs no pretraining to
   learn SST-2), or one built by `python -m lora_diffusion.pretrain` when `--pretrain-steps N` > 0.
   The base is the same for every method.
2. Every method is fine-tuned with the same budget (steps, batch, sequence length, data subset and
   order per seed, unweighted masked-diffusion loss, precision: `--precision`, for --quick bf16 autocast
   where the CPU computes bf16 natively, `precision.resolve`) and its own learning rate (`LR` below,
   `--lr method=value` to change) by the project's training loop (`train.train_loop`, `LocalReporter`,
   no Ray), one process per (method, seed) run, `--jobs` of them at a time (--smoke: one process for all).
3. The final adapter is reloaded from its checkpoint folder (`adapter.load_adapter`) and evaluated
   on the validation split (`scoring.evaluate`, the same evaluation for every method).

SST-2 (`--task sst2`, the default) reports per method, mean ± std over seeds: accuracy of the
generated label word (an output that is no label word counts as wrong), rank-classification accuracy
(the likelier label word at t = 1), the share of non-label outputs and of the most frequent output
(collapse check), the paper's token-level denoising accuracy and the same on content tokens only,
trainable parameters and %, train and eval seconds, and the paired t-test over seeds of each method
against lora_diffusion (`lora_diffusion.stats`). Reference rows: always answering the majority label,
and a logistic-regression probe on the frozen base's final hidden state at the label position
(whole span masked, t = 1; and on the mean-pooled prompt): what a linear read-out of the frozen
base can reach. SQuAD (`--task squad`: EM, F1) and XSum (`--task xsum`: ROUGE-1/2/L) report the
generated text's scores beside a trivial baseline (SQuAD: the context sentence sharing most words
with the question; XSum: the article's first sentence, lead-1).

Data: `--data-dir` (or $LORA_DIFFUSION_DATA_DIR) with <task>/{train,validation}.jsonl; --smoke alone
falls back to a synthetic SST-2 folder (no real data: its accuracies mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lora_diffusion.bench.common import (
    BenchError, goal, goals_table, heading, int_list, kill_children, machine_info, resolve_data_dir, run_isolated,
    synthetic_sst2, table, with_options,
)
from lora_diffusion.config import METHOD_NAMES
from lora_diffusion.methods import METHODS
from lora_diffusion import precision as amp
from lora_diffusion.stats import ci95, mean_std, paired_bootstrap, paired_t_test
from lora_diffusion.tasks import TASKS

NAME = "quality"

# Learning rate per method at this budget (unweighted loss, batch 16, a few hundred steps): each method's
# default_lr, declared where it registers (methods/<name>_settings.py).
LR = {name: method.default_lr for name, method in METHODS.items()}

# What else each method's runs set at this budget. LoRA-Diffusion without its rank and orthogonality penalties:
# measured on real SST-2 at this budget they make no difference that 3 seeds can show (generated accuracy of
# seeds 0, 1, 2: 0.749, 0.732, 0.511 with the defaults 1e-4 / 1e-3; 0.741, 0.758, 0.511 without), so the row
# measures the adapter alone. The search spaces keep searching them.
RECIPE = {"lora_diffusion": ["method.lora_diffusion.lambda_rank=0", "method.lora_diffusion.lambda_orth=0"]}

# What each task reports (metric keys of evaluation.evaluate, as fractions) and the one the goals use.
TASK_METRICS = {
    "sst2": ("accuracy", "rank_accuracy", "non_label_rate", "denoise_acc", "denoise_acc_content"),
    "squad": ("exact_match", "f1", "denoise_acc", "denoise_acc_content"),
    "xsum": ("rouge1", "rouge2", "rougeL", "denoise_acc", "denoise_acc_content"),
}
HEADLINE = {name: task.headline for name, task in TASKS.items()}  # declared on each Task

# Training seconds per run measured at the --quick budget (3-seed table, 2026-12-02, bf16, 2 runs at a time x 1 thread):
# run_all starts the longest runs first, so the short ones fill the end instead of one long run alone on a
# core (that run left a core idle for 8 min). A method not listed (a new one) starts first: its cost is unknown.
RUN_COST_S = {"full_ft": 533, "adapters": 295, "weight_lora": 284, "prefix_tuning": 266, "bitfit": 230,
              "lora_diffusion": 99}

PRESETS = {
    "smoke": dict(base_model="builtin:tiny", pretrain_steps=0, pretrain_batch=8, max_length=48, batch_size=8, steps=6,
                  seeds=[0, 1], subset=64, eval_limit=None, threads=1, jobs=1, sampling_steps=2, precision="fp32"),
    "quick": dict(base_model="minilm", pretrain_steps=0, pretrain_batch=32, max_length=64, batch_size=16, steps=500,
                  seeds=[0, 1, 2], subset=4096, eval_limit=None, threads=1, jobs=2, sampling_steps=1, precision="auto"),
    "full": dict(base_model="minilm", pretrain_steps=0, pretrain_batch=64, max_length=128, batch_size=32, steps=2000,
                 seeds=[0, 1, 2], subset=None, eval_limit=None, threads=None, jobs=1, sampling_steps=1, precision="auto"),
}
# Per task: what replaces the SST-2 preset for --quick (about 30 min for all six methods on 2 cores: one
# seed, 200 steps of batch 8 over longer sequences, 200 validation examples generated).
TASK_SIZES = {"squad": dict(max_length=192, sampling_steps=8, eval_limit=200, subset=2048, seeds=[0], steps=200,
                            batch_size=8),
              "xsum": dict(max_length=256, sampling_steps=16, eval_limit=200, subset=2048, seeds=[0], steps=200,
                           batch_size=8)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="sst2", choices=sorted(TASK_METRICS), help="sst2 (default), squad or xsum")
    p.add_argument("--data-dir", help="local data folder with <task>/{train,validation}.jsonl (required unless --smoke)")
    p.add_argument("--base", help="a base folder (from python -m lora_diffusion.pretrain), minilm or a Hub name")
    p.add_argument("--base-model", help="what the base is (or is pretrained from): default minilm; builtin:tiny for --smoke")
    p.add_argument("--pretrain-steps", type=int, help="> 0: build the base with python -m lora_diffusion.pretrain first")
    p.add_argument("--pretrain-sft-mix", type=float, default=0.0, help="pretrain --sft-mix (default 0: text only)")
    p.add_argument("--keep-base", help="copy the built base to this folder (reuse it with --base)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run (the same for every method)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--subset", type=int, help="training examples (a seeded subset of the train split)")
    p.add_argument("--eval-limit", type=int, help="validation examples (default: all 872 for sst2)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="learning rate of one method")
    p.add_argument("--jobs", type=int, help="runs (method, seed) at once, each in its own process with --threads "
                   "torch threads (quick: 2 jobs x 1 thread, measured faster on 2 cores than 1 x 2)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="training and evaluation precision of every run (quick/full: auto = bf16 autocast where the "
                   "device computes bf16 natively (a CPU with AMX or AVX-512 BF16, a bf16 GPU), else fp32; smoke: fp32)")
    p.add_argument("--no-probe", action="store_true", help="sst2: skip the linear-probe reference row")
    p.add_argument("--curve-every", type=int, help="also score the checkpoint of every N steps on the same validation "
                   "examples: a learning curve per run (each point costs one evaluation)")


def _positive_int(flag: str, text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise BenchError(f"{flag} {text!r}: expected an integer") from None
    if v < 1:
        raise BenchError(f"{flag} {v}: must be >= 1")
    return v


def _settings(args: argparse.Namespace, size: str) -> dict[str, Any]:
    preset = dict(PRESETS[size])
    if args.task != "sst2" and size == "quick":
        preset.update(TASK_SIZES[args.task])
    elif args.task != "sst2" and size == "full":  # the full budget, at the task's lengths and sampler steps
        preset.update({k: TASK_SIZES[args.task][k] for k in ("max_length", "sampling_steps")})
    if args.pretrain_steps is not None and args.pretrain_steps < 0:
        raise BenchError(f"--pretrain-steps {args.pretrain_steps}: must be >= 1 (or 0: no pretraining)")
    s = with_options({**preset, "curve_every": None}, args,
                     ("base_model", "pretrain_steps", "steps", "batch_size", "subset", "eval_limit", "jobs", "curve_every"),
                     positive=("steps", "batch_size", "subset", "eval_limit", "jobs", "curve_every"))
    if s["curve_every"] is not None and s["curve_every"] > s["steps"]:
        raise BenchError(f"--curve-every {s['curve_every']}: must be <= --steps ({s['steps']})")
    s["task"] = args.task
    if s["threads"] is None:
        s["threads"] = os.cpu_count() or 1
    if args.seeds:
        s["seeds"] = int_list("--seeds", args.seeds)
    if not s["seeds"]:
        raise BenchError("--seeds: give at least one seed")
    if len(set(s["seeds"])) != len(s["seeds"]):
        raise BenchError(f"--seeds {args.seeds!r}: a seed is repeated")
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
        if not lr[m] > 0:
            raise BenchError(f"--lr {item!r}: must be > 0")
    s["lr"] = {m: lr[m] for m in methods}
    if not 0.0 <= args.pretrain_sft_mix < 1.0:
        raise BenchError(f"--pretrain-sft-mix {args.pretrain_sft_mix}: must be in [0, 1)")
    s["pretrain_sft_mix"] = args.pretrain_sft_mix
    s["device"] = args.device
    precision = args.precision or s["precision"]
    if precision == "bf16" and not amp.native_bf16(args.device):
        print(f"[quality] --precision bf16 on {args.device}: this device has no native bf16 (CPU: AMX or AVX-512 BF16), "
              "so it is emulated and slower than fp32", flush=True)
    s["precision"] = amp.resolve(precision, args.device)
    s["probe"] = args.task == "sst2" and not args.no_probe
    return s


# --------------------------------------------------------------------------- the base


def build_base(s: dict[str, Any], data_dir: str, out: Path) -> tuple[str, float]:
    """`python -m lora_diffusion.pretrain` on the task's training text; (folder, wall seconds)."""
    cmd = [sys.executable, "-m", "lora_diffusion.pretrain", "--base", s["base_model"], "--data-dir", data_dir,
           "--tasks", s["task"], "--splits", "train", "--steps", str(s["pretrain_steps"]),
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


def _run_config(spec: dict[str, Any], seed: int, work: Path):
    from lora_diffusion.config import load_config

    over = [f"model.base={spec['base']}", f"model.max_length={spec['max_length']}", f"task.name={spec['task']}",
            f"task.data_dir={spec['data_dir']}", f"task.cache_dir={Path(spec['work']) / 'cache'}",
            f"task.seed={seed}", f"method.name={spec['method']}", f"train.seed={seed}",
            f"train.lr={spec['lr']}", f"train.batch_size={spec['batch_size']}", f"train.max_steps={spec['steps']}",
            f"train.warmup_steps={max(1, spec['steps'] // 10)}",
            f"train.report_every={spec.get('curve_every') or max(1, spec['steps'] // 2)}",
            "train.eval_at_end=false", f"train.torch_threads={spec['threads']}", f"train.cpus_per_worker={spec['threads']}",
            f"train.gpus_per_worker={1.0 if spec['device'].startswith('cuda') else 0.0}", "diffusion.loss_weighting=none",
            f"train.output_dir={work}", f"sampling.steps={spec['sampling_steps']}", "tracking.enabled=false",
            f"train.precision={spec.get('precision', 'fp32')}"]
    over += RECIPE.get(spec["method"], [])
    if spec.get("subset"):
        over.append(f"task.subset_size={spec['subset']}")
    if spec.get("eval_limit"):
        over.append(f"task.eval_subset_size={spec['eval_limit']}")
    return load_config(None, over)


def train_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune `spec["method"]` once per seed, reload the final adapter, evaluate on the validation split."""
    import torch

    from lora_diffusion.train_reporters import LocalReporter
    from lora_diffusion.train import train_loop

    torch.set_num_threads(spec["threads"])
    runs = []
    for seed in spec["seeds"]:
        work = Path(tempfile.mkdtemp(prefix=f"lora_diffusion_quality_{spec['method']}_{seed}_", dir=spec["work"]))
        cfg = _run_config(spec, seed, work)
        reporter = LocalReporter(work / "checkpoints")
        t0 = time.perf_counter()
        train_loop({"config": cfg.to_dict(), "mlflow": None, "resume_from": None, "trial_name": f"{spec['method']}-{seed}"},
                   reporter)
        train_s = time.perf_counter() - t0
        last = reporter.reports[-1]
        t0 = time.perf_counter()
        metrics, predictions = score_checkpoint(spec, cfg, reporter.checkpoints[-1])
        eval_s = time.perf_counter() - t0
        refs = Counter(p["reference"] for p in predictions)
        preds = Counter(p["prediction"] for p in predictions)
        run = {
            "seed": seed, "n_eval": int(metrics.get("n_examples", 0)),
            "final_loss": float(last["loss"]), "trainable": int(last["trainable_params"]), "total": int(last["total_params"]),
            "train_s": train_s, "eval_s": eval_s, "steps_per_s": spec["steps"] / train_s,
            # collapse check: the share of the most frequent output, and what always answering the
            # most frequent reference would score
            "top_prediction": preds.most_common(1)[0][0], "top_prediction_share": preds.most_common(1)[0][1] / len(predictions),
            "majority_baseline": refs.most_common(1)[0][1] / len(predictions),
            "examples": [{k: p[k] for k in ("reference", "prediction", "rank_prediction") if k in p} for p in predictions[:3]],
        }
        for key in TASK_METRICS[spec["task"]]:
            run[key] = float(metrics.get(key, float("nan"))) / 100.0
        if spec.get("curve_every"):
            run["curve"] = curve(spec, cfg, reporter, run)
        if "rank_accuracy" in metrics:  # per-example correctness, for paired tests over examples
            run["correct"] = [int(p["prediction"].strip().lower() in {r.lower() for r in p["references"]}) for p in predictions]
            run["rank_correct"] = [int(p["rank_prediction"] in p["references"]) for p in predictions]
        runs.append(run)
        head = HEADLINE[spec["task"]]
        print(f"[quality] {spec['method']} seed {seed}: {head} {run[head]:.3f}"
              + (f", rank accuracy {run['rank_accuracy']:.3f}, non-label {run['non_label_rate']:.3f}" if "rank_accuracy" in run else "")
              + f", denoise_acc {run['denoise_acc']:.3f}, {train_s:.0f} s training, {eval_s:.0f} s evaluation", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return {"method": spec["method"], "runs": runs}


def score_checkpoint(spec: dict[str, Any], cfg, folder: Path) -> tuple[dict[str, float], list[dict]]:
    """(metrics, predictions) of the adapter in a checkpoint folder, reloaded as a user would (`load_adapter`)."""
    from lora_diffusion.adapter import load_adapter
    from lora_diffusion.scoring import evaluate

    adaptation, tokenizer, _ = load_adapter(str(folder / "adapter"), base=spec["base"])
    if spec["device"].startswith("cuda"):
        adaptation.to(spec["device"])
    return evaluate(adaptation, tokenizer, cfg)


def curve(spec: dict[str, Any], cfg, reporter, final: dict[str, Any]) -> list[dict[str, Any]]:
    """The learning curve of one run: every kept checkpoint before the last scored like the final adapter
    (same examples and sampler), then the final run's own figures (`final`, scored already). Points: step,
    loss and the task's metrics."""
    keys = [k for k in TASK_METRICS[spec["task"]] if not k.startswith("denoise")]
    points = []
    for report, folder in list(zip(reporter.reports, reporter.checkpoints))[:-1]:
        metrics, _ = score_checkpoint(spec, cfg, folder)
        points.append({"step": int(report["step"]), "loss": float(report["loss"]),
                       **{k: float(metrics[k]) / 100.0 for k in keys if k in metrics}})
        print(f"[quality] {spec['method']} seed {spec['seeds'][0]} step {points[-1]['step']}: "
              + ", ".join(f"{k} {points[-1][k]:.3f}" for k in keys if k in points[-1]), flush=True)
    points.append({"step": spec["steps"], "loss": final["final_loss"], **{k: final[k] for k in keys}})
    return points


def run_all(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (method, seed) run of spec["methods"] x spec["seeds"], spec["jobs"] at a time, each in its own
    process (`train_eval`), the longest first (`RUN_COST_S`); the results grouped per method in the order
    given. A failed run stops the rest."""
    def one(method: str, seed: int) -> dict[str, Any]:
        return run_isolated(f"{__name__}:train_eval", {**spec, "method": method, "lr": spec["lr"][method], "seeds": [seed]},
                            timeout=6 * 3600, stream=True)

    with ThreadPoolExecutor(max_workers=spec["jobs"]) as pool:
        longest_first = sorted(spec["methods"], key=lambda m: -RUN_COST_S.get(m, float("inf")))  # stable: ties keep order
        futures = {(m, seed): pool.submit(one, m, seed) for m in longest_first for seed in spec["seeds"]}
        try:
            done = {key: f.result() for key, f in futures.items()}
        except BaseException:
            for f in futures.values():
                f.cancel()
            kill_children()
            raise
    return [{"method": m, "runs": [done[(m, seed)]["runs"][0] for seed in spec["seeds"]]} for m in spec["methods"]]


def train_eval_many(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """`train_eval` for each of spec["methods"] in this one process (--smoke: saves a process start per method)."""
    return [train_eval({**spec, "method": m, "lr": spec["lr"][m]}) for m in spec["methods"]]


# --------------------------------------------------------------------------- reference rows


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Probes on the frozen base (no adapter): what a classifier on its features reaches.

    The batch is the training layout (whole target span masked, t = 1); features are the base's final
    hidden states, standardised. Logistic regression (C = 1.0) on the label position and on the mean
    prompt; an MLP (one hidden layer of 256, early stopping) on both together, which is what
    LoRA-Diffusion's delta sees (h at the label position, c from the pooled prompt). Trained on the
    training subset of the first seed, scored on the whole validation split. Child process.
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lora_diffusion.data import collator_for, make_dataset
    from lora_diffusion.model import load_base

    torch.set_num_threads(spec["threads"])
    cfg = _run_config({**spec, "method": "lora_diffusion", "lr": 1e-3}, spec["seeds"][0], Path(spec["work"]))
    denoiser, tokenizer = load_base(cfg.model, seed=0)
    denoiser.eval()
    collate = collator_for(cfg, tokenizer)
    labels = {w: i for i, w in enumerate(TASKS[cfg.task.name].label_words)}

    def features(split: str):
        ds = make_dataset(cfg, tokenizer, split)
        at_label, pooled, y = [], [], []
        with torch.no_grad():
            for start in range(0, len(ds), 64):
                idx = range(start, min(start + 64, len(ds)))
                b = collate([ds[i] for i in idx])
                target = b["target_mask"].bool()
                x = b["input_ids"].masked_fill(target, tokenizer.mask_token_id)
                h = denoiser.hidden(x, torch.ones(x.shape[0]), b["attention_mask"])
                first = target.to(torch.int8).argmax(1)
                at_label.append(h[torch.arange(x.shape[0]), first].numpy())
                prompt = (b["attention_mask"].bool() & ~target).unsqueeze(-1).float()
                pooled.append(((h * prompt).sum(1) / prompt.sum(1)).numpy())
                y += [labels[ds.references(i)[0]] for i in idx]
        return np.concatenate(at_label), np.concatenate(pooled), np.array(y)

    t0 = time.perf_counter()
    tr_label, tr_pool, y_tr = features(cfg.task.train_split)
    va_label, va_pool, y_va = features(cfg.task.eval_split)
    out = {"n_train": int(len(y_tr)), "n_eval": int(len(y_va))}
    for name, (a, b) in {"label_position": (tr_label, va_label), "mean_prompt": (tr_pool, va_pool)}.items():
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(a, y_tr)
        out[name] = float((clf.predict(b) == y_va).mean())
    mlp = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(256,), early_stopping=True, max_iter=300,
                                                        random_state=0))
    mlp.fit(np.concatenate([tr_label, tr_pool], 1), y_tr)
    out["mlp_both"] = float((mlp.predict(np.concatenate([va_label, va_pool], 1)) == y_va).mean())
    out["seconds"] = time.perf_counter() - t0
    print(f"[quality] linear probe on the frozen base: label position {out['label_position']:.3f}, "
          f"mean prompt {out['mean_prompt']:.3f}; MLP on both {out['mlp_both']:.3f} ({out['seconds']:.0f} s)", flush=True)
    return out


_SENT = re.compile(r"(?<=[.!?])\s+")


def trivial_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The trivial answer's scores on the validation examples (squad: best-overlap context sentence; xsum: lead-1)."""
    import torch

    from lora_diffusion.data import make_dataset
    from lora_diffusion.model import load_base

    torch.set_num_threads(1)
    cfg = _run_config({**spec, "method": "lora_diffusion", "lr": 1e-3}, spec["seeds"][0], Path(spec["work"]))
    _, tokenizer = load_base(cfg.model, seed=0)
    ds = make_dataset(cfg, tokenizer, cfg.task.eval_split)
    preds, refs = [], []
    for i in range(len(ds)):
        ex = ds.example(i)
        refs.append(ds.task.references(ex))
        text = ds.task.input_text(ex)
        sentences = [x for x in _SENT.split(text.strip()) if x] or [""]
        if spec["task"] == "xsum":
            preds.append(sentences[0])
        else:
            q = set(re.findall(r"\w+", str(ex.get("question", "")).lower()))
            preds.append(max(sentences, key=lambda x: len(q & set(re.findall(r"\w+", x.lower())))))
    metrics = ds.task.compute_metrics(preds, refs)
    return {"name": "lead-1 (first sentence)" if spec["task"] == "xsum" else "best-overlap context sentence",
            **{k: float(metrics[k]) / 100.0 for k in TASK_METRICS[spec["task"]] if k in metrics}, "n_eval": len(preds)}


# --------------------------------------------------------------------------- the suite


def _resolve_base(args: argparse.Namespace, s: dict[str, Any], data_dir: str, work: str) -> tuple[str, str, float]:
    """(base for every run, its description, pretraining seconds)."""
    if args.base:
        if Path(args.base).exists():
            if not (Path(args.base) / "config.json").is_file():
                raise BenchError(f"--base {args.base!r}: not a base folder (no config.json); build one with "
                                 "python -m lora_diffusion.pretrain")
            base = str(Path(args.base).resolve())
            return base, f"given folder {base}" + _pretrain_note(Path(base)), 0.0
        return args.base, f"{args.base} as it is (no pretraining)", 0.0
    if s["pretrain_steps"] == 0:
        return s["base_model"], f"{s['base_model']} as it is (no pretraining)", 0.0
    base, pretrain_s = build_base(s, data_dir, Path(work) / "base")
    desc = (f"pretrain from {s['base_model']}: {s['pretrain_steps']} steps x {s['pretrain_batch']} x "
            f"{s['max_length']} tokens of {s['task']} train text (sft-mix {s['pretrain_sft_mix']})" + _pretrain_note(Path(base)))
    if args.keep_base:
        shutil.copytree(base, args.keep_base, dirs_exist_ok=True)
        desc += f", kept in {args.keep_base}"
    return base, desc, pretrain_s


def _row(method: str, lr: float, runs: list[dict[str, Any]], task: str) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "lr": lr, "seeds": [x["seed"] for x in runs], "n_eval": runs[0]["n_eval"],
                           "trainable": runs[0]["trainable"], "total": runs[0]["total"],
                           "trainable_pct": 100.0 * runs[0]["trainable"] / max(1, runs[0]["total"]),
                           "train_s": mean_std([x["train_s"] for x in runs])[0],
                           "eval_s": mean_std([x["eval_s"] for x in runs])[0],
                           "top_prediction_share": mean_std([x["top_prediction_share"] for x in runs])[0],
                           "top_predictions": [x["top_prediction"] for x in runs],
                           "majority_baseline": runs[0]["majority_baseline"], "examples": runs[0]["examples"]}
    for key in TASK_METRICS[task]:
        vals = [x[key] for x in runs]
        row[key], row[f"{key}_std"] = mean_std(vals)
        row[f"per_seed_{key}"] = vals
        if len(vals) > 1:
            row[f"{key}_ci95"] = list(ci95(vals))
    row["accuracy_per_seed"] = row.get("per_seed_accuracy")
    if all("curve" in x for x in runs):
        row["curves"] = {str(x["seed"]): x["curve"] for x in runs}
    return row


def run(args: argparse.Namespace, size: str) -> dict[str, Any]:
    started = time.perf_counter()
    s = _settings(args, size)
    data_dir = resolve_data_dir(args.data_dir, task=s["task"]) if s["task"] != "sst2" else resolve_data_dir(args.data_dir)
    task = s["task"]
    with tempfile.TemporaryDirectory(prefix="lora_diffusion_bench_quality_") as work:
        if data_dir is None:
            if size != "smoke" or task != "sst2":
                raise BenchError(f"quality needs real {task} data: give --data-dir (a folder with {task}/train.jsonl and "
                                 f"{task}/validation.jsonl) or set LORA_DIFFUSION_DATA_DIR")
            data_dir, data_desc = str(synthetic_sst2(Path(work) / "data", 256, 64)), "synthetic SST-2 (smoke: not real data)"
        else:
            data_desc = f"{task} from {data_dir}"
        base, base_desc, pretrain_s = _resolve_base(args, s, data_dir, work)
        common = {**s, "base": base, "data_dir": data_dir, "work": work}
        reference: dict[str, Any] = {}
        if task != "sst2":
            reference["trivial"] = run_isolated(f"{__name__}:trivial_baseline", common, timeout=3600)
        with ThreadPoolExecutor(max_workers=1) as beside:
            # the probe (one process, fp32, ~2 min) runs beside the first runs instead of before them all
            probed = beside.submit(run_isolated, f"{__name__}:probe", common, timeout=3600, stream=True) if s["probe"] else None
            t0 = time.perf_counter()
            if size == "smoke":
                results = run_isolated(f"{__name__}:train_eval_many", common, timeout=3600, stream=True)
            else:
                results = run_all(common)
            runs_s = time.perf_counter() - t0
            if probed is not None:
                reference["probe"] = probed.result()

    rows = [_row(r["method"], s["lr"][r["method"]], r["runs"], task) for r in results]
    # the runs' own seconds: with `jobs` at a time no schedule of these runs ends before work_s / jobs
    work_s = sum(x["train_s"] + x["eval_s"] for r in results for x in r["runs"])
    by = {r["method"]: r for r in rows}
    runs_by = {r["method"]: r["runs"] for r in results}
    head = HEADLINE[task]
    finite = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731  (JSON: no NaN)
    if "lora_diffusion" in by:  # paired over seeds: run i of every method shares seed i (data subset and order)
        ld = [x[head] for x in runs_by["lora_diffusion"]]
        for r in rows:
            if r["method"] != "lora_diffusion":
                test = paired_t_test([x[head] for x in runs_by[r["method"]]], ld)
                r["vs_lora_diffusion"] = {k: finite(test[k]) for k in ("mean_diff", "t", "p", "n", "reason") if k in test}
                r["p_vs_ld"] = finite(test["p"])
                if "correct" in runs_by["lora_diffusion"][0]:
                    # paired bootstrap over validation examples, each example's correctness averaged over the seeds
                    per_example = lambda runs: [sum(c) / len(c) for c in zip(*(x["correct"] for x in runs))]  # noqa: E731
                    boot = paired_bootstrap(per_example(runs_by[r["method"]]), per_example(runs_by["lora_diffusion"]),
                                            n_resamples=2000, seed=0)
                    r["bootstrap_vs_lora_diffusion"] = {k: boot[k] for k in ("diff", "lo", "hi", "p")}
    for r in results:  # per-example lists stay out of the JSON
        for x in r["runs"]:
            x.pop("correct", None)
            x.pop("rank_correct", None)
    wall_s = time.perf_counter() - started
    goals = []
    if task == "sst2":
        targets = {"lora_diffusion": 0.80, "full_ft": 0.85, "weight_lora": 0.82, "adapters": 0.82, "bitfit": 0.75,
                   "prefix_tuning": 0.70}
        for m, target in targets.items():
            if m in by:
                goals.append(goal(f"{m} generated-label accuracy >= {target}", by[m]["accuracy"], target, ">="))
        for m, r in by.items():
            goals.append(goal(f"{m} non-label outputs <= 2 %", 100.0 * r["non_label_rate"], 2.0))
        if "lora_diffusion" in by:
            goals.append(goal("lora_diffusion trainable parameters <= 2 % (adapters + encoder + span offsets)",
                              by["lora_diffusion"]["trainable_pct"], 2.0))
        if size == "quick":
            goals.append(goal("--quick in <= 60 min (the whole suite, minutes)", wall_s / 60, 60.0))
    return {
        "machine": machine_info(s["device"], s["threads"]),
        "settings": {**s, "data": data_desc, "base": base_desc, "pretrain_s": pretrain_s, "runs_s": runs_s,
                     "wall_s": wall_s, "work_s": work_s,
                     "recipe": {m: RECIPE[m] for m in s["methods"] if m in RECIPE}},
        "rows": rows,
        "reference": reference,
        "goals": goals,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    task = s.get("task", "sst2")
    pm = lambda r, k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}"  # noqa: E731
    rows = []
    for r in result["rows"]:
        row = {**r, **{f"{k}_pm": pm(r, k) for k in TASK_METRICS[task]}}
        if "vs_lora_diffusion" in r:
            row["p"] = "n/a" if r["p_vs_ld"] is None else f"{r['p_vs_ld']:.3f}"
        if "bootstrap_vs_lora_diffusion" in r:
            row["p_boot"] = f"{r['bootstrap_vs_lora_diffusion']['p']:.3f}"
        rows.append(row)
    ref = result.get("reference", {})
    if task == "sst2":
        cols = [("method", "method"), ("lr", "lr"), ("accuracy_pm", "generated acc (mean ± std)"),
                ("rank_accuracy_pm", "rank-classification acc"), ("non_label_rate", "non-label outputs"),
                ("top_prediction_share", "most frequent output"), ("p", "p vs LD (t-test, seeds)"),
                ("p_boot", "p vs LD (bootstrap, examples)"),
                ("denoise_acc_pm", "denoising acc (paper)"), ("denoise_acc_content_pm", "denoising acc, content tokens"),
                ("trainable", "trainable"), ("trainable_pct", "trainable %"), ("train_s", "train s / run"),
                ("eval_s", "eval s / run")]
        if result["rows"]:
            rows.append({"method": "reference: always the majority label", "accuracy_pm": f"{result['rows'][0]['majority_baseline']:.3f}"})
        if "probe" in ref:
            rows.append({"method": "reference: linear probe, frozen base, label position",
                         "rank_accuracy_pm": f"{ref['probe']['label_position']:.3f}"})
            rows.append({"method": "reference: linear probe, frozen base, mean prompt",
                         "rank_accuracy_pm": f"{ref['probe']['mean_prompt']:.3f}"})
            if "mlp_both" in ref["probe"]:
                rows.append({"method": "reference: MLP probe, frozen base, label position + mean prompt",
                             "rank_accuracy_pm": f"{ref['probe']['mlp_both']:.3f}"})
    else:
        metric_cols = [(f"{k}_pm", k) for k in TASK_METRICS[task] if not k.startswith("denoise")]
        cols = [("method", "method"), ("lr", "lr"), *metric_cols, ("p", f"p vs LoRA-Diffusion ({HEADLINE[task]})"),
                ("denoise_acc_pm", "denoising acc (paper)"), ("denoise_acc_content_pm", "content tokens"),
                ("trainable_pct", "trainable %"), ("train_s", "train s / run"), ("eval_s", "eval s / run")]
        if "trivial" in ref:
            rows.append({"method": f"reference: {ref['trivial']['name']}",
                         **{f"{k}_pm": f"{ref['trivial'][k]:.3f}" for k in TASK_METRICS[task] if k in ref["trivial"]}})
    n_eval = result["rows"][0]["n_eval"] if result["rows"] else 0
    lines = [
        *heading(result, f": {task}"),
        f"Data: {s['data']}; base: {s['base']}. Every method: {s['steps']} steps x batch {s['batch_size']} x "
        f"{s['max_length']} tokens, unweighted masked-diffusion loss, {s.get('precision', 'fp32')} (training and evaluation)"
        + (f", on a {s['subset']}-example training subset" if s.get("subset") else "")
        + f", seeds {', '.join(map(str, s['seeds']))}; evaluated on {n_eval} validation examples, {s['sampling_steps']} "
        f"reverse step(s) (greedy, low-confidence commits). {s.get('jobs', 1)} run(s) at a time x {s['threads']} torch "
        f"thread(s), so train/eval seconds are per run under that sharing; the whole suite took "
        f"{s.get('wall_s', 0) / 60:.1f} min"
        + (f" (the runs' own train + eval seconds sum to {s['work_s'] / 60:.1f} min: with {s.get('jobs', 1)} at a time "
           f"no schedule of them ends before {s['work_s'] / 60 / s.get('jobs', 1):.1f} min)" if "work_s" in s else "")
        + ". Scores are fractions of generated text; p vs LD: the paired "
        "t-test over seeds (same seed = same data subset and order) and a paired bootstrap over validation "
        "examples (each example's correctness averaged over the seeds)."
        + "".join(f" {m} also sets {', '.join(o)}." for m, o in s.get("recipe", {}).items()),
        "",
        table(rows, cols),
    ]
    curves = [(r["method"], seed, points) for r in result["rows"] for seed, points in r.get("curves", {}).items()]
    if curves:
        head = HEADLINE[task]
        steps = sorted({p["step"] for _, _, points in curves for p in points})
        lines += ["", f"Learning curves ({head} of the checkpoint at each step, the same {n_eval} validation examples; "
                  "the learning rate follows one schedule over all the steps):", "",
                  table([{"method": m, "seed": seed, **{f"s{p['step']}": f"{p[head]:.3f}" for p in points},
                          "loss": f"{points[-1]['loss']:.3f}"} for m, seed, points in curves],
                        [("method", "method"), ("seed", "seed"), *[(f"s{n}", f"step {n}") for n in steps],
                         ("loss", "final loss")])]
    if result["goals"]:
        lines += ["", goals_table(result["goals"])]
    return "\n".join(lines)
