"""Search spaces for `python -m lora_diffusion.tune`: typed, validated YAML files.

A space file names the run config every trial starts from (`base_config` + `overrides`), the
parameters to search (int / float / log_float / categorical, optionally conditional), the
constraints between them, the objective, the sampler, the early-stopping scheduler, the trial
count and concurrency, and the resources of one trial. See `tune_spaces/quick.yaml` for a
commented example. `load_space(path)` validates everything before any cluster time is spent and
raises `SpaceError` naming the file, the key, the bad value and what is allowed.

Sampling is Optuna's define-by-run: `Space.define_by_run(trial)` asks for the parameters in file
order, skips conditional ones whose condition does not hold, and samples constrained groups with
dependent ranges, so every sampled config satisfies the constraints by construction:

- phase boundaries: `b1` first, then `b2` in `[max(low, b1 + phase_gap), high]` (0 < b1 < b2 < 1);
- rank order (`constraints.rank_order: true`): `rank_early`, then `rank_mid <= rank_early`,
  then `rank_late <= rank_mid`, each range narrowed so the later ranks stay feasible.

Each constraint is one `Constraint` class in `CONSTRAINTS` (its settings in the file's `constraints:`
section, load-time check, sampling, check of a config, dry-run text); a new constraint is one class.

Parameters under `method.<name>.` are automatically conditional on `method.name == <name>` when
`method.name` is itself searched. The trial config is the base config plus the sampled values,
with the same dotted keys as `Config.flat()`.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from lora_diffusion.config import (
    METHOD_NAMES,
    PHASE_METRICS,
    Config,
    ConfigError,
    config_from_dict,
    flatten,
    parse_override,
    set_dotted,
)
from lora_diffusion.tasks import TASKS


class SpaceError(ValueError):
    """A search space is invalid; the message names the file, the key, the value and what is allowed."""


# --------------------------------------------------------------------------- metric names

# Metrics the training loop reports during training (usable by ASHA), with their natural direction.
TRAIN_METRICS: dict[str, str] = {
    "loss": "min", "denoise_loss": "min", "reg_rank": "min", "reg_orth": "min",
    **{m: "min" for m in PHASE_METRICS},  # masked cross-entropy per diffusion phase
    "tokens_per_s": "max", "samples_per_s": "max", "peak_mem_mb": "min",
    "trainable_params": "min", "total_params": "min",  # in every report (a second objective: size vs quality)
    "val_loss": "min", "val_denoise_acc": "max",  # need train.eval_every > 0
}
# Final-evaluation metrics of every task (token-level denoising accuracy); the others each Task declares.
TASK_INDEPENDENT_EVAL = {"eval_denoise_acc", "eval_denoise_acc_content"}


class _FromTasks(Mapping):
    """A table computed from the task registry at each lookup, so a task registered after this import counts."""

    def __init__(self, build):
        self._build = build

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self):
        return iter(self._build())

    def __len__(self):
        return len(self._build())


def _eval_metrics() -> dict[str, str]:
    tasks = {f"eval_{m}": mode for task in TASKS.values() for m, mode in task.eval_metrics().items()}
    return {**tasks, **{m: "max" for m in sorted(TASK_INDEPENDENT_EVAL)}}


# Metrics of the final evaluation (reported once, at the end of a trial): eval_<name> of each Task's eval_metrics().
EVAL_METRICS: Mapping[str, str] = _FromTasks(_eval_metrics)
KNOWN_METRICS: Mapping[str, str] = _FromTasks(lambda: {**TRAIN_METRICS, **_eval_metrics()})
# Task-specific final metrics, by task name; the TASK_INDEPENDENT_EVAL ones come from every task.
TASK_EVAL_METRICS: Mapping[str, set[str]] = _FromTasks(
    lambda: {name: {f"eval_{m}" for m in task.eval_metrics()} for name, task in TASKS.items()})

# Keys a space sets through `resources:` or that must not vary between trials.
NOT_SEARCHABLE = {
    "train.num_workers": "set resources.workers instead",
    "train.cpus_per_worker": "set resources.cpus_per_worker instead",
    "train.gpus_per_worker": "set resources.gpus_per_worker instead",
    "task.name": "a sweep tunes one task (write one space per task)",
    "task.data_dir": "pass --data-dir or set it in overrides",
    "train.output_dir": "trial folders are chosen by the tuner",
}
PHASE_KEYS = ("method.lora_diffusion.b1", "method.lora_diffusion.b2")
RANK_KEYS = ("method.lora_diffusion.rank_early", "method.lora_diffusion.rank_mid", "method.lora_diffusion.rank_late")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# --------------------------------------------------------------------------- constraints


class Constraint:
    """A relation between searched parameters that every sampled config satisfies by construction.

    A constraint is one subclass, listed in `CONSTRAINTS`:

    - `settings`: its fields of the space file's `constraints:` section, name -> (type, pydantic Field);
    - `keys`: the config keys it relates, sampled together in this order where the first searched one
      appears in the file (none may have an "@variant"; as the group is sampled when its first member's
      `when` holds, `validate` should require one `when` for all members);
    - `what`: how error messages name those keys;
    - `checked_alone`: False when the run config cannot check one key's value without the others
      (load time then only types a searched range's ends, as floats, and `validate` checks them together);
    - `active(space)`: whether it is in force in a space (a key searched, a setting switched on);
    - `validate(where, space)`: at load time, a SpaceError when the ranges cannot satisfy it;
    - `suggest(trial, space)`: the searched keys' values from an Optuna trial, ranges narrowed so it holds;
    - `violations(cfg, space)`: what a trial config breaks (initial points, and a self-check of `sample`);
    - `describe(space)`: its text in the dry run's `constraints:` line.
    """

    settings: ClassVar[dict[str, tuple[Any, Any]]] = {}
    keys: ClassVar[tuple[str, ...]] = ()
    what: ClassVar[str] = ""
    checked_alone: ClassVar[bool] = True

    def active(self, space: Space) -> bool:
        return any(space.param(k) is not None for k in self.keys)

    def validate(self, where: str, space: Space) -> None:
        raise NotImplementedError

    def suggest(self, trial, space: Space) -> dict[str, Any]:
        raise NotImplementedError

    def violations(self, cfg: Config, space: Space) -> list[str]:
        raise NotImplementedError

    def describe(self, space: Space) -> str:
        raise NotImplementedError


class PhaseOrder(Constraint):
    """0 < b1 < b2 < 1 with b2 - b1 >= phase_gap: `b1` first, then `b2` in [max(low, b1 + phase_gap), high]."""

    # Smallest b2 - b1 when a phase boundary is searched (0 < b1 < b2 < 1 always holds).
    settings = {"phase_gap": (float, Field(0.05, gt=0, lt=1))}
    keys = PHASE_KEYS
    what = "phase boundaries"
    checked_alone = False  # the config checks b1 < b2 as a pair

    @staticmethod
    def _range(space: Space, key: str) -> tuple[float, float]:
        p = space.param(key)
        if p is None:
            v = space.fixed(key)
            return v, v
        return p.low, p.high

    def validate(self, where: str, space: Space) -> None:
        gap = space.spec.constraints.phase_gap
        k1, k2 = self.keys
        for k in self.keys:
            p = space.param(k)
            if p is not None:
                if p.type == "categorical" or p.step:
                    raise SpaceError(f"{where}: params.{k}: phase boundaries are searched as continuous ranges (type: float, no step)")
                if not (0 < p.low and p.high < 1):
                    raise SpaceError(f"{where}: params.{k}: range [{_fmt(p.low)}, {_fmt(p.high)}] must lie inside (0, 1)")
        p1, p2 = space.param(k1), space.param(k2)
        if p1 is not None and p2 is not None and p1.when != p2.when:
            raise SpaceError(f"{where}: params.{k1} and params.{k2}: must have the same `when` condition")
        lo1, hi1 = self._range(space, k1)
        lo2, hi2 = self._range(space, k2)
        if lo1 > min(hi1, hi2 - gap) + 1e-12:
            raise SpaceError(f"{where}: params {k1} in [{_fmt(lo1)}, {_fmt(hi1)}] and {k2} in [{_fmt(lo2)}, {_fmt(hi2)}]: "
                             f"no b1 < b2 with b2 - b1 >= constraints.phase_gap={_fmt(gap)} (need b1.low + phase_gap <= b2.high)")

    def suggest(self, trial, space: Space) -> dict[str, float]:
        gap = space.spec.constraints.phase_gap
        k1, k2 = self.keys
        p1, p2 = space.param(k1), space.param(k2)
        lo1, hi1 = self._range(space, k1)
        lo2, hi2 = self._range(space, k2)
        out: dict[str, float] = {}
        b1 = p1.suggest(trial, lo1, min(hi1, hi2 - gap)) if p1 is not None else lo1
        if p1 is not None:
            out[k1] = b1
        if p2 is not None:
            out[k2] = p2.suggest(trial, max(lo2, b1 + gap), hi2)
        return out

    def violations(self, cfg: Config, space: Space) -> list[str]:
        gap = space.spec.constraints.phase_gap
        if cfg.method.name != "lora_diffusion":
            return []
        ld = cfg.method.lora_diffusion
        if not (0 < ld.b1 < ld.b2 < 1) or ld.b2 - ld.b1 < gap - 1e-9:
            return [f"b1={ld.b1}, b2={ld.b2}: need 0 < b1 < b2 < 1 and b2 - b1 >= {gap}"]
        return []

    def describe(self, space: Space) -> str:
        return f"0 < b1 < b2 < 1, b2 - b1 >= {_fmt(space.spec.constraints.phase_gap)}"


class RankOrder(Constraint):
    """rank_early >= rank_mid >= rank_late: each rank drawn from its range narrowed by the one before it
    and by what the later ranks need to stay feasible."""

    # Keep rank_early >= rank_mid >= rank_late (LoRA-Diffusion's step-adaptive ranks).
    settings = {"rank_order": (bool, Field(False))}
    keys = RANK_KEYS
    what = "ranks"

    def active(self, space: Space) -> bool:
        return space.spec.constraints.rank_order

    @staticmethod
    def _grid(space: Space, key: str) -> tuple[int, int, int]:
        p = space.param(key)
        if p is None:
            v = int(space.fixed(key))
            return v, v, 1
        return int(p.low), int(p.high), int(p.step or 1)

    def _floors(self, space: Space) -> list[int | None]:
        """floor[i]: the smallest value rank i can take so that ranks i+1.. stay feasible (None: infeasible)."""
        floors: list[int | None] = [None] * len(self.keys)
        below = None
        for i in range(len(self.keys) - 1, -1, -1):
            lo, hi, step = self._grid(space, self.keys[i])
            need = lo if below is None else max(lo, below)
            first = lo + math.ceil((need - lo) / step) * step
            if first > hi:
                return floors
            floors[i] = below = first
        return floors

    def validate(self, where: str, space: Space) -> None:
        searched = [k for k in self.keys if space.param(k) is not None]
        if not searched:
            raise SpaceError(f"{where}: constraints.rank_order: true, but none of {', '.join(self.keys)} is searched")
        conds = {repr(space.param(k).when) for k in searched}
        if len(conds) > 1:
            raise SpaceError(f"{where}: params {', '.join(searched)}: must have the same `when` condition under rank_order")
        for k in searched:
            if space.param(k).type != "int":
                raise SpaceError(f"{where}: params.{k}: constraints.rank_order needs int ranges (type: int), got {space.param(k).type}")
        if any(f is None for f in self._floors(space)):
            ranges = ", ".join(f"{k.rsplit('.', 1)[1]} in [{a}, {b}]" if space.param(k) is not None else f"{k.rsplit('.', 1)[1]} = {a}"
                               for k in self.keys for a, b, _ in [self._grid(space, k)])
            raise SpaceError(f"{where}: constraints.rank_order: {ranges} admit no rank_early >= rank_mid >= rank_late")

    def suggest(self, trial, space: Space) -> dict[str, int]:
        floors = self._floors(space)
        out: dict[str, int] = {}
        prev = None
        for i, key in enumerate(self.keys):
            lo, hi, step = self._grid(space, key)
            p = space.param(key)
            if p is None:
                prev = lo
                continue
            a = floors[i + 1] if i + 1 < len(self.keys) else lo
            a = max(lo, a)
            first = lo + math.ceil((a - lo) / step) * step
            b = hi if prev is None else min(hi, prev)
            last = lo + ((b - lo) // step) * step
            prev = out[key] = p.suggest(trial, first, last)
        return out

    def violations(self, cfg: Config, space: Space) -> list[str]:
        if cfg.method.name != "lora_diffusion":
            return []
        ld = cfg.method.lora_diffusion
        if not (ld.rank_early >= ld.rank_mid >= ld.rank_late):
            return [f"ranks {ld.rank_early}/{ld.rank_mid}/{ld.rank_late}: need rank_early >= rank_mid >= rank_late"]
        return []

    def describe(self, space: Space) -> str:
        return "rank_early >= rank_mid >= rank_late"


# Every constraint a space can use, in the order they are checked, described and reported.
CONSTRAINTS: list[Constraint] = [PhaseOrder(), RankOrder()]


# --------------------------------------------------------------------------- the file's schema


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


Scalar = str | int | float | bool | None


class ParamSpec(_Spec):
    # int: integers in [low, high] (step, log); float: reals in [low, high] (step or log);
    # log_float: reals in [low, high] sampled on a log scale; categorical: one of `choices`.
    type: Literal["int", "float", "log_float", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Scalar] | None = None
    # Sample only when these keys (earlier parameters or base config keys) have these values:
    # {key: value} or {key: [value, ...]}.
    when: dict[str, Scalar | list[Scalar]] | None = None


# The file's `constraints:` section: every constraint's settings (e.g. {phase_gap: 0.1, rank_order: true}).
ConstraintsSpec = create_model("ConstraintsSpec", __base__=_Spec,
                               **{name: field for c in CONSTRAINTS for name, field in c.settings.items()})


class SamplerSpec(_Spec):
    # tpe and nsga2 handle one or two objectives; random ignores the results
    name: Literal["tpe", "random", "nsga2"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(10, ge=0, description="random trials before TPE takes over")
    population_size: int = Field(50, ge=2, description="NSGA-II: configs per generation")


class SchedulerSpec(_Spec):
    name: Literal["asha", "none"] = "asha"
    # The metric ASHA compares at its rungs; it must be reported during training.
    # Default: the space's metric when that is a training metric.
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    grace_period: int = Field(1, ge=1, description="reports before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="reports of a full trial (default: from train.max_steps / train.report_every)")


class ResourcesSpec(_Spec):
    # Defaults come from the base config's train.num_workers / cpus_per_worker / gpus_per_worker.
    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial (DDP ranks)")
    cpus_per_worker: int | None = Field(None, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0)
    # in_process: the trial runs the training loop itself (one worker; no nested trainer);
    # torch_trainer: the trial builds and fits a TorchTrainer; auto: in_process for one worker.
    trial_runner: Literal["auto", "in_process", "torch_trainer"] = "auto"


class SpaceSpec(_Spec):
    name: str
    base_config: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, ParamSpec]
    constraints: ConstraintsSpec = Field(default_factory=ConstraintsSpec)
    # One metric, or two (a list) for a multi-objective sweep: Optuna keeps the Pareto front of both.
    metric: str | list[str]
    mode: Literal["min", "max"] | list[Literal["min", "max"]] | None = None
    # Configs the sweep tries first (Optuna enqueue_trial), e.g. the paper's defaults; a point may fix a
    # subset of the parameters (the rest are sampled) but constrained groups (b1/b2, ranks) as a whole.
    initial_points: list[dict[str, Scalar]] = Field(default_factory=list)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    num_samples: int = Field(10, ge=1)
    max_concurrent: int = Field(2, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    model_name: str | None = None  # registry name of the best adapter (default: the sweep name)

    @field_validator("name", "model_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"{v!r} must be 1-100 characters of letters, digits, '.', '_' or '-' (it names folders and MLflow entries)")
        return v


# --------------------------------------------------------------------------- resolved parameters


class Param:
    """One searched key with its (validated, typed) distribution and its condition."""

    def __init__(self, key: str, spec: ParamSpec, when: dict[str, list[Any]]):
        self.key = key  # the Optuna / Tune name: a config key, optionally with an "@variant" suffix
        self.config_key = config_key(key)
        self.type = spec.type
        self.log = spec.log or spec.type == "log_float"
        self.step = spec.step
        self.low = spec.low
        self.high = spec.high
        self.choices = spec.choices
        self.when = when  # key -> allowed values (explicit `when` plus the implicit method condition)

    @property
    def is_int(self) -> bool:
        return self.type == "int"

    def describe(self) -> str:
        if self.type == "categorical":
            dist = f"one of {self.choices}"
        else:
            dist = f"{self.type} [{_fmt(self.low)}, {_fmt(self.high)}]"
            if self.step:
                dist += f" step {_fmt(self.step)}"
            if self.log and self.type != "log_float":
                dist += " log"
        if self.when:
            dist += "  when " + ", ".join(f"{k} in {v}" for k, v in self.when.items())
        return dist

    def suggest(self, trial, low=None, high=None):
        low = self.low if low is None else low
        high = self.high if high is None else high
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(low), float(high), step=self.step, log=self.log)


def _fmt(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


# --------------------------------------------------------------------------- the space


class Space:
    """A validated search space: the base config, the ordered parameters and the sweep settings."""

    def __init__(self, spec: SpaceSpec, base: Config, path: Path | None, params: list[Param], source_text: str):
        self.spec = spec
        self.base = base
        self.path = path
        self.params = params
        self.source_text = source_text
        self._by_key = {p.key: p for p in params}
        self._base_dict = base.to_dict()
        self._base_flat_all = flatten(self._base_dict)
        self.constraints = [c for c in CONSTRAINTS if c.active(self)]  # the ones in force here
        self._plan = self._sampling_plan()

    def rebase(self, base: Config) -> None:
        """Replace the base config (e.g. with relative folders made absolute); the parameters stay."""
        self.base = base
        self._base_dict = base.to_dict()
        self._base_flat_all = flatten(self._base_dict)

    def param(self, key: str) -> Param | None:
        """The searched parameter named `key` (None when it is not searched)."""
        return self._by_key.get(key)

    def fixed(self, key: str) -> Any:
        """A config key's value in the base config."""
        return self._base_flat_all[key]

    # -- settings -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metrics(self) -> list[str]:
        """The objectives' metrics: one, or two for a multi-objective sweep (the first is `objective`)."""
        m = self.spec.metric
        return list(m) if isinstance(m, list) else [m]

    @property
    def modes(self) -> list[str]:
        m = self.spec.mode
        if isinstance(m, list):
            return list(m)
        if m is not None and len(self.metrics) == 1:
            return [m]
        return [KNOWN_METRICS[x] for x in self.metrics]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def metric(self) -> str:
        """The (first) objective's metric."""
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def scheduler_metric(self) -> str | None:
        if self.spec.scheduler.name == "none":
            return None
        return self.spec.scheduler.metric or self.metric

    @property
    def scheduler_mode(self) -> str | None:
        m = self.scheduler_metric
        if m is None:
            return None
        return self.spec.scheduler.mode or (self.mode if m == self.metric else KNOWN_METRICS[m])

    @property
    def max_t(self) -> int:
        """Reports of a full trial (ASHA's budget, in `training_iteration`s)."""
        if self.spec.scheduler.max_t:
            return self.spec.scheduler.max_t
        return reports_per_trial(self.base)

    @property
    def model_name(self) -> str:
        return self.spec.model_name or self.spec.name

    @property
    def workers(self) -> int:
        return self.base.train.num_workers

    @property
    def trial_runner(self) -> str:
        runner = self.spec.resources.trial_runner
        if runner == "auto":
            return "in_process" if self.workers == 1 else "torch_trainer"
        return runner

    def resources_per_trial(self) -> dict[str, Any]:
        """What one trial reserves: the trial process itself and its training workers."""
        t = self.base.train
        worker = {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker}
        if self.trial_runner == "in_process":
            return {"trial": worker, "workers": [], "total": dict(worker)}
        # The trial process only waits on its TorchTrainer: reserve no CPU (Tune's default 1 CPU
        # would starve the workers on a small machine); Ray refuses {"cpu": 0} alone.
        trial = {"CPU": 0, "memory": TRIAL_PROCESS_MEMORY}
        total = {"CPU": t.cpus_per_worker * t.num_workers, "GPU": t.gpus_per_worker * t.num_workers}
        return {"trial": trial, "workers": [worker] * t.num_workers, "total": total}

    # -- sampling ------------------------------------------------------------------------------
    def _sampling_plan(self) -> list[tuple[Constraint | None, list[Param]]]:
        """Parameters in file order; a constrained group is sampled together (by its constraint) where its
        first member appears."""
        groups = {k: c for c in self.constraints for k in c.keys}
        plan: list[tuple[Constraint | None, list[Param]]] = []
        done: set[str] = set()
        for p in self.params:
            if p.key in done:
                continue
            c = groups.get(p.key)
            members = c.keys if c is not None else (p.key,)
            plan.append((c, [self._by_key[k] for k in members if k in self._by_key]))
            done.update(members)
        return plan

    def _current(self, values: dict[str, Any], key: str) -> Any:
        return values[key] if key in values else self._base_flat_all.get(key)

    def _active(self, p: Param, values: dict[str, Any]) -> bool:
        return all(self._current(values, k) in allowed for k, allowed in p.when.items())

    def define_by_run(self, trial) -> None:
        """Optuna define-by-run: ask `trial` for every active parameter; constraints hold by construction."""
        values: dict[str, Any] = {}
        for constraint, group in self._plan:
            if not self._active(group[0], values):
                continue
            if constraint is not None:
                values.update(constraint.suggest(trial, self))
            else:
                (p,) = group
                values[p.config_key] = p.suggest(trial)
        return None

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        """The base config with the sampled values (dotted keys, "@variant" suffixes allowed) set; validated."""
        return apply_sampled(self._base_dict, sampled)

    def check_constraints(self, cfg: Config) -> list[str]:
        """Constraint violations of a trial config (empty when it satisfies them all)."""
        return [problem for c in self.constraints for problem in c.violations(cfg, self)]

    def make_sampler(self):
        import optuna

        s = self.spec.sampler
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=s.seed)
        if s.name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size)
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)

    @property
    def directions(self) -> list[str]:
        """Optuna's study directions, one per objective."""
        return ["minimize" if m == "min" else "maximize" for m in self.modes]

    # -- initial points (initial_points: in the file, --warm-start on the command line) ---------------
    @property
    def points(self) -> list[dict[str, Any]]:
        """The configs the sweep enqueues before sampling: the file's initial_points, then warm-start points."""
        return [dict(p) for p in self.spec.initial_points] + [dict(p) for p in getattr(self, "_extra_points", [])]

    def add_points(self, points: list[dict[str, Any]], source: str) -> None:
        """Enqueue more configs (e.g. the best of an earlier sweep); each is checked like initial_points."""
        checked = [self.check_point(p, f"{source} point {i}") for i, p in enumerate(points, 1)]
        self._extra_points = list(getattr(self, "_extra_points", [])) + checked

    def check_point(self, point: Any, where: str) -> dict[str, Any]:
        """`point` (parameter name -> value) typed as the sampler would give it; SpaceError naming the point
        and key when a key is not a parameter, a value is outside its range or choices, a constrained group is
        given in part, or the config breaks a constraint."""
        if not isinstance(point, dict) or not point:
            raise SpaceError(f"{where}: a point is a non-empty mapping of parameter names to values, got {point!r}")
        out: dict[str, Any] = {}
        for key, value in point.items():
            p = self._by_key.get(key)
            if p is None:
                raise SpaceError(f"{where}: {key}: not a searched parameter of this space; allowed: "
                                 f"{', '.join(q.key for q in self.params)}")
            out[key] = self._point_value(p, value, f"{where}: {key}")
        for key in out:
            for wkey, allowed in self._by_key[key].when.items():
                if wkey in self._by_key and wkey not in out:
                    raise SpaceError(f"{where}: {key} is sampled only when {wkey} in {allowed}: give {wkey} in the point too")
                if self._current(out, wkey) not in allowed:
                    raise SpaceError(f"{where}: {key} is not sampled when {wkey}={self._current(out, wkey)!r} "
                                     f"(only when {wkey} in {allowed}); remove it from the point")
        for c in self.constraints:
            searched = [k for k in c.keys if k in self._by_key]
            given = [k for k in searched if k in out]
            if given and len(given) != len(searched):
                raise SpaceError(f"{where}: gives {', '.join(given)} but not {', '.join(k for k in searched if k not in out)}: "
                                 "a constrained group is given whole or not at all")
        try:
            cfg = self.trial_config(out)
        except ConfigError as e:
            raise SpaceError(f"{where}: {out} is not a valid config:\n{e}") from None
        problems = self.check_constraints(cfg)
        if problems:
            raise SpaceError(f"{where}: breaks the space's constraints: {'; '.join(problems)}")
        return out

    @staticmethod
    def _point_value(p: Param, value: Any, where: str) -> Any:
        if p.type == "categorical":
            for c in p.choices:
                if c == value and isinstance(c, bool) == isinstance(value, bool):
                    return c
            raise SpaceError(f"{where}: {value!r} is not one of the choices {p.choices}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpaceError(f"{where}: {value!r} is not a number ({p.type} in [{_fmt(p.low)}, {_fmt(p.high)}])")
        if p.is_int and not float(value).is_integer():
            raise SpaceError(f"{where}: {value!r} is not a whole number (int parameter)")
        if not p.low - 1e-12 <= value <= p.high + 1e-12:
            raise SpaceError(f"{where}: {value!r} is outside the range [{_fmt(p.low)}, {_fmt(p.high)}]")
        if p.step:
            k = (value - p.low) / p.step
            if abs(k - round(k)) > 1e-9:
                raise SpaceError(f"{where}: {value!r} is not on the grid {_fmt(p.low)} + k * {_fmt(p.step)}")
        return int(value) if p.is_int else float(value)

    def sample(self, n: int) -> list[dict[str, Any]]:
        """The first `n` configurations the sweep's sampler will propose (no results told; initial points
        first), validated."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=self.make_sampler(), directions=self.directions)
        for point in self.points:
            study.enqueue_trial(point)
        out = []
        for _ in range(n):
            trial = study.ask()
            self.define_by_run(trial)
            cfg = self.trial_config(trial.params)
            problems = self.check_constraints(cfg)
            if problems:  # a bug in the sampling plan, never the user's fault
                raise AssertionError(f"sampled config breaks constraints: {problems}")
            out.append(dict(trial.params))
        return out

    # -- description ----------------------------------------------------------------------------
    def describe(self) -> str:
        b = self.base
        lines = [
            f"sweep {self.name!r}" + (f"  (space file {self.path})" if self.path else ""),
            f"  base: task={b.task.name} method={b.method.name} base={b.model.base} "
            f"data={b.task.resolved_data_dir() or 'Hugging Face Hub'} max_steps={b.train.max_steps}",
            (f"  objective: {self.mode} {self.metric} (logged as 'objective')" if not self.multi_objective else
             f"  objectives: {', '.join(f'{m} {x}' for m, x in zip(self.modes, self.metrics))} (Pareto front; "
             f"the first is logged as 'objective')"),
            f"  sampler: {self.spec.sampler.name} seed={self.spec.sampler.seed}"
            + (f" n_startup_trials={self.spec.sampler.n_startup_trials}" if self.spec.sampler.name == "tpe" else ""),
        ]
        if self.scheduler_metric:
            s = self.spec.scheduler
            lines.append(f"  scheduler: ASHA on {self.scheduler_mode} {self.scheduler_metric}, grace_period={s.grace_period} "
                         f"reduction_factor={_fmt(s.reduction_factor)} max_t={self.max_t} reports"
                         + (f" (ASHA compares one metric: {self.scheduler_metric}; a stopped trial has no final "
                            "objectives and is not on the Pareto front)" if self.multi_objective else ""))
        else:
            lines.append("  scheduler: none (every trial runs to the end)")
        lines.append(f"  trials: {self.spec.num_samples}, at most {self.spec.max_concurrent} at once")
        lines.append("  parameters:")
        width = max((len(p.key) for p in self.params), default=0)
        for p in self.params:
            lines.append(f"    {p.key:<{width}}  {p.describe()}")
        cons = [c.describe(self) for c in self.constraints]
        lines.append("  constraints: " + ("; ".join(cons) if cons else "none"))
        if self.points:
            lines.append(f"  initial points: {len(self.points)} (tried first, in this order)")
            for i, pt in enumerate(self.points, 1):
                lines.append(f"    {i}: " + ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in pt.items()))
        return "\n".join(lines)

    def resource_plan(self) -> str:
        r = self.resources_per_trial()
        t = self.base.train
        conc = self.spec.max_concurrent
        peak_cpu = r["total"]["CPU"] * conc
        peak_gpu = r["total"].get("GPU", 0) * conc
        lines = [
            f"resource plan: trial runner = {self.trial_runner}"
            + (" (training loop inside the trial process)" if self.trial_runner == "in_process"
               else f" (a TorchTrainer of {t.num_workers} workers per trial)"),
            f"  one trial: trial process {_res(r['trial'])}"
            + (f" + {t.num_workers} x worker {_res(r['workers'][0])}" if r["workers"] else "")
            + f" (torch threads per worker: {t.torch_threads or t.cpus_per_worker})",
            f"  at {conc} concurrent trials: {_fmt(float(peak_cpu))} CPU" + (f", {_fmt(float(peak_gpu))} GPU" if peak_gpu else ""),
        ]
        if not os.environ.get("RAY_ADDRESS"):
            ncpu = os.cpu_count() or 1
            fit = min(conc, int(ncpu // max(r["total"]["CPU"], 1)))
            note = f"{fit} trial(s) at once" if fit else "no trial fits here: run on a cluster (RAY_ADDRESS) or lower resources"
            if peak_gpu:
                note += "; trials need GPUs (Ray must see them)"
            lines.append(f"  this machine (local Ray): {ncpu} CPU -> {note}")
        else:
            lines.append(f"  cluster: RAY_ADDRESS={os.environ['RAY_ADDRESS']} (checked when the sweep starts)")
        return "\n".join(lines)


def config_key(name: str) -> str:
    """The config key of a parameter name: `train.lr@full_ft` -> `train.lr`."""
    return name.split("@", 1)[0]


def apply_sampled(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """A validated Config: `base` (a Config dict) with the sampled values set at their config keys."""
    data = copy.deepcopy(base)
    for name, value in sampled.items():
        set_dotted(data, config_key(name), value)
    return config_from_dict(data)


TRIAL_PROCESS_MEMORY = 64 * 1024 * 1024  # bytes reserved by a trial that only drives a TorchTrainer


def _res(d: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_fmt(float(v)) if k != 'memory' else str(v // (1024 * 1024)) + ' MiB'}"
                           for k, v in d.items() if v or k == "CPU") + "}"


def reports_per_trial(cfg: Config) -> int:
    """Reports a full trial makes: at every multiple of `train.report_every` or `train.eval_every`, and the last step."""
    t = cfg.train
    every = [t.report_every] + ([t.eval_every] if getattr(t, "eval_every", 0) else [])
    return sum(1 for step in range(1, t.max_steps + 1) if step == t.max_steps or any(step % e == 0 for e in every))


# --------------------------------------------------------------------------- loading


def load_space(path: str | os.PathLike | None = None, *, text: str | None = None, overrides: list[str] | None = None,
               name: str | None = None, num_samples: int | None = None, data_dir: str | None = None) -> Space:
    """Read, resolve and validate a space file (or YAML `text`); CLI values replace the file's."""
    where = str(path) if path is not None else "<space>"
    if text is None:
        p = Path(path)
        if not p.is_file():
            raise SpaceError(f"space file {where!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SpaceError(f"space file {where!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{e.start}); a search space is a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: top level must be a mapping of space settings, got {type(data).__name__}")
    if name is not None:
        data["name"] = name
    if num_samples is not None:
        data["num_samples"] = num_samples
    try:
        spec = SpaceSpec.model_validate(data)
    except ValidationError as e:
        raise SpaceError(f"{where}: " + _format(e)) from None
    if not spec.params:
        raise SpaceError(f"{where}: params: empty; name at least one config key to search (e.g. train.lr)")

    # The base config: the file, then the space's overrides, then the command line's, then resources.
    base_dict: dict[str, Any] = {}
    if spec.base_config:
        cfg_path = Path(spec.base_config)
        if not cfg_path.is_absolute() and path is not None:
            cfg_path = Path(path).parent / cfg_path
        if not cfg_path.is_file():
            raise SpaceError(f"{where}: base_config: file {str(cfg_path)!r} does not exist")
        base_dict = yaml.safe_load(cfg_path.read_text()) or {}
        if not isinstance(base_dict, dict):
            raise SpaceError(f"{where}: base_config {str(cfg_path)!r}: top level must be a mapping")
    all_keys = set(flatten(Config().to_dict()))
    for key, value in spec.overrides.items():
        _check_key(where, "overrides", key, all_keys, allow_not_searchable=True)
        set_dotted(base_dict, key, value)
    for item in overrides or []:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            raise SpaceError(f"command line: {e}") from None
        _check_key("command line", "override", key, all_keys, allow_not_searchable=True)
        set_dotted(base_dict, key, value)
    if data_dir is not None:
        set_dotted(base_dict, "task.data_dir", data_dir)
    res = spec.resources
    for field, key in (("workers", "train.num_workers"), ("cpus_per_worker", "train.cpus_per_worker"),
                       ("gpus_per_worker", "train.gpus_per_worker")):
        if getattr(res, field) is not None:
            set_dotted(base_dict, key, getattr(res, field))
    try:
        base = config_from_dict(base_dict)
    except ConfigError as e:
        raise SpaceError(f"{where}: the base config (base_config + overrides) is invalid:\n{e}") from None
    if res.trial_runner == "in_process" and base.train.num_workers > 1:
        raise SpaceError(f"{where}: resources.trial_runner: in_process runs one worker, but resources.workers is "
                         f"{base.train.num_workers}; use torch_trainer or auto")

    params = _resolve_params(where, spec, base, all_keys)
    _check_metrics(where, spec, base, params)
    space = Space(spec, base, Path(path) if path is not None else None, params, text)
    _check_constraints(where, space)
    if spec.initial_points:
        typed = [space.check_point(pt, f"{where}: initial_points[{i}]") for i, pt in enumerate(spec.initial_points)]
        space.spec = spec.model_copy(update={"initial_points": typed})
    return space


def _format(err: ValidationError) -> str:
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            out.append(f"{key}: unknown setting")
        elif e["type"] == "missing":
            out.append(f"{key}: required")
        else:
            out.append(f"{key}: got {e.get('input')!r}; {msg}")
    return "; ".join(out)


def _check_key(where: str, section: str, key: str, all_keys: set[str], allow_not_searchable: bool = False) -> None:
    if key not in all_keys:
        close = difflib.get_close_matches(key, sorted(all_keys), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; parameters are dotted config keys such as train.lr or method.lora_diffusion.rank_mid"
        raise SpaceError(f"{where}: {section}.{key}: unknown parameter (not a config key){hint}")
    if not allow_not_searchable and key in NOT_SEARCHABLE:
        raise SpaceError(f"{where}: params.{key}: cannot be searched: {NOT_SEARCHABLE[key]}")


def _validated_value(base: Config, key: str, value: Any, where: str, what: str) -> Any:
    """`value` as the config types it at `key` (raises SpaceError naming the key when the config refuses it)."""
    data = base.to_dict()
    set_dotted(data, key, value)
    if key.startswith("method.") and key.split(".")[1] in METHOD_NAMES:
        data["method"]["name"] = key.split(".")[1]
    if any(key in c.keys and not c.checked_alone for c in CONSTRAINTS):  # checked with its group by the constraint
        return float(value)
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise SpaceError(f"{where}: params.{key}.{what}: {value!r} is not a valid value:\n{e}") from None
    return flatten(cfg.to_dict())[key]


def _resolve_params(where: str, spec: SpaceSpec, base: Config, all_keys: set[str]) -> list[Param]:
    params: list[Param] = []
    seen: dict[str, Param] = {}
    method_searched = "method.name" in spec.params
    for name, ps in spec.params.items():
        key = config_key(name)
        at = f"{where}: params.{name}"
        if "@" in name and not re.match(r"^[A-Za-z0-9_-]+$", name.split("@", 1)[1]):
            raise SpaceError(f"{at}: the variant after '@' must be letters, digits, '_' or '-'")
        _check_key(where, "params", key, all_keys)
        if ps.type == "categorical":
            if ps.low is not None or ps.high is not None or ps.step is not None or ps.log:
                raise SpaceError(f"{at}: a categorical parameter takes `choices` only (not low/high/step/log)")
            if not ps.choices:
                raise SpaceError(f"{at}.choices: empty or missing; list at least one value")
            choices = [_validated_value(base, key, c, where, "choices") for c in ps.choices]
            if len(set(map(repr, choices))) != len(choices):
                raise SpaceError(f"{at}.choices: {ps.choices} has duplicates")
            ps = ps.model_copy(update={"choices": choices})
        else:
            if ps.choices is not None:
                raise SpaceError(f"{at}: a {ps.type} parameter takes low/high, not choices (use type: categorical)")
            if ps.low is None or ps.high is None:
                raise SpaceError(f"{at}: a {ps.type} parameter needs both low and high")
            if not ps.low < ps.high:
                raise SpaceError(f"{at}: low={_fmt(ps.low)} must be < high={_fmt(ps.high)} (to fix a value, put it in overrides)")
            log = ps.log or ps.type == "log_float"
            if log and ps.low <= 0:
                raise SpaceError(f"{at}.low: {_fmt(ps.low)}; a log-scale range needs low > 0")
            if ps.step is not None:
                if ps.step <= 0:
                    raise SpaceError(f"{at}.step: {_fmt(ps.step)}; must be > 0")
                if log:
                    raise SpaceError(f"{at}: step and a log scale cannot be combined")
            if ps.type == "int":
                for what in ("low", "high", "step"):
                    v = getattr(ps, what)
                    if v is not None and not float(v).is_integer():
                        raise SpaceError(f"{at}.{what}: {v!r}; an int parameter needs whole numbers")
                ps = ps.model_copy(update={"low": int(ps.low), "high": int(ps.high), "step": int(ps.step) if ps.step else None})
            for what in ("low", "high"):
                v = _validated_value(base, key, getattr(ps, what), where, what)
                if ps.type != "int" and isinstance(v, int) and not isinstance(v, bool):
                    raise SpaceError(f"{at}: {key} is an integer setting; use type: int")
        when = _resolve_when(where, name, ps, spec, base, seen, all_keys, method_searched)
        p = Param(name, ps, when)
        for other in params:
            if other.config_key == key and not _exclusive(other.when, when):
                raise SpaceError(f"{at}: {other.key} sets the same key {key}; variants need `when` conditions that never "
                                 f"hold together (e.g. different method.name values)")
        params.append(p)
        seen[key] = p
    return params


def _exclusive(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> bool:
    """True when conditions `a` and `b` can never hold at once (some key has disjoint allowed values)."""
    return any(k in b and not set(map(repr, a[k])) & set(map(repr, b[k])) for k in a)


def _check_numeric_when(at: str, src: "Param", allowed: list[Any]) -> None:
    """`when` on an int parameter names values of its grid; on a float parameter it never holds (a continuous
    draw equals a given value with probability 0)."""
    if src.type != "int":
        raise SpaceError(f"{at}: {allowed} can never hold: {src.key} is a {src.type} parameter, so a sampled value "
                         "equals a given one with probability 0; make it categorical to condition on it")
    step = src.step or 1
    bad = [v for v in allowed if isinstance(v, bool) or not isinstance(v, (int, float))
           or not src.low <= v <= src.high or (v - src.low) % step != 0]
    if bad:
        raise SpaceError(f"{at}: {bad} can never hold: {src.key} takes the integers {src.low}..{src.high}"
                         + (f" in steps of {step}" if step != 1 else "") + "; name values it can take")


def _resolve_when(where, name, ps: ParamSpec, spec: SpaceSpec, base: Config, seen: dict[str, Param],
                  all_keys: set[str], method_searched: bool) -> dict[str, list[Any]]:
    at = f"{where}: params.{name}"
    when: dict[str, list[Any]] = {}
    parts = config_key(name).split(".")
    if parts[0] == "method" and len(parts) > 2 and parts[1] in METHOD_NAMES:
        method = parts[1]
        if method_searched:
            choices = seen["method.name"].choices if "method.name" in seen else None
            if choices is None:
                raise SpaceError(f"{at}: comes before method.name in params; list method.name first")
            if method not in choices:
                raise SpaceError(f"{at}: has no effect: method.name is searched over {choices}, which does not include {method!r}")
            when["method.name"] = [method]
        elif base.method.name != method:
            raise SpaceError(f"{at}: has no effect: the base config's method.name is {base.method.name!r} "
                             f"(set method.name: {method} in overrides, or search method.name)")
    for wkey, wval in (ps.when or {}).items():
        allowed = wval if isinstance(wval, list) else [wval]
        if not allowed:
            raise SpaceError(f"{at}.when.{wkey}: empty list of values")
        if wkey in seen:
            src = seen[wkey]
            if src.type == "categorical":
                bad = [v for v in allowed if v not in src.choices]
                if bad:
                    raise SpaceError(f"{at}.when.{wkey}: {bad} not among that parameter's choices {src.choices}")
            else:  # a numeric parameter: the condition must name values it can take
                _check_numeric_when(f"{at}.when.{wkey}", src, allowed)
        elif any(config_key(n) == wkey for n in spec.params):
            raise SpaceError(f"{at}.when.{wkey}: that parameter is listed after {name}; list it first")
        elif wkey not in all_keys:
            raise SpaceError(f"{at}.when.{wkey}: unknown key (not a parameter or config key)")
        else:  # a fixed key of the base config: the condition holds always or never
            fixed = base.flat().get(wkey)
            if not any(v == fixed or str(v) == str(fixed) for v in allowed):
                raise SpaceError(f"{at}.when.{wkey}: {allowed} can never hold: {wkey} is not searched and the base "
                                 f"config fixes it to {fixed!r}, so {name} would never be sampled; search {wkey}, "
                                 "change the condition or drop it")
        if wkey in when:  # already conditioned (the implicit method condition): both must hold
            when[wkey] = [v for v in when[wkey] if v in allowed]
            if not when[wkey]:
                raise SpaceError(f"{at}.when.{wkey}: {allowed} contradicts the implicit condition method.name == {parts[1]!r}")
        else:
            when[wkey] = allowed
    return when


def _check_metrics(where: str, spec: SpaceSpec, base: Config, params: list[Param]) -> None:
    def known(metric: str, field: str) -> None:
        if metric not in KNOWN_METRICS:
            close = difflib.get_close_matches(metric, sorted(KNOWN_METRICS), n=3, cutoff=0.6)
            raise SpaceError(f"{where}: {field}: unknown metric {metric!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else "")
                             + f"; allowed: {', '.join(sorted(KNOWN_METRICS))}")

    metrics = spec.metric if isinstance(spec.metric, list) else [spec.metric]
    if not 1 <= len(metrics) <= 2:
        raise SpaceError(f"{where}: metric: got {len(metrics)} metrics {metrics}; give one metric, or a list of two "
                         "(e.g. [eval_accuracy, trainable_params]) for a two-objective sweep")
    if len(set(metrics)) != len(metrics):
        raise SpaceError(f"{where}: metric: {metrics} names the same metric twice")
    if isinstance(spec.mode, list) and len(spec.mode) != len(metrics):
        raise SpaceError(f"{where}: mode: got {spec.mode} for the {len(metrics)} metric(s) {metrics}; give one mode per metric")
    if len(metrics) > 1 and spec.mode is not None and not isinstance(spec.mode, list):
        raise SpaceError(f"{where}: mode: got {spec.mode!r} for the two metrics {metrics}; give a list, e.g. [max, min]")
    if len(metrics) == 1 and isinstance(spec.mode, list):
        raise SpaceError(f"{where}: mode: got the list {spec.mode} for one metric {metrics[0]!r}; give min or max")
    task = base.task.name
    for metric in metrics:
        known(metric, "metric")
        if metric in EVAL_METRICS and metric not in TASK_INDEPENDENT_EVAL and metric not in TASK_EVAL_METRICS.get(task, set()):
            allowed = sorted(TASK_EVAL_METRICS.get(task, set()) | TASK_INDEPENDENT_EVAL)
            raise SpaceError(f"{where}: metric: {metric!r} is not computed for task {task!r}; allowed for {task}: {', '.join(allowed)}")
        if metric in EVAL_METRICS and not base.train.eval_at_end:
            raise SpaceError(f"{where}: metric: {metric!r} comes from the final evaluation, but train.eval_at_end is false")
    s = spec.scheduler
    if s.name == "asha":
        m = s.metric or metrics[0]
        known(m, "scheduler.metric")
        if m in EVAL_METRICS:
            raise SpaceError(f"{where}: scheduler.metric: ASHA compares trials during training, but {m!r} is reported only at the end; "
                             f"set scheduler.metric to a training metric ({', '.join(sorted(TRAIN_METRICS))}) or scheduler.name: none")
        if m.startswith("val_") and getattr(base.train, "eval_every", 0) in (0, None):
            raise SpaceError(f"{where}: scheduler.metric: {m!r} needs periodic validation; set train.eval_every > 0 in overrides")
        max_t = s.max_t or reports_per_trial(base)
        if s.grace_period >= max_t:
            raise SpaceError(f"{where}: scheduler.grace_period: {s.grace_period} must be < max_t={max_t} reports "
                             f"(train.max_steps / train.report_every), or ASHA never stops a trial")
    for metric in metrics:
        if metric.startswith("val_") and getattr(base.train, "eval_every", 0) in (0, None):
            raise SpaceError(f"{where}: metric: {metric!r} needs periodic validation; set train.eval_every > 0 in overrides")


def _check_constraints(where: str, space: Space) -> None:
    for p in space.params:
        if p.key != p.config_key and any(p.config_key in c.keys for c in CONSTRAINTS):
            raise SpaceError(f"{where}: params.{p.key}: {' and '.join(c.what for c in CONSTRAINTS)} cannot have '@' variants")
    for c in space.constraints:
        c.validate(where, space)
