"""Benchmarks: `python -m lora_diffusion.bench <suite> [--quick | --smoke] [--device cuda] [--out DIR]`.

Suites (one file each in this folder, found automatically):

    step     train-step time, peak memory, parameters and adapter size of every method,
             against the frozen base's forward (the floor) and weight LoRA      (step.py)
    sample   generation time per example with and without the adapter (greedy / low-confidence)  (sample.py)
    ray      the training loop plainly vs inside Ray Train; Tune's per-trial overhead  (ray_overhead.py)
    asha     the same sweep with and without ASHA: trained steps and best objective  (asha.py)
    quality  real SST-2: every method, same budget, 3 seeds: accuracy, denoising accuracy, trainable %  (quality.py)

Sizes: `--smoke` (seconds, for CI), `--quick` (minutes on 2 CPU cores), neither = full (a GPU).
`--smoke` wins when both are given. Every suite measures ratios inside one run on one machine:
absolute times vary between machines and runs, so compare ratios, and rerun the suite rather
than mixing numbers from different runs.

Output: `<out>/<suite>.json` (machine info, settings, rows, goals with met / missed) and
`<out>/<suite>.md` (the same as a Markdown table, also printed). Default out: `bench_results/`.

Adding a suite is one file, `lora_diffusion/bench/<file>.py`, that defines the suite interface
(`Suite` below); what suites share (presets and options, machine info, goals, tables,
`run_isolated`, `BenchError`) is in `bench/common.py`:

    '''mine: what it measures, in one line (the text after "mine: " is the command's help).

    The rest of the docstring is the suite's --help description.
    '''
    from lora_diffusion.bench.common import goal, goals_table, heading, machine_info, table, with_options

    NAME = "mine"                                    # python -m lora_diffusion.bench mine
    PRESETS = {"smoke": dict(n=2), "quick": dict(n=20), "full": dict(n=200)}

    def add_arguments(p):                            # the suite's own options (argparse)
        p.add_argument("--n", type=int)

    def run(args, size):                             # size: smoke, quick or full; BenchError -> exit 2
        s = with_options(PRESETS[size], args, ("n",), positive=("n",))
        rows = [{"n": s["n"], "seconds": ...}]
        return {"machine": machine_info(args.device), "settings": s, "rows": rows,
                "goals": [goal("seconds <= 1", rows[0]["seconds"], 1.0)]}

    def markdown(result):                            # the run's result (plus suite, size, command)
        return "\\n".join([*heading(result), table(result["rows"], [("n", "n"), ("seconds", "s")]), "",
                          goals_table(result["goals"])])

Every suite also gets --quick, --smoke, --device, --threads and --out (`common.add_common_arguments`).
Files whose name starts with "_" and `common.py` are not suites; neither is a module without the
interface (a helper another suite imports).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

__all__ = ["Suite", "get_suite", "suites"]


@runtime_checkable
class Suite(Protocol):
    """What makes a module a suite (module attributes; the module's docstring is its help)."""

    NAME: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, size: str) -> dict[str, Any]: ...

    def markdown(self, result: dict[str, Any]) -> str: ...


@functools.cache
def suites() -> dict[str, ModuleType]:
    """Suite name -> module: every module in this folder that defines the `Suite` interface (imported on first use)."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if not isinstance(module, Suite):
            continue
        if module.NAME in found:
            raise ValueError(f"bench suite name {module.NAME!r} is defined twice (bench/{info.name}.py)")
        found[module.NAME] = module
    return found


def get_suite(name: str) -> ModuleType:
    try:
        return suites()[name]
    except KeyError:
        raise ValueError(f"bench suite {name!r}: unknown; allowed: {', '.join(sorted(suites()))}") from None
