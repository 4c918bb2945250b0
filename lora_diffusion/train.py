"""Fine-tune one adaptation method on one task: the training loop, on Ray Train or in a plain process.

    python -m lora_diffusion.train --config lora_diffusion/configs/sst2_minilm.yaml train.max_steps=200
    python -m lora_diffusion.train --config FILE --resume-from outputs/<run>/checkpoint_0000100

`train_loop(loop_config, reporter)` reads top to bottom: config -> seeds -> base + method -> data
-> model (DDP over what trains) -> AdamW + cosine schedule -> steps (grad accumulation,
clipping, mixed precision) -> every `train.report_every` steps a report + checkpoint -> final
evaluation. What the loop carries from one report to the next is one `LoopState` (step, data
position, the window of losses and timing, the last report); `report_step(parts, state, metrics,
final)` checkpoints and reports, with `parts` (`LoopParts`) what was built before the first step.
`reporter` (see train_reporters.py) decides where reports and checkpoints go: Ray Train,
Ray Tune or a plain list and folder. The command runs it on a local Ray cluster (or
$RAY_ADDRESS) with `TorchTrainer`, after checking the config, the data, the base and the
MLflow store.

`loop_config` = {"config": Config.to_dict(), "mlflow": None | {"tracking_uri", "experiment",
"run_id" (log into this run; its creator ends it) | "parent_run_id" (create a nested child run,
ended here), "run_name", "tags"}, "resume_from": checkpoint folder | None, "trial_name": str | None,
"mlflow_run": optional {"tracking_uri", "run_id"}: the run whose system metrics this loop samples and
whose adapter URI its model card names, when another process logs into it (an in-process Tune trial)}.

The command ends its MLflow run FINISHED, FAILED (with an `error` tag) or, on Ctrl-C / SIGTERM
(SLURM's time limit), KILLED. Rerunning with the same `tracking.run_name` resumes that Ray run from
its last checkpoint (a new MLflow run, tagged with the same `ray_run_name`).

Testing hooks (config): `train.fail_at_step=N` raises at step N of a run that did not start from
a checkpoint (so a restarted run gets past it); `train.inject_nan_at_step=N` makes the loss NaN
at step N, which stops the run with a clear error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_diffusion.checkpoint import load_checkpoint, read_train_state, save_checkpoint
from lora_diffusion.config import PHASE_METRICS, Config, ConfigError, check_writable_folder, config_from_dict, load_config
from lora_diffusion.diffusion import diffusion_step_loss
from lora_diffusion.precision import autocast_for, resolve as resolve_precision
from lora_diffusion.ray_runtime import start_ray


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN or infinite; training stops (raised on every rank)."""


# --------------------------------------------------------------------------- pieces of the loop


class DiffusionObjective(nn.Module):
    """loss = masked-diffusion loss + the method's regularisers, as one module so that DDP sees both."""

    def __init__(self, adaptation, diffusion_cfg, mask_id: int, b1b2: tuple[float, float]):
        super().__init__()
        self.adaptation = adaptation
        self.diffusion_cfg = diffusion_cfg
        self.mask_id = mask_id
        self.b1b2 = b1b2

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        denoise, stats = diffusion_step_loss(self.adaptation, batch, self.diffusion_cfg, self.mask_id, generator, self.b1b2)
        reg = self.adaptation.regularization_loss()
        return denoise + reg, stats


def keep_frozen_base_out_of_ddp(objective: DiffusionObjective) -> None:
    """For a method whose base runs without a graph, DDP neither broadcasts nor all-reduces the base."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    adaptation = objective.adaptation
    if adaptation.frozen_base_forward:
        names = [f"adaptation.denoiser.{n}" for n, _ in adaptation.denoiser.named_parameters()]
        names += [f"adaptation.denoiser.{n}" for n, _ in adaptation.denoiser.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(objective, names)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch) that can start an epoch part-way (`skip` indices)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def micro_batches(loader, sampler: ResumableSampler, state: LoopState, batch_size: int):
    """Endless stream of batches; `state.epoch` and `state.batch` count what has been handed out."""
    while True:
        sampler.set_epoch(state.epoch)
        sampler.skip = state.batch * batch_size
        for batch in loader:
            state.batch += 1
            yield batch
        state.epoch += 1
        state.batch = 0


def cosine_with_warmup(warmup_steps: int, max_steps: int):
    """lr multiplier: linear warm-up to 1 over `warmup_steps`, then cosine decay to 0 at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the noise (t, masks) and dropout of one optimizer step on one rank: resumable by step alone."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def progress_line(m: dict[str, Any], max_steps: int) -> str:
    fmt = [("epoch", "epoch {:d}"), ("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("samples_per_s", "{:.1f} samples/s"),
           ("tokens_per_s", "{:.0f} tok/s"), ("peak_mem_mb", "mem {:.0f}MB"), ("val_loss", "val_loss {:.4f}")]
    parts = [f"step {m['step']}/{max_steps}"] + [f.format(m[k]) for k, f in fmt if k in m]
    parts += [f"{k} {v:.4g}" for k, v in m.items() if k.startswith("eval_")]
    return "[train] " + " | ".join(parts)


def _say(line: str) -> None:
    """One progress line on stdout (not print: Ray Train's patched print would show it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _trainer_device(cfg: Config, reporter) -> torch.device:
    if reporter.under_ray and getattr(reporter, "trial_id", None) is None:  # a Ray Train worker
        import ray.train.torch

        return ray.train.torch.get_device()
    if cfg.train.gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda", reporter.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: got 'fp16'; fp16 with a grad scaler needs a GPU (train.gpus_per_worker > 0); "
                          "use 'bf16' or 'fp32' on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: got 'bf16'; this GPU does not support bf16; use 'fp16' or 'fp32'")


def _start_tracking(mlcfg: dict | None, cfg: Config, rank: int, reporter, trial_name: str | None):
    """Rank 0's RunTracker for `loop_config["mlflow"]` (None when there is no tracking or rank > 0)."""
    if not mlcfg or rank != 0:
        return None
    from lora_diffusion.tracking import RunTracker, run_tags

    run_id = mlcfg.get("run_id")
    tags = dict(mlcfg.get("tags") or {})
    if reporter.trial_id:
        tags.setdefault("ray_trial_id", reporter.trial_id)
    if run_id is None:
        tags = {**run_tags(cfg, tags.pop("run_type", "trial" if mlcfg.get("parent_run_id") else "train")), **tags}
    tracker = RunTracker.start(mlcfg["tracking_uri"], mlcfg.get("experiment") or cfg.tracking.experiment, run_id=run_id,
                               parent_run_id=mlcfg.get("parent_run_id"),
                               run_name=mlcfg.get("run_name") or trial_name or cfg.tracking.run_name, tags=tags)
    if run_id is None:
        tracker.log_params(cfg.flat())
    return tracker


@torch.no_grad()
def validation_loss(adaptation, loader, cfg: Config, mask_id: int, device: torch.device, b1b2) -> dict[str, float]:
    """Denoising loss and masked-token accuracy (%) on a fixed validation subset with fixed noise (comparable across steps)."""
    was_training = adaptation.training
    adaptation.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 12_345)
    loss_sum = acc_sum = n = 0.0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast_for(cfg.train.precision, device):
            loss, stats = diffusion_step_loss(adaptation, batch, cfg.diffusion, mask_id, gen, b1b2)
        rows = batch["input_ids"].shape[0]
        loss_sum += float(loss) * rows
        acc_sum += float(stats["accuracy_masked"]) * rows
        n += rows
    adaptation.train(was_training)
    return {"val_loss": loss_sum / max(n, 1), "val_denoise_acc": 100.0 * acc_sum / max(n, 1)}  # percent, like eval_*


def final_evaluation(adaptation, tokenizer, cfg: Config, out_dir: Path) -> dict[str, float]:
    """Task metrics on task.eval_split (`lora_diffusion.scoring`), written to out_dir/eval/, as eval_* metrics."""
    from lora_diffusion.scoring import evaluate, write_eval_outputs

    metrics, predictions = evaluate(adaptation, tokenizer, cfg)
    write_eval_outputs(out_dir / "eval", metrics, predictions)
    return {f"eval_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------- the loop


def train_loop(loop_config: dict[str, Any], reporter) -> dict[str, Any]:
    """Train `loop_config["config"]`; report through `reporter`; return the last reported metrics."""
    from lora_diffusion.data import collator_for, make_dataset
    from lora_diffusion.methods import build_method
    from lora_diffusion.model import load_base

    # -- config, threads, device ---------------------------------------------------------------
    cfg = config_from_dict(loop_config["config"])
    tc = cfg.train
    rank, world = reporter.world_rank, reporter.world_size
    torch.set_num_threads(tc.torch_threads or tc.cpus_per_worker)  # Ray set OMP_NUM_THREADS to the reserved CPUs
    device = _trainer_device(cfg, reporter)
    precision = resolve_precision(tc.precision, device)
    _check_precision(precision, device)
    if precision != tc.precision:  # auto: the checkpoints' config, the model card and the evaluation name what ran
        cfg = config_from_dict({**loop_config["config"], "train": {**loop_config["config"]["train"], "precision": precision}})
        tc = cfg.train
    trial_name = loop_config.get("trial_name") or reporter.run_name
    labels = {"trial": trial_name, "task": cfg.task.name, "method": cfg.method.name}

    # -- base + method (the same initial weights on every rank; DDP also broadcasts rank 0's) ---
    # The frozen base is the same for every seed (its newly initialised parts, e.g. MiniLM's MLM head
    # and the timestep MLP, are drawn under load_base's fixed seed), so an adapter reloads onto exactly
    # the base it was trained on (adapter.load_adapter); train.seed varies the method and the data order.
    torch.manual_seed(tc.seed)
    denoiser, tokenizer = load_base(cfg.model)
    adaptation = build_method(cfg.method, denoiser).to(device)
    adaptation.train()
    counts = adaptation.param_counts()
    mask_id = tokenizer.mask_token_id
    b1b2 = (cfg.method.lora_diffusion.b1, cfg.method.lora_diffusion.b2)  # phase boundaries for every method's ce_*

    # -- data: seeded, resumable order; each rank its own shard ---------------------------------
    train_set = make_dataset(cfg, tokenizer, cfg.task.train_split)
    if len(train_set) < tc.batch_size * world:
        raise ConfigError(f"train.batch_size={tc.batch_size} x train.num_workers={world} needs at least "
                          f"{tc.batch_size * world} training examples; {train_set.source} has {len(train_set)}")
    collate = collator_for(cfg, tokenizer)
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, seed=tc.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=tc.batch_size, sampler=sampler, collate_fn=collate,
                                         drop_last=True, num_workers=0)
    val_loader = None
    if tc.eval_every > 0 and rank == 0:
        val_set = make_dataset(cfg, tokenizer, cfg.task.eval_split)
        val_set = torch.utils.data.Subset(val_set, range(min(tc.val_examples, len(val_set))))
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=tc.eval_batch_size, collate_fn=collate)
    if reporter.under_ray and world > 1:
        import ray.train.torch

        loader = ray.train.torch.prepare_data_loader(loader)  # keeps our DistributedSampler, moves batches

    # -- model: DDP over exactly what trains ----------------------------------------------------
    objective = DiffusionObjective(adaptation, cfg.diffusion, mask_id, b1b2)
    model: nn.Module = objective
    if world > 1:
        import ray.train.torch

        keep_frozen_base_out_of_ddp(objective)
        # find_unused_parameters: a batch may hold no timestep of some phase, so that bank gets no gradient
        model = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": True})
    named = adaptation.trainable_named_parameters()
    param_names = [n for n, _ in named]
    params = [p for _, p in named]

    # -- optimizer, schedule, scaler -------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tc.warmup_steps, tc.max_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16")

    # -- resume: Ray's restored checkpoint first, then --resume-from ---------------------------
    state = LoopState()
    resume_dir = reporter.get_checkpoint() or loop_config.get("resume_from")
    resumed = resume_dir is not None
    if resumed:
        saved = load_checkpoint(resume_dir, adaptation, optimizer, scheduler, scaler, param_names)
        state = LoopState(**{k: int(saved[k]) for k in ("step", "epoch", "batch")})
        if rank == 0:
            _say(f"[train] resumed from {resume_dir} at step {state.step}")

    # -- the loop: every report_every steps a report + checkpoint; the last one also evaluates ---
    tracker = _start_tracking(loop_config.get("mlflow"), cfg, rank, reporter, trial_name)
    # the MLflow run of these results: ours, the one given by id, or (an in-process Tune trial) its trial's run
    run_ref = {**(loop_config.get("mlflow") or {}), **(loop_config.get("mlflow_run") or {})}
    if tracker is not None:
        run_ref = {"tracking_uri": tracker.uri, "run_id": tracker.run_id}
    monitor = None
    if cfg.tracking.system_metrics and run_ref.get("run_id"):
        from lora_diffusion.system_metrics import start_monitor

        monitor = start_monitor(run_ref["tracking_uri"], run_ref["run_id"], rank, cfg.tracking.system_metrics_interval_s)
    parts = LoopParts(cfg, reporter, adaptation, tokenizer, optimizer, scheduler, scaler, param_names, device, labels,
                      tracker, adapter_uri=f"runs:/{run_ref['run_id']}/adapter" if run_ref.get("run_id") else None)
    ddp = hasattr(model, "no_sync")
    stream = micro_batches(loader, sampler, state, tc.batch_size)
    state.window = _Window(device)
    try:
        while state.step < tc.max_steps:
            step = state.step + 1  # the step being computed (1-based)
            if tc.fail_at_step == step and not resumed:
                raise RuntimeError(f"train.fail_at_step={step}: injected failure (testing hook; a resumed run goes past it)")
            torch.manual_seed(step_seed(tc.seed, rank, step) + 1)  # dropout
            noise = torch.Generator(device=device).manual_seed(step_seed(tc.seed, rank, step))  # t and masks

            optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for micro in range(tc.grad_accum):
                batch = next(stream)
                if not reporter.under_ray or world == 1:
                    batch = to_device(batch, device)
                sync = contextlib.nullcontext() if not ddp or micro == tc.grad_accum - 1 else model.no_sync()
                with sync:
                    with autocast_for(tc.precision, device):
                        loss, stats = model(batch, noise)
                    if tc.inject_nan_at_step == step:
                        loss = loss * float("nan")
                    scaler.scale(loss / tc.grad_accum).backward()
                loss_total += float(loss.detach()) / tc.grad_accum
                state.window.add(loss.detach(), stats, batch)

            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            if not math.isfinite(loss_total) or (not scaler.is_enabled() and not torch.isfinite(grad_norm)):
                # after DDP's all-reduce a NaN anywhere is a NaN on every rank: all ranks stop together
                raise NonFiniteLossError(
                    f"loss became {loss_total} (grad norm {float(grad_norm)}) at step {step} on rank {rank}: training "
                    f"stopped. Lower train.lr (now {tc.lr}), set train.grad_clip, or use train.precision=fp32"
                    + (" (train.inject_nan_at_step is set: this is the testing hook)" if tc.inject_nan_at_step == step else "")
                )
            lr_used = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state.step = step

            validate = val_loader is not None and (step % tc.eval_every == 0 or step == tc.max_steps)
            if step % tc.report_every == 0 or step == tc.max_steps or (tc.eval_every > 0 and step % tc.eval_every == 0):
                metrics = state.window.metrics(world)
                with torch.no_grad():
                    regs = {k: float(v) for k, v in adaptation.regularizers().items()}
                metrics.update({
                    "reg_rank": regs.get("reg_rank", 0.0), "reg_orth": regs.get("reg_orth", 0.0), "lr": lr_used,
                    "peak_mem_mb": peak_memory_mb(device), "trainable_params": counts["trainable"],
                    "total_params": counts["total"], "step": step, "epoch": state.epoch,
                })
                if validate:
                    metrics.update(validation_loss(adaptation, val_loader, cfg, mask_id, device, b1b2))
                state.last = report_step(parts, state, metrics, final=step == tc.max_steps)
                state.window = _Window(device)
        if not state.last:  # resumed at max_steps (e.g. a rerun of a finished run): still evaluate, save and log the adapter
            state.last = report_step(parts, state, {"trainable_params": counts["trainable"], "total_params": counts["total"],
                                               "peak_mem_mb": peak_memory_mb(device), "step": state.step,
                                               "epoch": state.epoch}, final=True)
    except BaseException as e:
        from lora_diffusion.faults import TRACKING, fault_of
        from lora_diffusion.system_metrics import stop_monitor

        fault = fault_of(e)
        if fault is None or fault.kind != TRACKING:  # a flush to a store that is gone would wait out the retries again
            stop_monitor(monitor)
        if tracker is not None and tracker.owned:  # a run given by id is ended (and tagged) by its creator
            from lora_diffusion.tracking import error_text

            tracker.end("FAILED", error=error_text(e))
        raise
    from lora_diffusion.system_metrics import stop_monitor

    stop_monitor(monitor)
    if tracker is not None:
        tracker.end("FINISHED")
        state.last["mlflow_run_id"] = tracker.run_id
    return state.last


# --------------------------------------------------------------------------- a report


@dataclass
class LoopState:
    """What the loop carries from one report to the next: where it stands (optimizer steps done; epoch and
    batch of the data order, which `micro_batches` advances: a checkpoint saves all three), the window of
    losses and timing since the last report, and the metrics of the last report."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    window: _Window | None = None
    last: dict[str, Any] = field(default_factory=dict)

    def position(self) -> dict[str, int]:
        """What a checkpoint's train_state records of it."""
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}


@dataclass
class LoopParts:
    """What the loop built before its first step and every report uses (none of it is replaced by the loop)."""

    cfg: Config
    reporter: Any
    adaptation: nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    param_names: list[str]
    device: torch.device
    labels: dict[str, str]  # live-metric labels: trial, task, method
    tracker: Any = None  # rank 0's RunTracker, when this loop logs to MLflow itself
    adapter_uri: str | None = None  # the model card's runs:/<run>/adapter


def report_step(parts: LoopParts, state: LoopState, metrics: dict[str, Any], final: bool) -> dict[str, Any]:
    """Rank 0 writes the checkpoint (its adapter with a model card; at the end the evaluation); every rank reports."""
    p, cfg = parts, parts.cfg
    ckpt_dir = None
    try:
        if p.reporter.world_rank == 0:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="lora_diffusion_ckpt_"))
            save_checkpoint(ckpt_dir, p.adaptation, cfg, p.optimizer, p.scheduler, p.scaler, state.position(), p.param_names)
            if final and cfg.train.eval_at_end:
                metrics.update(final_evaluation(p.adaptation, p.tokenizer, cfg, ckpt_dir))
            from lora_diffusion.model_card import write_card

            write_card(ckpt_dir / "adapter", cfg, metrics, state.step, adapter_uri=p.adapter_uri)
            _say(progress_line(metrics, cfg.train.max_steps))
            if p.tracker is not None:
                p.tracker.log_metrics(metrics, step=state.step)
                if final:
                    p.tracker.log_checkpoint(ckpt_dir)
        if p.reporter.under_ray:
            from lora_diffusion.live_metrics import publish

            publish(metrics, p.labels)
        p.reporter.report(metrics, checkpoint_dir=ckpt_dir)
    finally:
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


class _Window:
    """Sums over the micro-batches since the last report; averaged over all ranks at report time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        # loss, denoise, micro-batches, tokens, samples, then (sum, count) for each phase
        self.sums = torch.zeros(5 + 2 * len(PHASE_METRICS), dtype=torch.float64)

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        s = self.sums
        s[0] += float(loss)
        s[1] += float(stats["denoise_loss"])
        s[2] += 1
        s[3] += float(batch["attention_mask"].sum())
        s[4] += batch["input_ids"].shape[0]
        for i, name in enumerate(PHASE_METRICS):
            v = float(stats[name])
            if math.isfinite(v):
                s[5 + 2 * i] += v
                s[6 + 2 * i] += 1

    def metrics(self, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        s = self.sums
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = s.to(self.device, dtype=torch.float64 if self.device.type == "cpu" else torch.float32)
            torch.distributed.all_reduce(t)
            s = t.cpu().double()
        out = {"loss": float(s[0] / s[2]), "denoise_loss": float(s[1] / s[2]),
               "tokens_per_s": float(s[3]) / elapsed, "samples_per_s": float(s[4]) / elapsed}
        for i, name in enumerate(PHASE_METRICS):
            out[name] = float(s[5 + 2 * i] / s[6 + 2 * i]) if s[6 + 2 * i] > 0 else float("nan")
        return out


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: `train_loop` with the Ray Train reporter."""
    from lora_diffusion.train_reporters import RayTrainReporter

    return train_loop(loop_config, RayTrainReporter())


# --------------------------------------------------------------------------- on Ray Train


def run_name(cfg: Config) -> str:
    """tracking.run_name (deterministic: rerunning it resumes the same Ray run), else task-method-time."""
    return cfg.tracking.run_name or f"{cfg.task.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_trainer(cfg: Config, loop_config: dict[str, Any], run_config=None):
    """A `TorchTrainer` running `train_loop_per_worker` with the scaling, failure and checkpoint settings of `cfg`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    # Ray Train passes this variable from the process that calls fit() to its controller actor.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(tc.controller_poll_s)
    resources = {"CPU": tc.cpus_per_worker}
    if tc.gpus_per_worker > 0:
        resources["GPU"] = tc.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.gpus_per_worker > 0,
                                      resources_per_worker=resources)
    if run_config is None:
        run_config = ray.train.RunConfig(
            name=run_name(cfg),
            storage_path=str(Path(tc.output_dir).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        )
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config,
                        torch_config=torch_config())


def torch_config():
    """Ray Train's TorchConfig, with the rank-0 rendezvous store on loopback when the cluster is (see below)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class LoopbackAwareBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(keep_rendezvous_store_on_loopback)
            super().on_start(worker_group, backend_config)

    class LoopbackAwareTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackAwareBackend

    return LoopbackAwareTorchConfig()


_LOOPBACK_STORES: list = []  # (socket, TCPStore) kept alive for the worker's lifetime


def keep_rendezvous_store_on_loopback() -> None:
    """In a Ray Train worker: when the DDP master address is loopback (a local cluster we started), rank 0's
    TCPStore server listens on it only. torch binds that server to all interfaces whatever the address;
    a server made first on a socket bound to 127.0.0.1 (`master_listen_fd`, `multi_tenant`) is the one
    torch's own rendezvous then reuses."""
    import importlib

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the module, not the function of that name
    original = rendezvous._create_c10d_store
    if getattr(original, "loopback_aware", False):
        return

    def create(hostname, port, rank, world_size, timeout, *args, **kwargs):
        if rank == 0 and hostname in ("127.0.0.1", "localhost") and not _LOOPBACK_STORES:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int(port)))
            sock.listen(128)
            server = torch.distributed.TCPStore("127.0.0.1", int(port), world_size, True, timeout=timeout,
                                                multi_tenant=True, master_listen_fd=sock.fileno(), wait_for_workers=False)
            _LOOPBACK_STORES.append((sock, server))
        return original(hostname, port, rank, world_size, timeout, *args, **kwargs)

    create.loopback_aware = True
    rendezvous._create_c10d_store = create


# --------------------------------------------------------------------------- checks before any cluster time


def absolutize(cfg: Config, cwd: str | os.PathLike | None = None) -> Config:
    """The config with relative folders made absolute (Ray workers run in another working directory)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    data = cfg.to_dict()
    for section, key in (("task", "data_dir"), ("task", "cache_dir"), ("train", "output_dir")):
        value = data[section][key]
        if value and not Path(value).expanduser().is_absolute():
            data[section][key] = str((base / value).resolve())
        elif value:
            data[section][key] = str(Path(value).expanduser())
    if data["task"]["data_dir"] is None and os.environ.get("LORA_DIFFUSION_DATA_DIR"):
        data["task"]["data_dir"] = str((base / os.environ["LORA_DIFFUSION_DATA_DIR"]).resolve())
    b = data["model"]["base"]
    if not b.startswith("builtin:") and b != "minilm" and (base / b).is_dir():
        data["model"]["base"] = str((base / b).resolve())
    return config_from_dict(data)


RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_name(name: str | None) -> None:
    """tracking.run_name names a folder under train.output_dir: one plain name, never a path."""
    if name is not None and not RUN_NAME_RE.match(name):
        raise ConfigError(f"tracking.run_name: got {name!r}; it names a folder, so it must be 1-128 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit (no '/', no '..')")


def preflight(cfg: Config, resume_from: str | None = None, check_resources: bool = True) -> None:
    """Raise a clear error (naming the key, the value and what is allowed) for anything that would fail later."""
    from lora_diffusion.data import load_split

    tc = cfg.train
    local = not os.environ.get("RAY_ADDRESS")
    check_run_name(cfg.tracking.run_name)
    check_writable_folder(Path(tc.output_dir), "train.output_dir")
    if tc.precision == "fp16" and tc.gpus_per_worker == 0:
        raise ConfigError("train.precision: got 'fp16'; fp16 with a grad scaler needs a GPU (train.gpus_per_worker > 0); "
                          "use 'bf16' or 'fp32' on CPU")
    if local and check_resources:
        cpus = os.cpu_count() or 1
        if tc.num_workers * tc.cpus_per_worker > cpus:
            raise ConfigError(
                f"train.num_workers={tc.num_workers} x train.cpus_per_worker={tc.cpus_per_worker} = "
                f"{tc.num_workers * tc.cpus_per_worker} CPUs, but this machine has {cpus}; lower them or run on a "
                "cluster (RAY_ADDRESS)")
        if tc.gpus_per_worker > 0 and tc.num_workers * tc.gpus_per_worker > torch.cuda.device_count():
            raise ConfigError(f"train.gpus_per_worker={tc.gpus_per_worker} x train.num_workers={tc.num_workers}: this "
                              f"machine has {torch.cuda.device_count()} GPUs")
    if tc.warmup_steps > tc.max_steps:
        raise ConfigError(f"train.warmup_steps: got {tc.warmup_steps}; must be <= train.max_steps={tc.max_steps}")
    check_base(cfg.model.base)
    load_split(cfg.task, cfg.task.train_split)
    if tc.eval_at_end or tc.eval_every > 0:
        load_split(cfg.task, cfg.task.eval_split)
    if resume_from is not None:
        read_train_state(resume_from)
        saved = load_config(Path(resume_from) / "config.yaml")
        for key in ("method.name", "model.base"):
            a, b = saved.flat()[key], cfg.flat()[key]
            if a != b:
                raise ConfigError(f"{key}: got {b!r}, but the checkpoint {resume_from!r} was made with {a!r}")


def check_base(base: str) -> None:
    """model.base can be loaded: builtin:tiny, a Hugging Face folder without pickle weights, or a Hub id (cached
    when offline); else a ConfigError naming it. Also used by the sweep for every searched base."""
    from lora_diffusion.model import resolve_base

    if base.startswith("builtin:"):
        if base != "builtin:tiny":
            raise ConfigError(f"model.base: got {base!r}; the built-in bases are: builtin:tiny")
        return
    path = resolve_base(base)  # "minilm" without its package raises a ValueError saying what to install
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.base: {base!r} is a folder without config.json (not a Hugging Face checkpoint)")
        from lora_diffusion.model import check_no_pickle

        check_no_pickle(path, base)  # only pickle weights: refused, never unpickled
        return
    if "/" in base and (base.startswith((".", "/", "~")) or os.sep in base and Path(base).parent.exists()):
        raise ConfigError(f"model.base: folder {base!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(base)
        except OSError:
            raise ConfigError(f"model.base: got {base!r}; the Hugging Face Hub is offline and it is not cached. Give a "
                              "local folder, 'minilm' or 'builtin:tiny'") from None


# --------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_diffusion.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run config (see lora_diffusion/configs/); defaults when omitted")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=200")
    parser.add_argument("--resume-from", help="a checkpoint folder of an earlier run to continue from")
    parser.add_argument("--no-dashboard", action="store_true", help="start the local Ray cluster without its dashboard")
    args = parser.parse_args(argv)

    from lora_diffusion.tasks import DataError
    from lora_diffusion.tracking import (RunTracker, TrackingError, check_tracking_uri, error_text, redact_uri,
                                         resolve_tracking_uri, run_tags)
    from lora_diffusion.checkpoint import CheckpointError

    try:
        cfg = absolutize(load_config(args.config, args.overrides))
        resume = str(Path(args.resume_from).resolve()) if args.resume_from else None
        preflight(cfg, resume)
        uri = None
        if cfg.tracking.enabled:
            uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
            check_tracking_uri(uri)
    except (ConfigError, DataError, TrackingError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    name = run_name(cfg)
    tracker = None
    if uri is not None:
        tracker = RunTracker.start(uri, cfg.tracking.experiment, run_name=name,
                                   tags=run_tags(cfg, "train", ray_run_name=name))
        tracker.log_params(cfg.flat())
        print(f"[train] MLflow run {tracker.run_id} in experiment {cfg.tracking.experiment!r} at {redact_uri(uri)}",
              flush=True)
    loop_config = {"config": cfg.to_dict(), "resume_from": resume, "trial_name": name,
                   "mlflow": None if tracker is None else {"tracking_uri": uri, "experiment": cfg.tracking.experiment,
                                                           "run_id": tracker.run_id}}
    connected = False
    import ray

    def on_sigterm(signum, frame):  # SLURM's time limit / scancel: end the MLflow run KILLED, stop our Ray
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        connected, _ = start_ray(dashboard=not args.no_dashboard)
        result = make_trainer(cfg, loop_config).fit()
    except BaseException as e:  # noqa: BLE001 - every failure ends the MLflow run FAILED, then the command fails
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
        if tracker is not None:
            tracker.end("KILLED" if interrupted else "FAILED",
                        error=f"interrupted ({'SIGTERM' if isinstance(e, SystemExit) else 'Ctrl-C'})" if interrupted else error_text(e))
        if interrupted:
            raise
        print(f"error: training failed: {redact_uri(str(e))}", file=sys.stderr)
        return 1
    finally:
        if connected:
            ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if tracker is not None:
        tracker.end("FINISHED")
    final = {k: v for k, v in (result.metrics or {}).items() if k.startswith("eval_") or k in ("loss", "step", "val_loss")}
    print(f"[train] done: {json.dumps(final)}", flush=True)
    if result.checkpoint is not None:
        print(f"[train] last checkpoint (adapter/ inside): {result.checkpoint.path}", flush=True)
    if tracker is not None:
        print(f"[train] adapter in MLflow: runs:/{tracker.run_id}/adapter", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
