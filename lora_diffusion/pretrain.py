"""Continued masked-diffusion (MDLM) training of a masked LM on plain text: makes a base worth adapting.

    python -m lora_diffusion.pretrain --base minilm --data-dir DATA --tasks sst2,squad,xsum \
        --steps 2000 --batch-size 32 --max-length 128 --lr 1e-4 --out bases/minilm-mdlm

A masked LM's MLM head is trained for 15 % masking; a diffusion denoiser must undo any mask rate
t in (0, 1] and knows t through the `Denoiser`'s timestep embedding. This command trains the whole
model (the MLM and the timestep embedding) with the project's diffusion functions: every text
token is maskable, t ~ the schedule, loss = 1/t-weighted (ELBO) cross-entropy on the masked tokens
normalised per token. The result is written with `model.save_base`: a folder every other command
accepts as `model.base=<folder>`.

`--train head` trains only the MLM head's own parameters (transform and output bias; a tied
decoder stays the word embeddings), the encoder frozen: for a base whose head was never trained
(`minilm`, a sentence-embedding model: its MLM head is random) that head becomes a read-out of
the frozen encoder's states, with no backward pass through the encoder (the vocabulary projection
over the masked tokens remains, and on a CPU it is most of a step). `--head-lr` gives the head its
own learning rate in either mode.

Corpus: the texts of the task files in `--data-dir` (each task's `corpus_fields`: sst2 `sentence`;
squad `context`, `question`; xsum `document`, `summary`; files as the tasks resolve them, e.g. squad
`train` -> dev_split/train.jsonl), and/or plain text files (`--text-file`, one text per non-empty line).
Texts are deduplicated, shuffled under `--seed` and cut into windows of `--max-length` tokens.
Only the training split is read by default (`--splits`): pretraining on evaluation texts leaks.

`--sft-mix F` makes a fraction F of every batch instruction-format examples of the tasks
(`[CLS] instruction [SEP] input [SEP] target-span`, only the target span maskable, exactly the
fine-tuning batches), so the base also learns to fill a target span and to end it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from lora_diffusion.config import DiffusionConfig, ModelConfig, load_config
from lora_diffusion.diffusion import diffusion_step_loss
from lora_diffusion.methods.core import Adaptation

log = logging.getLogger("lora_diffusion.pretrain")

METRICS_FILE = "pretrain_metrics.jsonl"


class PretrainError(ValueError):
    """Bad arguments or input files; the message names the option or file."""


# --------------------------------------------------------------------------- the corpus


def task_files(data_dir: str, tasks: list[str], splits: list[str]) -> list[tuple[str, Path]]:
    """(task, file) for every requested task and split, resolved like the training data is."""
    from lora_diffusion.data import local_split_file
    from lora_diffusion.tasks import TASKS
    from lora_diffusion.tasks.base import DataError

    if not Path(data_dir).expanduser().is_dir():
        raise PretrainError(f"--data-dir {data_dir!r}: folder does not exist")
    out = []
    for name in tasks:
        if name not in TASKS:
            raise PretrainError(f"--tasks: unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")
        for split in splits:
            try:
                out.append((name, local_split_file(TASKS[name], data_dir, split, source="--data-dir")))
            except DataError as e:
                raise PretrainError(str(e)) from None
    return out


def utf8_lines(path: Path, shown: str | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line; a PretrainError names the file and the line that is not UTF-8."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PretrainError(f"{shown or path}: line {lineno} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                    f"column {e.start + 1}); the corpus is UTF-8 text") from None


def read_texts(files: list[tuple[str, Path]], text_files: list[str]) -> list[str]:
    """Every non-empty text of the given task files and plain text files, deduplicated, in order."""
    from lora_diffusion.tasks import get_task

    texts: dict[str, None] = {}
    for task, path in files:
        for lineno, line in utf8_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PretrainError(f"{path}: line {lineno} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise PretrainError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object")
            for field in get_task(task).corpus_fields:
                value = row.get(field)
                if not isinstance(value, str):
                    raise PretrainError(f"{path}: line {lineno} has no text field {field!r} (task {task})")
                if value.strip():
                    texts[value.strip()] = None
    for name in text_files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise PretrainError(f"--text-file {name!r}: file does not exist")
        for _, line in utf8_lines(path, f"--text-file {name!r}"):
            if line.strip():
                texts[line.strip()] = None
    if not texts:
        raise PretrainError("the corpus is empty: the given files hold no text")
    return list(texts)


def text_windows(texts: list[str], tokenizer, max_length: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of token windows ([CLS] up to max_length - 2 tokens [SEP]), reshuffled every epoch."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    width = max_length - 2
    while True:
        rng.shuffle(order)
        n = 0
        for i in order:
            ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), width):
                n += 1
                yield [tokenizer.cls_token_id, *ids[start : start + width], tokenizer.sep_token_id]
        if n == 0:
            raise PretrainError("the corpus has no tokens: every text tokenises to nothing")


def shuffled(stream: Iterator[list[int]], buffer: int, seed: int) -> Iterator[list[int]]:
    """Shuffle buffer, so the windows of one long document spread over several batches."""
    rng = random.Random(seed + 1)
    pool: list[list[int]] = []
    for item in stream:
        pool.append(item)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))


def text_batches(windows: Iterator[list[int]], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batch contract for plain text: everything after [CLS] is maskable, no instruction."""
    while True:
        rows = [next(windows) for _ in range(batch_size)]
        L = max(len(r) for r in rows)
        ids = torch.full((batch_size, L), pad_id, dtype=torch.long)
        attn = torch.zeros((batch_size, L), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            attn[b, : len(r)] = 1
        target = attn.bool()
        target[:, 0] = False  # [CLS] stays: every sequence keeps one clean anchor
        yield {"input_ids": ids, "attention_mask": attn, "target_mask": target,
               "instruction_mask": torch.zeros_like(target)}


def pad_to(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    out = {}
    for k in ("input_ids", "attention_mask", "target_mask", "instruction_mask"):
        v = batch[k]
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.cat([v, torch.full((v.shape[0], extra), fill, dtype=v.dtype)], dim=1)
    return out


def sft_pools(args, tokenizer) -> list:
    """(tokenised training split, collator) per task, for the instruction-format share of a batch."""
    from lora_diffusion.data import collator_for, make_dataset

    pools = []
    for name in args.tasks:
        cfg = load_config(None, [f"task.name={name}", f"model.max_length={args.max_length}"])
        cfg.task.data_dir = args.data_dir
        try:
            pools.append((make_dataset(cfg, tokenizer, cfg.task.train_split), collator_for(cfg, tokenizer)))
        except ValueError as e:  # DataError and the collator's length checks
            raise PretrainError(f"--sft-mix, task {name}: {e}") from None
    return pools


def mixed_batches(args, tokenizer, pools: list) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of text windows; with --sft-mix, round(F * batch) rows are task examples (from `pools`) instead."""
    n_sft = round(args.sft_mix * args.batch_size) if pools else 0
    windows = shuffled(text_windows(args.texts, tokenizer, args.max_length, args.seed), 8 * args.batch_size, args.seed)
    text = text_batches(windows, args.batch_size - n_sft, tokenizer.pad_token_id) if n_sft < args.batch_size else None
    rng = random.Random(args.seed + 2)
    while True:
        parts = [next(text)] if text is not None else []
        if pools:
            picks = [rng.randrange(len(pools)) for _ in range(n_sft)]
            for p, (dataset, collate) in enumerate(pools):
                k = picks.count(p)
                if k:
                    b = collate([dataset[rng.randrange(len(dataset))] for _ in range(k)])
                    parts.append({key: b[key] for key in ("input_ids", "attention_mask", "target_mask", "instruction_mask")})
        L = max(p["input_ids"].shape[1] for p in parts)
        parts = [pad_to(p, L, tokenizer.pad_token_id) for p in parts]
        yield {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="minilm", help="masked LM: Hub name, local folder, 'minilm' or 'builtin:tiny'")
    p.add_argument("--data-dir", default=os.environ.get("LORA_DIFFUSION_DATA_DIR"),
                   help="folder of <task>/<split>.jsonl (default $LORA_DIFFUSION_DATA_DIR)")
    p.add_argument("--tasks", default="sst2,squad,xsum", help="comma-separated tasks whose texts to read")
    p.add_argument("--splits", default="train", help="comma-separated splits to read (default: train only)")
    p.add_argument("--text-file", action="append", default=[], help="plain text, one text per line (repeatable)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens per window, [CLS] and [SEP] included")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the MLM head's own parameters (default --lr); a base whose head was never "
                        "trained (minilm) needs more than its encoder")
    p.add_argument("--train", choices=("all", "head"), default="all",
                   help="all: the whole model and the timestep embedding; head: only the MLM head's own parameters "
                        "(the encoder, the tied word embeddings and the timestep embedding stay as they are: no "
                        "backward pass through the encoder)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5 %% of --steps)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--schedule", choices=("linear", "cosine", "loglinear"), default="linear")
    p.add_argument("--time", choices=("discrete", "continuous"), default="continuous")
    p.add_argument("--weighting", choices=("elbo", "none"), default="elbo", help="elbo = 1/t for the linear schedule")
    p.add_argument("--time-embed-dim", type=int, default=128, help="sinusoidal features of t (new timestep MLP)")
    p.add_argument("--sft-mix", type=float, default=0.0, help="fraction of each batch in instruction format (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="folder to write the base to")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.data_dir else []
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, before any model is loaded."""
    for name in ("steps", "batch_size", "max_length", "log_every", "time_embed_dim"):
        if getattr(args, name) <= 0:
            raise PretrainError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; must be > 0")
    if args.max_length < 8:
        raise PretrainError(f"--max-length: got {args.max_length}; must be >= 8")
    if args.warmup is not None and args.warmup < 0:
        raise PretrainError(f"--warmup: got {args.warmup}; must be >= 0")
    if args.threads is not None and args.threads <= 0:
        raise PretrainError(f"--threads: got {args.threads}; must be > 0")
    if not args.lr > 0:
        raise PretrainError(f"--lr: got {args.lr}; must be > 0")
    if args.head_lr is not None and not args.head_lr > 0:
        raise PretrainError(f"--head-lr: got {args.head_lr}; must be > 0")
    if not 0.0 <= args.sft_mix <= 1.0:
        raise PretrainError(f"--sft-mix: got {args.sft_mix}; must be in [0, 1]")
    if args.sft_mix > 0 and not args.data_dir:
        raise PretrainError("--sft-mix needs --data-dir (the tasks' training examples)")
    if not args.data_dir and not args.text_file:
        raise PretrainError("no corpus: give --data-dir (or set LORA_DIFFUSION_DATA_DIR) and/or --text-file")
    base = Path(args.base).expanduser()
    if args.base.startswith(("/", ".", "~")) and not base.is_dir():
        raise PretrainError(f"--base {args.base!r}: folder does not exist")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise PretrainError(f"--out {args.out!r} exists and is not empty; pass --overwrite to write into it")


def lr_at(step: int, args, peak: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak (default --lr)."""
    peak = args.lr if peak is None else peak
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def head_parameters(denoiser) -> list[torch.nn.Parameter]:
    """The MLM head's own parameters: the head's, less any it shares with the input embeddings (a tied decoder)."""
    shared = {id(p) for p in denoiser.mlm.get_input_embeddings().parameters()}
    return [p for p in {id(p): p for p in denoiser.head_module.parameters()}.values() if id(p) not in shared]


def parameter_groups(denoiser, args) -> list[dict]:
    """AdamW groups: what trains (--train), with --head-lr for the head's own parameters, no decay on 1-d ones."""
    head = {id(p) for p in head_parameters(denoiser)}
    trained = [p for p in denoiser.parameters() if args.train == "all" or id(p) in head]  # tied ones once
    for p in denoiser.parameters():
        p.requires_grad_(False)
    groups = []
    for in_head in (False, True):
        for decay in (True, False):
            params = [p for p in trained if (id(p) in head) == in_head and (p.ndim >= 2) == decay]
            if params:
                for p in params:
                    p.requires_grad_(True)
                groups.append({"params": params, "weight_decay": args.weight_decay if decay else 0.0,
                               "peak_lr": (args.head_lr or args.lr) if in_head else args.lr})
    return groups


def pretrain(args: argparse.Namespace) -> Path:
    from lora_diffusion.model import load_base, save_base

    check_args(args)
    files = task_files(args.data_dir, args.tasks, args.splits) if args.data_dir else []
    args.texts = read_texts(files, args.text_file)
    n_chars = sum(len(t) for t in args.texts)
    log.info("corpus: %d texts (%.1f M characters) from %d task files and %d text files",
             len(args.texts), n_chars / 1e6, len(files), len(args.text_file))

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_cfg = ModelConfig(base=args.base, max_length=args.max_length, time_embed_dim=args.time_embed_dim)
    try:
        denoiser, tokenizer = load_base(model_cfg, seed=args.seed)
    except ValueError as e:
        raise PretrainError(f"--base: {e}") from None
    max_pos = getattr(denoiser.mlm.config, "max_position_embeddings", None)
    if max_pos is not None and args.max_length > max_pos:
        raise PretrainError(f"--max-length: got {args.max_length}; {args.base} has {max_pos} positions")
    device = torch.device(args.device)
    denoiser.to(device).train()
    groups = parameter_groups(denoiser, args)
    model = Adaptation(denoiser)  # the plain denoiser behind the method interface
    unique = {id(p): p for p in denoiser.parameters()}.values()
    n_params, n_train = sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)
    log.info("base %s: %d parameters, %d training (%s); vocabulary %d, [MASK] = %d", args.base, n_params, n_train,
             "all" if args.train == "all" else "the MLM head only", denoiser.vocab_size, tokenizer.mask_token_id)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    diff_cfg = DiffusionConfig(schedule=args.schedule, time=args.time, loss_weighting=args.weighting)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pools = sft_pools(args, tokenizer) if args.sft_mix > 0 else []
    batches = mixed_batches(args, tokenizer, pools)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_log = (out / METRICS_FILE).open("w")

    window = {"loss": 0.0, "acc": 0.0, "tokens": 0, "n": 0, "time": 0.0}
    last = {}
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(batches).items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args, group["peak_lr"])
        loss, stats = diffusion_step_loss(model, batch, diff_cfg, tokenizer.mask_token_id, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.grad_clip)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        window["time"] += time.perf_counter() - t0
        window["loss"] += loss.item()
        window["acc"] += float(stats["accuracy_masked"])
        window["tokens"] += int(batch["attention_mask"].sum())
        window["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = window["n"]
            last = {"step": step + 1, "loss": window["loss"] / n, "masked_acc": window["acc"] / n,
                    "lr": opt.param_groups[0]["lr"], "head_lr": opt.param_groups[-1]["lr"],
                    "tokens_per_s": window["tokens"] / max(window["time"], 1e-9)}
            log.info("step %d/%d  loss %.4f  masked acc %.3f  lr %.2e  %.0f tokens/s", last["step"], args.steps,
                     last["loss"], last["masked_acc"], last["lr"], last["tokens_per_s"])
            metrics_log.write(json.dumps(last) + "\n")
            metrics_log.flush()
            window = {"loss": 0.0, "acc": 0.0, "tokens": 0, "n": 0, "time": 0.0}
    metrics_log.close()

    denoiser.eval().cpu()
    meta = {"pretrain": {
        "base": args.base, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "lr": args.lr, "head_lr": args.head_lr or args.lr, "train": args.train, "schedule": args.schedule,
        "time": args.time, "weighting": args.weighting, "seed": args.seed,
        "tasks": args.tasks, "splits": args.splits, "text_files": [str(Path(f).name) for f in args.text_file],
        "sft_mix": args.sft_mix, "n_texts": len(args.texts), "final": last,
    }}
    save_base(denoiser, tokenizer, out, extra_meta=meta)
    log.info("wrote %s (use it as model.base=%s)", out, out)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        pretrain(args)
    except PretrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
