"""What the benchmark suites share: errors, machine info, memory and timing, synthetic data,
presets and options, goals, isolated child processes, tables and the JSON + Markdown output."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from lora_diffusion.tracking import git_commit

SIZES = ("smoke", "quick", "full")


class BenchError(RuntimeError):
    """A benchmark could not run as asked; the message says which input or step failed."""


# --------------------------------------------------------------------------- machine and environment


def machine_info(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPUs, torch threads, device, versions, date, load."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count() or 0,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0),
        "torch_threads": int(threads if threads is not None else torch.get_num_threads()),
        "device": device,
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "git_commit": git_commit(short=True) or "unknown",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda or "unknown"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
        return device
    raise BenchError(f"--device {device!r}: allowed: cpu, cuda, cuda:<index>")


# --------------------------------------------------------------------------- memory


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; None where there is none (not Linux)."""
    try:
        m = re.search(rf"{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024.0 if m else None


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc; psutil elsewhere)."""
    mb = _proc_status_mb("VmRSS")
    if mb is not None:
        return mb
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark in MB since the last `reset_peak_rss()` (else since the process started)."""
    mb = _proc_status_mb("VmHWM")
    if mb is not None:
        return mb
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak on a GPU, the RSS high-water mark on CPU.

    `baseline_mb` is what was in use when the block started (the loaded model), `peak_mb` the
    highest point inside it, `increase_mb` the difference (activations, gradients, optimizer state).
    """

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.kind = "cuda_max_allocated" if self.cuda else "rss_high_water_mark"

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.reset_ok = reset_peak_rss()
            self.baseline_mb = rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = peak_rss_mb()
        self.increase_mb = max(0.0, self.peak_mb - self.baseline_mb)


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], n: int, warmup: int, device: str = "cpu") -> list[float]:
    """Wall seconds of `n` calls of fn after `warmup` untimed calls (synchronising a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    mu = sum(xs) / len(xs)
    if len(xs) < 2:
        return mu, 0.0
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


# --------------------------------------------------------------------------- synthetic batches


def synthetic_batch(tokenizer, batch_size: int, seq_len: int, target_len: int, instruction_len: int = 8,
                    seed: int = 0, device: str = "cpu") -> dict:
    """A batch in the project's batch contract with random words, every row `seq_len` long:

        [CLS] instruction [SEP] input [SEP] target tokens [SEP]     (target span = last target_len)

    Speed and memory do not depend on which words are there, only on the shapes, so the step and
    sample suites use this instead of a data set (same shapes for every method).
    """
    import torch

    body = seq_len - target_len - 3
    if target_len < 2 or instruction_len < 1 or body - instruction_len < 1:
        raise BenchError(f"sequence {seq_len} too short for instruction {instruction_len} + target {target_len} + 3 specials")
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    low = 1000 if vocab > 5000 else max(special) + 1  # BERT vocabularies: skip [unused*] rows
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(low, vocab, (batch_size, seq_len), generator=g)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = words.clone()
    ids[:, 0] = cls
    ids[:, 1 + instruction_len] = sep
    t0 = seq_len - target_len
    ids[:, t0 - 1] = sep
    ids[:, -1] = sep
    positions = torch.arange(seq_len)
    instruction = (positions >= 1) & (positions <= instruction_len)
    target = positions >= t0
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "target_mask": target.expand(batch_size, seq_len).clone().to(device),
        "instruction_mask": instruction.expand(batch_size, seq_len).clone().to(device),
        "index": torch.arange(batch_size, device=device),
    }


_POS = "good great fun funny best love".split()
_NEG = "bad worst boring dull sad hate".split()
_FILL = "the a this movie film story is was very and but it one".split()


def synthetic_sst2(folder: str | os.PathLike, n_train: int = 256, n_val: int = 64, seed: int = 0) -> Path:
    """Write `<folder>/sst2/{train,validation}.jsonl`: SST-2-schema rows whose label follows from
    sentiment words (learnable in a few steps). For the orchestration suites (ray, asha) when no
    real data folder is given: they measure Ray, Tune and ASHA, not the data."""
    import random

    rng = random.Random(seed)
    out = Path(folder) / "sst2"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        lines = []
        for i in range(n):
            label = rng.randint(0, 1)
            words = [rng.choice(_FILL) for _ in range(rng.randint(4, 9))]
            for _ in range(rng.randint(1, 3)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(_POS if label else _NEG))
            lines.append(json.dumps({"sentence": " ".join(words) + " ", "label": label, "idx": i}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return Path(folder)


def resolve_data_dir(data_dir: str | None, task: str = "sst2", splits: tuple[str, ...] = ("train", "validation")) -> str | None:
    """--data-dir, else $LORA_DIFFUSION_DATA_DIR, checked to hold each split as the task finds it (`<task>/<split>.jsonl`,
    or the task's other candidates, e.g. squad's dev_split/train.jsonl); None when neither is set."""
    from lora_diffusion.tasks import get_task

    d = data_dir or os.environ.get("LORA_DIFFUSION_DATA_DIR")
    if not d:
        return None
    spec = get_task(task)
    missing = [" or ".join(f"{task}/{c}" for c in spec.local_candidates(s)) for s in splits if spec.local_path(d, s) is None]
    if missing:
        where = "--data-dir" if data_dir else "LORA_DIFFUSION_DATA_DIR"
        raise BenchError(f"{where}={d!r}: missing {', '.join(missing)} (expected <data_dir>/{task}/<split>.jsonl)")
    return str(Path(d).resolve())


def prepare_data(args: argparse.Namespace, work: str, size: str) -> tuple[str, str]:
    """(data folder, description): --data-dir (or $LORA_DIFFUSION_DATA_DIR), else a synthetic SST-2 folder in `work`."""
    d = resolve_data_dir(getattr(args, "data_dir", None))
    if d:
        return d, f"local folder {d}"
    n = {"smoke": 256, "quick": 2048, "full": 8192}[size]
    return str(synthetic_sst2(Path(work) / "data", n_train=n, n_val=128)), f"synthetic SST-2 ({n} train rows)"


# --------------------------------------------------------------------------- sizes, presets and options


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every suite has (its own come from its `add_arguments`)."""
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    p.add_argument("--smoke", action="store_true", help="seconds, for CI (wins over --quick)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:<index>")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the size's preset)")
    p.add_argument("--out", default="bench_results", help="folder for <suite>.json and <suite>.md")


def size_of(args: argparse.Namespace) -> str:
    """smoke, quick or full (--smoke wins over --quick)."""
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def with_options(preset: dict[str, Any], args: argparse.Namespace, keys: tuple[str, ...],
                 positive: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of a size's `preset` with each of `keys` given on the command line (and --threads) put in;
    every one of `positive` that is set must be >= 1 (BenchError naming the option)."""
    s = dict(preset)
    for key in keys:
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.threads is not None:
        s["threads"] = args.threads
    for key in positive:
        if s.get(key) is not None and s[key] < 1:
            raise BenchError(f"--{key.replace('_', '-')} {s[key]}: must be >= 1")
    return s


def int_list(flag: str, text: str, example: str = "") -> list[int]:
    """Comma-separated integers of an option such as --seeds 0,1,2 (BenchError naming the option otherwise)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} {text!r}: expected comma-separated integers" + (f", e.g. {example}" if example else "")) from None


# --------------------------------------------------------------------------- goals


def goal(name: str, measured: float, target: float, op: str = "<=", note: str = "") -> dict[str, Any]:
    """One goal of the issue with the measured figure and whether it was met."""
    if op not in ("<=", ">="):
        raise ValueError(f"goal op {op!r}: allowed <=, >=")
    ok = bool(math.isfinite(measured) and (measured <= target if op == "<=" else measured >= target))
    g = {"goal": name, "op": op, "target": target, "measured": measured, "met": ok}
    if note:
        g["note"] = note
    return g


# --------------------------------------------------------------------------- isolated runs


_LIVE: set[int] = set()  # process groups of the children run_isolated is waiting for (any thread)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` (a child started in its own session), if it still exists."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_children() -> None:
    """SIGKILL every child process group `run_isolated` started and still waits for (by its id)."""
    for pid in list(_LIVE):
        _kill_group(pid)


def run_isolated(func: str, spec: Any, timeout: float = 1800.0, env: dict[str, str] | None = None,
                 stream: bool = False) -> Any:
    """Run `module:function(spec)` in a fresh Python process and return its (JSON) result.

    Used so that each measurement has its own memory high-water mark and its own threads. The
    child runs in its own process group, which is killed (by its id) on timeout. With `stream`,
    the child's output is printed as it comes (long runs); otherwise only shown on failure.
    """
    import threading

    with tempfile.TemporaryDirectory(prefix="lora_diffusion_bench_") as tmp:
        spec_file, out_file = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "lora_diffusion.bench", "_worker", func, str(spec_file), str(out_file)]
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                start_new_session=True)
        timed_out: list[bool] = []

        def kill() -> None:
            timed_out.append(True)
            _kill_group(proc.pid)

        timer = threading.Timer(timeout, kill)
        timer.start()
        tail: list[str] = []
        _LIVE.add(proc.pid)
        try:
            for line in proc.stdout:
                if stream and line.strip() and "Loading weights" not in line:
                    print(line, end="", flush=True)
                tail = (tail + [line])[-60:]
            proc.wait()
        except BaseException:  # Ctrl-C or an error here: the child (its own session) would outlive us
            _kill_group(proc.pid)
            raise
        finally:
            timer.cancel()
            _LIVE.discard(proc.pid)
        output = "".join(tail)
        if timed_out:
            raise BenchError(f"{func} timed out after {timeout:.0f} s; last output:\n{output[-3000:]}")
        if proc.returncode != 0 or not out_file.is_file():
            raise BenchError(f"{func} failed (exit {proc.returncode}); last output:\n{output[-3000:]}")
        return json.loads(out_file.read_text())


def run_worker(func: str, spec_file: str, out_file: str) -> None:
    """The child side of `run_isolated` (`python -m lora_diffusion.bench _worker FUNC SPEC OUT`)."""
    module, name = func.split(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))


# --------------------------------------------------------------------------- output


def fmt(v: Any) -> str:
    """Numbers for tables: thousands separators, about three significant digits."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        a = abs(v)
        if not math.isfinite(v):
            return str(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 0.001:
            return f"{v:.3f}"
        return f"{v:.2g}"
    return str(v)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with (key, header) columns."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def goals_table(goals: list[dict[str, Any]]) -> str:
    rows = [{**g, "target": f"{g['op']} {fmt(g['target'])}", "status": "met" if g["met"] else "MISSED"} for g in goals]
    return table(rows, [("goal", "goal"), ("target", "target"), ("measured", "measured"), ("status", "status")])


def heading(result: dict[str, Any], suffix: str = "") -> list[str]:
    """The first lines of every suite's Markdown: its title (suite, size) and the machine line."""
    return [f"### Benchmark `{result['suite']}` ({result['size']}){suffix}", "", machine_line(result["machine"]), ""]


def machine_line(m: dict[str, Any]) -> str:
    dev = m["device"] if m["device"] == "cpu" else f"{m['device']} ({m['device_name']})"
    return (f"{m['date']} · {m['cpu_count']} CPUs ({m['cpus_usable']} usable) · torch {m['torch']} · "
            f"{m['torch_threads']} torch threads · device {dev} · load {m['load_avg_1m']} · commit {m['git_commit']}")


def check_finite(obj: Any, path: str = "") -> list[str]:
    """Paths of every non-finite float in a result (NaN/inf are reported, never hidden)."""
    bad: list[str] = []
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path or "<root>")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += check_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += check_finite(v, f"{path}[{i}]")
    return bad


def write_result(result: dict[str, Any], markdown: str, out_dir: str | os.PathLike, suite: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{suite}.json", out / f"{suite}.md"
    json_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path
