"""The space file's schema: one pydantic spec per section, as the YAML spells it (unknown settings refused)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from lora_diffusion.search_space.constraints import CONSTRAINTS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
