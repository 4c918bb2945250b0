"""The validated search space: sampling (Optuna define-by-run, constraints by construction), initial points,
the dry run's text and the resources of one trial; `apply_sampled` makes a trial's config."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

from lora_diffusion.config import Config, ConfigError, config_from_dict, flatten, set_dotted
from lora_diffusion.search_space import constraints
from lora_diffusion.search_space.constraints import Constraint
from lora_diffusion.search_space.errors import SpaceError, fmt
from lora_diffusion.search_space.metrics import KNOWN_METRICS
from lora_diffusion.search_space.param import Param, config_key
from lora_diffusion.search_space.schema import SpaceSpec


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
        self.constraints = [c for c in constraints.CONSTRAINTS if c.active(self)]  # the ones in force here
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
            raise SpaceError(f"{where}: {value!r} is not a number ({p.type} in [{fmt(p.low)}, {fmt(p.high)}])")
        if p.is_int and not float(value).is_integer():
            raise SpaceError(f"{where}: {value!r} is not a whole number (int parameter)")
        if not p.low - 1e-12 <= value <= p.high + 1e-12:
            raise SpaceError(f"{where}: {value!r} is outside the range [{fmt(p.low)}, {fmt(p.high)}]")
        if p.step:
            k = (value - p.low) / p.step
            if abs(k - round(k)) > 1e-9:
                raise SpaceError(f"{where}: {value!r} is not on the grid {fmt(p.low)} + k * {fmt(p.step)}")
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
                         f"reduction_factor={fmt(s.reduction_factor)} max_t={self.max_t} reports"
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
                lines.append(f"    {i}: " + ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in pt.items()))
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
            f"  at {conc} concurrent trials: {fmt(float(peak_cpu))} CPU" + (f", {fmt(float(peak_gpu))} GPU" if peak_gpu else ""),
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


def apply_sampled(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """A validated Config: `base` (a Config dict) with the sampled values set at their config keys."""
    data = copy.deepcopy(base)
    for name, value in sampled.items():
        set_dotted(data, config_key(name), value)
    return config_from_dict(data)


TRIAL_PROCESS_MEMORY = 64 * 1024 * 1024  # bytes reserved by a trial that only drives a TorchTrainer


def _res(d: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {fmt(float(v)) if k != 'memory' else str(v // (1024 * 1024)) + ' MiB'}"
                           for k, v in d.items() if v or k == "CPU") + "}"


def reports_per_trial(cfg: Config) -> int:
    """Reports a full trial makes: at every multiple of `train.report_every` or `train.eval_every`, and the last step."""
    t = cfg.train
    every = [t.report_every] + ([t.eval_every] if getattr(t, "eval_every", 0) else [])
    return sum(1 for step in range(1, t.max_steps + 1) if step == t.max_steps or any(step % e == 0 for e in every))
