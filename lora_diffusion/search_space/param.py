"""A resolved parameter: one searched key, its validated and typed distribution and its condition."""

from __future__ import annotations

from typing import Any

from lora_diffusion.search_space.errors import fmt
from lora_diffusion.search_space.schema import ParamSpec


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
            dist = f"{self.type} [{fmt(self.low)}, {fmt(self.high)}]"
            if self.step:
                dist += f" step {fmt(self.step)}"
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


def config_key(name: str) -> str:
    """The config key of a parameter name: `train.lr@full_ft` -> `train.lr`."""
    return name.split("@", 1)[0]
